"""Balsam MPI launcher plugin for Cray ALPS ``aprun`` (Cray XC systems, e.g. Theta).

Selected by ``[launcher] mpi = "aprun"``.  A task on nodes ``nid00012,nid00013`` with 2
ranks per node and 4 threads per rank starts as::

    aprun <site mpi_flags> <task mpi_flags> -n 4 -N 2 -d 4 -j 1 -cc depth \\
        -e BALSAM_TASK_ID=7 ... -e OMP_NUM_THREADS=4 -L 12,13 <task argv>

``-n`` is the total number of processing elements, ``-N`` per node, ``-d`` the CPUs
reserved per rank (its threads), ``-j`` CPUs used per core (hyper-threads), ``-cc``
the binding (``depth`` binds each rank to its ``-d`` CPUs), ``-L`` the node ids
(the numbers in ``nidNNNNN`` names, as Cobalt reports them).  ALPS hands aprun's own
environment to the ranks; the task's variables are also set with ``-e`` so they win
over site defaults on the compute nodes.

Settings (``[plugins.aprun]``, :class:`AprunSettings`):

``executable``    the program (default ``aprun``).  Checked when the launcher starts.
``cpu_bind``      ``-cc`` value: ``depth`` (default), ``cpu``, ``numa_node`` or ``none``.
``hyperthreads``  ``-j``: CPUs per core used, 1 to 4 (default 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from balsam_core import (
    LaunchSpec,
    MpiexecLauncher,
    MpiexecSettings,
    MpiLauncherPlugin,
    PluginError,
    RankEnvironment,
    hookimpl,
)

__all__ = ["AprunLauncher", "AprunSettings", "balsam_mpi_launchers", "node_id"]

_NID = re.compile(r"(?:nid)?0*(\d+)")


@dataclass(frozen=True)
class AprunSettings(MpiexecSettings):
    """``[plugins.aprun]``: the program, CPU binding and hyper-threads per core."""

    CPU_BIND = ("depth", "cpu", "numa_node", "none")

    executable: str = "aprun"
    cpu_bind: str = "depth"
    hyperthreads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.hyperthreads <= 4:
            raise ValueError("hyperthreads must be between 1 and 4")


def node_id(name: str) -> str:
    """The ALPS node id of a node name: ``nid00012`` and ``12`` are ``12``."""
    match = _NID.fullmatch(name)
    if match is None:
        raise PluginError(f"aprun: node name {name!r} is not a Cray node id (nidNNNNN)")
    return match.group(1)


class AprunLauncher(MpiexecLauncher):
    """Builds ``aprun`` command lines for tasks placed on the allocation's nodes."""

    name = "aprun"
    settings_type = AprunSettings

    def placement_flags(self, spec: LaunchSpec, ranks: RankEnvironment) -> list[str]:
        flags = [
            "-n", str(spec.num_ranks), "-N", str(spec.ranks_per_node),
            "-d", str(spec.threads_per_rank), "-j", str(self.settings.hyperthreads),
            "-cc", self.settings.cpu_bind if spec.bind else "none",
        ]
        for name in ranks.export:
            flags += ["-e", f"{name}={ranks.env[name]}"]
        return [*flags, "-L", ",".join(node_id(n) for n in spec.nodes)]


@hookimpl
def balsam_mpi_launchers() -> list[MpiLauncherPlugin]:
    return [
        MpiLauncherPlugin(
            "aprun",
            AprunLauncher.from_context,
            "Cray ALPS aprun: -n/-N/-d/-j/-cc, task env via -e, nodes via -L nid list",
            settings=AprunSettings,
        )
    ]
