"""Stand-in commands for scheduler plugin tests (pbs, cobalt).

A stand-in is a ``/bin/sh`` script named like the real command (``qsub``, ``qstat``...)
in the directory of the ``bindir`` fixture, which is first on PATH.  Each one appends
its name and arguments to ``<bindir>/calls.log`` (read back with :func:`calls`) and then
runs its body, which prints recorded output.

A test module uses the fixture by importing it:
``from tests.harness.stand_ins import bindir, calls, stand_in``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


@pytest.fixture
def bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH for stand-in commands; each logs its argv to calls.log."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ['PATH']}")
    return path


def stand_in(bindir: Path, name: str, body: str) -> None:
    """Write the stand-in command *name*: log its argv, then run the shell *body*."""
    script = bindir / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{bindir}/calls.log"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def calls(bindir: Path) -> list[str]:
    """The stand-in calls so far, one ``name arg...`` line each, oldest first."""
    log = bindir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []
