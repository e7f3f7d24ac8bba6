"""Per-turn cost of the launcher's wall-time and kill timers with many running tasks.

    python bench/turn_timers.py [--running 100 1000 10000]

At every turn the hot loop asks its process group which tasks are past their wall
time, when the next deadline or SIGKILL is due, and SIGKILLs what is left of tasks
whose grace period is over.  The group keeps those times in two heaps, so a turn looks
at their first entries only.  Measured here with N tasks "running" (each started
through the launcher's real path, ``posix_spawn`` replaced by a stub that reports this
process's own pid: the exec is not what is measured, and N real processes would not
fit this VM), against a baseline measured in the same run: the same three questions
answered by a scan of every running task, as the launcher did before.  One JSON line
per N; ``ratio`` = baseline / heaps (how many times faster).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import time
import timeit
from collections.abc import Callable

from balsam_core.launcher import processes, spawn
from balsam_core.launcher.processes import ProcessGroup


def stub_spawn() -> None:
    """Make ``posix_spawn`` report this process's pid instead of starting anything."""
    assert spawn.LIBC is not None, "needs glibc's posix_spawn (the launcher's own path)"
    me, pid_type = os.getpid(), ctypes.POINTER(ctypes.c_int)

    def fake(pid: object, *_: object) -> int:
        ctypes.cast(pid, pid_type)[0] = me
        return 0

    spawn.LIBC.spawn = fake


def scan_turn(group: ProcessGroup, now: float) -> object:
    """The baseline: the same answers from a scan of every running task."""
    running = group._running.values()
    due = [r.task_id for r in running if r.ending is None and r.deadline and now >= r.deadline]
    times = [r.kill_at for r in running if r.kill_at is not None]
    times += [r.deadline for r in running if r.deadline and r.ending is None]
    over = [r for r in running if r.kill_at is not None and now >= r.kill_at]
    return due, min(times) if times else None, over


def heap_turn(group: ProcessGroup, now: float) -> object:
    """What a turn asks the group (``wait`` asks for the next deadline and escalates)."""
    return group.overdue(now), group._next_deadline(), group._escalate()


def per_turn_us(
    turn: Callable[[ProcessGroup, float], object], group: ProcessGroup, n: int
) -> float:
    """Microseconds per call of *turn* with *n* tasks running (best of 5)."""
    now, number = time.time(), max(20, 20000 // n)
    best = min(timeit.repeat(lambda: turn(group, now), number=number, repeat=5))
    return 1e6 * best / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    stub_spawn()
    workdir = tempfile.mkdtemp(prefix="balsam-turn-timers-")
    env = {"PATH": os.environ["PATH"]}
    for n in args.running:
        group = processes.ProcessGroup()
        try:
            for task_id in range(n):  # one-hour wall times: none comes due while measured
                group.start(task_id, ["true"], env, workdir, 3600.0)
            heaps, scan = per_turn_us(heap_turn, group, n), per_turn_us(scan_turn, group, n)
            print(json.dumps({
                "bench": "turn_timers", "running": n, "heaps_us_per_turn": round(heaps, 2),
                "baseline": "scan of every running task", "baseline_us_per_turn": round(scan, 2),
                "ratio": round(scan / heaps, 1),
            }), flush=True)
        finally:
            for task_id in group.ids():
                group._forget(group._running[task_id])  # stubbed: nothing to reap
            group.close()
    os.rmdir(workdir)


if __name__ == "__main__":
    main()
