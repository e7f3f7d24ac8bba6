"""The task state machine: states, allowed transitions and state groups.

Pure data and checks, no I/O.  Every component that changes a task's state goes
through :func:`check_transition` (the database layer in :mod:`balsam_core.transitions`
does it for whole batches).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .errors import BalsamError


class State(str, enum.Enum):
    """A task's state (DESIGN §5). The value is what the database stores."""

    CREATED = "CREATED"
    AWAITING_PARENTS = "AWAITING_PARENTS"
    READY = "READY"
    STAGED_IN = "STAGED_IN"
    PREPROCESSED = "PREPROCESSED"
    RUNNING = "RUNNING"
    RUN_DONE = "RUN_DONE"
    POSTPROCESSED = "POSTPROCESSED"
    JOB_FINISHED = "JOB_FINISHED"
    RUN_ERROR = "RUN_ERROR"
    RUN_TIMEOUT = "RUN_TIMEOUT"
    RESTART_READY = "RESTART_READY"
    FAILED = "FAILED"
    USER_KILLED = "USER_KILLED"

    def __str__(self) -> str:
        return self.value


S = State

#: Every allowed ``from -> to`` move.  USER_KILLED is reachable from every state that
#: is not an end state and has no way out: a kill always wins.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    S.CREATED: frozenset({S.AWAITING_PARENTS, S.READY, S.FAILED, S.USER_KILLED}),
    S.AWAITING_PARENTS: frozenset({S.READY, S.FAILED, S.USER_KILLED}),
    S.READY: frozenset({S.AWAITING_PARENTS, S.STAGED_IN, S.FAILED, S.USER_KILLED}),
    S.STAGED_IN: frozenset({S.PREPROCESSED, S.FAILED, S.USER_KILLED}),
    S.PREPROCESSED: frozenset({S.RUNNING, S.FAILED, S.USER_KILLED}),
    S.RUNNING: frozenset({S.RUN_DONE, S.RUN_ERROR, S.RUN_TIMEOUT, S.USER_KILLED}),
    S.RUN_DONE: frozenset({S.POSTPROCESSED, S.RUN_ERROR, S.FAILED, S.USER_KILLED}),
    S.POSTPROCESSED: frozenset({S.JOB_FINISHED, S.FAILED, S.USER_KILLED}),
    # An error or timeout handler may declare the run good after all.
    S.RUN_ERROR: frozenset(
        {S.RESTART_READY, S.READY, S.POSTPROCESSED, S.JOB_FINISHED, S.FAILED, S.USER_KILLED}
    ),
    S.RUN_TIMEOUT: frozenset(
        {S.RESTART_READY, S.READY, S.POSTPROCESSED, S.JOB_FINISHED, S.FAILED, S.USER_KILLED}
    ),
    S.RESTART_READY: frozenset({S.RUNNING, S.FAILED, S.USER_KILLED}),
    # Retrying a failed task sends it back through its parents' check.
    S.FAILED: frozenset({S.AWAITING_PARENTS, S.READY, S.RESTART_READY}),
    S.JOB_FINISHED: frozenset(),
    S.USER_KILLED: frozenset(),
}

#: States the launcher may start.
RUNNABLE: frozenset[State] = frozenset({S.PREPROCESSED, S.RESTART_READY})
#: States a task never leaves by itself.
END: frozenset[State] = frozenset({S.JOB_FINISHED, S.FAILED, S.USER_KILLED})
#: States in which a task may still gain parents.
NOT_STARTED: frozenset[State] = frozenset({S.CREATED, S.AWAITING_PARENTS, S.READY})
#: States from which ``retry`` is allowed.
RETRYABLE: frozenset[State] = frozenset({S.FAILED, S.RUN_ERROR, S.RUN_TIMEOUT})


class InvalidTransition(BalsamError, ValueError):
    """Raised for a state change that the table does not allow."""

    def __init__(self, task_id: int | None, src: State, dst: State) -> None:
        self.task_id, self.src, self.dst = task_id, src, dst
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[src])) or "none (end state)"
        who = f"task {task_id}: " if task_id is not None else ""
        super().__init__(f"{who}cannot go from {src.value} to {dst.value} (allowed: {allowed})")


def parse_state(value: str | State) -> State:
    """Return the :class:`State` named *value* (case-insensitive); ValueError lists the states."""
    if isinstance(value, State):
        return value
    try:
        return State(value.strip().upper())
    except ValueError:
        names = ", ".join(s.value for s in State)
        raise ValueError(f"unknown state {value!r} (states: {names})") from None


def is_allowed(src: State, dst: State) -> bool:
    """Whether the table allows ``src -> dst``."""
    return dst in TRANSITIONS[src]


def check_transition(src: State, dst: State, task_id: int | None = None) -> None:
    """Raise :class:`InvalidTransition` unless ``src -> dst`` is allowed."""
    if dst not in TRANSITIONS[src]:
        raise InvalidTransition(task_id, src, dst)


class BatchJobState(str, enum.Enum):
    """A batch job's state as Balsam sees it; scheduler plugins map native states onto it."""

    PENDING_SUBMISSION = "PENDING_SUBMISSION"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SUBMIT_FAILED = "SUBMIT_FAILED"
    UNKNOWN = "UNKNOWN"

    def __str__(self) -> str:
        return self.value


#: Batch-job states after which the scheduler has nothing more to tell.
BATCH_JOB_END: frozenset[BatchJobState] = frozenset(
    {
        BatchJobState.FINISHED,
        BatchJobState.FAILED,
        BatchJobState.CANCELLED,
        BatchJobState.SUBMIT_FAILED,
    }
)
