"""The pilot's hot loop: lease, place, start, watch.

The loop sleeps only in :meth:`ProcessGroup.wait`, which returns as soon as a task
exits, a wall-time or kill deadline passes, a signal arrives, or the processing
worker makes tasks runnable; a freed slot is refilled from the tasks leased ahead
(``prefetch``) in the same tick, without a database round trip.  The loop never waits
on the database: leases are taken by the :class:`~balsam_core.launcher.leasing.Leaser`
thread, state changes go to the :class:`~balsam_core.launcher.reporter.Reporter`
thread, which writes them in batches, one transaction each; pre/post-processing runs
in a worker process (:mod:`balsam_core.launcher.worker`).

Faults.  With its heartbeat the loop also reclaims the tasks of launchers that died
(``TaskSource.expire_leases``).  When the database cannot be reached, running tasks
keep running, the reporter keeps their transitions, and leasing and heartbeats are
retried with backoff; a launcher that has not renewed its leases by the time they may
expire (``lease_s`` after the last renewal, minus a margin to end the processes)
ends its tasks as RUN_TIMEOUT, so that they never run twice at once when another
launcher reclaims them.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select

from ..api import Site, filter_tasks
from ..db import indexed_by
from ..errors import BalsamError, DatabaseError
from ..fastforward import leasable, work_before_run
from ..models import App, Task
from ..plugin_types import (
    LauncherInfo,
    LaunchSpec,
    LeasedTask,
    MpiLauncher,
    NodeResources,
    NodeSpec,
    PackingStrategy,
    StateUpdate,
    TaskSource,
)
from ..processing.staging import allowed_roots
from ..site import SITE_ENV
from ..states import State
from .leasing import Leaser, LeaseResult, lease
from .nodes import NodePool
from .processes import Exited, ProcessGroup, disk_full
from .reporter import DB_RETRY_MAX_S, Reporter
from .timeslice import short_time_slice
from .workdirs import Workdirs
from .worker import ProcessingWorker

log = logging.getLogger(__name__)


TASK_ENV = "BALSAM_TASK_ID"
#: Signals by which a batch system ends a job's processes (time limit, cancel).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGKILL})
#: How long the end of a task killed by one of ``STOP_SIGNALS`` waits to be judged while
#: the launcher runs on: a batch system signals every process of the job, and the
#: launcher's own signal may come a moment after its tasks died of theirs.
STOP_SIGNAL_HOLD_S = 1.0
#: Longest the loop goes without looking at ``LauncherOptions.stop_file``.
STOP_CHECK_S = 0.5
#: ``Launcher._lease_until`` of a launcher whose leases may have been reclaimed.
LOST = float("-inf")
#: Tasks leased ahead cover this many seconds of starts at the recent start rate: a
#: lease of many short tasks costs less per task than many small leases, while long
#: tasks are not hoarded by one launcher when several share a backlog.
LEASE_AHEAD_S = 0.25
#: Fewest tasks leased ahead (while the start rate is unknown or low).
MIN_AHEAD = 16
#: Seconds over which the start rate is measured.
RATE_WINDOW_S = 0.1
#: Fewest queued tasks the packing strategy chooses from at a time (and at least four
#: per free CPU slot: after an exit it sees a few dozen, not the whole queue).
MIN_PACKING_WINDOW = 64


@dataclass(frozen=True)
class LauncherOptions:
    """How one launcher runs (from ``balsam launcher`` options and ``balsam.toml``)."""

    nodes: tuple[NodeSpec, ...]
    #: Epoch seconds when the allocation ends (None: never).
    end_time: float | None = None
    #: Exit after this long with nothing running and nothing runnable (None: never).
    idle_timeout_s: float | None = None
    workflow: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    batch_job_id: int | None = None
    #: Seconds between polls for new runnable tasks while slots are free.
    poll_s: float = 0.2
    #: SIGTERM-to-SIGKILL grace when ending a task.
    grace_s: float = 5.0
    #: Least time between two of the reporter's transactions (updates gather meanwhile).
    flush_s: float = 0.1
    #: Pause between processing passes while there is work: larger batches, and the
    #: hot loop keeps the interpreter to itself in between.
    process_s: float = 0.1
    #: Most runnable tasks leased ahead of free slots, so a freed slot is refilled at
    #: once (0: lease only for free slots).  The launcher leases ahead what it starts
    #: in ``LEASE_AHEAD_S`` at its recent rate, at least ``MIN_AHEAD``.
    prefetch: int = 512
    #: Stop starting tasks this long before the allocation ends.
    margin_s: float = 5.0
    #: Stop (as on SIGTERM) once this file exists; checked every ``STOP_CHECK_S``.
    stop_file: str | None = None


@dataclass
class LauncherStats:
    started: int = 0
    finished: int = 0
    failed: int = 0
    timed_out: int = 0


class Launcher:
    """Runs tasks from a task source on a pool of nodes until told to stop."""

    def __init__(
        self,
        site: Site,
        options: LauncherOptions,
        *,
        source: TaskSource | None = None,
        packing: PackingStrategy | None = None,
        mpi: MpiLauncher | None = None,
        processing: bool = True,
        mode: str = "mpi",
    ) -> None:
        cfg = site.config
        self.site = site
        self.options = options
        self.source: TaskSource = source or site.selected("task_source")
        self.packing: PackingStrategy = packing or site.selected("packing_strategy")
        self.mpi: MpiLauncher = mpi or site.selected("mpi_launcher")
        self.mpi.check()
        self._processing = processing
        self.mode = mode
        self.worker: ProcessingWorker | None = None
        self.reporter: Reporter | None = None
        self.leaser: Leaser | None = None
        self.pool = NodePool(options.nodes)
        self.procs = ProcessGroup(grace_s=options.grace_s)
        self.queue: dict[int, LeasedTask] = {}
        self.stats = LauncherStats()
        self.launcher_id = 0
        self._stop = threading.Event()
        self._stop_reason = ""
        self._by_signal = False
        #: Exits held back for ``STOP_SIGNAL_HOLD_S``: (until when, the exit).
        self._held: list[tuple[float, Exited]] = []
        self._base_env = {k: v for k, v in os.environ.items() if k not in (TASK_ENV,)}
        self._base_env[SITE_ENV] = str(site.site_dir)
        data_dir = cfg.data_dir.resolve()
        self.workdirs = Workdirs(
            data_dir, allowed_roots(cfg.site_dir, data_dir, cfg.site.allowed_roots)
        )
        self._site_mpi_flags = tuple(cfg.launcher.mpi_flags)
        #: Epoch seconds until which this launcher's leases are certainly valid.
        self._lease_until = float("inf")
        #: How long before its leases may expire the launcher starts ending its tasks.
        self._lease_margin = min(options.grace_s, cfg.launcher.lease_s / 4)
        #: Seconds to the next database retry while it is unreachable (0: reachable).
        self._db_backoff = 0.0
        #: Tasks started per second lately, and (tasks started, time) when last measured.
        self._start_rate = 0.0
        self._rate_mark = (0, time.time())

    # ------------------------------------------------------------------ control

    def stop(self, reason: str, by_signal: bool = False) -> None:
        """Ask the loop to end (thread- and signal-safe); *by_signal*: the batch system
        (or a user) signalled the launcher, and likely every process of the job."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._by_signal = by_signal
            self._stop.set()
        self.procs.wake()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the run cleanly (running tasks -> RUN_TIMEOUT)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(
                sig, lambda s, _f: self.stop(f"received {signal.Signals(s).name}", by_signal=True)
            )

    # ------------------------------------------------------------------ main loop

    def run(self) -> LauncherStats:
        """Run until the allocation ends, the idle timeout passes, or :meth:`stop`."""
        with short_time_slice():  # woken by a task's exit, the loop gets a core at once
            return self._run()

    def _run(self) -> LauncherStats:
        self.launcher_id = self.source.register(
            LauncherInfo(
                host=socket.gethostname(), pid=os.getpid(), mode=self.mode,
                batch_job_id=self.options.batch_job_id, workflow=self.options.workflow,
                tags=dict(self.options.tags),
            )
        )
        log.info("launcher %d started on %d node(s)", self.launcher_id, len(self.options.nodes))
        self.procs.guard_orphans()  # before the first start
        heartbeat_s = self.site.config.launcher.heartbeat_s
        self._lease_until = time.time() + self.site.config.launcher.lease_s
        updates: list[StateUpdate] = []
        try:
            # The first tasks start before the rest is set up: they are what the
            # allocation waits for.  Then the worker is forked (before any thread starts).
            now = time.time()
            first = lease(self.source, self.launcher_id, self.pool.free(), self.pool.cpus)
            next_poll = self._leased(first, now)
            updates += self._start_placed(now)
            self._start_processor()
            reporter = self.reporter = self._reporter()
            leaser = self.leaser = Leaser(
                self.source, self.launcher_id, self.procs.wake, self.workdirs.prepare_ahead
            )
            # The first heartbeat and reclaim (of what dead launchers left behind) on the
            # loop's first turn, before the leaser's first lease: all take the write lock.
            next_heartbeat = next_reclaim = 0.0
            idle_since = time.time()
            while not self._stop.is_set():
                now = time.time()
                for error in (reporter.error, leaser.error):
                    if error is not None:
                        raise error
                for task_id in reporter.refused():
                    self.procs.end(task_id, "killed")
                for task_id in self.procs.overdue(now):
                    self.procs.end(task_id, "timeout")
                if now >= next_heartbeat:
                    next_heartbeat = now + (heartbeat_s if self._heartbeat() else self._db_backoff)
                if now >= next_reclaim:  # a batch per turn while there is more
                    next_reclaim = now + (0.0 if self._reclaim() else heartbeat_s)
                if (
                    self._lease_until != LOST and now >= self._lease_deadline()
                    and (len(self.procs) or self.queue)
                ):
                    self._lease_lost()  # until the next renewal: no leasing, no starts
                if self._out_of_time(now):
                    self.stop("allocation ends")
                    break
                if self.options.stop_file and os.path.exists(self.options.stop_file):
                    self.stop("stop requested")
                    break
                leased = leaser.take()
                if leased is not None:
                    next_poll = self._leased(leased, now)
                updates += self._start_placed(now)
                wants_lease = self._wants_lease(now)
                if wants_lease and now >= next_poll:
                    # After the starts: it leases for what is free.
                    leaser.request(*self._lease_request(now))
                reporter.add(updates, urgent=not len(self.procs))
                updates = []
                if (
                    len(self.procs) or self.queue or (self.worker and not self.worker.idle)
                    or self._db_backoff or self._held
                ):
                    idle_since = now  # busy, an exit to judge, or the database away
                elif self._idle_too_long(now, idle_since):
                    if self.worker is None and self._work_coming():
                        idle_since = now  # another launcher's worker is preparing tasks
                    else:
                        self.stop("idle timeout")
                        self._warn_unrunnable()
                        break
                wake_at = [next_heartbeat, next_reclaim]
                if (len(self.procs) or self.queue) and now < self._lease_deadline():
                    wake_at.append(self._lease_deadline())
                if wants_lease and not leaser.busy:  # else woken by the lease's result
                    wake_at.append(next_poll)
                if self.options.end_time is not None:
                    wake_at.append(self._deadline())
                if self.options.stop_file:
                    wake_at.append(now + STOP_CHECK_S)
                if self._held:
                    wake_at.append(self._held[0][0])
                updates += self._collect(self.procs.wait(max(0.0, min(wake_at) - time.time())))
                if self._held:
                    updates += self._judge_held(time.time())
                if self.worker is not None and self.procs.readable(self.worker.fileno()):
                    if self.worker.read():
                        next_poll = 0.0  # the worker made tasks runnable: lease them now
                    if self.worker.ended:
                        log.error("launcher %d: its processing worker ended", self.launcher_id)
                        self.procs.unwatch(self.worker.fileno())
        finally:
            self._shutdown(updates)
        return self.stats

    # ------------------------------------------------------------------ steps

    def _wants_lease(self, now: float) -> bool:
        """Should the queue be topped up?  With ``prefetch``, once it holds fewer tasks
        than the free CPU slots plus half the tasks to lease ahead (busy nodes or not:
        the lease is ahead of need); without, only while there is free room."""
        if now >= self._lease_deadline():
            return False
        if self.options.prefetch:
            return len(self.queue) < self.pool.free_cpus + self._ahead(now) // 2
        return len(self.queue) < self.pool.free_cpus

    def _ahead(self, now: float) -> int:
        """Tasks to lease beyond the free slots: what the loop starts in
        ``LEASE_AHEAD_S`` at its recent rate, between ``MIN_AHEAD`` and ``prefetch``."""
        started, since = self._rate_mark
        if now - since >= RATE_WINDOW_S:
            self._start_rate = (self.stats.started - started) / (now - since)
            self._rate_mark = (self.stats.started, now)
        wanted = max(MIN_AHEAD, int(self._start_rate * LEASE_AHEAD_S))
        return min(self.options.prefetch, wanted)

    def _lease_request(self, now: float) -> tuple[list[NodeResources], int]:
        """What to lease: (free room, most tasks) -- tasks that fit the free room, and
        tasks to start next (:meth:`_ahead`)."""
        free = self.pool.free()
        prefetch = self._ahead(now) if self.options.prefetch else 0
        if prefetch:
            # Room for `prefetch` tasks ahead, in whole copies of the allocation's nodes:
            # the source only leases what fits, and freed slots refill without a lease.
            free += self.pool.idle * -(-prefetch // self.pool.cpus)
        return free, self.pool.free_cpus + prefetch - len(self.queue)

    def _leased(self, result: LeaseResult, now: float) -> float:
        """Queue what a lease brought; return when to lease next."""
        if result.error is not None:
            self._db_failed("leasing tasks", result.error)
            return now + self._db_backoff
        self._db_ok()
        for task in result.tasks:
            self.queue[task.task_id] = task
        return now if result.tasks else now + self.options.poll_s

    def _start_placed(self, now: float) -> list[StateUpdate]:
        if not self.queue or not self.pool.has_room():
            return []
        # The packer sees the head of the queue (oldest first): a task further back moves
        # up as those ahead start.  The whole queue, on every start, cost O(tasks leased
        # ahead) per start.
        window = max(MIN_PACKING_WINDOW, 4 * self.pool.free_cpus)
        head = list(itertools.islice(self.queue.values(), window))
        if self.options.end_time is not None:
            head = self._finishable(head, now)
        ready = [t.requirements for t in head]
        updates = []
        for placement in self.packing.place(ready, self.pool.free(), now):
            task = self.queue.pop(placement.task_id)
            self.pool.take(placement, task.requirements)
            updates += self._start(task, placement.nodes, placement.gpu_ids)
        return updates

    def _start(
        self, task: LeasedTask, nodes: tuple[str, ...], gpu_ids: tuple[tuple[int, ...], ...]
    ) -> list[StateUpdate]:
        req = task.requirements
        env = {**self._base_env, **task.env, TASK_ENV: str(task.task_id)}
        spec = LaunchSpec(
            task_id=task.task_id, argv=task.argv, nodes=nodes,
            ranks_per_node=req.ranks_per_node, threads_per_rank=req.threads_per_rank,
            gpus_per_rank=req.gpus_per_rank, gpu_ids=gpu_ids, env=env,
            mpi_flags=(*self._site_mpi_flags, *task.mpi_flags),
            export=(*task.env, TASK_ENV, SITE_ENV),
        )
        try:
            workdir = self.workdirs.prepare(task.workdir)
            command = self.mpi.command(spec)
            wall = req.wall_time_min * 60 if req.wall_time_min > 0 else None
            self.procs.start(task.task_id, command.argv, command.env, workdir, wall)
        except (OSError, ValueError, BalsamError) as exc:  # ValueError: a NUL byte
            self.pool.release(task.task_id)
            reason = (
                f"executable not found: {exc.filename}"
                if isinstance(exc, FileNotFoundError) and exc.filename
                else f"could not start: {exc}"
            )
            self.stats.failed += 1
            now = time.time()
            return [
                StateUpdate(task.task_id, State.RUNNING, f"starting on {','.join(nodes)}", time=now),
                StateUpdate(task.task_id, State.RUN_ERROR, reason, time=now),
            ]
        self.stats.started += 1
        return [
            StateUpdate(
                task.task_id, State.RUNNING, f"started on {','.join(nodes)}", time=time.time()
            )
        ]

    def _collect(self, exited: Sequence[Exited]) -> list[StateUpdate]:
        """The state updates for task processes that ended (their slots are free again);
        one killed by a stop signal while the launcher runs on is held back a moment
        (``STOP_SIGNAL_HOLD_S``, :meth:`_judge_held`)."""
        updates = []
        for e in exited:
            self.pool.release(e.task_id)
            ending = e.ending
            if ending is None and -e.return_code in STOP_SIGNALS:
                if not self._stop.is_set():
                    self._held.append((time.time() + STOP_SIGNAL_HOLD_S, e))
                    continue
                ending = "shutdown"  # died of the stop the launcher is handling
            elif ending is None and self._by_signal:
                # The batch system signals every process of the job at once: the task died
                # of the same stop the launcher is handling, before it could end the task
                # -- or, an MPI launcher, forwarded the signal to its ranks and exited with
                # any code, 0 included (mpiexec.hydra at a Slurm time limit).
                ending = "shutdown"
            updates += self._ended(e, ending)
        return updates

    def _judge_held(self, now: float) -> list[StateUpdate]:
        """The updates for held exits: once the launcher stops, they died of that stop
        (as exits collected after it: a signal to the job, or the stop file ``balsam
        launcher`` makes of one for its serial agents); when their wait is over without
        a stop, of someone else's signal (judged by their code)."""
        if self._stop.is_set():
            held, self._held = self._held, []
            return [u for _, e in held for u in self._ended(e, "shutdown")]
        if not self._held or now < self._held[0][0]:
            return []
        over = [e for until, e in self._held if until <= now]
        self._held = [(until, e) for until, e in self._held if until > now]
        return [u for e in over for u in self._ended(e, None)]

    def _ended(self, e: Exited, ending: str | None) -> list[StateUpdate]:
        """The update recording *e*'s end; *ending*: why the launcher ended it, if it did."""
        seconds = f"{e.ended - e.started:.3f} s"
        if ending == "killed":
            return []  # already USER_KILLED; nothing to report
        if ending in ("timeout", "shutdown", "lease lost"):
            why = {
                "timeout": "wall time exceeded",
                "lease lost": f"launcher {self.launcher_id} could not renew its lease "
                "(database unreachable)",
            }.get(ending, self._stop_reason)
            self.stats.timed_out += 1
            return [
                StateUpdate(
                    e.task_id, State.RUN_TIMEOUT, f"{why} after {seconds}", e.return_code,
                    e.ended,
                )
            ]
        if e.return_code == 0:
            self.stats.finished += 1
            return [StateUpdate(e.task_id, State.RUN_DONE, f"exit 0 after {seconds}", 0, e.ended)]
        self.stats.failed += 1
        how = (
            f"killed by signal {signal.Signals(-e.return_code).name}"
            if e.return_code < 0 and -e.return_code in signal.valid_signals()
            else f"exit code {e.return_code}"
        )
        full = disk_full(e.workdir)
        return [
            StateUpdate(
                e.task_id, State.RUN_ERROR,
                f"{how} after {seconds}" + (f"; {full}" if full else ""), e.return_code, e.ended,
            )
        ]

    def _heartbeat(self) -> bool:
        """Renew the leases and end tasks killed meanwhile; False if the database could
        not be reached."""
        started = time.time()
        try:
            killed = self.source.heartbeat(self.launcher_id)
            self._lease_until = started + self.site.config.launcher.lease_s
        except DatabaseError as exc:
            self._db_failed("renewing leases", exc)
            return False
        self._db_ok()
        for task_id in killed:
            if task_id in self.procs:
                self.procs.end(task_id, "killed")
            self.queue.pop(task_id, None)
        return True

    def _reclaim(self) -> bool:
        """Reclaim a batch of the tasks of lost launchers and of leases that ran out;
        True if it reclaimed some (there may be more)."""
        try:
            reclaimed = self.source.expire_leases(time.time())
        except DatabaseError as exc:
            self._db_failed("reclaiming expired leases", exc)
            return False
        if reclaimed:
            log.warning("reclaimed %d task(s) of launchers whose lease expired", reclaimed)
        return reclaimed > 0

    # ------------------------------------------------------------------ database faults

    def _db_failed(self, doing: str, exc: DatabaseError) -> None:
        """Note that the database is unreachable; the next retry backs off (to 2 s)."""
        first = not self._db_backoff
        self._db_backoff = min(max(self._db_backoff * 2, 0.1), DB_RETRY_MAX_S)
        if first:
            log.warning(
                "launcher %d: %s: %s; tasks keep running, retrying (leases valid for %.0f s)",
                self.launcher_id, doing, exc, max(0.0, self._lease_until - time.time()),
            )

    def _db_ok(self) -> None:
        if self._db_backoff:
            log.warning("launcher %d: database reachable again", self.launcher_id)
        self._db_backoff = 0.0

    def _lease_deadline(self) -> float:
        return self._lease_until - self._lease_margin

    def _lease_lost(self) -> None:
        """The leases were not renewed in time: another launcher may reclaim the tasks
        at any moment, so they end now (RUN_TIMEOUT, reported once the database is
        back; refused if they were reclaimed first) and the leased-ahead ones go back."""
        log.error(
            "launcher %d could not renew its leases for %.0f s: ending %d running task(s)",
            self.launcher_id, time.time() - self._lease_until + self.site.config.launcher.lease_s,
            len(self.procs.ids()),
        )
        for task_id in self.procs.ids():
            self.procs.end(task_id, "lease lost", grace_s=self._lease_margin / 2)
        self.queue.clear()
        self._lease_until = LOST  # until a heartbeat renews the leases

    # ------------------------------------------------------------------ time

    def _deadline(self) -> float:
        assert self.options.end_time is not None
        return self.options.end_time - self.options.margin_s

    def _out_of_time(self, now: float) -> bool:
        return self.options.end_time is not None and now >= self._deadline()

    def _finishable(self, tasks: list[LeasedTask], now: float) -> list[LeasedTask]:
        """The *tasks* that can finish before the allocation ends; the others leave the
        queue (never started: their leases go back at shutdown)."""
        left_min = (self._deadline() - now) / 60
        finishable = []
        for task in tasks:
            if task.requirements.wall_time_min > left_min:
                del self.queue[task.task_id]
            else:
                finishable.append(task)
        return finishable

    def _work_coming(self) -> bool:
        """Are tasks this launcher could run being prepared (stage-in, preprocess)?"""
        with self.site.db.session() as s:
            for where, index in work_before_run():
                query = filter_tasks(
                    select(Task.id).where(where, Task.num_nodes <= len(self.options.nodes)),
                    workflow=self.options.workflow, tags=dict(self.options.tags) or None,
                )
                if s.scalars(indexed_by(query, index).limit(1)).first() is not None:
                    return True
        return False

    def _warn_unrunnable(self) -> None:
        """Say which runnable tasks were left because they never fit this allocation."""
        query = filter_tasks(
            select(Task).outerjoin(App, App.id == Task.app_id),
            workflow=self.options.workflow, tags=dict(self.options.tags) or None,
        ).where(
            Task.lease_launcher_id.is_(None), leasable()
        )
        with self.site.db.session() as s:
            left = list(s.scalars(query.order_by(Task.id).limit(3)))
        if left:
            biggest = max(self.options.nodes, key=lambda n: n.cpus)
            examples = "; ".join(
                f"task {t.id}: {t.num_nodes} node(s) x {t.ranks_per_node * t.threads_per_rank}"
                f" CPUs x {t.ranks_per_node * t.gpus_per_rank} GPUs" for t in left
            )
            log.warning(
                "runnable tasks left that do not fit this allocation (%d node(s), at most %d "
                "CPUs and %d GPUs per node): %s", len(self.options.nodes), biggest.cpus,
                len(biggest.gpu_ids), examples,
            )

    def _idle_too_long(self, now: float, idle_since: float) -> bool:
        limit = self.options.idle_timeout_s
        return limit is not None and now - idle_since >= limit

    # ------------------------------------------------------------------ processing thread

    @property
    def stop_reason(self) -> str:
        return self._stop_reason

    def _start_processor(self) -> None:
        if self._processing:
            self.worker = ProcessingWorker(
                str(self.site.site_dir), self.launcher_id, self.options.workflow,
                self.options.tags, self.options.process_s, self.options.poll_s,
            )
            self.procs.watch(self.worker.fileno())

    def _reporter(self) -> Reporter:
        return Reporter(self.source, self.launcher_id, self.procs.wake, self.options.flush_s)

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self, pending: list[StateUpdate]) -> None:
        """Running tasks -> RUN_TIMEOUT, processing stopped, updates written, leases released."""
        if not self._stop_reason:
            self._stop_reason = "launcher stopped"
        self._stop.set()
        exited = self.procs.end_all("shutdown", timeout=self.options.grace_s)
        try:
            if self.worker is not None:
                self.worker.stop()  # ends pre/post steps still running, before leases go
            if self.leaser is not None:
                self.leaser.close(timeout=self.options.grace_s)
            reporter = self.reporter or self._reporter()  # None: the start failed
            reporter.add([*pending, *self._judge_held(time.time()), *self._collect(exited)])
            reporter.close(timeout=self.site.config.launcher.lease_s)
            try:
                self.source.release(self.launcher_id)
            except DatabaseError as exc:
                log.warning(
                    "launcher %d could not release its leases (%s): they expire in %.0f s",
                    self.launcher_id, exc, self.site.config.launcher.lease_s,
                )
        finally:
            self.procs.close()
        log.info("launcher %d stopped: %s", self.launcher_id, self._stop_reason)

