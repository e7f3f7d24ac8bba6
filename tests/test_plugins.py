"""The plugin manager and every hook of the contract.

Each hook in ``balsam_core/hookspecs.py`` has a ``test_hook_<name>`` here and a
section in ``docs/plugins.md``; :func:`test_every_hook_has_a_test_and_documentation`
fails when one is missing.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from balsam_core import (
    CliCommandPlugin,
    ConfigError,
    MpiLauncherPlugin,
    PackingStrategyPlugin,
    PluginError,
    RecoveryPolicyPlugin,
    SchedulerPlugin,
    State,
    TaskSourcePlugin,
    hookimpl,
    hookspecs,
)
from balsam_core import config as config_mod
from balsam_core.api import Site
from balsam_core.cli import cli
from balsam_core.plugins import BUILTIN_MODULES, PluginManager, Provider, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("balsam_"))


def provider(name: str = "testplug", dist: str = "balsam-testplug") -> Provider:
    return Provider(name, dist, "9.9")


def cfg(tmp_path: Path, **tables: dict) -> config_mod.SiteConfig:
    return config_mod.from_dict(tables, tmp_path)


# ---------------------------------------------------------------------- the contract


def test_every_hook_has_a_test_and_documentation() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    this_module = sys.modules[__name__]
    for hook in HOOKS:
        assert hasattr(this_module, f"test_hook_{hook}"), f"hook {hook} has no test_hook_{hook}"
        assert f"### {hook}\n" in docs, f"hook {hook} has no section in docs/plugins.md"
        doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
        assert "Example::" in doc, f"hook {hook} has no example in its docstring"
    documented = {line[4:].strip() for line in docs.splitlines() if line.startswith("### ")}
    assert documented == set(HOOKS), "docs/plugins.md documents hooks that do not exist"


def test_hookspecs_are_typed() -> None:
    for hook in HOOKS:
        signature = inspect.signature(getattr(hookspecs, hook))
        assert signature.return_annotation is not inspect.Signature.empty, hook
        for parameter in signature.parameters.values():
            assert parameter.annotation is not inspect.Parameter.empty, (hook, parameter.name)


def test_builtins_are_registered_like_external_plugins() -> None:
    pm = PluginManager(autoload=False)
    assert pm.broken == []
    assert pm.names("scheduler") == ["local"]
    assert pm.names("mpi_launcher") == ["direct"]
    assert pm.names("task_source") == ["database"]
    assert {"fifo", "best-fit"} <= set(pm.names("packing_strategy"))
    assert pm.names("recovery_policy") == ["app-handler", "retry-timeout", "retry-transient"]
    for registered in (r for rs in pm.records().values() for r in rs):
        assert registered.provider.distribution == "balsam-core"
        assert registered.provider.plugin in BUILTIN_MODULES


# ---------------------------------------------------------------------- one test per hook


class _Scheduler:
    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        self.context = context


def test_hook_balsam_schedulers(tmp_path: Path) -> None:
    class Plugin:
        @hookimpl
        def balsam_schedulers(self):  # type: ignore[no-untyped-def]
            return [SchedulerPlugin("fake-batch", _Scheduler, "a test scheduler")]

    pm = PluginManager(autoload=False)
    pm.register(Plugin(), provider())
    made = pm.create("scheduler", "fake-batch", cfg(tmp_path, scheduler={"use": "fake-batch"}))
    assert isinstance(made, _Scheduler) and made.context.site_dir == tmp_path.resolve()
    assert "fake-batch" in pm.names("scheduler")


def test_hook_balsam_mpi_launchers(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class Settings:
        executable: str = "mpiexec"

    class Plugin:
        @hookimpl
        def balsam_mpi_launchers(self):  # type: ignore[no-untyped-def]
            return [MpiLauncherPlugin("fake-mpi", lambda ctx: ctx.settings, "test", Settings)]

    pm = PluginManager(autoload=False)
    pm.register(Plugin(), provider())
    site = cfg(tmp_path, plugins={"fake-mpi": {"executable": "/opt/mpi/bin/mpiexec"}})
    assert pm.create("mpi_launcher", "fake-mpi", site) == Settings("/opt/mpi/bin/mpiexec")
    bad = cfg(tmp_path, plugins={"fake-mpi": {"executable": 3}})
    with pytest.raises(ConfigError, match=r"plugins\.fake-mpi\.executable: expected a string"):
        pm.create("mpi_launcher", "fake-mpi", bad)


def test_hook_balsam_task_sources(site: Site) -> None:
    source = site.plugins.create("task_source", "database", site.config)
    assert source.__class__.__name__ == "DatabaseTaskSource"

    class Plugin:
        @hookimpl
        def balsam_task_sources(self):  # type: ignore[no-untyped-def]
            return [TaskSourcePlugin("queue-file", lambda ctx: "source", "test")]

    site.plugins.register(Plugin(), provider())
    assert site.plugins.create("task_source", "queue-file", site.config) == "source"


def test_hook_balsam_packing_strategies(tmp_path: Path) -> None:
    class Plugin:
        @hookimpl
        def balsam_packing_strategies(self):  # type: ignore[no-untyped-def]
            return [PackingStrategyPlugin("fifo", lambda ctx: "mine", "clashes with the built-in")]

    pm = PluginManager(autoload=False)
    pm.register(Plugin(), provider("clash", "balsam-clash"))
    with pytest.raises(PluginError) as err:
        pm.get("packing_strategy", "fifo")
    assert "balsam-core" in str(err.value) and "balsam-clash" in str(err.value)
    assert pm.get("packing_strategy", "best-fit").record.name == "best-fit"


def test_hook_balsam_recovery_policies(tmp_path: Path) -> None:
    class Plugin:
        @hookimpl
        def balsam_recovery_policies(self):  # type: ignore[no-untyped-def]
            return [RecoveryPolicyPlugin("always-retry", lambda ctx: "policy", "test")]

    pm = PluginManager(autoload=False)
    pm.register(Plugin(), provider())
    site = cfg(tmp_path, recovery={"chain": ["always-retry", "retry-timeout"]})
    pm.check_site(site)
    assert pm.create("recovery_policy", "always-retry", site) == "policy"
    with pytest.raises(PluginError, match="unknown recovery policy 'nope'.*installed: always-retry"):
        pm.check_site(cfg(tmp_path, recovery={"chain": ["nope"]}))


def test_hook_balsam_cli_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command("hello")
    def hello() -> None:
        click.echo("hello from a plugin")

    class Plugin:
        @hookimpl
        def balsam_cli_commands(self):  # type: ignore[no-untyped-def]
            return [CliCommandPlugin("hello", lambda _: hello, "say hello")]

    get_plugin_manager().register(Plugin(), provider())
    result = CliRunner().invoke(cli, ["hello"])
    assert result.exit_code == 0 and result.output == "hello from a plugin\n"
    assert "hello" in CliRunner().invoke(cli, ["--help"]).output


def test_hook_balsam_task_transitions(site: Site) -> None:
    seen: list = []

    class Observer:
        @hookimpl
        def balsam_task_transitions(self, events):  # type: ignore[no-untyped-def]
            seen.append(list(events))

    site.plugins.register(Observer(), provider("observer", "balsam-observer"))
    ids = site.add_tasks([{"command": "true"}, {"command": "false"}])
    assert [(e.task_id, e.from_state, e.to_state) for e in seen[0]] == [
        (ids[0], State.CREATED, State.READY),
        (ids[1], State.CREATED, State.READY),
    ]
    site.kill(ids[0])
    assert [(e.task_id, e.to_state, e.message) for e in seen[1]] == [
        (ids[0], State.USER_KILLED, "killed")
    ]


# ---------------------------------------------------------------------- manager behaviour


def test_unknown_name_lists_installed() -> None:
    pm = PluginManager(autoload=False)
    with pytest.raises(PluginError, match=r"unknown scheduler 'cobalt' in \[scheduler\] use \(installed: local\)"):
        pm.get("scheduler", "cobalt")


def test_broken_import_is_a_warning_until_selected(caplog: pytest.LogCaptureFixture) -> None:
    pm = PluginManager(autoload=False)
    assert not pm.load_module("balsam_no_such_module", provider("cobalt", "balsam-cobalt"))
    assert "balsam-cobalt" in caplog.text and "broken" in caplog.text
    assert pm.names("scheduler") == ["local"]  # everything else still works
    with pytest.raises(PluginError, match="balsam-cobalt 9.9, which is broken.*ModuleNotFoundError"):
        pm.get("scheduler", "cobalt")


def test_failing_registration_hook_breaks_only_its_plugin() -> None:
    class Raises:
        @hookimpl
        def balsam_schedulers(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    class WrongType:
        @hookimpl
        def balsam_schedulers(self):  # type: ignore[no-untyped-def]
            return [MpiLauncherPlugin("x", lambda c: None, "wrong kind")]

    pm = PluginManager(autoload=False)
    pm.register(Raises(), provider("raises", "balsam-raises"))
    pm.register(WrongType(), provider("wrongtype", "balsam-wrongtype"))
    assert pm.names("scheduler") == ["local"]
    errors = {b.provider.distribution: b.error for b in pm.broken}
    assert "RuntimeError: boom" in errors["balsam-raises"]
    assert "expected SchedulerPlugin" in errors["balsam-wrongtype"]


def test_misspelled_hook_fails_loudly() -> None:
    class Misspelled:
        @hookimpl
        def balsam_scheduler(self):  # type: ignore[no-untyped-def]  # missing 's'
            return []

    pm = PluginManager(autoload=False)
    assert not pm.register(Misspelled(), provider("typo", "balsam-typo"))
    (broken,) = pm.broken
    assert "balsam_scheduler" in broken.error and broken.provider.distribution == "balsam-typo"


def test_factory_failure_names_the_plugin(tmp_path: Path) -> None:
    def factory(context):  # type: ignore[no-untyped-def]
        raise OSError("no such device")

    class Plugin:
        @hookimpl
        def balsam_schedulers(self):  # type: ignore[no-untyped-def]
            return [SchedulerPlugin("flaky", factory, "test")]

    pm = PluginManager(autoload=False)
    pm.register(Plugin(), provider("flaky", "balsam-flaky"))
    with pytest.raises(PluginError, match="scheduler 'flaky' from 'flaky' from distribution balsam-flaky 9.9 failed to start: OSError: no such device"):
        pm.create("scheduler", "flaky", cfg(tmp_path))


def test_settings_for_a_plugin_without_settings_is_an_error(tmp_path: Path) -> None:
    pm = PluginManager(autoload=False)
    with pytest.raises(ConfigError, match=r"\[plugins.direct\]: plugin .* takes no settings"):
        pm.create("mpi_launcher", "direct", cfg(tmp_path, plugins={"direct": {"x": 1}}))


def test_record_names_are_checked() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        SchedulerPlugin("Bad Name", lambda c: None, "x")
    with pytest.raises(TypeError, match="not callable"):
        SchedulerPlugin("ok", "not-callable", "x")  # type: ignore[arg-type]


def _fake_distribution(root: Path, name: str, module: str, source: str) -> None:
    """A minimal installed distribution (dist-info + module) under *root*."""
    info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[balsam]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_entry_points_and_autoload_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_distribution(
        tmp_path, "balsam-ep", "balsam_ep",
        """
        from balsam_core import SchedulerPlugin, hookimpl

        @hookimpl
        def balsam_schedulers():
            return [SchedulerPlugin("ep-sched", lambda ctx: "ep", "from an entry point")]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("BALSAM_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "ep-sched" not in PluginManager().names("scheduler")
    monkeypatch.setenv("BALSAM_DISABLE_PLUGIN_AUTOLOAD", "0")
    pm = PluginManager()
    assert "ep-sched" in pm.names("scheduler")
    assert pm.get("scheduler", "ep-sched").provider == Provider("balsam_ep", "balsam-ep", "1.2.3")
