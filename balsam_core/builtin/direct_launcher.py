"""The built-in ``direct`` MPI launcher: no MPI, fork one process of the task's argv.

Selected by ``[launcher] mpi = "direct"`` (the default).  It is the launcher for a
workstation, a login node, or serial tasks inside an allocation: one rank on one
node, with ``OMP_NUM_THREADS`` and ``CUDA_VISIBLE_DEVICES`` set from the task's
resources.  Anything larger is refused with a message naming the MPI launchers.

Like every plugin this module imports only the public surface of :mod:`balsam_core`
and is registered through the same path as an installed distribution.

What this plugin does *not* do: the launcher core starts the process from the
returned :class:`~balsam_core.LaunchCommand` -- it chooses the working directory
(the task's workdir), redirects stdout/stderr to the task's output file, puts the
process in its own session and watches/kills the process tree.  This plugin only
builds the argv and the environment.
"""

from __future__ import annotations

from balsam_core import (
    LaunchCommand,
    LaunchSpec,
    MpiLauncherPlugin,
    PluginContext,
    PluginError,
    hookimpl,
    rank_environment,
)

__all__ = ["DirectLauncher", "balsam_mpi_launchers"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class DirectLauncher:
    """Start a task as a plain child process: one rank, one node, no ``mpiexec``."""

    name = "direct"

    @classmethod
    def from_context(cls, context: PluginContext) -> DirectLauncher:
        """The factory the plugin manager calls; ``direct`` has no settings."""
        return cls()

    def check(self) -> None:
        """Nothing to check: forking needs no executable."""

    def command(self, spec: LaunchSpec) -> LaunchCommand:
        """The task's own argv, and ``spec.env`` plus the thread and GPU variables.

        ``OMP_NUM_THREADS`` is the task's ``threads_per_rank`` (it overrides a value in
        ``spec.env``: the resources the task was placed with win).  When the placement
        gives GPU ids, ``CUDA_VISIBLE_DEVICES`` is the comma list of the (only) node's ids.

        Raises :class:`~balsam_core.PluginError` for more than one node or more than one
        rank per node.
        """
        nodes, ranks = len(spec.nodes), spec.ranks_per_node
        if nodes > 1 or ranks > 1:
            raise PluginError(
                f"direct launcher starts one rank on one node; task {spec.task_id} asks for "
                f"{_count(nodes, 'node')} × {_count(ranks, 'rank')} per node: "
                "select an MPI launcher (mpich, openmpi, aprun) in [launcher] mpi"
            )
        ranks = rank_environment(spec)
        return LaunchCommand(argv=ranks.argv, env=ranks.env)


@hookimpl
def balsam_mpi_launchers() -> list[MpiLauncherPlugin]:
    return [
        MpiLauncherPlugin(
            "direct",
            DirectLauncher.from_context,
            "no MPI: fork the task's argv as one process (one rank, one node)",
        )
    ]
