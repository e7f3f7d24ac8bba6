"""The ``balsam`` command line.

Errors reach the user as one line on stderr: ``Error: <what> ...``, with exit code 2
for usage errors and bad input, 1 for everything else.  Plugins add sub-commands
through the ``balsam_cli_commands`` hook.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import BalsamError
from ..plugins import get_plugin_manager
from .app import app_group
from .common import Context
from .launcher import launcher_command
from .plugins import plugins_command
from .queue import queue_group
from .report import report_command
from .service import service_command
from .site import site_group
from .task import task_group


class BalsamGroup(click.Group):
    """The top-level group: one-line errors, and sub-commands contributed by plugins."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra["standalone_mode"] = False
        try:
            result = super().main(args, prog_name or "balsam", **extra)
        except click.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx else ""
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {where}{exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except BalsamError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugin_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            factory = self._plugin_commands().get(name)
            command = factory(None) if factory else None
        return command

    @staticmethod
    def _plugin_commands() -> dict[str, Any]:
        records = get_plugin_manager().records()["cli_command"]
        return {r.record.name: r.record.factory for r in records}


@click.group(cls=BalsamGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--site",
    "site_path",
    type=click.Path(file_okay=False),
    help="Site directory (default: $BALSAM_SITE, else the current directory or a parent).",
)
@click.version_option(package_name="balsam-core", prog_name="balsam")
@click.pass_context
def cli(ctx: click.Context, site_path: str | None) -> None:
    """Balsam: run large, dynamic ensembles of tasks on supercomputers."""
    ctx.obj = Context(site_path)


cli.add_command(site_group)
cli.add_command(app_group)
cli.add_command(task_group)
cli.add_command(plugins_command)
cli.add_command(launcher_command)
cli.add_command(report_command)
cli.add_command(queue_group)
cli.add_command(service_command)


def main() -> None:
    """Console-script entry point."""
    cli.main()
