"""The Slurm scheduler: ``sbatch``, ``squeue`` (+ ``sacct``), ``scancel``, ``scontrol``, ``sinfo``.

A :class:`~balsam_core.CommandScheduler`: every command runs as an argv list with
``[plugins.slurm] command_timeout_s``.

* **submit**: ``sbatch --parsable --chdir=<workdir> --output=<workdir>/slurm-%j.out
  <script>``; the id is the number before an optional ``;cluster``.
* **status**: one ``squeue -h -t all -j <ids> -o %i|%T|%D|%l`` for all ids.  squeue
  forgets finished jobs ``MinJobAge`` seconds (default 300) after they end; for the ids it
  no longer knows, one ``sacct -n -X -P -j <ids> -o JobIDRaw,State,NNodes,TimelimitRaw``
  asks the accounting database (``use_sacct``).  Ids neither knows are omitted (the
  service then decides from what it saw before); when sacct is not usable (no slurmdbd)
  that is logged once per scheduler object, not raised.
* **cancel**: ``scancel <id>``; a job that already ended or is unknown is no error.
* **allocation**: ``SLURM_JOB_NODELIST`` expanded by ``scontrol show hostnames``; CPUs
  per node from ``[launcher] cpus_per_node``, else ``SLURM_JOB_CPUS_PER_NODE``; the end
  time from ``squeue -h -j $SLURM_JOB_ID -o %e`` with ``SLURM_TIME_FORMAT=%s``.
* **backfill windows**: ``sinfo -h -o %P|%a|%l|%D|%t``: idle nodes of each partition that
  is up, for the partition's time limit (``unlimited_window_min`` when it has none).

Queues: a Balsam queue name is the Slurm partition; the name ``default`` submits without
``--partition`` (the cluster's default partition), and the default partition's windows
are reported under ``default`` as well as under its own name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from balsam_core import (
    Allocation,
    BackfillWindow,
    BatchJobSpec,
    BatchJobState,
    CommandResult,
    CommandScheduler,
    CommandSchedulerSettings,
    NodeSpec,
    PluginContext,
    PluginError,
    SchedulerJobStatus,
    ScriptTemplate,
    command_error,
    map_native_state,
    parse_duration_min,
)

__all__ = ["NATIVE_STATES", "SlurmScheduler", "SlurmSettings", "parse_cpus_per_node"]

log = logging.getLogger(__name__)

WHAT = "slurm"
TEMPLATE = ScriptTemplate("balsam_slurm", "slurm.sh", WHAT)
#: The Balsam queue name that means "the cluster's default partition".
DEFAULT_QUEUE = "default"

B = BatchJobState
#: Slurm job state (squeue %T / sacct State, first word) -> Balsam state.
NATIVE_STATES: Mapping[str, BatchJobState] = {
    "PENDING": B.QUEUED,
    "REQUEUED": B.QUEUED,
    "REQUEUE_HOLD": B.QUEUED,
    "REQUEUE_FED": B.QUEUED,
    "RESV_DEL_HOLD": B.QUEUED,
    # nodes allocated but still booting: the launcher has not started yet
    "CONFIGURING": B.QUEUED,
    "RUNNING": B.RUNNING,
    "COMPLETING": B.RUNNING,
    "SUSPENDED": B.RUNNING,
    "STOPPED": B.RUNNING,
    "SIGNALING": B.RUNNING,
    "STAGE_OUT": B.RUNNING,
    "RESIZING": B.RUNNING,
    "COMPLETED": B.FINISHED,
    # the allocation ran its full course: normal for a pilot job (its tasks are
    # recovered as RUN_TIMEOUT), not a fault that should slow the service down
    "TIMEOUT": B.FINISHED,
    "CANCELLED": B.CANCELLED,
    "REVOKED": B.CANCELLED,
    "FAILED": B.FAILED,
    "NODE_FAIL": B.FAILED,
    "BOOT_FAIL": B.FAILED,
    "DEADLINE": B.FAILED,
    "OUT_OF_MEMORY": B.FAILED,
    "PREEMPTED": B.FAILED,
    "SPECIAL_EXIT": B.FAILED,
}

_JOB_ID = re.compile(r"^\d+$")
_GONE = ("Invalid job id specified", "already completing or completed", "Job has already finished")


@dataclass(frozen=True)
class SlurmSettings(CommandSchedulerSettings):
    """``[plugins.slurm]``."""

    DIRECTIVE_WORDS = ("account", "qos", "constraint", "reservation")

    #: ``--account`` for jobs whose project is empty (``[scheduler] project`` wins).
    account: str = ""
    #: ``--qos``, ``--constraint``, ``--reservation`` when not empty.
    qos: str = ""
    constraint: str = ""
    reservation: str = ""
    #: ``--exclusive``: the launcher packs the nodes itself, so it wants them whole.
    exclusive: bool = True
    #: More ``#SBATCH`` lines, each written as ``#SBATCH <item>`` (e.g. "--gpus-per-node=4").
    extra_directives: list[str] = field(default_factory=list)
    #: Seconds any Slurm command may take before it is killed and reported.
    command_timeout_s: float = 30.0
    #: Ask ``sacct`` about jobs squeue no longer knows (needs slurmdbd).
    use_sacct: bool = True
    #: Length of a backfill window on a partition without a time limit.
    unlimited_window_min: float = 1440.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unlimited_window_min <= 0:
            raise ValueError("unlimited_window_min must be > 0")


class SlurmScheduler(CommandScheduler):
    """Batch jobs through Slurm (see the module docstring)."""

    name = WHAT
    settings_type = SlurmSettings
    template = TEMPLATE
    settings: SlurmSettings

    def __init__(
        self,
        site_dir: Path,
        settings: SlurmSettings | None = None,
        cpus_per_node: int = 0,
        gpus_per_node: int = 0,
    ) -> None:
        # cpus_per_node 0: take the CPU count Slurm reports for the allocation.
        super().__init__(site_dir, settings, cpus_per_node, gpus_per_node)
        self._sacct_warned = False

    @classmethod
    def cpus_per_node_from(cls, context: PluginContext) -> int:
        """``[launcher] cpus_per_node`` as set: 0 means the count Slurm reports."""
        return context.config.launcher.cpus_per_node

    # ------------------------------------------------------------------ script

    def directives(self, job: BatchJobSpec) -> list[str]:
        """The ``#SBATCH`` lines for *job* beyond nodes, time and name."""
        s = self.settings
        options: list[tuple[str, str]] = []
        if job.queue and job.queue != DEFAULT_QUEUE:
            options.append(("partition", job.queue))
        account = job.project or s.account
        for name, value in (
            ("account", account), ("qos", s.qos), ("constraint", s.constraint),
            ("reservation", s.reservation),
        ):
            if value:
                options.append((name, value))
        lines = [f"#SBATCH --{name}={self.directive_word(job, name, value)}" for name, value in options]
        if s.exclusive:
            lines.append("#SBATCH --exclusive")
        lines.extend(f"#SBATCH {item}" for item in s.extra_directives)
        return lines

    # ------------------------------------------------------------------ submit

    def submit(self, script: Path, job: BatchJobSpec) -> str:
        """``sbatch --parsable``; return the Slurm job id."""
        workdir = Path(job.workdir)
        # '%' starts a Slurm filename pattern: a literal one is written '%%'
        output = str(workdir).replace("%", "%%") + "/slurm-%j.out"
        result = self._run(
            ["sbatch", "--parsable", f"--chdir={workdir}", f"--output={output}", str(script)]
        )
        # --parsable prints "<id>" or "<id>;<cluster>"
        return self.submitted_id(result, job, _JOB_ID, lambda line: line.split(";", 1)[0].strip())

    # ------------------------------------------------------------------ status

    def status(self, scheduler_ids: Sequence[str]) -> dict[str, SchedulerJobStatus]:
        """One squeue for all ids, one sacct for those squeue no longer knows."""
        wanted = self.well_formed_ids(scheduler_ids, _JOB_ID)
        if not wanted:
            return {}
        result = self._run(
            ["squeue", "-h", "-t", "all", "-j", ",".join(wanted), "-o", "%i|%T|%D|%l"],
            check=False,
        )
        if result.returncode != 0 and not _only_gone(result.stderr):
            raise command_error(WHAT, result)
        found = _parse_rows(result, 4, wanted)
        missing = [i for i in wanted if i not in found]
        if missing and self.settings.use_sacct:
            found.update(self._sacct(missing))
        return {i: found[i] for i in wanted if i in found}

    def _sacct(self, ids: Sequence[str]) -> dict[str, SchedulerJobStatus]:
        argv = ["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o",
                "JobIDRaw,State,NNodes,TimelimitRaw"]
        try:
            result = self._run(argv)
        except PluginError as exc:
            if not self._sacct_warned:
                log.warning("slurm: sacct unusable, finished jobs squeue forgot are "
                            "not reported: %s", exc)
                self._sacct_warned = True
            return {}
        return _parse_rows(result, 4, ids)

    # ------------------------------------------------------------------ cancel

    def cancel(self, scheduler_id: str) -> None:
        """``scancel <id>``; no error if the job already ended or is unknown."""
        sid = self.id_to_cancel(scheduler_id, _JOB_ID, "Slurm")
        result = self._run(["scancel", sid], check=False)
        if result.returncode != 0 and not _only_gone(result.stderr):
            raise command_error(WHAT, result)

    # ------------------------------------------------------------------ allocation

    def allocation(self) -> Allocation:
        """The nodes and end time of the Slurm job this process runs in."""
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
        if not nodelist or not job_id:
            raise PluginError(
                f"{WHAT}: not inside a Slurm job (SLURM_JOB_ID and SLURM_JOB_NODELIST are not set)"
            )
        result = self._run(["scontrol", "show", "hostnames", nodelist])
        names = [n.strip() for n in result.stdout.splitlines() if n.strip()]
        if not names:
            raise command_error(WHAT, result, "no host names in its output")
        if self.cpus_per_node:
            cpus = [self.cpus_per_node] * len(names)
        else:
            raw = os.environ.get("SLURM_JOB_CPUS_PER_NODE", "")
            try:
                cpus = parse_cpus_per_node(raw)
            except ValueError:
                raise PluginError(
                    f"{WHAT}: SLURM_JOB_CPUS_PER_NODE={raw!r} is not a CPU count list; "
                    "set [launcher] cpus_per_node"
                ) from None
            if len(cpus) != len(names):
                raise PluginError(
                    f"{WHAT}: SLURM_JOB_CPUS_PER_NODE={raw!r} does not match the "
                    f"{len(names)} nodes of {nodelist}"
                )
        gpus = tuple(range(self.gpus_per_node))
        nodes = tuple(NodeSpec(n, cpus=c, gpu_ids=gpus) for n, c in zip(names, cpus))
        return Allocation(nodes=nodes, end_time=self._end_time(job_id))

    def _end_time(self, job_id: str) -> float | None:
        env = dict(os.environ, SLURM_TIME_FORMAT="%s")
        result = self._run(["squeue", "-h", "-j", job_id, "-o", "%e"], env=env)
        text = result.stdout.strip()
        if text.isdigit():
            return float(text)
        if text in ("", "N/A", "Unknown", "NONE"):  # no time limit
            return None
        raise command_error(WHAT, result, f"unexpected end time {text[:40]!r}")

    # ------------------------------------------------------------------ backfill

    def backfill_windows(self) -> list[BackfillWindow]:
        """Idle nodes per partition that is up, for the partition's time limit."""
        result = self._run(["sinfo", "-h", "-o", "%P|%a|%l|%D|%t"])
        idle: dict[str, int] = {}
        limits: dict[str, float] = {}
        default = None
        for line in result.stdout.splitlines():
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) != 5 or not parts[3].strip().isdigit():
                raise command_error(WHAT, result, f"unexpected sinfo line {line[:80]!r}")
            partition, avail, limit, count, state = (p.strip() for p in parts)
            if partition.endswith("*"):
                partition = partition[:-1]
                default = partition
            minutes = parse_duration_min(limit)
            limits[partition] = self.settings.unlimited_window_min if minutes is None else minutes
            if avail == "up" and state == "idle":
                idle[partition] = idle.get(partition, 0) + int(count)
        windows = [BackfillWindow(p, n, limits[p]) for p, n in sorted(idle.items()) if n > 0]
        if default is not None and idle.get(default):
            windows.append(BackfillWindow(DEFAULT_QUEUE, idle[default], limits[default]))
        return windows


def _only_gone(stderr: str) -> bool:
    """True if every error line says the job is unknown or already over."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return bool(lines) and all(any(g in ln for g in _GONE) for ln in lines)


def _parse_rows(result: CommandResult, nfields: int, asked: Sequence[str]) -> dict[str, SchedulerJobStatus]:
    """Parse ``id|state|nodes|timelimit`` rows (squeue or sacct)."""
    asked_set = set(asked)
    rows: dict[str, SchedulerJobStatus] = {}
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != nfields or not parts[0] or not parts[1]:
            raise command_error(WHAT, result, f"unexpected output line {line[:80]!r}")
        sid, native, nodes, limit = parts
        if sid not in asked_set:
            continue  # e.g. a heterogeneous or array sibling
        native = native.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
        if result.argv[0] == "sacct":  # TimelimitRaw: minutes
            wall = float(limit) if limit.isdigit() else None
        else:
            wall = parse_duration_min(limit)
        rows[sid] = SchedulerJobStatus(
            scheduler_id=sid,
            state=map_native_state(NATIVE_STATES, native, WHAT),
            native_state=native,
            num_nodes=int(nodes) if nodes.isdigit() else None,
            wall_time_min=wall,
        )
    return rows


def parse_cpus_per_node(text: str) -> list[int]:
    """``SLURM_JOB_CPUS_PER_NODE`` (``"4(x2),8"``) -> ``[4, 4, 8]``."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"bad CPU count {part!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
