"""The ``balsam`` command line: happy paths, and the rule for bad input.

Bad input gets one line on stderr saying what is wrong and where (``Error: ...``), a
non-zero exit (2 for usage errors and bad task input, 1 otherwise), no traceback, and
nothing half-written: every error test compares the database before and after.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from balsam_core.api import Site
from balsam_core.cli import cli
from balsam_core.states import State
from balsam_core.transitions import Change

BALSAM = str(Path(sys.executable).with_name("balsam"))
PATH_TO_FINISHED = [
    State.STAGED_IN, State.PREPROCESSED, State.RUNNING, State.RUN_DONE, State.POSTPROCESSED,
    State.JOB_FINISHED,
]


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def site_dir(sqlite_site: Site) -> Path:
    sqlite_site.db.dispose()
    return sqlite_site.site_dir


@pytest.fixture
def api(site_dir: Path) -> Iterator[Site]:
    """The test's own handle on the site (to set states the CLI cannot)."""
    site = Site.open(site_dir)
    yield site
    site.db.dispose()


def run(site_dir: Path | None, *args: str) -> Result:
    argv = (["--site", str(site_dir)] if site_dir is not None else []) + list(args)
    return CliRunner().invoke(cli, argv)


def ok(result: Result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result.stdout


def check_error(code: int, exit_code: int, stdout: str, stderr: str, words: tuple[str, ...]) -> str:
    assert exit_code == code, (exit_code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("Error: ") and line[len("Error: "):].strip(), line
    for word in words:
        assert word in line, (word, line)
    assert stdout == "", stdout
    return line


def fails(result: Result, code: int, *words: str) -> str:
    """*result* is one ``Error:`` line on stderr containing *words*, exit *code*."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return check_error(code, result.exit_code, result.stdout, result.stderr, words)


def run_process(site_dir: Path | None, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [BALSAM, *(["--site", str(site_dir)] if site_dir is not None else []), *args]
    env = {**os.environ, "BALSAM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("BALSAM_SITE", None)
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def process_fails(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    return check_error(code, proc.returncode, proc.stdout, proc.stderr, words)


def snapshot(site_dir: Path) -> tuple[Any, ...]:
    """Everything a bad command could have half-written, read without Balsam."""
    with sqlite3.connect(f"file:{site_dir / 'balsam.db'}?mode=ro", uri=True) as conn:
        rows = tuple(
            tuple(conn.execute(sql).fetchall())
            for sql in (
                "SELECT id, state FROM task ORDER BY id",
                "SELECT name FROM app ORDER BY name",
                "SELECT count(*) FROM task_event",
                "SELECT parent_id, child_id FROM task_dependency ORDER BY 1, 2",
                "SELECT task_id, key, value FROM task_tag ORDER BY 1, 2",
                "SELECT key, value FROM balsam_meta ORDER BY key",
            )
        )
    conn.close()
    return rows


def task_count(site_dir: Path) -> int:
    return len(snapshot(site_dir)[0])


def edit_config(site_dir: Path, old: str, new: str) -> None:
    """Replace the first line of balsam.toml that starts with *old* (not comments)."""
    path = site_dir / "balsam.toml"
    text, count = re.subn(rf"^{re.escape(old)}", lambda _: new, path.read_text(), count=1, flags=re.M)
    assert count == 1, old
    path.write_text(text)


def add(site_dir: Path, *args: str) -> int:
    return int(ok(run(site_dir, "task", "add", "-q", *args)).strip())


def finish(site: Site, task_id: int) -> None:
    for state in PATH_TO_FINISHED:
        site.transition([Change(task_id, state, "test")])


# ---------------------------------------------------------------------- bad config


def test_malformed_toml(site_dir: Path) -> None:
    before = snapshot(site_dir)
    edit_config(site_dir, "[launcher]", "[launcher")
    line = fails(run(site_dir, "task", "add", "-c", "x"), 1, str(site_dir / "balsam.toml"), "invalid TOML")
    assert re.search(r"line \d+", line), line
    assert snapshot(site_dir) == before


def test_malformed_toml_in_a_real_process(site_dir: Path) -> None:
    before = snapshot(site_dir)
    edit_config(site_dir, 'name = "site"', 'name = "site')
    proc = run_process(site_dir, "task", "ls")
    line = process_fails(proc, 1, str(site_dir / "balsam.toml"), "invalid TOML")
    assert re.search(r"line \d+", line), line
    assert snapshot(site_dir) == before


def test_unknown_config_key(site_dir: Path) -> None:
    before = snapshot(site_dir)
    edit_config(site_dir, "max_retries = 3", "max_retry = 3")
    fails(
        run(site_dir, "task", "add", "-c", "x"), 1,
        str(site_dir / "balsam.toml"), "unknown key 'max_retry' in [recovery]", "max_retries",
    )
    assert snapshot(site_dir) == before


def test_wrong_type_in_config(site_dir: Path) -> None:
    edit_config(site_dir, "cpus_per_node = 0", 'cpus_per_node = "all"')
    fails(run(site_dir, "site", "info"), 1, "launcher.cpus_per_node", "expected an integer")


@pytest.mark.parametrize("command", [["site", "info"], ["task", "add", "-c", "x"], ["task", "ls"]])
def test_unknown_plugin_name(site_dir: Path, command: list[str]) -> None:
    before = snapshot(site_dir)
    edit_config(site_dir, 'use = "fifo"', 'use = "first-fit"')
    fails(
        run(site_dir, *command), 1,
        "unknown packing strategy 'first-fit'", "[packing] use", "installed: best-fit, fifo",
    )
    assert snapshot(site_dir) == before


def test_plugin_settings_error(site_dir: Path) -> None:
    with (site_dir / "balsam.toml").open("a") as f:
        f.write("\n[plugins.local]\ncancel_grace = 1\n")
    fails(run(site_dir, "site", "info"), 1, "unknown key 'cancel_grace' in [plugins.local]",
          "allowed: cancel_grace_s")


def test_non_finite_busy_timeout(site_dir: Path) -> None:
    edit_config(site_dir, "busy_timeout_s = 5.0", "busy_timeout_s = nan")
    fails(run(site_dir, "task", "ls"), 1, "busy_timeout_s")


def test_site_init_unknown_scheduler_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new"
    fails(run(None, "site", "init", str(target), "--scheduler", "nope"), 1,
          "unknown scheduler 'nope'", "installed: local")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_site_init_into_an_existing_site(site_dir: Path) -> None:
    before = snapshot(site_dir)
    config = (site_dir / "balsam.toml").read_text()
    fails(run(None, "site", "init", str(site_dir)), 2, "already a Balsam site")
    assert snapshot(site_dir) == before
    assert (site_dir / "balsam.toml").read_text() == config


# ---------------------------------------------------------------------- bad task input


def test_negative_resources(site_dir: Path) -> None:
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "-c", "x", "-n", "-1"), 2, "--num-nodes", "-1")
    assert snapshot(site_dir) == before


def test_non_integer_resources(site_dir: Path) -> None:
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "-c", "x", "-n", "two"), 2, "--num-nodes", "'two'")
    assert snapshot(site_dir) == before


def test_bad_key_value_pair(site_dir: Path) -> None:
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "-c", "x", "--env", "NOEQUALS"), 2, "--env", "KEY=VALUE")
    assert snapshot(site_dir) == before


def test_jsonl_with_a_bad_line(site_dir: Path, tmp_path: Path) -> None:
    ok(run(site_dir, "task", "add", "-c", "x"))
    before = snapshot(site_dir)
    path = tmp_path / "tasks.jsonl"
    lines = [{"command": f"echo {i}"} for i in range(5)]
    lines[2]["num_nodes"] = -1
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    fails(run(site_dir, "task", "add", "--jsonl", str(path)), 2,
          str(path), "line 3", "num_nodes", "-1")
    assert snapshot(site_dir) == before


def test_jsonl_line_numbers_count_blank_lines(site_dir: Path, tmp_path: Path) -> None:
    before = snapshot(site_dir)
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"command": "a"}\n\n{"command": "b"}\n{"command": "c", "num_nodes": 0}\n')
    fails(run(site_dir, "task", "add", "--jsonl", str(path)), 2, str(path), "line 4")
    assert snapshot(site_dir) == before


def test_jsonl_invalid_json(site_dir: Path, tmp_path: Path) -> None:
    before = snapshot(site_dir)
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"command": "a"}\n{"command": "b"\n{"command": "c"}\n')
    fails(run(site_dir, "task", "add", "--jsonl", str(path)), 2, str(path), "line 2", "invalid JSON")
    assert snapshot(site_dir) == before


def test_unknown_app(site_dir: Path) -> None:
    ok(run(site_dir, "app", "add", "sim", "python sim.py {temp}"))
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "simulate", "-p", "temp=3"), 2,
          "no app named 'simulate'", "apps: sim")
    assert snapshot(site_dir) == before


def test_app_parameters_checked(site_dir: Path) -> None:
    ok(run(site_dir, "app", "add", "sim", "python sim.py {temp}"))
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "sim"), 2, "app 'sim' needs parameter(s) temp")
    fails(run(site_dir, "task", "add", "sim", "-p", "temp=1", "-p", "tmp=2"), 2,
          "has no parameter(s) tmp", "it takes: temp")
    assert snapshot(site_dir) == before


def test_app_and_command_together(site_dir: Path) -> None:
    ok(run(site_dir, "app", "add", "sim", "python sim.py"))
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "sim", "-c", "rm -rf data"), 2, "--command")
    assert snapshot(site_dir) == before


def test_unknown_parent(site_dir: Path) -> None:
    add(site_dir, "-c", "x")
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "add", "-c", "y", "--parent", "99"), 2, "parent task 99 does not exist")
    assert snapshot(site_dir) == before


def test_dependency_cycle(site_dir: Path) -> None:
    a = add(site_dir, "-c", "a")
    b = add(site_dir, "-c", "b", "--parent", str(a))
    c = add(site_dir, "-c", "c", "--parent", str(b))
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "dep", str(a), str(c)), 2, "closes a cycle", f"{a} -> {c} -> {b} -> {a}")
    assert snapshot(site_dir) == before


def test_missing_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALSAM_SITE", raising=False)
    assert not any((p / "balsam.toml").exists() for p in (tmp_path, *tmp_path.parents))
    monkeypatch.chdir(tmp_path)
    fails(run(None, "task", "ls"), 1, "no Balsam site", "--site", "BALSAM_SITE", "balsam site init")
    fails(run(tmp_path, "task", "ls"), 1, "is not a Balsam site")
    assert list(tmp_path.iterdir()) == []


def test_database_locked(site_dir: Path) -> None:
    edit_config(site_dir, "busy_timeout_s = 5.0", "busy_timeout_s = 0.2")
    before = snapshot(site_dir)
    holder = sqlite3.connect(site_dir / "balsam.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        proc = run_process(site_dir, "task", "add", "-c", "echo hi")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    process_fails(proc, 1, "locked", "busy_timeout_s")
    assert snapshot(site_dir) == before
    # The lock is gone and the command left nothing pending: the site still works.
    assert task_count(site_dir) == 0
    ok(run(site_dir, "task", "add", "-c", "echo hi"))
    assert task_count(site_dir) == 1


def test_database_unreachable(tmp_path: Path) -> None:
    site = tmp_path / "remote"
    site.mkdir()
    (site / "balsam.toml").write_text(
        '[site]\ndatabase = "postgresql://balsam:secret@127.0.0.1:1/nope"\n'
    )
    for command in (["task", "ls"], ["task", "add", "-c", "x"], ["site", "info"]):
        line = fails(run(site, *command), 1, "cannot connect", "127.0.0.1:1/nope")
        assert "secret" not in line


def test_newer_schema_version(site_dir: Path) -> None:
    with sqlite3.connect(site_dir / "balsam.db") as conn:
        conn.execute("UPDATE balsam_meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    before = snapshot(site_dir)
    for command in (["task", "ls"], ["task", "add", "-c", "x"], ["site", "info"]):
        fails(run(site_dir, *command), 1, "schema version 999", "upgrade balsam-core")
    assert snapshot(site_dir) == before


def test_upgrade_of_a_newer_schema(site_dir: Path) -> None:
    with sqlite3.connect(site_dir / "balsam.db") as conn:
        conn.execute("UPDATE balsam_meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    fails(run(site_dir, "site", "upgrade"), 1, "upgrade balsam-core")


@pytest.mark.parametrize(
    "command, code, words",
    [
        (["task", "show", "999"], 1, ["no task with id 999"]),
        (["task", "kill", "999"], 1, ["no task with id 999"]),
        (["task", "rm", "--yes", "999"], 1, ["no task with id 999"]),
        (["task", "wait", "999"], 1, ["no task with id 999"]),
        (["task", "ls", "--state", "bogus"], 2, ["--state", "'bogus'"]),
        (["task", "add"], 2, ["give an APP or --command"]),
        (["task", "add", "-c", ""], 2, ["command is empty"]),
        (["task", "add", "-c", "x", "--workdir", "../out"], 2, ["workdir", "inside the site's data/"]),
        (["task", "retry", "1"], 2, ["task 1 is READY", "can be retried"]),
        (["app", "rm", "nope"], 1, ["no app named 'nope'"]),
        (["app", "add", "bad/name", "x"], 2, ["must be non-empty, without '/'"]),
        (["frobnicate"], 2, ["No such command 'frobnicate'"]),
    ],
)
def test_other_bad_input(site_dir: Path, command: list[str], code: int, words: list[str]) -> None:
    add(site_dir, "-c", "x")
    before = snapshot(site_dir)
    fails(run(site_dir, *command), code, *words)
    assert snapshot(site_dir) == before


# ---------------------------------------------------------------------- site / plugins


def test_site_init(tmp_path: Path) -> None:
    target = tmp_path / "mysite"
    out = ok(run(None, "site", "init", str(target), "--cpus-per-node", "8"))
    assert f"Created site {target}" in out and f"BALSAM_SITE={target}" in out
    assert (target / "balsam.toml").is_file()
    assert (target / "data").is_dir() and (target / "log").is_dir()
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "balsam.db").stat().st_mode) == 0o600
    assert "cpus_per_node = 8" in (target / "balsam.toml").read_text()
    assert snapshot(target)[0] == ()
    info = json.loads(ok(run(target, "site", "info", "--json")))
    assert info["name"] == "mysite" and info["tasks"] == {}


def test_site_info_shows_the_stack(site_dir: Path) -> None:
    add(site_dir, "-c", "x")
    out = ok(run(site_dir, "site", "info"))
    for kind, name in [("scheduler", "local"), ("mpi_launcher", "direct"),
                       ("task_source", "database"), ("packing_strategy", "fifo"),
                       ("recovery_policy", "retry-transient")]:
        assert re.search(rf"^  {kind}\s+{name}\s+'balsam_core\.builtin\.", out, re.M), (kind, out)
    assert "tasks     1: 1 READY" in out
    info = json.loads(ok(run(site_dir, "site", "info", "--json")))
    assert info["plugins"]["packing_strategy"][0]["name"] == "fifo"
    assert info["tasks"] == {"READY": 1}


@pytest.mark.parametrize("backend", ["postgresql"])
def test_site_info_hides_the_postgres_password(tmp_path: Path, database_url: str) -> None:
    assert ":secret@" in database_url
    target = tmp_path / "pgsite"
    out = ok(run(None, "site", "init", str(target), "--database", database_url))
    assert "secret" not in out
    for args in (["site", "info"], ["site", "info", "--json"]):
        out = ok(run(target, *args))
        assert "secret" not in out and "***" in out and "postgresql" in out
    ok(run(target, "task", "add", "-c", "echo pg"))
    assert "1 READY" in ok(run(target, "site", "info"))


def test_plugins_lists_builtins_by_kind() -> None:
    out = ok(run(None, "plugins"))
    assert out.splitlines()[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    rows = {tuple(line.split()[:3]) for line in out.splitlines()[1:]}
    for kind, name in [("scheduler", "local"), ("mpi_launcher", "direct"),
                       ("task_source", "database"), ("packing_strategy", "fifo"),
                       ("packing_strategy", "best-fit"), ("recovery_policy", "app-handler"),
                       ("recovery_policy", "retry-timeout"), ("recovery_policy", "retry-transient")]:
        assert (kind, name, "balsam-core") in rows
    data = json.loads(ok(run(None, "plugins", "--json")))
    assert data["broken"] == []
    names = {(p["kind"], p["name"]) for p in data["plugins"]}
    assert ("scheduler", "local") in names and ("packing_strategy", "best-fit") in names
    assert all(p["distribution"] == "balsam-core" and p["description"] for p in data["plugins"])


def test_version() -> None:
    from importlib.metadata import version

    proc = run_process(None, "--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == f"balsam, version {version('balsam-core')}"


# ---------------------------------------------------------------------- apps


def test_app_add_ls_rm(site_dir: Path) -> None:
    assert "No apps" in ok(run(site_dir, "app", "ls"))
    out = ok(run(site_dir, "app", "add", "sim", "python sim.py --temp {temp}", "--env", "OMP=4",
                 "--description", "the simulation"))
    assert out.strip() == "Added app sim: python sim.py --temp '{temp}'"
    ok(run(site_dir, "app", "add", "post", "./post.sh"))
    lines = ok(run(site_dir, "app", "ls")).splitlines()
    assert lines[0].split() == ["NAME", "COMMAND", "DESCRIPTION"]
    assert [line.split()[0] for line in lines[1:]] == ["post", "sim"]
    apps = {a["name"]: a for a in json.loads(ok(run(site_dir, "app", "ls", "--json")))}
    assert apps["sim"]["command"] == ["python", "sim.py", "--temp", "{temp}"]
    assert apps["sim"]["environment"] == {"OMP": "4"}
    assert apps["sim"]["description"] == "the simulation"
    before = snapshot(site_dir)
    fails(run(site_dir, "app", "add", "sim", "other"), 2, "app 'sim' already exists")
    assert snapshot(site_dir) == before
    assert ok(run(site_dir, "app", "rm", "post")).strip() == "Removed app post"
    assert snapshot(site_dir)[1] == (("sim",),)


def test_app_in_use_cannot_be_removed(site_dir: Path) -> None:
    ok(run(site_dir, "app", "add", "sim", "python sim.py"))
    add(site_dir, "sim")
    before = snapshot(site_dir)
    fails(run(site_dir, "app", "rm", "sim"), 2, "used by 1 task(s)")
    assert snapshot(site_dir) == before


# ---------------------------------------------------------------------- tasks


def show(site_dir: Path, task_id: int) -> dict[str, Any]:
    return json.loads(ok(run(site_dir, "task", "show", "--json", str(task_id))))


def test_task_add_variants(site_dir: Path) -> None:
    ok(run(site_dir, "app", "add", "sim", "python sim.py --temp {temp}"))
    out = ok(run(site_dir, "task", "add", "sim", "--param", "temp=300", "-n", "2",
                 "--ranks-per-node", "4", "--tag", "phase=1", "--env", "OMP=2", "-w", "wf",
                 "--mpi-flag=-l", "--mpi-flag", "--cpu-bind=depth"))
    assert re.fullmatch(r"Added task 1 \(sim\) in READY\n", out), out
    t1 = show(site_dir, 1)
    assert (t1["app"], t1["parameters"], t1["command"]) == ("sim", {"temp": "300"}, None)
    assert (t1["num_nodes"], t1["ranks_per_node"], t1["workflow"]) == (2, 4, "wf")
    assert t1["tags"] == {"phase": "1"} and t1["environment"] == {"OMP": "2"}
    assert t1["mpi_flags"] == ["-l", "--cpu-bind=depth"]
    assert t1["parents"] == [] and t1["state"] == "READY"

    c = add(site_dir, "-c", "echo 'a b'", "--name", "echoer")
    t2 = show(site_dir, c)
    assert t2["command"] == ["echo", "a b"] and t2["app"] is None and t2["name"] == "echoer"

    child = add(site_dir, "-c", "reduce", "--parent", "1", "--parent", str(c))
    t3 = show(site_dir, child)
    assert t3["parents"] == [1, c] and t3["state"] == "AWAITING_PARENTS"
    assert show(site_dir, 1)["children"] == [child]


def test_task_add_jsonl_1000(site_dir: Path, tmp_path: Path) -> None:
    ok(run(site_dir, "app", "add", "sim", "python sim.py {i}"))
    path = tmp_path / "many.jsonl"
    path.write_text("".join(
        json.dumps({"app": "sim", "parameters": {"i": i}, "tags": {"batch": str(i % 2)}}) + "\n"
        for i in range(1000)
    ))
    assert ok(run(site_dir, "task", "add", "--jsonl", str(path))).strip() == "Added 1000 tasks: 1-1000"
    assert task_count(site_dir) == 1000
    rows = json.loads(ok(run(site_dir, "task", "ls", "--json", "--tag", "batch=1", "--limit", "1000")))
    assert len(rows) == 500 and {r["tags"]["batch"] for r in rows} == {"1"}


def test_task_ls_table_json_and_filters(site_dir: Path, api: Site) -> None:
    for i in range(12):
        add(site_dir, "-c", f"echo {i}", "-w", "even" if i % 2 == 0 else "odd",
            "--tag", f"k={i % 3}")
    api.set_state(5, "FAILED")
    out = ok(run(site_dir, "task", "ls"))
    lines = out.splitlines()
    assert len(lines) == 13
    offset = lines[0].index("STATE")
    assert lines[0].split() == ["ID", "STATE", "WORKFLOW", "NAME", "NODES", "CPUS", "COMMAND", "TAGS"]
    for line in lines[1:]:
        assert line[offset - 2:offset] == "  " and line[offset:].split()[0] in ("READY", "FAILED"), line
    assert lines[5][offset:].startswith("FAILED")

    rows = json.loads(ok(run(site_dir, "task", "ls", "--json")))
    assert [r["id"] for r in rows] == list(range(1, 13))
    for key in ("id", "name", "workflow", "state", "command", "num_nodes", "tags", "parameters"):
        assert key in rows[0]

    def ids(*args: str) -> list[int]:
        return [r["id"] for r in json.loads(ok(run(site_dir, "task", "ls", "--json", *args)))]

    assert ids("--state", "FAILED") == [5]
    assert ids("--state", "ready", "--state", "failed") == list(range(1, 13))
    assert ids("--workflow", "odd") == [2, 4, 6, 8, 10, 12]
    assert ids("--tag", "k=0") == [1, 4, 7, 10]
    assert ids("--tag", "k=0", "--workflow", "even") == [1, 7]
    assert ok(run(site_dir, "task", "ls", "--workflow", "none")).strip() == "No tasks match."


def test_task_ls_paging_covers_every_task_once(site_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"command": f"echo {i}"}) + "\n" for i in range(12)))
    ok(run(site_dir, "task", "add", "--jsonl", str(path)))
    seen: list[int] = []
    after = 0
    for _ in range(10):
        result = run(site_dir, "task", "ls", "--limit", "4", "--after", str(after))
        out = ok(result)
        if out.strip() == "No more tasks.":
            break
        page = [int(line.split()[0]) for line in out.splitlines()[1:]]
        assert len(page) == 4
        seen += page
        hint = re.fullmatch(r"-- next page: balsam task ls \.\.\. --after (\d+)\n", result.stderr)
        assert hint, result.stderr
        after = int(hint.group(1))
    assert seen == list(range(1, 13))
    # JSON pages: 5 + 5 + 2.
    seen, after = [], 0
    while True:
        page = json.loads(ok(run(site_dir, "task", "ls", "--json", "--limit", "5", "--after", str(after))))
        if not page:
            break
        seen += [r["id"] for r in page]
        after = page[-1]["id"]
    assert seen == list(range(1, 13))


def test_task_ls_tree(site_dir: Path) -> None:
    root = add(site_dir, "-c", "prep", "--name", "prep")
    other = add(site_dir, "-c", "solo", "--name", "solo")
    child = add(site_dir, "-c", "sim", "--name", "sim", "--parent", str(root))
    lines = ok(run(site_dir, "task", "ls", "--tree")).splitlines()
    assert lines[0] == f"{root} prep [READY]"
    assert lines[1] == f"└─ {child} sim [AWAITING_PARENTS]"
    assert lines[2] == f"{other} solo [READY]"


def test_task_show_and_history(site_dir: Path) -> None:
    task_id = add(site_dir, "-c", "echo hi", "--tag", "a=b")
    out = ok(run(site_dir, "task", "show", str(task_id)))
    assert re.search(r"^id\s+1$", out, re.M) and re.search(r"^state\s+READY$", out, re.M)
    assert re.search(r'^tags\s+\{"a": "b"\}$', out, re.M)
    lines = ok(run(site_dir, "task", "history", str(task_id))).splitlines()
    assert lines[0].split() == ["TIME", "FROM", "TO", "LAUNCHER", "MESSAGE"]
    assert len(lines) == 2 and lines[1].split()[2:] == ["CREATED", "READY", "-", "created"]
    events = json.loads(ok(run(site_dir, "task", "history", "--json", str(task_id))))
    assert [(e["from"], e["to"], e["message"]) for e in events] == [("CREATED", "READY", "created")]


def test_task_kill(site_dir: Path) -> None:
    parent = add(site_dir, "-c", "a")
    child = add(site_dir, "-c", "b", "--parent", str(parent))
    out = ok(run(site_dir, "task", "kill", str(parent)))
    assert out.startswith("Killed")
    assert show(site_dir, parent)["state"] == "USER_KILLED"
    assert show(site_dir, child)["state"] == "USER_KILLED"  # a killed parent kills its dependants
    assert ok(run(site_dir, "task", "kill", str(parent))).strip() == "Nothing to kill"


def test_task_retry(site_dir: Path, api: Site) -> None:
    task_id = add(site_dir, "-c", "false")
    api.set_state(task_id, State.FAILED, "exit 1")
    assert ok(run(site_dir, "task", "retry", str(task_id))).strip() == f"Retrying 1 task(s): {task_id}"
    assert show(site_dir, task_id)["state"] == "READY"
    events = json.loads(ok(run(site_dir, "task", "history", "--json", str(task_id))))
    assert [(e["from"], e["to"]) for e in events][-2:] == [("READY", "FAILED"), ("FAILED", "READY")]


def test_task_rm(site_dir: Path) -> None:
    keep = add(site_dir, "-c", "keep")
    gone = add(site_dir, "-c", "gone", "--tag", "x=1")
    assert ok(run(site_dir, "task", "rm", "--yes", str(gone))).strip() == "Deleted 1 task(s)"
    tasks, _, events, deps, tags, _ = snapshot(site_dir)
    assert tasks == ((keep, "READY"),) and events == ((1,),) and deps == () and tags == ()


def test_task_rm_refuses_a_parent_still_waited_for(site_dir: Path) -> None:
    parent = add(site_dir, "-c", "a")
    add(site_dir, "-c", "b", "--parent", str(parent))
    before = snapshot(site_dir)
    fails(run(site_dir, "task", "rm", "--yes", str(parent)), 2, "dependant task")
    assert snapshot(site_dir) == before


def test_task_dep(site_dir: Path) -> None:
    a = add(site_dir, "-c", "a")
    b = add(site_dir, "-c", "b")
    assert ok(run(site_dir, "task", "dep", str(b), str(a))).strip() == f"Task {b} now waits for {a}"
    info = show(site_dir, b)
    assert info["parents"] == [a] and info["state"] == "AWAITING_PARENTS"


def test_task_wait(site_dir: Path, api: Site) -> None:
    a, b, c = (add(site_dir, "-c", f"t{i}", "-w", "w1" if i < 2 else "w2") for i in range(3))
    finish(api, a)
    finish(api, b)
    out = ok(run(site_dir, "task", "wait", str(a), str(b), "--interval", "0.05"))
    assert out.strip() == "2/2 done  JOB_FINISHED:2"
    assert ok(run(site_dir, "task", "wait", "-w", "w1")).strip() == "2/2 done  JOB_FINISHED:2"

    api.set_state(c, State.FAILED, "boom")
    result = run(site_dir, "task", "wait", str(a), str(c))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stdout.strip() == "2/2 done  FAILED:1  JOB_FINISHED:1"

    ready = add(site_dir, "-c", "later")
    result = run(site_dir, "task", "wait", str(ready), "--timeout", "0.2", "--interval", "0.05")
    assert result.exit_code == 124, result.output
    assert result.stdout.strip() == "0/1 done  READY:1"
    assert result.stderr.strip() == "Timed out with 1 task(s) not done"
