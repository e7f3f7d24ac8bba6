"""``balsam site init|info|upgrade``."""

from __future__ import annotations

import click

from ..api import Site
from ..config import load
from ..site import find_site_dir
from .common import Context, echo_json, pass_ctx


@click.group("site")
def site_group() -> None:
    """Create and inspect sites."""


@site_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", help="Site name (default: the directory's name).")
@click.option("--database", default="sqlite:///balsam.db", show_default=True, help="SQLAlchemy URL.")
@click.option("--scheduler", default="local", show_default=True, help="Scheduler plugin.")
@click.option("--mpi", default="direct", show_default=True, help="MPI launcher plugin.")
@click.option("--packing", default="fifo", show_default=True, help="Packing strategy plugin.")
@click.option("--task-source", default="database", show_default=True, help="Task source plugin.")
@click.option("--cpus-per-node", type=click.IntRange(min=0), default=0, help="0: count this machine's.")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0)
def init_command(directory: str, **options: object) -> None:
    """Create a site in DIRECTORY: balsam.toml, the database, data/ and log/."""
    site = Site.init(directory, **options)  # type: ignore[arg-type]
    click.echo(f"Created site {site.site_dir}")
    click.echo(f"  config:   {site.config.path}")
    click.echo(f"  database: {site.info()['database']}")
    click.echo(f"Next: export BALSAM_SITE={site.site_dir}")


@site_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def info_command(ctx: Context, as_json: bool) -> None:
    """Show the site's paths, database and composed plugin stack."""
    info = ctx.site().info()
    if as_json:
        echo_json(info)
        return
    click.echo(f"site      {info['name']}  ({info['site_dir']})")
    click.echo(f"config    {info['config']}")
    click.echo(f"database  {info['database']}  (schema {info['schema_version']})")
    click.echo("plugins")
    for kind, entries in info["plugins"].items():
        for entry in entries:
            click.echo(f"  {kind:<17} {entry['name']:<16} {entry['provider']}")
    tasks = info["tasks"]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(tasks.items())) or "none"
    click.echo(f"tasks     {sum(tasks.values())}: {summary}")


@site_group.command("upgrade")
@pass_ctx
def upgrade_command(ctx: Context) -> None:
    """Bring the site database's schema up to this Balsam's version."""
    site = Site(load(find_site_dir(ctx.site_path)))
    done = site.db.upgrade()
    click.echo(f"Applied schema steps {done}" if done else "Schema is up to date")
