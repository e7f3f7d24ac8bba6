"""``balsam.toml`` -> typed, validated settings.

Each section is a frozen dataclass; :func:`build` turns a TOML table into one,
checking unknown keys and types and naming the file and key in every error.  Plugin
sections (``[plugins.<name>]``) are kept raw here and built by the plugin manager
into the dataclass the owning plugin declares, with the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .plugin_types import QueuePolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_NAME = "balsam.toml"
T = TypeVar("T")


@dataclass(frozen=True)
class SiteSection:
    """``[site]``: identity and database."""

    name: str = "balsam-site"
    #: SQLAlchemy URL; a relative SQLite path is relative to the site directory.
    database: str = "sqlite:///balsam.db"
    #: How long a writer waits for a locked SQLite database before giving up.
    busy_timeout_s: float = 5.0
    #: Directories outside the site that stage-in/out may read or write.
    allowed_roots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.busy_timeout_s < 0:
            raise ValueError("busy_timeout_s must be >= 0")


@dataclass(frozen=True)
class SchedulerSection:
    """``[scheduler]``: the batch scheduler and the queue policy."""

    use: str = "local"
    project: str = ""
    queues: dict[str, QueuePolicy] = field(
        default_factory=lambda: {"local": QueuePolicy(max_queued=1, max_nodes=1)}
    )


#: Launcher modes a batch job may run (``balsam launcher --mode``).
JOB_MODES = ("mpi", "serial")


@dataclass(frozen=True)
class ServiceSection:
    """``[service]``: how ``balsam service`` keeps batch jobs queued for the backlog."""

    #: Seconds between two rounds (sync, measure, submit, retire, reclaim).
    period_s: float = 60.0
    #: At least this many seconds between two submissions; after submissions that
    #: failed in a row the gap doubles per failure, up to ``max_backoff_s``.
    submit_interval_s: float = 60.0
    max_backoff_s: float = 3600.0
    #: Launchers of the jobs the service submits exit after this long with nothing to
    #: run, handing the nodes back (0: they keep them until the wall time ends).
    job_idle_timeout_s: float = 300.0
    #: Launcher mode of the jobs the service submits.
    job_mode: str = "mpi"

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise ValueError("period_s must be > 0")
        if self.submit_interval_s < 0 or self.job_idle_timeout_s < 0:
            raise ValueError("submit_interval_s and job_idle_timeout_s must be >= 0")
        if self.max_backoff_s < self.submit_interval_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) < submit_interval_s "
                f"({self.submit_interval_s})"
            )
        if self.job_mode not in JOB_MODES:
            raise ValueError(
                f"job_mode must be one of {', '.join(JOB_MODES)}, got {self.job_mode!r}"
            )


@dataclass(frozen=True)
class LauncherSection:
    """``[launcher]``: the MPI launcher and what a node offers."""

    mpi: str = "direct"
    #: CPU slots per node; 0 means "count this machine's CPUs".
    cpus_per_node: int = 0
    gpus_per_node: int = 0
    #: Flags added to every MPI launch at this site.
    mpi_flags: list[str] = field(default_factory=list)
    #: Seconds between a launcher's heartbeats (which renew all its leases); a launcher
    #: with no heartbeat for ``lease_s`` is lost and its tasks are reclaimed.
    heartbeat_s: float = 10.0
    lease_s: float = 60.0

    def __post_init__(self) -> None:
        if self.cpus_per_node < 0 or self.gpus_per_node < 0:
            raise ValueError("cpus_per_node and gpus_per_node must be >= 0")
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ValueError(
                f"need 0 < heartbeat_s < lease_s (got {self.heartbeat_s} and {self.lease_s})"
            )

    @property
    def node_cpus(self) -> int:
        """CPU slots per node, with 0 resolved to this machine's count."""
        return self.cpus_per_node or (os.cpu_count() or 1)


@dataclass(frozen=True)
class TaskSourceSection:
    """``[task_source]``: where launchers get tasks."""

    use: str = "database"


@dataclass(frozen=True)
class PackingSection:
    """``[packing]``: the node- and job-packing strategy."""

    use: str = "fifo"


@dataclass(frozen=True)
class RecoverySection:
    """``[recovery]``: the chain of recovery policies and their shared knobs."""

    chain: list[str] = field(
        default_factory=lambda: ["app-handler", "retry-timeout", "retry-transient"]
    )
    max_retries: int = 3
    #: Exit codes and signals (as positive numbers) that ``retry-transient`` retries.
    transient_exit_codes: list[int] = field(default_factory=list)
    transient_signals: list[int] = field(default_factory=lambda: [7, 9, 11])
    #: First retry delay; doubled at every further attempt.
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_s < 0:
            raise ValueError("backoff_s must be >= 0")
        if len(set(self.chain)) != len(self.chain):
            raise ValueError(f"chain lists a policy twice: {self.chain}")


@dataclass(frozen=True)
class SiteConfig:
    """A site's whole validated configuration."""

    site_dir: Path
    site: SiteSection = field(default_factory=SiteSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    launcher: LauncherSection = field(default_factory=LauncherSection)
    task_source: TaskSourceSection = field(default_factory=TaskSourceSection)
    packing: PackingSection = field(default_factory=PackingSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)
    #: Raw ``[plugins.<name>]`` tables; validated by the plugin when it is selected.
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.site_dir / CONFIG_NAME

    @property
    def data_dir(self) -> Path:
        return self.site_dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.site_dir / "log"

    def selections(self) -> dict[str, list[str]]:
        """The plugin names this site selects, by record kind."""
        return {
            "scheduler": [self.scheduler.use],
            "mpi_launcher": [self.launcher.mpi],
            "task_source": [self.task_source.use],
            "packing_strategy": [self.packing.use],
            "recovery_policy": list(self.recovery.chain),
        }


_SECTIONS: dict[str, type] = {
    "site": SiteSection,
    "scheduler": SchedulerSection,
    "service": ServiceSection,
    "launcher": LauncherSection,
    "task_source": TaskSourceSection,
    "packing": PackingSection,
    "recovery": RecoverySection,
}


def load(site_dir: Path) -> SiteConfig:
    """Read and validate ``site_dir/balsam.toml``; raise :class:`ConfigError` on any problem."""
    path = site_dir / CONFIG_NAME
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return from_dict(raw, site_dir, source=str(path))


def from_dict(raw: dict[str, Any], site_dir: Path, source: str = CONFIG_NAME) -> SiteConfig:
    """Validate an already parsed TOML document (see :func:`load`)."""
    allowed = [*_SECTIONS, "plugins"]
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}] (allowed: {', '.join(allowed)})"
        )
    sections = {
        name: build(cls, _table(raw.get(name, {}), source, name), source, name)
        for name, cls in _SECTIONS.items()
    }
    plugins = _table(raw.get("plugins", {}), source, "plugins")
    for name, table in plugins.items():
        _table(table, source, f"plugins.{name}")
    return SiteConfig(site_dir=site_dir.resolve(), plugins=plugins, **sections)


def _table(value: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{where}] must be a table, got {_describe(value)}")
    return value


def build(cls: type[T], table: dict[str, Any], source: str, where: str) -> T:
    """Build dataclass *cls* from a TOML table, checking keys, types and ``__post_init__``."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key '{key}' in [{where}] (allowed: {', '.join(fields)})"
            )
        kwargs[key] = _convert(hints[key], value, source, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: [{where}]: {exc}") from None


def _convert(hint: Any, value: Any, source: str, where: str) -> Any:
    """Check *value* against type *hint*, building nested dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, source, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, _table(value, source, where), source, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(source, where, "a list", value)
        return [_convert(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        table = _table(value, source, where)
        return {k: _convert(args[1], v, source, f"{where}.{k}") for k, v in table.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _type_error(source, where, "a finite number", value)
            return float(value)
        raise _type_error(source, where, "a number", value)
    expected = {bool: "true or false", int: "an integer", str: "a string"}
    if hint in expected:
        if type(value) is not hint:
            raise _type_error(source, where, expected[hint], value)
        return value
    raise ConfigError(f"{source}: {where}: unsupported setting type {hint!r}")  # plugin bug


def _type_error(source: str, where: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: {where}: expected {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    kind = {
        dict: "a table", list: "a list", bool: "a boolean", str: "a string",
        int: "an integer", float: "a number",
    }.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, (dict, list)) else kind
