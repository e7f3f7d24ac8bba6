"""The processing worker: :class:`~balsam_core.processing.TransitionProcessor` passes
in a child process, so their database, file and subprocess work never competes with
the launcher's hot loop for the interpreter.

The child writes one byte per pass to a pipe the hot loop watches: ``b"m"`` when the
pass moved tasks (some may now be runnable: lease at once), ``b"b"`` when work is
still in flight, ``b"i"`` when it found nothing to do.  The launcher counts as idle
only while the worker says ``i``.

The child sleeps between passes on a second pipe, of which only the launcher holds
the write end: a byte means "stop", end-of-file means the launcher died.  (A
``multiprocessing.Event`` here deadlocked a worker forever when its launcher was
SIGKILLed while holding the event's lock.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
from collections.abc import Mapping

log = logging.getLogger(__name__)

MOVED, BUSY, IDLE = b"m", b"b", b"i"


def _run(
    site_dir: str,
    launcher_id: int,
    workflow: str | None,
    tags: dict[str, str],
    status: int,
    stop_fds: tuple[int, int],
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

    stop_r, stop_w = stop_fds
    os.close(stop_w)  # the launcher's end: when its only holder dies, stop_r reads EOF
    site: Site | None = None
    processor: TransitionProcessor | None = None
    # Each pass follows a pause, the first too: the launcher's start (its first lease
    # and starts) has the CPU meanwhile.
    backoff = interval_s
    try:
        while not _stop_requested(stop_r, backoff, launcher_id):
            try:
                if processor is None:  # here: the database may be away at first
                    site = site or Site.open(site_dir)
                    # Tasks with nothing to do before their run are the task source's
                    # to fast-forward as it leases them (TaskSource.lease).
                    processor = TransitionProcessor(
                        site, None, owner_id=launcher_id, workflow=workflow, tags=tags,
                        forward_ready=False,
                    )
                moved = processor.process_once()
                backoff = interval_s if moved else min(backoff * 2, poll_s)
                os.write(status, MOVED if moved else BUSY if processor.inflight else IDLE)
            except DatabaseError as exc:
                log.warning("processing: %s (retrying)", exc)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug: say so, keep the launcher's tasks running
                log.exception("processing failed; retrying in 5 s")
                backoff = 5.0
    finally:
        if processor is not None:
            processor.close()
        if site is not None:
            site.db.dispose()


def _stop_requested(fd: int, timeout: float, launcher_id: int) -> bool:
    """Wait up to *timeout* for a stop byte or end-of-file on *fd*."""
    if not select.select([fd], [], [], timeout)[0]:
        return False
    if not os.read(fd, 1):
        log.warning("processing: launcher %d is gone; stopping", launcher_id)
    return True


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
        # A plain pipe of one-byte words: the hot loop reads it without a selector (a
        # multiprocessing Connection polled through one per read).
        self._status, child_end = os.pipe()
        os.set_blocking(self._status, False)
        stop_r, self._stop_w = os.pipe()
        self._process = ctx.Process(
            target=_run,
            args=(site_dir, launcher_id, workflow, dict(tags), child_end,
                  (stop_r, self._stop_w), interval_s, poll_s),
            name="balsam-processing",
            daemon=True,
        )
        self._process.start()
        os.close(child_end)
        os.close(stop_r)
        #: The worker's last word: None until its first pass.
        self.last: bytes | None = None
        #: The worker process has ended (its pipe reads end-of-file).
        self.ended = False

    def fileno(self) -> int:
        """Readable when the worker has said something (watch it in a selector)."""
        return self._status

    def read(self) -> bool:
        """Consume what the worker said; True if a pass moved tasks."""
        words = b""
        try:
            while chunk := os.read(self._status, 4096):
                words += chunk
        except BlockingIOError:
            pass  # all read
        else:
            self.ended = True  # end-of-file
        if words:
            self.last = words[-1:]
        if self.ended:
            self.last = IDLE
        return MOVED in words

    @property
    def idle(self) -> bool:
        return self.last == IDLE

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current pass finish, then end the worker (killed after *timeout*)."""
        try:
            os.write(self._stop_w, b"s")
        except OSError:
            pass  # the worker is gone already
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        os.close(self._status)
        os.close(self._stop_w)
