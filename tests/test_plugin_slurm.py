"""The ``slurm`` scheduler plugin (plugins/slurm), against a real Slurm cluster.

Unless a docstring says otherwise, every command here is the real Slurm one talking to
the 2-node test cluster of ``tests/harness/slurm`` (fixture ``slurm_cluster``).  Fault
cases that a real Slurm cannot be made to show on demand (a hang, garbage output, a
state Slurm does not have) put a *stand-in* script of the same name first on PATH;
their docstrings say so.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balsam_core import (
    Allocation,
    BackfillWindow,
    BatchJobSpec,
    BatchJobState,
    ConfigError,
    PluginContext,
    PluginError,
    Scheduler,
    plugins,
)
from balsam_core.config import from_dict
from tests.harness.sites import wait_for
from tests.harness.slurm import SlurmCluster

balsam_slurm = pytest.importorskip(
    "balsam_slurm", reason="plugins/slurm is not installed (pip install -e plugins/slurm)"
)
from balsam_slurm import scheduler as slurm_mod  # noqa: E402
from balsam_slurm.scheduler import SlurmScheduler, SlurmSettings  # noqa: E402

real = pytest.mark.real_component

# The "launcher" the jobs run: records where it runs and what allocation() says.
PROBE = r"""
import json, os, subprocess, sys
from balsam_slurm.scheduler import SlurmScheduler
out = {"argv": sys.argv[1:], "cwd": os.getcwd(), "batch_job": os.environ.get("BALSAM_BATCH_JOB_ID"),
       "hostnames": subprocess.run(["scontrol", "show", "hostnames"], capture_output=True,
                                   text=True).stdout.split()}
alloc = SlurmScheduler(os.getcwd()).allocation()
out["nodes"] = [[n.name, n.cpus] for n in alloc.nodes]
out["end_time"] = alloc.end_time
with open("probe.json.tmp", "w") as f:
    json.dump(out, f)
os.replace("probe.json.tmp", "probe.json")
if sys.argv[1] == "sleep":
    import time; time.sleep(300)
sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else 0)
"""
NASTY = ["a b", "$(id)", "it's", "*"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    # sbatch's --chdir/--output must be reachable by slurmd (root, same machine).
    site = tmp_path / "site %1"
    site.mkdir()
    return site


@pytest.fixture
def make_sched(site: Path) -> Callable[..., SlurmScheduler]:
    def make(**settings: object) -> SlurmScheduler:
        settings.setdefault("exclusive", False)  # jobs of concurrent tests share nodes
        cfg = from_dict({}, site)
        context = PluginContext(site_dir=site, config=cfg, settings=SlurmSettings(**settings))
        (record,) = balsam_slurm.balsam_schedulers()
        return record.factory(context)

    return make


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


@pytest.fixture
def submitted() -> Iterator[list[str]]:
    """Ids a test submitted: cancelled afterwards (never anyone else's jobs)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=10)


def spec(site: Path, probe: Path, mode: str = "0", job_id: int = 1, **kw: object) -> BatchJobSpec:
    fields: dict[str, object] = dict(
        job_id=job_id, queue="debug", project="", num_nodes=1, wall_time_min=5,
        job_mode="mpi", launcher_argv=(sys.executable, str(probe), mode, *NASTY),
        workdir=site / "jobs" / f"job {job_id}",
    )
    fields.update(kw)
    return BatchJobSpec(**fields)  # type: ignore[arg-type]


def submit(sched: SlurmScheduler, job: BatchJobSpec, ids: list[str]) -> str:
    job.workdir.mkdir(parents=True, exist_ok=True)
    script = job.workdir / "submit.sh"
    script.write_text(sched.render_script(job))
    sid = sched.submit(script, job)
    ids.append(sid)
    return sid


def stand_in(bindir: Path, name: str, body: str) -> Path:
    """A stand-in command *name* (a shell script) in *bindir*."""
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --------------------------------------------------------------------------- plugin


def test_found_through_its_entry_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The installed distribution balsam-slurm registers ``slurm``; settings are checked."""
    monkeypatch.delenv("BALSAM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset_plugin_manager()
    pm = plugins.get_plugin_manager()
    registered = pm.get("scheduler", "slurm")
    assert registered.provider.distribution == "balsam-slurm"
    assert registered.record.settings is SlurmSettings

    cfg = from_dict({"scheduler": {"use": "slurm"},
                     "plugins": {"slurm": {"account": "proj1", "command_timeout_s": 5}}},
                    tmp_path)
    sched = pm.create("scheduler", "slurm", cfg)
    assert isinstance(sched, Scheduler)
    assert sched.settings == SlurmSettings(account="proj1", command_timeout_s=5.0)
    for bad, message in (
        ({"acount": "x"}, "unknown key 'acount' in [plugins.slurm]"),
        ({"account": "a b"}, "[plugins.slurm]: account = 'a b' has characters"),
        ({"extra_directives": ["--x\n#SBATCH --y"]}, "extra_directives[0]"),
        ({"command_timeout_s": 0}, "command_timeout_s must be > 0"),
        ({"exclusive": "yes"}, "plugins.slurm.exclusive: expected true or false"),
    ):
        cfg = from_dict({"scheduler": {"use": "slurm"}, "plugins": {"slurm": bad}}, tmp_path)
        with pytest.raises(ConfigError) as info:
            pm.check_site(cfg)
        assert message in str(info.value)


def test_imports_only_the_public_surface() -> None:
    import ast

    for module in (balsam_slurm, slurm_mod):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "balsam_core" in node.module:
                assert node.module == "balsam_core"


def test_rendered_script(make_sched, site, probe) -> None:
    """Rendering only (no Slurm command runs)."""
    sched = make_sched(account="acct1", constraint="knl&quad", qos="debug",
                       extra_directives=["--gpus-per-node=1"], exclusive=True)
    job = spec(site, probe, job_id=7, num_nodes=2, wall_time_min=13, queue="short",
               workdir=site / "it's $(here)")
    text = sched.render_script(job)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    head = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert head == [
        "#SBATCH --job-name=balsam-7", "#SBATCH --nodes=2", "#SBATCH --time=13",
        "#SBATCH --partition=short", "#SBATCH --account=acct1", "#SBATCH --qos=debug",
        "#SBATCH --constraint=knl&quad", "#SBATCH --exclusive", "#SBATCH --gpus-per-node=1",
    ]
    assert f"\ncd -- {shlex.quote(str(job.workdir))} || exit 1\n" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("exec ")]
    assert tuple(shlex.split(line)[1:]) == job.launcher_argv
    # the job's project wins over the default account; "default" means no --partition
    text = sched.render_script(spec(site, probe, queue="default", project="p2"))
    assert "--account=p2" in text and "--partition" not in text
    with pytest.raises(PluginError, match="batch job 1: account = 'p 2' has characters"):
        sched.render_script(spec(site, probe, project="p 2"))


def test_site_template_wins(make_sched, site, probe) -> None:
    (site / "templates").mkdir()
    (site / "templates" / "slurm.sh").write_text("#!/bin/sh\n${directives}\n# $$HOME ${job_id}\n")
    text = make_sched(qos="q").render_script(spec(site, probe, job_id=3))
    assert text == "#!/bin/sh\n#SBATCH --partition=debug\n#SBATCH --qos=q\n# $HOME 3\n"
    (site / "templates" / "slurm.sh").write_text("${nodes}\n")
    with pytest.raises(PluginError, match=r"templates/slurm.sh: unknown placeholder \$\{nodes\}"):
        make_sched().render_script(spec(site, probe))


def test_parse_cpus_per_node() -> None:
    assert slurm_mod.parse_cpus_per_node("4(x2),8") == [4, 4, 8]
    assert slurm_mod.parse_cpus_per_node("1") == [1]
    with pytest.raises(ValueError):
        slurm_mod.parse_cpus_per_node("4(2)")


def test_allocation_outside_a_job(make_sched, monkeypatch) -> None:
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PluginError, match="slurm: not inside a Slurm job"):
        make_sched().allocation()


# --------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def timed_out_job(slurm_cluster: SlurmCluster, tmp_path_factory) -> Iterator[str]:
    """A real job that hits its time limit.  Started when the module starts, so that its
    wait overlaps the other tests: Slurm enforces limits in whole minutes, checked every
    30 s, so the limit is cut to 0 right away (``scontrol update TimeLimit=0``) and
    slurmctld ends it as TIMEOUT at its next check (<= 30 s)."""
    work = tmp_path_factory.mktemp("timeout")
    script = work / "job.sh"
    script.write_text("#!/bin/sh\nsleep 300\n")
    out = subprocess.run(["sbatch", "--parsable", "-t", "1", f"--chdir={work}",
                          f"--output={work}/out", str(script)],
                         capture_output=True, text=True, check=True, timeout=10)
    sid = out.stdout.strip()
    subprocess.run(["scontrol", "update", f"JobId={sid}", "TimeLimit=0"], check=True, timeout=10)
    yield sid
    subprocess.run(["scancel", sid], capture_output=True, timeout=10)


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster, timed_out_job: str) -> SlurmCluster:
    return slurm_cluster


@real
def test_two_node_job_runs_launcher_and_sees_its_allocation(cluster, make_sched, site, probe, submitted) -> None:
    sched = make_sched()
    job = spec(site, probe, job_id=11, num_nodes=2, wall_time_min=3)
    before = time.time()
    sid = submit(sched, job, submitted)
    assert sid.isdigit()
    assert wait_for(lambda: (job.workdir / "probe.json").exists()), cluster.job_state(sid)
    dump = json.loads((job.workdir / "probe.json").read_text())
    assert dump["argv"] == ["0", *NASTY]
    assert Path(dump["cwd"]) == job.workdir and dump["batch_job"] == "11"
    assert dump["hostnames"] == ["c1", "c2"]
    # allocation() inside the job: both nodes, the CPUs Slurm gave, the real end time
    assert [n for n, _ in dump["nodes"]] == ["c1", "c2"]
    assert all(c >= 1 for _, c in dump["nodes"])
    assert before + 3 * 60 - 5 <= dump["end_time"] <= time.time() + 3 * 60 + 5

    status = wait_for(lambda: (s := sched.status([sid]).get(sid)) and s.state is BatchJobState.FINISHED and s)
    assert status, sched.status([sid])
    assert (status.native_state, status.num_nodes, status.wall_time_min) == ("COMPLETED", 2, 3.0)
    out = job.workdir / f"slurm-{sid}.out"
    assert f"balsam batch job 11: slurm job {sid} on c[1-2]" in out.read_text()


@real
def test_exclusive_job_gets_whole_nodes(cluster, make_sched, site, probe, submitted) -> None:
    """With ``exclusive`` (the default) allocation() reports all 4 CPUs of the node."""
    sched = make_sched(exclusive=True)
    job = spec(site, probe, num_nodes=1, queue="short")
    submit(sched, job, submitted)
    # may wait for a node the other tests' jobs leave whole
    assert wait_for(lambda: (job.workdir / "probe.json").exists(), timeout=40)
    (node,) = json.loads((job.workdir / "probe.json").read_text())["nodes"]
    assert node[1] == cluster.cpus_per_node


@real
def test_status_of_many_ids_in_one_command(cluster, make_sched, site, probe, submitted, monkeypatch) -> None:
    held = make_sched(extra_directives=["--hold"])
    sched = make_sched()
    running = submit(sched, spec(site, probe, "sleep", job_id=1), submitted)
    failed = submit(sched, spec(site, probe, "3", job_id=2), submitted)
    pending = submit(held, spec(site, probe, job_id=3), submitted)
    assert wait_for(lambda: cluster.job_state(failed) == "FAILED")
    assert wait_for(lambda: cluster.job_state(running) == "RUNNING")

    calls: list[tuple[str, ...]] = []
    real_run = sched._run
    monkeypatch.setattr(sched, "_run",
                        lambda argv, *a, **kw: calls.append(tuple(argv)) or real_run(argv, *a, **kw))
    result = sched.status([running, failed, pending, "999999", "not-an-id"])
    assert [c[0] for c in calls] == ["squeue", "sacct"]  # sacct only for the unknown id
    assert calls[1][calls[1].index("-j") + 1] == "999999"
    assert {k: (v.state, v.native_state) for k, v in result.items()} == {
        running: (BatchJobState.RUNNING, "RUNNING"),
        failed: (BatchJobState.FAILED, "FAILED"),
        pending: (BatchJobState.QUEUED, "PENDING"),
    }
    calls.clear()
    assert sched.status([running]).keys() == {running}
    assert [c[0] for c in calls] == ["squeue"]


@real
def test_cancel_goes_through_scancel(cluster, make_sched, site, probe, submitted) -> None:
    sched = make_sched()
    job = spec(site, probe, "sleep")
    sid = submit(sched, job, submitted)
    assert wait_for(lambda: (job.workdir / "probe.json").exists())
    sched.cancel(sid)
    assert cluster.wait_state(sid, {"CANCELLED"}) == "CANCELLED"
    status = sched.status([sid])[sid]
    assert (status.state, status.native_state) == (BatchJobState.CANCELLED, "CANCELLED")
    sched.cancel(sid)  # already over: quiet
    sched.cancel("999999")  # never existed: quiet
    with pytest.raises(PluginError, match="not a Slurm job id"):
        sched.cancel("12; rm -rf /")


@real
def test_sbatch_refusals_are_one_line_errors(cluster, make_sched, site, probe, submitted) -> None:
    sched = make_sched()
    with pytest.raises(PluginError) as info:
        submit(sched, spec(site, probe, queue="nope"), submitted)
    message = str(info.value)
    assert message.startswith("slurm: 'sbatch --parsable ") and "\n" not in message
    assert "failed (exit status 1)" in message and "Invalid partition name specified" in message
    with pytest.raises(PluginError, match="Node count specification invalid"):
        submit(sched, spec(site, probe, num_nodes=3), submitted)
    with pytest.raises(PluginError, match="Requested time limit is invalid"):
        submit(sched, spec(site, probe, queue="short", wall_time_min=31), submitted)
    assert submitted == []


@real
def test_sacct_answers_for_jobs_squeue_forgot(cluster, make_sched, site, probe, submitted, tmp_path, monkeypatch) -> None:
    """Real jobs and a real ``sacct`` (slurmdbd); ``squeue`` is a stand-in that prints
    nothing, as the real one does once MinJobAge (300 s here) has passed."""
    sched = make_sched()
    done = submit(sched, spec(site, probe, "0", job_id=1), submitted)
    failed = submit(sched, spec(site, probe, "3", job_id=2), submitted)
    assert wait_for(lambda: {cluster.job_state(done), cluster.job_state(failed)} == {"COMPLETED", "FAILED"})
    stand_in(tmp_path / "bin", "squeue", "exit 0")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def both() -> dict:
        result = sched.status([done, failed, "999999"])
        complete = len(result) == 2 and all(
            v.wall_time_min and v.native_state not in ("PENDING", "RUNNING")
            for v in result.values()
        )
        return result if complete else {}

    # slurmdbd records jobs asynchronously: the end state and time limit may come later
    result = wait_for(both, timeout=30)
    assert {k: (v.state, v.native_state, v.num_nodes, v.wall_time_min) for k, v in result.items()} == {
        done: (BatchJobState.FINISHED, "COMPLETED", 1, 5.0),
        failed: (BatchJobState.FAILED, "FAILED", 1, 5.0),
    }
    assert make_sched(use_sacct=False).status([done, failed]) == {}


@real
def test_backfill_windows_are_idle_nodes_per_partition(cluster, make_sched) -> None:
    windows = make_sched(unlimited_window_min=600).backfill_windows()
    assert all(isinstance(w, BackfillWindow) for w in windows)
    by_queue = {w.queue: w for w in windows}
    assert set(by_queue) <= {"debug", "short", "default"}
    for w in windows:
        assert 1 <= w.num_nodes <= cluster.nodes
    if "short" in by_queue:
        assert by_queue["short"].wall_time_min == 30
    if "debug" in by_queue:
        assert by_queue["debug"].wall_time_min == 600  # MaxTime=INFINITE
        assert by_queue["default"] == BackfillWindow("default", by_queue["debug"].num_nodes, 600)


def test_backfill_windows_from_recorded_sinfo(make_sched, tmp_path, monkeypatch) -> None:
    """``sinfo`` is a stand-in printing recorded ``-o %P|%a|%l|%D|%t`` output of a
    cluster with a down partition and mixed nodes."""
    stand_in(tmp_path / "bin", "sinfo", "cat <<'EOF'\n"
             "debug*|up|infinite|3|idle\n"
             "debug*|up|infinite|1|mix\n"
             "debug*|up|infinite|2|idle\n"
             "long|up|2-00:00:00|8|idle\n"
             "gpu|down|1:00:00|4|idle\n"
             "EOF")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert make_sched().backfill_windows() == [
        BackfillWindow("debug", 5, 1440.0),
        BackfillWindow("long", 8, 2880.0),
        BackfillWindow("default", 5, 1440.0),
    ]


@real
def test_job_hitting_its_time_limit_is_timeout(cluster, make_sched, timed_out_job) -> None:
    """A real job cut off by slurmctld at its time limit (see ``timed_out_job``)."""
    sched = make_sched()
    assert cluster.wait_state(timed_out_job, {"TIMEOUT"}, timeout=45) == "TIMEOUT"
    status = sched.status([timed_out_job])[timed_out_job]
    assert (status.state, status.native_state) == (BatchJobState.FINISHED, "TIMEOUT")


# --------------------------------------------------------------------------- faults


def test_missing_command(make_sched, site, probe, tmp_path, monkeypatch) -> None:
    """PATH without any Slurm command (a real missing program, no stand-in)."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    sched = make_sched()
    job = spec(site, probe)
    job.workdir.mkdir(parents=True)
    with pytest.raises(PluginError, match=r"^slurm: command 'sbatch' not found \(is it on PATH\?\)$"):
        sched.submit(job.workdir / "x.sh", job)
    with pytest.raises(PluginError, match="command 'squeue' not found"):
        sched.status(["1"])
    with pytest.raises(PluginError, match="command 'scancel' not found"):
        sched.cancel("1")


def test_hanging_command_times_out(make_sched, tmp_path, monkeypatch) -> None:
    """``squeue`` is a stand-in that hangs (sleeps 30 s); the real timeout kills it."""
    stand_in(tmp_path / "bin", "squeue", "echo 'slurm_load_jobs: waiting' >&2; exec sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    with pytest.raises(PluginError) as info:
        make_sched(command_timeout_s=0.5).status(["1", "2"])
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        "slurm: 'squeue -h -t all -j 1,2 -o '%i|%T|%D|%l'' did not finish within 0.5 s "
        "(killed): slurm_load_jobs: waiting"
    )


def test_garbage_output(make_sched, site, probe, tmp_path, monkeypatch) -> None:
    """``sbatch`` and ``squeue`` are stand-ins printing garbage (exit status 0)."""
    stand_in(tmp_path / "bin", "sbatch", "echo 'Submitted batch job'")
    stand_in(tmp_path / "bin", "squeue", "printf 'no pipes here\\n'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    sched = make_sched()
    job = spec(site, probe)
    with pytest.raises(PluginError, match="no job id in its output 'Submitted batch job'"):
        sched.submit(site / "x.sh", job)
    with pytest.raises(PluginError, match="unexpected output line 'no pipes here'"):
        sched.status(["5"])


def test_unknown_native_state_is_unknown_with_a_warning(make_sched, tmp_path, monkeypatch) -> None:
    """``squeue`` is a stand-in printing a recorded line with a state this plugin does
    not know, next to a real-format ``CANCELLED by 0`` line."""
    stand_in(tmp_path / "bin", "squeue", "printf '5|HIBERNATING|1|1:00\\n6|CANCELLED by 0|2|1-00:00:00\\n'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.warns(RuntimeWarning, match="slurm: unknown native state 'HIBERNATING'"):
        result = make_sched().status(["5", "6"])
    assert result["5"].state is BatchJobState.UNKNOWN and result["5"].wall_time_min == 1.0
    assert (result["6"].state, result["6"].num_nodes, result["6"].wall_time_min) == (
        BatchJobState.CANCELLED, 2, 1440.0)


def test_native_state_table_covers_slurm_states() -> None:
    """Slurm 22.05's job states (squeue --help / man squeue JOB STATE CODES)."""
    for name in ("BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE",
                 "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING",
                 "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD", "REQUEUED", "RESIZING",
                 "REVOKED", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED",
                 "TIMEOUT"):
        assert name in slurm_mod.NATIVE_STATES


def test_allocation_is_a_dataclass_of_the_core() -> None:
    assert Allocation is balsam_slurm.scheduler.Allocation
