"""``balsam queue submit|ls|cancel|history`` and ``balsam service`` from the command line,
with the real ``local`` scheduler: happy paths, one-line errors, the lock and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from balsam_core import batchjobs
from balsam_core.api import Site
from balsam_core.cli import cli
from balsam_core.service import ServiceLock
from tests.harness.sites import wait_for

BALSAM = str(Path(sys.executable).with_name("balsam"))


@pytest.fixture
def site(sqlite_site: Site) -> Iterator[Site]:
    path = sqlite_site.config.path
    path.write_text(path.read_text().replace("job_idle_timeout_s = 300.0", "job_idle_timeout_s = 0.5"))
    opened = Site.open(sqlite_site.site_dir)
    yield opened
    local = opened.plugins.create("scheduler", "local", opened.config)
    for job in batchjobs.jobs(opened):
        if job.scheduler_id:
            local.cancel(job.scheduler_id)
    opened.db.dispose()


def run(site: Site, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--site", str(site.site_dir), *args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return result.output


def error(result: Result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def balsam(site: Site, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")}
    return subprocess.Popen([BALSAM, "--site", str(site.site_dir), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ---------------------------------------------------------------------- balsam queue


def test_submit_ls_history_cancel(site: Site) -> None:
    task = site.add_task(command=["sleep", "60"], workflow="w", tags={"a": "b"}).id
    out = ok(run(site, "queue", "submit", "-n", "1", "-t", "5", "--wf", "w", "--tag", "a=b"))
    assert out.startswith("batch job 1 submitted as ") and "(local, 1 node(s) x 5 min)" in out
    assert wait_for(lambda: site.task(task).state == "RUNNING")

    (row,) = json.loads(ok(run(site, "queue", "ls", "--json")))
    assert row["state"] == "RUNNING" and row["native_state"] == "running"
    assert (row["queue"], row["num_nodes"], row["wall_time_min"], row["job_mode"]) == ("local", 1, 5, "mpi")
    assert (row["workflow"], row["tags"], row["origin"]) == ("w", {"a": "b"}, "user")
    header, line = ok(run(site, "queue", "ls")).splitlines()
    assert header.split()[:8] == ["ID", "SCHED_ID", "QUEUE", "NODES", "WALL", "MODE", "STATE", "NATIVE"]
    assert line.split()[:8] == ["1", row["scheduler_id"], "local", "1", "5", "mpi", "RUNNING", "running"]

    assert ok(run(site, "queue", "cancel", "1")) == "batch job 1 cancelled\n"
    assert site.task(task).state == "RUN_TIMEOUT"
    assert ok(run(site, "queue", "cancel", "1")) == "batch job 1 had already ended (CANCELLED)\n"
    assert "No live batch jobs" in ok(run(site, "queue", "ls"))
    assert "CANCELLED" in ok(run(site, "queue", "ls", "--all"))
    events = json.loads(ok(run(site, "queue", "history", "1", "--json")))
    assert [e["to_state"] for e in events] == ["PENDING_SUBMISSION", "QUEUED", "RUNNING", "CANCELLED"]
    assert "cancelled by user" in ok(run(site, "queue", "history", "1"))


def test_rejected_submission_is_one_line_and_recorded(site: Site) -> None:
    line = error(run(site, "queue", "submit", "-n", "4", "-t", "5"), 1,
                 "batch job 1: submission failed: local scheduler runs jobs on this one machine",
                 "set max_nodes = 1 in [scheduler.queues.local]")
    assert "Traceback" not in line
    (row,) = json.loads(ok(run(site, "queue", "ls", "--all", "--json", "--no-sync")))
    assert row["state"] == "SUBMIT_FAILED" and row["message"] in line


@pytest.mark.parametrize(
    "args, words",
    [
        (["-n", "0", "-t", "5"], ["--num-nodes", "0 is not in the range x>=1"]),
        (["-n", "1"], ["Missing option '-t'"]),
        (["-n", "1", "-t", "5", "--tag", "novalue"], ["--tag", "expected KEY=VALUE"]),
        (["-n", "1", "-t", "5", "--job-mode", "smp"], ["--job-mode", "'smp' is not one of"]),
    ],
)
def test_bad_submit_arguments_write_nothing(site: Site, args: list[str], words: list[str]) -> None:
    error(run(site, "queue", "submit", *args), 2, *words)
    assert batchjobs.jobs(site, include_ended=True) == []


def test_unknown_batch_job(site: Site) -> None:
    error(run(site, "queue", "cancel", "9"), 1, "no batch job with id 9")
    error(run(site, "queue", "history", "9"), 1, "no batch job with id 9")


# ---------------------------------------------------------------------- balsam service


def test_service_once_runs_the_backlog_to_finished(site: Site) -> None:
    ids = site.add_tasks([{"command": ["true"], "node_packing_count": 4}] * 4)
    proc = balsam(site, "service", "--once")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "backlog 4 task(s); submitted [1]" in err
    assert wait_for(lambda: all(site.task(i).state == "JOB_FINISHED" for i in ids))
    assert wait_for(lambda: "FINISHED" in ok(run(site, "queue", "ls", "--all")))
    assert all(site.task(i).batch_job_id == 1 for i in ids)


def test_second_service_is_refused(site: Site) -> None:
    with ServiceLock(site.site_dir):
        proc = balsam(site, "service", "--once")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith(
        f"Error: another balsam service runs for this site (pid {os.getpid()}, holds "
    )
    assert "Traceback" not in err


def test_sigterm_ends_the_service_cleanly(site: Site) -> None:
    proc = balsam(site, "service", "--period", "0.1")
    lock = site.site_dir / "log" / "service.lock"
    assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid))
    time.sleep(0.3)  # a few periods
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "service stopped" in err and "Traceback" not in err
    with ServiceLock(site.site_dir):  # released
        pass
