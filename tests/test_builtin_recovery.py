"""The built-in recovery policies and the chain: pure, no processes, no DB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balsam_core import (
    PluginContext,
    RecoveryAction,
    RecoveryDecision,
    RecoveryPolicy,
    RecoveryPolicyPlugin,
    State,
    TaskFailure,
)
from balsam_core.builtin import recovery
from balsam_core import decide_chain
from balsam_core.config import from_dict

A = RecoveryAction
RECOVERY = {
    "max_retries": 2,
    "transient_exit_codes": [75],
    "transient_signals": [9, 11],
    "backoff_s": 1.5,
}


def policies(**overrides: Any) -> dict[str, RecoveryPolicy]:
    """Every built-in policy, built through its record from a site config."""
    cfg = from_dict({"recovery": {**RECOVERY, **overrides}}, Path("."))
    ctx = PluginContext(site_dir=Path("."), config=cfg)
    return {r.name: r.factory(ctx) for r in recovery.balsam_recovery_policies()}


def chain(**overrides: Any) -> list[RecoveryPolicy]:
    p = policies(**overrides)
    return [p[name] for name in ("app-handler", "retry-timeout", "retry-transient")]


def error(rc: int | None = 1, retries: int = 0, **kw: Any) -> TaskFailure:
    return TaskFailure(task_id=7, state=State.RUN_ERROR, return_code=rc, num_retries=retries, **kw)


def timeout(retries: int = 0, rc: int | None = None, **kw: Any) -> TaskFailure:
    return TaskFailure(
        task_id=7, state=State.RUN_TIMEOUT, return_code=rc, num_retries=retries, **kw
    )


def test_records() -> None:
    records = recovery.balsam_recovery_policies()
    assert [r.name for r in records] == ["app-handler", "retry-timeout", "retry-transient"]
    assert all(isinstance(r, RecoveryPolicyPlugin) and r.settings is None for r in records)
    assert all(isinstance(p, RecoveryPolicy) for p in policies().values())


def test_app_handler() -> None:
    handler = policies()["app-handler"]
    d = handler.decide(error(post_error_handler=True, has_postprocess=True))
    assert d is not None and d.action == A.HANDLE and "error handler" in d.message
    d = handler.decide(timeout(post_timeout_handler=True, has_postprocess=True))
    assert d is not None and d.action == A.HANDLE and "timeout handler" in d.message
    # No postprocess step, or the flag of the other kind of failure: pass.
    assert handler.decide(error(post_error_handler=True)) is None
    assert handler.decide(error(post_timeout_handler=True, has_postprocess=True)) is None
    assert handler.decide(timeout(post_error_handler=True, has_postprocess=True)) is None
    assert handler.decide(error(has_postprocess=True)) is None


def test_retry_timeout() -> None:
    retry = policies()["retry-timeout"]
    assert retry.decide(timeout(0, auto_timeout_retry=True)) == RecoveryDecision(
        A.RETRY, "timed out; retry 1 of 2"
    )
    d = retry.decide(timeout(1, auto_timeout_retry=True))
    assert d is not None and d.action == A.RETRY and "retry 2 of 2" in d.message
    assert retry.decide(timeout(2, auto_timeout_retry=True)) is None  # retries used up
    assert retry.decide(timeout(0)) is None  # the task did not ask
    assert retry.decide(error(1, auto_timeout_retry=True)) is None  # not a timeout
    never = policies(max_retries=0)["retry-timeout"]
    assert never.decide(timeout(auto_timeout_retry=True)) is None


def test_retry_transient() -> None:
    retry = policies()["retry-transient"]
    d = retry.decide(error(75, retries=0))
    assert d is not None and d.action == A.RETRY and d.delay_s == 1.5
    assert "exit code 75" in d.message and "retry 1 of 2" in d.message
    d = retry.decide(error(-9, retries=1))
    assert d is not None and d.action == A.RETRY and d.delay_s == 3.0  # 1.5 * 2**1
    assert "SIGKILL" in d.message
    assert retry.decide(error(-11, retries=2)) is None  # retries used up
    assert retry.decide(error(1)) is None  # not a transient exit code
    assert retry.decide(error(-15)) is None  # not a transient signal
    assert retry.decide(error(9)) is None  # exit code 9 is not signal 9
    assert retry.decide(error(None)) is None
    assert retry.decide(timeout(rc=-9)) is None  # timeouts are not transient errors
    custom = policies(transient_exit_codes=[1], transient_signals=[], backoff_s=0.0)
    assert custom["retry-transient"].decide(error(-9)) is None
    d = custom["retry-transient"].decide(error(1))
    assert d is not None and d.delay_s == 0.0


def test_chain_first_decision_wins() -> None:
    both = error(75, post_error_handler=True, has_postprocess=True)
    assert decide_chain(chain(), both).action == A.HANDLE
    p = policies()
    assert decide_chain([p["retry-transient"], p["app-handler"]], both).action == A.RETRY
    assert decide_chain(chain(), timeout(auto_timeout_retry=True)).action == A.RETRY


def test_chain_fail_message() -> None:
    tail = "\n".join(f"line {i}" for i in range(30)) + "\n"
    d = decide_chain(chain(), error(-11, retries=2, stderr_tail=tail))
    assert d.action == A.FAIL
    assert "task 7 failed" in d.message and "signal 11 (SIGSEGV)" in d.message
    assert "after 2 retries" in d.message
    assert d.message.endswith("line 29")
    assert "line 20" in d.message and "line 19" not in d.message  # the last 10 lines only
    d = decide_chain(chain(), error(3))
    assert d.action == A.FAIL and "exit code 3" in d.message and "stderr" not in d.message
    d = decide_chain(chain(), timeout(rc=-15))
    assert d.action == A.FAIL and "timed out" in d.message and "SIGTERM" in d.message
    assert decide_chain([], error(-200)).message == "task 7 failed: killed by signal 200"


@pytest.mark.parametrize(
    "failure",
    [error(75, 0), error(-9, 1), timeout(0, auto_timeout_retry=True)],
)
def test_retries_end_in_fail(failure: TaskFailure) -> None:
    """Feeding each RETRY back as the next failure ends in FAIL at max_retries."""
    start, actions = failure.num_retries, []
    while (d := decide_chain(chain(), failure)).action == A.RETRY:
        actions.append(d.action)
        failure = TaskFailure(**{**failure.__dict__, "num_retries": failure.num_retries + 1})
    assert d.action == A.FAIL and failure.num_retries == RECOVERY["max_retries"]
    assert len(actions) == RECOVERY["max_retries"] - start
