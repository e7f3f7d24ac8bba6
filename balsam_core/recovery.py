"""The recovery chain: ask the configured policies in order, fail with a clear message."""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence

from .plugin_types import RecoveryAction, RecoveryDecision, RecoveryPolicy, TaskFailure
from .states import State

#: Lines of the task's stderr quoted in a FAIL message.
TAIL_LINES = 10


def describe_exit(failure: TaskFailure) -> str:
    """How the run ended, e.g. ``"exit code 1"``, ``"killed by signal 9 (SIGKILL)"``."""
    if failure.state == State.RUN_TIMEOUT:
        how = "timed out"
        return how if failure.return_code is None else f"{how}, {_code(failure)}"
    return "no exit code" if failure.return_code is None else _code(failure)


def _code(failure: TaskFailure) -> str:
    sig = failure.signal
    if sig is None:
        return f"exit code {failure.return_code}"
    try:
        return f"killed by signal {sig} ({_signal.Signals(sig).name})"
    except ValueError:
        return f"killed by signal {sig}"


def decide_chain(policies: Sequence[RecoveryPolicy], failure: TaskFailure) -> RecoveryDecision:
    """The first decision of *policies* for *failure*; FAIL when none decides.

    The FAIL message says how the run ended (exit code or signal name), how many
    retries were used, and quotes the last :data:`TAIL_LINES` lines of its stderr.
    """
    for policy in policies:
        decision = policy.decide(failure)
        if decision is not None:
            return decision
    what = "timed out" if failure.state == State.RUN_TIMEOUT else "failed"
    message = f"task {failure.task_id} {what}: {describe_exit(failure)}"
    if failure.num_retries:
        message += f" (after {failure.num_retries} retries)"
    tail = failure.stderr_tail.rstrip().splitlines()[-TAIL_LINES:]
    if tail:
        message += "\nstderr (last lines):\n" + "\n".join(tail)
    return RecoveryDecision(RecoveryAction.FAIL, message)
