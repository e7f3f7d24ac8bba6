"""Plain data shared by the processor's modules: a claimed task (:class:`_Item`), what
a pool job did (:class:`_Outcome`), the user-facing step failure, state groups and
one-line messages.  Safe to pass across threads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..states import State

S = State

#: States worked on before a run and after a successful one.
_FORWARD = (S.READY, S.STAGED_IN, S.RUN_DONE, S.POSTPROCESSED)
#: States handed to the recovery chain.
_RECOVER = (S.RUN_ERROR, S.RUN_TIMEOUT)


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


def _exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
