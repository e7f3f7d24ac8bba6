"""Batch jobs as rows with their history: submitted, synced and cancelled through the
real ``local`` scheduler (real launcher processes), and every fault case through a tiny
stand-in scheduler (``tests/harness/fake_scheduler.py``) or a real broken job script.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator

import psutil
import pytest
from sqlalchemy import inspect, text

from balsam_core import BatchJobState, PluginError, SchedulerJobStatus, batchjobs, migrations
from balsam_core.api import Site
from balsam_core.errors import NotFound, ValidationError
from balsam_core.states import BATCH_JOB_END
from tests.harness.fake_scheduler import FakeScheduler, reject, run_command
from tests.harness.sites import wait_for

B = BatchJobState


@pytest.fixture
def local(site: Site) -> Iterator[object]:
    """The site's real ``local`` scheduler; live jobs are cancelled after the test."""
    scheduler = site.plugins.create("scheduler", "local", site.config)
    yield scheduler
    for job in batchjobs.jobs(site):
        if job.scheduler_id:
            scheduler.cancel(job.scheduler_id)


def ended(site: Site, scheduler: object, job_id: int) -> str | None:
    batchjobs.sync(site, scheduler)  # type: ignore[arg-type]
    state = batchjobs.get(site, job_id).state
    return state if B(state) in BATCH_JOB_END else None


def states(site: Site, job_id: int) -> list[str]:
    return [e.to_state for e in batchjobs.history(site, job_id)]


# ---------------------------------------------------------------------- real local jobs


def test_submitted_job_runs_its_tasks_and_is_recorded(site: Site, local) -> None:
    ids = site.add_tasks([{"command": ["true"], "workflow": "w", "tags": {"k": "v"}}] * 3)
    other = site.add_task(command=["true"], workflow="other").id
    job = batchjobs.submit(site, local, num_nodes=1, wall_time_min=5, queue="local",
                           workflow="w", tags={"k": "v"}, idle_timeout_s=0.5)
    assert (job.state, job.origin, job.project) == ("QUEUED", "user", "")
    assert job.scheduler_id and job.submit_time is not None
    assert ended(site, local, job.id) is None  # first look: running
    assert wait_for(lambda: ended(site, local, job.id)) == "FINISHED"

    assert states(site, job.id) == ["PENDING_SUBMISSION", "QUEUED", "RUNNING", "FINISHED"]
    row = batchjobs.get(site, job.id)
    assert row.native_state == "exited:0"
    assert row.submit_time <= row.start_time <= row.end_time
    assert all(site.task(i).state == "JOB_FINISHED" for i in ids)
    assert all(site.task(i).batch_job_id == job.id for i in ids)
    assert site.task(other).state == "READY"  # the filters reached the launcher
    script = (batchjobs.job_dir(site, job.id) / "submit.sh").read_text()
    assert f"--batch-job-id {job.id}" in script and "--wf w --tag k=v" in script
    assert sys.executable in script


def test_cancel_ends_the_running_job(site: Site, local) -> None:
    task = site.add_task(command=["sleep", "60"]).id
    job = batchjobs.submit(site, local, num_nodes=1, wall_time_min=5, queue="local")
    assert wait_for(lambda: site.task(task).state == "RUNNING")
    pid = int(job.scheduler_id)
    cancelled = batchjobs.cancel(site, local, job.id)
    assert cancelled.state == "CANCELLED" and cancelled.message == "cancelled by user"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert site.task(task).state == "RUN_TIMEOUT"  # the launcher stopped cleanly
    assert batchjobs.cancel(site, local, job.id).state == "CANCELLED"  # idempotent
    assert states(site, job.id)[-1] == "CANCELLED"
    batchjobs.sync(site, local)
    assert batchjobs.get(site, job.id).state == "CANCELLED"  # an end state stays


def test_job_dying_at_start_is_failed_with_reason(site: Site, local, caplog) -> None:
    """Real local job whose script (a site template override) fails before the
    launcher starts, as a job does when e.g. its environment setup breaks."""
    templates = site.site_dir / "templates"
    templates.mkdir()
    original = local.template_text()[0]
    (templates / "local.sh").write_text(
        original.replace("\n${launcher_argv}\n", "\necho 'module: not found' >&2; (exit 3)\n")
    )
    job = batchjobs.submit(site, local, num_nodes=1, wall_time_min=5, queue="local")
    assert job.state == "QUEUED"
    with caplog.at_level(logging.INFO, logger="balsam_core.batchjobs"):
        assert wait_for(lambda: ended(site, local, job.id)) == "FAILED"
    row = batchjobs.get(site, job.id)
    assert row.native_state == "exited:3"
    assert "failed (scheduler state exited:3)" in row.message
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"batch job {job.id}" in errors[0].getMessage()
    assert f"log/batch-jobs/{job.id}/" in errors[0].getMessage()
    out = (batchjobs.job_dir(site, job.id) / "batch.out").read_text()
    assert "module: not found" in out


# ---------------------------------------------------------------------- submission faults


def submit_failing(site: Site, sched: FakeScheduler, caplog) -> object:
    with caplog.at_level(logging.INFO, logger="balsam_core.batchjobs"):
        job = batchjobs.submit(site, sched, num_nodes=2, wall_time_min=30, queue="debug")
    assert job.state == "SUBMIT_FAILED" and job.scheduler_id is None
    assert states(site, job.id) == ["PENDING_SUBMISSION", "SUBMIT_FAILED"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert errors[0].exc_info is None  # no traceback
    return job


def test_scheduler_rejecting_the_job(site: Site, caplog) -> None:
    sched = FakeScheduler()
    sched.on_submit = reject("sbatch: error: invalid partition specified: debug")
    job = submit_failing(site, sched, caplog)
    assert job.message == "submission failed: sbatch: error: invalid partition specified: debug"


def test_submit_command_missing(site: Site, caplog) -> None:
    sched = FakeScheduler()
    sched.on_submit = run_command(["/nonexistent/bin/sbatch"], timeout=5)
    job = submit_failing(site, sched, caplog)
    assert job.message == "submission failed: command not found: /nonexistent/bin/sbatch"


def test_submit_command_hangs_until_timeout(site: Site, caplog) -> None:
    sched = FakeScheduler()
    sched.on_submit = run_command(["sh", "-c", "sleep 30", "sbatch"], timeout=0.3)
    start = time.monotonic()
    job = submit_failing(site, sched, caplog)
    assert time.monotonic() - start < 5
    assert job.message.startswith("submission failed: TimeoutExpired: Command")
    assert "timed out after 0.3 seconds" in job.message


def test_bad_arguments_write_nothing(site: Site) -> None:
    sched = FakeScheduler()
    for kwargs, words in [
        ({"num_nodes": 0}, "num_nodes must be an integer >= 1"),
        ({"wall_time_min": 0}, "wall_time_min must be an integer >= 1"),
        ({"job_mode": "smp"}, "job mode must be one of mpi, serial"),
        ({"queue": ""}, "queue name"),
    ]:
        args = {"num_nodes": 1, "wall_time_min": 5, "queue": "q", **kwargs}
        with pytest.raises(ValidationError, match=words):
            batchjobs.submit(site, sched, **args)
    assert batchjobs.jobs(site, include_ended=True) == [] and not sched.submitted


# ---------------------------------------------------------------------- sync faults


def test_status_garbage_is_unknown_then_recovers(site: Site) -> None:
    sched = FakeScheduler()
    job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q")
    sched.on_status = lambda ids: {i: "Unknown Job Id garbage" for i in ids}
    batchjobs.sync(site, sched)
    assert batchjobs.get(site, job.id).state == "UNKNOWN"
    sched.on_status = None
    sched.states[job.scheduler_id] = B.RUNNING
    batchjobs.sync(site, sched)
    assert batchjobs.get(site, job.id).state == "RUNNING"
    assert states(site, job.id) == ["PENDING_SUBMISSION", "QUEUED", "UNKNOWN", "RUNNING"]


def test_status_failing_raises_one_line_and_changes_nothing(site: Site) -> None:
    sched = FakeScheduler()
    job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q")

    def broken(ids):  # type: ignore[no-untyped-def]
        raise PluginError("qstat: garbage output: '<html>502 Bad Gateway'")

    sched.on_status = broken
    with pytest.raises(PluginError, match="^scheduler status failed: qstat: garbage output"):
        batchjobs.sync(site, sched)
    sched.on_status = lambda ids: ["not", "a", "mapping"]
    with pytest.raises(PluginError, match="returned list, not a mapping"):
        batchjobs.sync(site, sched)
    assert batchjobs.get(site, job.id).state == "QUEUED"


def test_jobs_the_scheduler_forgot_end(site: Site) -> None:
    sched = FakeScheduler()
    now = time.time()
    seen = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q", now=now)
    unseen = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q", now=now)
    sched.states[seen.scheduler_id] = B.RUNNING
    batchjobs.sync(site, sched, now=now + 1)
    sched.states.clear()  # e.g. squeue forgets finished jobs
    batchjobs.sync(site, sched, now=now + 2)  # within the grace: unchanged
    assert batchjobs.get(site, seen.id).state == "RUNNING"
    batchjobs.sync(site, sched, now=now + batchjobs.VANISH_GRACE_S + 60)
    assert batchjobs.get(site, seen.id).state == "FINISHED"
    assert batchjobs.get(site, unseen.id).state == "FAILED"
    assert "before it was seen running" in batchjobs.get(site, unseen.id).message


def test_native_state_changes_without_new_event(site: Site) -> None:
    sched = FakeScheduler()
    job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q")
    sched.on_status = lambda ids: {i: SchedulerJobStatus(i, B.QUEUED, "CF") for i in ids}
    batchjobs.sync(site, sched)
    assert batchjobs.get(site, job.id).native_state == "CF"
    assert states(site, job.id) == ["PENDING_SUBMISSION", "QUEUED"]


def test_sync_without_changes_does_not_take_the_write_lock(sqlite_site: Site) -> None:
    """Every service period syncs; when the scheduler reports nothing new, it must not
    queue behind (or stall) the launchers' writes on SQLite's database-wide lock."""
    site, sched = sqlite_site, FakeScheduler()
    job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q")
    batchjobs.sync(site, sched)  # records the native state ("QU")
    with site.db.session(write=True) as other:  # another writer holds the lock throughout
        other.execute(text("SELECT 1"))  # BEGIN IMMEDIATE happens here
        assert batchjobs.sync(site, sched) == []  # QUEUED, as recorded: nothing to write
    sched.states[job.scheduler_id] = B.RUNNING
    assert [e.to_state for e in batchjobs.sync(site, sched)] == ["RUNNING"]


def test_launcher_start_marks_the_job_running_at_once(site: Site) -> None:
    sched = FakeScheduler()
    job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q")
    assert batchjobs.mark_started(site, job.id, "launcher 7 started on c1", now=123.0)
    assert not batchjobs.mark_started(site, job.id, "again")
    row = batchjobs.get(site, job.id)
    assert (row.state, row.start_time, row.message) == ("RUNNING", 123.0, "launcher 7 started on c1")
    with pytest.raises(NotFound):
        batchjobs.mark_started(site, 999, "x")


def test_cancel_failing_keeps_the_job(site: Site) -> None:
    sched = FakeScheduler()
    job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="q")

    def broken(sid: str) -> None:
        raise PluginError("scancel: error: Kill job error on job id 1000: Access denied")

    sched.cancel = broken  # type: ignore[method-assign]
    with pytest.raises(PluginError, match=f"batch job {job.id}: cancel of 1000 failed: scancel"):
        batchjobs.cancel(site, sched, job.id)
    assert batchjobs.get(site, job.id).state == "QUEUED"
    with pytest.raises(NotFound, match="no batch job with id 999"):
        batchjobs.cancel(site, sched, 999)


# ---------------------------------------------------------------------- schema


def test_upgrade_from_version_1_adds_history(site: Site) -> None:
    """A site made before batch-job history (schema 1) is upgraded in place."""
    with site.db.session(write=True) as s:
        s.execute(text("DROP TABLE batch_job_event"))
        s.execute(text("ALTER TABLE batch_job DROP COLUMN origin"))
        s.execute(text("UPDATE balsam_meta SET value = '1' WHERE key = 'schema_version'"))
        s.execute(text("INSERT INTO batch_job (queue, project, num_nodes, wall_time_min, "
                       "job_mode, filter_tags, extra, state, native_state, message, created) "
                       "VALUES ('q', '', 1, 5, 'mpi', '{}', '{}', 'FINISHED', '', '', 0)"))
    with site.db.session(write=True) as s:  # version 3's indexes did not exist either
        s.execute(text("DROP INDEX ix_task_staging"))
        s.execute(text("DROP INDEX ix_task_app_state"))
    with site.db.session(write=True) as s:  # nor version 4's
        for index in ("ix_task_killed", "ix_task_lease_expires", "ix_launcher_live"):
            s.execute(text(f"DROP INDEX {index}"))
    assert site.db.upgrade() == [2, 3, 4]
    assert migrations.SCHEMA_VERSION == 4
    assert "batch_job_event" in inspect(site.db.engine).get_table_names()
    indexes = {i["name"] for i in inspect(site.db.engine).get_indexes("task")}
    assert {
        "ix_task_staging", "ix_task_app_state", "ix_task_killed", "ix_task_lease_expires"
    } <= indexes
    assert [i["name"] for i in inspect(site.db.engine).get_indexes("launcher")] == [
        "ix_launcher_live"
    ]
    assert batchjobs.get(site, 1).origin == "user"
    job = batchjobs.submit(site, FakeScheduler(), num_nodes=1, wall_time_min=5, queue="q")
    assert states(site, job.id) == ["PENDING_SUBMISSION", "QUEUED"]
