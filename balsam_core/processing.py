"""Pre/post-processing, stage-in/out and error recovery, outside the launcher's hot loop.

DESIGN §6: a :class:`TransitionProcessor` moves tasks through the states around a run —
READY -> STAGED_IN -> PREPROCESSED before it, RUN_DONE -> POSTPROCESSED -> JOB_FINISHED
after it, and RUN_ERROR / RUN_TIMEOUT through the recovery chain — so that the launcher
only ever starts, watches and reports processes.  The launcher calls
:meth:`TransitionProcessor.process_once` from a worker thread in a loop; tests and
``balsam`` commands call it directly::

    proc = TransitionProcessor(site, None, owner_id=launcher_id)   # None: the site's chain
    while proc.process_once(wait=True):
        pass
    proc.close()

One pass:

1. **Harvest**: steps that finished in the thread pool since the last pass are recorded
   (their transitions and the lease release in one transaction).
2. **Claim**, in one write transaction (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite's
   ``BEGIN IMMEDIATE``): tasks in READY, STAGED_IN, RUN_DONE, POSTPROCESSED, RUN_ERROR,
   RUN_TIMEOUT (matching the workflow / tag filters) whose lease is free, expired or ours.
   Tasks with nothing to do are **fast-forwarded in that same transaction**
   (READY -> STAGED_IN -> PREPROCESSED when there are no input_files, no stage_in and no
   preprocess step; RUN_DONE -> POSTPROCESSED -> JOB_FINISHED when there is no
   postprocess step and no stage_out; the DAG rules run in the same ``apply``).  They
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

* **Copy, never link.**  input_files, stage_in and stage_out copy (``shutil.copy2``;
  directories with ``copytree(symlinks=True)``, which copies links as links and never
  follows them).  A hard link would let a child overwrite its parent's output in place;
  a symlink breaks when the source is cleaned up and hides what a task actually read.
* **input_files** are globs relative to each parent's working directory; matches go to
  the child's working directory under their base name.  When several parents provide
  the same name, the lowest parent id keeps it and the others get ``<name>_<parent id>``
  (as Balsam always did).  A pattern that matches nothing is not an error.
* **stage_in** entries are a path, a ``file://`` URL, or ``{"src": ..., "dst": ...}``
  (``dst`` relative to the working directory; a trailing ``/`` or an existing directory
  means "into it"; default: the source's base name).  Relative sources are relative to
  the site's ``data/``.  **stage_out** entries are ``{"src": glob relative to the working
  directory, "dst": path or file:// URL}``; ``dst`` is a directory when it ends in ``/``,
  already is one, or ``src`` is a glob; a ``src`` that matches nothing fails the task.
* **Allowed roots.**  Every file read or written outside the task's working directory
  must lie, both as written (``..`` collapsed) and with every symlink resolved, inside the
  site's ``data/`` or one of ``[site] allowed_roots`` (relative roots are relative to
  the site directory).  The rest of the site directory — ``balsam.toml``, the database —
  is not readable this way.  Anything else fails the task with a message naming the
  path and the allowed roots.  (Checks happen just before each copy; this guards
  against mistakes and hostile task specs, not against a concurrent attacker swapping
  symlinks.)
* **Retry delay.**  A RETRY / RESTART with ``delay_s > 0`` is due at
  ``state_time + delay_s``, i.e. measured from when the task failed.  Until then the
  task stays in RUN_ERROR / RUN_TIMEOUT with ``lease_launcher_id = NULL`` and
  ``lease_expires = <due time>``: no processor claims it (the claim wants a lease that
  is free or expired), and nothing else in Balsam touches it (launchers lease only
  runnable states; heartbeats, releases and lease expiry only look at leases with a
  launcher id).  When claimed again the chain is asked again — policies are pure, so it
  answers the same — and now the delay has passed.
* **Per-task max_retries.**  A task's ``max_retries`` travels in its
  :class:`TaskFailure`; the built-in policies use it instead of ``[recovery]
  max_retries`` (above or below it).  A third-party policy that ignores it is still
  capped: past the task's limit a RETRY / RESTART becomes FAIL.
* **Pre/postprocess** are the app's argv lists (no templating, never a shell), run in
  the working directory with ``os.environ`` + app environment + task environment +
  ``BALSAM_TASK_ID`` + ``BALSAM_SITE``, stdout and stderr appended to
  ``preprocess.log`` / ``postprocess.log``, in their own session, killed (whole process
  group) after ``step_timeout_s``.  The app's ``envscript`` is not sourced here (nor by
  the launcher).  Literal-command tasks have no app, hence no pre/post steps.
* **Only the lease holder writes.**  Results are recorded only for tasks still leased
  to ``owner_id`` and still in the state the work started from; a task killed or
  reclaimed meanwhile keeps its state and the result is dropped.
* **Errors.**  Any exception while working on one task FAILs that task with a one-line
  message; database errors propagate (the caller retries: the launcher's worker loop
  does), and results not yet recorded are kept for the next pass.

``owner_id`` must be a row of the ``launcher`` table (the lease column is a foreign key);
inside a launcher it is the launcher's id, so its heartbeat also renews the processor's
leases and its release frees them.  The processor renews its in-flight leases itself
too, every ``lease_s / 3``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import posixpath
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sqlalchemy import Text, and_, bindparam, not_, or_, select, type_coerce, update

from .api import TASK_ENV, Site
from .models import App, Task, TaskDependency
from .plugin_types import RecoveryAction, RecoveryDecision, RecoveryPolicy, TaskFailure
from .recovery import decide_chain
from .site import SITE_ENV
from .states import State
from .transitions import Change, chunks

__all__ = [
    "ERROR_ENV",
    "TIMEOUT_ENV",
    "TransitionProcessor",
    "site_policies",
]

log = logging.getLogger(__name__)

S = State
ERROR_ENV = "BALSAM_TASK_ERROR"
TIMEOUT_ENV = "BALSAM_TASK_TIMEOUT"
#: Bytes of ``<workdir>/stderr`` a recovery policy sees.
STDERR_TAIL_BYTES = 4096
#: Lines of a pre/postprocess log quoted when the step fails.
LOG_TAIL_LINES = 10

#: States worked on before a run and after a successful one.
_FORWARD = (S.READY, S.STAGED_IN, S.RUN_DONE, S.POSTPROCESSED)
#: States handed to the recovery chain.
_RECOVER = (S.RUN_ERROR, S.RUN_TIMEOUT)


def site_policies(site: Site) -> list[RecoveryPolicy]:
    """The recovery chain of *site* (``[recovery] chain``), in order."""
    config = site.config
    return [site.plugins.create("recovery_policy", n, config) for n in config.recovery.chain]


class _StepFailed(Exception):
    """A step failed in a way the user can act on; the message becomes the FAILED event's."""


@dataclass(frozen=True)
class _Item:
    """What the processor needs of one claimed task (plain data, safe across threads)."""

    id: int
    state: State
    state_time: float
    workdir: str
    return_code: int | None
    num_retries: int
    max_retries: int | None
    post_error_handler: bool
    post_timeout_handler: bool
    auto_timeout_retry: bool
    input_files: list[str]
    stage_in: list[Any]
    stage_out: list[Any]
    env: dict[str, str]
    preprocess: list[str] | None
    postprocess: list[str] | None
    leased: bool

    def trivial(self) -> bool:
        """Whether the task can move on without any file or process work."""
        if self.state is S.READY:
            return not (self.input_files or self.stage_in or self.preprocess)
        if self.state is S.STAGED_IN:
            return not self.preprocess
        if self.state is S.RUN_DONE:
            return not (self.postprocess or self.stage_out)
        if self.state is S.POSTPROCESSED:
            return not self.stage_out
        return False


@dataclass
class _Outcome:
    """What a pool job did: transitions to record, or a handler's verdict."""

    task_id: int
    from_state: State
    steps: list[tuple[State, str]] = field(default_factory=list)
    #: For an error/timeout handler run: the FAILED message if it set no state.
    handler_note: str | None = None


_FAST_FORWARD: Mapping[State, tuple[tuple[State, str], ...]] = {
    S.READY: ((S.STAGED_IN, "nothing to stage in"), (S.PREPROCESSED, "no preprocess step")),
    S.STAGED_IN: ((S.PREPROCESSED, "no preprocess step"),),
    S.RUN_DONE: (
        (S.POSTPROCESSED, "no postprocess step"), (S.JOB_FINISHED, "nothing to stage out")
    ),
    S.POSTPROCESSED: ((S.JOB_FINISHED, "nothing to stage out"),),
}


class TransitionProcessor:
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
        config = site.config
        self.lease_s = config.launcher.lease_s
        self.data_dir = config.data_dir.resolve()
        self.roots = _allowed_roots(config.site_dir, self.data_dir, config.site.allowed_roots)
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
        self._idle = False
        self._next_renew = 0.0
        base = {k: v for k, v in os.environ.items() if k not in (TASK_ENV, ERROR_ENV, TIMEOUT_ENV)}
        base[SITE_ENV] = str(config.site_dir)
        self._base_env = base

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

    def run_until_idle(self, now: float | None = None, max_passes: int = 10_000) -> int:
        """Passes with ``wait=True`` until one moves nothing; return the total moved."""
        total = 0
        for _ in range(max_passes):
            moved = self.process_once(now, wait=True)
            total += moved
            if not moved and not self._inflight:
                break
        return total

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

    def _claimable(self, now: float) -> Any:
        free = or_(
            and_(Task.lease_launcher_id.is_(None), Task.lease_expires.is_(None)),
            Task.lease_expires < now,
            Task.lease_launcher_id == self.owner_id,
        )
        cond = [free]
        if self._inflight:
            cond.append(Task.id.not_in(list(self._inflight)))
        return and_(*cond)

    def _query(self, *where: Any, limit: int) -> Any:
        query = (
            select(
                Task.id, Task.name, Task.workflow, Task.workdir, Task.state, Task.state_time,
                Task.return_code, Task.num_retries, Task.max_retries, Task.post_error_handler,
                Task.post_timeout_handler, Task.auto_timeout_retry, Task.input_files,
                Task.stage_in, Task.stage_out, Task.environment, Task.lease_launcher_id,
                Task.lease_expires, App.preprocess, App.postprocess,
                App.environment.label("app_environment"),
            )
            .select_from(Task)
            .outerjoin(App, App.id == Task.app_id)
            .where(*where)
            .order_by(Task.id)
            .limit(limit)
        )
        return Site._filter(query, workflow=self.workflow, tags=self.tags)

    def _claim(
        self, now: float, moved: set[int]
    ) -> tuple[list[_Item], list[_Item], dict[int, list[tuple[int, str]]]]:
        """Claim tasks; fast-forward the trivial ones in the same transaction.

        Returns the tasks for recovery, the tasks needing work, and the parents' working
        directories of those with input_files.
        """
        claimable = self._claimable(now)
        states = [s.value for s in (*_FORWARD, *_RECOVER)]
        if self._idle:
            # Nothing last time: look before taking SQLite's database-wide write lock.
            with self.site.db.session() as s:
                probe = select(Task.id).where(Task.state.in_(states), claimable).limit(1)
                probe = Site._filter(probe, workflow=self.workflow, tags=self.tags)
                if s.execute(probe).first() is None:
                    return [], [], {}
        trivial_sql = _trivial_sql()
        room = max(0, self.max_inflight - len(self._inflight))
        with self.site.transaction() as tx:
            pg = tx.session.get_bind().dialect.name == "postgresql"
            queries = [
                self._query(
                    claimable,
                    or_(
                        and_(Task.state.in_([s.value for s in _FORWARD]), trivial_sql),
                        Task.state.in_([s.value for s in _RECOVER]),
                    ),
                    limit=self.batch,
                )
            ]
            if room:
                queries.append(
                    self._query(
                        claimable,
                        Task.state.in_([s.value for s in _FORWARD]),
                        not_(trivial_sql),
                        limit=room,
                    )
                )
            items: list[_Item] = []
            for query in queries:
                if pg:
                    query = query.with_for_update(skip_locked=True, of=Task)
                items += [_item(row) for row in tx.session.execute(query)]
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
                    changes += [Change(item.id, st, msg) for st, msg in _FAST_FORWARD[item.state]]
                    if item.leased:
                        trivial_leased.append(item.id)
                    if item.state is S.READY:
                        new_dirs.append(self.data_dir / item.workdir)
                elif len(work) < room:
                    work.append(item)
            if changes:
                tx.apply(changes, launcher_id=self.owner_id, now=now)
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

    # ------------------------------------------------------------------ recovery

    def _decide(self, item: _Item, now: float) -> tuple[TaskFailure, RecoveryDecision]:
        failure = TaskFailure(
            task_id=item.id,
            state=item.state,
            return_code=item.return_code,
            num_retries=item.num_retries,
            max_retries=item.max_retries,
            post_error_handler=item.post_error_handler,
            post_timeout_handler=item.post_timeout_handler,
            auto_timeout_retry=item.auto_timeout_retry,
            has_postprocess=bool(item.postprocess),
            stderr_tail=_tail_text(self.data_dir / item.workdir / "stderr", STDERR_TAIL_BYTES),
            now=now,
        )
        decision = decide_chain(self.policies, failure)
        again = (RecoveryAction.RETRY, RecoveryAction.RESTART)
        if (
            decision.action in again
            and item.max_retries is not None
            and item.num_retries >= item.max_retries
        ):
            first, _, rest = decide_chain((), failure).message.partition("\n")
            note = f"; no retries left (this task's max_retries is {item.max_retries})"
            decision = RecoveryDecision(
                RecoveryAction.FAIL, first + note + ("\n" + rest if rest else "")
            )
        return failure, decision

    def _recover(self, items: list[_Item], now: float, moved: set[int]) -> list[tuple[_Item, str]]:
        """Decide and record every recovery; return the handler runs to start."""
        if not items:
            return []
        changes: list[Change] = []
        retried: list[int] = []
        deferred: dict[int, float] = {}
        handlers: list[tuple[_Item, str]] = []
        for item in items:
            try:
                _, decision = self._decide(item, now)
            except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the pass
                log.exception("recovery of task %d", item.id)
                message = _one_line(f"recovery failed: {_exc(exc)}")
                changes.append(Change(item.id, S.FAILED, message))
                continue
            action = decision.action
            if action in (RecoveryAction.RETRY, RecoveryAction.RESTART):
                due = item.state_time + decision.delay_s
                if decision.delay_s > 0 and now < due:
                    deferred[item.id] = due
                    continue
                target = S.RESTART_READY if action is RecoveryAction.RETRY else S.READY
                default = "retry" if action is RecoveryAction.RETRY else "restart from READY"
                changes.append(Change(item.id, target, decision.message or default))
                retried.append(item.id)
            elif action is RecoveryAction.HANDLE:
                if not item.postprocess:
                    changes.append(
                        Change(
                            item.id, S.FAILED,
                            "recovery chose HANDLE but the task's app has no postprocess step",
                        )
                    )
                else:
                    handlers.append((item, "error" if item.state is S.RUN_ERROR else "timeout"))
            else:
                message = decision.message or decide_chain((), _bare_failure(item, now)).message
                changes.append(Change(item.id, S.FAILED, message))
        with self.site.transaction() as tx:
            held = _held(tx.session, [i.id for i in items], self.owner_id)
            expected = {i.id: i.state for i in items}
            ok = {i for i, st in held.items() if st is expected[i]}
            tx.apply([c for c in changes if c.task_id in ok], launcher_id=self.owner_id, now=now)
            bump = [i for i in retried if i in ok]
            for part in chunks(bump):
                tx.session.execute(
                    update(Task)
                    .where(Task.id.in_(part))
                    .values(num_retries=Task.num_retries + 1)
                    .execution_options(synchronize_session=False)
                )
            handling = {item.id for item, _ in handlers if item.id in ok}
            waiting = {i: t for i, t in deferred.items() if i in ok}
            # Decided tasks are released; deferred ones keep only their due time.
            done = [i for i in held if i not in handling and i not in waiting]
            _set_lease(tx.session, done, None, None)
            due = [{"b_id": i, "b_due": t} for i, t in waiting.items()]
            if due:
                table = Task.__table__
                tx.session.execute(
                    update(table)
                    .where(table.c.id == bindparam("b_id"))
                    .values(lease_launcher_id=None, lease_expires=bindparam("b_due")),
                    due,
                )
        moved |= {e.task_id for e in tx.events}
        return [(item, kind) for item, kind in handlers if item.id in ok]

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

    def _handle(self, item: _Item, kind: str) -> _Outcome:
        """Run the app's postprocess as the task's error or timeout handler."""
        out = _Outcome(item.id, item.state)
        flag = ERROR_ENV if kind == "error" else TIMEOUT_ENV
        try:
            workdir = self._workdir(item)
            rc, tail = self._run_step(
                f"{kind} handler", item.postprocess or [], item, workdir, {flag: "1"},
                log_name="postprocess.log", check=False,
            )
            out.handler_note = f"{kind} handler did not set a state (exit code {rc})" + tail
        except _StepFailed as exc:
            out.handler_note = f"{kind} handler did not set a state: {exc}"
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the pass
            log.exception("task %d: %s handler", item.id, kind)
            out.handler_note = _one_line(f"{kind} handler could not run: {_exc(exc)}")
        return out

    def _workdir(self, item: _Item) -> Path:
        workdir = self.data_dir / item.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        real = workdir.resolve()
        if not self._inside(real):
            raise _StepFailed(
                f"working directory {workdir} resolves to {real}, outside {self._roots_text()}"
            )
        return real

    # -- processes

    def _run_step(
        self,
        what: str,
        argv: Sequence[str],
        item: _Item,
        workdir: Path,
        extra_env: Mapping[str, str],
        *,
        log_name: str | None = None,
        check: bool = True,
    ) -> tuple[int, str]:
        """Run *argv* in *workdir*, output appended to ``<what>.log``; return the exit code
        and, when it is not 0, the log's last lines.  Raises :class:`_StepFailed` when the
        step cannot start, times out, or (with *check*) exits non-zero."""
        log_path = workdir / (log_name or f"{what}.log")
        env = {
            **self._base_env, **item.env, **extra_env,
            TASK_ENV: str(item.id), SITE_ENV: self._base_env[SITE_ENV],
        }
        with open(log_path, "ab") as out:
            start = out.tell()
            with self._procs_lock:
                if self._closed:
                    raise _StepFailed(f"{what}: not started, the processor is shutting down")
                try:
                    proc = subprocess.Popen(
                        list(argv), cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                    )
                except FileNotFoundError:
                    raise _StepFailed(f"{what}: executable not found: {argv[0]}") from None
                except PermissionError:
                    raise _StepFailed(f"{what}: not executable: {argv[0]}") from None
                self._procs.add(proc)
            try:
                rc = proc.wait(self.step_timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise _StepFailed(
                    f"{what} timed out after {self.step_timeout_s:g} s (killed)"
                    + _log_tail(log_path, start)
                ) from None
            finally:
                with self._procs_lock:
                    self._procs.discard(proc)
        tail = _log_tail(log_path, start) if rc != 0 else ""
        if check and rc != 0:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            raise _StepFailed(f"{what} {how}{tail}")
        return rc, tail

    # -- files

    def _inside(self, path: Path) -> bool:
        return any(path == r or path.is_relative_to(r) for r in self.roots)

    def _roots_text(self) -> str:
        return "the site's data directory and [site] allowed_roots (" + ", ".join(
            str(r) for r in self.roots
        ) + ")"

    def _local(self, value: Any, what: str) -> Path:
        """An absolute path from a path or ``file://`` URL (relative: to the site's data/)."""
        if not isinstance(value, str) or not value.strip():
            raise _StepFailed(f"{what}: expected a path or file:// URL, got {value!r}")
        text = value
        if "://" in value or value.startswith("file:"):
            url = urlparse(value)
            if url.scheme != "file":
                raise _StepFailed(
                    f"{what}: unsupported URL scheme '{url.scheme}' in {value!r} "
                    "(only local paths and file:// URLs)"
                )
            if url.netloc not in ("", "localhost"):
                raise _StepFailed(
                    f"{what}: {value!r} names host '{url.netloc}'; only local files are supported"
                )
            text = unquote(url.path)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.data_dir / path
        return Path(os.path.normpath(path))

    def _checked(self, path: Path, value: Any, what: str, *, must_exist: bool) -> Path:
        """*path* with symlinks resolved, refusing anything outside the allowed roots."""
        if not self._inside(path):
            raise _StepFailed(f"{what}: {value!r} is outside {self._roots_text()}")
        if must_exist and not path.exists():
            raise _StepFailed(f"{what}: {value!r} does not exist")
        real = path.resolve()
        if not self._inside(real):
            raise _StepFailed(
                f"{what}: {value!r} resolves to {real}, outside {self._roots_text()}"
            )
        return real

    @staticmethod
    def _relative(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _StepFailed(f"{what}: expected a relative path, got {value!r}")
        norm = posixpath.normpath(value)
        if posixpath.isabs(value) or norm == ".." or norm.startswith("../"):
            raise _StepFailed(
                f"{what}: {value!r} must be relative and stay inside the working directory"
            )
        return norm

    def _in_workdir(self, workdir: Path, rel: str, name: str, what: str) -> Path:
        """Where a file named *name* goes for destination *rel* (``""``: the workdir)."""
        target = workdir / rel if rel else workdir
        if not rel or rel.endswith("/") or target.is_dir():
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent.resolve()
        if parent != workdir and not parent.is_relative_to(workdir):
            raise _StepFailed(f"{what}: destination {rel!r} leaves the working directory")
        return parent / target.name

    def _stage_in(self, item: _Item, workdir: Path, parents: list[tuple[int, str]]) -> int:
        count = 0
        if item.input_files:
            patterns = [self._relative(p, "input_files") for p in item.input_files]
            taken: set[str] = set()
            for parent_id, parent_rel in parents:
                parent_dir = self.data_dir / parent_rel
                if not parent_dir.is_dir():
                    continue
                seen: set[Path] = set()
                for pattern in patterns:
                    for match in sorted(parent_dir.glob(pattern)):
                        if match in seen:
                            continue
                        seen.add(match)
                        where = f"input_files: {pattern!r} of parent {parent_id}"
                        real = self._checked(Path(os.path.normpath(match)), str(match), where,
                                             must_exist=True)
                        name = match.name
                        if name in taken:
                            name = f"{name}_{parent_id}"
                        taken.add(name)
                        _copy(real, self._in_workdir(workdir, "", name, "input_files"))
                        count += 1
        for entry in item.stage_in:
            if isinstance(entry, Mapping):
                if "src" not in entry or set(entry) - {"src", "dst"}:
                    raise _StepFailed(f"stage_in: entry {entry!r} must be {{src, dst}}")
                src, dst = entry["src"], entry.get("dst") or ""
            else:
                src, dst = entry, ""
            path = self._local(src, "stage_in")
            real = self._checked(path, src, "stage_in", must_exist=True)
            rel = ""
            if dst:
                rel = self._relative(dst, "stage_in dst")
                if str(dst).endswith("/"):
                    rel += "/"
            _copy(real, self._in_workdir(workdir, rel, path.name, "stage_in"))
            count += 1
        return count

    def _stage_out(self, item: _Item, workdir: Path) -> int:
        count = 0
        for entry in item.stage_out:
            if not isinstance(entry, Mapping) or set(entry) != {"src", "dst"}:
                raise _StepFailed(
                    f"stage_out: entry {entry!r} must be {{src: glob in the working directory, "
                    "dst: path}}"
                )
            pattern = self._relative(entry["src"], "stage_out src")
            matches = sorted(workdir.glob(pattern))
            if not matches:
                raise _StepFailed(
                    f"stage_out: nothing matches {entry['src']!r} in the working directory"
                )
            dst_value = entry["dst"]
            dst = self._local(dst_value, "stage_out dst")
            as_dir = (
                str(dst_value).endswith("/") or dst.is_dir() or len(matches) > 1
                or any(c in entry["src"] for c in "*?[")
            )
            dst_real = self._checked(dst, dst_value, "stage_out dst", must_exist=False)
            for match in matches:
                src = self._checked(Path(os.path.normpath(match)), str(match), "stage_out src",
                                    must_exist=True)
                target = dst_real / match.name if as_dir else dst_real
                target.parent.mkdir(parents=True, exist_ok=True)
                target = self._checked(target.parent.resolve() / target.name, dst_value,
                                       "stage_out dst", must_exist=False)
                _copy(src, target)
                count += 1
        return count


# --------------------------------------------------------------------------- helpers



def _bare_failure(item: _Item, now: float) -> TaskFailure:
    return TaskFailure(item.id, item.state, item.return_code, item.num_retries, now=now)


@functools.lru_cache(maxsize=1)
def _trivial_sql() -> Any:
    """SQL twin of :meth:`_Item.trivial` (JSON columns hold ``'[]'`` when empty)."""

    def empty(col: Any) -> Any:
        return or_(col.is_(None), type_coerce(col, Text) == "[]")

    return or_(
        and_(
            Task.state == S.READY.value, empty(Task.input_files), empty(Task.stage_in),
            App.preprocess.is_(None),
        ),
        and_(Task.state == S.STAGED_IN.value, App.preprocess.is_(None)),
        and_(Task.state == S.RUN_DONE.value, App.postprocess.is_(None), empty(Task.stage_out)),
        and_(Task.state == S.POSTPROCESSED.value, empty(Task.stage_out)),
    )


def _item(row: Any) -> _Item:
    env = {str(k): str(v) for k, v in (row.app_environment or {}).items()}
    env.update((str(k), str(v)) for k, v in (row.environment or {}).items())
    return _Item(
        id=row.id,
        state=State(row.state),
        state_time=row.state_time,
        workdir=row.workdir or Task.default_workdir.fget(row),  # type: ignore[attr-defined]
        return_code=row.return_code,
        num_retries=row.num_retries,
        max_retries=row.max_retries,
        post_error_handler=row.post_error_handler,
        post_timeout_handler=row.post_timeout_handler,
        auto_timeout_retry=row.auto_timeout_retry,
        input_files=list(row.input_files or []),
        stage_in=list(row.stage_in or []),
        stage_out=list(row.stage_out or []),
        env=env,
        preprocess=list(row.preprocess) if row.preprocess else None,
        postprocess=list(row.postprocess) if row.postprocess else None,
        leased=row.lease_launcher_id is not None or row.lease_expires is not None,
    )


def _set_lease(session: Any, ids: Sequence[int], owner: int | None, expires: float | None) -> None:
    for part in chunks(sorted(ids)):
        session.execute(
            update(Task)
            .where(Task.id.in_(part))
            .values(lease_launcher_id=owner, lease_expires=expires)
            .execution_options(synchronize_session=False)
        )


def _held(session: Any, ids: Sequence[int], owner: int) -> dict[int, State]:
    """``{id: state}`` of *ids* still leased to *owner* (row-locked on PostgreSQL)."""
    result: dict[int, State] = {}
    pg = session.get_bind().dialect.name == "postgresql"
    for part in chunks(sorted(set(ids))):
        query = select(Task.id, Task.state).where(
            Task.id.in_(part), Task.lease_launcher_id == owner
        )
        if pg:
            query = query.with_for_update()
        result.update((i, State(s)) for i, s in session.execute(query))
    return result


def _parent_dirs(session: Any, child_ids: Sequence[int]) -> dict[int, list[tuple[int, str]]]:
    """``{child: [(parent id, parent workdir relative to data/), ...]}`` by parent id."""
    result: dict[int, list[tuple[int, str]]] = {}
    for part in chunks(child_ids):
        rows = session.execute(
            select(TaskDependency.child_id, Task.id, Task.name, Task.workflow, Task.workdir)
            .join(Task, Task.id == TaskDependency.parent_id)
            .where(TaskDependency.child_id.in_(part))
            .order_by(TaskDependency.child_id, Task.id)
        )
        for row in rows:
            rel = row.workdir or Task.default_workdir.fget(row)  # type: ignore[attr-defined]
            result.setdefault(row.child_id, []).append((row.id, rel))
    return result


def _allowed_roots(site_dir: Path, data_dir: Path, roots: Sequence[str]) -> tuple[Path, ...]:
    result = [data_dir]
    for root in roots:
        path = Path(root).expanduser()
        if not path.is_absolute():
            path = site_dir / path
        result.append(path.resolve())
    return tuple(result)


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or a directory tree; never write through a symlink at *dst*."""
    if dst.is_symlink():
        dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _tail_text(path: Path, size: int) -> str:
    """The last *size* bytes of *path* as text (starting at a line), or ""."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read(size)
    except OSError:
        return ""
    if end > size and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", errors="replace")


def _log_tail(path: Path, start: int) -> str:
    """``"; last lines of <log>:\\n..."`` for what a step wrote from offset *start*."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(start, end - 8192))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").rstrip().splitlines()[-LOG_TAIL_LINES:]
    if not lines:
        return f" (no output in {path.name})"
    return f"; last lines of {path.name}:\n" + "\n".join(lines)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a step (it runs in its own session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass


def _exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
