"""``balsam service``: the elastic queue.

Every period the service

1. reclaims tasks whose launcher is lost or whose lease ran out (``TaskSource.expire_leases``),
2. syncs the states of live batch jobs from the scheduler (one ``status`` call),
3. *observes* the site: the backlog, the live batch jobs, the queue policy, the
   scheduler's backfill windows, and when it last submitted,
4. asks the pure :func:`plan` what to do, and
5. cancels the queued jobs no longer needed and submits the requested ones.

:func:`plan` is the whole decision: plain data in (:class:`Observation`, with the time
"now"), a :class:`Plan` out, no I/O, so tests and simulators drive it with a virtual
clock.  Sizing is the packing strategy's job-packing method (``size_jobs``); the plan
adds what keeps a service from hurting the site:

* **No storm.**  ``size_jobs`` never exceeds ``max_queued`` per queue (and the plan
  checks it again, with the queue's other limits, whatever strategy is installed), and
  at most one submission happens per ``[service] submit_interval_s``.  Every recent
  submission that failed in a row (refused, or a job that failed) doubles that gap, up
  to ``max_backoff_s``: a scheduler that rejects everything sees a few attempts an hour.
* **Retiring.**  A queued job the service submitted is cancelled when the other live
  jobs cover the backlog without it (the backlog is gone, or running jobs absorb it),
  newest first; "cover" is asked of ``size_jobs`` itself, with an unlimited probe
  queue.  Jobs a user submitted are never touched.

The backlog is every task in :data:`BACKLOG_STATES` that no live launcher holds: tasks
to stage in or preprocess, runnable ones, and failed runs awaiting the recovery chain
(all need a launcher).  Each task weighs ``num_nodes / node_packing_count`` nodes for
its ``wall_time_min`` (the strategy's default when 0).

One service per site: :class:`ServiceLock` holds ``log/service.lock`` (``fcntl.flock``,
released by the kernel if the process dies).  Any error of one period (scheduler,
database) is logged on one line and the next period runs; SIGTERM and SIGINT end the
loop between two steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import func, or_, select

from . import batchjobs
from .config import ServiceSection
from .errors import BalsamError
from .models import BatchJob, Task
from .plugin_types import (
    ActiveJob,
    BackfillWindow,
    JobRequest,
    PackingStrategy,
    QueuePolicy,
    Scheduler,
    TaskRequirements,
    TaskSource,
)
from .states import BatchJobState, State

if TYPE_CHECKING:  # pragma: no cover
    from .api import Site

log = logging.getLogger(__name__)

B = BatchJobState
#: Task states that still need a launcher's nodes.
BACKLOG_STATES: frozenset[State] = frozenset(
    {
        State.READY, State.STAGED_IN, State.PREPROCESSED, State.RESTART_READY,
        State.RUN_ERROR, State.RUN_TIMEOUT,
    }
)
#: Batch jobs the service submits are marked with this origin.
SERVICE = "service"
#: The lock file, relative to the site directory.
LOCK_FILE = Path("log") / "service.lock"


# ---------------------------------------------------------------------- the pure decision


@dataclass(frozen=True)
class JobView:
    """A live batch job, as the decision sees it."""

    id: int
    queue: str
    num_nodes: int
    wall_time_min: float
    state: BatchJobState
    origin: str = "user"
    #: Epoch seconds when it was first seen running.
    start_time: float | None = None
    #: It runs only tasks of a workflow or with tags: not capacity for the whole
    #: backlog (it still takes a place in its queue).
    filtered: bool = False

    def active(self) -> ActiveJob:
        return ActiveJob(self.queue, self.num_nodes, self.wall_time_min, self.state,
                         self.start_time)


@dataclass(frozen=True)
class Observation:
    """Everything one decision needs, observed at time *now*."""

    now: float
    backlog: Sequence[TaskRequirements]
    #: Live batch jobs (pending, queued, running, unknown).
    jobs: Sequence[JobView]
    queues: Mapping[str, QueuePolicy]
    windows: Sequence[BackfillWindow] = ()
    #: When the newest batch job was created (None: never).
    last_submit: float | None = None
    #: Recent batch jobs that failed (submission refused, or the job failed), counted
    #: back from the newest until one that did not.
    failures_in_a_row: int = 0


@dataclass(frozen=True)
class Plan:
    """What the service does this period."""

    #: Jobs to submit now.
    submit: tuple[JobRequest, ...] = ()
    #: Ids of queued service jobs to cancel.
    retire: tuple[int, ...] = ()
    #: Jobs wanted but held back by the rate limit.
    held: tuple[JobRequest, ...] = ()
    #: Earliest time of the next submission (None: no limit pending).
    next_submit_at: float | None = None
    #: Requests the strategy made that the queue policy forbids, and why.
    refused: tuple[str, ...] = ()


def submit_gap(settings: ServiceSection, failures_in_a_row: int) -> float:
    """Seconds required between two submissions after *failures_in_a_row* failures."""
    if failures_in_a_row <= 0:
        return settings.submit_interval_s
    base = max(settings.submit_interval_s, 1.0)
    return min(settings.max_backoff_s, base * 2.0 ** min(failures_in_a_row, 40))


def plan(obs: Observation, packing: PackingStrategy, settings: ServiceSection) -> Plan:
    """Decide which jobs to submit and which queued ones to retire (pure; see module doc)."""
    kept = [j for j in obs.jobs if j.state in batchjobs.LIVE]
    retire: list[JobView] = []
    # Newest first: the oldest are nearest the front of their queue.
    for job in sorted(kept, key=lambda j: -j.id):
        if job.state is B.QUEUED and job.origin == SERVICE:
            trial = [j for j in kept if j.id != job.id]
            if _covered(obs.backlog, trial, packing, obs.now):
                kept = trial
                retire.append(job)
    wanted: list[JobRequest] = []
    if obs.backlog:
        wanted = packing.size_jobs(
            obs.backlog, obs.queues, _capacity(kept), obs.windows, obs.now
        )
    allowed, refused = _within_policy(wanted, obs.queues, kept)
    gap = submit_gap(settings, obs.failures_in_a_row)
    next_at = None if obs.last_submit is None else obs.last_submit + gap
    if not allowed:
        submit: list[JobRequest] = []
    elif next_at is not None and obs.now < next_at:
        submit = []
    elif gap > 0:
        submit, next_at = allowed[:1], obs.now + gap
    else:
        submit, next_at = allowed, None
    return Plan(
        submit=tuple(submit),
        retire=tuple(sorted(j.id for j in retire)),
        held=tuple(allowed[len(submit):]),
        next_submit_at=next_at if len(allowed) > len(submit) else None,
        refused=tuple(refused),
    )


#: A queue without limits: if job packing asks it for a job, the jobs given do not
#: cover the backlog (any strategy answers this through ``size_jobs``).
_PROBE = {"\0probe": QueuePolicy(max_queued=1, max_nodes=2**31, max_wall_min=2**31)}


def _covered(
    backlog: Sequence[TaskRequirements], jobs: Sequence[JobView], packing: PackingStrategy,
    now: float,
) -> bool:
    """Whether *jobs* have room for the whole *backlog*."""
    if not backlog:
        return True
    return not packing.size_jobs(backlog, _PROBE, _capacity(jobs), (), now)


def _capacity(jobs: Sequence[JobView]) -> list[ActiveJob]:
    """*jobs* for job packing; a filtered job has no room for the backlog (zero wall
    time) but still takes its place in the queue's ``max_queued``."""
    return [
        ActiveJob(j.queue, j.num_nodes, 0.0, j.state, j.start_time) if j.filtered else j.active()
        for j in jobs
    ]


def _within_policy(
    requests: Sequence[JobRequest], queues: Mapping[str, QueuePolicy], live: Sequence[JobView]
) -> tuple[list[JobRequest], list[str]]:
    """The requests the queue policy allows (whatever strategy made them), and why not."""
    waiting = {name: 0 for name in queues}
    for job in live:
        if job.state in (B.PENDING_SUBMISSION, B.QUEUED) and job.queue in waiting:
            waiting[job.queue] += 1
    allowed, refused = [], []
    for r in requests:
        p = queues.get(r.queue)
        why = None
        if p is None:
            why = "no such queue in [scheduler.queues]"
        elif not p.submit:
            why = "submit = false"
        elif not p.min_nodes <= r.num_nodes <= p.max_nodes:
            why = f"nodes outside {p.min_nodes}..{p.max_nodes}"
        elif not p.min_wall_min <= r.wall_time_min <= p.max_wall_min:
            why = f"wall time outside {p.min_wall_min}..{p.max_wall_min} min"
        elif waiting[r.queue] >= p.max_queued:
            why = f"max_queued = {p.max_queued} reached"
        if why is None:
            allowed.append(r)
            waiting[r.queue] += 1
        else:
            refused.append(f"{r.queue}: {r.num_nodes} node(s) x {r.wall_time_min} min: {why}")
    return allowed, refused


# ---------------------------------------------------------------------- one service per site


class ServiceLock:
    """``log/service.lock`` held with ``fcntl.flock``: one service per site."""

    def __init__(self, site_dir: Path) -> None:
        self.path = Path(site_dir) / LOCK_FILE
        self._file: TextIO | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`BalsamError` naming the service that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise BalsamError(
                f"another balsam service runs for this site (pid {holder}, holds {self.path})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> ServiceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------- the I/O around it


@dataclass
class PeriodReport:
    """What one period did."""

    reclaimed: int = 0
    #: Batch-job state changes recorded by the sync.
    changes: int = 0
    backlog: int = 0
    submitted: list[int] = field(default_factory=list)
    #: Ids of the submissions that failed.
    failed: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    #: One line per step that failed.
    errors: list[str] = field(default_factory=list)


class Service:
    """The elastic queue of one site (see the module docstring)."""

    def __init__(
        self,
        site: Site,
        *,
        scheduler: Scheduler | None = None,
        packing: PackingStrategy | None = None,
        source: TaskSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.settings = site.config.service
        self.scheduler: Scheduler = scheduler or site.selected("scheduler")
        self.packing: PackingStrategy = packing or site.selected("packing_strategy")
        self.source: TaskSource = source or site.selected("task_source")
        self.clock = clock
        self._stop = threading.Event()

    # ------------------------------------------------------------------ one period

    def run_once(self, now: float | None = None) -> PeriodReport:
        """One period: reclaim, sync, observe, decide, act. Never raises for a failing
        step: the error is logged on one line and kept in the report."""
        now = self.clock() if now is None else now
        report = PeriodReport()
        with self._step(report, "reclaiming expired leases"):
            while reclaimed := self.source.expire_leases(now):  # a batch per call
                report.reclaimed += reclaimed
            if report.reclaimed:
                log.warning("reclaimed %d task(s) whose launcher stopped renewing its lease",
                            report.reclaimed)
        with self._step(report, "syncing batch jobs"):
            report.changes = len(batchjobs.sync(self.site, self.scheduler, now))
        decision: Plan | None = None
        with self._step(report, "measuring the backlog"):
            obs = self.observe(now)
            report.backlog = len(obs.backlog)
            decision = plan(obs, self.packing, self.settings)
        if decision is None:
            return report
        for line in decision.refused:
            log.warning("job packing asked for a job the queue policy forbids: %s", line)
        for job_id in decision.retire:
            with self._step(report, f"retiring batch job {job_id}"):
                batchjobs.cancel(self.site, self.scheduler, job_id,
                                 "retired by the service: no longer needed for the backlog")
                report.retired.append(job_id)
        for request in decision.submit:
            if self._stop.is_set():
                break
            with self._step(report, "submitting"):
                job = batchjobs.submit(
                    self.site, self.scheduler, num_nodes=request.num_nodes,
                    wall_time_min=int(request.wall_time_min), queue=request.queue,
                    job_mode=self.settings.job_mode,
                    idle_timeout_s=self.settings.job_idle_timeout_s or None, origin=SERVICE,
                    now=now,
                )
                (report.submitted if job.state == B.QUEUED.value else report.failed).append(job.id)
        self._log_period(report, decision, now)
        return report

    @contextlib.contextmanager
    def _step(self, report: PeriodReport, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one failing step never ends the service
            line = f"{what} failed: {batchjobs.describe_error(exc)}"
            log.error("%s", line)
            log.debug("%s", what, exc_info=True)
            report.errors.append(line)

    def _log_period(self, report: PeriodReport, decision: Plan, now: float) -> None:
        held = ""
        if decision.held and decision.next_submit_at is not None:
            wait = max(0.0, decision.next_submit_at - now)
            held = f", {len(decision.held)} held for {wait:.0f} s (rate limit)"
        log.info(
            "backlog %d task(s); submitted %s, failed %s, retired %s%s; %d job change(s)",
            report.backlog, report.submitted or "-", report.failed or "-",
            report.retired or "-", held, report.changes,
        )

    # ------------------------------------------------------------------ observing

    def observe(self, now: float) -> Observation:
        """Read the backlog, live jobs and submission history; ask for backfill windows."""
        with self.site.db.session() as s:
            backlog = backlog_requirements(s, now)
            rows = s.scalars(
                select(BatchJob).where(BatchJob.state.in_([x.value for x in batchjobs.LIVE]))
            )
            jobs = [
                JobView(j.id, j.queue, j.num_nodes, j.wall_time_min, BatchJobState(j.state),
                        j.origin, j.start_time,
                        filtered=j.filter_workflow is not None or bool(j.filter_tags))
                for j in rows
            ]
            last_submit = s.scalar(select(func.max(BatchJob.created)))
            recent = s.scalars(
                select(BatchJob.state)
                .where(BatchJob.created >= now - self.settings.max_backoff_s)
                .order_by(BatchJob.id.desc())
                .limit(64)
            )
            failures = 0
            for state in recent:
                if state not in (B.SUBMIT_FAILED.value, B.FAILED.value):
                    break
                failures += 1
        windows: list[BackfillWindow] = []
        if backlog:
            try:
                windows = list(self.scheduler.backfill_windows())
            except Exception as exc:  # noqa: BLE001 - windows are an optional hint
                log.warning("backfill windows unavailable: %s", batchjobs.describe_error(exc))
        return Observation(
            now=now, backlog=backlog, jobs=jobs, queues=self.site.config.scheduler.queues,
            windows=windows, last_submit=last_submit, failures_in_a_row=failures,
        )

    # ------------------------------------------------------------------ the loop

    def stop(self) -> None:
        """End :meth:`run` after the current step (thread- and signal-safe)."""
        self._stop.set()

    def run(self, period_s: float | None = None, once: bool = False) -> None:
        """Hold the site's service lock and run a period every *period_s* seconds
        (``[service] period_s``) until :meth:`stop`, SIGTERM or SIGINT."""
        period = self.settings.period_s if period_s is None else period_s
        with ServiceLock(self.site.site_dir), self._signals():
            log.info("service started for %s (period %g s)", self.site.site_dir, period)
            while not self._stop.is_set():
                self.run_once()
                if once:
                    break
                self._stop.wait(period)
            log.info("service stopped")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda _s, _f: self.stop())
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def backlog_requirements(session: Any, now: float) -> list[TaskRequirements]:
    """The backlog (see the module docstring) as task requirements.

    Grouped by shape in SQL: identical tasks share one :class:`TaskRequirements` object
    (with the lowest id and the oldest ``ready_since`` of the group), so a backlog of
    millions costs a list of references, not millions of rows.
    """
    shape = (
        Task.num_nodes, Task.ranks_per_node, Task.threads_per_rank, Task.gpus_per_rank,
        Task.node_packing_count, Task.wall_time_min,
    )
    query = (
        select(*shape, func.count(), func.min(Task.state_time), func.min(Task.id))
        .where(
            Task.state.in_(sorted(s.value for s in BACKLOG_STATES)),
            or_(Task.lease_launcher_id.is_(None), Task.lease_expires < now),
        )
        .group_by(*shape)
    )
    backlog: list[TaskRequirements] = []
    for nodes, rpn, tpr, gpr, npc, wall, count, since, first in session.execute(query):
        req = TaskRequirements(
            task_id=first, num_nodes=nodes, ranks_per_node=rpn, threads_per_rank=tpr,
            gpus_per_rank=gpr, node_packing_count=npc, wall_time_min=wall, ready_since=since,
        )
        backlog += [req] * count
    return backlog
