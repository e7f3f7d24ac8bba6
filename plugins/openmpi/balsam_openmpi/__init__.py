"""Balsam MPI launcher plugin for Open MPI's ``mpiexec`` (ORTE / PRRTE).

Selected by ``[launcher] mpi = "openmpi"``.  A task on nodes ``n1,n2`` with 2 ranks per
node and 4 threads per rank starts as::

    mpiexec <site mpi_flags> <task mpi_flags> -n 4 --host n1:2,n2:2 \\
        --map-by ppr:2:node:PE=4 --bind-to core -x BALSAM_TASK_ID ... -x OMP_NUM_THREADS <argv>

``--host h:slots`` gives each node exactly the task's ranks, ``ppr:N:node`` lays them
out in blocks of N per node and ``PE=t`` reserves ``threads_per_rank`` cores per rank.
The task's variables reach remote ranks through ``-x NAME`` (names only: values stay
out of the process list).  Site-wide flags (``--mca ...``, ``--oversubscribe``,
``--allow-run-as-root``) go in ``[launcher] mpi_flags``.

Settings (``[plugins.openmpi]``, :class:`OpenMpiSettings`):

``executable``  the ``mpiexec`` to run (default ``mpiexec``; Debian installs Open MPI's
                as ``mpiexec.openmpi``).  Checked when the launcher starts.
``cpu_bind``    ``--bind-to`` object (``core``, ``hwthread``, ``socket``, ``numa``) or
                ``none``; with ``core``/``hwthread`` each rank gets ``threads_per_rank``
                of them.
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

__all__ = ["OpenMpiLauncher", "OpenMpiSettings", "balsam_mpi_launchers"]


class OpenMpiSettings(MpiexecSettings):
    """``[plugins.openmpi]``: which ``mpiexec`` to call and how ranks are bound."""


class OpenMpiLauncher(MpiexecLauncher):
    """Builds Open MPI ``mpiexec`` command lines for tasks placed on the allocation's nodes."""

    name = "openmpi"
    settings_type = OpenMpiSettings

    def placement_flags(self, spec: LaunchSpec, ranks: RankEnvironment) -> list[str]:
        ppn = spec.ranks_per_node
        bind = self.settings.cpu_bind if spec.bind else "none"
        mapping = f"ppr:{ppn}:node"
        if bind in ("core", "hwthread") and spec.threads_per_rank > 1:
            mapping += f":PE={spec.threads_per_rank}"
        flags = [
            "-n", str(spec.num_ranks), "--host", ",".join(f"{n}:{ppn}" for n in spec.nodes),
            "--map-by", mapping, "--bind-to", bind,
        ]
        for name in ranks.export:
            flags += ["-x", name]
        return flags


@hookimpl
def balsam_mpi_launchers() -> list[MpiLauncherPlugin]:
    return [
        MpiLauncherPlugin(
            "openmpi",
            OpenMpiLauncher.from_context,
            "Open MPI mpiexec: --host h:slots, --map-by ppr:N:node[:PE=t], task env via -x",
            settings=OpenMpiSettings,
        )
    ]
