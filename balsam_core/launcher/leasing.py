"""Leasing in a background thread, so the hot loop never waits on the database.

A lease is a write transaction; on SQLite it can wait tens of milliseconds for the
write lock while the processing worker or the reporter holds it.  Done in the hot loop,
that wait left slots empty.  Here the loop only *asks* (:meth:`Leaser.request`, with its
free resources at that moment) and picks the result up after it is woken
(:meth:`Leaser.take`); while a lease is in flight it keeps starting tasks from its queue.
After handing a lease over, the thread prepares the leased tasks' working directories
(``prepare``): file system work the hot loop would otherwise do before each start.  A
directory that cannot be made fails its task at the start, where the loop checks again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BalsamError, DatabaseError
from ..plugin_types import LeasedTask, NodeResources, TaskSource


@dataclass(frozen=True)
class LeaseResult:
    """What one lease brought: the tasks, or the database error that stopped it."""

    tasks: Sequence[LeasedTask]
    error: DatabaseError | None = None


def lease(
    source: TaskSource, launcher_id: int, free: list[NodeResources], limit: int
) -> LeaseResult:
    """One lease from *source*; a database error is the result, not raised."""
    try:
        return LeaseResult(source.lease(launcher_id, free, limit))
    except DatabaseError as exc:
        return LeaseResult((), exc)


class Leaser:
    """One background thread taking leases for one launcher, one request at a time."""

    def __init__(
        self,
        source: TaskSource,
        launcher_id: int,
        wake: Callable[[], None],
        prepare: Callable[[str], object],
    ) -> None:
        self._source, self._launcher_id, self._wake = source, launcher_id, wake
        self._prepare = prepare
        self._cond = threading.Condition()
        self._request: tuple[list[NodeResources], int] | None = None
        self._result: LeaseResult | None = None
        self._busy = False
        self._closing = False
        #: A bug in the task source (not a database error): for the hot loop to raise.
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="balsam-leaser", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Is a lease asked for or in flight, or its result not yet taken?"""
        return self._busy

    def request(self, free: list[NodeResources], limit: int) -> None:
        """Ask for up to *limit* tasks that fit *free* (ignored while :attr:`busy`, and
        for no task)."""
        with self._cond:
            if self._busy or self._closing or limit <= 0:
                return
            self._busy = True
            self._request = (free, limit)
            self._cond.notify()

    def take(self) -> LeaseResult | None:
        """The result of the last request, once it is there (then not :attr:`busy`)."""
        if self._result is None:  # the hot loop asks at every turn; woken once it is there
            return None
        with self._cond:
            result, self._result = self._result, None
            if result is not None:
                self._busy = False
            return result

    def close(self, timeout: float | None = None) -> None:
        """Let a lease in flight finish (at most *timeout* seconds: the database may be
        away) and stop the thread.  What it leased and nobody took stays leased to the
        launcher: its release at shutdown gives it back, or the lease expires."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._request is None and not self._closing:
                    self._cond.wait()
                if self._request is None:
                    return
                (free, limit), self._request = self._request, None
            try:
                result = lease(self._source, self._launcher_id, free, limit)
            except BaseException as exc:  # a bug: the hot loop raises it
                self.error = exc
                self._wake()
                return
            with self._cond:
                self._result = result
            self._wake()
            for task in result.tasks:
                try:
                    self._prepare(task.workdir)
                except (BalsamError, OSError):
                    pass  # the start fails the task with the reason
