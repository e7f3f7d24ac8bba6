"""A packing strategy with settings, and a CLI command, from an installed distribution."""

from __future__ import annotations

from dataclasses import dataclass

import click

from balsam_core import (
    CliCommandPlugin,
    PackingStrategyPlugin,
    Placement,
    PluginContext,
    hookimpl,
)


@dataclass(frozen=True)
class RoundRobinSettings:
    """``[plugins.round-robin]``."""

    stride: int = 1

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError("stride must be >= 1")


class RoundRobin:
    """Places one-node tasks on nodes in turn (only for tests)."""

    def __init__(self, settings: RoundRobinSettings) -> None:
        self.stride = settings.stride

    def place(self, ready, free, now):  # type: ignore[no-untyped-def]
        nodes = [n for n in free if n.idle]
        return [
            Placement(t.task_id, (nodes[(i * self.stride) % len(nodes)].name,))
            for i, t in enumerate(ready[: len(nodes)])
        ] if nodes else []

    def size_jobs(self, backlog, queues, active, windows, now):  # type: ignore[no-untyped-def]
        return []


def _factory(context: PluginContext) -> RoundRobin:
    return RoundRobin(context.settings)


@click.command("testplugin-hello")
def hello() -> None:
    """Say hello from the test plugin."""
    click.echo("hello from balsam-testplugin")


@hookimpl
def balsam_packing_strategies() -> list[PackingStrategyPlugin]:
    return [
        PackingStrategyPlugin(
            "round-robin", _factory, "test plugin: tasks onto nodes in turn",
            settings=RoundRobinSettings,
        )
    ]


@hookimpl
def balsam_cli_commands() -> list[CliCommandPlugin]:
    return [CliCommandPlugin("testplugin-hello", lambda _: hello, "say hello")]
