""":class:`TransitionProcessor`: the pass, claiming (with fast-forward) and recording.

One pass:

1. **Harvest**: steps that finished in the thread pool since the last pass are recorded
   (their transitions and the lease release in one transaction).
2. **Claim**, in one write transaction (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite's
   ``BEGIN IMMEDIATE``): tasks in READY, STAGED_IN, RUN_DONE, POSTPROCESSED, RUN_ERROR,
   RUN_TIMEOUT (matching the workflow / tag filters) whose lease is free, expired or ours.
   Tasks with nothing to do are **fast-forwarded in that same transaction**
   (:mod:`balsam_core.fastforward`; the DAG rules run in the same ``apply``) -- except,
   with ``forward_ready=False`` (a launcher's worker), READY and STAGED_IN ones: the
   task source leases those directly and records their skipped steps itself.  They
   never hold a lease: the row locks of the transaction are the claim.  The others are
   leased to ``owner_id`` for ``[launcher] lease_s``.  Work tasks are claimed only up to
   ``max_inflight`` minus what is already in flight, so one processor never hoards work
   that other launchers' processors could do.
3. **Recovery** for RUN_ERROR / RUN_TIMEOUT (outside any transaction, then one write):
   :func:`~balsam_core.recovery.decide_chain` on a :class:`TaskFailure` (stderr tail =
   last 4 KB of ``<workdir>/stderr``).  RETRY -> RESTART_READY and RESTART -> READY
   (``num_retries + 1``), FAIL -> FAILED with the decision's message, HANDLE -> the app's
   postprocess runs in the pool with ``BALSAM_TASK_ERROR=1`` / ``BALSAM_TASK_TIMEOUT=1``
   and sets the next state itself through the API; a task still in RUN_ERROR /
   RUN_TIMEOUT after its handler returns is FAILED.
4. **Work** (stage-in, preprocess, postprocess, stage-out) is submitted to a small thread
   pool and recorded by a later pass (or by this one with ``wait=True``).

Design choices:

* **Only the lease holder writes.**  Results are recorded only for tasks still leased
  to ``owner_id`` and still in the state the work started from; a task killed or
  reclaimed meanwhile keeps its state and the result is dropped.
* **Errors.**  Any exception while working on one task FAILs that task with a one-line
  message; database errors propagate (the caller retries: the launcher's worker loop
  does), and results not yet recorded are kept for the next pass.

``owner_id`` must be a row of the ``launcher`` table (the lease column is a foreign key);
inside a launcher it is the launcher's id, so the launcher's release frees the
processor's leases, and the launcher's loss (no heartbeat for ``lease_s``) reclaims
them.  Unlike the launcher's own leases, a claim has a time of its own, which the
processor renews every ``lease_s / 3``: a worker that died inside a live launcher loses
its claims.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, not_, or_, select, union_all, update

from ..api import TASK_ENV, Site, filter_tasks
from ..db import indexed_by
from ..fastforward import nothing_to_do_in, skip, work_before_run
from ..models import App, Task
from ..plugin_types import RecoveryPolicy
from ..site import SITE_ENV
from ..states import State
from ..transitions import Change, chunks
from .items import _FORWARD, _RECOVER, S, _exc, _Item, _one_line, _Outcome, _StepFailed
from .queries import _held, _item, _parent_dirs, _set_lease
from .recovery import _Recovery, site_policies
from .staging import _Staging, allowed_roots
from .steps import ERROR_ENV, TIMEOUT_ENV, _kill_group, _Steps

log = logging.getLogger(__name__)

#: What a claim reads of each task.
_CLAIM_COLUMNS = (
    Task.id, Task.name, Task.workflow, Task.workdir, Task.state, Task.state_time,
    Task.return_code, Task.num_retries, Task.max_retries, Task.post_error_handler,
    Task.post_timeout_handler, Task.auto_timeout_retry, Task.input_files, Task.stage_in,
    Task.stage_out, Task.environment, Task.lease_launcher_id, Task.lease_expires,
    App.preprocess, App.postprocess, App.environment.label("app_environment"),
)


class TransitionProcessor(_Recovery, _Steps, _Staging):
    """Moves tasks through stage-in, pre/postprocess, stage-out and recovery (see module doc).

    *policies* is the recovery chain (None: the site's own, see :func:`site_policies`).
    *owner_id* is the ``launcher`` row leases are taken for; it may be set after
    construction, before the first pass.
    """

    def __init__(
        self,
        site: Site,
        policies: Sequence[RecoveryPolicy] | None,
        owner_id: int,
        *,
        workflow: str | None = None,
        tags: Mapping[str, str] | None = None,
        batch: int = 500,
        workers: int = 4,
        max_inflight: int | None = None,
        step_timeout_s: float = 600.0,
        forward_ready: bool = True,
    ) -> None:
        if batch < 1 or workers < 1:
            raise ValueError("batch and workers must be >= 1")
        self.site = site
        self.owner_id = owner_id
        self.workflow = workflow
        self.tags = dict(tags or {})
        self.batch = batch
        self.workers = workers
        self.max_inflight = max_inflight if max_inflight is not None else 4 * workers
        self.step_timeout_s = step_timeout_s
        #: States whose tasks with nothing to do this processor fast-forwards.
        self._forwarded = [
            s.value for s in _FORWARD if forward_ready or s not in (S.READY, S.STAGED_IN)
        ]
        config = site.config
        self.lease_s = config.launcher.lease_s
        self.data_dir = config.data_dir.resolve()
        self.roots = allowed_roots(config.site_dir, self.data_dir, config.site.allowed_roots)
        self.policies: list[RecoveryPolicy] = (
            site_policies(site) if policies is None else list(policies)
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: dict[int, concurrent.futures.Future[_Outcome]] = {}
        #: The state each in-flight task was in when its work started.
        self._started_in: dict[int, State] = {}
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._procs_lock = threading.Lock()
        self._closed = False
        #: Nothing found last pass: the next looks first (a cheap read, and no claim
        #: statements to compile in a process that may never need them).
        self._idle = True
        self._next_renew = 0.0
        base = {k: v for k, v in os.environ.items() if k not in (TASK_ENV, ERROR_ENV, TIMEOUT_ENV)}
        base[SITE_ENV] = str(config.site_dir)
        self._base_env = base
        self._build_queries()

    def __enter__(self) -> TransitionProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def inflight(self) -> int:
        """Tasks whose work is submitted but not yet recorded."""
        return len(self._inflight)

    # ------------------------------------------------------------------ the pass

    def process_once(self, now: float | None = None, *, wait: bool = False) -> int:
        """One pass (see the module docstring); return how many tasks changed state.

        The count includes tasks made READY (or failed) by the DAG rules.  With *wait*,
        the pass also waits for every step in flight and records it.
        """
        if self._closed:
            raise RuntimeError("TransitionProcessor is closed")
        virtual = now
        now = time.time() if now is None else now
        moved: set[int] = set()
        moved |= self._harvest(now)
        self._renew(now)
        recover, work, parents = self._claim(now, moved)
        handlers = self._recover(recover, now, moved)
        for item, kind in handlers:
            self._submit(item.id, self._handle, item, kind)
        for item in work:
            self._submit(item.id, self._work, item, parents.get(item.id, []))
        if wait and self._inflight:
            concurrent.futures.wait(list(self._inflight.values()))
            moved |= self._harvest(time.time() if virtual is None else virtual)
        return len(moved)

    def close(self) -> None:
        """Kill running pre/post steps and stop the pool; unrecorded work is dropped
        (its leases expire or are released by the launcher, and another pass redoes it)."""
        with self._procs_lock:
            self._closed = True  # no step starts after this
            procs = list(self._procs)
        for proc in procs:
            _kill_group(proc)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._inflight.clear()
        self._started_in.clear()

    # ------------------------------------------------------------------ claim

    def _build_queries(self) -> None:
        """The claim's statements, built once (parameters: now, inflight, limit): a pass
        on an idle site then costs one cheap read."""
        claimable = and_(
            or_(
                and_(Task.lease_launcher_id.is_(None), Task.lease_expires.is_(None)),
                Task.lease_expires < bindparam("now"),
                Task.lease_launcher_id == self.owner_id,
            ),
            Task.id.not_in(bindparam("inflight", expanding=True)),
        )
        # One query per state and kind of step, each answered by an index in time
        # independent of the backlog: with ``state = ?`` the (state, id) index yields
        # rows oldest first, so a claim reads about ``limit`` rows of each (one query
        # over several states read and sorted all their rows: with 100,000 READY tasks
        # every pass cost ~0.1 s).  Steps recorded in bulk: fast-forwards, recovery.
        in_bulk = [nothing_to_do_in(State(s)) for s in self._forwarded]
        in_bulk += [Task.state == s.value for s in _RECOVER]
        # Steps needing work: after the run, and before it (work_before_run: the many
        # READY tasks with nothing to do -- which a launcher's task source
        # fast-forwards as it leases them -- are never read).
        with_work: list[tuple[Any, str | None]] = [
            (and_(Task.state == s.value, not_(nothing_to_do_in(s))), None)
            for s in (S.RUN_DONE, S.POSTPROCESSED)
        ]
        with_work += work_before_run()
        kinds = [*((where, None) for where in in_bulk), *with_work]
        # A probe for any of them reads at most one row of each kind.
        firsts = [
            self._query(claimable, where, index, limit=1, columns=(Task.id,)).subquery()
            for where, index in kinds
        ]
        self._probe = union_all(*(select(first.c.id) for first in firsts))
        self._claim_bulk = [
            self._query(claimable, where, None, limit=bindparam("limit")) for where in in_bulk
        ]
        self._claim_work = [
            self._query(claimable, where, index, limit=bindparam("limit"))
            for where, index in with_work
        ]

    def _query(
        self, claimable: Any, where: Any, index: str | None, *, limit: Any,
        columns: tuple[Any, ...] = _CLAIM_COLUMNS,
    ) -> Any:
        """Rows matching *where* and this processor's filters, oldest first; through
        *index* on SQLite (see ``work_before_run``)."""
        query = (
            select(*columns)
            .select_from(Task)
            .outerjoin(App, App.id == Task.app_id)
            .where(claimable, where)
            .order_by(Task.id)
            .limit(limit)
        )
        if index is not None:
            query = indexed_by(query, index)
        return filter_tasks(query, workflow=self.workflow, tags=self.tags)

    def _claim(
        self, now: float, moved: set[int]
    ) -> tuple[list[_Item], list[_Item], dict[int, list[tuple[int, str]]]]:
        """Claim tasks; fast-forward the trivial ones in the same transaction.

        Returns the tasks for recovery, the tasks needing work, and the parents' working
        directories of those with input_files.
        """
        params = {"now": now, "inflight": list(self._inflight)}
        if self._idle:
            # Nothing last time: look before taking SQLite's database-wide write lock.
            with self.site.db.session() as s:
                if s.execute(self._probe, params).first() is None:
                    return [], [], {}
        room = max(0, self.max_inflight - len(self._inflight))
        with self.site.transaction() as tx:
            pg = tx.session.get_bind().dialect.name == "postgresql"

            def claim(query: Any, limit: int) -> list[_Item]:
                if pg:
                    query = query.with_for_update(skip_locked=True, of=Task)
                rows = tx.session.execute(query, {**params, "limit": limit})
                return [_item(row) for row in rows]

            def oldest(queries: list[Any], limit: int) -> list[_Item]:
                found = {i.id: i for q in queries for i in claim(q, limit)} if limit else {}
                return [found[i] for i in sorted(found)[:limit]]

            items = oldest(self._claim_bulk, self.batch) + oldest(self._claim_work, room)
            self._idle = not items
            if not items:
                return [], [], {}
            changes: list[Change] = []
            trivial_leased: list[int] = []
            recover: list[_Item] = []
            work: list[_Item] = []
            new_dirs: list[Path] = []
            for item in items:
                if item.state in _RECOVER:
                    recover.append(item)
                elif item.trivial():
                    changes += skip(item.id, item.state)
                    if item.leased:
                        trivial_leased.append(item.id)
                    if item.state is S.READY:
                        new_dirs.append(self.data_dir / item.workdir)
                elif len(work) < room:
                    work.append(item)
            if changes:
                # Stamped now, not at the pass's start: a task created (or spawned) while
                # this pass was reading must not get events older than its creation.
                tx.apply(changes, launcher_id=self.owner_id, now=time.time())
            _set_lease(tx.session, trivial_leased, None, None)
            _set_lease(
                tx.session, [i.id for i in (*recover, *work)], self.owner_id, now + self.lease_s
            )
            want_parents = [i.id for i in work if i.state is S.READY and i.input_files]
            parents = _parent_dirs(tx.session, want_parents) if want_parents else {}
        moved |= {e.task_id for e in tx.events}
        for directory in new_dirs:  # here rather than in the launcher's hot loop
            directory.mkdir(parents=True, exist_ok=True)
        return recover, work, parents

    # ------------------------------------------------------------------ harvest

    def _submit(self, task_id: int, fn: Any, *args: Any) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="balsam-processing"
            )
        self._inflight[task_id] = self._pool.submit(fn, *args)
        self._started_in[task_id] = args[0].state

    def _harvest(self, now: float) -> set[int]:
        """Record the pool jobs that finished; return the tasks that changed state."""
        done = {i: f for i, f in self._inflight.items() if f.done()}
        if not done:
            return set()
        outcomes: list[_Outcome] = []
        for task_id, future in done.items():
            try:
                outcomes.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - pool wrappers catch; this is a safety net
                state = self._started_in[task_id]
                outcomes.append(_Outcome(task_id, state, [(S.FAILED, _one_line(_exc(exc)))]))
        with self.site.transaction() as tx:
            held = _held(tx.session, [o.task_id for o in outcomes], self.owner_id)
            changes: list[Change] = []
            handled: set[int] = set()
            for out in outcomes:
                state = held.get(out.task_id)
                if state is None:
                    log.info("task %d: lease lost while processing; result dropped", out.task_id)
                    continue
                if out.handler_note is not None:
                    if state in _RECOVER:
                        changes.append(Change(out.task_id, S.FAILED, out.handler_note))
                    elif state is not out.from_state:
                        handled.add(out.task_id)
                elif state is out.from_state:
                    changes += [Change(out.task_id, st, msg) for st, msg in out.steps]
            tx.apply(changes, launcher_id=self.owner_id, now=now)
            _set_lease(tx.session, list(held), None, None)
        for task_id in done:
            del self._inflight[task_id]
            del self._started_in[task_id]
        return {e.task_id for e in tx.events} | handled

    def _renew(self, now: float) -> None:
        if not self._inflight or now < self._next_renew:
            return
        self._next_renew = now + self.lease_s / 3
        with self.site.db.session(write=True) as s:
            for part in chunks(list(self._inflight)):
                s.execute(
                    update(Task)
                    .where(Task.id.in_(part), Task.lease_launcher_id == self.owner_id)
                    .values(lease_expires=now + self.lease_s)
                    .execution_options(synchronize_session=False)
                )

    # ------------------------------------------------------------------ work (pool threads)

    def _work(self, item: _Item, parents: list[tuple[int, str]]) -> _Outcome:
        out = _Outcome(item.id, item.state)
        step = "setup"
        try:
            workdir = self._workdir(item)
            if item.state is S.READY:
                step = "stage-in"
                count = self._stage_in(item, workdir, parents)
                what = f"staged in {count} file(s)" if count else "nothing to stage in"
                out.steps.append((S.STAGED_IN, what))
            if item.state in (S.READY, S.STAGED_IN):
                step = "preprocess"
                if item.preprocess:
                    self._run_step("preprocess", item.preprocess, item, workdir, {})
                    out.steps.append((S.PREPROCESSED, "preprocess done"))
                else:
                    out.steps.append((S.PREPROCESSED, "no preprocess step"))
            if item.state is S.RUN_DONE:
                step = "postprocess"
                if item.postprocess:
                    self._run_step("postprocess", item.postprocess, item, workdir, {})
                    out.steps.append((S.POSTPROCESSED, "postprocess done"))
                else:
                    out.steps.append((S.POSTPROCESSED, "no postprocess step"))
            if item.state in (S.RUN_DONE, S.POSTPROCESSED):
                step = "stage-out"
                count = self._stage_out(item, workdir)
                what = f"staged out {count} file(s)" if count else "nothing to stage out"
                out.steps.append((S.JOB_FINISHED, what))
        except _StepFailed as exc:
            out.steps.append((S.FAILED, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the pass
            log.exception("task %d: %s", item.id, step)
            out.steps.append((S.FAILED, _one_line(f"{step} failed: {_exc(exc)}")))
        return out
