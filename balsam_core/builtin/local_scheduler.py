"""The built-in ``local`` scheduler: no batch system, each batch job is a local process.

Selected by ``[scheduler] use = "local"`` (the default).  A "batch job" is the Balsam
launcher started on this machine by a bash script, detached from the caller (own
session and process group), in the style of Balsam 2's ``SubprocessSchedulerInterface``
and psij's batch executors:

* a script template (``templates/local.sh`` shipped with the package; a site file
  ``<site_dir>/templates/local.sh`` wins) rendered with :class:`string.Template`, every
  value shell-quoted;
* ``submit`` starts ``bash <script>`` and returns the pid as the job id;
* ``status`` derives a *native state* from the process and its ``exit_code`` file, and
  maps it to a :class:`~balsam_core.BatchJobState` through :data:`NATIVE_STATES`;
* ``cancel`` sends SIGTERM to the job's process group, SIGKILL after a grace period.

A pid alone does not identify a process for long (pids are reused), so ``submit``
records the process's start time (psutil ``create_time``) in ``<workdir>/local.id`` and
in the site's registry ``<site_dir>/log/local-jobs.json`` (id -> workdir, script,
create_time, ...); a process with that pid but another start time is not the job.

Native states (:data:`NATIVE_STATES`):

``running``      the process lives (any psutil status but zombie)  -> RUNNING
``exited:0``     it ended and the script recorded exit status 0     -> FINISHED
``exited:<n>``   it ended with another status                       -> FAILED
``cancelled``    :meth:`LocalScheduler.cancel` signalled it          -> CANCELLED

A job that ended without recording an exit status (killed from outside) and ids that
were never submitted here are omitted from ``status``, as for any scheduler that no
longer knows a job.

Settings (``[plugins.local]``, :class:`LocalSettings`): ``cancel_grace_s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from balsam_core import (
    Allocation,
    BackfillWindow,
    BatchJobSpec,
    BatchJobState,
    NodeSpec,
    PluginContext,
    PluginError,
    SchedulerJobStatus,
    SchedulerPlugin,
    ScriptTemplate,
    end_time_from_env,
    hookimpl,
    job_values,
    map_native_state,
)

__all__ = [
    "END_TIME_ENV",
    "NATIVE_STATES",
    "LocalScheduler",
    "LocalSettings",
    "balsam_schedulers",
    "parse_native_state",
]

log = logging.getLogger(__name__)

#: Environment variable the job script exports: the allocation's end, epoch seconds.
END_TIME_ENV = "BALSAM_LOCAL_END_TIME"
#: The template's name, in the package's ``templates/`` and in ``<site_dir>/templates/``.
TEMPLATE_NAME = "local.sh"
TEMPLATE = ScriptTemplate("balsam_core.builtin", TEMPLATE_NAME, "local scheduler")
#: File the job script writes, next to itself, with the launcher's exit status.
EXIT_CODE_FILE = "exit_code"
#: File ``submit`` writes in the job's workdir: pid and start time of the job process.
ID_FILE = "local.id"
#: Combined stdout/stderr of the job script, in the job's workdir.
OUTPUT_FILE = "batch.out"
#: The site registry of submitted jobs, relative to the site directory.
REGISTRY = Path("log") / "local-jobs.json"
#: Start times of one process read by two processes may differ by clock-step jitter.
CREATE_TIME_TOLERANCE_S = 2.0
#: Registry entries of ended jobs older than this are dropped at the next submit.
REGISTRY_RETENTION_S = 30 * 86400.0

#: Native state -> Balsam state.  ``exited:<n>`` for any other integer n is FAILED
#: (see :func:`parse_native_state`); anything else is UNKNOWN, with a warning.
NATIVE_STATES: Mapping[str, BatchJobState] = {
    "running": BatchJobState.RUNNING,
    "exited:0": BatchJobState.FINISHED,
    "exited": BatchJobState.FAILED,
    "cancelled": BatchJobState.CANCELLED,
}


def parse_native_state(native: str) -> BatchJobState:
    """Map a native state through :data:`NATIVE_STATES`; UNKNOWN (with a warning) if unmapped."""
    state = NATIVE_STATES.get(native)
    if state is not None:
        return state
    kind, sep, code = native.partition(":")
    if sep and kind in NATIVE_STATES and _is_int(code):
        return NATIVE_STATES[kind]
    return map_native_state({}, native, "local scheduler")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LocalSettings:
    """``[plugins.local]``."""

    #: Seconds between SIGTERM and SIGKILL when a job is cancelled.
    cancel_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.cancel_grace_s < 0:
            raise ValueError("cancel_grace_s must be >= 0")


class LocalScheduler:
    """Batch jobs as detached local processes (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        site_dir: Path,
        node_cpus: int,
        gpus_per_node: int = 0,
        settings: LocalSettings | None = None,
    ) -> None:
        self.site_dir = Path(site_dir)
        self.node_cpus = node_cpus
        self.gpus_per_node = gpus_per_node
        self.settings = settings or LocalSettings()
        self.registry_path = self.site_dir / REGISTRY
        # Jobs this object started: polled (reaped) so that none lingers as a zombie.
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def from_context(cls, context: PluginContext) -> LocalScheduler:
        """The factory the plugin manager calls."""
        settings = context.settings if context.settings is not None else LocalSettings()
        launcher = context.config.launcher
        return cls(context.site_dir, launcher.node_cpus, launcher.gpus_per_node, settings)

    # ------------------------------------------------------------------ script

    def template_text(self) -> tuple[str, str]:
        """The template text and where it came from (for error messages)."""
        return TEMPLATE.text(self.site_dir)

    def render_script(self, job: BatchJobSpec) -> str:
        """The job script: the template with every value shell-quoted."""
        if job.num_nodes != 1:
            raise PluginError(
                f"local scheduler runs jobs on this one machine; batch job {job.job_id} asks "
                f"for {job.num_nodes} nodes: set max_nodes = 1 in [scheduler.queues.{job.queue}]"
            )
        return TEMPLATE.render(self.site_dir, job_values(job, "local scheduler"))

    # ------------------------------------------------------------------ submit

    def submit(self, script: Path, job: BatchJobSpec) -> str:
        """Start ``bash <script>`` detached; return its pid as the job id."""
        script = Path(script).resolve()
        workdir = Path(job.workdir)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            with open(workdir / OUTPUT_FILE, "ab") as out:
                proc = subprocess.Popen(
                    ["bash", str(script)],
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise PluginError(
                f"local scheduler: cannot start batch job {job.job_id} ({script}): {exc}"
            ) from None
        scheduler_id = str(proc.pid)
        self._children[scheduler_id] = proc
        try:
            # Not reaped yet, so even a job that already exited is still readable.
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:  # pragma: no cover - only if someone else reaped it
            create_time = time.time()
        entry = {
            "pid": proc.pid,
            "create_time": create_time,
            "workdir": str(workdir),
            "script": str(script),
            "job_id": job.job_id,
            "num_nodes": job.num_nodes,
            "wall_time_min": job.wall_time_min,
            "submitted": time.time(),
        }
        _write_json(workdir / ID_FILE, entry)
        with self._registry() as jobs:
            self._prune(jobs)
            jobs[scheduler_id] = entry
        log.info("local scheduler: batch job %s started as pid %s", job.job_id, proc.pid)
        return scheduler_id

    # ------------------------------------------------------------------ status

    def status(self, scheduler_ids: Sequence[str]) -> dict[str, SchedulerJobStatus]:
        """One pass over *scheduler_ids*; ids unknown here or without a trace are omitted."""
        self._reap()
        jobs = self._read_registry()
        result: dict[str, SchedulerJobStatus] = {}
        for scheduler_id in scheduler_ids:
            entry = jobs.get(str(scheduler_id))
            if entry is None:
                continue
            native = self._native_state(entry)
            if native is None:
                continue
            result[scheduler_id] = SchedulerJobStatus(
                scheduler_id=scheduler_id,
                state=parse_native_state(native),
                native_state=native,
                num_nodes=entry.get("num_nodes"),
                wall_time_min=entry.get("wall_time_min"),
            )
        return result

    def _native_state(self, entry: Mapping[str, Any]) -> str | None:
        if _live_process(entry) is not None:
            return "running"
        if entry.get("cancelled"):
            return "cancelled"
        exit_file = Path(entry["script"]).parent / EXIT_CODE_FILE
        try:
            code = exit_file.read_text().strip()
        except OSError:
            return None  # ended without a trace (killed from outside): not known any more
        return f"exited:{code}"

    # ------------------------------------------------------------------ cancel

    def cancel(self, scheduler_id: str) -> None:
        """SIGTERM to the job's process group, SIGKILL after ``cancel_grace_s``.

        No error if the job is already gone or was never submitted here.
        """
        entry = self._read_registry().get(str(scheduler_id))
        proc = _live_process(entry) if entry is not None else None
        if proc is None:
            self._reap()
            return
        with self._registry() as jobs:
            if str(scheduler_id) in jobs:
                jobs[str(scheduler_id)]["cancelled"] = True
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            tree = [proc]
        _signal_group(proc.pid, signal.SIGTERM)
        alive = self._wait_gone(tree, self.settings.cancel_grace_s)
        if alive:
            log.warning(
                "local scheduler: job %s still running %.0f s after SIGTERM: SIGKILL",
                scheduler_id,
                self.settings.cancel_grace_s,
            )
            _signal_group(proc.pid, signal.SIGKILL)
            for p in alive:  # members that left the group (e.g. tasks in their own session)
                with contextlib.suppress(psutil.Error):
                    for child in p.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            child.kill()
                    p.kill()
            self._wait_gone(alive, 5.0)
        self._reap()

    def _wait_gone(self, procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
        """Wait until every process in *procs* ended (zombies count as ended)."""
        deadline = time.monotonic() + timeout
        alive = list(procs)
        delay = 0.005
        while True:
            self._reap()
            alive = [p for p in alive if _running(p)]
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    # ------------------------------------------------------------------ allocation

    def allocation(self) -> Allocation:
        """This machine as one node; the end time from ``BALSAM_LOCAL_END_TIME`` if set."""
        node = NodeSpec(
            socket.gethostname(),
            cpus=self.node_cpus,
            gpu_ids=tuple(range(self.gpus_per_node)),
        )
        end_time = end_time_from_env("local scheduler", END_TIME_ENV)
        return Allocation(nodes=(node,), end_time=end_time)

    def backfill_windows(self) -> list[BackfillWindow]:
        """Always empty: the local machine has no queue, so there is nothing to backfill
        (a submitted job starts at once; job packing needs no window to size it)."""
        return []

    # ------------------------------------------------------------------ internals

    def _reap(self) -> None:
        """Collect the exit status of finished children so none stays a zombie."""
        for scheduler_id, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[scheduler_id]

    def _read_registry(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.registry_path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PluginError(f"local scheduler: cannot read {self.registry_path}: {exc}") from None
        try:
            jobs = json.loads(text)
            if not isinstance(jobs, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise PluginError(
                f"{self.registry_path}: corrupt local job registry ({exc}); "
                "remove it once no local batch job is running"
            ) from None
        return jobs

    @contextlib.contextmanager
    def _registry(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Read-modify-write the registry under an exclusive lock; written atomically."""
        self.registry_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.registry_path.with_name(self.registry_path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                jobs = self._read_registry()
                yield jobs
                _write_json(self.registry_path, jobs)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _prune(jobs: dict[str, dict[str, Any]]) -> None:
        cutoff = time.time() - REGISTRY_RETENTION_S
        for scheduler_id, entry in list(jobs.items()):
            if entry.get("submitted", 0.0) < cutoff and _live_process(entry) is None:
                del jobs[scheduler_id]


def _live_process(entry: Mapping[str, Any]) -> psutil.Process | None:
    """The job's process if it still runs: same pid *and* start time, not a zombie."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        with proc.oneshot():
            create_time = proc.create_time()
            status = proc.status()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    if abs(create_time - float(entry["create_time"])) > CREATE_TIME_TOLERANCE_S:
        return None  # the pid was reused by another process
    return None if status == psutil.STATUS_ZOMBIE else proc


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _write_json(path: Path, data: Any) -> None:
    """Write *data* to *path* atomically (temporary file + ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@hookimpl
def balsam_schedulers() -> list[SchedulerPlugin]:
    return [
        SchedulerPlugin(
            "local",
            LocalScheduler.from_context,
            "no batch system: each batch job runs the launcher as a process on this machine",
            settings=LocalSettings,
        )
    ]
