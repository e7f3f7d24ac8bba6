"""The launcher's process plumbing on its own: watched descriptors, wall-time and
kill timers, and the watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balsam_core.api import Site
from balsam_core.launcher.deathwatch import DeathWatch
from balsam_core.launcher.processes import ProcessGroup
from balsam_core.launcher.worker import ProcessingWorker
from balsam_core.plugin_types import LauncherInfo


@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    procs = ProcessGroup(grace_s=1.0)
    yield procs
    procs.close()


def test_a_watched_descriptor_wakes_the_wait_and_says_so(group: ProcessGroup) -> None:
    read_end, write_end = os.pipe()
    group.watch(read_end)
    os.write(write_end, b"m")
    group.wait(5.0)
    assert group.readable(read_end)
    os.read(read_end, 1)
    group.wait(0.01)
    assert not group.readable(read_end)
    os.close(write_end)  # end-of-file: readable for good
    group.wait(5.0)
    assert group.readable(read_end)
    group.unwatch(read_end)
    started = time.monotonic()
    group.wait(0.2)
    assert time.monotonic() - started >= 0.15  # no longer woken by it
    os.close(read_end)


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Starts ``sleep 30`` in a session of its own; all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(subprocess.Popen(["sleep", "30"], start_new_session=True))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_the_watchdog_kills_the_groups_still_listed_when_the_launcher_goes(
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    watch = DeathWatch()
    assert os.sched_getscheduler(watch.pid) == os.SCHED_IDLE  # it never takes a task's CPU
    listed, reaped = sleeper(), sleeper()
    watch.started(listed.pid)
    watch.started(reaped.pid)
    watch.ended(reaped.pid)  # reaped by the launcher: no longer the watchdog's
    watch.close()  # what the watchdog sees when its launcher dies
    assert listed.wait(10) == -9
    assert reaped.poll() is None


def test_a_full_watchdog_table_reuses_freed_slots(
    sleeper: Callable[[], subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    watch = DeathWatch(capacity=1)
    first, second = sleeper(), sleeper()
    watch.started(first.pid)
    watch.started(second.pid)  # no slot left: said, not guarded
    assert "not guarded" in caplog.text
    watch.ended(first.pid)
    watch.started(second.pid)  # the freed slot
    watch.close()
    assert second.wait(10) == -9
    assert first.poll() is None


def test_children_forked_after_the_watchdog_do_not_hold_its_pipe() -> None:
    """The processing worker is forked after the watchdog; a copy of the pipe's write
    end in it would keep the watchdog waiting after the launcher died."""
    watch = DeathWatch()
    pid = os.fork()
    if pid == 0:
        try:
            os.fstat(watch._write_end)
        except OSError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    watch.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_processing_workers_words_and_its_end_reach_the_loop(
    group: ProcessGroup, sqlite_site: Site
) -> None:
    """The worker says IDLE on a site with nothing to process; when it dies, its pipe
    reads end-of-file and the loop sees that it ended."""
    launcher_id = sqlite_site.selected("task_source").register(LauncherInfo("h", os.getpid()))
    worker = ProcessingWorker(str(sqlite_site.site_dir), launcher_id, None, {}, 0.01, 0.02)
    group.watch(worker.fileno())

    def heard(until: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 15
        while not until() and time.monotonic() < deadline:
            group.wait(1.0)
            if group.readable(worker.fileno()):
                assert not worker.read()  # nothing moved
        return until()

    try:
        assert heard(lambda: worker.idle)
        os.kill(worker._process.pid, signal.SIGKILL)
        assert heard(lambda: worker.ended)
    finally:
        group.unwatch(worker.fileno())
        worker.stop()


def test_wall_times_and_kill_times_come_due_in_order_once_each(
    group: ProcessGroup, tmp_path: Path
) -> None:
    env = {"PATH": os.environ["PATH"]}
    for task_id, wall_s in ((1, 0.3), (2, 0.1), (3, 60.0)):
        group.start(task_id, ["sleep", "30"], env, str(tmp_path), wall_s)
    group.start(4, ["sleep", "30"], env, str(tmp_path), None)
    started = time.time()
    assert group.overdue(started) == []
    assert group.overdue(started + 0.2) == [2]
    group.end(2, "timeout")  # the launcher ends what is overdue (TERM, then KILL after 1 s)
    group.end(1, "killed")  # ended for another reason first: no longer overdue
    assert group.overdue(started + 1.0) == []
    assert group.overdue(started + 61) == [3]
    assert group.overdue(started + 61) == []  # once
    exited: list[int] = []
    deadline = time.monotonic() + 10
    while len(exited) < 2 and time.monotonic() < deadline:  # sleep dies of the SIGTERM
        exited += [e.task_id for e in group.wait(0.5)]
    assert sorted(exited) == [1, 2]
    group.end_all("shutdown", timeout=2.0)


def test_timers_of_ended_tasks_do_not_pile_up(group: ProcessGroup, tmp_path: Path) -> None:
    # Many short tasks with a long wall time: their deadlines would stay queued until
    # they came due (an hour of tasks at thousands per second) unless dropped.
    env = {"PATH": os.environ["PATH"]}
    for task_id in range(300):
        group.start(task_id, ["true"], env, str(tmp_path), 3600.0)
        while task_id in group:
            group.wait(1.0)
    assert len(group._deadlines) < 100  # compacted as it outgrows the running tasks
