"""The launcher's hot loop with real processes: every way a task can end, and the
launcher keeps running the others.  Tasks are made runnable directly (PREPROCESSED)
and processing is off, so these tests see the loop alone (the processing worker is
tested in test_processing.py and, inside a real launcher, in test_launcher_cli.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from balsam_core import Placement, TaskRequirements
from balsam_core.api import Site
from balsam_core.launcher.nodes import local_nodes
from balsam_core.launcher.pilot import (
    LEASE_AHEAD_S, MIN_AHEAD, STOP_SIGNAL_HOLD_S, Launcher, LauncherOptions,
)
from balsam_core.launcher.processes import Exited
from balsam_core.models import Task
from balsam_core.states import State
from balsam_core.transitions import Change

PY = sys.executable


def runnable(site: Site, *specs: dict) -> list[int]:
    """Add tasks straight into PREPROCESSED; they share nodes (up to 4 per node) unless
    the spec says otherwise."""
    ids = site.add_tasks([{"node_packing_count": 4, **spec} for spec in specs])
    site.transition([Change(i, s) for i in ids for s in (State.STAGED_IN, State.PREPROCESSED)])
    return ids


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def run(site: Site, nodes: int = 1, cpus: int = 2, gpus: int = 0, **options) -> Launcher:
    options.setdefault("idle_timeout_s", 0.3)
    options.setdefault("grace_s", 0.5)
    launcher = Launcher(
        site, LauncherOptions(nodes=local_nodes(nodes, cpus, gpus), **options), processing=False
    )
    launcher.run()
    return launcher


def last(site: Site, task_id: int) -> tuple[str, str]:
    event = site.history(task_id)[-1]
    return event.to_state, event.message


def run_end(site: Site, task_id: int) -> tuple[str, str]:
    """How the task's last run ended (a clean run is then fast-forwarded to JOB_FINISHED)."""
    history = site.history(task_id)
    started = max(i for i, e in enumerate(history) if e.to_state == "RUNNING")
    return history[started + 1].to_state, history[started + 1].message


def workdir(site: Site, task_id: int) -> Path:
    return site.config.data_dir / site.task(task_id).default_workdir


def test_every_kind_of_ending(sqlite_site: Site) -> None:
    site = sqlite_site
    site.add_app("echoer", ["echo", "{x}"])
    ok, code3, segv, missing, nul = runnable(
        site,
        {"command": py("print('hello')"), "name": "ok"},
        {"command": py("import sys; print('bad', file=sys.stderr); sys.exit(3)"), "name": "code3"},
        {"command": py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"), "name": "segv"},
        {"command": ["/nonexistent/program", "x"], "name": "missing"},
        {"app": "echoer", "parameters": {"x": "a\0b"}, "name": "nul"},  # no argv can hold it
    )
    launcher = run(site)
    assert run_end(site, ok)[0] == "RUN_DONE"
    assert (workdir(site, ok) / "stdout").read_text() == "hello\n"
    assert last(site, code3)[0] == "RUN_ERROR" and "exit code 3" in last(site, code3)[1]
    assert site.task(code3).return_code == 3
    assert (workdir(site, code3) / "stderr").read_text() == "bad\n"
    assert last(site, segv)[0] == "RUN_ERROR" and "SIGSEGV" in last(site, segv)[1]
    assert site.task(segv).return_code == -11
    assert last(site, missing) == ("RUN_ERROR", "executable not found: /nonexistent/program")
    assert last(site, nul) == ("RUN_ERROR", "could not start: embedded null byte in 'a\\x00b'")
    assert [e.to_state for e in site.history(ok)][-4:] == [
        "RUNNING", "RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"
    ]
    for task_id in (code3, segv, missing, nul):
        assert [e.to_state for e in site.history(task_id)][-2] == "RUNNING"
    for task_id in (ok, code3, segv, missing, nul):
        events = site.history(task_id)
        assert all(e.launcher_id == launcher.launcher_id for e in events[-2:])
        assert site.task(task_id).lease_launcher_id is None
    assert launcher.stop_reason == "idle timeout"


def test_tasks_leased_ahead_follow_the_start_rate(sqlite_site: Site) -> None:
    """Many short tasks: large leases (cheaper per task); long ones: few leased ahead
    (another launcher sharing the backlog gets its share)."""
    launcher = Launcher(
        sqlite_site, LauncherOptions(nodes=local_nodes(1, 4, 0), prefetch=300), processing=False
    )
    start = launcher._rate_mark[1]
    assert launcher._ahead(start) == MIN_AHEAD  # no rate yet
    launcher.stats.started = 400  # 800 starts/s
    assert launcher._ahead(start + 0.5) == int(800 * LEASE_AHEAD_S)
    launcher.stats.started = 2400  # 4000 starts/s: capped
    assert launcher._ahead(start + 1.0) == 300
    launcher.stats.started = 2410  # a start per second
    assert launcher._ahead(start + 11.0) == MIN_AHEAD


def test_busy_slots_are_not_leased_for(sqlite_site: Site) -> None:
    """Tasks are leased for the free slots plus those leased ahead: a launcher whose
    slots are all busy holds no more queued than it starts in ``LEASE_AHEAD_S`` (with
    thousands of nodes, it held a whole allocation's worth while others idled)."""
    launcher = Launcher(
        sqlite_site, LauncherOptions(nodes=local_nodes(2, 8, 0), prefetch=300), processing=False
    )
    now = launcher._rate_mark[1]
    free, limit = launcher._lease_request(now)
    assert limit == 16 + MIN_AHEAD and sum(n.cpus for n in free) == 16 + 16  # idle: all free
    for task_id, node in enumerate(launcher.pool.nodes):
        whole = TaskRequirements(task_id, ranks_per_node=8)
        launcher.pool.take(Placement(task_id, (node.name,)), whole)
    free, limit = launcher._lease_request(now)
    assert limit == MIN_AHEAD and sum(n.cpus for n in free) == 16  # room ahead only
    launcher.queue = dict.fromkeys(range(MIN_AHEAD // 2))  # type: ignore[arg-type]
    assert not launcher._wants_lease(now)
    launcher.pool.release(0)  # an exit: its slots are leased for again
    assert launcher._wants_lease(now) and launcher._lease_request(now)[1] == 8 + MIN_AHEAD // 2


def test_an_idle_launcher_without_a_worker_sees_work_being_prepared(sqlite_site: Site) -> None:
    """Tasks with a stage-in or a preprocess step (another launcher's worker does them)
    keep a launcher without processing from its idle timeout; those of other
    workflows, or with nothing to do, do not."""
    site = sqlite_site

    def coming(**options: object) -> bool:
        nodes = local_nodes(1, 2, 0)
        return Launcher(site, LauncherOptions(nodes=nodes, **options), processing=False)._work_coming()

    site.add_tasks([{"command": "true"}] * 3)
    assert not coming()
    site.add_tasks([{"command": "true", "input_files": ["*.x"], "workflow": "w"}])
    assert coming() and coming(workflow="w") and not coming(workflow="v")
    site.add_app("pre", ["true"], preprocess="true")
    site.add_tasks([{"app": "pre", "workflow": "v"}])
    assert coming(workflow="v")


def test_wall_time_ends_a_task_that_ignores_sigterm(sqlite_site: Site) -> None:
    site = sqlite_site
    (stubborn,) = runnable(
        site,
        {
            "command": py(
                "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                "open('pid', 'w').write(str(os.getpid())); time.sleep(120)"
            ),
            "wall_time_min": 0.01,
        },
    )
    started = time.time()
    run(site)
    assert time.time() - started < 10
    state, message = last(site, stubborn)
    assert state == "RUN_TIMEOUT" and "wall time exceeded" in message
    pid = int((workdir(site, stubborn) / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_grandchildren_do_not_outlive_their_task(sqlite_site: Site) -> None:
    site = sqlite_site
    (parent,) = runnable(site, {"command": ["sh", "-c", "sleep 120 & echo $! > grandchild.pid"]})
    run(site)
    assert run_end(site, parent)[0] == "RUN_DONE"
    pid = int((workdir(site, parent) / "grandchild.pid").read_text())
    time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_large_output_goes_to_the_file(sqlite_site: Site) -> None:
    site = sqlite_site
    (big,) = runnable(site, {"command": py("import sys; sys.stdout.write('x' * 100_000_000)")})
    run(site)
    assert run_end(site, big)[0] == "RUN_DONE"
    assert (workdir(site, big) / "stdout").stat().st_size == 100_000_000


def test_kill_from_the_database_ends_the_whole_tree(site: Site) -> None:
    sleeper, other = runnable(
        site,
        {"command": ["sh", "-c", "sleep 120 & echo $! > child.pid; echo $$ > main.pid; wait"]},
        {"command": py("import time; time.sleep(1.5)")},
    )
    site.config.launcher.__dict__["heartbeat_s"] = 0.2  # frozen dataclass: test-only speed-up

    def kill_soon() -> None:
        deadline = time.time() + 10
        while not (workdir(site, sleeper) / "child.pid").exists() and time.time() < deadline:
            time.sleep(0.05)
        Site.open(site.site_dir).kill(sleeper)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    run(site, idle_timeout_s=0.5)
    killer.join()
    assert site.task(sleeper).state == "USER_KILLED"
    assert run_end(site, other)[0] == "RUN_DONE"  # the launcher kept running the others
    for name in ("main.pid", "child.pid"):
        pid = int((workdir(site, sleeper) / name).read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_end_of_allocation(sqlite_site: Site) -> None:
    site = sqlite_site
    long, short, later = runnable(
        site,
        {"command": ["sleep", "60"]},
        {"command": ["true"]},
        {"command": ["true"], "wall_time_min": 30},
    )
    started = time.time()
    launcher = run(site, cpus=1, end_time=time.time() + 2.0, margin_s=0.5, idle_timeout_s=None)
    assert time.time() - started < 8
    assert launcher.stop_reason == "allocation ends"
    states = {t: site.task(t).state for t in (long, short, later)}
    assert states[long] == "RUN_TIMEOUT" and "allocation ends" in last(site, long)[1]
    # A task that cannot finish before the end is not started; its lease is given back.
    assert states[later] == "PREPROCESSED"
    with site.db.session() as s:
        assert s.query(Task).filter(Task.lease_launcher_id.is_not(None)).count() == 0


def test_environment_of_a_task(sqlite_site: Site) -> None:
    site = sqlite_site
    dump = "import json, os; json.dump(dict(os.environ), open('env.json', 'w'))"
    (t,) = runnable(
        site,
        {"command": py(dump), "environment": {"MY_SETTING": "42"}, "threads_per_rank": 2,
         "gpus_per_rank": 1},
    )
    run(site, cpus=4, gpus=2)
    env = json.loads((workdir(site, t) / "env.json").read_text())
    assert env["MY_SETTING"] == "42"
    assert env["BALSAM_TASK_ID"] == str(t)
    assert env["BALSAM_SITE"] == str(site.site_dir)
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] in ("0", "1")


def test_a_task_kills_a_sibling(sqlite_site: Site) -> None:
    site = sqlite_site
    (victim,) = runnable(site, {"command": ["sleep", "60"], "name": "victim"})
    killer_code = (
        "import time; from balsam_core import api;"
        f"time.sleep(0.5); api.kill({victim})"
    )
    (killer,) = runnable(site, {"command": py(killer_code), "name": "killer"})
    site.config.launcher.__dict__["heartbeat_s"] = 0.2
    run(site, idle_timeout_s=0.5)
    assert run_end(site, killer)[0] == "RUN_DONE"
    assert site.task(victim).state == "USER_KILLED"
    assert f"killed by task {killer}" in last(site, victim)[1]


def test_packing_never_overcommits(sqlite_site: Site) -> None:
    """2 virtual nodes x 2 CPUs; the events show at most 4 CPU slots busy at once."""
    site = sqlite_site
    specs = [{"command": py("import time; time.sleep(0.2)"), "threads_per_rank": t}
             for t in (1, 2, 1, 1, 2, 1, 2, 1)]
    ids = runnable(site, *specs)
    run(site, nodes=2, cpus=2)
    spans = []
    for task_id, spec in zip(ids, specs):
        events = {e.to_state: e.time for e in site.history(task_id)}
        assert "RUN_DONE" in events
        spans.append((events["RUNNING"], events["RUN_DONE"], spec["threads_per_rank"]))
    for start, _, _ in spans:
        busy = sum(cpus for s, e, cpus in spans if s <= start < e)
        assert busy <= 4


def test_tasks_too_big_for_the_allocation_are_named(
    sqlite_site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site = sqlite_site
    big, small = runnable(site, {"command": ["true"], "num_nodes": 2}, {"command": ["true"]})
    run(site)
    assert site.task(big).state == "PREPROCESSED"  # left for a larger allocation
    assert run_end(site, small)[0] == "RUN_DONE"
    assert f"task {big}: 2 node(s)" in caplog.text and "do not fit" in caplog.text


def test_a_task_dying_of_the_jobs_stop_signal_is_a_timeout(sqlite_site: Site) -> None:
    """A batch system ends a job by signalling all its processes at once (Slurm at the
    time limit): a task that dies of that signal timed out with the job -- whether the
    launcher got its own signal first or a moment later (the task's end is held back
    for that); killed by such a signal while nothing stops the launcher, it is an error."""
    launcher = Launcher(
        sqlite_site, LauncherOptions(nodes=local_nodes(1, 2, 0)), processing=False
    )
    now = time.time()
    died = [Exited(7, -signal.SIGTERM, now - 1, now, None, Path("stderr"))]
    # An MPI launcher forwards the signal to its ranks and may exit with any code, 0 too.
    forwarded = [Exited(8, code, now - 1, now, None, Path("stderr")) for code in (0, 143)]
    assert [u.state for u in launcher._collect(died + forwarded)] == [
        State.RUN_DONE, State.RUN_ERROR
    ]
    assert launcher._judge_held(time.time()) == []  # task 7 waits for the launcher's signal
    launcher.stop("received SIGTERM", by_signal=True)  # ... which comes
    held = launcher._judge_held(time.time())
    assert [(u.task_id, u.state, u.time) for u in held] == [(7, State.RUN_TIMEOUT, now)]
    assert launcher._held == []
    updates = launcher._collect(died + forwarded)  # after the launcher's signal: no doubt
    assert [u.state for u in updates] == [State.RUN_TIMEOUT] * 3
    assert all(u.message.startswith("received SIGTERM") for u in held + updates)
    launcher.procs.close()


def test_a_task_killed_by_a_stop_signal_while_the_launcher_runs_on_failed(
    sqlite_site: Site,
) -> None:
    """No stop follows within STOP_SIGNAL_HOLD_S: the task was killed by someone else (an
    error, recorded with the time it died); any stop within it judges as one after it."""
    launcher = Launcher(
        sqlite_site, LauncherOptions(nodes=local_nodes(1, 2, 0)), processing=False
    )
    now = time.time()
    assert launcher._collect([Exited(7, -signal.SIGKILL, now - 1, now, None, Path("e"))]) == []
    assert launcher._judge_held(now + STOP_SIGNAL_HOLD_S / 2) == []
    [update] = launcher._judge_held(now + STOP_SIGNAL_HOLD_S + 0.1)
    assert (update.task_id, update.state, update.time) == (7, State.RUN_ERROR, now)
    assert update.message.startswith("killed by signal SIGKILL")
    assert launcher._collect([Exited(8, -signal.SIGTERM, now - 1, now, None, Path("e"))]) == []
    launcher.stop("stop requested")  # the stop file of a serial agent
    assert [u.state for u in launcher._judge_held(time.time())] == [State.RUN_TIMEOUT]
    launcher.procs.close()
    # A real run: the only task kills itself; the idle timeout (0.3 s) waits for the
    # judgement instead of taking the task's end for its own.
    [task] = runnable(sqlite_site, {"command": ["sh", "-c", "kill -KILL $$"]})
    run(sqlite_site)
    assert run_end(sqlite_site, task)[0] == "RUN_ERROR"
    assert run_end(sqlite_site, task)[1].startswith("killed by signal SIGKILL after")


def test_a_task_ending_while_the_launcher_stops_on_its_own_keeps_its_result(
    sqlite_site: Site,
) -> None:
    """No signal, no doubt: at an idle timeout or the allocation's end a task that exits
    0 finished, one killed by SIGTERM (by someone else) still timed out with the stop."""
    launcher = Launcher(
        sqlite_site, LauncherOptions(nodes=local_nodes(1, 2, 0)), processing=False
    )
    now = time.time()
    launcher.stop("allocation ends")
    ended = [Exited(7, 0, now - 1, now, None, Path("stderr")),
             Exited(8, -signal.SIGTERM, now - 1, now, None, Path("stderr"))]
    assert [u.state for u in launcher._collect(ended)] == [State.RUN_DONE, State.RUN_TIMEOUT]
    launcher.procs.close()
