"""Pre/postprocess steps and error/timeout handlers, run as subprocesses; log tails.

* **Pre/postprocess** are the app's argv lists (no templating, never a shell), run in
  the working directory with ``os.environ`` + app environment + task environment +
  ``BALSAM_TASK_ID`` + ``BALSAM_SITE``, stdout and stderr appended to
  ``preprocess.log`` / ``postprocess.log``, each leading a process group of its own (in
  the launcher's session, as tasks: see ``launcher/spawn.py``), killed (the whole group)
  after ``step_timeout_s``.  The app's ``envscript`` is not sourced here (nor by
  the launcher).  Literal-command tasks have no app, hence no pre/post steps.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..api import TASK_ENV
from ..launcher.spawn import OWN_PROCESS_GROUP
from ..site import SITE_ENV
from .items import _exc, _Item, _one_line, _Outcome, _StepFailed

log = logging.getLogger(__name__)

ERROR_ENV = "BALSAM_TASK_ERROR"
TIMEOUT_ENV = "BALSAM_TASK_TIMEOUT"
#: Lines of a pre/postprocess log quoted when the step fails.
LOG_TAIL_LINES = 10


class _Steps:
    """Subprocess work of :class:`~balsam_core.processing.TransitionProcessor` (a mixin)."""

    step_timeout_s: float
    _base_env: dict[str, str]
    _procs: set[subprocess.Popen[bytes]]
    _procs_lock: threading.Lock
    _closed: bool

    if TYPE_CHECKING:

        def _workdir(self, item: _Item) -> Path: ...

    def _handle(self, item: _Item, kind: str) -> _Outcome:
        """Run the app's postprocess as the task's error or timeout handler."""
        out = _Outcome(item.id, item.state)
        flag = ERROR_ENV if kind == "error" else TIMEOUT_ENV
        try:
            workdir = self._workdir(item)
            rc, tail = self._run_step(
                f"{kind} handler", item.postprocess or [], item, workdir, {flag: "1"},
                log_name="postprocess.log", check=False,
            )
            out.handler_note = f"{kind} handler did not set a state (exit code {rc})" + tail
        except _StepFailed as exc:
            out.handler_note = f"{kind} handler did not set a state: {exc}"
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the pass
            log.exception("task %d: %s handler", item.id, kind)
            out.handler_note = _one_line(f"{kind} handler could not run: {_exc(exc)}")
        return out

    # -- processes

    def _run_step(
        self,
        what: str,
        argv: Sequence[str],
        item: _Item,
        workdir: Path,
        extra_env: Mapping[str, str],
        *,
        log_name: str | None = None,
        check: bool = True,
    ) -> tuple[int, str]:
        """Run *argv* in *workdir*, output appended to ``<what>.log``; return the exit code
        and, when it is not 0, the log's last lines.  Raises :class:`_StepFailed` when the
        step cannot start, times out, or (with *check*) exits non-zero."""
        log_path = workdir / (log_name or f"{what}.log")
        env = {
            **self._base_env, **item.env, **extra_env,
            TASK_ENV: str(item.id), SITE_ENV: self._base_env[SITE_ENV],
        }
        with open(log_path, "ab") as out:
            start = out.tell()
            with self._procs_lock:
                if self._closed:
                    raise _StepFailed(f"{what}: not started, the processor is shutting down")
                try:
                    proc = subprocess.Popen(
                        list(argv), cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, close_fds=True, **OWN_PROCESS_GROUP,
                    )
                except FileNotFoundError:
                    raise _StepFailed(f"{what}: executable not found: {argv[0]}") from None
                except PermissionError:
                    raise _StepFailed(f"{what}: not executable: {argv[0]}") from None
                self._procs.add(proc)
            try:
                rc = proc.wait(self.step_timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise _StepFailed(
                    f"{what} timed out after {self.step_timeout_s:g} s (killed)"
                    + _log_tail(log_path, start)
                ) from None
            finally:
                with self._procs_lock:
                    self._procs.discard(proc)
        tail = _log_tail(log_path, start) if rc != 0 else ""
        if check and rc != 0:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            raise _StepFailed(f"{what} {how}{tail}")
        return rc, tail


def _log_tail(path: Path, start: int) -> str:
    """``"; last lines of <log>:\\n..."`` for what a step wrote from offset *start*."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(start, end - 8192))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").rstrip().splitlines()[-LOG_TAIL_LINES:]
    if not lines:
        return f" (no output in {path.name})"
    return f"; last lines of {path.name}:\n" + "\n".join(lines)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a step (it leads its own) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass
