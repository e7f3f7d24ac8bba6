"""Ending a launcher's tasks when the launcher itself is killed (SIGKILL, OOM killer).

Each task runs in a session of its own, so nothing stops it when its launcher dies
without cleaning up: its lease expires, another launcher reruns the task, and the
first attempt may still be running.  Asking the kernel for a parent-death signal per
task (``prctl(PR_SET_PDEATHSIG)`` through ``preexec_fn``, or a ``setpriv`` wrapper)
costs 1.5-2 ms on every start, more than the rest of a start.

Instead the launcher forks one small watchdog, sharing with it a table of the running
tasks' process groups (anonymous shared memory): the launcher writes a task's process
group into a free slot when it starts and clears the slot when it is reaped -- a store
to memory, no system call, and the watchdog is never woken while the launcher lives.
The watchdog sits in a session of its own, ignores SIGTERM and SIGINT, and blocks
reading a pipe nobody writes to; when the read returns end-of-file -- the launcher
exited, however it died -- it SIGKILLs the process groups left in the table, then
exits.  After a clean shutdown the table is empty.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal

log = logging.getLogger(__name__)

#: Slots in the shared table: more tasks than this running at once go unguarded
#: (a launcher runs at most one task per CPU slot of its allocation).
CAPACITY = 1 << 16


class DeathWatch:
    """The launcher's end of the watchdog (see the module docstring)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._memory = mmap.mmap(-1, 4 * capacity)  # MAP_SHARED: the watchdog sees it
        self._table = memoryview(self._memory).cast("i")
        #: Slots freed by reaped tasks, reused first; slots from ``_unused`` on were never
        #: taken (a list of every slot up front cost milliseconds of the launcher's start).
        self._free: list[int] = []
        self._unused = 0
        self._capacity = capacity
        self._slot_of: dict[int, int] = {}
        read_end, self._write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the watchdog: only os calls from here on (no locks after fork)
            os.close(self._write_end)
            _watch(read_end, self._table)
        os.close(read_end)

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
        os.close(self._write_end)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._table.release()
        self._memory.close()


def _watch(fd: int, table: memoryview) -> None:
    """The watchdog process: wait for the launcher's end, then kill what it left."""
    try:
        os.setsid()  # a signal to the launcher's process group must not reach it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.closerange(3, fd)  # database sockets, pidfds, pipes: none of its business
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        while os.read(fd, 4096):
            pass
        for pgid in table:
            if pgid > 0:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
    finally:
        os._exit(0)
