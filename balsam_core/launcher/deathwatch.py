"""Ending a launcher's tasks when the launcher itself is killed (SIGKILL, OOM killer).

Each task runs in a session of its own, so nothing stops it when its launcher dies
without cleaning up: its lease expires, another launcher reruns the task, and the
first attempt may still be running.  Asking the kernel for a parent-death signal per
task (``prctl(PR_SET_PDEATHSIG)`` through ``preexec_fn``, or a ``setpriv`` wrapper)
costs 1.5-2 ms on every start, more than the rest of a start.

Instead the launcher forks one small watchdog.  For every task it writes ``+<pgid>``
to a pipe when the process starts and ``-<pgid>`` when it is reaped, gathered into one
write per turn of the hot loop (:meth:`DeathWatch.flush`, before it sleeps).  The
watchdog sits in a session of its own, ignores SIGTERM and SIGINT, and reads; when the
pipe reports end-of-file -- the launcher exited, however it died -- it SIGKILLs the
process groups still listed, then exits.  After a clean shutdown the list is empty.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class DeathWatch:
    """The launcher's end of the watchdog (see the module docstring)."""

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the watchdog: only os calls from here on (no locks after fork)
            os.close(self._write_end)
            _watch(read_end)
        os.close(read_end)
        self._broken = False
        self._lines: list[bytes] = []

    def started(self, pgid: int) -> None:
        self._lines.append(b"+%d\n" % pgid)

    def ended(self, pgid: int) -> None:
        self._lines.append(b"-%d\n" % pgid)

    def flush(self) -> None:
        """Tell the watchdog what started and ended since the last flush."""
        if self._lines:
            self._send(b"".join(self._lines))
            self._lines.clear()

    def close(self) -> None:
        """End the watchdog (it kills whatever is still listed) and reap it."""
        self.flush()
        os.close(self._write_end)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def _send(self, data: bytes) -> None:
        try:
            while data:  # a write interrupted by a signal may be partial
                data = data[os.write(self._write_end, data):]
        except OSError as exc:
            if not self._broken:
                log.warning("task watchdog gone (%s): tasks may outlive a killed launcher", exc)
                self._broken = True


def _watch(fd: int) -> None:
    """The watchdog process: follow the list of task process groups until end-of-file."""
    try:
        os.setsid()  # a signal to the launcher's process group must not reach it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.closerange(3, fd)  # database sockets, pidfds, pipes: none of its business
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        groups: set[int] = set()
        pending = b""
        while chunk := os.read(fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                pgid = int(line[1:])
                if line[:1] == b"+":
                    groups.add(pgid)
                else:
                    groups.discard(pgid)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
    finally:
        os._exit(0)
