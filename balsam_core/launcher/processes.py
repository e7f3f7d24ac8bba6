"""Starting task processes, waking on their exit, and ending whole process trees.

Each task leads a process group of its own (which holds everything it forks, unless
a descendant makes a group or session of its own, which psutil still finds by
ancestry).  Exits are watched through Linux pidfds in an epoll set, together with a
wake-up pipe: the launcher sleeps until a child exits, a deadline passes, or another
thread (or a signal handler) pokes it — never in fixed sleeps.
"""

from __future__ import annotations

import heapq
import os
import select
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from ..models import STDERR_FILE, STDOUT_FILE
from .deathwatch import DeathWatch
from .spawn import Child, spawn


@dataclass
class Running:
    """A started task process."""

    task_id: int
    child: Child
    started: float
    #: Epoch seconds after which the task is out of wall time (None: no limit).
    deadline: float | None
    workdir: str
    pidfd: int
    #: Why the launcher is ending it ("timeout", "killed", "shutdown", "lease lost"), if it is.
    ending: str | None = None
    kill_at: float | None = None
    tree: list[psutil.Process] = field(default_factory=list)


@dataclass(frozen=True)
class Exited:
    """A task process that ended, and how."""

    task_id: int
    return_code: int
    started: float
    ended: float
    ending: str | None
    workdir: str


class ProcessGroup:
    """The launcher's running task processes."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self._running: dict[int, Running] = {}
        self._deathwatch: DeathWatch | None = None
        self._epoll = select.epoll()
        #: pidfd -> task id, for the tasks' pidfds in the epoll set.
        self._pidfds: dict[int, int] = {}
        #: Other watched fds -> readable at the last wait.
        self._watched: dict[int, bool] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        #: Every task's stdin (opened once: the hot loop starts many tasks).
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        #: (wall-time deadline, task id) and (SIGKILL time, task id), soonest first: a
        #: turn looks at the first entries only, not at every running task.  Entries
        #: of tasks that ended, or no longer have that time, are dropped as they come
        #: up (and all at once when they outnumber the running tasks).
        self._deadlines: list[tuple[float, int]] = []
        self._kill_times: list[tuple[float, int]] = []

    def guard_orphans(self) -> None:
        """Start the watchdog that kills running tasks if this process dies uncleanly
        (:mod:`~balsam_core.launcher.deathwatch`); call it before the first start."""
        self._deathwatch = DeathWatch()

    def watch(self, fd: int) -> None:
        """Also return from :meth:`wait` when *fd* becomes readable (the caller reads it:
        :meth:`readable` says whether it was)."""
        self._epoll.register(fd, select.EPOLLIN)
        self._watched[fd] = False

    def unwatch(self, fd: int) -> None:
        """Stop watching *fd* (e.g. at end-of-file: it would stay readable)."""
        self._epoll.unregister(fd)
        del self._watched[fd]

    def readable(self, fd: int) -> bool:
        """Did the last :meth:`wait` find the watched *fd* readable?"""
        return self._watched.get(fd, False)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._running

    def ids(self) -> list[int]:
        """Ids of the running tasks (including those being ended)."""
        return list(self._running)

    def start(
        self,
        task_id: int,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        wall_time_s: float | None,
    ) -> Running:
        """Start *argv* in the directory *cwd* with stdout/stderr appended to files there.

        Raises OSError (e.g. FileNotFoundError for a missing executable) without
        leaving anything running.
        """
        now = time.time()
        child = spawn(argv, env, cwd, self._devnull, STDOUT_FILE, STDERR_FILE)
        pidfd = os.pidfd_open(child.pid)
        running = Running(
            task_id, child, now, now + wall_time_s if wall_time_s else None, cwd, pidfd
        )
        self._running[task_id] = running
        self._pidfds[pidfd] = task_id
        self._epoll.register(pidfd, select.EPOLLIN)
        if running.deadline is not None:
            self._push(self._deadlines, running.deadline, task_id)
        if self._deathwatch is not None:
            self._deathwatch.started(child.pid)  # its pid = its process group
        return running

    def wait(self, timeout: float | None) -> list[Exited]:
        """Sleep until a task exits, :meth:`wake` is called or *timeout* passes; reap."""
        deadline = self._next_deadline()
        if deadline is not None:
            until = max(0.0, deadline - time.time())
            timeout = until if timeout is None else min(timeout, until)
        exits = []
        for fd in self._watched:
            self._watched[fd] = False
        for fd, _ in self._epoll.poll(-1 if timeout is None else timeout):
            task_id = self._pidfds.get(fd)
            if task_id is not None:
                exits.append(task_id)
            elif fd in self._watched:
                self._watched[fd] = True
            elif fd == self._wake_r:  # empty it
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
        self._escalate()
        return self.reap(exits)

    def reap(self, task_ids: Sequence[int] | None = None) -> list[Exited]:
        """Collect the task processes (of *task_ids*, default all) that have ended,
        without blocking."""
        exited = []
        for task_id in list(self._running) if task_ids is None else task_ids:
            running = self._running[task_id]
            code = running.child.poll()
            if code is None:
                continue
            self._forget(running)
            _kill_leftovers(running)
            exited.append(
                Exited(task_id, code, running.started, time.time(), running.ending,
                       running.workdir)
            )
        return exited

    def overdue(self, now: float) -> list[int]:
        """Tasks past their wall time that are not being ended yet (each is returned
        once: the caller ends it)."""
        due = []
        while (first := self._first(self._deadlines)) is not None and first[0] <= now:
            heapq.heappop(self._deadlines)
            due.append(first[1])
        return due

    def end(self, task_id: int, reason: str, grace_s: float | None = None) -> None:
        """SIGTERM the task's whole tree now; SIGKILL what is left after the grace period
        (*grace_s*, default the group's)."""
        running = self._running.get(task_id)
        if running is None or running.ending is not None:
            return
        running.ending = reason
        running.tree = _tree(running.child.pid)
        _signal_all(running.child.pid, running.tree, signal.SIGTERM)
        running.kill_at = time.time() + (self.grace_s if grace_s is None else grace_s)
        self._push(self._kill_times, running.kill_at, task_id)

    def end_all(self, reason: str, timeout: float) -> list[Exited]:
        """End every task and wait (at most *timeout*, then SIGKILL) until all exited."""
        for task_id in list(self._running):
            self.end(task_id, reason)
        exited = self.reap()
        stop = time.time() + timeout
        while self._running and time.time() < stop:
            exited += self.wait(0.05)
        for running in list(self._running.values()):
            running.kill_at = 0.0
            self._push(self._kill_times, 0.0, running.task_id)
        self._escalate()
        while self._running:
            exited += self.wait(0.05)
        return exited

    def _escalate(self) -> None:
        """SIGKILL what is left of the tasks whose grace period is over."""
        now = time.time()
        while (first := self._first(self._kill_times)) is not None and first[0] <= now:
            heapq.heappop(self._kill_times)
            running = self._running[first[1]]
            running.tree = [p for p in running.tree if p.is_running()]
            _signal_all(running.child.pid, running.tree, signal.SIGKILL)
            running.kill_at = None

    def _next_deadline(self) -> float | None:
        """The soonest wall-time deadline or SIGKILL time, if any."""
        firsts = [f[0] for f in (self._first(self._deadlines), self._first(self._kill_times)) if f]
        return min(firsts) if firsts else None

    def _current(self, heap: list[tuple[float, int]], entry: tuple[float, int]) -> bool:
        """Is *entry* still the time of a running task (its deadline while it is not
        being ended, or its SIGKILL time)?"""
        running = self._running.get(entry[1])
        if running is None:
            return False
        if heap is self._deadlines:
            return running.ending is None and running.deadline == entry[0]
        return running.kill_at == entry[0]

    def _first(self, heap: list[tuple[float, int]]) -> tuple[float, int] | None:
        """The soonest current entry of *heap*, dropping stale ones before it."""
        while heap and not self._current(heap, heap[0]):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _push(self, heap: list[tuple[float, int]], at: float, task_id: int) -> None:
        if len(heap) > 2 * len(self._running) + 64:  # mostly tasks long ended: compact
            heap[:] = [e for e in heap if self._current(heap, e)]
            heapq.heapify(heap)
        heapq.heappush(heap, (at, task_id))

    def _forget(self, running: Running) -> None:
        self._running.pop(running.task_id, None)
        del self._pidfds[running.pidfd]
        self._epoll.unregister(running.pidfd)
        os.close(running.pidfd)
        if self._deathwatch is not None:
            self._deathwatch.ended(running.child.pid)

    def close(self) -> None:
        if self._deathwatch is not None:
            self._deathwatch.close()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w, self._devnull):
            os.close(fd)


#: A task's filesystem with less free space than this counts as full (see :func:`disk_full`).
FULL_BELOW_BYTES = 64 * 1024


def disk_full(workdir: str) -> str:
    """A note for a failed task whose working directory's filesystem is (nearly) full:
    its own error message may not have fitted into its stderr file.  Empty otherwise."""
    try:
        fs = os.statvfs(workdir)
    except OSError:
        return ""
    free = fs.f_bavail * fs.f_frsize
    if free < FULL_BELOW_BYTES or (fs.f_files and not fs.f_favail):
        return f"no space left on device: {free} bytes free in {workdir}"
    return ""


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(pid: int, tree: Sequence[psutil.Process], sig: int) -> None:
    """Signal the task's process group, then every descendant found by ancestry."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in tree:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _kill_leftovers(running: Running) -> None:
    """A task is over when its main process is: nothing it started may keep running."""
    try:
        os.killpg(running.child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in running.tree:
        try:
            proc.kill()
        except psutil.Error:
            pass
