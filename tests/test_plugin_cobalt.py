"""The ``cobalt`` scheduler plugin (plugins/cobalt).

Cobalt cannot run here (it is retired with Theta).  Every command is a *stand-in*
script first on PATH that logs its argv and prints **recorded** Cobalt output: ``qsub``
printing the numeric job id (after a warning line, as Theta's did), ``qstat -l`` blocks
of ``Key : value`` lines, ``qdel`` of a job that is gone.  What is **real**: the
plugin's command path (argv lists, exit statuses, timeouts, missing programs), the
rendered script (checked with ``bash -n``), and the parsing.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from balsam_core import BatchJobSpec, BatchJobState, ConfigError, PluginContext, PluginError, plugins
from balsam_core.config import from_dict
from tests.harness.stand_ins import bindir, calls, stand_in  # noqa: F401 (bindir: fixture)

balsam_cobalt = pytest.importorskip("balsam_cobalt", reason="plugins/cobalt is not installed")
from balsam_cobalt.scheduler import CobaltScheduler, CobaltSettings  # noqa: E402

# Recorded `qstat -l --header JobID:State:Nodes:WallTime 348620 348621 348622 348623`
QSTAT_LONG = """\
JobID: 348620
    State    : running
    Nodes    : 128
    WallTime : 01:00:00

JobID: 348621
    State    : queued
    Nodes    : 8
    WallTime : 00:30:00

JobID: 348622
    State    : user_hold
    Nodes    : 4
    WallTime : 00:10:00

JobID: 348623
    State    : killing
    Nodes    : 2
    WallTime : 00:10:00
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    return site


@pytest.fixture
def make_sched(site: Path) -> Callable[..., CobaltScheduler]:
    def make(**settings: object) -> CobaltScheduler:
        cfg = from_dict({"launcher": {"cpus_per_node": 64}}, site)
        (record,) = balsam_cobalt.balsam_schedulers()
        return record.factory(PluginContext(site, cfg, CobaltSettings(**settings)))

    return make


def spec(site: Path, **kw: object) -> BatchJobSpec:
    fields: dict[str, object] = dict(
        job_id=4, queue="debug-cache-quad", project="", num_nodes=8, wall_time_min=30,
        job_mode="mpi", launcher_argv=("balsam", "launcher", "--tag", "x=a b"),
        workdir=site / "jobs" / "4",
    )
    fields.update(kw)
    return BatchJobSpec(**fields)  # type: ignore[arg-type]


def test_entry_point_and_settings(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("BALSAM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset_plugin_manager()
    pm = plugins.get_plugin_manager()
    assert pm.get("scheduler", "cobalt").provider.distribution == "balsam-cobalt"
    for bad, message in (
        ({"node_name_format": "nid{:05d}{}"}, "node_name_format"),
        ({"attrs": "a b"}, "attrs = 'a b' has characters"),
        ({"command_timeout_s": -1}, "command_timeout_s must be > 0"),
    ):
        cfg = from_dict({"scheduler": {"use": "cobalt"}, "plugins": {"cobalt": bad}}, tmp_path)
        with pytest.raises(ConfigError, match=r"\[plugins.cobalt\]") as info:
            pm.check_site(cfg)
        assert message in str(info.value)


def test_rendered_script(make_sched, site) -> None:
    """Rendering only."""
    job = spec(site, project="datascience", workdir=site / "it's")
    text = make_sched(attrs="enable_ssh=1:ssds=required", extra_directives=["--jobname x"]).render_script(job)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert [ln for ln in text.splitlines() if ln.startswith("#COBALT")] == [
        "#COBALT -n 8", "#COBALT -t 30", "#COBALT -q debug-cache-quad", "#COBALT -A datascience",
        "#COBALT --attrs enable_ssh=1:ssds=required", "#COBALT --jobname x",
    ]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("exec ")]
    assert shlex.split(line)[1:] == list(job.launcher_argv)
    with pytest.raises(PluginError, match="batch job 4: project = 'data science'"):
        make_sched().render_script(spec(site, project="data science"))


def test_submit_parses_the_id_after_warnings(make_sched, site, bindir) -> None:
    """Recorded: Theta's qsub printing a warning line and then the job id."""
    stand_in(bindir, "qsub", "echo 'Job routed to queue \"debug-cache-quad\".'\necho 348620")
    job = spec(site)
    assert make_sched().submit(site / "s.sh", job) == "348620"
    w = job.workdir
    assert calls(bindir) == [f"qsub --cwd {w} -o {w}/cobalt.out -e {w}/cobalt.err "
                             f"--debuglog {w}/cobalt.log --mode script {site}/s.sh"]


def test_submit_refused_garbage_missing(make_sched, site, bindir, tmp_path, monkeypatch) -> None:
    """Recorded: qsub refusing a project (exit 1, its message on stderr); garbage id;
    then a real missing program."""
    stand_in(bindir, "qsub", "echo 'Project nope is not valid' >&2; exit 1")
    with pytest.raises(PluginError, match=r"^cobalt: 'qsub .*' failed \(exit status 1\): Project nope is not valid$"):
        make_sched().submit(site / "s.sh", spec(site))
    stand_in(bindir, "qsub", "echo 'usage: qsub ...'")
    with pytest.raises(PluginError, match="no job id in its output 'usage: qsub ...'"):
        make_sched().submit(site / "s.sh", spec(site))
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    with pytest.raises(PluginError, match=r"cobalt: command 'qsub' not found"):
        make_sched().submit(site / "s.sh", spec(site))


def test_status_of_many_ids_in_one_call(make_sched, bindir) -> None:
    """Recorded ``qstat -l`` output for four jobs; 348699 ended (Cobalt keeps no history)."""
    (bindir / "out").write_text(QSTAT_LONG)
    stand_in(bindir, "qstat", f"cat '{bindir}/out'")
    ids = ["348620", "348621", "348622", "348623", "348699"]
    result = make_sched().status(ids)
    assert calls(bindir) == ["qstat -l --header JobID:State:Nodes:WallTime " + " ".join(ids)]
    assert {k: (v.state, v.native_state, v.num_nodes, v.wall_time_min) for k, v in result.items()} == {
        "348620": (BatchJobState.RUNNING, "running", 128, 60.0),
        "348621": (BatchJobState.QUEUED, "queued", 8, 30.0),
        "348622": (BatchJobState.QUEUED, "user_hold", 4, 10.0),
        "348623": (BatchJobState.CANCELLED, "killing", 2, 10.0),
    }


def test_status_none_known_garbage_and_unknown_state(make_sched, bindir) -> None:
    """Recorded: qstat with no job listed (exit 1, no output); garbage; a new state."""
    stand_in(bindir, "qstat", "exit 1")
    assert make_sched().status(["1", "2"]) == {}
    stand_in(bindir, "qstat", "echo 'Traceback (most recent call last):' >&2; exit 1")
    with pytest.raises(PluginError, match="exit status 1\\): Traceback"):
        make_sched().status(["1"])
    stand_in(bindir, "qstat", "echo 'JobID  State'; echo '=====  ====='")
    with pytest.raises(PluginError, match="unexpected qstat line 'JobID  State'"):
        make_sched().status(["1"])
    stand_in(bindir, "qstat", "printf 'JobID: 1\\n    State : preempted\\n'")
    with pytest.warns(RuntimeWarning, match="cobalt: unknown native state 'preempted'"):
        assert make_sched().status(["1"])["1"].state is BatchJobState.UNKNOWN


def test_hanging_qstat_times_out(make_sched, bindir) -> None:
    """Stand-in qstat that hangs; the real timeout kills it."""
    stand_in(bindir, "qstat", "exec sleep 30")
    start = time.monotonic()
    with pytest.raises(PluginError, match=r"did not finish within 0.3 s \(killed\)"):
        make_sched(command_timeout_s=0.3).status(["1"])
    assert time.monotonic() - start < 5


def test_cancel(make_sched, bindir) -> None:
    """Recorded: qdel of a gone job fails and qstat no longer lists it -> quiet; qdel of
    a listed job failing -> error."""
    stand_in(bindir, "qdel", "echo 'Failed to delete' >&2; exit 1")
    stand_in(bindir, "qstat", "exit 1")
    make_sched().cancel("348699")
    assert calls(bindir) == ["qdel 348699", "qstat -l --header JobID:State:Nodes:WallTime 348699"]
    (bindir / "out").write_text(QSTAT_LONG)
    stand_in(bindir, "qstat", f"cat '{bindir}/out'")
    with pytest.raises(PluginError, match="qdel 348620' failed \\(exit status 1\\): Failed to delete"):
        make_sched().cancel("348620")
    with pytest.raises(PluginError, match="not a Cobalt job id"):
        make_sched().cancel("-u all")


def test_allocation_from_partname_and_nodefile(make_sched, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COBALT_PARTNAME", "1-3,7")
    monkeypatch.setenv("BALSAM_JOB_END_TIME", "1700000000")
    alloc = make_sched().allocation()
    assert [n.name for n in alloc.nodes] == ["nid00001", "nid00002", "nid00003", "nid00007"]
    assert {n.cpus for n in alloc.nodes} == {64} and alloc.end_time == 1700000000.0
    assert [n.name for n in make_sched(node_name_format="c{}").allocation().nodes][:2] == ["c1", "c2"]
    monkeypatch.setenv("COBALT_PARTNAME", "3-1")
    with pytest.raises(PluginError, match="COBALT_PARTNAME='3-1': bad range"):
        make_sched().allocation()
    monkeypatch.delenv("COBALT_PARTNAME")
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("cc001\ncc002\n")
    monkeypatch.setenv("COBALT_NODEFILE", str(nodefile))
    monkeypatch.setenv("BALSAM_JOB_END_TIME", "soon")
    with pytest.raises(PluginError, match="BALSAM_JOB_END_TIME='soon' is not a time"):
        make_sched().allocation()
    monkeypatch.delenv("BALSAM_JOB_END_TIME")
    alloc = make_sched().allocation()
    assert [n.name for n in alloc.nodes] == ["cc001", "cc002"] and alloc.end_time is None
    monkeypatch.delenv("COBALT_NODEFILE")
    with pytest.raises(PluginError, match="not inside a Cobalt job"):
        make_sched().allocation()


def test_end_time_set_by_the_real_template(make_sched, site, tmp_path) -> None:
    """The rendered template runs for real under bash; the launcher is ``env``."""
    job = spec(site, launcher_argv=("env",), wall_time_min=2, workdir=tmp_path)
    script = tmp_path / "job.sh"
    script.write_text(make_sched().render_script(job))
    before = int(time.time())
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=10).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["BALSAM_BATCH_JOB_ID"] == "4"
    assert before + 120 <= int(env["BALSAM_JOB_END_TIME"]) <= time.time() + 121
