"""What every MPI launcher plugin needs besides its own flags.

* :func:`find_executable` -- resolve the configured ``mpiexec``/``aprun`` once, at
  launcher start, so a missing program is one clear error instead of failed tasks.
* :func:`rank_environment` -- the environment a task's ranks receive (``OMP_NUM_THREADS``,
  the task's own variables, ``CUDA_VISIBLE_DEVICES``) and the names that must be
  forwarded explicitly to ranks on other nodes.
* :class:`MpiexecLauncher` -- the base of a plugin that runs one program per task
  (``mpiexec``, ``aprun``): settings, the start-up check, the command's frame; a
  subclass only says which flags place the ranks.

GPUs: the packing strategy gives each node of a task ``ranks_per_node *
gpus_per_rank`` distinct device ids.  When the task has one rank per node and every
node got the same ids, ``CUDA_VISIBLE_DEVICES`` is simply that list.  Otherwise each
rank must see its own slice, which only the rank itself can pick: the task's argv is
wrapped in :data:`GPU_AFFINITY_SCRIPT`, a fixed ``sh`` script that reads the rank
number the MPI runtime sets, finds its node's ids in ``BALSAM_GPU_IDS`` and exports its
slice before ``exec``-ing the task.  The task's argv are the script's positional
arguments, so they are never parsed by the shell.  Ranks are laid out in blocks of
``ranks_per_node`` per node (``-ppn``, ``ppr:N:node``, ``aprun -N``), so a rank's node
index is ``rank // ranks_per_node``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import PluginError
from .plugin_types import LaunchCommand, LaunchSpec, PluginContext

__all__ = [
    "GPU_AFFINITY_SCRIPT",
    "MpiexecLauncher",
    "MpiexecSettings",
    "RankEnvironment",
    "find_executable",
    "rank_environment",
]

#: Variables in which MPI runtimes publish a rank's global number, in lookup order
#: (MPICH/Hydra, Open MPI, PMIx, Cray ALPS, Slurm).
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "ALPS_APP_PE", "SLURM_PROCID")

GPU_AFFINITY_SCRIPT = r"""
rank=RANK_LOOKUP
node=$((rank / BALSAM_RANKS_PER_NODE)); first=$((rank % BALSAM_RANKS_PER_NODE * BALSAM_GPUS_PER_RANK))
set -f; IFS=';'; i=0; ids=""
for n in $BALSAM_GPU_IDS; do [ "$i" -eq "$node" ] && ids=$n; i=$((i + 1)); done
IFS=','; i=0; mine=""
for g in $ids; do
  [ "$i" -ge "$first" ] && [ "$i" -lt $((first + BALSAM_GPUS_PER_RANK)) ] && mine=${mine:+$mine,}$g
  i=$((i + 1))
done
unset IFS; set +f
CUDA_VISIBLE_DEVICES=$mine; export CUDA_VISIBLE_DEVICES
exec "$@"
""".replace(
    # ${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-...:-0}}: the first variable that is set
    "RANK_LOOKUP", "".join("${%s:-" % v for v in RANK_VARIABLES) + "0" + "}" * len(RANK_VARIABLES)
)


@dataclass(frozen=True)
class RankEnvironment:
    """How to start a task's ranks: argv after the MPI flags, full environment, forwarded names."""

    argv: tuple[str, ...]
    env: dict[str, str]
    #: Variables every rank must receive, in the order the task set them.
    export: tuple[str, ...]


def find_executable(executable: str, plugin: str) -> str:
    """The absolute path of *executable*; a :class:`PluginError` naming the setting if missing."""
    path = shutil.which(executable)
    if path is None:
        raise PluginError(
            f"{plugin}: MPI launcher executable {executable!r} not found on PATH "
            f"(set [plugins.{plugin}] executable in balsam.toml)"
        )
    return path


def rank_environment(spec: LaunchSpec) -> RankEnvironment:
    """The task's ranks' environment: ``spec.env`` plus threads and GPU placement."""
    env = dict(spec.env)
    export = [*spec.export, "OMP_NUM_THREADS"]
    env["OMP_NUM_THREADS"] = str(spec.threads_per_rank)
    argv = tuple(spec.argv)
    per_node = [ids for ids in spec.gpu_ids if ids]
    if per_node:
        same_everywhere = all(ids == per_node[0] for ids in per_node)
        if spec.ranks_per_node == 1 and same_everywhere and len(per_node) == len(spec.nodes):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, per_node[0]))
            export.append("CUDA_VISIBLE_DEVICES")
        else:
            env["BALSAM_GPU_IDS"] = ";".join(",".join(map(str, ids)) for ids in spec.gpu_ids)
            env["BALSAM_GPUS_PER_RANK"] = str(spec.gpus_per_rank)
            env["BALSAM_RANKS_PER_NODE"] = str(spec.ranks_per_node)
            export += ["BALSAM_GPU_IDS", "BALSAM_GPUS_PER_RANK", "BALSAM_RANKS_PER_NODE"]
            argv = ("/bin/sh", "-c", GPU_AFFINITY_SCRIPT, "balsam-gpu-affinity", *argv)
    return RankEnvironment(argv, env, tuple(dict.fromkeys(export)))


@dataclass(frozen=True)
class MpiexecSettings:
    """``[plugins.<name>]`` of an :class:`MpiexecLauncher`: the program and rank binding.

    A plugin subclasses it to document its table, change the defaults or
    :attr:`CPU_BIND` (the allowed ``cpu_bind`` values), or add settings.
    """

    CPU_BIND: ClassVar[tuple[str, ...]] = ("core", "hwthread", "socket", "numa", "none")

    executable: str = "mpiexec"
    cpu_bind: str = "core"

    def __post_init__(self) -> None:
        if not self.executable.strip():
            raise ValueError("executable must not be empty")
        if self.cpu_bind not in self.CPU_BIND:
            raise ValueError(f"cpu_bind must be one of {', '.join(self.CPU_BIND)}")


class MpiexecLauncher:
    """Base of MPI launcher plugins that start each task with one program run.

    A subclass sets :attr:`name` and :attr:`settings_type` (an :class:`MpiexecSettings`)
    and implements :meth:`placement_flags`; the command is
    ``<executable> <site and task mpi_flags> <placement flags> <task argv>``.
    """

    name: ClassVar[str]
    settings_type: ClassVar[type[MpiexecSettings]] = MpiexecSettings

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings if settings is not None else self.settings_type()
        self._path: str | None = None

    @classmethod
    def from_context(cls, context: PluginContext) -> MpiexecLauncher:
        """The factory the plugin manager calls with ``[plugins.<name>]`` built."""
        return cls(context.settings)

    def check(self) -> None:
        """Raise :class:`PluginError` if the configured program is not installed."""
        self._path = find_executable(self.settings.executable, self.name)

    def command(self, spec: LaunchSpec) -> LaunchCommand:
        ranks = rank_environment(spec)
        argv = (
            self._path or self.settings.executable,
            *spec.mpi_flags,
            *self.placement_flags(spec, ranks),
            *ranks.argv,
        )
        return LaunchCommand(argv=argv, env=ranks.env)

    def placement_flags(self, spec: LaunchSpec, ranks: RankEnvironment) -> list[str]:
        """Flags that put *spec*'s ranks on its nodes, bind them, and forward ``ranks.export``."""
        raise NotImplementedError
