"""The elastic queue: the pure decision on a virtual clock, then the service around it
against the real ``local`` scheduler (real launchers) and, for faults, a stand-in."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from balsam_core import (
    BackfillWindow,
    BatchJobState,
    JobRequest,
    QueuePolicy,
    TaskRequirements,
    batchjobs,
)
from balsam_core.api import Site
from balsam_core.builtin.packing import FifoPacking
from balsam_core.config import ServiceSection
from balsam_core.errors import BalsamError
from balsam_core.service import (
    JobView,
    Observation,
    Service,
    ServiceLock,
    plan,
    submit_gap,
)
from balsam_core.states import State
from balsam_core.transitions import Change
from tests.harness.fake_scheduler import FakeScheduler, reject
from tests.harness.sites import wait_for

B = BatchJobState
Q = {"q": QueuePolicy(max_queued=2, max_nodes=4, max_wall_min=60)}
SETTINGS = ServiceSection(submit_interval_s=60, max_backoff_s=600)
FIFO = FifoPacking()
T0 = 1_000_000.0


def tasks(n: int, nodes: int = 1, wall: float = 10, share: int = 1) -> list[TaskRequirements]:
    return [TaskRequirements(i, num_nodes=nodes, node_packing_count=share, wall_time_min=wall)
            for i in range(n)]


def view(job_id: int, request: JobRequest, state: BatchJobState = B.QUEUED) -> JobView:
    return JobView(job_id, request.queue, request.num_nodes, request.wall_time_min, state,
                   "service")


def observe(backlog: Sequence[TaskRequirements], jobs: Sequence[JobView] = (),
            now: float = T0, **kw: object) -> Observation:
    return Observation(now=now, backlog=backlog, jobs=jobs, queues=kw.pop("queues", Q), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the pure decision


def test_backlog_becomes_a_job_sized_by_job_packing() -> None:
    decision = plan(observe(tasks(8)), FIFO, SETTINGS)
    # 8 one-node 10-min tasks on at most 4 nodes: 2 shelves of 4.
    assert decision.submit == (JobRequest("q", 4, 20),)
    assert decision.retire == () and decision.refused == ()
    assert plan(observe([]), FIFO, SETTINGS) == plan(observe([]), FIFO, SETTINGS)
    assert plan(observe([]), FIFO, SETTINGS).submit == ()


def test_one_submission_per_interval_on_a_virtual_clock() -> None:
    backlog = tasks(40, wall=60)  # wants both queue slots
    first = plan(observe(backlog), FIFO, SETTINGS)
    assert len(first.submit) == 1 and len(first.held) == 1
    assert first.next_submit_at == T0 + 60
    queued = [view(1, first.submit[0])]
    early = plan(observe(backlog, queued, T0 + 59, last_submit=T0), FIFO, SETTINGS)
    assert early.submit == () and len(early.held) == 1 and early.next_submit_at == T0 + 60
    due = plan(observe(backlog, queued, T0 + 60, last_submit=T0), FIFO, SETTINGS)
    assert len(due.submit) == 1
    both = queued + [view(2, due.submit[0])]
    full = plan(observe(backlog, both, T0 + 600, last_submit=T0 + 60), FIFO, SETTINGS)
    assert full.submit == () and full.held == ()  # max_queued = 2 reached
    assert full.retire == ()  # both are needed


def test_failures_in_a_row_double_the_gap_up_to_the_cap() -> None:
    assert [submit_gap(SETTINGS, n) for n in range(6)] == [60, 120, 240, 480, 600, 600]
    assert submit_gap(ServiceSection(submit_interval_s=0, max_backoff_s=30), 3) == 8


def test_a_rejecting_scheduler_sees_no_storm_in_an_hour_of_virtual_time() -> None:
    attempts, failures, last = [], 0, None
    for t in range(0, 3600, 10):
        decision = plan(observe(tasks(5), now=T0 + t, last_submit=last,
                                failures_in_a_row=failures), FIFO, SETTINGS)
        for _ in decision.submit:  # every submission is refused
            attempts.append(t)
            failures, last = failures + 1, T0 + t
    assert attempts == [0, 120, 360, 840, 1440, 2040, 2640, 3240]


def test_queue_policy_holds_whatever_the_strategy_asks() -> None:
    class Greedy:
        def size_jobs(self, backlog, queues, active, windows, now):  # type: ignore[no-untyped-def]
            return [JobRequest("q", 1, 10)] * 5 + [JobRequest("q", 64, 10),
                                                   JobRequest("nope", 1, 10)]

    free = ServiceSection(submit_interval_s=0, max_backoff_s=0)
    decision = plan(observe(tasks(1)), Greedy(), free)  # type: ignore[arg-type]
    assert decision.submit == (JobRequest("q", 1, 10),) * 2
    assert sum("max_queued = 2 reached" in r for r in decision.refused) == 3
    assert any("nodes outside 1..4" in r for r in decision.refused)
    assert any("nope: 1 node(s) x 10 min: no such queue" in r for r in decision.refused)
    off = {"q": QueuePolicy(submit=False, max_queued=2, max_nodes=4)}
    assert plan(observe(tasks(5), queues=off), FIFO, free).submit == ()


def test_queued_service_jobs_are_retired_when_the_backlog_is_gone() -> None:
    jobs = [
        JobView(1, "q", 4, 20, B.QUEUED, "service"),
        JobView(2, "q", 4, 20, B.QUEUED, "user"),
        JobView(3, "q", 4, 20, B.RUNNING, "service", start_time=T0),
        JobView(4, "q", 4, 20, B.PENDING_SUBMISSION, "service"),
    ]
    decision = plan(observe([], jobs), FIFO, SETTINGS)
    assert decision.retire == (1,) and decision.submit == ()


def test_queued_jobs_that_running_ones_make_useless_are_retired() -> None:
    running = JobView(1, "q", 4, 60, B.RUNNING, "service", start_time=T0)
    queued = [JobView(2, "q", 4, 20, B.QUEUED, "service"), JobView(3, "q", 4, 20, B.QUEUED, "service")]
    small = plan(observe(tasks(4), [running, *queued]), FIFO, SETTINGS)
    assert small.retire == (2, 3) and small.submit == ()
    # Most of the running job's time is gone: one queued job is still needed, the oldest.
    late = plan(observe(tasks(8), [running, *queued], now=T0 + 55 * 60), FIFO, SETTINGS)
    assert late.retire == (3,) and late.submit == ()
    # Both needed: none retired, and no new job to replace one (no churn).
    busy = plan(observe(tasks(16), [running, *queued], now=T0 + 55 * 60), FIFO, SETTINGS)
    assert busy.retire == () and busy.submit == ()


def test_filtered_jobs_are_no_capacity_but_hold_their_queue_place() -> None:
    filtered = JobView(1, "q", 4, 60, B.RUNNING, "user", start_time=T0, filtered=True)
    assert plan(observe(tasks(4), [filtered]), FIFO, SETTINGS).submit == (JobRequest("q", 4, 10),)
    waiting = [JobView(i, "q", 4, 60, B.QUEUED, "user", filtered=True) for i in (1, 2)]
    held = plan(observe(tasks(4), waiting), FIFO, SETTINGS)
    assert held.submit == () and held.refused == ()  # max_queued, seen by job packing too


def test_backfill_window_shapes_the_request() -> None:
    windows = [BackfillWindow("q", 2, 25)]
    decision = plan(observe(tasks(4), windows=windows), FIFO, SETTINGS)
    assert decision.submit == (JobRequest("q", 2, 20),)


# ---------------------------------------------------------------------- the service


def configure(site: Site, **service: object) -> Site:
    """Reopen *site* with ``[service]`` keys changed in its balsam.toml."""
    path = site.config.path
    text = path.read_text()
    for key, value in service.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value!r}".replace("'", '"'), text)
        assert n == 1, key
    path.write_text(text)
    return Site.open(site.site_dir)


@pytest.fixture
def svc_site(site: Site) -> Iterator[Site]:
    opened = configure(site, job_idle_timeout_s=0.5, submit_interval_s=60.0)
    yield opened
    local = opened.plugins.create("scheduler", "local", opened.config)
    for job in batchjobs.jobs(opened):
        if job.scheduler_id and job.scheduler_id.isdigit():
            local.cancel(job.scheduler_id)
    opened.db.dispose()


def test_service_runs_the_backlog_through_a_local_job(svc_site: Site) -> None:
    site = svc_site
    ids = site.add_tasks([{"command": ["true"], "node_packing_count": 2}] * 3)
    service = Service(site)
    report = service.run_once()
    assert report.backlog == 3 and report.errors == [] and len(report.submitted) == 1
    (job_id,) = report.submitted
    job = batchjobs.get(site, job_id)
    # 3 half-node tasks of 10 min (the default estimate): 2 side by side, 1 on top.
    assert (job.origin, job.queue, job.num_nodes, job.wall_time_min) == ("service", "local", 1, 20)
    assert wait_for(lambda: all(site.task(i).state == "JOB_FINISHED" for i in ids))
    assert wait_for(lambda: service.run_once().changes and
                    batchjobs.get(site, job_id).state == "FINISHED")
    again = service.run_once()
    assert again.backlog == 0 and again.submitted == [] and again.errors == []


def test_service_retires_its_queued_job_when_tasks_are_killed(site: Site) -> None:
    sched = FakeScheduler()
    ids = site.add_tasks([{"command": ["true"]}] * 2)
    user_job = batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="debug",
                                now=time.time() - 3600)
    report = Service(site, scheduler=sched).run_once()
    (job_id,) = report.submitted
    site.kill(ids)
    report = Service(site, scheduler=sched).run_once()
    assert report.retired == [job_id]
    job = batchjobs.get(site, job_id)
    assert job.state == "CANCELLED" and "retired by the service" in job.message
    assert sched.cancelled == [job.scheduler_id]
    assert batchjobs.get(site, user_job.id).state == "QUEUED"  # never the user's


def test_scheduler_error_is_one_line_and_the_service_goes_on(site: Site, caplog) -> None:
    sched = FakeScheduler()
    site.add_task(command=["true"])
    batchjobs.submit(site, sched, num_nodes=1, wall_time_min=5, queue="debug",
                     now=time.time() - 3600)

    def broken(ids):  # type: ignore[no-untyped-def]
        raise TimeoutError("squeue did not answer within 30 s")

    sched.on_status = broken
    service = Service(site, scheduler=sched)
    with caplog.at_level(logging.INFO):
        runner = threading.Thread(target=service.run, kwargs={"period_s": 0.02})
        runner.start()
        assert wait_for(lambda: sched.status_calls >= 3, timeout=10)
        service.stop()
        runner.join(timeout=10)
    assert not runner.is_alive()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(
        e == "syncing batch jobs failed: scheduler status failed: TimeoutError: squeue did "
        "not answer within 30 s" for e in errors
    )
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.ERROR)
    assert len(sched.submitted) == 2  # the user's, then one by the service (rate limit)


def test_rejecting_scheduler_gets_no_storm(site: Site) -> None:
    sched = FakeScheduler()
    sched.on_submit = reject("sbatch: error: Batch job submission failed: Invalid account")
    site.add_tasks([{"command": ["true"]}] * 5)
    service = Service(site, scheduler=sched)
    now = time.time()
    reports = [service.run_once(now=now + t) for t in range(0, 600, 10)]
    assert len(sched.submitted) == 3  # at 0, 120 and 360 s: the gap doubles
    assert sum(len(r.failed) for r in reports) == 3
    assert {j.state for j in batchjobs.jobs(site, include_ended=True)} == {"SUBMIT_FAILED"}


def test_reclaims_tasks_of_dead_launchers(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """All of them in one period, though the task source reclaims a batch per call."""
    from balsam_core import LauncherInfo, NodeResources, StateUpdate
    from balsam_core.builtin import database_source

    monkeypatch.setattr(database_source, "RECLAIM_BATCH", 2)
    tasks = site.add_tasks([{"command": ["true"]}] * 5)
    site.transition([Change(t, s) for s in (State.STAGED_IN, State.PREPROCESSED) for t in tasks])
    source = site.plugins.create("task_source", "database", site.config)
    launcher = source.register(LauncherInfo("gone-host", 1))
    leased = source.lease(launcher, [NodeResources("n", 4)] * 5, 10)
    assert [t.task_id for t in leased] == tasks
    source.report(launcher, [StateUpdate(t, State.RUNNING, "started") for t in tasks])
    service = Service(site, scheduler=FakeScheduler(), source=source)
    assert service.run_once().reclaimed == 0  # the launcher is not lost yet
    report = service.run_once(now=time.time() + site.config.launcher.lease_s + 1)
    assert report.reclaimed == 5
    assert site.count() == {"RUN_TIMEOUT": 5}
    assert f"launcher {launcher}" in site.history(tasks[0])[-1].message  # the source says why


def test_one_service_per_site(site: Site) -> None:
    with ServiceLock(site.site_dir):
        with pytest.raises(BalsamError, match=r"another balsam service runs for this site \(pid \d+"):
            Service(site, scheduler=FakeScheduler()).run(once=True)
    Service(site, scheduler=FakeScheduler()).run(once=True)  # free again
