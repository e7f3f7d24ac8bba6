"""Balsam MPI launcher plugin for MPICH's Hydra process manager (``mpiexec``).

Selected by ``[launcher] mpi = "mpich"``.  A task on nodes ``n1,n2`` with 2 ranks per
node and 4 threads per rank starts as::

    mpiexec <site mpi_flags> <task mpi_flags> -n 4 -ppn 2 -hosts n1,n2 \\
        -bind-to core:4 -genvlist BALSAM_TASK_ID,...,OMP_NUM_THREADS <task argv>

The task's variables reach every rank through ``-genvlist`` (names only: values such
as tokens in a task's environment do not appear in the process list).  Site-wide
flags, e.g. ``-launcher ssh``, go in ``[launcher] mpi_flags``; a task's own in its
``mpi_flags``.

Settings (``[plugins.mpich]``, :class:`MpichSettings`):

``executable``  the Hydra ``mpiexec`` to run (default ``mpiexec``; Debian installs
                MPICH's as ``mpiexec.mpich``).  Checked when the launcher starts.
``cpu_bind``    Hydra ``-bind-to`` object each rank is bound to, with
                ``threads_per_rank`` of them (``core``, ``hwthread``, ``socket``,
                ``numa``), or ``none`` to leave binding to the system.
"""

from __future__ import annotations

from balsam_core import (
    LaunchSpec,
    MpiexecLauncher,
    MpiexecSettings,
    MpiLauncherPlugin,
    RankEnvironment,
    hookimpl,
)

__all__ = ["MpichLauncher", "MpichSettings", "balsam_mpi_launchers"]


class MpichSettings(MpiexecSettings):
    """``[plugins.mpich]``: which ``mpiexec`` to call and how ranks are bound."""


class MpichLauncher(MpiexecLauncher):
    """Builds Hydra ``mpiexec`` command lines for tasks placed on the allocation's nodes."""

    name = "mpich"
    settings_type = MpichSettings

    def placement_flags(self, spec: LaunchSpec, ranks: RankEnvironment) -> list[str]:
        flags = [
            "-n", str(spec.num_ranks), "-ppn", str(spec.ranks_per_node),
            "-hosts", ",".join(spec.nodes),
        ]
        if spec.bind and self.settings.cpu_bind != "none":
            flags += ["-bind-to", f"{self.settings.cpu_bind}:{spec.threads_per_rank}"]
        return [*flags, "-genvlist", ",".join(ranks.export)]


@hookimpl
def balsam_mpi_launchers() -> list[MpiLauncherPlugin]:
    return [
        MpiLauncherPlugin(
            "mpich",
            MpichLauncher.from_context,
            "MPICH Hydra mpiexec: -n/-ppn/-hosts, rank binding, task env via -genvlist",
            settings=MpichSettings,
        )
    ]
