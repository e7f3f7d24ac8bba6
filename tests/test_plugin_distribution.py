"""Real plugin distributions, installed with pip from ``tests/plugin_dists/`` into a
throwaway target directory, found through their entry points and selected by a site."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DISTS = Path(__file__).parent / "plugin_dists"
BALSAM = shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugins")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "--target", str(target),
            str(DISTS / "balsam-testplugin"), str(DISTS / "balsam-brokenplugin"),
        ],
        check=True,
        capture_output=True,
    )
    return target


def balsam(plugin_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [BALSAM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_installed_plugin_is_listed_and_broken_one_reported(plugin_path: Path) -> None:
    result = balsam(plugin_path, "plugins")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["packing_strategy", "round-robin", "balsam-testplugin", "0.1.0"] in [r[:4] for r in rows]
    assert ["cli_command", "testplugin-hello", "balsam-testplugin", "0.1.0"] in [r[:4] for r in rows]
    assert "brokensched" in result.stdout and "balsam-brokenplugin" in result.stdout
    assert "No module named 'balsam_dependency_that_is_not_installed'" in result.stdout
    assert "Traceback" not in result.stderr


def test_site_selects_installed_plugin_through_balsam_toml(plugin_path: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = balsam(plugin_path, "site", "init", str(site), "--packing", "round-robin")
    assert result.returncode == 0, result.stderr
    toml = site / "balsam.toml"
    toml.write_text(toml.read_text() + "\n[plugins.round-robin]\nstride = 2\n")
    info = balsam(plugin_path, "--site", str(site), "site", "info")
    assert info.returncode == 0, info.stderr
    assert "round-robin" in info.stdout and "balsam-testplugin 0.1.0" in info.stdout
    assert balsam(plugin_path, "testplugin-hello").stdout == "hello from balsam-testplugin\n"

    toml.write_text(toml.read_text().replace("stride = 2", "stride = 0"))
    bad = balsam(plugin_path, "--site", str(site), "site", "info")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        f"Error: {toml}: [plugins.round-robin]: stride must be >= 1"
    )


def test_selecting_broken_plugin_names_its_distribution(plugin_path: Path, tmp_path: Path) -> None:
    result = balsam(plugin_path, "site", "init", str(tmp_path / "s"), "--scheduler", "brokensched")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: scheduler 'brokensched' comes from plugin 'brokensched' from")
    assert "balsam-brokenplugin 0.2.0, which is broken" in last
    assert not (tmp_path / "s").exists()
