"""The command lines the MPI launcher plugins build, and their settings in balsam.toml.

MPICH and Open MPI command lines also run for real in test_mpi_launchers.py.  Cray's
``aprun`` cannot run here: its command lines are checked against the flag semantics
Cray and the ALCF/NERSC user guides document, and against the recorded Theta
(ALCF XC40) job-script line ``aprun -n $ranks -N 32 --env OMP_NUM_THREADS=4 -cc depth
-d 4 -j 2 <exe>`` (32 ranks per node, 4 threads each, 2 hyper-threads per core).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from balsam_aprun import AprunLauncher, AprunSettings, node_id
from balsam_core import LaunchSpec, PluginError, plugins
from balsam_core.api import Site
from balsam_core.errors import ConfigError
from balsam_core.mpi_support import GPU_AFFINITY_SCRIPT, rank_environment
from balsam_mpich import MpichLauncher, MpichSettings
from balsam_openmpi import OpenMpiLauncher, OpenMpiSettings

ENV = {"PATH": "/usr/bin:/bin", "BALSAM_TASK_ID": "7", "SECRET": "s3cret"}


def spec(**fields) -> LaunchSpec:
    base = dict(
        task_id=7, argv=("./app", "--in", "a b"), nodes=("n1", "n2"), ranks_per_node=2,
        threads_per_rank=4, env=ENV, export=("SECRET", "BALSAM_TASK_ID"),
    )
    return LaunchSpec(**{**base, **fields})


def test_mpich_command_line() -> None:
    command = MpichLauncher(MpichSettings(executable="mpiexec.mpich")).command(
        spec(mpi_flags=("-launcher", "ssh", "-v"))
    )
    assert command.argv == (
        "mpiexec.mpich", "-launcher", "ssh", "-v", "-n", "4", "-ppn", "2", "-hosts", "n1,n2",
        "-bind-to", "core:4", "-genvlist", "SECRET,BALSAM_TASK_ID,OMP_NUM_THREADS",
        "./app", "--in", "a b",
    )
    assert command.env["OMP_NUM_THREADS"] == "4" and command.env["SECRET"] == "s3cret"
    assert "s3cret" not in " ".join(command.argv)  # names only on the command line
    unbound = MpichLauncher(MpichSettings(cpu_bind="none")).command(spec())
    assert "-bind-to" not in unbound.argv and unbound.argv[0] == "mpiexec"


def test_openmpi_command_line() -> None:
    command = OpenMpiLauncher(OpenMpiSettings(executable="mpirun")).command(spec())
    assert command.argv == (
        "mpirun", "-n", "4", "--host", "n1:2,n2:2", "--map-by", "ppr:2:node:PE=4",
        "--bind-to", "core", "-x", "SECRET", "-x", "BALSAM_TASK_ID", "-x", "OMP_NUM_THREADS",
        "./app", "--in", "a b",
    )
    one_thread = OpenMpiLauncher().command(spec(threads_per_rank=1, nodes=("n1",)))
    assert one_thread.argv[1:9] == (
        "-n", "2", "--host", "n1:2", "--map-by", "ppr:2:node", "--bind-to", "core"
    )
    agent = OpenMpiLauncher().command(spec(bind=False))
    assert agent.argv[5:9] == ("--map-by", "ppr:2:node", "--bind-to", "none")


def test_aprun_command_line_follows_the_recorded_theta_layout() -> None:
    """32 ranks/node x 4 threads with 2 hyper-threads per core on 2 Theta nodes: the
    recorded ALCF line's flags, with the nodes named by ``-L`` (from Cobalt's nids)."""
    launcher = AprunLauncher(AprunSettings(hyperthreads=2))
    command = launcher.command(
        spec(nodes=("nid00012", "nid03840"), ranks_per_node=32, threads_per_rank=4,
             export=("BALSAM_TASK_ID",))
    )
    assert command.argv == (
        "aprun", "-n", "64", "-N", "32", "-d", "4", "-j", "2", "-cc", "depth",
        "-e", "BALSAM_TASK_ID=7", "-e", "OMP_NUM_THREADS=4", "-L", "12,3840",
        "./app", "--in", "a b",
    )
    serial_agent = launcher.command(spec(nodes=("12", "13"), ranks_per_node=1, bind=False))
    assert serial_agent.argv[1:11] == (
        "-n", "2", "-N", "1", "-d", "4", "-j", "2", "-cc", "none"
    )


def test_aprun_node_ids() -> None:
    assert [node_id(n) for n in ("nid00012", "12", "nid0", "00040")] == ["12", "12", "0", "40"]
    with pytest.raises(PluginError, match="'c1' is not a Cray node id"):
        node_id("c1")


def test_gpu_ids_reach_each_rank() -> None:
    """One rank per node with the same ids: a plain variable; otherwise each rank picks
    its slice in the fixed sh script (run here with the rank variables MPI runtimes set)."""
    same = rank_environment(spec(ranks_per_node=1, gpus_per_rank=2, gpu_ids=((0, 1), (0, 1))))
    assert same.env["CUDA_VISIBLE_DEVICES"] == "0,1" and same.argv == spec().argv
    ranks = rank_environment(spec(gpus_per_rank=1, gpu_ids=((0, 1), (2, 3))))
    assert ranks.argv[:4] == ("/bin/sh", "-c", GPU_AFFINITY_SCRIPT, "balsam-gpu-affinity")
    assert {"BALSAM_GPU_IDS", "BALSAM_GPUS_PER_RANK", "BALSAM_RANKS_PER_NODE"} <= set(ranks.export)
    seen = []
    for rank, variable in enumerate(("PMI_RANK", "OMPI_COMM_WORLD_RANK", "ALPS_APP_PE",
                                     "SLURM_PROCID")):
        argv = (*ranks.argv[:4], "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES|$1"', "x", "$(id);")
        out = subprocess.run(
            argv, env={**ranks.env, variable: str(rank)}, capture_output=True, text=True,
            check=True,
        ).stdout
        seen.append(out.strip())
    assert seen == ["0|$(id);", "1|$(id);", "2|$(id);", "3|$(id);"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('cpu_bind = "everything"', "cpu_bind must be one of core, hwthread, socket, numa, none"),
        ('executable = ""', "executable must not be empty"),
        ("executable = 3", "executable"),
        ('bind = "core"', "bind"),
    ],
)
def test_bad_mpich_settings_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, message: str
) -> None:
    monkeypatch.setenv(plugins.AUTOLOAD_SWITCH, "0")
    plugins.reset_plugin_manager()
    site_dir = tmp_path / "site"
    Site.init(site_dir, mpi="mpich").db.dispose()
    with open(site_dir / "balsam.toml", "a") as f:
        f.write(f"\n[plugins.mpich]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        Site.open(site_dir)
    text = str(info.value)
    assert message in text and "plugins.mpich" in text and "\n" not in text


def test_the_plugins_are_installed_distributions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.AUTOLOAD_SWITCH, "0")
    plugins.reset_plugin_manager()
    manager = plugins.get_plugin_manager()
    for name in ("mpich", "openmpi", "aprun"):
        assert manager.get("mpi_launcher", name).provider.distribution == f"balsam-{name}"
