"""``balsam.toml`` -> validated settings (config.from_dict / config.load) and site discovery.

The rule under test (DESIGN §3): every bad config is one ConfigError line naming the file,
the table / key, and what is allowed; never a traceback from deeper down.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from balsam_core import config
from balsam_core.api import Site
from balsam_core.config import (
    LauncherSection,
    PackingSection,
    RecoverySection,
    SchedulerSection,
    ServiceSection,
    SiteSection,
    TaskSourceSection,
)
from balsam_core.errors import ConfigError, PluginError, SiteNotFound
from balsam_core.plugin_types import QueuePolicy
from balsam_core.plugins import get_plugin_manager
from balsam_core.site import find_site_dir

SRC = "/x/balsam.toml"


def bad(raw: dict[str, Any], *words: str, tmp: Path = Path("/x")) -> str:
    """from_dict must raise one ConfigError line containing the source and *words*."""
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw, tmp, source=SRC)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(SRC + ": "), message
    for word in words:
        assert word in message, (word, message)
    return message


def write(site_dir: Path, text: str) -> Path:
    site_dir.mkdir(parents=True, exist_ok=True)
    path = site_dir / "balsam.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ defaults / good input


def test_defaults_of_an_empty_file(tmp_path: Path) -> None:
    write(tmp_path, "")
    cfg = config.load(tmp_path)
    assert cfg.site_dir == tmp_path.resolve()
    assert cfg.path == tmp_path.resolve() / "balsam.toml"
    assert cfg.data_dir.name == "data" and cfg.log_dir.name == "log"
    assert cfg.site == SiteSection()
    assert cfg.site.database == "sqlite:///balsam.db" and cfg.site.busy_timeout_s == 5.0
    assert cfg.scheduler.use == "local"
    assert cfg.scheduler.queues == {"local": QueuePolicy(max_queued=1, max_nodes=1)}
    assert cfg.launcher.mpi == "direct" and cfg.launcher.cpus_per_node == 0
    assert cfg.launcher.node_cpus == (os.cpu_count() or 1)
    assert cfg.task_source.use == "database"
    assert cfg.packing.use == "fifo"
    assert cfg.recovery.chain == ["app-handler", "retry-timeout", "retry-transient"]
    assert cfg.recovery.max_retries == 3
    assert cfg.plugins == {}
    assert cfg.selections() == {
        "scheduler": ["local"],
        "mpi_launcher": ["direct"],
        "task_source": ["database"],
        "packing_strategy": ["fifo"],
        "recovery_policy": ["app-handler", "retry-timeout", "retry-transient"],
    }


FULL = """
[site]
name = "theta"
database = "sqlite:///other.db"
busy_timeout_s = 2          # an integer is fine for a float
allowed_roots = ["/scratch", "/projects"]

[scheduler]
use = "local"
project = "datascience"
queues = { default = { max_queued = 5, min_nodes = 128, max_nodes = 4392, max_wall_min = 180 }, debug = { submit = false, max_queued = 0, min_wall_min = 5, max_wall_min = 60 } }

[launcher]
mpi = "direct"
cpus_per_node = 64
gpus_per_node = 4
mpi_flags = ["--bind-to", "core"]
heartbeat_s = 5
lease_s = 30.5

[service]
period_s = 30
submit_interval_s = 10
max_backoff_s = 600
job_idle_timeout_s = 0
job_mode = "serial"

[task_source]
use = "database"

[packing]
use = "best-fit"

[recovery]
chain = ["retry-transient", "app-handler"]
max_retries = 0
transient_exit_codes = [75, 143]
transient_signals = []
backoff_s = 0.5

[plugins.local]
cancel_grace_s = 3
"""


def test_every_section_key_and_type(tmp_path: Path) -> None:
    write(tmp_path, FULL)
    cfg = config.load(tmp_path)
    assert cfg.site == SiteSection(
        name="theta", database="sqlite:///other.db", busy_timeout_s=2.0,
        allowed_roots=["/scratch", "/projects"],
    )
    assert isinstance(cfg.site.busy_timeout_s, float)
    assert cfg.scheduler == SchedulerSection(
        use="local", project="datascience",
        queues={
            "default": QueuePolicy(max_queued=5, min_nodes=128, max_nodes=4392, max_wall_min=180),
            "debug": QueuePolicy(submit=False, max_queued=0, min_wall_min=5, max_wall_min=60),
        },
    )
    assert cfg.launcher == LauncherSection(
        mpi="direct", cpus_per_node=64, gpus_per_node=4, mpi_flags=["--bind-to", "core"],
        heartbeat_s=5.0, lease_s=30.5,
    )
    assert cfg.launcher.node_cpus == 64
    assert cfg.service == ServiceSection(
        period_s=30.0, submit_interval_s=10.0, max_backoff_s=600.0, job_idle_timeout_s=0.0,
        job_mode="serial",
    )
    assert cfg.task_source == TaskSourceSection()
    assert cfg.packing == PackingSection(use="best-fit")
    assert cfg.recovery == RecoverySection(
        chain=["retry-transient", "app-handler"], max_retries=0,
        transient_exit_codes=[75, 143], transient_signals=[], backoff_s=0.5,
    )
    # Plugin tables stay raw until the selected plugin builds them.
    assert cfg.plugins == {"local": {"cancel_grace_s": 3}}


@pytest.mark.parametrize(
    "section, cls",
    [("site", SiteSection), ("scheduler", SchedulerSection), ("service", ServiceSection),
     ("launcher", LauncherSection),
     ("task_source", TaskSourceSection), ("packing", PackingSection), ("recovery", RecoverySection)],
)
def test_unknown_key_lists_the_allowed_keys(section: str, cls: type) -> None:
    message = bad({section: {"colour": "blue"}}, f"unknown key 'colour' in [{section}]", "allowed:")
    for f in dataclasses.fields(cls):
        assert f.name in message


def test_unknown_section_lists_the_sections() -> None:
    bad({"sched": {"use": "local"}}, "unknown section [sched]",
        "site, scheduler, service, launcher, task_source, packing, recovery, plugins")


@pytest.mark.parametrize(
    "raw, where, expected",
    [
        ({"launcher": {"cpus_per_node": "64"}}, "launcher.cpus_per_node", "expected an integer, got a string '64'"),
        ({"launcher": {"cpus_per_node": True}}, "launcher.cpus_per_node", "expected an integer, got a boolean True"),
        ({"launcher": {"cpus_per_node": 64.0}}, "launcher.cpus_per_node", "expected an integer"),
        ({"recovery": {"max_retries": 2.5}}, "recovery.max_retries", "expected an integer"),
        ({"launcher": {"heartbeat_s": "10"}}, "launcher.heartbeat_s", "expected a number"),
        ({"launcher": {"heartbeat_s": True}}, "launcher.heartbeat_s", "expected a number"),
        ({"site": {"name": 7}}, "site.name", "expected a string"),
        ({"scheduler": {"queues": {"q": {"submit": 1}}}}, "scheduler.queues.q.submit", "expected true or false"),
        ({"recovery": {"chain": "app-handler"}}, "recovery.chain", "expected a list, got a string"),
        ({"launcher": {"mpi_flags": "--bind-to core"}}, "launcher.mpi_flags", "expected a list"),
        ({"site": {"allowed_roots": "/scratch"}}, "site.allowed_roots", "expected a list"),
        ({"recovery": {"transient_exit_codes": [1, "2"]}}, "recovery.transient_exit_codes[1]", "expected an integer"),
        ({"launcher": {"mpi_flags": [1]}}, "launcher.mpi_flags[0]", "expected a string"),
    ],
)
def test_wrong_type_names_key_and_expected_type(raw: dict[str, Any], where: str, expected: str) -> None:
    bad(raw, where, expected)


@pytest.mark.parametrize(
    "raw, where",
    [
        ({"site": 5}, "[site] must be a table"),
        ({"scheduler": {"queues": 3}}, "[scheduler.queues] must be a table"),
        ({"scheduler": {"queues": {"debug": 3}}}, "[scheduler.queues.debug] must be a table"),
        ({"plugins": 1}, "[plugins] must be a table"),
        ({"plugins": {"local": "fast"}}, "[plugins.local] must be a table"),
    ],
)
def test_a_table_expected(raw: dict[str, Any], where: str) -> None:
    bad(raw, where)


@pytest.mark.parametrize(
    "policy, words",
    [
        ({"min_nodes": 8, "max_nodes": 4}, ["min_nodes (8) > max_nodes (4)"]),
        ({"min_wall_min": 90, "max_wall_min": 60}, ["min_wall_min (90) > max_wall_min (60)"]),
        ({"max_nodes": 0}, ["max_nodes must be >= 1"]),
        ({"max_queued": -1}, ["max_queued must be >= 0"]),
        ({"nodes": 4}, ["unknown key 'nodes'", "allowed: submit, max_queued, min_nodes"]),
    ],
)
def test_queue_policy_errors_name_the_queue_table(policy: dict[str, Any], words: list[str]) -> None:
    bad({"scheduler": {"queues": {"debug": policy}}}, "[scheduler.queues.debug]", *words)


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"launcher": {"heartbeat_s": 60, "lease_s": 60}}, ["[launcher]", "heartbeat_s < lease_s"]),
        ({"launcher": {"heartbeat_s": 90}}, ["[launcher]", "heartbeat_s < lease_s", "90"]),
        ({"launcher": {"heartbeat_s": 0}}, ["[launcher]", "0 < heartbeat_s"]),
        ({"launcher": {"gpus_per_node": -1}}, ["[launcher]", "must be >= 0"]),
        ({"recovery": {"max_retries": -1}}, ["[recovery]", "max_retries must be >= 0"]),
        ({"recovery": {"backoff_s": -1}}, ["[recovery]", "backoff_s must be >= 0"]),
        ({"recovery": {"chain": ["app-handler", "retry-timeout", "app-handler"]}},
         ["[recovery]", "chain lists a policy twice"]),
        ({"site": {"busy_timeout_s": -0.5}}, ["[site]", "busy_timeout_s must be >= 0"]),
        ({"service": {"period_s": 0}}, ["[service]", "period_s must be > 0"]),
        ({"service": {"submit_interval_s": -1}}, ["[service]", "submit_interval_s", ">= 0"]),
        ({"service": {"max_backoff_s": 5}}, ["[service]", "max_backoff_s (5.0) < submit_interval_s"]),
        ({"service": {"job_mode": "smp"}}, ["[service]", "job_mode must be one of mpi, serial"]),
    ],
)
def test_impossible_limits(raw: dict[str, Any], words: list[str]) -> None:
    bad(raw, *words)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_busy_timeout_is_a_config_error(value: float) -> None:
    bad({"site": {"busy_timeout_s": value}}, "site.busy_timeout_s", "finite")


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[site]\nname = "ok"\n\n[launcher\nmpi = "direct"\n')
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: invalid TOML")
    assert "line 4" in message


def test_load_reports_the_real_path_in_type_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[launcher]\ncpus_per_node = \"many\"\n")
    with pytest.raises(ConfigError, match=rf"^{path}: launcher.cpus_per_node: expected an integer"):
        config.load(tmp_path)


def test_missing_balsam_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balsam.toml: no such file$"):
        config.load(tmp_path)


# ------------------------------------------------------------------ plugin settings


def make_site(tmp_path: Path, extra: str = "") -> Path:
    site = Site.init(tmp_path / "site")
    site.db.dispose()
    if extra:
        with (site.site_dir / "balsam.toml").open("a") as f:
            f.write(extra)
    return site.site_dir


def open_error(site_dir: Path, error: type[Exception] = ConfigError) -> str:
    with pytest.raises(error) as info:
        Site.open(site_dir)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_local_plugin_settings_are_built_when_selected(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, "\n[plugins.local]\ncancel_grace_s = 2\n")
    site = Site.open(site_dir)
    scheduler = get_plugin_manager().create("scheduler", "local", site.config)
    assert scheduler.settings.cancel_grace_s == 2.0
    site.db.dispose()


@pytest.mark.parametrize(
    "table, words",
    [
        ("cancel_grace = 2", ["unknown key 'cancel_grace' in [plugins.local]", "allowed: cancel_grace_s"]),
        ('cancel_grace_s = "soon"', ["plugins.local.cancel_grace_s", "expected a number"]),
        ("cancel_grace_s = -1", ["[plugins.local]", "cancel_grace_s must be >= 0"]),
    ],
)
def test_local_plugin_settings_errors(tmp_path: Path, table: str, words: list[str]) -> None:
    site_dir = make_site(tmp_path, f"\n[plugins.local]\n{table}\n")
    message = open_error(site_dir)
    assert message.startswith(f"{site_dir / 'balsam.toml'}: ")
    for word in words:
        assert word in message
    # The same check when the plugin is built.
    cfg = config.load(site_dir)
    with pytest.raises(ConfigError, match=r"plugins\.local"):
        get_plugin_manager().create("scheduler", "local", cfg)


def test_packing_plugin_settings_are_validated_when_selected(tmp_path: Path) -> None:
    message = open_error(make_site(tmp_path, "\n[plugins.fifo]\nstarvation = 1\n"))
    assert "unknown key 'starvation' in [plugins.fifo]" in message


def test_settings_for_a_plugin_without_settings_fail_when_built(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, "\n[plugins.direct]\nflavour = \"x\"\n")
    cfg = config.load(site_dir)
    with pytest.raises(ConfigError) as info:
        get_plugin_manager().create("mpi_launcher", "direct", cfg)
    assert "[plugins.direct]" in str(info.value) and "takes no settings" in str(info.value)


def test_settings_for_a_plugin_without_settings_fail_at_open(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, "\n[plugins.direct]\nflavour = \"x\"\n")
    assert "takes no settings" in open_error(site_dir)


def test_unknown_plugin_name_lists_installed(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path)
    path = site_dir / "balsam.toml"
    path.write_text(path.read_text().replace('use = "fifo"', 'use = "fastest"'))
    message = open_error(site_dir, PluginError)
    assert "unknown packing strategy 'fastest' in [packing] use" in message
    assert "installed: best-fit, fifo" in message


def test_unknown_plugin_name_names_the_file(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path)
    path = site_dir / "balsam.toml"
    path.write_text(path.read_text().replace('mpi = "direct"', 'mpi = "mpich"'))
    assert str(path) in open_error(site_dir, PluginError)


# ------------------------------------------------------------------ site discovery


@pytest.fixture
def site_dir(sqlite_site: Site) -> Path:
    sqlite_site.db.dispose()
    return sqlite_site.site_dir


def test_open_with_explicit_path(site_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert Site.open(site_dir).site_dir == site_dir
    assert Site.open(str(site_dir)).site_dir == site_dir


def test_open_from_balsam_site(site_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BALSAM_SITE", str(site_dir))
    assert Site.open().site_dir == site_dir


def test_explicit_path_wins_over_balsam_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = make_site(tmp_path / "a"), make_site(tmp_path / "b")
    monkeypatch.setenv("BALSAM_SITE", str(one))
    assert find_site_dir(two) == two


def test_open_from_cwd_and_from_a_subdirectory(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(site_dir)
    assert Site.open().site_dir == site_dir
    deeper = site_dir / "data" / "run1"
    deeper.mkdir()
    monkeypatch.chdir(deeper)
    assert Site.open().site_dir == site_dir


def test_no_site_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALSAM_SITE", raising=False)
    assert not any((p / "balsam.toml").exists() for p in (tmp_path, *tmp_path.parents))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SiteNotFound) as info:
        Site.open()
    message = str(info.value)
    assert str(tmp_path.resolve()) in message
    assert "--site" in message and "BALSAM_SITE" in message and "balsam site init" in message


def test_empty_balsam_site_falls_back_to_cwd(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_SITE", "")
    monkeypatch.chdir(site_dir)
    assert Site.open().site_dir == site_dir


@pytest.mark.parametrize("how", ["--site", "$BALSAM_SITE"])
def test_path_that_is_not_a_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    not_site = tmp_path / "empty"
    not_site.mkdir()
    if how == "--site":
        call = lambda: Site.open(not_site)  # noqa: E731
    else:
        monkeypatch.setenv("BALSAM_SITE", str(not_site))
        call = lambda: Site.open()  # noqa: E731
    with pytest.raises(SiteNotFound) as info:
        call()
    assert str(info.value) == f"{not_site} (from {how}) is not a Balsam site: it has no balsam.toml"
