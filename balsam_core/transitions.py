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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import bulk_insert
from .errors import NotFound
from .models import Task, TaskDependency, TaskEvent
from .plugin_types import StateUpdate, TransitionEvent
from .rawsql import RawSql
from .states import State, check_transition

#: Ids per ``IN (...)`` list; well below SQLite's and PostgreSQL's parameter limits.
CHUNK = 5000


#: A state change to apply: the same record a launcher reports (task id, target state,
#: message, return code, time).
Change = StateUpdate


# The statements of the launcher's hot paths (see balsam_core.rawsql).
_STATES = "SELECT id, state FROM task WHERE id {ids}"
_MOVE = "UPDATE task SET state = ?, state_time = ? WHERE id {ids} AND state = ?"
_SET_CODE = "UPDATE task SET return_code = ? WHERE id = ?"
_READY_CHILDREN = (
    "SELECT t.id FROM task t WHERE t.state = ?"
    " AND t.id IN (SELECT child_id FROM task_dependency WHERE parent_id {ids})"
    " AND NOT EXISTS (SELECT 1 FROM task_dependency d JOIN task p ON p.id = d.parent_id"
    " WHERE d.child_id = t.id AND p.state <> ?)"
)


def chunks(items: Sequence[int], size: int = CHUNK) -> Iterable[Sequence[int]]:
    """*items* in slices of at most *size*."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def current_states(session: Session, ids: Sequence[int], lock: bool = True) -> dict[int, State]:
    """``{id: state}`` for *ids* that exist; rows are locked on PostgreSQL when *lock*."""
    raw = RawSql(session)
    query = _STATES + (" FOR UPDATE" if lock and raw.postgres else "")
    result: dict[int, State] = {}
    for part in chunks(sorted(set(ids))):
        result.update((i, State(s)) for i, s in raw.execute(query, [raw.ids(part)]).fetchall())
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
    raw = RawSql(session)
    for (src, dst), ids in groups.items():
        for part in chunks(ids):
            moved_rows = raw.execute(_MOVE, [dst.value, now, raw.ids(part), src.value]).rowcount
            if moved_rows != len(part):  # pragma: no cover - guarded by row locks
                raise RuntimeError(f"concurrent state change on tasks {list(part)[:10]}")
    raw.executemany(_SET_CODE, [(rc, i) for i, rc in codes.items()])


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
    raw = RawSql(session)
    result: list[int] = []
    for part in chunks(parent_ids):
        rows = raw.execute(
            _READY_CHILDREN,
            [State.AWAITING_PARENTS.value, raw.ids(part), State.JOB_FINISHED.value],
        )
        result += (i for (i,) in rows.fetchall())
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
