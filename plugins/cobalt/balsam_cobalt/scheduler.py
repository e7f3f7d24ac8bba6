"""The Cobalt scheduler (ALCF Theta, Cooley): ``qsub``, ``qstat``, ``qdel``.

* **submit**: ``qsub --cwd <workdir> -o <workdir>/cobalt.out -e <workdir>/cobalt.err
  --debuglog <workdir>/cobalt.log [--mode <mode>] <script>`` (the script carries
  ``#COBALT`` directives); qsub prints the numeric job id as its last stdout line.
* **status**: one ``qstat -l --header JobID:State:Nodes:WallTime <ids>``: blocks of
  ``Key : value`` lines, one block per job.  Cobalt keeps no history: a job that ended
  is no longer listed, and ids it does not list are omitted.
* **cancel**: ``qdel <id>``; when it fails, a job ``qstat`` no longer lists is no error.
* **allocation**: ``COBALT_PARTNAME`` ranges (``1-3,7``) turned into host names with
  ``node_name_format`` (``nid{:05d}``: ``nid00001``...), or the hosts of
  ``COBALT_NODEFILE`` (Cooley, ThetaGPU); end time from ``BALSAM_JOB_END_TIME``, set by
  the job template.  No backfill windows.
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
    PluginError,
    SchedulerJobStatus,
    ScriptTemplate,
    command_error,
    end_time_from_env,
    expand_ranges,
    map_native_state,
    parse_duration_min,
    read_nodefile,
)

__all__ = ["NATIVE_STATES", "CobaltScheduler", "CobaltSettings", "parse_qstat_long"]

log = logging.getLogger(__name__)

WHAT = "cobalt"
TEMPLATE = ScriptTemplate("balsam_cobalt", "cobalt.sh", WHAT)
DEFAULT_QUEUE = "default"

B = BatchJobState
#: Cobalt job state (qstat ``State``) -> Balsam state.
NATIVE_STATES: Mapping[str, BatchJobState] = {
    "queued": B.QUEUED,
    "user_hold": B.QUEUED,
    "admin_hold": B.QUEUED,
    "dep_hold": B.QUEUED,
    "maxrun_hold": B.QUEUED,
    # resources assigned, the job script not started yet
    "starting": B.QUEUED,
    "running": B.RUNNING,
    "exiting": B.RUNNING,
    "killing": B.CANCELLED,
    "dep_fail": B.FAILED,
}

_JOB_ID = re.compile(r"^\d+$")


@dataclass(frozen=True)
class CobaltSettings(CommandSchedulerSettings):
    """``[plugins.cobalt]``."""

    DIRECTIVE_WORDS = ("project", "attrs", "mode")

    #: ``-A`` for jobs whose project is empty (``[scheduler] project`` wins).
    project: str = ""
    #: ``--attrs`` (e.g. "enable_ssh=1:ssds=required"); empty: none.
    attrs: str = ""
    #: ``--mode`` passed to qsub ("script" on Theta; empty: none).
    mode: str = "script"
    #: Host name of node number n in COBALT_PARTNAME (Python format).
    node_name_format: str = "nid{:05d}"
    #: More ``#COBALT`` lines, each written as ``#COBALT <item>``.
    extra_directives: list[str] = field(default_factory=list)
    command_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.node_name_format.format(1)
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"node_name_format = {self.node_name_format!r}: {exc}") from None


class CobaltScheduler(CommandScheduler):
    """Batch jobs through Cobalt (see the module docstring).

    ``CobaltScheduler(site_dir, settings=None, cpus_per_node=1, gpus_per_node=0)``;
    :meth:`from_context` passes ``[launcher]``'s CPUs per node (0: this machine's count).
    """

    name = WHAT
    settings_type = CobaltSettings
    template = TEMPLATE
    settings: CobaltSettings

    # ------------------------------------------------------------------ script

    def directives(self, job: BatchJobSpec) -> list[str]:
        """The ``#COBALT`` lines for *job* beyond nodes and time."""
        s = self.settings
        lines = []
        for flag, name, value in (
            ("-q", "queue", job.queue if job.queue != DEFAULT_QUEUE else ""),
            ("-A", "project", job.project or s.project),
            ("--attrs", "attrs", s.attrs),
        ):
            if value:
                lines.append(f"#COBALT {flag} {self.directive_word(job, name, value)}")
        lines.extend(f"#COBALT {item}" for item in s.extra_directives)
        return lines

    # ------------------------------------------------------------------ submit

    def submit(self, script: Path, job: BatchJobSpec) -> str:
        """``qsub``; return the numeric id it prints last."""
        w = Path(job.workdir)
        argv = ["qsub", "--cwd", str(w), "-o", str(w / "cobalt.out"), "-e", str(w / "cobalt.err"),
                "--debuglog", str(w / "cobalt.log")]
        if self.settings.mode:
            argv += ["--mode", self.settings.mode]
        return self.submitted_id(self._run([*argv, str(script)]), job, _JOB_ID)

    # ------------------------------------------------------------------ status

    def status(self, scheduler_ids: Sequence[str]) -> dict[str, SchedulerJobStatus]:
        """One ``qstat -l`` for all ids; ids it does not list are omitted."""
        wanted = self.well_formed_ids(scheduler_ids, _JOB_ID)
        if not wanted:
            return {}
        result = self._run(["qstat", "-l", "--header", "JobID:State:Nodes:WallTime", *wanted],
                           check=False)
        # qstat exits 1 with no output at all when none of the ids is known
        if result.returncode != 0 and (result.stdout.strip() or result.stderr.strip()):
            raise command_error(WHAT, result)
        jobs = parse_qstat_long(result)
        found: dict[str, SchedulerJobStatus] = {}
        for sid in wanted:
            attrs = jobs.get(sid)
            if attrs is None:
                continue
            native = attrs.get("state", "")
            if not native:
                raise command_error(WHAT, result, f"no State for job {sid}")
            nodes = attrs.get("nodes", "")
            wall = attrs.get("walltime", "")
            found[sid] = SchedulerJobStatus(
                scheduler_id=sid,
                state=map_native_state(NATIVE_STATES, native, WHAT),
                native_state=native,
                num_nodes=int(nodes) if nodes.isdigit() else None,
                wall_time_min=parse_duration_min(wall) if wall else None,
            )
        return found

    # ------------------------------------------------------------------ cancel

    def cancel(self, scheduler_id: str) -> None:
        """``qdel <id>``; no error if Cobalt no longer lists the job."""
        sid = self.id_to_cancel(scheduler_id, _JOB_ID, "Cobalt")
        result = self._run(["qdel", sid], check=False)
        if result.returncode != 0 and sid in self.status([sid]):
            raise command_error(WHAT, result)

    # ------------------------------------------------------------------ allocation

    def allocation(self) -> Allocation:
        """Nodes from ``COBALT_PARTNAME`` (or ``COBALT_NODEFILE``); end from the template."""
        partname = os.environ.get("COBALT_PARTNAME", "").strip()
        if partname:
            try:
                numbers = expand_ranges(partname)
            except ValueError as exc:
                raise PluginError(f"{WHAT}: COBALT_PARTNAME={partname!r}: {exc}") from None
            names = [self.settings.node_name_format.format(n) for n in numbers]
        elif os.environ.get("COBALT_NODEFILE"):
            names = read_nodefile(os.environ["COBALT_NODEFILE"], WHAT, "COBALT_NODEFILE")
        else:
            raise PluginError(
                f"{WHAT}: not inside a Cobalt job (COBALT_PARTNAME and COBALT_NODEFILE are not set)"
            )
        return self.allocation_of(names, end_time_from_env(WHAT))

    def backfill_windows(self) -> list[BackfillWindow]:
        """Always empty (Theta's ``nodelist`` backfill view is site-specific)."""
        return []


def parse_qstat_long(result: CommandResult) -> dict[str, dict[str, str]]:
    """``qstat -l`` output -> {job id: {lower-case key: value}}.

    Each job is a block starting with ``JobID: <n>`` followed by ``Key : value`` lines;
    blank lines separate blocks.  Anything else is garbage (PluginError)."""
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or " " in key:
            raise command_error(WHAT, result, f"unexpected qstat line {line[:80]!r}")
        if key == "jobid":
            if not _JOB_ID.match(value):
                raise command_error(WHAT, result, f"unexpected qstat line {line[:80]!r}")
            current = jobs.setdefault(value, {})
        elif current is None:
            raise command_error(WHAT, result, f"unexpected qstat line {line[:80]!r}")
        else:
            current[key] = value
    return jobs
