"""MPI tasks through the real MPICH and Open MPI plugins, on this machine posing as nodes.

Every test here runs the real ``mpiexec.mpich`` / ``mpiexec.openmpi`` and a C probe
compiled with the matching ``mpicc`` (tests/harness/mpi.py): nothing is imitated.  The
virtual nodes are this machine split in two (``local_nodes``); Hydra's fork launcher and
Open MPI's rsh agent start the "remote" ranks locally, so placement is checked from the
node-local rank each MPI runtime reports.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from balsam_core import plugins
from balsam_core.api import Site
from balsam_core.errors import PluginError
from balsam_core.launcher.nodes import local_nodes
from balsam_core.launcher.pilot import Launcher, LauncherOptions
from balsam_core.models import Launcher as LauncherRow
from balsam_core.models import Task as TaskRow
from balsam_core.states import State
from balsam_core.transitions import Change
from tests.harness.mpi import FLAVOURS, Flavour, build_probe, configure_site, parse_probe

pytestmark = pytest.mark.real_component

BALSAM = [shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"]


@pytest.fixture(autouse=True)
def _entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MPI plugins are installed distributions: load entry points here."""
    monkeypatch.setenv(plugins.AUTOLOAD_SWITCH, "0")
    plugins.reset_plugin_manager()


@pytest.fixture(scope="session")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("mpi-probe")
    return {name: build_probe(f, directory) for name, f in FLAVOURS.items() if f.installed}


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> Flavour:
    flavour = FLAVOURS[request.param]
    if not flavour.installed:
        pytest.skip(f"{flavour.mpiexec} / {flavour.mpicc} not installed")
    return flavour


def make_site(tmp_path: Path, flavour: Flavour, gpus: int = 0, **settings: str) -> Site:
    """A SQLite site selecting *flavour*, nodes of 4 CPUs (and *gpus* GPUs)."""
    Site.init(tmp_path / "site", cpus_per_node=4, gpus_per_node=gpus).db.dispose()
    configure_site(tmp_path / "site", flavour, **settings)
    site = Site.open(tmp_path / "site")
    site.config.launcher.__dict__["heartbeat_s"] = 0.2  # frozen dataclass: test-only speed-up
    return site


@pytest.fixture
def mpi_site(tmp_path: Path, flavour: Flavour) -> Iterator[Site]:
    site = make_site(tmp_path, flavour)
    yield site
    site.db.dispose()


def runnable(site: Site, *specs: dict) -> list[int]:
    ids = site.add_tasks(list(specs))
    site.transition([Change(i, s) for i in ids for s in (State.STAGED_IN, State.PREPROCESSED)])
    return ids


def run(site: Site, nodes: int = 2, gpus: int = 0, **options) -> Launcher:
    options.setdefault("idle_timeout_s", 0.3)
    options.setdefault("grace_s", 1.0)
    launcher = Launcher(
        site, LauncherOptions(nodes=local_nodes(nodes, 4, gpus), **options), processing=False
    )
    launcher.run()
    return launcher


def stdout(site: Site, task_id: int) -> str:
    return (site.config.data_dir / site.task(task_id).default_workdir / "stdout").read_text()


def running_intervals(site: Site, task_id: int) -> tuple[float, float, str]:
    """(start, end, "started on ..." message) of the task's one run."""
    events = site.history(task_id)
    start = next(e for e in events if e.to_state == "RUNNING")
    end = next(e for e in events if e.from_state == "RUNNING")
    return start.time, end.time, start.message


def test_two_nodes_two_ranks_report_layout_environment_and_sum(
    tmp_path: Path, flavour: Flavour, probes: dict[str, Path]
) -> None:
    # Open MPI's ppr:2:node:PE=2 needs 4 cores per node, this machine has 2 in all:
    # bind nothing there (the flags themselves are checked in test_mpi_commands.py).
    site = make_site(tmp_path, flavour, **({"cpu_bind": "none"} if flavour.name == "openmpi" else {}))
    literal = "x;$(id)`id`"
    (task,) = runnable(site, {
        "command": [str(probes[flavour.name])], "num_nodes": 2, "ranks_per_node": 2,
        "threads_per_rank": 2, "environment": {"PROBE_VAR": literal},
    })
    run(site)
    assert site.task(task).state == "JOB_FINISHED", site.history(task)[-1].message
    ranks = parse_probe(stdout(site, task))
    assert [r["rank"] for r in ranks] == ["0", "1", "2", "3"]
    assert {r["size"] for r in ranks} == {"4"} and {r["sum"] for r in ranks} == {"6"}
    assert [r["local"] for r in ranks] == ["0", "1", "0", "1"]  # 2 per node, in blocks
    assert {r["omp"] for r in ranks} == {"2"}
    assert {r["var"] for r in ranks} == {literal}  # reached the program literally
    assert {r["task"] for r in ranks} == {str(task)}
    assert "started on" in running_intervals(site, task)[2]


def test_a_two_node_task_and_four_half_node_tasks_share_two_nodes(
    mpi_site: Site, flavour: Flavour, probes: dict[str, Path]
) -> None:
    site = mpi_site
    probe = str(probes[flavour.name])
    big, *halves = runnable(
        site,
        {"command": [probe, "1"], "num_nodes": 2, "ranks_per_node": 2},
        *({"command": [probe, "1"], "ranks_per_node": 2, "node_packing_count": 2}
          for _ in range(4)),
    )
    run(site)
    for task in (big, *halves):
        assert site.task(task).state == "JOB_FINISHED", site.history(task)[-1].message
        assert {r["sum"] for r in parse_probe(stdout(site, task))} == {"1" if task != big else "6"}
    b_start, b_end, _ = running_intervals(site, big)
    spans = [running_intervals(site, t) for t in halves]
    # the half-node tasks ran two per node, all four at once, never beside the 2-node task
    assert sorted(msg.split()[-1] for _, _, msg in spans) == sorted(
        [n.name for n in local_nodes(2, 4, 0)] * 2
    )
    assert max(s for s, _, _ in spans) < min(e for _, e, _ in spans)
    assert all(e <= b_start or s >= b_end for s, e, _ in spans)


def test_a_killed_mpi_task_leaves_no_rank_alive(
    mpi_site: Site, flavour: Flavour, probes: dict[str, Path]
) -> None:
    site = mpi_site
    probe = str(probes[flavour.name])
    (task,) = runnable(site, {"command": [probe, "60"], "num_nodes": 2, "ranks_per_node": 2})

    def ranks_alive() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["exe", "status"]):
            if p.info["exe"] == probe and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        return found

    def kill_when_running() -> None:
        out = site.config.data_dir / site.task(task).default_workdir / "stdout"
        deadline = time.time() + 20
        while time.time() < deadline and (
            not out.exists() or out.read_text().count("rank=") < 4
        ):
            time.sleep(0.05)
        assert len(ranks_alive()) == 4
        Site.open(site.site_dir).kill(task)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    run(site, idle_timeout_s=0.5)
    killer.join()
    assert site.task(task).state == "USER_KILLED"
    assert "rank=3" in stdout(site, task)  # all four ranks had started
    assert ranks_alive() == []


def test_gpu_ranks_get_distinct_devices(tmp_path: Path, probes: dict[str, Path]) -> None:
    """GPUs declared in balsam.toml (none exist here): each rank sees only its own ids."""
    flavour = FLAVOURS["mpich"]
    if not flavour.installed:
        pytest.skip("MPICH not installed")
    site = make_site(tmp_path, flavour, gpus=4)
    probe = str(probes["mpich"])
    per_rank, per_node = runnable(
        site,
        {"command": [probe], "num_nodes": 2, "ranks_per_node": 2, "gpus_per_rank": 2},
        {"command": [probe], "num_nodes": 2, "ranks_per_node": 1, "gpus_per_rank": 3},
    )
    run(site, gpus=4)
    assert [r["cuda"] for r in parse_probe(stdout(site, per_rank))] == ["0,1", "2,3"] * 2
    assert [r["cuda"] for r in parse_probe(stdout(site, per_node))] == ["0,1,2"] * 2


def test_missing_mpiexec_is_an_error_when_the_launcher_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site(tmp_path, FLAVOURS["mpich"], executable="mpiexec.not-installed")
    (task,) = runnable(site, {"command": ["true"]})
    with pytest.raises(PluginError, match="'mpiexec.not-installed' not found on PATH"):
        run(site)
    result = subprocess.run(
        [*BALSAM, "--site", str(site.site_dir), "launcher", "--idle-timeout", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: mpich: MPI launcher executable 'mpiexec.not-installed' not found on PATH "
        "(set [plugins.mpich] executable in balsam.toml)"
    ]
    assert site.task(task).state == "PREPROCESSED"  # nothing was lost


# ---------------------------------------------------------------------------- serial mode


def serial_launcher(site: Site, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*BALSAM, "--site", str(site.site_dir), "launcher", "--mode", "serial", "--nodes", "2",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_serial_mode_runs_forty_tasks_with_node_packing(mpi_site: Site) -> None:
    site = mpi_site
    ids = site.add_tasks(
        [{"command": ["sleep", "0.3"], "node_packing_count": 4} for _ in range(40)]
    )
    proc = serial_launcher(site, "--idle-timeout", "1")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert site.count() == {"JOB_FINISHED": 40}, output
    spans = [running_intervals(site, t) for t in ids]
    nodes = {msg.split()[-1] for _, _, msg in spans}
    assert nodes == {n.name for n in local_nodes(2, 4, 0)}  # both agents ran tasks
    for node in nodes:
        mine = [(s, e) for s, e, msg in spans if msg.endswith(node)]
        at_once = max(sum(1 for s2, e2 in mine if s2 <= s < e2) for s, _ in mine)
        assert 2 <= at_once <= 4  # packed, never beyond node_packing_count
    with site.db.session() as s:
        assert {row.mode for row in s.query(LauncherRow)} == {"serial"}


def test_serial_mode_sigterm_leaves_nothing_running(mpi_site: Site) -> None:
    site = mpi_site
    ids = site.add_tasks(
        [{"command": ["sleep", "60"], "node_packing_count": 4} for _ in range(6)]
    )
    proc = serial_launcher(site)
    deadline = time.time() + 30
    while site.count(state="RUNNING").get("RUNNING", 0) < 6 and time.time() < deadline:
        time.sleep(0.1)
    assert site.count(state="RUNNING").get("RUNNING", 0) == 6
    pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "RUNNING" not in site.count()
    for task in ids:  # rank 0's worker may have applied retry-timeout already
        assert site.task(task).state in ("RUN_TIMEOUT", "RESTART_READY")
        assert "stop requested" in next(
            e.message for e in site.history(task) if e.to_state == "RUN_TIMEOUT"
        )
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not list(site.config.log_dir.glob("serial-*"))  # run and stop files removed


def test_serial_agents_stop_together_before_the_allocation_ends(mpi_site: Site) -> None:
    site = mpi_site
    ids = site.add_tasks([{"command": ["sleep", "60"], "node_packing_count": 2} for _ in range(4)])
    started = time.time()
    # 0.3 min = 18 s; agents stop margin_s (5 s) before: about 13 s after the start,
    # room for agents that take several seconds to start on a loaded machine
    proc = serial_launcher(site, "--time-limit-min", "0.3")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert time.time() - started < 18
    assert output.count("stopped: allocation ends") == 2, output  # both agents
    assert "RUNNING" not in site.count()
    # Under load an agent may start after the others have run out of time to start
    # tasks; what must hold is that every task that ran was stopped and recorded,
    # and every other one is back in the backlog, unleased.
    ran = [t for t in ids if any(e.to_state == "RUNNING" for e in site.history(t))]
    assert ran, output
    for task in ids:
        history = site.history(task)
        if task in ran:
            assert any(e.to_state == "RUN_TIMEOUT" for e in history)
        else:
            assert site.task(task).state in ("READY", "PREPROCESSED"), (task, output)
    with site.db.session() as s:
        assert not [r for r in s.query(TaskRow) if r.lease_launcher_id is not None]


def test_serial_mode_on_several_nodes_needs_an_mpi_launcher(tmp_path: Path) -> None:
    site = Site.init(tmp_path / "site")
    result = subprocess.run(
        [*BALSAM, "--site", str(site.site_dir), "launcher", "--mode", "serial", "--nodes", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: serial mode: cannot start 2 agent(s) through [launcher] mpi = 'direct': direct "
        "launcher starts one rank on one node; task 0 asks for 2 nodes × 1 rank per node: "
        "select an MPI launcher (mpich, openmpi, aprun) in [launcher] mpi"
    ]
