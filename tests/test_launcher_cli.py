"""``balsam launcher`` as a real process: dynamic workflows through the processing
thread, and a clean stop on SIGTERM (no task left RUNNING, no orphan process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from balsam_core.api import Site

BALSAM = shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"
PY = sys.executable


def launcher(site: Site, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")}
    return subprocess.Popen(
        [BALSAM, "--site", str(site.site_dir), "launcher", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_a_task_spawns_ten_children_that_run_in_the_same_launcher(site: Site) -> None:
    code = (
        "from balsam_core import api\n"
        "for i in range(10):\n"
        "    api.spawn_child(command=['true'], name=f'child{i}', node_packing_count=4)\n"
    )
    parent = site.add_task(command=[PY, "-c", code], name="parent", node_packing_count=4).id
    proc = launcher(site, "--idle-timeout", "5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    children = [t for t in site.tasks() if t.spawned_by == parent]
    assert len(children) == 10
    assert site.task(parent).state == "JOB_FINISHED"
    for child in children:
        assert child.state == "JOB_FINISHED"
        history = site.history(child.id)
        assert history[0].message == f"spawned by task {parent}"
        running = [e for e in history if e.to_state == "RUNNING"]
        parent_launcher = [e for e in site.history(parent) if e.to_state == "RUNNING"][0]
        assert running[0].launcher_id == parent_launcher.launcher_id  # same launcher


def test_sigterm_stops_cleanly(sqlite_site: Site) -> None:
    site = sqlite_site
    ids = site.add_tasks(
        [{"command": ["sh", "-c", "sleep 300 & echo $! > child.pid; wait"],
          "node_packing_count": 2, "name": f"sleeper{i}"} for i in range(2)]
    )
    proc = launcher(site)
    deadline = time.time() + 60
    while time.time() < deadline and site.count().get("RUNNING", 0) < 2:
        time.sleep(0.2)
    assert site.count().get("RUNNING", 0) == 2
    workdirs = [site.config.data_dir / site.task(t).default_workdir for t in ids]
    while time.time() < deadline and not all((w / "child.pid").exists() for w in workdirs):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in err
    for task_id in ids:
        task = site.task(task_id)
        assert task.state == "RUN_TIMEOUT"  # the recovery chain takes it from here
        assert task.lease_launcher_id is None
        assert "received SIGTERM" in site.history(task_id)[-1].message
    for w in workdirs:
        pid = int((w / "child.pid").read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_task_signalled_just_before_its_launcher_timed_out_with_the_job(
    sqlite_site: Site,
) -> None:
    """A batch system signals every process of the job, in no set order (Slurm at a time
    limit signals the launcher's descendants first): the task whose SIGTERM came a
    moment before the launcher's timed out with the job; it did not fail."""
    site = sqlite_site
    [task_id] = site.add_tasks([{"command": ["sh", "-c", "echo $$ > task.pid; exec sleep 300"]}])
    proc = launcher(site)
    pid_file = site.config.data_dir / site.task(task_id).default_workdir / "task.pid"
    deadline = time.time() + 60
    while time.time() < deadline and not (pid_file.exists() and pid_file.read_text().strip()):
        time.sleep(0.1)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    last = site.history(task_id)[-1]
    assert (last.from_state, last.to_state) == ("RUNNING", "RUN_TIMEOUT"), last
    assert last.message.startswith("received SIGTERM after"), last.message


def test_a_killed_launcher_takes_its_tasks_with_it(sqlite_site: Site) -> None:
    """SIGKILL leaves the launcher no time to clean up; its watchdog (deathwatch.py) ends
    the running tasks, so they cannot keep running while another launcher reruns them,
    and its processing worker and the watchdog exit too."""
    site = sqlite_site
    ids = site.add_tasks(
        [{"command": ["sh", "-c", "echo $$ > main.pid; sleep 300"], "node_packing_count": 2}
         for _ in range(2)]
    )
    proc = launcher(site)
    try:
        pid_files = [site.config.data_dir / site.task(t).default_workdir / "main.pid" for t in ids]
        deadline = time.time() + 60
        while time.time() < deadline and not (
            all(p.exists() and p.read_text() for p in pid_files)
            and site.count() == {"RUNNING": 2}
        ):
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in pid_files]
        assert all(psutil.pid_exists(pid) for pid in pids)
        children = [p.pid for p in psutil.Process(proc.pid).children()]
        helpers = [pid for pid in children if pid not in pids]  # worker and watchdog
        assert len(helpers) == 2
        pids += helpers
    finally:
        proc.kill()
        proc.communicate(timeout=30)

    def alive(pid: int) -> bool:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    assert site.count() == {"RUNNING": 2}  # their lease expires; the next launcher reclaims
