"""THE plugin contract of Balsam.

Every hook is prefixed ``balsam_``, typed and documented here; built-in plugins
(:mod:`balsam_core.builtin`) implement them through the same path as installed
distributions, which declare a module in the entry-point group ``balsam``::

    # pyproject.toml of a plugin distribution
    [project.entry-points.balsam]
    cobalt = "balsam_cobalt"

Two kinds of hooks:

* **Registration hooks** (collect-all) return records — small frozen dataclasses from
  :mod:`balsam_core.plugin_types` naming what the plugin provides.  ``balsam.toml``
  selects one implementation of each kind by name.
* **Observer hooks** are told what happened; their return values are ignored.

No hook here is ``firstresult``: where several plugins answer, all answers count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pluggy

from .plugin_types import (
    CliCommandPlugin,
    MpiLauncherPlugin,
    PackingStrategyPlugin,
    RecoveryPolicyPlugin,
    SchedulerPlugin,
    TaskSourcePlugin,
    TransitionEvent,
)

PROJECT_NAME = "balsam"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------- registration


@hookspec
def balsam_schedulers() -> Iterable[SchedulerPlugin]:
    """Batch schedulers this plugin provides (selected by ``[scheduler] use``).

    Example::

        @hookimpl
        def balsam_schedulers():
            return [SchedulerPlugin("slurm", SlurmScheduler.from_context,
                                    "Slurm: sbatch/squeue/sacct/scancel",
                                    settings=SlurmSettings)]
    """


@hookspec
def balsam_mpi_launchers() -> Iterable[MpiLauncherPlugin]:
    """MPI launchers this plugin provides (selected by ``[launcher] mpi``).

    Example::

        @hookimpl
        def balsam_mpi_launchers():
            return [MpiLauncherPlugin("mpich", MpichLauncher.from_context,
                                      "MPICH Hydra mpiexec", settings=MpichSettings)]
    """


@hookspec
def balsam_task_sources() -> Iterable[TaskSourcePlugin]:
    """Task sources this plugin provides (selected by ``[task_source] use``).

    Example::

        @hookimpl
        def balsam_task_sources():
            return [TaskSourcePlugin("database", DatabaseTaskSource.from_context,
                                     "lease tasks from the site database")]
    """


@hookspec
def balsam_packing_strategies() -> Iterable[PackingStrategyPlugin]:
    """Node- and job-packing strategies this plugin provides (``[packing] use``).

    Example::

        @hookimpl
        def balsam_packing_strategies():
            return [PackingStrategyPlugin("fifo", lambda ctx: FifoPacking(),
                                          "first come, first placed")]
    """


@hookspec
def balsam_recovery_policies() -> Iterable[RecoveryPolicyPlugin]:
    """Error-recovery policies this plugin provides (ordered in ``[recovery] chain``).

    Example::

        @hookimpl
        def balsam_recovery_policies():
            return [RecoveryPolicyPlugin("retry-transient", RetryTransient.from_context,
                                         "retry listed exit codes with backoff")]
    """


@hookspec
def balsam_cli_commands() -> Iterable[CliCommandPlugin]:
    """Extra ``balsam`` sub-commands; the factory returns a ``click.Command``.

    Example::

        @hookimpl
        def balsam_cli_commands():
            return [CliCommandPlugin("hello", lambda _: hello_command, "say hello")]
    """


# --------------------------------------------------------------------------- observers


@hookspec
def balsam_task_transitions(events: Sequence[TransitionEvent]) -> None:
    """Called with every batch of task state changes, after it is committed.

    One call per transaction, in commit order; events of one call are ordered by task
    and time.  An observer must be quick and must not raise: a failing observer is
    logged and never undoes the transition.

    Example::

        @hookimpl
        def balsam_task_transitions(events):
            for e in events:
                metrics.count(e.to_state)
    """
