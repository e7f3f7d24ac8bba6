"""Fault injection against a real PostgreSQL server and real ``balsam launcher``
processes (issue 6): launchers killed with SIGKILL and restarted, the database stopped
mid-run, a task's disk full.  What must hold every time: every task ends where it
should, every recorded attempt has its start and its end in the TaskEvents, and no two
attempts of one task overlap in time (checked from the events alone).

The server is private to this module (started with the harness's ``initdb``/``pg_ctl``),
so stopping it does not disturb other tests.  ``BALSAM_FAULT_TASKS`` scales the first
test down for a quick local run; CI runs the issue's 4 launchers x 2,000 tasks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from balsam_core.api import Site
from balsam_core.models import Task, TaskEvent
from tests.harness.postgres import PostgresServer, find_pg_bin
from tests.harness.sites import set_config

pytestmark = pytest.mark.real_component

BALSAM = shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"
N_TASKS = int(os.environ.get("BALSAM_FAULT_TASKS", "2000"))
N_LAUNCHERS = 4
KILL_EVERY_S = 2.0
LOST = re.compile(r"^launcher \d+ lost: lease expired( \(no heartbeat for \d+ s\))?$")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own (the tests stop and start it)."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


def make_site(root: Path, pg: PostgresServer, name: str, **settings: object) -> Site:
    """A site on a fresh database of *pg*, with *settings* replacing balsam.toml keys."""
    url = pg.create_database(f"fault_{name}_{os.getpid()}")
    site_dir = root / "site"
    Site.init(site_dir, database=url).db.dispose()
    set_config(site_dir, **settings)
    return Site.open(site_dir)


class Launchers:
    """Real ``balsam launcher`` processes, each logging to its own file."""

    def __init__(self, site: Site, log_dir: Path) -> None:
        self.site, self.log_dir = site, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_files: dict[int, Path] = {}
        self.started = 0

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")}
        self.started += 1
        path = self.log_dir / f"launcher{self.started}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                [BALSAM, "--site", str(self.site.site_dir), "launcher"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        self.log_files[proc.pid] = path
        return proc

    def wait_started(self, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
        """Until *proc* has registered (and handles SIGTERM) or exited."""
        deadline = time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None:
            if " started on " in self.log_files[proc.pid].read_text(errors="replace"):
                return
            time.sleep(0.05)

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def stop_all(self) -> list[int]:
        """SIGTERM every live launcher (a clean stop); their exit codes."""
        live = self.alive()
        for proc in live:
            self.wait_started(proc)
            proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=60) for proc in live]

    def kill_all(self) -> None:
        for proc in self.alive():
            proc.kill()
            proc.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def finished(site: Site) -> int:
    with site.db.session() as s:
        return s.scalar(
            select(func.count()).select_from(Task).where(Task.state == "JOB_FINISHED")
        ) or 0


def wait_for(site: Site, done: int, timeout_s: float, launchers: Launchers) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if finished(site) >= done:
            return
        time.sleep(0.2)
    pytest.fail(
        f"only {finished(site)} of {done} tasks finished in {timeout_s:.0f} s: "
        f"{site.count()}\n{launchers.logs()[-4000:]}"
    )


@dataclass(frozen=True)
class Attempt:
    task_id: int
    start: float
    end: float
    launcher_id: int | None
    ended_as: str
    message: str


def attempts(site: Site) -> dict[int, list[Attempt]]:
    """Every task's run attempts from its TaskEvents, after checking that the history is
    complete: each event starts where the previous one ended, and every RUNNING is
    followed by exactly one event that leaves RUNNING, no earlier than it.

    (Only run times are compared: the processor stamps recovery events with the start
    of its pass, which may be a few ms before the RUN_TIMEOUT another process wrote.)"""
    with site.db.session() as s:
        rows = s.execute(
            select(
                TaskEvent.task_id, TaskEvent.time, TaskEvent.from_state, TaskEvent.to_state,
                TaskEvent.message, TaskEvent.launcher_id,
            ).order_by(TaskEvent.task_id, TaskEvent.id)
        ).all()
    by_task: dict[int, list] = defaultdict(list)
    for row in rows:
        by_task[row.task_id].append(row)
    result: dict[int, list[Attempt]] = {}
    for task_id, events in by_task.items():
        runs: list[Attempt] = []
        for before, after in zip(events, events[1:]):
            assert after.from_state == before.to_state, (task_id, before, after)
            if before.to_state == "RUNNING":
                assert after.time >= before.time, (task_id, before, after)
                runs.append(
                    Attempt(task_id, before.time, after.time, before.launcher_id,
                            after.to_state, after.message)
                )
        assert events[-1].to_state != "RUNNING", (task_id, events[-1])
        result[task_id] = runs
    return result


def assert_no_overlap(runs: dict[int, list[Attempt]]) -> None:
    for task_runs in runs.values():
        ordered = sorted(task_runs, key=lambda a: a.start)
        for first, second in zip(ordered, ordered[1:]):
            assert first.end <= second.start, (first, second)


def assert_nothing_held(site: Site) -> None:
    with site.db.session() as s:
        held = s.scalar(
            select(func.count()).select_from(Task).where(Task.lease_launcher_id.is_not(None))
        )
    assert held == 0
    assert "RUNNING" not in site.count()


# --------------------------------------------------------------------------- SIGKILL


def test_launchers_killed_with_sigkill_lose_nothing(
    tmp_path: Path, pg: PostgresServer
) -> None:
    """4 launchers share the tasks; every KILL_EVERY_S one of them is SIGKILLed and a
    new one started.  The dead launcher's RUNNING tasks time out when its lease expires
    (reclaimed by the others' heartbeats), retry-timeout makes them runnable again, and
    another launcher runs them."""
    site = make_site(
        tmp_path, pg, "kill", cpus_per_node=8, heartbeat_s=0.5, lease_s=3.0, max_retries=50
    )
    ids = site.add_tasks(
        [{"command": ["sleep", "0.05"], "name": f"t{i}", "node_packing_count": 8}
         for i in range(N_TASKS)]
    )
    launchers = Launchers(site, tmp_path)
    slots = [launchers.start() for _ in range(N_LAUNCHERS)]
    killed = 0
    try:
        deadline = time.time() + 150
        next_kill = time.time() + KILL_EVERY_S
        while finished(site) < N_TASKS and time.time() < deadline:
            time.sleep(0.1)
            if time.time() >= next_kill:
                victim = killed % N_LAUNCHERS
                slots[victim].kill()  # SIGKILL: no clean-up at all
                slots[victim].wait()
                killed += 1
                slots[victim] = launchers.start()
                next_kill = time.time() + KILL_EVERY_S
        wait_for(site, N_TASKS, 5, launchers)
        assert [p.poll() for p in slots] == [None] * N_LAUNCHERS  # no survivor crashed
        assert launchers.stop_all() == [0] * N_LAUNCHERS
    finally:
        launchers.kill_all()
    logs = launchers.logs()
    assert "Traceback" not in logs, logs[-4000:]

    assert site.count() == {"JOB_FINISHED": N_TASKS}
    assert_nothing_held(site)
    runs = attempts(site)
    assert sorted(runs) == ids
    assert_no_overlap(runs)
    reclaimed = [a for task_runs in runs.values() for a in task_runs if LOST.match(a.message)]
    assert killed >= 2 and reclaimed, (killed, len(reclaimed))
    for task_runs in runs.values():
        assert task_runs[-1].ended_as == "RUN_DONE"
        assert all(a.ended_as == "RUN_TIMEOUT" for a in task_runs[:-1]), task_runs
    # Each reclaimed attempt went through the recovery chain (retry-timeout).
    with site.db.session() as s:
        retried = s.scalar(
            select(func.count()).select_from(TaskEvent).where(
                TaskEvent.from_state == "RUN_TIMEOUT", TaskEvent.to_state == "RESTART_READY"
            )
        )
    assert retried == sum(len(r) - 1 for r in runs.values())
    site.db.dispose()


# --------------------------------------------------------------------------- database down


def test_postgres_down_for_five_seconds(tmp_path: Path, pg: PostgresServer) -> None:
    """The server stops (clients disconnected) for 5 s mid-run: the launchers keep their
    running tasks, start the ones they had leased ahead, keep the transitions, and
    write them once the server is back.  Leases (20 s) outlive the outage, so no task
    times out and each runs exactly once."""
    n_tasks = 400
    site = make_site(
        tmp_path, pg, "down", cpus_per_node=8, heartbeat_s=1.0, lease_s=20.0
    )
    ids = site.add_tasks([
        {"command": ["sleep", "0.1"], "name": f"t{i}", "node_packing_count": 8}
        for i in range(n_tasks)
    ])
    launchers = Launchers(site, tmp_path)
    procs = [launchers.start() for _ in range(2)]
    try:
        wait_for(site, n_tasks // 4, 60, launchers)
        site.db.dispose()
        pg.halt()
        down, up = time.time(), 0.0
        try:
            time.sleep(5)
            assert [p.poll() for p in procs] == [None, None]
        finally:
            pg.resume()
            up = time.time()
        wait_for(site, n_tasks, 90, launchers)
        assert [p.poll() for p in procs] == [None, None]
        assert launchers.stop_all() == [0, 0]
    finally:
        launchers.kill_all()
    logs = launchers.logs()
    assert "Traceback" not in logs, logs[-4000:]
    assert "database reachable again" in logs
    assert ":secret@" not in logs and "***" in logs  # the URL is shown without its password

    assert site.count() == {"JOB_FINISHED": n_tasks}
    assert_nothing_held(site)
    runs = attempts(site)
    assert sorted(runs) == ids
    assert all(len(r) == 1 and r[0].ended_as == "RUN_DONE" for r in runs.values())
    # Work went on while the server was down: tasks started then, recorded afterwards.
    assert any(down < r[0].start < up for r in runs.values())
    site.db.dispose()


def test_launcher_that_cannot_reconnect_in_time_ends_its_tasks(
    tmp_path: Path, pg: PostgresServer
) -> None:
    """The server stays away longer than the lease (3 s): the launcher ends its running
    task before the lease can expire (another launcher could reclaim and rerun it), keeps
    the RUN_TIMEOUT, writes it when the server is back, and the retry finishes."""
    lease_s = 3.0
    site = make_site(tmp_path, pg, "lost", heartbeat_s=0.5, lease_s=lease_s)
    task = site.add_task(
        command=["sh", "-c", "[ -e ran ] && exit 0; touch ran; exec sleep 60"], name="long"
    ).id
    workdir = site.config.data_dir / site.task(task).default_workdir
    launchers = Launchers(site, tmp_path)
    proc = launchers.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and site.task(task).state != "RUNNING":
            time.sleep(0.1)
        assert (workdir / "ran").exists()
        site.db.dispose()
        pg.halt()
        down = time.time()
        try:
            time.sleep(lease_s + 2)
            assert proc.poll() is None
            sleeps = [p for p in psutil.Process(proc.pid).children(True) if p.name() == "sleep"]
            assert sleeps == []  # ended while the server was still away
        finally:
            pg.resume()
        wait_for(site, 1, 60, launchers)
        assert launchers.stop_all() == [0]
    finally:
        launchers.kill_all()
    logs = launchers.logs()
    assert "could not renew its leases" in logs and "Traceback" not in logs, logs[-3000:]
    runs = attempts(site)[task]
    assert [r.ended_as for r in runs] == ["RUN_TIMEOUT", "RUN_DONE"]
    assert "could not renew its lease (database unreachable)" in runs[0].message
    assert runs[0].end < down + lease_s  # dead before its lease could run out
    assert_no_overlap({task: runs})
    assert_nothing_held(site)
    site.db.dispose()


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_disk(mount_point: Path, size: str = "256k") -> Iterator[Path]:
    """A small tmpfs mounted at *mount_point* (needs root), unmounted afterwards."""
    mount_point.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_in_the_working_directory(tmp_path: Path, pg: PostgresServer) -> None:
    """A task writes more than its working directory's filesystem holds: it fails with
    a message that says so (its own error message did not fit into its stderr file);
    the other tasks finish and the database is consistent."""
    site = make_site(tmp_path, pg, "full", heartbeat_s=1.0, lease_s=20.0)
    writer = site.add_task(
        command=["sh", "-c", "head -c 1000000 /dev/zero > big"], name="writer",
        workdir="full/writer",
    ).id
    others = site.add_tasks([{"command": ["true"], "name": f"ok{i}"} for i in range(5)])
    launchers = Launchers(site, tmp_path)
    with small_disk(site.config.data_dir / "full"):  # data/full/ is a 256 KiB disk
        proc = launchers.start()
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not (
                site.task(writer).state == "FAILED" and finished(site) == len(others)
            ):
                time.sleep(0.2)
            assert launchers.stop_all() == [0]
        finally:
            launchers.kill_all()
    assert proc.returncode == 0
    assert site.task(writer).state == "FAILED", launchers.logs()[-3000:]
    history = site.history(writer)
    error = [e for e in history if e.to_state == "RUN_ERROR"]
    assert len(error) == 1
    assert "exit code 1" in error[0].message
    assert f"no space left on device: 0 bytes free in {site.config.data_dir}/full/writer" in (
        error[0].message
    )
    assert history[-1].to_state == "FAILED"
    assert all(site.task(t).state == "JOB_FINISHED" for t in others)
    assert_nothing_held(site)
    runs = attempts(site)
    assert set(runs) == {writer, *others}
    site.db.dispose()
