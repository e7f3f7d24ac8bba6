"""The transitions a task with nothing to do in its state skips at once.

A task whose app has no preprocess step and which names no ``input_files`` and no
``stage_in`` goes READY -> STAGED_IN -> PREPROCESSED without any file or process work;
one with no postprocess step and no ``stage_out`` goes RUN_DONE -> POSTPROCESSED ->
JOB_FINISHED.  Whoever touches such a task next records these steps, in bulk, in its
own transaction: the processing worker when it claims tasks, the ``database`` task
source when it leases them or records their runs.  Provenance stays complete: every
step skipped is a TaskEvent with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Boolean, and_, literal_column, or_, select, text

from .models import HAS_STAGING, App, Task
from .states import RUNNABLE, State
from .transitions import Change

S = State

#: From a state with nothing to do: the states passed through, with the reason of each.
FAST_FORWARD: Mapping[State, tuple[tuple[State, str], ...]] = {
    S.READY: ((S.STAGED_IN, "nothing to stage in"), (S.PREPROCESSED, "no preprocess step")),
    S.STAGED_IN: ((S.PREPROCESSED, "no preprocess step"),),
    S.RUN_DONE: (
        (S.POSTPROCESSED, "no postprocess step"), (S.JOB_FINISHED, "nothing to stage out")
    ),
    S.POSTPROCESSED: ((S.JOB_FINISHED, "nothing to stage out"),),
}


def skip(task_id: int, state: State) -> list[Change]:
    """The changes that take *task_id*, in *state* with nothing to do, past it."""
    return [Change(task_id, to, reason) for to, reason in FAST_FORWARD[state]]


#: SQL on ``task`` joined with its ``app``, by part of a task's life: nothing to do in
#: it.  The one spelling of these conditions: SQLAlchemy queries wrap them in ``text()``
#: (:func:`nothing_to_do_in`), the launcher's lease statement uses them as they are.  A
#: NULL JSON list counts as empty.
NO_STAGE_IN = (
    "(task.input_files IS NULL OR task.input_files = '[]')"
    " AND (task.stage_in IS NULL OR task.stage_in = '[]')"
)
NO_PREPROCESS = "app.preprocess IS NULL"
NO_POSTPROCESS = "app.postprocess IS NULL"
NO_STAGE_OUT = "(task.stage_out IS NULL OR task.stage_out = '[]')"

#: SQL (as above): a task in the state has nothing to do in it.
NOTHING_TO_DO_SQL: Mapping[State, str] = {
    S.READY: f"{NO_STAGE_IN} AND {NO_PREPROCESS}",
    S.STAGED_IN: NO_PREPROCESS,
    S.RUN_DONE: f"{NO_POSTPROCESS} AND {NO_STAGE_OUT}",
    S.POSTPROCESSED: NO_STAGE_OUT,
}


@functools.lru_cache(maxsize=1)
def nothing_after_run() -> Any:
    """SQL: no postprocess step and nothing to stage out (a query joining Task with its
    App): a clean run of the task is its end."""
    return literal_column(f"({NOTHING_TO_DO_SQL[S.RUN_DONE]})", Boolean)


@functools.lru_cache(maxsize=None)
def nothing_to_do_in(state: State) -> Any:
    """SQL: the task is in *state* (a key of :data:`FAST_FORWARD`) and has nothing to do
    in it (a query joining Task with its App)."""
    return and_(Task.state == state.value, text(f"({NOTHING_TO_DO_SQL[state]})"))


@functools.lru_cache(maxsize=1)
def work_before_run() -> tuple[tuple[Any, str], ...]:
    """SQL conditions on ``task`` that together select the READY and STAGED_IN tasks
    with work before their run (the negation of :func:`nothing_to_do_in` for these
    states), each with the partial index that answers it without reading the others.

    Read as one condition, a database reads every READY task to find the few with
    work: with a backlog of a million tasks leased as they are, each look cost
    seconds.  A query should name the index to SQLite (``INDEXED BY``): without
    statistics it may prefer the (state, id) index and read the backlog after all."""
    staging = and_(Task.state == S.READY.value, text(f"({HAS_STAGING})"))
    preprocess = and_(
        Task.state.in_([S.READY.value, S.STAGED_IN.value]),
        Task.app_id.in_(select(App.id).where(App.preprocess.is_not(None))),
    )
    return (staging, "ix_task_staging"), (preprocess, "ix_task_app_state")


@functools.lru_cache(maxsize=1)
def nothing_to_do() -> Any:
    """SQL: the task has nothing to do in its state (a query joining Task with its App)."""
    return or_(*(nothing_to_do_in(state) for state in FAST_FORWARD))


#: The states a task may be leased from to run: runnable, or with nothing to do
#: before its run.
LEASED_FROM: tuple[State, ...] = (*sorted(RUNNABLE), S.READY, S.STAGED_IN)


@functools.lru_cache(maxsize=None)
def leasable(state: State | None = None) -> Any:
    """SQL: the task may be leased to run -- it is runnable, or READY / STAGED_IN with
    nothing to do before its run (a query joining Task with its App).  With *state*
    (one of :data:`LEASED_FROM`): the task is in that state and may be leased."""
    if state is None:
        return or_(*(leasable(s) for s in LEASED_FROM))
    return text(leasable_sql(state))


def leasable_sql(state: State) -> str:
    """SQL text on ``task`` joined with its ``app``: the task is in *state* (one of
    :data:`LEASED_FROM`, written inline) and may be leased to run."""
    in_state = f"task.state = '{state.value}'"
    todo = NOTHING_TO_DO_SQL.get(state) if state not in RUNNABLE else None
    return f"({in_state} AND {todo})" if todo else f"({in_state})"
