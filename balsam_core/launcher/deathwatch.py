"""Ending a launcher's tasks when the launcher itself is killed (SIGKILL, OOM killer).

Each task leads a process group of its own, so nothing stops it when its launcher dies
without cleaning up: its lease expires, another launcher reruns the task, and the
first attempt may still be running.  Asking the kernel for a parent-death signal per
task (``prctl(PR_SET_PDEATHSIG)`` through ``preexec_fn``, or a ``setpriv`` wrapper)
costs 1.5-2 ms on every start, more than the rest of a start.

Instead the launcher starts one small watchdog, sharing with it a table of the running
tasks' process groups (a memory file both map): the launcher writes a task's process
group into a free slot when it starts and clears the slot when it is reaped -- a store
to memory, no system call, and the watchdog is never woken while the launcher lives.
The watchdog sits in a session of its own, ignores SIGTERM and SIGINT, and blocks
reading a pipe nobody writes to; when the read returns end-of-file -- the launcher
exited, however it died, even before the watchdog got that far -- it SIGKILLs the
process groups left in the table, then exits.  After a clean shutdown the table is
empty.  Children the launcher forks later (its processing worker) drop their copy of
the pipe's write end at once: the watchdog acts when the last writer is gone.

The watchdog is a fresh Python (``-I -S``: the standard library only) started with
``posix_spawn`` at idle CPU priority (``SCHED_IDLE``).  Forking the launcher cost its
start milliseconds, and as many again in copy-on-write faults in what followed (the
first lease took 5-7 ms instead of 2); a fresh Python at normal priority took the CPU
from the first tasks.  At idle priority on a node busy with tasks, its start and its
kills may take seconds: well within a lease (``lease_s``, 60 s by default), before
which no other launcher reruns the tasks.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys

from ..errors import BalsamError

log = logging.getLogger(__name__)

#: Slots in the shared table: more tasks than this running at once go unguarded
#: (a launcher runs at most one task per CPU slot of its allocation).
CAPACITY = 1 << 16

#: The watchdog's program; arguments: the pipe's read end, the table's memory file.
_WATCHDOG = """
import mmap, os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
pipe, memory = int(sys.argv[1]), int(sys.argv[2])
table = mmap.mmap(memory, 0)
while os.read(pipe, 4096):
    pass
used = table[:].rstrip(b"\\0")  # slots are taken from the start
used += bytes(-len(used) % 4)
for pgid in memoryview(used).cast("i"):
    if pgid > 0:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
"""

#: Write ends of the live watchdogs' pipes, closed in every child forked later.
_WRITE_ENDS: set[int] = set()


def _drop_write_ends() -> None:
    for fd in _WRITE_ENDS:
        os.close(fd)
    _WRITE_ENDS.clear()


os.register_at_fork(after_in_child=_drop_write_ends)


class DeathWatch:
    """The launcher's end of the watchdog (see the module docstring)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if not sys.executable:
            raise BalsamError("cannot start the task watchdog: no Python executable known")
        read_end, self._write_end = os.pipe()
        memory = os.memfd_create("balsam-watchdog")
        try:
            os.ftruncate(memory, 4 * capacity)
            self._memory = mmap.mmap(memory, 4 * capacity)  # MAP_SHARED
            os.set_inheritable(read_end, True)
            os.set_inheritable(memory, True)
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(read_end), str(memory)],
                {},
                file_actions=[  # stderr stays, for Python's own last words
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                ],
                setsid=True,  # a signal to the launcher's process group must not reach it
            )
            # Here, not as a spawn attribute: glibc's posix_spawn refuses SCHED_IDLE.
            try:
                os.sched_setscheduler(self.pid, os.SCHED_IDLE, os.sched_param(0))
            except OSError:  # e.g. a seccomp filter: it just runs at normal priority
                pass
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)
            os.close(memory)
        _WRITE_ENDS.add(self._write_end)
        self._table = memoryview(self._memory).cast("i")
        #: Slots freed by reaped tasks, reused first; slots from ``_unused`` on were never
        #: taken (a list of every slot up front cost milliseconds of the launcher's start).
        self._free: list[int] = []
        self._unused = 0
        self._capacity = capacity
        self._slot_of: dict[int, int] = {}

    def started(self, pgid: int) -> None:
        if self._free:
            slot = self._free.pop()
        elif self._unused < self._capacity:
            slot, self._unused = self._unused, self._unused + 1
        else:
            log.warning("task watchdog full: process group %d is not guarded", pgid)
            return
        self._table[slot] = pgid
        self._slot_of[pgid] = slot

    def ended(self, pgid: int) -> None:
        slot = self._slot_of.pop(pgid, None)
        if slot is not None:
            self._table[slot] = 0
            self._free.append(slot)

    def close(self) -> None:
        """End the watchdog (it kills whatever is still listed) and reap it."""
        _WRITE_ENDS.discard(self._write_end)
        os.close(self._write_end)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._table.release()
        self._memory.close()
