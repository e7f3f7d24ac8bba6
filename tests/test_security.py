"""Security checks (issue 6): secrets, file modes, paths, arguments, plugin loading.

Already covered elsewhere and not repeated here:

* ``balsam site info`` (text and JSON) hides a PostgreSQL password:
  ``test_cli.py::test_site_info_hides_the_postgres_password``; connection errors hide it:
  ``test_db.py::test_unreachable_postgres_hides_password``.
* Site directory 0700 and SQLite file 0600 when made through the API:
  ``test_db.py::test_site_and_database_file_modes`` (here: through the CLI, whatever
  the umask, with the WAL files and ``balsam.toml``).
* Stage-in and stage-out paths (``../``, absolute, symlinks, file:// URLs, allowed
  roots): ``test_processing.py::test_stage_in_only_from_allowed_roots`` and
  ``::test_pre_and_postprocess_and_stage_out``; ``balsam task add --workdir ../out``:
  ``test_cli.py::test_other_bad_input``.
* Plugins come from entry points of group ``balsam`` only, and autoload can be switched
  off: ``test_plugins.py::test_entry_points_and_autoload_switch``.
"""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import balsam_core
from balsam_core.api import Site
from balsam_core.errors import ValidationError
from balsam_core.launcher.nodes import local_nodes
from balsam_core.launcher.pilot import Launcher, LauncherOptions
from balsam_core.states import State
from balsam_core.transitions import Change

BALSAM = shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"
PASSWORD = "Zq7-pw_not_for_logs"
HOSTILE = ["; rm -rf x", "$(id)", "`id`", "a b", "*", "$HOME", "| cat", "'\"", "\\n"]


def cli(site_dir: Path | None, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")}
    site = ["--site", str(site_dir)] if site_dir else []
    return subprocess.run(
        [BALSAM, *site, *args], env=env, capture_output=True, text=True, timeout=120, **kw
    )


def runnable(site: Site, *specs: dict) -> list[int]:
    ids = site.add_tasks([{"node_packing_count": 4, **spec} for spec in specs])
    site.transition([Change(i, s) for i in ids for s in (State.STAGED_IN, State.PREPROCESSED)])
    return ids


def run_launcher(site: Site) -> None:
    options = LauncherOptions(nodes=local_nodes(1, 2, 0), idle_timeout_s=0.3, grace_s=0.5)
    Launcher(site, options, processing=False).run()


# --------------------------------------------------------------------------- secrets


def test_password_not_in_errors_of_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://balsam:{PASSWORD}@127.0.0.1:1/nope"
    result = cli(None, "site", "init", str(tmp_path / "s"), "--database", url)
    assert PASSWORD not in result.stdout + result.stderr
    site_dir = tmp_path / "s2"
    assert cli(None, "site", "init", str(site_dir)).returncode == 0
    toml = site_dir / "balsam.toml"
    toml.write_text(toml.read_text().replace('"sqlite:///balsam.db"', f'"{url}"'))
    for args in (["site", "info"], ["task", "ls"], ["launcher", "--idle-timeout", "1"]):
        result = cli(site_dir, *args)
        out = result.stdout + result.stderr
        assert result.returncode != 0, args
        assert PASSWORD not in out, args
        assert "***" in out and "Traceback" not in out, (args, out)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


@pytest.mark.real_component
def test_password_not_in_logs_process_list_or_task_environment(
    tmp_path: Path, pg_server: object
) -> None:
    """A launcher on PostgreSQL with a password: neither the launcher's nor its worker's
    nor a task's argv, nor the task's environment, nor the launcher's log shows it."""
    from tests.harness.postgres import PostgresServer

    assert isinstance(pg_server, PostgresServer)
    name = f"sec_{os.getpid()}"
    url = pg_server.create_database(name, user="sec_user", password=PASSWORD)
    try:
        site_dir = tmp_path / "site"
        result = cli(None, "site", "init", str(site_dir), "--database", url)
        assert result.returncode == 0, result.stderr
        assert PASSWORD not in result.stdout + result.stderr
        assert stat.S_IMODE((site_dir / "balsam.toml").stat().st_mode) == 0o600
        site = Site.open(site_dir)
        task = site.add_task(
            command=["sh", "-c", "env; touch started; sleep 30"], name="dump",
            node_packing_count=2,
        ).id
        workdir = site.config.data_dir / site.task(task).default_workdir
        env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")}
        log = tmp_path / "launcher.log"
        with open(log, "wb") as out:
            launcher = subprocess.Popen(
                [BALSAM, "--site", str(site_dir), "launcher", "-v"], env=env, stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not (workdir / "started").exists():
                time.sleep(0.1)
            assert (workdir / "started").exists(), log.read_text()
            tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(True)]
            assert len(tree) >= 3  # launcher, processing worker, the task (sh, sleep)
            for proc in tree:
                assert PASSWORD not in " ".join(proc.cmdline()), proc.cmdline()
                assert all(PASSWORD not in v for v in proc.environ().values()), proc
        finally:
            launcher.terminate()
            launcher.wait(timeout=60)
        assert launcher.returncode == 0, log.read_text()
        assert PASSWORD not in (workdir / "stdout").read_text()
        assert PASSWORD not in log.read_text()
        assert "sec_user:***@" in cli(site_dir, "site", "info").stdout
        for path in site_dir.rglob("*"):
            if path.is_file() and path.name != "balsam.toml":
                assert PASSWORD.encode() not in path.read_bytes(), path
        site.db.dispose()
    finally:
        pg_server.drop_database(name)


# --------------------------------------------------------------------------- file modes


def test_site_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    result = cli(None, "site", "init", str(site_dir), preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    assert cli(site_dir, "task", "add", "-c", "true").returncode == 0  # opens it: WAL files
    assert stat.S_IMODE(site_dir.stat().st_mode) == 0o700
    for name in ("balsam.toml", "balsam.db", "balsam.db-wal", "balsam.db-shm"):
        path = site_dir / name
        if path.exists() or name == "balsam.db":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


# --------------------------------------------------------------------------- paths


def test_workdir_cannot_escape_the_site(sqlite_site: Site, tmp_path: Path) -> None:
    site = sqlite_site
    for bad in ("../out", "/tmp/out", "a/../../out", ".."):
        with pytest.raises(ValidationError, match="must stay inside the site's data/"):
            site.add_task(command=["true"], workdir=bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    (site.config.data_dir / "link").symlink_to(outside)
    (escaping, inside) = runnable(
        site,
        {"command": ["touch", "was-here"], "workdir": "link/run"},
        {"command": ["touch", "was-here"], "workdir": "fine/run"},
    )
    run_launcher(site)
    assert site.task(escaping).state == "RUN_ERROR"
    message = site.history(escaping)[-1].message
    assert f"resolves to {outside.resolve()}/run, outside the site's data directory" in message
    assert list(outside.iterdir()) == []  # nothing created or run out there
    assert site.task(inside).state == "JOB_FINISHED"
    assert (site.config.data_dir / "fine" / "run" / "was-here").exists()


# --------------------------------------------------------------------------- arguments


def test_hostile_arguments_reach_the_program_literally(sqlite_site: Site) -> None:
    site = sqlite_site
    site.add_app("show", ["printf", "%s\\n", "{a}", "{b}"])
    literal, templated = runnable(
        site,
        {"command": ["printf", "%s\\n", *HOSTILE], "name": "literal"},
        {"app": "show", "parameters": {"a": "; rm -rf x", "b": "$(id)"}, "name": "templated"},
    )
    for task_id in (literal, templated):  # a file `rm -rf x` would remove
        workdir = site.config.data_dir / site.task(task_id).default_workdir
        workdir.mkdir(parents=True)
        (workdir / "x").write_text("still here")
    run_launcher(site)
    for task_id, expected in ((literal, HOSTILE), (templated, ["; rm -rf x", "$(id)"])):
        assert site.task(task_id).state == "JOB_FINISHED", site.history(task_id)[-1].message
        workdir = site.config.data_dir / site.task(task_id).default_workdir
        assert (workdir / "stdout").read_text().splitlines() == expected
        assert (workdir / "x").read_text() == "still here"
    # The CLI splits a command string like a shell would, but never runs a shell.
    site_dir = site.site_dir
    result = cli(site_dir, "task", "add", "-c", "printf %s '$(id)' '; rm -rf x'")
    assert result.returncode == 0, result.stderr
    assert [t.command for t in site.tasks() if t.id not in (literal, templated)] == [
        ["printf", "%s", "$(id)", "; rm -rf x"]
    ]


# --------------------------------------------------------------------------- plugins


def test_plugins_load_only_from_entry_points_not_from_the_database(tmp_path: Path) -> None:
    """Names stored in the database (task names, tags, data, batch-job fields) are never
    imported: a module named like them, importable from PYTHONPATH, stays unloaded while
    a launcher and the CLI work on that site."""
    bait = tmp_path / "bait"
    bait.mkdir()
    marker = tmp_path / "imported"
    (bait / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    site_dir = tmp_path / "site"
    assert cli(None, "site", "init", str(site_dir)).returncode == 0
    site = Site.open(site_dir)
    site.add_task(
        command=["true"], name="evil_plugin", workflow="evil_plugin",
        tags={"plugin": "evil_plugin"}, data={"scheduler": "evil_plugin", "use": "evil_plugin"},
    )
    from balsam_core.models import BatchJob

    with site.db.session(write=True) as s:
        s.add(BatchJob(queue="evil_plugin", project="evil_plugin", num_nodes=1,
                       wall_time_min=1, job_mode="evil_plugin", state="pending-submission"))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")},
        "PYTHONPATH": str(bait),
    }
    for args in (["launcher", "--idle-timeout", "2"], ["task", "ls"], ["site", "info"],
                 ["plugins"]):
        result = subprocess.run(
            [BALSAM, "--site", str(site_dir), *args], env=env, capture_output=True, text=True,
            timeout=120,
        )
        assert result.returncode == 0, (args, result.stderr)
    assert site.task(site.tasks()[0].id).state == "JOB_FINISHED"
    assert not marker.exists()
    site.db.dispose()


def test_only_the_plugin_manager_imports_by_name() -> None:
    """Static check: the core imports modules by name only in ``plugins.py`` (entry
    points) and ``__init__.py`` (a fixed table of lazy names); nothing evals or execs."""
    root = Path(balsam_core.__file__).parent
    dynamic = {"import_module", "__import__", "exec", "eval", "exec_module"}
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in dynamic:
                    found.append((path.relative_to(root).as_posix(), name))
    assert sorted(found) == [("__init__.py", "import_module"), ("plugins.py", "import_module")]
