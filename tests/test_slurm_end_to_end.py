"""Balsam end to end on a real Slurm cluster: service -> sbatch -> launcher -> MPICH.

Everything here is real: the 2-node Slurm cluster of tests/harness/slurm (nodes c1, c2
with 4 CPUs each, slurmdbd for sacct), ``sbatch``/``squeue``/``sacct``/``scancel``
driven by the ``slurm`` plugin, the Balsam launcher running inside the Slurm job and
discovering its nodes from ``SLURM_JOB_NODELIST``, and MPI tasks started by MPICH's
``mpiexec.mpich`` (``-launcher fork``: the fake nodes are this machine).  The only
shortcut is the time-limit case: Slurm checks limits every 30 s in whole minutes, so
the running job's limit is cut to 0 with ``scontrol update`` and slurmctld ends it as
TIMEOUT at its next check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from balsam_core import plugins
from balsam_core.api import Site
from balsam_core.models import BatchJob, TaskEvent
from balsam_core.service import Service
from tests.harness.mpi import FLAVOURS, build_probe, parse_probe
from tests.harness.slurm import SlurmCluster

pytestmark = pytest.mark.real_component

BALSAM = shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"

SITE_SETTINGS = """
[plugins.mpich]
executable = "mpiexec.mpich"

[plugins.slurm]
exclusive = false
"""


@pytest.fixture
def slurm_site(tmp_path: Path, slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Site:
    """A SQLite site on Slurm + MPICH: partition ``debug`` takes 1-2 nodes for 1-5 min."""
    if not FLAVOURS["mpich"].installed:
        pytest.skip("MPICH not installed")
    monkeypatch.setenv(plugins.AUTOLOAD_SWITCH, "0")
    plugins.reset_plugin_manager()
    site_dir = tmp_path / "site"
    Site.init(site_dir, scheduler="slurm", mpi="mpich", cpus_per_node=4).db.dispose()
    path = site_dir / "balsam.toml"
    text = path.read_text()
    text = text.replace("[scheduler.queues.local]", "[scheduler.queues.debug]")
    text = re.sub(r"(?m)^max_queued = .*$", "max_queued = 2", text)
    text = re.sub(r"(?m)^max_nodes = .*$", "max_nodes = 2", text)
    text = re.sub(r"(?m)^max_wall_min = .*$", "max_wall_min = 5", text)
    text = re.sub(r"(?m)^mpi_flags = .*$", 'mpi_flags = ["-launcher", "fork"]', text)
    text = re.sub(r"(?m)^submit_interval_s = .*$", "submit_interval_s = 1.0", text)
    text = re.sub(r"(?m)^job_idle_timeout_s = .*$", "job_idle_timeout_s = 3.0", text)
    path.write_text(text + SITE_SETTINGS)
    return Site.open(site_dir)


def balsam(site: Site, *args: str) -> str:
    result = subprocess.run(
        [BALSAM, "--site", str(site.site_dir), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(condition: Callable[[], bool], timeout: float, step: Callable[[], object]) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        step()
        time.sleep(1.0)


def batch_jobs(site: Site) -> list[BatchJob]:
    with site.db.session() as s:
        return list(s.query(BatchJob).order_by(BatchJob.id))


def test_service_packs_thirty_mixed_tasks_into_slurm_jobs(slurm_site: Site, tmp_path: Path) -> None:
    site = slurm_site
    probe = str(build_probe(FLAVOURS["mpich"], tmp_path))
    specs = (
        [{"command": [probe], "ranks_per_node": 2, "wall_time_min": 1}] * 8  # whole node
        + [{"command": [probe], "node_packing_count": 4, "wall_time_min": 1}] * 16  # sub-node
        + [{"command": [probe, "1"], "num_nodes": 2, "ranks_per_node": 2, "wall_time_min": 1}] * 6
    )
    ids = site.add_tasks(specs)

    balsam(site, "service", "--once")  # as a user would: the first period submits
    service = Service(site)
    wait_for(lambda: site.count() == {"JOB_FINISHED": 30}, 240, service.run_once)

    jobs = batch_jobs(site)
    assert jobs and all(j.scheduler_id and j.scheduler_id.isdigit() for j in jobs)
    assert all(j.queue == "debug" and 1 <= j.num_nodes <= 2 and j.wall_time_min <= 5 for j in jobs)
    assert any(j.num_nodes == 2 for j in jobs)  # sized to the 2-node tasks, not a fixed size
    with site.db.session() as s:
        runs = list(s.query(TaskEvent).filter(TaskEvent.to_state == "RUNNING"))
    assert {e.task_id for e in runs} == set(ids)
    assert {e.batch_job_id for e in runs} <= {j.id for j in jobs} and None not in {
        e.batch_job_id for e in runs
    }
    assert any(e.message.endswith("c1,c2") for e in runs)  # nodes found from Slurm
    for task in ids[-6:]:
        ranks = parse_probe(
            (site.config.data_dir / site.task(task).default_workdir / "stdout").read_text()
        )
        assert [r["size"] for r in ranks] == ["4"] * 4 and {r["sum"] for r in ranks} == {"6"}
    # the launchers exit when idle; the service sees their Slurm jobs end
    wait_for(
        lambda: all(j.state == "FINISHED" for j in batch_jobs(site)), 60, service.run_once
    )


def test_queue_cancel_goes_through_scancel(slurm_site: Site, slurm_cluster: SlurmCluster) -> None:
    site = slurm_site
    out = balsam(site, "queue", "submit", "-n", "1", "-t", "5", "-q", "debug", "--wf", "none")
    job_id = int(re.search(r"\d+", out).group())
    job = batch_jobs(site)[-1]
    assert job.id == job_id and job.scheduler_id
    balsam(site, "queue", "cancel", str(job_id))
    assert slurm_cluster.wait_state(job.scheduler_id, {"CANCELLED"}, timeout=30) == "CANCELLED"
    listing = balsam(site, "queue", "ls", "--all")
    assert re.search(rf"(?m)^{job_id}\s+{job.scheduler_id}\s.*CANCELLED", listing), listing


def test_a_job_hitting_its_time_limit_leaves_tasks_for_the_next_job(
    slurm_site: Site, slurm_cluster: SlurmCluster
) -> None:
    site = slurm_site
    # first attempt runs long; a retry finds its marker and finishes at once
    (task,) = site.add_tasks([{
        "command": ["sh", "-c", "test -e marker && exit 0; touch marker; exec sleep 300"],
        "node_packing_count": 4, "workflow": "limit",
    }])
    balsam(site, "queue", "submit", "-n", "1", "-t", "5", "-q", "debug", "--wf", "limit")
    first = batch_jobs(site)[-1]
    wait_for(lambda: site.task(task).state == "RUNNING", 60, lambda: None)
    subprocess.run(
        ["scontrol", "update", f"JobId={first.scheduler_id}", "TimeLimit=0"], check=True, timeout=10
    )
    assert slurm_cluster.wait_state(first.scheduler_id, {"TIMEOUT"}, timeout=60) == "TIMEOUT"
    wait_for(lambda: site.task(task).state != "RUNNING", 30, lambda: None)
    events = site.history(task)
    timeout_event = next(e for e in events if e.to_state == "RUN_TIMEOUT")
    assert "SIGTERM" in timeout_event.message
    assert site.task(task).state in ("RUN_TIMEOUT", "RESTART_READY")

    balsam(site, "queue", "submit", "-n", "1", "-t", "5", "-q", "debug", "--wf", "limit")
    wait_for(lambda: site.task(task).state == "JOB_FINISHED", 90, lambda: None)
    states = [e.to_state for e in site.history(task)]
    assert states.count("RUNNING") == 2 and "RESTART_READY" in states
    second = batch_jobs(site)[-1]
    balsam(site, "queue", "cancel", str(second.id))  # its launcher would idle until the limit
    service = Service(site)
    wait_for(
        lambda: batch_jobs(site)[0].native_state == "TIMEOUT", 30, service.run_once
    )
