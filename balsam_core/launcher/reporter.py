"""The launcher's reporter: state changes written in batches from a background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ..errors import DatabaseError
from ..plugin_types import StateUpdate, TaskSource

log = logging.getLogger(__name__)

#: Longest pause between attempts to reach an unreachable database (reports, leases).
DB_RETRY_MAX_S = 2.0


class Reporter:
    """Writes state updates from a background thread, one transaction per flush, at most
    one flush per ``flush_s``.

    The hot loop only appends; ids the task source refuses (killed, lease lost) come
    back through :meth:`refused` and wake the loop.  While the database is unreachable
    updates are kept, in order, and written once it answers again (retried with
    backoff up to ``DB_RETRY_MAX_S``); only :meth:`close` with a timeout gives up on them.
    """

    def __init__(
        self, source: TaskSource, launcher_id: int, wake: Callable[[], None], flush_s: float
    ) -> None:
        self.source, self.launcher_id, self.wake, self.flush_s = source, launcher_id, wake, flush_s
        self._pending: list[StateUpdate] = []
        self._refused: list[int] = []
        self._lock = threading.Lock()
        self._has_work = threading.Event()
        self._urgent = threading.Event()
        self._closing = False
        self._give_up_at: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="balsam-reporter", daemon=True)
        self._thread.start()

    def add(self, updates: Sequence[StateUpdate], urgent: bool = False) -> None:
        """Queue *updates*; *urgent*: write them without waiting out ``flush_s`` (the
        launcher has nothing running, so nothing else is coming soon)."""
        if updates:
            with self._lock:
                self._pending.extend(updates)
            if urgent:
                self._urgent.set()
            # Set at most once per flush (the hot loop adds at every turn); the thread
            # clears it before taking the batch, so these updates are in that batch.
            if not self._has_work.is_set():
                self._has_work.set()

    def refused(self) -> list[int]:
        """Ids the task source refused since the last call (without locking when none:
        the hot loop asks at every turn; the thread wakes it after adding some)."""
        if not self._refused:
            return []
        with self._lock:
            ids, self._refused = self._refused, []
        return ids

    def _run(self) -> None:
        last_flush = 0.0
        while True:
            self._has_work.wait()
            # At most one write per flush_s: updates arriving meanwhile join the batch.
            # The first after a quiet spell is written at once.
            pause = last_flush + self.flush_s - time.monotonic()
            if pause > 0 and not self._closing:
                self._urgent.wait(pause)
            self._urgent.clear()
            self._has_work.clear()
            last_flush = time.monotonic()
            self._flush()
            if self._closing and not self._pending:
                return

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        delay = 0.1
        while True:
            try:
                refused = self.source.report(self.launcher_id, batch)
                break
            except DatabaseError as exc:
                if self._give_up_at is not None and time.time() >= self._give_up_at:
                    log.error(
                        "%d state update(s) not written: %s; their leases expire and the "
                        "tasks are reclaimed", len(batch) + len(self._pending), exc,
                    )
                    with self._lock:
                        self._pending = []
                    return
                log.warning("reporting %d updates: %s (retrying in %.1f s)", len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, DB_RETRY_MAX_S)
            except BaseException as exc:  # a bug: keep it for the main thread to raise
                self.error = exc
                self.wake()
                return
        if refused:
            with self._lock:
                self._refused.extend(refused)
            self.wake()

    def close(self, timeout: float | None = None) -> None:
        """Flush everything still pending and stop the thread; with *timeout*, give up
        on updates the database did not take within that many seconds (logged)."""
        if timeout is not None:
            self._give_up_at = time.time() + timeout
        self._closing = True
        self._urgent.set()
        self._has_work.set()
        self._thread.join()
