"""The built-in ``local`` scheduler, exercised with real processes."""

from __future__ import annotations

import ast
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pluggy
import psutil
import pytest

from balsam_core import (
    Allocation,
    BatchJobSpec,
    BatchJobState,
    PluginContext,
    PluginError,
    Scheduler,
    SchedulerPlugin,
    hookspecs,
)
from balsam_core.builtin import local_scheduler
from balsam_core.builtin.local_scheduler import LocalScheduler, LocalSettings, parse_native_state
from balsam_core.config import from_dict
from tests.harness.sites import wait_for

# The "launcher" of these jobs: dumps its argv and BALSAM_LOCAL_END_TIME, then
# exits with a code, sleeps, or sleeps ignoring SIGTERM.
PROGRAM = r"""
import json, os, signal, sys, time
mode = sys.argv[1]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open("argv.json.tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], "end": os.environ.get("BALSAM_LOCAL_END_TIME"),
               "cwd": os.getcwd(), "job": os.environ.get("BALSAM_BATCH_JOB_ID")}, f)
os.replace("argv.json.tmp", "argv.json")
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
time.sleep(30)
"""
NASTY = ["; rm -rf x", "$(id)", "`id`", "a'b\"c", "${HOME}", " two  spaces ", "*"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site dir"
    site.mkdir()
    return site


@pytest.fixture
def make_scheduler(site: Path) -> Iterator[Callable[..., LocalScheduler]]:
    made: list[LocalScheduler] = []

    def make(grace: float = 2.0, **launcher: object) -> LocalScheduler:
        cfg = from_dict({"launcher": launcher}, site)
        context = PluginContext(
            site_dir=site, config=cfg, settings=LocalSettings(cancel_grace_s=grace)
        )
        (record,) = local_scheduler.balsam_schedulers()
        sched = record.factory(context)
        made.append(sched)
        return sched

    yield make
    # Leave no process behind, whatever a test did.
    for sched in made:
        try:
            entries = sched._read_registry().values()
        except PluginError:
            entries = []
        for entry in entries:
            proc = local_scheduler._live_process(entry)
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in sched._children.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def sched(make_scheduler) -> LocalScheduler:
    return make_scheduler()


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return path


def job_spec(site: Path, program: Path, mode: str, job_id: int = 1, **kw) -> BatchJobSpec:
    fields = dict(
        job_id=job_id,
        queue="local",
        project="",
        num_nodes=1,
        wall_time_min=5,
        job_mode="mpi",
        launcher_argv=(sys.executable, str(program), mode, *NASTY),
        workdir=site / "jobs" / f"job {job_id}",
    )
    fields.update(kw)
    return BatchJobSpec(**fields)


def submit(sched: LocalScheduler, job: BatchJobSpec) -> str:
    job.workdir.mkdir(parents=True, exist_ok=True)
    script = job.workdir / "local.sh"
    script.write_text(sched.render_script(job))
    return sched.submit(script, job)


def alive(proc: psutil.Process) -> bool:
    """Still running (a zombie waiting for init to reap it has ended)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def end_state(sched: LocalScheduler, sid: str) -> BatchJobState | None:
    st = sched.status([sid]).get(sid)
    return st.state if st and st.state is not BatchJobState.RUNNING else None


# --------------------------------------------------------------------------- plugin


def test_registered_through_pluggy(sched) -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(local_scheduler)
    records = [r for rs in pm.hook.balsam_schedulers() for r in rs]
    assert [r.name for r in records] == ["local"]
    assert isinstance(records[0], SchedulerPlugin)
    assert records[0].settings is LocalSettings
    assert isinstance(sched, Scheduler)


def test_factory_without_settings_uses_defaults(site: Path) -> None:
    cfg = from_dict({}, site)
    sched = LocalScheduler.from_context(PluginContext(site_dir=site, config=cfg))
    assert sched.settings == LocalSettings()
    with pytest.raises(ValueError):
        LocalSettings(cancel_grace_s=-1)


def test_imports_only_the_public_surface() -> None:
    tree = ast.parse(Path(local_scheduler.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "balsam" in node.module:
            assert node.module == "balsam_core" and node.level == 0
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("balsam_core.") for a in node.names)


# --------------------------------------------------------------------------- script


def test_rendered_script_is_valid_bash_with_quoted_values(sched, site, program) -> None:
    job = job_spec(site, program, "exit:0", workdir=site / "it's $(here)")
    text = sched.render_script(job)
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert f"\ncd -- {shlex.quote(str(job.workdir))} || exit 1\n" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith(shlex.quote(sys.executable))]
    assert tuple(shlex.split(line)) == job.launcher_argv


def test_package_template_is_shipped() -> None:
    import importlib.resources

    res = importlib.resources.files("balsam_core.builtin").joinpath("templates/local.sh")
    assert "${launcher_argv}" in res.read_text()


def test_site_template_wins_and_typos_are_reported(sched, site, program) -> None:
    (site / "templates").mkdir()
    override = site / "templates" / "local.sh"
    override.write_text("#!/bin/bash\n# job ${job_id} costs $$5\n${launcher_argv}\n")
    text = sched.render_script(job_spec(site, program, "exit:0", job_id=42))
    assert text.startswith("#!/bin/bash\n# job 42 costs $5\n")
    override.write_text("${launcher_argv} ${wall_time}\n")
    with pytest.raises(PluginError, match=r"templates/local.sh: unknown placeholder \$\{wall_time\}"):
        sched.render_script(job_spec(site, program, "exit:0"))
    override.write_text("echo $5\n")
    with pytest.raises(PluginError, match="write \\$\\$ for a literal \\$"):
        sched.render_script(job_spec(site, program, "exit:0"))


def test_refuses_more_than_one_node_and_bad_wall_time(sched, site, program) -> None:
    with pytest.raises(PluginError, match=r"asks for 4 nodes: set max_nodes = 1 in \[scheduler.queues.local\]"):
        sched.render_script(job_spec(site, program, "exit:0", num_nodes=4))
    with pytest.raises(PluginError, match="wall_time_min must be a whole number >= 1"):
        sched.render_script(job_spec(site, program, "exit:0", wall_time_min=0))


# --------------------------------------------------------------------------- lifecycle


def test_job_exiting_0_is_finished_and_gets_argv_literally(sched, site, program) -> None:
    job = job_spec(site, program, "exit:0", job_id=5, wall_time_min=7)
    job.workdir.mkdir(parents=True)
    (job.workdir / "x").write_text("must survive")
    before = time.time()
    sid = submit(sched, job)
    assert sid.isdigit()
    assert wait_for(lambda: end_state(sched, sid)) is BatchJobState.FINISHED
    status = sched.status([sid])[sid]
    assert (status.native_state, status.num_nodes, status.wall_time_min) == ("exited:0", 1, 7)

    dump = json.loads((job.workdir / "argv.json").read_text())
    assert dump["argv"] == ["exit:0", *NASTY]
    assert (job.workdir / "x").read_text() == "must survive"
    assert Path(dump["cwd"]) == job.workdir
    assert dump["job"] == "5"
    assert before + 7 * 60 - 2 <= float(dump["end"]) <= time.time() + 7 * 60 + 1
    assert (job.workdir / "exit_code").read_text() == "0\n"
    assert "launcher exited with status 0" in (job.workdir / "batch.out").read_text()

    ident = json.loads((job.workdir / "local.id").read_text())
    registry = json.loads((site / "log" / "local-jobs.json").read_text())
    assert ident["pid"] == int(sid) and registry[sid]["create_time"] == ident["create_time"]
    assert registry[sid]["workdir"] == str(job.workdir)
    assert not sched._children  # reaped: no zombie left behind


def test_job_exiting_3_is_failed(sched, site, program) -> None:
    sid = submit(sched, job_spec(site, program, "exit:3"))
    assert wait_for(lambda: end_state(sched, sid)) is BatchJobState.FAILED
    assert sched.status([sid])[sid].native_state == "exited:3"


def test_status_seen_from_another_process_object(make_scheduler, site, program) -> None:
    sid = submit(make_scheduler(), job_spec(site, program, "exit:3"))
    other = make_scheduler()  # e.g. a restarted service: it only has the registry
    assert wait_for(lambda: end_state(other, sid)) is BatchJobState.FAILED


def test_running_job_is_cancelled(sched, site, program) -> None:
    job = job_spec(site, program, "sleep")
    sid = submit(sched, job)
    status = sched.status([sid])[sid]
    assert (status.state, status.native_state) == (BatchJobState.RUNNING, "running")
    assert wait_for(lambda: (job.workdir / "argv.json").exists())
    tree = [psutil.Process(int(sid)), *psutil.Process(int(sid)).children(recursive=True)]
    assert len(tree) == 2

    start = time.monotonic()
    sched.cancel(sid)
    assert time.monotonic() - start < 1.5  # SIGTERM was enough, no grace period spent
    assert not any(alive(p) for p in tree)
    status = sched.status([sid])[sid]
    assert (status.state, status.native_state) == (BatchJobState.CANCELLED, "cancelled")
    # bash's trap ran after the launcher ended: the exit status was still recorded
    assert (job.workdir / "exit_code").read_text() == f"{128 + signal.SIGTERM}\n"
    sched.cancel(sid)  # already gone: no error


def test_cancel_escalates_to_sigkill(make_scheduler, site, program) -> None:
    sched = make_scheduler(grace=0.3)
    job = job_spec(site, program, "ignore-term")
    sid = submit(sched, job)
    assert wait_for(lambda: (job.workdir / "argv.json").exists())
    tree = [psutil.Process(int(sid)), *psutil.Process(int(sid)).children(recursive=True)]
    start = time.monotonic()
    sched.cancel(sid)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert not any(alive(p) for p in tree)
    assert sched.status([sid])[sid].state is BatchJobState.CANCELLED
    assert not (job.workdir / "exit_code").exists()


def test_cancel_of_finished_or_unknown_job_is_quiet(sched, site, program) -> None:
    sid = submit(sched, job_spec(site, program, "exit:0"))
    assert wait_for(lambda: end_state(sched, sid)) is BatchJobState.FINISHED
    sched.cancel(sid)
    sched.cancel("999999999")
    assert sched.status([sid])[sid].state is BatchJobState.FINISHED  # not marked cancelled


def test_unknown_and_reused_pids_are_omitted(sched, site) -> None:
    assert sched.status(["999999999", "not-a-pid"]) == {}
    me = psutil.Process()
    ended = site / "ended"
    ended.mkdir()
    (ended / "exit_code").write_text("0\n")
    gone = site / "gone"
    gone.mkdir()
    with sched._registry() as jobs:
        # our own pid, but with another start time: a reused pid, not the job
        for name, d in (("reused-no-trace", gone), ("reused-ended", ended)):
            jobs[name] = {
                "pid": me.pid,
                "create_time": me.create_time() - 1000,
                "workdir": str(d),
                "script": str(d / "local.sh"),
            }
    result = sched.status(["reused-no-trace", "reused-ended"])
    assert list(result) == ["reused-ended"]
    assert result["reused-ended"].state is BatchJobState.FINISHED
    sched.cancel("reused-no-trace")  # never signals the unrelated process
    assert me.is_running()


# --------------------------------------------------------------------------- native states


def test_native_state_table() -> None:
    assert parse_native_state("running") is BatchJobState.RUNNING
    assert parse_native_state("exited:0") is BatchJobState.FINISHED
    assert parse_native_state("exited:3") is BatchJobState.FAILED
    assert parse_native_state("exited:-9") is BatchJobState.FAILED
    assert parse_native_state("cancelled") is BatchJobState.CANCELLED
    with pytest.warns(RuntimeWarning, match="unknown native state 'suspended'"):
        assert parse_native_state("suspended") is BatchJobState.UNKNOWN


def test_garbled_exit_code_is_unknown_with_a_warning(sched, site) -> None:
    d = site / "garbled"
    d.mkdir()
    (d / "exit_code").write_text("oops\n")
    with sched._registry() as jobs:
        jobs["1"] = {"pid": 1, "create_time": 0.0, "workdir": str(d), "script": str(d / "s.sh")}
    with pytest.warns(RuntimeWarning, match="exited:oops"):
        status = sched.status(["1"])["1"]
    assert status.state is BatchJobState.UNKNOWN


def test_corrupt_registry_is_one_clear_error(sched, site) -> None:
    (site / "log").mkdir()
    (site / "log" / "local-jobs.json").write_text("{not json")
    with pytest.raises(PluginError, match="local-jobs.json: corrupt local job registry"):
        sched.status(["1"])


# --------------------------------------------------------------------------- allocation


def test_allocation_without_end_time(make_scheduler, monkeypatch) -> None:
    monkeypatch.delenv("BALSAM_LOCAL_END_TIME", raising=False)
    alloc = make_scheduler(cpus_per_node=8, gpus_per_node=2).allocation()
    assert isinstance(alloc, Allocation)
    (node,) = alloc.nodes
    assert (node.cpus, node.gpu_ids, alloc.end_time) == (8, (0, 1), None)
    assert node.name


def test_allocation_with_end_time(make_scheduler, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_LOCAL_END_TIME", "1700000123")
    alloc = make_scheduler().allocation()
    assert alloc.end_time == 1700000123.0
    assert alloc.nodes[0].cpus == (os.cpu_count() or 1)
    assert alloc.nodes[0].gpu_ids == ()
    monkeypatch.setenv("BALSAM_LOCAL_END_TIME", "soon")
    with pytest.raises(PluginError, match="BALSAM_LOCAL_END_TIME='soon' is not a time"):
        make_scheduler().allocation()


def test_no_backfill_windows(sched) -> None:
    assert sched.backfill_windows() == []
