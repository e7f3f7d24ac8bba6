"""The processing worker: :class:`~balsam_core.processing.TransitionProcessor` passes
in a child process, so their database, file and subprocess work never competes with
the launcher's hot loop for the interpreter.

The child writes one byte per pass to a pipe the hot loop watches: ``b"m"`` when the
pass moved tasks (some may now be runnable: lease at once), ``b"b"`` when work is
still in flight, ``b"i"`` when it found nothing to do.  The launcher counts as idle
only while the worker says ``i``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

MOVED, BUSY, IDLE = b"m", b"b", b"i"


def _run(
    site_dir: str,
    launcher_id: int,
    workflow: str | None,
    tags: dict[str, str],
    status: Connection,
    stop: Any,
    interval_s: float,
    poll_s: float,
) -> None:
    """The child's loop."""
    # The launcher decides when processing ends; a Ctrl-C or SIGTERM to the process
    # group must not cut a pass in half.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..api import Site
    from ..errors import DatabaseError
    from ..processing import TransitionProcessor

    site = Site.open(site_dir)
    processor = TransitionProcessor(site, None, owner_id=launcher_id, workflow=workflow, tags=tags)
    backoff = interval_s
    parent = os.getppid()
    try:
        while not stop.is_set():
            if os.getppid() != parent:  # the launcher died (SIGKILL): so does its worker
                log.warning("processing: launcher %d is gone; stopping", launcher_id)
                return
            try:
                moved = processor.process_once()
                backoff = interval_s if moved else min(backoff * 2, poll_s)
                status.send_bytes(MOVED if moved else BUSY if processor.inflight else IDLE)
            except DatabaseError as exc:
                log.warning("processing: %s (retrying)", exc)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug: say so, keep the launcher's tasks running
                log.exception("processing failed; retrying in 5 s")
                backoff = 5.0
            stop.wait(backoff)
    finally:
        processor.close()
        site.db.dispose()


class ProcessingWorker:
    """Runs the processing loop in a child process for one launcher."""

    def __init__(
        self,
        site_dir: str,
        launcher_id: int,
        workflow: str | None,
        tags: Mapping[str, str],
        interval_s: float,
        poll_s: float,
    ) -> None:
        # fork: the child starts at once with everything already imported.  The launcher
        # forks it before starting any thread, and the child opens its own database
        # connections (it never touches the parent's pooled ones).
        ctx = multiprocessing.get_context("fork")
        self._status, child_end = ctx.Pipe(duplex=False)
        self._stop = ctx.Event()
        self._process = ctx.Process(
            target=_run,
            args=(site_dir, launcher_id, workflow, dict(tags), child_end, self._stop,
                  interval_s, poll_s),
            name="balsam-processing",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        #: The worker's last word: None until its first pass.
        self.last: bytes | None = None

    def fileno(self) -> int:
        """Readable when the worker has said something (watch it in a selector)."""
        return self._status.fileno()

    def read(self) -> bool:
        """Consume what the worker said; True if a pass moved tasks."""
        moved = False
        try:
            while self._status.poll():
                self.last = self._status.recv_bytes()
                moved = moved or self.last == MOVED
        except EOFError:
            self.last = IDLE  # the worker ended
        return moved

    @property
    def idle(self) -> bool:
        return self.last == IDLE

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current pass finish, then end the worker (killed after *timeout*)."""
        self._stop.set()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._status.close()
