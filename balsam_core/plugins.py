"""The plugin manager: built-ins and installed distributions, selected by name.

Built-in modules (:data:`BUILTIN_MODULES`) and entry points of group ``balsam`` go
through the same :meth:`PluginManager.load_module` path.  A plugin that fails to
import, registers a misspelled hook, or whose registration hook raises is *broken*:
it is reported as a warning and becomes an error only when a site selects one of its
names.  ``BALSAM_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points (built-ins remain).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import config as config_mod
from . import hookspecs
from .errors import ConfigError, PluginError
from .plugin_types import RECORD_TYPES, PluginContext, PluginRecord

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "balsam"
AUTOLOAD_SWITCH = "BALSAM_DISABLE_PLUGIN_AUTOLOAD"
CORE_DISTRIBUTION = "balsam-core"

#: Registration hook name for each record kind.
REGISTRATION_HOOKS: dict[str, str] = {
    "scheduler": "balsam_schedulers",
    "mpi_launcher": "balsam_mpi_launchers",
    "task_source": "balsam_task_sources",
    "packing_strategy": "balsam_packing_strategies",
    "recovery_policy": "balsam_recovery_policies",
    "cli_command": "balsam_cli_commands",
}

#: Where each kind is selected in ``balsam.toml`` (for error messages).
CONFIG_KEYS: dict[str, str] = {
    "scheduler": "[scheduler] use",
    "mpi_launcher": "[launcher] mpi",
    "task_source": "[task_source] use",
    "packing_strategy": "[packing] use",
    "recovery_policy": "[recovery] chain",
    "cli_command": "balsam <command>",
}

#: Built-in plugin modules, registered like installed distributions.
BUILTIN_MODULES: tuple[str, ...] = (
    "balsam_core.builtin.local_scheduler",
    "balsam_core.builtin.direct_launcher",
    "balsam_core.builtin.database_source",
    "balsam_core.builtin.packing",
    "balsam_core.builtin.recovery",
)


@dataclass(frozen=True)
class Provider:
    """Where a plugin module comes from."""

    plugin: str  # entry-point name, or the module name of a built-in
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"'{self.plugin}' from distribution {self.distribution} {self.version}"


@dataclass(frozen=True)
class Registered:
    """A record together with the plugin that provided it."""

    record: PluginRecord
    provider: Provider


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded, and why."""

    provider: Provider
    error: str


class PluginManager:
    """Loads plugins, collects their records, and builds the implementations a site selects."""

    def __init__(self, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self._providers: dict[str, Provider] = {}
        self._records: dict[str, list[Registered]] | None = None
        core_version = _version(CORE_DISTRIBUTION)
        for module in BUILTIN_MODULES:
            self.load_module(module, Provider(module, CORE_DISTRIBUTION, core_version))
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_SWITCH, "") in ("", "0")
        if autoload:
            self.load_entry_points()

    # ------------------------------------------------------------------ loading

    def load_entry_points(self) -> None:
        """Load every module declared in the ``balsam`` entry-point group."""
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            provider = Provider(
                ep.name,
                dist.metadata["Name"] if dist else "?",
                dist.version if dist else "?",
            )
            self.load_module(ep.value, provider, loader=ep.load)

    def load_module(
        self, module_name: str, provider: Provider, loader: Callable[[], Any] | None = None
    ) -> bool:
        """Import and register one plugin module; on failure record it as broken."""
        try:
            module = loader() if loader else importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the plugin broken
            return self._broken(provider, f"cannot import {module_name}: {_one_line(exc)}")
        return self.register(module, provider)

    def register(self, plugin: object, provider: Provider) -> bool:
        """Register an already imported plugin object (module or instance)."""
        if self.pm.is_registered(plugin) or self.pm.has_plugin(provider.plugin):
            return self._broken(provider, "registered twice")
        try:
            self.pm.register(plugin, name=provider.plugin)
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return self._broken(provider, _one_line(exc))
        self._providers[provider.plugin] = provider
        self._records = None
        return True

    def _broken(self, provider: Provider, error: str) -> bool:
        self.broken.append(BrokenPlugin(provider, error))
        log.warning("warning: plugin %s is broken and was not loaded: %s", provider, error)
        return False

    # ------------------------------------------------------------------ records

    def records(self) -> dict[str, list[Registered]]:
        """Every record, by kind, with its provider. Computed once per manager."""
        if self._records is None:
            self._records = {kind: [] for kind in REGISTRATION_HOOKS}
            for kind, hook_name in REGISTRATION_HOOKS.items():
                self._collect(kind, hook_name)
        return self._records

    def _collect(self, kind: str, hook_name: str) -> None:
        assert self._records is not None
        expected = RECORD_TYPES[kind]
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            provider = self._providers[impl.plugin_name]
            try:
                result = impl.function()
                records = list(result or ())
                for record in records:
                    if not isinstance(record, expected):
                        raise TypeError(
                            f"{hook_name}() returned {type(record).__name__}, "
                            f"expected {expected.__name__}"
                        )
            except Exception as exc:  # noqa: BLE001 - a failing hook breaks only its plugin
                self._broken(provider, f"{hook_name}() failed: {_one_line(exc)}")
                continue
            self._records[kind].extend(Registered(r, provider) for r in records)

    def names(self, kind: str) -> list[str]:
        """The names installed for *kind*, sorted."""
        return sorted({r.record.name for r in self.records()[kind]})

    def get(self, kind: str, name: str) -> Registered:
        """The one record of *kind* called *name*, or a :class:`PluginError` saying why not."""
        matches = [r for r in self.records()[kind] if r.record.name == name]
        what = kind.replace("_", " ")
        if len(matches) > 1:
            who = " and ".join(str(m.provider) for m in matches)
            raise PluginError(f"{what} '{name}' is provided twice: by {who}; uninstall one")
        if matches:
            return matches[0]
        for broken in self.broken:
            if broken.provider.plugin == name:
                raise PluginError(
                    f"{what} '{name}' comes from plugin {broken.provider}, which is broken: "
                    f"{broken.error}"
                )
        installed = ", ".join(self.names(kind)) or "none"
        also = "".join(f"; broken: {b.provider}" for b in self.broken)
        raise PluginError(
            f"unknown {what} '{name}' in {CONFIG_KEYS[kind]} (installed: {installed}{also})"
        )

    def create(self, kind: str, name: str, site: config_mod.SiteConfig) -> Any:
        """Build the implementation of *kind* named *name* for *site*."""
        registered = self.get(kind, name)
        record = registered.record
        settings = self._settings(registered, site)
        try:
            return record.factory(PluginContext(site.site_dir, site, settings))
        except (ConfigError, PluginError):
            raise
        except Exception as exc:  # noqa: BLE001 - report which plugin failed, in one line
            raise PluginError(
                f"{kind.replace('_', ' ')} '{name}' from {registered.provider} failed to start: "
                f"{_one_line(exc)}"
            ) from exc

    def check_site(self, site: config_mod.SiteConfig) -> None:
        """Raise on the first selection of *site* that is unknown, ambiguous or broken,
        and on ``[plugins.X]`` settings that the selected plugin rejects."""
        for kind, names in site.selections().items():
            for name in names:
                try:
                    registered = self.get(kind, name)
                except PluginError as exc:
                    raise PluginError(f"{site.path}: {exc}") from None
                self._settings(registered, site)

    def _settings(self, registered: Registered, site: config_mod.SiteConfig) -> Any:
        """The record's ``[plugins.<name>]`` settings, built and checked (None if it has none)."""
        record = registered.record
        if record.settings is not None:
            table = site.plugins.get(record.name, {})
            return config_mod.build(
                record.settings, table, str(site.path), f"plugins.{record.name}"
            )
        if site.plugins.get(record.name):
            raise ConfigError(
                f"{site.path}: [plugins.{record.name}]: plugin {registered.provider} "
                "takes no settings"
            )
        return None

    # ------------------------------------------------------------------ observers

    def notify_transitions(self, events: Iterable[Any]) -> None:
        """Call the observer hook; an observer that raises is logged, never propagated."""
        events = list(events)
        if not events:
            return
        for impl in self.pm.hook.balsam_task_transitions.get_hookimpls():
            try:
                impl.function(events=events)
            except Exception:  # noqa: BLE001 - observers never undo a committed change
                log.exception("observer %s failed on %d transitions", impl.plugin_name, len(events))


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests change the environment between uses)."""
    global _default
    _default = None
