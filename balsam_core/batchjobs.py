"""Batch jobs: database rows with their history, submitted and watched through the
scheduler plugin.

A batch job is a :class:`~balsam_core.models.BatchJob` row; every change of its Balsam
state appends a :class:`~balsam_core.models.BatchJobEvent` in the same transaction.
The life of a job::

    PENDING_SUBMISSION -> QUEUED -> RUNNING -> FINISHED | FAILED | CANCELLED
           \\-> SUBMIT_FAILED              (UNKNOWN: the scheduler's state is not mapped)

* :func:`submit` writes the row, renders the scheduler's script into
  ``<site>/log/batch-jobs/<id>/`` and submits it.  The script runs ``balsam launcher
  --batch-job-id <id>`` with the job's filters, nodes and wall time.  A submission the
  scheduler refuses, a missing command, a timeout or any other plugin failure never
  raises: the row goes to SUBMIT_FAILED with the reason and one line is logged.
* :func:`sync` asks the scheduler for the states of every live job in one
  ``status(ids)`` call and records what changed.  A job the scheduler no longer
  reports ended: FINISHED if it was seen running, else FAILED.
* :func:`cancel` cancels through the scheduler and records CANCELLED.

Batch-job states never leave an end state (:data:`~balsam_core.states.BATCH_JOB_END`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from .config import JOB_MODES
from .errors import NotFound, PluginError, ValidationError
from .models import BatchJob, BatchJobEvent
from .plugin_types import BatchJobSpec, Scheduler, SchedulerJobStatus
from .states import BATCH_JOB_END, BatchJobState

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session

    from .api import Site

log = logging.getLogger(__name__)

B = BatchJobState
#: States of a job that holds or may still get an allocation.
LIVE: frozenset[BatchJobState] = frozenset({B.PENDING_SUBMISSION, B.QUEUED, B.RUNNING, B.UNKNOWN})
#: A job the scheduler stops reporting this soon after its submission is not taken
#: for ended (some schedulers show a new job only after a moment).
VANISH_GRACE_S = 30.0
#: A row still PENDING_SUBMISSION this long after its creation lost its submitter.
STALE_PENDING_S = 600.0
#: Where job scripts and scheduler output go, relative to the site directory.
JOBS_DIR = Path("log") / "batch-jobs"


def job_dir(site: Site, job_id: int) -> Path:
    """The directory of batch job *job_id*: its script and the scheduler's output."""
    return site.site_dir / JOBS_DIR / str(job_id)


def describe_error(exc: BaseException) -> str:
    """*exc* as one line, e.g. ``sbatch: error: invalid partition`` or
    ``command not found: /usr/bin/sbatch``."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"command not found: {exc.filename}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())
    if isinstance(exc, PluginError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------- rows and history


def _move(
    session: Session,
    job: BatchJob,
    state: BatchJobState,
    message: str,
    now: float,
    native: str | None = None,
) -> BatchJobEvent | None:
    """Record *job* moving to *state*; return the event, or None if it is already in
    *state* or ended."""
    if native is not None:
        job.native_state = native[:64]
    current = BatchJobState(job.state)
    if current is state or current in BATCH_JOB_END:
        return None
    event = BatchJobEvent(
        batch_job_id=job.id, time=now, from_state=current.value, to_state=state.value,
        native_state=job.native_state, message=message,
    )
    session.add(event)
    job.state = state.value
    job.message = message
    if state is B.QUEUED and job.submit_time is None:
        job.submit_time = now
    if state is B.RUNNING and job.start_time is None:
        job.start_time = now
    if state in BATCH_JOB_END:
        job.end_time = now
    return event


def _locked(session: Session, ids: Sequence[int]) -> dict[int, BatchJob]:
    """Rows *ids* (row-locked on PostgreSQL; SQLite writers hold the database lock)."""
    query = select(BatchJob).where(BatchJob.id.in_(list(ids)))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return {job.id: job for job in session.scalars(query)}


def get(site: Site, job_id: int) -> BatchJob:
    """The batch job *job_id*."""
    with site.db.session() as s:
        job = s.get(BatchJob, job_id)
        if job is None:
            raise NotFound(f"no batch job with id {job_id}")
        return job


def jobs(site: Site, *, include_ended: bool = False) -> list[BatchJob]:
    """Batch jobs by id: the live ones, or every one with *include_ended*."""
    query = select(BatchJob).order_by(BatchJob.id)
    if not include_ended:
        query = query.where(BatchJob.state.in_([s.value for s in LIVE]))
    with site.db.session() as s:
        return list(s.scalars(query))


def history(site: Site, job_id: int) -> list[BatchJobEvent]:
    """Every recorded state change of batch job *job_id*, oldest first."""
    with site.db.session() as s:
        if s.get(BatchJob, job_id) is None:
            raise NotFound(f"no batch job with id {job_id}")
        return list(
            s.scalars(
                select(BatchJobEvent)
                .where(BatchJobEvent.batch_job_id == job_id)
                .order_by(BatchJobEvent.time, BatchJobEvent.id)
            )
        )


# ---------------------------------------------------------------------- submit


def launcher_argv(
    site: Site, job: BatchJob, idle_timeout_s: float | None = None
) -> tuple[str, ...]:
    """The command a batch job runs: this Python's ``balsam launcher`` for the job."""
    argv = [
        sys.executable, "-m", "balsam_core", "--site", str(site.site_dir), "launcher",
        "--batch-job-id", str(job.id), "--mode", job.job_mode,
        "--nodes", str(job.num_nodes), "--time-limit-min", str(job.wall_time_min),
    ]
    if job.filter_workflow is not None:
        argv += ["--wf", job.filter_workflow]
    for key, value in sorted(job.filter_tags.items()):
        argv += ["--tag", f"{key}={value}"]
    if idle_timeout_s:
        argv += ["--idle-timeout", f"{idle_timeout_s:g}"]
    return tuple(argv)


def _check(num_nodes: int, wall_time_min: int, job_mode: str, queue: str) -> None:
    if not queue or queue != queue.strip():
        raise ValidationError(f"queue name {queue!r} must be non-empty, without spaces")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValidationError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if isinstance(wall_time_min, bool) or not isinstance(wall_time_min, int) or wall_time_min < 1:
        raise ValidationError(f"wall_time_min must be an integer >= 1, got {wall_time_min!r}")
    if job_mode not in JOB_MODES:
        raise ValidationError(f"job mode must be one of {', '.join(JOB_MODES)}, got {job_mode!r}")


def submit(
    site: Site,
    scheduler: Scheduler,
    *,
    num_nodes: int,
    wall_time_min: int,
    queue: str,
    project: str | None = None,
    job_mode: str = "mpi",
    workflow: str | None = None,
    tags: Mapping[str, str] | None = None,
    idle_timeout_s: float | None = None,
    origin: str = "user",
    now: float | None = None,
) -> BatchJob:
    """Create a batch job row and submit it; return the row (QUEUED or SUBMIT_FAILED).

    Bad arguments raise :class:`ValidationError` before anything is written.  Any
    failure of the scheduler plugin (refusal, missing command, timeout, a bug) leaves
    the row SUBMIT_FAILED with the reason in ``message`` and is logged on one line.
    """
    _check(num_nodes, wall_time_min, job_mode, queue)
    clock = time.time if now is None else (lambda: now)  # a virtual clock stamps all
    now = clock()
    with site.db.session(write=True) as s:
        job = BatchJob(
            queue=queue, project=site.config.scheduler.project if project is None else project,
            num_nodes=num_nodes, wall_time_min=wall_time_min, job_mode=job_mode,
            filter_workflow=workflow, filter_tags=dict(tags or {}), extra={},
            state=B.PENDING_SUBMISSION.value, origin=origin, created=now,
        )
        s.add(job)
        s.flush()
        s.add(
            BatchJobEvent(
                batch_job_id=job.id, time=now, from_state=None,
                to_state=B.PENDING_SUBMISSION.value, native_state="",
                message=f"requested by {origin}: {num_nodes} node(s) x {wall_time_min} min "
                f"in queue {queue}",
            )
        )
    workdir = job_dir(site, job.id)
    spec = BatchJobSpec(
        job_id=job.id, queue=job.queue, project=job.project, num_nodes=job.num_nodes,
        wall_time_min=job.wall_time_min, job_mode=job.job_mode,
        launcher_argv=launcher_argv(site, job, idle_timeout_s), workdir=workdir,
        extra=dict(job.extra),
    )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        script = workdir / "submit.sh"
        script.write_text(scheduler.render_script(spec))
        script.chmod(0o700)
        scheduler_id = str(scheduler.submit(script, spec)).strip()
        if not scheduler_id:
            raise PluginError("the scheduler returned an empty job id")
    except Exception as exc:  # noqa: BLE001 - any plugin failure is the job's, in one line
        reason = f"submission failed: {describe_error(exc)}"
        log.error("batch job %d (%s, %d node(s) x %d min): %s",
                  job.id, queue, num_nodes, wall_time_min, reason)
        log.debug("batch job %d: submission failure", job.id, exc_info=True)
        with site.db.session(write=True) as s:
            row = _locked(s, [job.id])[job.id]
            _move(s, row, B.SUBMIT_FAILED, reason, clock())
        return get(site, job.id)
    with site.db.session(write=True) as s:
        row = _locked(s, [job.id])[job.id]
        row.scheduler_id = scheduler_id
        cancelled = BatchJobState(row.state) in BATCH_JOB_END  # cancelled while submitting
        _move(s, row, B.QUEUED, f"submitted as {scheduler_id}", clock())
    log.info("batch job %d submitted to %s as %s: %d node(s) x %d min",
             job.id, queue, scheduler_id, num_nodes, wall_time_min)
    if cancelled:
        _cancel_quietly(scheduler, job.id, scheduler_id)
    return get(site, job.id)


def _cancel_quietly(scheduler: Scheduler, job_id: int, scheduler_id: str) -> None:
    try:
        scheduler.cancel(scheduler_id)
    except Exception as exc:  # noqa: BLE001
        log.error("batch job %d: cancel of %s failed: %s", job_id, scheduler_id,
                  describe_error(exc))


# ---------------------------------------------------------------------- sync


def sync(site: Site, scheduler: Scheduler, now: float | None = None) -> list[BatchJobEvent]:
    """Bring every live job's state up to date with one ``scheduler.status`` call.

    Returns the events recorded.  A failing ``status`` raises :class:`PluginError`
    (one line; nothing written).
    """
    now = time.time() if now is None else now
    with site.db.session() as s:
        live = list(s.scalars(select(BatchJob).where(BatchJob.state.in_([x.value for x in LIVE]))))
    if not live:
        return []
    asked = {j.scheduler_id: j.id for j in live if j.scheduler_id}
    statuses: Mapping[str, SchedulerJobStatus] = {}
    if asked:
        try:
            statuses = scheduler.status(sorted(asked))
            if not isinstance(statuses, Mapping):
                raise PluginError(f"status() returned {type(statuses).__name__}, not a mapping")
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"scheduler status failed: {describe_error(exc)}") from exc

    def change_of(job: BatchJob) -> tuple[BatchJobState, str, str | None] | None:
        return _observed(job, statuses.get(job.scheduler_id) if job.scheduler_id else None, now)

    if not any(change_of(job) for job in live):
        return []  # the usual case: no write lock (on SQLite it stalls every launcher)
    events: list[BatchJobEvent] = []
    with site.db.session(write=True) as s:
        rows = _locked(s, [j.id for j in live])
        for job in rows.values():
            change = change_of(job)  # again: the row may have moved meanwhile
            if change is None:
                continue
            state, message, native = change
            event = _move(s, job, state, message, now, native)
            if event is not None:
                events.append(event)
                _log_change(job, state, message)
    return events


def _observed(
    job: BatchJob, status: SchedulerJobStatus | None, now: float
) -> tuple[BatchJobState, str, str | None] | None:
    """The state change *status* implies for *job* (state, message, native), if any."""
    if job.scheduler_id is None:
        if now - job.created > STALE_PENDING_S:
            why = "submission never completed (the submitting process died?)"
            return B.SUBMIT_FAILED, why, None
        return None
    if status is None:
        if now - (job.submit_time or job.created) < VANISH_GRACE_S:
            return None
        if job.start_time is not None:
            return B.FINISHED, "ended: the scheduler no longer reports it", None
        return B.FAILED, "vanished from the scheduler before it was seen running", None
    try:
        state = BatchJobState(status.state)
    except (ValueError, AttributeError):
        state = B.UNKNOWN
    if state is B.PENDING_SUBMISSION:
        state = B.QUEUED
    native = " ".join(str(getattr(status, "native_state", "")).split())
    if state is BatchJobState(job.state):
        return (state, job.message, native) if native != job.native_state else None
    what = {
        B.QUEUED: "queued", B.RUNNING: "running", B.FINISHED: "finished",
        B.FAILED: "failed", B.CANCELLED: "cancelled by the scheduler",
        B.SUBMIT_FAILED: "refused", B.UNKNOWN: "in a state Balsam does not know",
    }[state]
    return state, f"{what} (scheduler state {native or '?'})", native


def _log_change(job: BatchJob, state: BatchJobState, message: str) -> None:
    if state is B.FAILED:
        log.error("batch job %d (%s): %s; output in %s/%d/", job.id, job.scheduler_id,
                  message, JOBS_DIR, job.id)
    elif state is B.UNKNOWN:
        log.warning("batch job %d (%s): %s", job.id, job.scheduler_id, message)
    else:
        log.info("batch job %d (%s): %s", job.id, job.scheduler_id, message)


def mark_started(site: Site, job_id: int, message: str, now: float | None = None) -> bool:
    """Record that batch job *job_id* runs (its launcher started), before the next
    :func:`sync` sees it; False if it was already running or had ended."""
    with site.db.session(write=True) as s:
        job = _locked(s, [job_id]).get(job_id)
        if job is None:
            raise NotFound(f"no batch job with id {job_id}")
        return _move(s, job, B.RUNNING, message, time.time() if now is None else now) is not None


# ---------------------------------------------------------------------- cancel


def cancel(
    site: Site, scheduler: Scheduler, job_id: int, reason: str = "cancelled by user"
) -> BatchJob:
    """Cancel batch job *job_id*; return its row (CANCELLED, or its end state if it had
    already ended).  A failing scheduler ``cancel`` raises :class:`PluginError` and the
    row keeps its state."""
    job = get(site, job_id)
    if BatchJobState(job.state) in BATCH_JOB_END:
        return job
    if job.scheduler_id is not None:
        try:
            scheduler.cancel(job.scheduler_id)
        except Exception as exc:  # noqa: BLE001
            raise PluginError(
                f"batch job {job_id}: cancel of {job.scheduler_id} failed: {describe_error(exc)}"
            ) from exc
    with site.db.session(write=True) as s:
        row = _locked(s, [job_id])[job_id]
        if _move(s, row, B.CANCELLED, reason, time.time()) is not None:
            log.info("batch job %d (%s): %s", job_id, job.scheduler_id, reason)
    return get(site, job_id)
