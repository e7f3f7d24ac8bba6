"""Built-in recovery policies (pure: no I/O, no clock).

``[recovery] chain`` lists policies by name; for a failed or timed-out run the
launcher asks them in order through :func:`balsam_core.decide_chain`, and the first
one that decides wins.  Policies here take their knobs from ``[recovery]`` (max_retries,
transient_exit_codes, transient_signals, backoff_s):

* ``app-handler`` — the app's own error or timeout handler runs (HANDLE) when the task
  asks for it (``post_error_handler`` / ``post_timeout_handler``) and the app has a
  postprocess step.
* ``retry-timeout`` — a timed-out task with ``auto_timeout_retry`` runs again (RETRY)
  while it has retries left.
* ``retry-transient`` — a run that ended with a listed exit code or signal runs again
  (RETRY) while it has retries left, after ``backoff_s * 2**num_retries`` seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from balsam_core import (
    PluginContext,
    RecoveryAction,
    RecoveryDecision,
    RecoveryPolicyPlugin,
    State,
    TaskFailure,
    describe_exit,
    hookimpl,
)

__all__ = [
    "AppHandler",
    "RetryTimeout",
    "RetryTransient",
    "balsam_recovery_policies",
]

class AppHandler:
    """``app-handler``: HANDLE errors and timeouts the app's postprocess step asked for."""

    @classmethod
    def from_context(cls, context: PluginContext) -> AppHandler:
        """The factory of the plugin record."""
        return cls()

    def decide(self, failure: TaskFailure) -> RecoveryDecision | None:
        """HANDLE when the task's handler flag for this kind of failure is set."""
        if not failure.has_postprocess:
            return None
        if failure.state == State.RUN_ERROR and failure.post_error_handler:
            return RecoveryDecision(RecoveryAction.HANDLE, "running the app's error handler")
        if failure.state == State.RUN_TIMEOUT and failure.post_timeout_handler:
            return RecoveryDecision(RecoveryAction.HANDLE, "running the app's timeout handler")
        return None


def _limit(failure: TaskFailure, site_limit: int) -> int:
    """The task's own retry limit when it has one, else the site's."""
    return site_limit if failure.max_retries is None else failure.max_retries


class RetryTimeout:
    """``retry-timeout``: RETRY timed-out tasks that set ``auto_timeout_retry``."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    @classmethod
    def from_context(cls, context: PluginContext) -> RetryTimeout:
        """The factory of the plugin record."""
        return cls(context.config.recovery.max_retries)

    def decide(self, failure: TaskFailure) -> RecoveryDecision | None:
        """RETRY a timeout while ``num_retries < max_retries``."""
        if (
            failure.state != State.RUN_TIMEOUT
            or not failure.auto_timeout_retry
            or failure.num_retries >= _limit(failure, self.max_retries)
        ):
            return None
        attempt = failure.num_retries + 1
        return RecoveryDecision(
            RecoveryAction.RETRY, f"timed out; retry {attempt} of {_limit(failure, self.max_retries)}"
        )


class RetryTransient:
    """``retry-transient``: RETRY runs ended by a transient exit code or signal, with backoff."""

    def __init__(
        self,
        max_retries: int,
        exit_codes: Sequence[int] = (),
        signals: Sequence[int] = (),
        backoff_s: float = 1.0,
    ) -> None:
        self.max_retries = max_retries
        self.exit_codes = frozenset(exit_codes)
        self.signals = frozenset(signals)
        self.backoff_s = backoff_s

    @classmethod
    def from_context(cls, context: PluginContext) -> RetryTransient:
        """The factory of the plugin record."""
        rec = context.config.recovery
        return cls(rec.max_retries, rec.transient_exit_codes, rec.transient_signals, rec.backoff_s)

    def decide(self, failure: TaskFailure) -> RecoveryDecision | None:
        """RETRY after ``backoff_s * 2**num_retries`` s while ``num_retries < max_retries``."""
        if failure.state != State.RUN_ERROR or failure.return_code is None:
            return None
        sig = failure.signal
        if sig is not None:
            transient = sig in self.signals
        else:
            transient = failure.return_code in self.exit_codes
        if not transient or failure.num_retries >= _limit(failure, self.max_retries):
            return None
        delay = self.backoff_s * 2**failure.num_retries
        return RecoveryDecision(
            RecoveryAction.RETRY,
            f"{describe_exit(failure)} is transient; "
            f"retry {failure.num_retries + 1} of {_limit(failure, self.max_retries)} in {delay:g} s",
            delay_s=delay,
        )


@hookimpl
def balsam_recovery_policies() -> list[RecoveryPolicyPlugin]:
    """The built-in policies ``app-handler``, ``retry-timeout`` and ``retry-transient``."""
    return [
        RecoveryPolicyPlugin(
            "app-handler", AppHandler.from_context, "run the app's error/timeout handler"
        ),
        RecoveryPolicyPlugin(
            "retry-timeout", RetryTimeout.from_context, "retry timed-out tasks that ask for it"
        ),
        RecoveryPolicyPlugin(
            "retry-transient",
            RetryTransient.from_context,
            "retry transient exit codes and signals with exponential backoff",
        ),
    ]
