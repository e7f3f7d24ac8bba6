"""Bulk state changes with provenance, and the DAG rules they trigger.

:func:`apply` moves many tasks in a handful of statements: one read of the current
states (row-locked on PostgreSQL; SQLite callers hold the write lock), one UPDATE per
distinct ``from -> to`` pair (a task walked through several states is written once),
one multi-row INSERT of TaskEvents — all in the
caller's transaction, so a state and its event are never written apart.  It then
applies the DAG rules of DESIGN §5: children whose parents all finished become
READY; dependants of a FAILED parent fail; dependants of a killed parent are killed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from .db import bulk_insert
from .errors import NotFound
from .models import Task, TaskDependency, TaskEvent
from .plugin_types import StateUpdate, TransitionEvent
from .states import State, check_transition

#: Ids per ``IN (...)`` list; well below SQLite's and PostgreSQL's parameter limits.
CHUNK = 5000


#: A state change to apply: the same record a launcher reports (task id, target state,
#: message, return code, time).
Change = StateUpdate


_task = Task.__table__
_dep = TaskDependency.__table__

# The statements of the launcher's hot paths, built once: SQLAlchemy then reuses their
# compiled form, and building a statement costs more than running it on SQLite.
_STATES = select(_task.c.id, _task.c.state).where(_task.c.id.in_(bindparam("ids", expanding=True)))
_STATES_LOCKED = _STATES.with_for_update()
_MOVE = (
    update(_task)
    .where(_task.c.id.in_(bindparam("ids", expanding=True)), _task.c.state == bindparam("src"))
    .values(state=bindparam("dst"), state_time=bindparam("now"))
)
_SET_CODE = update(_task).where(_task.c.id == bindparam("b_id")).values(return_code=bindparam("b_rc"))
_CHILDREN = select(_dep.c.child_id).where(_dep.c.parent_id.in_(bindparam("ids", expanding=True)))
_READY_CHILDREN = select(_task.c.id).where(
    _task.c.id.in_(_CHILDREN),
    _task.c.state == State.AWAITING_PARENTS.value,
    _task.c.id.not_in(
        select(_dep.c.child_id)
        .join(_task, _task.c.id == _dep.c.parent_id)
        .where(_dep.c.child_id.in_(_CHILDREN), _task.c.state != State.JOB_FINISHED.value)
    ),
)


def _run(session: Session, statement: Executable, params: object = None) -> Any:
    """Execute a Core *statement* on the session's connection (no ORM layer)."""
    return session.connection().execute(statement, params)


def chunks(items: Sequence[int], size: int = CHUNK) -> Iterable[Sequence[int]]:
    """*items* in slices of at most *size*."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def current_states(session: Session, ids: Sequence[int], lock: bool = True) -> dict[int, State]:
    """``{id: state}`` for *ids* that exist; rows are locked on PostgreSQL when *lock*."""
    query = _STATES_LOCKED if lock and session.get_bind().dialect.name == "postgresql" else _STATES
    result: dict[int, State] = {}
    for part in chunks(sorted(set(ids))):
        result.update((i, State(s)) for i, s in _run(session, query, {"ids": part}))
    return result


def apply(
    session: Session,
    changes: Sequence[Change],
    *,
    launcher_id: int | None = None,
    batch_job_id: int | None = None,
    now: float | None = None,
    skip_killed: bool = True,
    states: Mapping[int, State] | None = None,
) -> list[TransitionEvent]:
    """Apply *changes* and the DAG rules they trigger; return the recorded events.

    Changes are taken in order, so a batch may walk a task through several states; each
    step is checked and becomes an event, but each task's row is written once, with the
    state it ends in.  Raises :class:`~balsam_core.states.InvalidTransition` (nothing
    written: the caller's transaction rolls back) for a move the state table forbids,
    and :class:`~balsam_core.errors.NotFound` for an unknown task.  A change to a task
    that is already USER_KILLED is dropped when *skip_killed*: a kill is never
    overwritten.  *states*: the tasks' current states, when the caller has just read
    them in this transaction (row-locked on PostgreSQL); read here otherwise.
    """
    now = time.time() if now is None else now
    initial = (
        dict(states) if states is not None
        else current_states(session, [c.task_id for c in changes])
    )
    states = dict(initial)
    events: list[TransitionEvent] = []
    codes: dict[int, int] = {}
    for change in changes:
        src = states.get(change.task_id)
        if src is None:
            raise NotFound(f"no task with id {change.task_id}")
        if src is State.USER_KILLED and skip_killed:
            continue
        check_transition(src, change.state, change.task_id)
        states[change.task_id] = change.state
        events.append(
            TransitionEvent(
                change.task_id, src, change.state, change.time or now, change.message,
                launcher_id,
            )
        )
        if change.return_code is not None:
            codes[change.task_id] = change.return_code
    _write(session, initial, states, {e.task_id for e in events}, codes, now)
    record_events(session, events, batch_job_id)
    cascade = _dag_rules(session, events)
    if cascade:
        events += apply(
            session, cascade, launcher_id=launcher_id, batch_job_id=batch_job_id, now=now
        )
    return events


def _write(
    session: Session,
    initial: dict[int, State],
    final: dict[int, State],
    moved: set[int],
    codes: dict[int, int],
    now: float,
) -> None:
    """One UPDATE per (initial, final) state pair of the *moved* tasks, one for codes."""
    groups: dict[tuple[State, State], list[int]] = defaultdict(list)
    for task_id in sorted(moved):
        groups[(initial[task_id], final[task_id])].append(task_id)
    for (src, dst), ids in groups.items():
        for part in chunks(ids):
            result = _run(session, _MOVE, {"ids": part, "src": src.value, "dst": dst.value, "now": now})
            if result.rowcount != len(part):  # pragma: no cover - guarded by row locks
                raise RuntimeError(f"concurrent state change on tasks {list(part)[:10]}")
    if codes:
        _run(session, _SET_CODE, [{"b_id": i, "b_rc": rc} for i, rc in codes.items()])


def record_events(
    session: Session, events: Sequence[TransitionEvent], batch_job_id: int | None = None
) -> None:
    """Insert TaskEvent rows for *events* in one statement."""
    bulk_insert(
        session,
        TaskEvent.__table__,
        {
            "task_id": [e.task_id for e in events],
            "time": [e.time for e in events],
            "from_state": [e.from_state.value if e.from_state else None for e in events],
            "to_state": [e.to_state.value for e in events],
            "message": [e.message for e in events],
            "launcher_id": [e.launcher_id for e in events],
            "batch_job_id": [batch_job_id] * len(events),
        },
    )


def _dag_rules(session: Session, events: Sequence[TransitionEvent]) -> list[Change]:
    """The changes the DAG rules call for after *events*."""
    finished = [e.task_id for e in events if e.to_state is State.JOB_FINISHED]
    failed = [e.task_id for e in events if e.to_state is State.FAILED]
    killed = [e.task_id for e in events if e.to_state is State.USER_KILLED]
    changes: list[Change] = []
    if finished:
        ready = ready_children(session, finished)
        changes += [Change(c, State.READY, "all parents finished") for c in ready]
    waiting = (State.CREATED.value, State.AWAITING_PARENTS.value)
    cascades = ((failed, State.FAILED, "failed"), (killed, State.USER_KILLED, "was killed"))
    for parents, state, verb in cascades:
        seen: set[int] = set()
        for part in chunks(parents):
            rows = session.execute(
                select(TaskDependency.child_id, TaskDependency.parent_id)
                .join(Task, Task.id == TaskDependency.child_id)
                .where(TaskDependency.parent_id.in_(part), Task.state.in_(waiting))
            )
            for child, parent in rows:
                if child not in seen:
                    seen.add(child)
                    changes.append(Change(child, state, f"parent {parent} {verb}"))
    return changes


def ready_children(session: Session, parent_ids: Sequence[int]) -> list[int]:
    """Children of *parent_ids* that are AWAITING_PARENTS and whose parents all finished."""
    result: list[int] = []
    for part in chunks(parent_ids):
        result += _run(session, _READY_CHILDREN, {"ids": part}).scalars()
    return sorted(set(result))


def unfinished_parent_counts(session: Session, child_ids: Sequence[int]) -> dict[int, int]:
    """``{child: number of parents not JOB_FINISHED}`` for children that have any."""
    counts: dict[int, int] = {}
    for part in chunks(child_ids):
        rows = session.execute(
            select(TaskDependency.child_id, func.count())
            .join(Task, Task.id == TaskDependency.parent_id)
            .where(
                TaskDependency.child_id.in_(part),
                Task.state != State.JOB_FINISHED.value,
            )
            .group_by(TaskDependency.child_id)
        )
        counts.update((c, n) for c, n in rows)
    return counts
