"""``balsam plugins``: what is installed, by kind."""

from __future__ import annotations

import click

from ..plugins import get_plugin_manager
from .common import echo_json, shorten, table


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins: kind, name, distribution, version, description."""
    pm = get_plugin_manager()
    rows = [
        (kind, r.record.name, r.provider.distribution, r.provider.version, r.record.description)
        for kind, registered in pm.records().items()
        for r in sorted(registered, key=lambda r: r.record.name)
    ]
    broken = [(b.provider.plugin, b.provider.distribution, b.provider.version, b.error) for b in pm.broken]
    if as_json:
        keys = ("kind", "name", "distribution", "version", "description")
        echo_json(
            {
                "plugins": [dict(zip(keys, r)) for r in rows],
                "broken": [dict(zip(("plugin", "distribution", "version", "error"), b)) for b in broken],
            }
        )
        return
    click.echo(
        table(
            [(*r[:4], shorten(r[4], 70)) for r in rows],
            ("KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"),
        )
    )
    if broken:
        click.echo("\nBroken plugins (not loaded; a site selecting them fails):")
        click.echo(table(broken, ("PLUGIN", "DISTRIBUTION", "VERSION", "ERROR")))
