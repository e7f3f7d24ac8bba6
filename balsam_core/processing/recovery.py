"""Recovery of RUN_ERROR / RUN_TIMEOUT tasks: the site's policy chain, one decision per
task, and recording it (retry, restart, fail, defer, or hand over to a handler).

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
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sqlalchemy import bindparam, update

from ..api import Site
from ..models import STDERR_FILE, Task
from ..plugin_types import RecoveryAction, RecoveryDecision, RecoveryPolicy, TaskFailure
from ..recovery import decide_chain
from ..transitions import Change, chunks
from .items import S, _exc, _Item, _one_line
from .queries import _held, _set_lease

log = logging.getLogger(__name__)

#: Bytes of ``<workdir>/stderr`` a recovery policy sees.
STDERR_TAIL_BYTES = 4096


def site_policies(site: Site) -> list[RecoveryPolicy]:
    """The recovery chain of *site* (``[recovery] chain``), in order."""
    config = site.config
    return [site.plugins.create("recovery_policy", n, config) for n in config.recovery.chain]


class _Recovery:
    """Recovery passes of :class:`~balsam_core.processing.TransitionProcessor` (a mixin)."""

    site: Site
    owner_id: int
    data_dir: Path
    policies: list[RecoveryPolicy]

    def _decide(self, item: _Item, now: float) -> RecoveryDecision:
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
            stderr_tail=_tail_text(self.data_dir / item.workdir / STDERR_FILE, STDERR_TAIL_BYTES),
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
        return decision

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
                decision = self._decide(item, now)
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
            # Stamped when written (never before the failure another process recorded
            # during this pass), unless a virtual clock runs ahead.
            tx.apply(
                [c for c in changes if c.task_id in ok], launcher_id=self.owner_id,
                now=max(now, time.time()),
            )
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


def _bare_failure(item: _Item, now: float) -> TaskFailure:
    return TaskFailure(item.id, item.state, item.return_code, item.num_retries, now=now)


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
