"""The ``pbs`` scheduler plugin (plugins/pbs).

PBS Pro cannot run here.  Two kinds of tests:

* **recorded**: stand-in ``qsub``/``qstat``/``qdel`` scripts first on PATH print
  recorded PBS Pro output (formats of OpenPBS 20+/PBS Professional: ``qsub`` printing
  ``<seq>.<server>``, ``qstat -x -f -F json``, "Unknown Job Id" on stderr with exit
  status 153).  The plugin's command path (argv, timeout, exit codes) runs for real;
  the output is recorded.
* **real**: flavour ``torque`` against Debian's ``slurm-wlm-torque`` ``qsub``/``qstat``/
  ``qdel`` (Torque-style wrappers) on the real Slurm test cluster: real commands, real
  jobs, real output.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balsam_core import BatchJobSpec, BatchJobState, ConfigError, PluginContext, PluginError, plugins
from balsam_core.config import from_dict
from tests.harness.stand_ins import bindir, calls, stand_in  # noqa: F401 (bindir: fixture)

balsam_pbs = pytest.importorskip("balsam_pbs", reason="plugins/pbs is not installed")
from balsam_pbs.scheduler import PbsScheduler, PbsSettings  # noqa: E402
from tests.harness.sites import wait_for  # noqa: E402

# Recorded `qstat -x -f -F json 101.pbs01 102.pbs01 103.pbs01 104.pbs01` (PBS Pro;
# trimmed to the attributes the plugin reads plus a few neighbours).
QSTAT_JSON = {
    "timestamp": 1700000000,
    "pbs_version": "2022.1.3",
    "pbs_server": "pbs01",
    "Jobs": {
        "101.pbs01": {
            "Job_Name": "balsam-1", "Job_Owner": "alice@login1", "job_state": "R",
            "queue": "workq", "server": "pbs01",
            "Resource_List": {"ncpus": 128, "nodect": 2, "place": "scatter",
                              "select": "2:ncpus=64", "walltime": "01:30:00"},
            "stime": "Tue Nov 14 22:13:20 2023",
        },
        "102.pbs01": {
            "Job_Name": "balsam-2", "job_state": "Q", "queue": "workq",
            "Resource_List": {"nodect": 4, "walltime": "00:10:00"},
        },
        "103.pbs01": {
            "Job_Name": "balsam-3", "job_state": "F", "queue": "workq", "Exit_status": 0,
            "Resource_List": {"nodect": 1, "walltime": "00:05:00"},
        },
        "104.pbs01": {
            "Job_Name": "balsam-4", "job_state": "F", "queue": "workq", "Exit_status": 271,
            "Resource_List": {"nodect": 1, "walltime": "00:05:00"},
        },
    },
}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    return site


@pytest.fixture
def make_sched(site: Path) -> Callable[..., PbsScheduler]:
    def make(**settings: object) -> PbsScheduler:
        cfg = from_dict({"launcher": {"cpus_per_node": 8}}, site)
        (record,) = balsam_pbs.balsam_schedulers()
        return record.factory(PluginContext(site, cfg, PbsSettings(**settings)))

    return make


def spec(site: Path, argv: tuple[str, ...] = ("launcher", "a b"), **kw: object) -> BatchJobSpec:
    fields: dict[str, object] = dict(
        job_id=1, queue="workq", project="", num_nodes=2, wall_time_min=90, job_mode="mpi",
        launcher_argv=argv, workdir=site / "jobs" / "1",
    )
    fields.update(kw)
    return BatchJobSpec(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- plugin


def test_entry_point_and_settings(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("BALSAM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset_plugin_manager()
    pm = plugins.get_plugin_manager()
    assert pm.get("scheduler", "pbs").provider.distribution == "balsam-pbs"
    for bad, message in (
        ({"flavor": "lsf"}, "flavor must be one of pbspro, torque, got 'lsf'"),
        ({"resources": "ncpus=64 ngpus=4"}, "resources = 'ncpus=64 ngpus=4' has characters"),
        ({"queue": "x"}, "unknown key 'queue' in [plugins.pbs]"),
    ):
        cfg = from_dict({"scheduler": {"use": "pbs"}, "plugins": {"pbs": bad}}, tmp_path)
        with pytest.raises(ConfigError, match="plugins.pbs") as info:
            pm.check_site(cfg)
        assert message in str(info.value)


def test_rendered_script_pbspro_and_torque(make_sched, site) -> None:
    """Rendering only (no command runs)."""
    job = spec(site, project="proj", workdir=site / "it's here")
    text = make_sched(resources="ncpus=64", place="scatter:excl",
                      extra_directives=["-l filesystems=home:eagle"]).render_script(job)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert [ln for ln in text.splitlines() if ln.startswith("#PBS")] == [
        "#PBS -N balsam-1", "#PBS -l walltime=01:30:00", "#PBS -l select=2:ncpus=64",
        "#PBS -l place=scatter:excl", "#PBS -q workq", "#PBS -A proj",
        "#PBS -l filesystems=home:eagle",
    ]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("exec ")]
    assert shlex.split(line)[1:] == ["launcher", "a b"]
    torque = make_sched(flavor="torque", account="acct", place="ignored").render_script(
        spec(site, queue="default", wall_time_min=5))
    assert [ln for ln in torque.splitlines() if ln.startswith("#PBS")] == [
        "#PBS -N balsam-1", "#PBS -l walltime=00:05:00", "#PBS -l nodes=2", "#PBS -A acct",
    ]


# --------------------------------------------------------------------------- recorded PBS Pro


def test_qsub_prints_seq_dot_server(make_sched, site, bindir) -> None:
    """Recorded: ``qsub`` prints ``123.pbs01``.  Real: the argv and exit status path."""
    stand_in(bindir, "qsub", "echo 123.pbs01")
    job = spec(site)
    assert make_sched().submit(site / "s.sh", job) == "123.pbs01"
    assert calls(bindir) == [f"qsub -o {job.workdir}/pbs.out -e {job.workdir}/pbs.err {site}/s.sh"]


def test_qsub_refusal_and_garbage(make_sched, site, bindir) -> None:
    """Recorded: PBS Pro's refusal of an unknown queue (exit 168) and a garbage id."""
    stand_in(bindir, "qsub", "echo 'qsub: Unknown queue' >&2; exit 168")
    with pytest.raises(PluginError) as info:
        make_sched().submit(site / "s.sh", spec(site))
    assert str(info.value).endswith("failed (exit status 168): qsub: Unknown queue")
    stand_in(bindir, "qsub", "echo 'job submitted, maybe'")
    with pytest.raises(PluginError, match="no job id in its output 'job submitted, maybe'"):
        make_sched().submit(site / "s.sh", spec(site))


def test_status_from_recorded_json_in_one_call(make_sched, bindir) -> None:
    """Recorded: ``qstat -x -f -F json`` for four jobs, plus one id PBS does not know
    ("qstat: Unknown Job Id 999.pbs01" on stderr, exit status 153)."""
    (bindir / "qstat.json").write_text(json.dumps(QSTAT_JSON, indent=4))
    stand_in(bindir, "qstat", f"cat '{bindir}/qstat.json'\n"
             "echo 'qstat: Unknown Job Id 999.pbs01' >&2\nexit 153")
    ids = ["101.pbs01", "102.pbs01", "103", "104.pbs01", "999.pbs01"]
    result = make_sched().status(ids)
    assert calls(bindir) == ["qstat -x -f -F json " + " ".join(ids)]
    assert {k: (v.state, v.native_state, v.num_nodes, v.wall_time_min) for k, v in result.items()} == {
        "101.pbs01": (BatchJobState.RUNNING, "R", 2, 90.0),
        "102.pbs01": (BatchJobState.QUEUED, "Q", 4, 10.0),
        "103": (BatchJobState.FINISHED, "F (exit 0)", 1, 5.0),  # matched by number
        "104.pbs01": (BatchJobState.FAILED, "F (exit 271)", 1, 5.0),
    }


def test_all_unknown_and_real_errors(make_sched, bindir) -> None:
    """Recorded: only "Unknown Job Id" lines (no stdout) -> nothing; a server error and
    non-JSON output -> one-line PluginErrors."""
    stand_in(bindir, "qstat", "echo 'qstat: Unknown Job Id 5.pbs01' >&2; exit 153")
    assert make_sched().status(["5.pbs01"]) == {}
    stand_in(bindir, "qstat", "echo 'Connection refused' >&2\n"
             "echo 'qstat: cannot connect to server pbs01 (errno=111)' >&2; exit 2")
    with pytest.raises(PluginError, match=r"exit status 2\): Connection refused qstat: cannot connect"):
        make_sched().status(["5.pbs01"])
    stand_in(bindir, "qstat", "echo '<html>503</html>'")
    with pytest.raises(PluginError, match="output is not qstat JSON"):
        make_sched().status(["5.pbs01"])


def test_unknown_state_letter_warns(make_sched, bindir) -> None:
    """Recorded JSON with a state letter this plugin does not know."""
    doc = {"Jobs": {"7.s": {"job_state": "Z", "Resource_List": {"nodect": 1}}}}
    (bindir / "q.json").write_text(json.dumps(doc))
    stand_in(bindir, "qstat", f"cat '{bindir}/q.json'")
    with pytest.warns(RuntimeWarning, match="pbs: unknown native state 'Z'"):
        assert make_sched().status(["7.s"])["7.s"].state is BatchJobState.UNKNOWN


def test_hanging_qstat_and_missing_qdel(make_sched, bindir, tmp_path, monkeypatch) -> None:
    """Stand-in ``qstat`` that hangs; then a PATH with no PBS command at all."""
    stand_in(bindir, "qstat", "exec sleep 30")
    start = time.monotonic()
    with pytest.raises(PluginError, match=r"did not finish within 0.3 s \(killed\)"):
        make_sched(command_timeout_s=0.3).status(["1.s"])
    assert time.monotonic() - start < 5
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(PluginError, match="pbs: command 'qdel' not found"):
        make_sched().cancel("1.s")


def test_cancel_of_finished_job_is_quiet(make_sched, bindir) -> None:
    """Recorded: ``qdel`` of a finished job ("Job has finished", exit 35); ``qstat``
    then reports it F."""
    stand_in(bindir, "qdel", "echo 'qdel: Job has finished 103.pbs01' >&2; exit 35")
    (bindir / "q.json").write_text(json.dumps(QSTAT_JSON))
    stand_in(bindir, "qstat", f"cat '{bindir}/q.json'")
    make_sched().cancel("103.pbs01")
    assert calls(bindir) == ["qdel 103.pbs01", "qstat -x -f -F json 103.pbs01"]
    stand_in(bindir, "qdel", "echo 'qdel: Unauthorized Request 101.pbs01' >&2; exit 159")
    with pytest.raises(PluginError, match="Unauthorized Request"):
        make_sched().cancel("101.pbs01")  # still running: a real failure


def test_malformed_ids_are_skipped_by_status_and_refused_by_cancel(
    make_sched, bindir, caplog
) -> None:
    """As the Slurm and Cobalt plugins: a status query skips (and logs) ids that are
    not PBS ids and asks ``qstat`` about the others; ``cancel`` refuses them."""
    (bindir / "q.json").write_text(json.dumps(QSTAT_JSON))
    stand_in(bindir, "qstat", f"cat '{bindir}/q.json'")
    with caplog.at_level("WARNING"):
        result = make_sched().status(["101.pbs01", "-u all", "", "103; rm -rf /"])
    assert set(result) == {"101.pbs01"}
    assert calls(bindir) == ["qstat -x -f -F json 101.pbs01"]
    assert "pbs: '-u all' is not a job id of this scheduler; skipped" in caplog.text
    assert make_sched().status(["-x"]) == {}  # nothing well-formed: no qstat at all
    assert calls(bindir) == ["qstat -x -f -F json 101.pbs01"]
    for bad in ("-u all", "", "103; rm -rf /"):
        with pytest.raises(PluginError, match="not a PBS job id"):
            make_sched().cancel(bad)


def test_text_format_with_wrapped_values() -> None:
    """Recorded PBS Pro ``qstat -f`` text: 4-space indents and a value wrapped onto a
    tab-indented continuation line."""
    from balsam_core import CommandResult
    from balsam_pbs.scheduler import parse_qstat_text

    out = ("Job Id: 55.pbs01\n    Job_Name = balsam-9\n    job_state = H\n"
           "    Resource_List.nodect = 3\n    Resource_List.walltime = 02:00:00\n"
           "    Variable_List = PBS_O_HOME=/home/a,PBS_O_LANG=en_US.UTF-8,\n"
           "\tPBS_O_LOGNAME=a\n\nJob Id: 56.pbs01\n    job_state = E\n")
    jobs = parse_qstat_text(CommandResult(("qstat",), 0, out, ""))
    assert jobs["55.pbs01"]["Resource_List"] == {"nodect": "3", "walltime": "02:00:00"}
    assert jobs["55.pbs01"]["Variable_List"].endswith("UTF-8,PBS_O_LOGNAME=a")
    assert jobs["56.pbs01"] == {"job_state": "E"}


def test_allocation_from_pbs_nodefile(make_sched, tmp_path, monkeypatch) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1001\nx1001\nx1002\nx1003\nx1003\n")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    monkeypatch.setenv("BALSAM_JOB_END_TIME", "1700000900")
    alloc = make_sched().allocation()
    assert [(n.name, n.cpus) for n in alloc.nodes] == [("x1001", 8), ("x1002", 8), ("x1003", 8)]
    assert alloc.end_time == 1700000900.0
    monkeypatch.delenv("PBS_NODEFILE")
    with pytest.raises(PluginError, match="not inside a PBS job"):
        make_sched().allocation()


# --------------------------------------------------------------------------- real (Torque wrappers)

PROBE = r"""
import json, os, sys
from balsam_pbs.scheduler import PbsScheduler
alloc = PbsScheduler(os.getcwd(), cpus_per_node=4).allocation()
json.dump({"nodes": [n.name for n in alloc.nodes], "end": alloc.end_time, "argv": sys.argv[1:],
           "pbs_jobid": os.environ.get("PBS_JOBID")}, open("probe.json", "w"))
if sys.argv[1] == "sleep":
    import time; time.sleep(300)
"""


@pytest.fixture
def torque(slurm_cluster, site: Path, make_sched) -> Iterator[PbsScheduler]:
    """The plugin with flavour ``torque`` on the real Slurm cluster's Torque wrappers."""
    import shutil

    if shutil.which("qsub") is None or "slurm" not in Path(shutil.which("qsub")).read_text(errors="replace").lower():
        pytest.skip("slurm-wlm-torque's qsub is not installed")
    sched = make_sched(flavor="torque")
    sched.submitted = []  # type: ignore[attr-defined]
    yield sched
    for sid in sched.submitted:  # type: ignore[attr-defined]
        subprocess.run(["scancel", sid], capture_output=True, timeout=10)


def submit_probe(sched: PbsScheduler, site: Path, tmp_path: Path, mode: str, **kw: object) -> tuple[str, BatchJobSpec]:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    # the Torque wrappers do not set PBS_NODEFILE: their generate_pbs_nodefile writes one
    argv = ("sh", "-c", 'PBS_NODEFILE=$(generate_pbs_nodefile) exec "$0" "$@"',
            sys.executable, str(probe), mode)
    kw.setdefault("queue", "debug")
    job = spec(site, argv, wall_time_min=2, **kw)
    job.workdir.mkdir(parents=True, exist_ok=True)
    script = job.workdir / "submit.sh"
    script.write_text(sched.render_script(job))
    sid = sched.submit(script, job)
    sched.submitted.append(sid)  # type: ignore[attr-defined]
    return sid, job


@pytest.mark.real_component
def test_torque_wrappers_submit_status_allocation(torque, site, tmp_path) -> None:
    """Real: qsub -> a 2-node Slurm job from the #PBS directives; qstat -f status;
    allocation() inside the job from a real node file."""
    before = time.time()
    sid, job = submit_probe(torque, site, tmp_path, "0")
    assert sid.isdigit()
    assert wait_for(lambda: (job.workdir / "probe.json").exists())
    dump = json.loads((job.workdir / "probe.json").read_text())
    assert dump["nodes"] == ["c1", "c2"] and dump["pbs_jobid"] == sid
    assert before + 120 - 5 <= dump["end"] <= time.time() + 120 + 5
    status = wait_for(lambda: (s := torque.status([sid, "999999"])) and s[sid].state is BatchJobState.FINISHED and s)
    assert status and set(status) == {sid}, torque.status([sid])
    assert (status[sid].native_state, status[sid].num_nodes, status[sid].wall_time_min) == ("C", 2, 2.0)
    assert "balsam batch job 1: pbs job" in (job.workdir / "pbs.out").read_text()


@pytest.mark.real_component
def test_torque_wrappers_cancel_and_refusal(torque, site, tmp_path) -> None:
    """Real: qdel of a running job, qdel again (quiet), qsub refusing a bad queue."""
    sid, job = submit_probe(torque, site, tmp_path, "sleep")
    assert wait_for(lambda: (job.workdir / "probe.json").exists())
    assert torque.status([sid])[sid].state is BatchJobState.RUNNING
    torque.cancel(sid)
    assert wait_for(lambda: torque.status([sid])[sid].state is not BatchJobState.RUNNING)
    torque.cancel(sid)
    torque.cancel("999999")
    with pytest.raises(PluginError, match="Invalid partition name specified"):
        submit_probe(torque, site, tmp_path, "0", queue="nope")
