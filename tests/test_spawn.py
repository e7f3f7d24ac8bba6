"""Starting a task process: ``posix_spawn`` through the C library, and the ``Popen``
fallback used where the C library lacks what it needs — both must behave alike."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balsam_core.launcher import spawn as spawn_module
from balsam_core.launcher.spawn import LIBC, Child

Spawn = Callable[..., Child]


def test_this_machine_uses_the_c_library() -> None:
    assert LIBC is not None, "glibc >= 2.34 expected on the test machines (Debian 12)"


@pytest.fixture(params=["posix_spawn", "popen"])
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Spawn]:
    """Starts a command in ``tmp_path`` with ``out``/``err`` files there; waits for it."""
    libc = LIBC if request.param == "posix_spawn" else None
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path = tmp_path) -> Child:
        child = spawn_module.spawn(
            argv, {"PATH": os.environ["PATH"]} if env is None else env, str(cwd), devnull,
            str(tmp_path / "out"), str(tmp_path / "err"), libc=libc,
        )
        deadline = time.monotonic() + 10
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return child

    yield run
    os.close(devnull)


def test_output_goes_to_the_files_in_the_working_directory(start: Spawn, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("earlier\n")
    child = start(["sh", "-c", 'pwd; echo "$GREETING"; echo oops >&2; read x; echo "[$x]"'],
                  {"PATH": os.environ["PATH"], "GREETING": "héllo"})
    assert child.poll() == 0
    # Appended to; stdin is empty.
    assert (tmp_path / "out").read_text() == f"earlier\n{tmp_path}\nhéllo\n[]\n"
    assert (tmp_path / "err").read_text() == "oops\n"


def test_exit_codes_and_signals_are_reported_as_popen_does(start: Spawn) -> None:
    assert start(["sh", "-c", "exit 3"]).poll() == 3
    assert start(["sh", "-c", "kill -SEGV $$"]).poll() == -11


def test_the_child_leads_its_own_process_group_in_the_launchers_session(
    start: Spawn, tmp_path: Path
) -> None:
    """Its group holds what it forks (ended by ``killpg``); its session is the
    launcher's, where batch systems that track a job by session find it."""
    child = start(["sh", "-c", "cut -d' ' -f5,6 /proc/$$/stat"])
    pgid, sid = (tmp_path / "out").read_text().split()
    assert int(pgid) == child.pid
    if sys.version_info >= (3, 11):  # else Popen can only make it a session leader
        assert int(sid) == os.getsid(0)


def test_the_child_has_default_signals_and_no_inherited_descriptors(
    start: Spawn, tmp_path: Path
) -> None:
    leaky = os.open(tmp_path / "leak", os.O_WRONLY | os.O_CREAT)  # inheritable on purpose
    os.set_inheritable(leaky, True)
    try:
        start(["sh", "-c", "ls /proc/$$/fd; grep SigIgn /proc/$$/status"])
    finally:
        os.close(leaky)
    *fds, ignored = (tmp_path / "out").read_text().splitlines()
    assert sorted(int(fd) for fd in fds) == [0, 1, 2]
    assert int(ignored.split()[1], 16) & (1 << (13 - 1)) == 0  # SIGPIPE (13) is not ignored


def test_the_executable_is_found_on_the_path_of_the_tasks_environment(
    start: Spawn, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    assert start(["only-here"], {"PATH": f"/nonexistent:{bindir}:/usr/bin:/bin"}).poll() == 0
    assert start(["only-here"], {"PATH": "bin:/usr/bin:/bin"}).poll() == 0  # in the workdir
    assert (tmp_path / "out").read_text() == "found\nfound\n"
    with pytest.raises(FileNotFoundError) as missing:
        start(["only-here"], {"PATH": "/usr/bin:/bin"})
    assert missing.value.filename == "only-here"


def test_missing_executable_and_directory_are_named(start: Spawn, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        start([str(tmp_path / "no-such-program")])
    assert missing.value.filename == str(tmp_path / "no-such-program")
    with pytest.raises(FileNotFoundError) as gone:
        start(["true"], cwd=tmp_path / "no-such-dir")
    assert gone.value.filename == str(tmp_path / "no-such-dir")


def test_a_relative_command_is_resolved_in_the_working_directory(
    start: Spawn, tmp_path: Path
) -> None:
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tmp_path / "run.sh").chmod(0o755)
    assert start(["./run.sh"]).poll() == 0
    assert (tmp_path / "out").read_text() == "ran\n"


@pytest.mark.parametrize(
    "argv, env",
    [(["echo", "a\0b"], None), (["true"], {"BAD=NAME": "x"}), (["true"], {"X": "a\0b"})],
)
def test_nul_bytes_and_bad_names_are_refused_before_anything_runs(
    start: Spawn, argv: list[str], env: dict[str, str] | None
) -> None:
    with pytest.raises(ValueError):
        start(argv, env)


@pytest.mark.parametrize("libc", [LIBC, None], ids=["posix_spawn", "popen"])
def test_relative_output_paths_are_in_the_working_directory(
    libc: object, tmp_path: Path
) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        child = spawn_module.spawn(
            ["sh", "-c", "echo out; echo err >&2"], {"PATH": os.environ["PATH"]},
            str(tmp_path), devnull, "job.out", "job.err", libc=libc,
        )
        deadline = time.monotonic() + 10
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.close(devnull)
    assert (tmp_path / "job.out").read_text() == "out\n"
    assert (tmp_path / "job.err").read_text() == "err\n"


def test_each_start_gets_its_own_values_while_the_string_cache_starts_over(
    start: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task's id is a new string at every start, the others come back: with room for
    # 3 strings the cache is dropped and refilled at every start here.
    monkeypatch.setattr(spawn_module, "ENCODED_MAX", 3)
    for task_id in range(8):
        start(["sh", "-c", 'echo "$TASK"'], {"PATH": os.environ["PATH"], "TASK": str(task_id)})
    assert (tmp_path / "out").read_text().split() == [str(i) for i in range(8)]
