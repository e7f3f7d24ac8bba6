"""The built-in ``direct`` MPI launcher: argv/env, refusal, registration."""

from __future__ import annotations

import ast
from pathlib import Path

import pluggy
import pytest

from balsam_core import LaunchSpec, MpiLauncher, MpiLauncherPlugin, PluginContext, PluginError
from balsam_core import hookspecs
from balsam_core.builtin import direct_launcher
from balsam_core.config import from_dict


@pytest.fixture
def launcher(tmp_path: Path) -> direct_launcher.DirectLauncher:
    cfg = from_dict({}, tmp_path)
    (record,) = direct_launcher.balsam_mpi_launchers()
    return record.factory(PluginContext(site_dir=tmp_path, config=cfg))


def test_registered_through_pluggy_like_an_external_module() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(direct_launcher)
    records = [r for rs in pm.hook.balsam_mpi_launchers() for r in rs]
    assert [r.name for r in records] == ["direct"]
    assert isinstance(records[0], MpiLauncherPlugin)
    assert records[0].description and "\n" not in records[0].description


def test_satisfies_protocol_and_check_passes(launcher) -> None:
    assert isinstance(launcher, MpiLauncher)
    assert launcher.check() is None


def test_command_is_argv_plus_thread_env(launcher) -> None:
    spec = LaunchSpec(
        task_id=1,
        argv=("/bin/echo", "a b", "; rm -rf x"),
        nodes=("node1",),
        threads_per_rank=4,
        env={"PATH": "/usr/bin", "OMP_NUM_THREADS": "64", "FOO": "bar"},
    )
    cmd = launcher.command(spec)
    assert cmd.argv == ("/bin/echo", "a b", "; rm -rf x")
    assert dict(cmd.env) == {"PATH": "/usr/bin", "OMP_NUM_THREADS": "4", "FOO": "bar"}
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env
    assert spec.env["OMP_NUM_THREADS"] == "64"  # the spec is not modified


def test_gpu_ids_become_cuda_visible_devices(launcher) -> None:
    spec = LaunchSpec(
        task_id=2, argv=("prog",), nodes=("n0",), gpus_per_rank=2, gpu_ids=((1, 3),)
    )
    cmd = launcher.command(spec)
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert cmd.env["OMP_NUM_THREADS"] == "1"


def test_empty_gpu_ids_set_nothing(launcher) -> None:
    cmd = launcher.command(LaunchSpec(task_id=3, argv=("p",), nodes=("n0",), gpu_ids=((),)))
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env


@pytest.mark.parametrize(
    ("nodes", "ranks", "what"),
    [(("a", "b"), 1, "2 nodes × 1 rank per node"), (("a",), 4, "1 node × 4 ranks per node")],
)
def test_refuses_more_than_one_rank(launcher, nodes, ranks, what) -> None:
    spec = LaunchSpec(task_id=7, argv=("p",), nodes=nodes, ranks_per_node=ranks)
    with pytest.raises(PluginError) as info:
        launcher.command(spec)
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"direct launcher starts one rank on one node; task 7 asks for {what}: "
        "select an MPI launcher (mpich, openmpi, aprun) in [launcher] mpi"
    )


def test_imports_only_the_public_surface() -> None:
    tree = ast.parse(Path(direct_launcher.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "balsam" in node.module:
            assert node.module == "balsam_core" and node.level == 0
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("balsam_core.") for a in node.names)
