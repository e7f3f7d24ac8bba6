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

from sqlalchemy import Text, and_, literal_column, or_, select, text, type_coerce

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


def _empty(col: Any) -> Any:
    """SQL: a JSON list column is empty (NULL or ``'[]'``)."""
    return or_(col.is_(None), type_coerce(col, Text) == "[]")


@functools.lru_cache(maxsize=1)
def nothing_after_run() -> Any:
    """SQL: no postprocess step and nothing to stage out (a query joining Task with its
    App): a clean run of the task is its end."""
    return and_(App.postprocess.is_(None), _empty(Task.stage_out))


@functools.lru_cache(maxsize=None)
def nothing_to_do_in(state: State) -> Any:
    """SQL: the task is in *state* (a key of :data:`FAST_FORWARD`) and has nothing to do
    in it (a query joining Task with its App)."""
    in_state = Task.state == state.value
    if state is S.READY:
        return and_(
            in_state, _empty(Task.input_files), _empty(Task.stage_in), App.preprocess.is_(None)
        )
    if state is S.STAGED_IN:
        return and_(in_state, App.preprocess.is_(None))
    if state is S.RUN_DONE:
        return and_(in_state, nothing_after_run())
    return and_(in_state, _empty(Task.stage_out))  # POSTPROCESSED


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
    if state in RUNNABLE:
        # The state inline, not bound: statements differing only in it would share one
        # compiled form, and SQLAlchemy then re-maps the result columns on every run.
        return Task.state == literal_column(f"'{state.value}'")
    return nothing_to_do_in(state)
