"""The hot loop's short time slice: its own thread only, never what it starts."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from balsam_core.launcher.timeslice import SLICE_NS, short_time_slice

T = TypeVar("T")


def slice_ns(where: str = "thread-self") -> int | None:
    """The slice the kernel gives a thread or process (None: a kernel before 6.12)."""
    with open(f"/proc/{where}/sched") as sched:
        for line in sched:
            if line.startswith("se.slice"):
                return int(line.split(":")[1])
    return None


def in_thread(job: Callable[[], T]) -> T:
    """*job*'s result, run in a thread of its own (pytest's keeps its attributes)."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(job()))
    thread.start()
    thread.join()
    return results[0]


@pytest.fixture
def default_slice() -> int:
    found = slice_ns()
    if found is None:
        pytest.skip("this kernel has no slice per task (Linux before 6.12)")
    return found


def test_the_thread_gets_the_shortest_slice_and_what_it_starts_the_default(
    default_slice: int,
) -> None:
    def job() -> tuple[int | None, ...]:
        with short_time_slice():
            inside = slice_ns()
            child = subprocess.Popen(["sleep", "10"])
            try:
                of_child = slice_ns(str(child.pid))
            finally:
                child.kill()
                child.wait()
            of_thread = in_thread(slice_ns)
        return inside, of_child, of_thread, slice_ns()

    inside, of_child, of_thread, after = in_thread(job)
    assert inside == SLICE_NS < default_slice
    assert of_child == of_thread == after == default_slice


def test_the_nice_value_is_kept_and_other_policies_are_left_alone(default_slice: int) -> None:
    def niced() -> tuple[int | None, int]:
        os.setpriority(os.PRIO_PROCESS, 0, 3)  # the calling thread's, on Linux
        with short_time_slice():
            return slice_ns(), os.getpriority(os.PRIO_PROCESS, 0)

    def batch() -> tuple[int | None, int]:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        with short_time_slice():
            return slice_ns(), os.sched_getscheduler(0)

    assert in_thread(niced) == (SLICE_NS, 3)
    assert in_thread(batch) == (default_slice, os.SCHED_BATCH)
