"""The PBS scheduler (PBS Pro / OpenPBS, and Torque): ``qsub``, ``qstat``, ``qdel``.

Two flavours (``[plugins.pbs] flavor``):

``pbspro``  nodes as ``-l select=N[:resources]``; status from one
            ``qstat -x -f -F json <ids>`` (``-x``: finished jobs too, from the history)
``torque``  nodes as ``-l nodes=N[:resources]``; status from one ``qstat -f <ids>``
            in the ``key = value`` text format (Torque, and Slurm's Torque wrappers)

Both: ``qsub -o <workdir>/pbs.out -e <workdir>/pbs.err <script>`` prints the id
(``123.server`` for PBS Pro, ``123`` for the Slurm wrapper); the id is kept as printed.
``qstat`` exits non-zero when some id is unknown ("Unknown Job Id", "Job has finished"
on stderr, or a bare exit status 153 from Slurm's Torque wrapper): those ids are omitted
and the others still reported; any other error is raised.
``qdel <id>``: when it fails, the job is looked up; a job that is unknown or over is no
error.  Allocation: unique host names of ``PBS_NODEFILE``; CPUs per node from
``[launcher] cpus_per_node`` (else this machine's count); end time from
``BALSAM_JOB_END_TIME``, which the job template sets.  No backfill windows.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balsam_core import (
    BATCH_JOB_END,
    Allocation,
    BackfillWindow,
    BatchJobSpec,
    BatchJobState,
    CommandResult,
    CommandScheduler,
    CommandSchedulerSettings,
    PluginError,
    SchedulerJobStatus,
    ScriptTemplate,
    command_error,
    end_time_from_env,
    map_native_state,
    parse_duration_min,
    read_nodefile,
)

__all__ = ["NATIVE_STATES", "PbsScheduler", "PbsSettings", "parse_qstat_json", "parse_qstat_text"]

log = logging.getLogger(__name__)

WHAT = "pbs"
TEMPLATE = ScriptTemplate("balsam_pbs", "pbs.sh", WHAT)
DEFAULT_QUEUE = "default"
FLAVORS = ("pbspro", "torque")

B = BatchJobState
#: PBS ``job_state`` letter -> Balsam state.  F (PBS Pro) and C (Torque) with a known
#: non-zero exit status are FAILED instead of FINISHED.
NATIVE_STATES: Mapping[str, BatchJobState] = {
    "Q": B.QUEUED,  # queued
    "H": B.QUEUED,  # held
    "W": B.QUEUED,  # waiting for its start time
    "T": B.QUEUED,  # being moved
    "M": B.QUEUED,  # moved to another server
    "R": B.RUNNING,
    "E": B.RUNNING,  # exiting after having run
    "B": B.RUNNING,  # array job begun
    "S": B.RUNNING,  # suspended
    "U": B.RUNNING,  # suspended: workstation busy
    "X": B.FINISHED,  # subjob finished
    "F": B.FINISHED,  # PBS Pro: finished (history)
    "C": B.FINISHED,  # Torque: completed
}

#: ``123.server``, ``123``, or an array job ``123[].server``.
_JOB_ID = re.compile(r"\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?")
#: Exit status of qstat for an unknown job id (PBSE_UNKJOBID 15001 % 256).
UNKNOWN_JOB_EXIT = 153
#: stderr lines of ``qstat`` / ``qdel`` about jobs that are unknown or over.
_GONE = re.compile(r"Unknown Job Id|Job has finished|job has finished|Invalid job id", re.I)


@dataclass(frozen=True)
class PbsSettings(CommandSchedulerSettings):
    """``[plugins.pbs]``."""

    DIRECTIVE_WORDS = ("account", "resources", "place")

    #: "pbspro" (OpenPBS, PBS Professional) or "torque".
    flavor: str = "pbspro"
    #: ``-A`` for jobs whose project is empty (``[scheduler] project`` wins).
    account: str = ""
    #: Appended to the node chunk: ``select=N:<resources>`` / ``nodes=N:<resources>``
    #: (e.g. "ncpus=64:ngpus=4" or "ppn=32").
    resources: str = ""
    #: PBS Pro ``-l place=`` (e.g. "scatter:excl"); empty: none.
    place: str = ""
    #: More ``#PBS`` lines, each written as ``#PBS <item>`` (e.g. "-l filesystems=home").
    extra_directives: list[str] = field(default_factory=list)
    command_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        super().__post_init__()


class PbsScheduler(CommandScheduler):
    """Batch jobs through PBS Pro or Torque (see the module docstring).

    ``PbsScheduler(site_dir, settings=None, cpus_per_node=1, gpus_per_node=0)``;
    :meth:`from_context` passes ``[launcher]``'s CPUs per node (0: this machine's count).
    """

    name = WHAT
    settings_type = PbsSettings
    template = TEMPLATE
    settings: PbsSettings

    # ------------------------------------------------------------------ script

    def directives(self, job: BatchJobSpec) -> list[str]:
        """The ``#PBS`` lines for *job* beyond name and wall time."""
        s = self.settings
        chunk = "select" if s.flavor == "pbspro" else "nodes"
        nodes = f"{chunk}={job.num_nodes}" + (f":{s.resources}" if s.resources else "")
        lines = [f"#PBS -l {nodes}"]
        if s.flavor == "pbspro" and s.place:
            lines.append(f"#PBS -l place={s.place}")
        for flag, name, value in (("-q", "queue", job.queue if job.queue != DEFAULT_QUEUE else ""),
                                  ("-A", "account", job.project or s.account)):
            if value:
                lines.append(f"#PBS {flag} {self.directive_word(job, name, value)}")
        lines.extend(f"#PBS {item}" for item in s.extra_directives)
        return lines

    def script_values(self, job: BatchJobSpec) -> dict[str, str]:
        """The standard values, ``${directives}`` and ``${walltime}`` (``HH:MM:00``)."""
        values = super().script_values(job)
        wall = int(job.wall_time_min)
        values["walltime"] = f"{wall // 60:02d}:{wall % 60:02d}:00"
        return values

    # ------------------------------------------------------------------ submit

    def submit(self, script: Path, job: BatchJobSpec) -> str:
        """``qsub``; return the id it prints (``123.server`` or ``123``)."""
        workdir = Path(job.workdir)
        result = self._run(["qsub", "-o", str(workdir / "pbs.out"), "-e", str(workdir / "pbs.err"),
                            str(script)])
        return self.submitted_id(result, job, _JOB_ID)

    # ------------------------------------------------------------------ status

    def status(self, scheduler_ids: Sequence[str]) -> dict[str, SchedulerJobStatus]:
        """One ``qstat`` for all ids; unknown ids omitted, malformed ones skipped (logged)."""
        wanted = self.well_formed_ids(scheduler_ids, _JOB_ID)
        if not wanted:
            return {}
        if self.settings.flavor == "pbspro":
            argv = ["qstat", "-x", "-f", "-F", "json", *wanted]
        else:
            argv = ["qstat", "-f", *wanted]
        result = self._run(argv, check=False)
        if result.returncode != 0:
            errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
            # 153 (PBSE_UNKJOBID % 256): Slurm's Torque wrapper says only this, no text
            silent_unknown = not errors and result.returncode == UNKNOWN_JOB_EXIT
            if not silent_unknown and not (errors and all(_GONE.search(ln) for ln in errors)):
                raise command_error(WHAT, result)
        if self.settings.flavor == "pbspro":
            jobs = parse_qstat_json(result)
        else:
            jobs = parse_qstat_text(result)
        found: dict[str, SchedulerJobStatus] = {}
        for sid in wanted:
            attrs = _lookup(jobs, sid)
            if attrs is not None:
                found[sid] = _status(sid, attrs, result)
        return found

    # ------------------------------------------------------------------ cancel

    def cancel(self, scheduler_id: str) -> None:
        """``qdel <id>``; no error if the job is unknown or already over."""
        sid = self.id_to_cancel(scheduler_id, _JOB_ID, "PBS")
        result = self._run(["qdel", sid], check=False)
        if result.returncode == 0:
            return
        # qdel's exit codes differ between flavours: ask qstat whether the job lives
        status = self.status([sid]).get(sid)
        if status is None or status.state in BATCH_JOB_END:
            return
        raise command_error(WHAT, result)

    # ------------------------------------------------------------------ allocation

    def allocation(self) -> Allocation:
        """Hosts of ``PBS_NODEFILE``; end time from ``BALSAM_JOB_END_TIME``."""
        path = os.environ.get("PBS_NODEFILE")
        if not path:
            raise PluginError(f"{WHAT}: not inside a PBS job (PBS_NODEFILE is not set)")
        names = read_nodefile(path, WHAT, "PBS_NODEFILE")
        return self.allocation_of(names, end_time_from_env(WHAT))

    def backfill_windows(self) -> list[BackfillWindow]:
        """Always empty: PBS has no standard command that reports them."""
        return []


def _lookup(jobs: Mapping[str, dict[str, Any]], sid: str) -> dict[str, Any] | None:
    """The attributes of *sid*: exact id, else same number (qstat may add the server)."""
    if sid in jobs:
        return jobs[sid]
    number = sid.split(".", 1)[0]
    for key, attrs in jobs.items():
        if key.split(".", 1)[0] == number:
            return attrs
    return None


def _status(sid: str, attrs: Mapping[str, Any], result: CommandResult) -> SchedulerJobStatus:
    letter = str(attrs.get("job_state", "")).strip()
    if not letter:
        raise command_error(WHAT, result, f"no job_state for {sid}")
    state = map_native_state(NATIVE_STATES, letter, WHAT)
    native = letter
    code = attrs.get("Exit_status", attrs.get("exit_status"))
    if code is not None and str(code).strip().lstrip("-").isdigit():
        native = f"{letter} (exit {int(code)})"
        if state is B.FINISHED and int(code) != 0:
            state = B.FAILED
    resources = attrs.get("Resource_List", {})
    nodes = resources.get("nodect") if isinstance(resources, Mapping) else None
    walltime = resources.get("walltime") if isinstance(resources, Mapping) else None
    return SchedulerJobStatus(
        scheduler_id=sid,
        state=state,
        native_state=native,
        num_nodes=int(nodes) if str(nodes).isdigit() else None,
        wall_time_min=parse_duration_min(str(walltime)) if walltime else None,
    )


def parse_qstat_json(result: CommandResult) -> dict[str, dict[str, Any]]:
    """``qstat -f -F json`` -> {id: attributes}."""
    text = result.stdout.strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
        jobs = data.get("Jobs", {}) if isinstance(data, dict) else None
        if not isinstance(jobs, dict) or not all(isinstance(v, dict) for v in jobs.values()):
            raise ValueError("no 'Jobs' object")
    except ValueError as exc:
        raise command_error(WHAT, result, f"output is not qstat JSON: {exc}") from None
    return jobs


def parse_qstat_text(result: CommandResult) -> dict[str, dict[str, Any]]:
    """``qstat -f`` text (``Job Id: X`` then indented ``key = value``) -> {id: attributes}.

    ``Resource_List.nodect`` becomes ``{"Resource_List": {"nodect": ...}}`` as in JSON;
    a line indented by a tab without `` = `` continues the previous value (PBS wraps
    long values)."""
    jobs: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    last: tuple[dict[str, Any], str] | None = None
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        if line.startswith("Job Id:"):
            current = jobs.setdefault(line.split(":", 1)[1].strip(), {})
            last = None
            continue
        if current is None:
            raise command_error(WHAT, result, f"unexpected qstat line {line[:80]!r}")
        key, sep, value = line.strip().partition(" = ")
        if not sep:
            if last is not None and line[:1] == "\t":
                target, name = last
                target[name] += line.strip()
                continue
            raise command_error(WHAT, result, f"unexpected qstat line {line[:80]!r}")
        target = current
        if "." in key:
            group, key = key.split(".", 1)
            target = current.setdefault(group, {})
        target[key] = value.strip()
        last = (target, key)
    return jobs
