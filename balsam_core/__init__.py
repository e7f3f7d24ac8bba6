"""Balsam core: the public surface that plugins and users import.

Plugins (external and built-in) import only what this module exports.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BalsamError,
    ConfigError,
    DatabaseError,
    DependencyCycle,
    NotFound,
    PluginError,
    SiteNotFound,
    ValidationError,
)
from .hookspecs import hookimpl
from .plugin_types import (
    ActiveJob,
    Allocation,
    BackfillWindow,
    BatchJobSpec,
    CliCommandPlugin,
    JobRequest,
    LaunchCommand,
    LaunchSpec,
    LauncherInfo,
    LeasedTask,
    MpiLauncher,
    MpiLauncherPlugin,
    NodeResources,
    NodeSpec,
    PackingStrategy,
    PackingStrategyPlugin,
    Placement,
    PluginContext,
    QueuePolicy,
    RecoveryAction,
    RecoveryDecision,
    RecoveryPolicy,
    RecoveryPolicyPlugin,
    Scheduler,
    SchedulerJobStatus,
    SchedulerPlugin,
    StateUpdate,
    TaskFailure,
    TaskRequirements,
    TaskSource,
    TaskSourcePlugin,
    TransitionEvent,
    nodes_with_room,
)
from .states import BATCH_JOB_END, RUNNABLE, BatchJobState, InvalidTransition, State, is_allowed
from .recovery import decide_chain, describe_exit
from .taskspec import render_argv, task_environment
from .batch_scheduler import (
    END_TIME_ENV,
    CommandResult,
    CommandScheduler,
    CommandSchedulerSettings,
    ScriptTemplate,
    check_directive,
    check_word,
    command_error,
    end_time_from_env,
    expand_ranges,
    job_values,
    map_native_state,
    parse_duration_min,
    read_nodefile,
    run_command,
)
from .mpi_support import (
    MpiexecLauncher,
    MpiexecSettings,
    RankEnvironment,
    find_executable,
    rank_environment,
)

if TYPE_CHECKING:  # pragma: no cover
    from . import models
    from .api import Site
    from .fastforward import (
        FAST_FORWARD, LEASED_FROM, NOTHING_TO_DO_SQL, leasable, leasable_sql, nothing_after_run,
        nothing_to_do, skip,
    )
    from .rawsql import RawSql
    from .transitions import Change

#: Names imported on first use: they pull in SQLAlchemy, which plugins that only
#: declare records (and processes that only import them) need not pay for.
_LAZY = {
    "Site": ("api", "Site"),
    "Change": ("transitions", "Change"),
    "models": ("models", None),
    "FAST_FORWARD": ("fastforward", "FAST_FORWARD"),
    "LEASED_FROM": ("fastforward", "LEASED_FROM"),
    "NOTHING_TO_DO_SQL": ("fastforward", "NOTHING_TO_DO_SQL"),
    "nothing_to_do": ("fastforward", "nothing_to_do"),
    "nothing_after_run": ("fastforward", "nothing_after_run"),
    "leasable": ("fastforward", "leasable"),
    "leasable_sql": ("fastforward", "leasable_sql"),
    "skip": ("fastforward", "skip"),
    "RawSql": ("rawsql", "RawSql"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'balsam_core' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value

__version__ = "0.1.0"

__all__ = [
    "BATCH_JOB_END",
    "FAST_FORWARD",
    "LEASED_FROM",
    "NOTHING_TO_DO_SQL",
    "RUNNABLE",
    "ActiveJob",
    "Allocation",
    "BackfillWindow",
    "BalsamError",
    "BatchJobSpec",
    "BatchJobState",
    "Change",
    "CliCommandPlugin",
    "ConfigError",
    "DatabaseError",
    "DependencyCycle",
    "InvalidTransition",
    "JobRequest",
    "LaunchCommand",
    "LaunchSpec",
    "LauncherInfo",
    "LeasedTask",
    "MpiLauncher",
    "MpiLauncherPlugin",
    "NodeResources",
    "nodes_with_room",
    "NodeSpec",
    "NotFound",
    "PackingStrategy",
    "PackingStrategyPlugin",
    "Placement",
    "PluginContext",
    "PluginError",
    "QueuePolicy",
    "RecoveryAction",
    "RecoveryDecision",
    "RecoveryPolicy",
    "RecoveryPolicyPlugin",
    "Scheduler",
    "SchedulerJobStatus",
    "SchedulerPlugin",
    "Site",
    "SiteNotFound",
    "State",
    "StateUpdate",
    "TaskFailure",
    "TaskRequirements",
    "TaskSource",
    "TaskSourcePlugin",
    "TransitionEvent",
    "ValidationError",
    "hookimpl",
    "leasable",
    "leasable_sql",
    "models",
    "nothing_after_run",
    "nothing_to_do",
    "skip",
    "render_argv",
    "task_environment",
    "MpiexecLauncher",
    "MpiexecSettings",
    "RankEnvironment",
    "RawSql",
    "find_executable",
    "rank_environment",
    "decide_chain",
    "describe_exit",
    "is_allowed",
    "END_TIME_ENV",
    "CommandResult",
    "CommandScheduler",
    "CommandSchedulerSettings",
    "ScriptTemplate",
    "check_directive",
    "check_word",
    "command_error",
    "end_time_from_env",
    "expand_ranges",
    "job_values",
    "map_native_state",
    "parse_duration_min",
    "read_nodefile",
    "run_command",
    "__version__",
]
