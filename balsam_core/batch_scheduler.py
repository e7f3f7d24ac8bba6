"""Shared helpers for scheduler plugins that drive a batch system through its commands.

In the style of Balsam 2's ``SubprocessSchedulerInterface`` and psij's batch
executors, a scheduler plugin is a script template, a few ``render -> run -> parse``
pairs and a native-state table.  This module holds the parts every such plugin needs:

* :class:`CommandScheduler`: the base class of such a plugin's scheduler (constructor,
  ``from_context`` factory, ``render_script``, ``_run``), and
  :class:`CommandSchedulerSettings`, the base of its ``[plugins.<name>]`` dataclass
  (the checks of ``extra_directives``, ``command_timeout_s`` and directive words);
* :class:`ScriptTemplate`: a submit-script template shipped as package data
  (``<package>/templates/<name>``), overridable by the site file
  ``<site_dir>/templates/<name>``, rendered with :class:`string.Template`;
  :func:`job_values` gives the standard, shell-quoted placeholder values of a job;
* :func:`run_command`: one scheduler command as an argv list (never a shell), with a
  timeout; a missing program, a non-zero exit or a timeout become one-line
  :class:`~balsam_core.errors.PluginError` naming the command and its stderr tail;
* :func:`map_native_state`: native state -> :class:`BatchJobState` through a table,
  UNKNOWN (with a warning) for anything the table does not know;
* :func:`expand_ranges` for ``1-3,7`` style node lists and :func:`parse_duration_min`
  for ``[days-]hh:mm:ss`` durations.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import shlex
import string
import subprocess
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import PluginError
from .plugin_types import Allocation, BatchJobSpec, NodeSpec, PluginContext
from .states import BatchJobState

__all__ = [
    "CommandResult",
    "CommandScheduler",
    "CommandSchedulerSettings",
    "ScriptTemplate",
    "check_directive",
    "check_word",
    "command_error",
    "describe_argv",
    "END_TIME_ENV",
    "end_time_from_env",
    "expand_ranges",
    "job_values",
    "map_native_state",
    "parse_duration_min",
    "read_nodefile",
    "run_command",
]

log = logging.getLogger(__name__)

#: Characters of stderr (its end) quoted in an error message.
STDERR_TAIL = 300


@dataclass(frozen=True)
class CommandResult:
    """A scheduler command that ran to completion (whatever its exit status)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _tail(text: str, limit: int = STDERR_TAIL) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else "..." + one_line[-limit:]


def describe_argv(argv: Sequence[str], limit: int = 120) -> str:
    """*argv* as a short shell-like string for messages."""
    text = shlex.join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run *argv* (no shell) and return its output.

    *what* names the caller in messages (e.g. ``"slurm"``).  Raises
    :class:`PluginError`, one line, when the program is missing or not executable,
    when it runs longer than *timeout* seconds (it is killed), and — with *check* —
    when it exits non-zero.  Output is decoded as UTF-8 with replacement, so garbage
    bytes never raise here; parsing them is the caller's job.
    """
    argv = tuple(str(a) for a in argv)
    shown = describe_argv(argv)
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )
    except FileNotFoundError:
        raise PluginError(f"{what}: command '{argv[0]}' not found (is it on PATH?)") from None
    except PermissionError:
        raise PluginError(f"{what}: command '{argv[0]}' is not executable") from None
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else ""
        extra = f": {_tail(err)}" if err.strip() else ""
        raise PluginError(
            f"{what}: '{shown}' did not finish within {timeout:g} s (killed){extra}"
        ) from None
    except OSError as exc:
        raise PluginError(f"{what}: cannot run '{shown}': {exc.strerror or exc}") from None
    result = CommandResult(
        argv,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise command_error(what, result)
    return result


def command_error(what: str, result: CommandResult, reason: str = "") -> PluginError:
    """The one-line error for a command that failed or printed something unusable."""
    detail = reason or f"exit status {result.returncode}"
    tail = _tail(result.stderr) or _tail(result.stdout)
    return PluginError(
        f"{what}: '{describe_argv(result.argv)}' failed ({detail})" + (f": {tail}" if tail else "")
    )


# --------------------------------------------------------------------------- templates


class ScriptTemplate:
    """A submit-script template: package data, overridable per site.

    The template is ``<package>/templates/<name>``; a file ``<site_dir>/templates/<name>``
    wins.  Placeholders are :class:`string.Template` ones (``${name}``); ``$$`` is a
    literal dollar sign.  Values are inserted as given: use :func:`job_values` for
    shell-quoted ones.
    """

    def __init__(self, package: str, name: str, what: str) -> None:
        self.package = package
        self.name = name
        self.what = what

    def site_path(self, site_dir: Path) -> Path:
        """Where a site overrides this template."""
        return Path(site_dir) / "templates" / self.name

    def text(self, site_dir: Path) -> tuple[str, str]:
        """The template text and where it came from (for error messages)."""
        override = self.site_path(site_dir)
        if override.is_file():
            try:
                return override.read_text(), str(override)
            except (OSError, UnicodeDecodeError) as exc:
                raise PluginError(f"{override}: cannot read template: {exc}") from None
        resource = importlib.resources.files(self.package).joinpath("templates", self.name)
        try:
            return resource.read_text(), f"{self.package}:templates/{self.name}"
        except (OSError, UnicodeDecodeError) as exc:  # pragma: no cover - broken install
            raise PluginError(
                f"{self.what}: template templates/{self.name} missing from package "
                f"{self.package} ({exc}); reinstall the plugin"
            ) from None

    def render(self, site_dir: Path, values: Mapping[str, str]) -> str:
        """Fill the template; an unknown placeholder or a stray ``$`` is a PluginError."""
        text, origin = self.text(site_dir)
        try:
            return string.Template(text).substitute(values)
        except KeyError as exc:
            raise PluginError(
                f"{origin}: unknown placeholder ${{{exc.args[0]}}} (known: "
                f"{', '.join(sorted(values))}; write $$ for a literal $)"
            ) from None
        except ValueError as exc:
            raise PluginError(f"{origin}: {exc} (write $$ for a literal $)") from None


def job_values(job: BatchJobSpec, what: str) -> dict[str, str]:
    """The standard placeholders of *job*, each shell-quoted (one shell word).

    ``job_id queue project num_nodes wall_time_min job_mode workdir`` plus
    ``launcher_argv`` (the whole launcher command line) and every key of
    ``job.extra``.  Raises PluginError for a job no scheduler can take.
    """
    if isinstance(job.num_nodes, bool) or not isinstance(job.num_nodes, int) or job.num_nodes < 1:
        raise PluginError(f"{what}: batch job {job.job_id}: num_nodes must be >= 1, got {job.num_nodes!r}")
    wall = int(job.wall_time_min)
    if wall < 1 or wall != job.wall_time_min:
        raise PluginError(
            f"{what}: batch job {job.job_id}: wall_time_min must be a whole number >= 1, "
            f"got {job.wall_time_min!r}"
        )
    if not job.launcher_argv:
        raise PluginError(f"{what}: batch job {job.job_id} has no launcher command")
    values = {str(k): shlex.quote(str(v)) for k, v in job.extra.items()}
    values.update(
        job_id=shlex.quote(str(job.job_id)),
        queue=shlex.quote(job.queue),
        project=shlex.quote(job.project),
        num_nodes=shlex.quote(str(job.num_nodes)),
        wall_time_min=shlex.quote(str(wall)),
        job_mode=shlex.quote(job.job_mode),
        workdir=shlex.quote(str(job.workdir)),
        launcher_argv=shlex.join(str(a) for a in job.launcher_argv),
    )
    return values


_WORD = re.compile(r"^[A-Za-z0-9_.,:@%+=/\[\]&|!()-]*$")


def check_word(value: str, where: str) -> str:
    """*value* if it can stand unquoted in a directive line (no blanks, quotes, ``$``...);
    else ValueError naming *where*."""
    if not _WORD.match(value):
        raise ValueError(
            f"{where} = {value!r} has characters a scheduler directive cannot hold "
            "(allowed: letters, digits and _ . , : @ % + = / [ ] & | ! ( ) -)"
        )
    return value


def check_directive(value: str, where: str) -> str:
    """*value* if it fits on one directive line (no newline or NUL); else ValueError."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"{where} = {value!r} must be one line")
    return value


# --------------------------------------------------------------------------- base classes


class CommandSchedulerSettings:
    """Base of the ``[plugins.<name>]`` settings of a :class:`CommandScheduler`.

    A plugin's settings are a frozen dataclass deriving from this class and declaring
    all its fields itself, ``extra_directives: list[str]`` (more directive lines) and
    ``command_timeout_s: float`` (seconds any command may take) among them, each in its
    place in the plugin's table: this class declares no dataclass fields, so the order of
    the keys (as configuration errors list them) is the plugin's own.

    ``__post_init__`` makes the checks all share, in this order: every setting named in
    :attr:`DIRECTIVE_WORDS` can stand unquoted in a directive line (:func:`check_word`),
    every ``extra_directives`` item is one line (:func:`check_directive`), and
    ``command_timeout_s`` is > 0.  A subclass with more checks calls
    ``super().__post_init__()`` from its own.
    """

    #: Settings written unquoted into directive lines (account, queue options...).
    DIRECTIVE_WORDS: ClassVar[tuple[str, ...]] = ()

    extra_directives: list[str]
    command_timeout_s: float

    def __post_init__(self) -> None:
        for name in self.DIRECTIVE_WORDS:
            check_word(getattr(self, name), name)
        for i, item in enumerate(self.extra_directives):
            check_directive(item, f"extra_directives[{i}]")
        if self.command_timeout_s <= 0:
            raise ValueError("command_timeout_s must be > 0")


_S = TypeVar("_S", bound="CommandScheduler")


class CommandScheduler:
    """Base of scheduler plugins that drive a batch system through its commands.

    A subclass sets :attr:`name` (the plugin's name, also the prefix of its messages),
    :attr:`settings_type` (its :class:`CommandSchedulerSettings` dataclass) and
    :attr:`template` (its :class:`ScriptTemplate`), implements :meth:`directives`, and
    the :class:`~balsam_core.Scheduler` methods ``submit``, ``status``, ``cancel``,
    ``allocation`` and ``backfill_windows``.  This class gives the constructor, the
    factory the plugin manager calls (:meth:`from_context`), :meth:`render_script` and
    :meth:`_run` (one command with the settings' ``command_timeout_s``).
    """

    name: ClassVar[str]
    settings_type: ClassVar[type[CommandSchedulerSettings]]
    template: ClassVar[ScriptTemplate]

    def __init__(
        self,
        site_dir: Path,
        settings: Any = None,
        cpus_per_node: int = 1,
        gpus_per_node: int = 0,
    ) -> None:
        self.site_dir = Path(site_dir)
        self.settings = settings if settings is not None else self.settings_type()
        #: CPUs of every node of an allocation; its GPU ids are ``0 .. gpus_per_node-1``.
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node

    @classmethod
    def cpus_per_node_from(cls, context: PluginContext) -> int:
        """The ``cpus_per_node`` :meth:`from_context` passes: ``[launcher] cpus_per_node``,
        0 resolved to this machine's CPU count (``node_cpus``)."""
        return context.config.launcher.node_cpus

    @classmethod
    def from_context(cls: type[_S], context: PluginContext) -> _S:
        """The factory the plugin manager calls (``[plugins.<name>]`` already built)."""
        settings = context.settings if context.settings is not None else cls.settings_type()
        return cls(
            context.site_dir,
            settings,
            cls.cpus_per_node_from(context),
            context.config.launcher.gpus_per_node,
        )

    def _run(
        self, argv: Sequence[str], check: bool = True, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        """:func:`run_command` with ``command_timeout_s``; messages start with :attr:`name`."""
        return run_command(
            argv, timeout=self.settings.command_timeout_s, what=self.name, check=check, env=env
        )

    # ------------------------------------------------------------------ script

    def directives(self, job: BatchJobSpec) -> list[str]:
        """The scheduler directive lines of *job*: the template's ``${directives}``."""
        raise NotImplementedError

    def directive_word(self, job: BatchJobSpec, name: str, value: str) -> str:
        """*value* of setting or job field *name* if it can stand unquoted in a directive
        line (:func:`check_word`); else a PluginError naming the batch job."""
        try:
            return check_word(value, name)
        except ValueError as exc:
            raise PluginError(f"{self.name}: batch job {job.job_id}: {exc}") from None

    def script_values(self, job: BatchJobSpec) -> dict[str, str]:
        """The template's placeholder values: :func:`job_values` and ``directives``."""
        values = job_values(job, self.name)
        values["directives"] = "\n".join(self.directives(job))
        return values

    def render_script(self, job: BatchJobSpec) -> str:
        """The job script: the template, values shell-quoted, directives validated."""
        return self.template.render(self.site_dir, self.script_values(job))

    # ------------------------------------------------------------------ shared steps

    def submitted_id(
        self,
        result: CommandResult,
        job: BatchJobSpec,
        pattern: re.Pattern[str],
        id_of: Callable[[str], str] = str.strip,
    ) -> str:
        """The job id a submit command printed on its last non-empty line (through
        *id_of*), checked against *pattern*; a PluginError if there is none."""
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        scheduler_id = id_of(lines[-1]) if lines else ""
        if not pattern.fullmatch(scheduler_id):
            raise command_error(
                self.name, result, f"no job id in its output {result.stdout.strip()[:80]!r}"
            )
        log.info("%s: batch job %s submitted as %s", self.name, job.job_id, scheduler_id)
        return scheduler_id

    def well_formed_ids(
        self, scheduler_ids: Sequence[str], pattern: re.Pattern[str]
    ) -> list[str]:
        """The ids that match *pattern*; each other one is logged and skipped."""
        wanted = [str(i) for i in scheduler_ids if pattern.fullmatch(str(i))]
        for bad in sorted(set(map(str, scheduler_ids)) - set(wanted)):
            log.warning("%s: %r is not a job id of this scheduler; skipped", self.name, bad)
        return wanted

    def id_to_cancel(self, scheduler_id: str, pattern: re.Pattern[str], kind: str) -> str:
        """*scheduler_id* as text if *pattern* matches all of it, else :class:`PluginError`
        (*kind* names the scheduler in the message): a cancel passes nothing else on."""
        sid = str(scheduler_id)
        if not pattern.fullmatch(sid):
            raise PluginError(f"{self.name}: cannot cancel {sid!r}: not a {kind} job id")
        return sid

    def allocation_of(self, names: Sequence[str], end_time: float | None) -> Allocation:
        """An allocation of the nodes *names*, each with ``cpus_per_node`` CPUs and GPU
        ids ``0 .. gpus_per_node-1``."""
        gpus = tuple(range(self.gpus_per_node))
        return Allocation(
            nodes=tuple(NodeSpec(n, cpus=self.cpus_per_node, gpu_ids=gpus) for n in names),
            end_time=end_time,
        )


# --------------------------------------------------------------------------- parsing


def map_native_state(
    table: Mapping[str, BatchJobState], native: str, what: str
) -> BatchJobState:
    """*native* through *table*; UNKNOWN with a logged warning (and a RuntimeWarning)
    for a state the table does not know."""
    state = table.get(native)
    if state is not None:
        return state
    message = f"{what}: unknown native state {native!r}, reported as UNKNOWN"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return BatchJobState.UNKNOWN


def expand_ranges(text: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``; ValueError on anything else."""
    numbers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in {text!r}")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"bad range {part!r} in {text!r}")
        numbers.extend(range(first, last + 1))
    return numbers


_DURATION = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration_min(text: str) -> float | None:
    """Minutes in a ``[days-]hh:mm:ss`` / ``hh:mm`` / ``mm`` duration (Slurm, PBS, Cobalt).

    ``None`` for unlimited (``UNLIMITED``, ``INFINITE``, ``Partition_Limit``...) and for
    text that is no duration.
    """
    match = _DURATION.match(text.strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        # Slurm: days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 3:
        h, m, s = parts
        return h * 60 + m + s / 60
    if len(parts) == 2:  # Slurm "mm:ss"; PBS never prints this form
        m, s = parts
        return m + s / 60
    return float(parts[0])


#: Set by the PBS and Cobalt job templates: when the allocation ends (epoch seconds).
END_TIME_ENV = "BALSAM_JOB_END_TIME"


def end_time_from_env(what: str, name: str = END_TIME_ENV) -> float | None:
    """The allocation's end from the environment variable *name* (None when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise PluginError(f"{what}: {name}={raw!r} is not a time in epoch seconds") from None


def read_nodefile(path: str, what: str, variable: str) -> list[str]:
    """Unique host names of a node file (one per line, repeated per rank), in order."""
    try:
        lines = Path(path).read_text().split()
    except OSError as exc:
        raise PluginError(f"{what}: cannot read {variable}={path}: {exc.strerror or exc}") from None
    names = list(dict.fromkeys(lines))
    if not names:
        raise PluginError(f"{what}: {variable}={path} lists no nodes")
    return names
