"""``balsam app add|ls|rm``."""

from __future__ import annotations

import shlex

import click

from .common import Context, echo_json, pass_ctx, parse_pairs, shorten, table


@click.group("app")
def app_group() -> None:
    """Register the programs tasks run."""


@app_group.command("add")
@click.argument("name")
@click.argument("command")
@click.option("--preprocess", help="Command run before the task, in its working directory.")
@click.option("--postprocess", help="Command run after the task (and as error/timeout handler).")
@click.option("--envscript", help="Script sourced before the task runs.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment for every task.")
@click.option("--description", default="")
@pass_ctx
def add_command(
    ctx: Context, name: str, command: str, preprocess: str | None, postprocess: str | None,
    envscript: str | None, env: tuple[str, ...], description: str,
) -> None:
    """Register app NAME running COMMAND, e.g. 'python sim.py --temp {temp}'.

    COMMAND is split like a shell would but never run by one; {name} fields are filled
    from each task's --param name=value.
    """
    app = ctx.site().add_app(
        name, command, preprocess=preprocess, postprocess=postprocess, envscript=envscript,
        environment=parse_pairs(env, "--env"), description=description,
    )
    click.echo(f"Added app {app.name}: {shlex.join(app.command)}")


@app_group.command("ls")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def ls_command(ctx: Context, as_json: bool) -> None:
    """List apps."""
    apps = ctx.site().apps()
    if as_json:
        echo_json(
            [
                {"name": a.name, "command": a.command, "preprocess": a.preprocess,
                 "postprocess": a.postprocess, "envscript": a.envscript,
                 "environment": a.environment, "description": a.description}
                for a in apps
            ]
        )
        return
    if not apps:
        click.echo("No apps. Add one with: balsam app add NAME 'COMMAND {param}'")
        return
    rows = [(a.name, shorten(shlex.join(a.command), 60), a.description) for a in apps]
    click.echo(table(rows, ("NAME", "COMMAND", "DESCRIPTION")))


@app_group.command("rm")
@click.argument("name")
@pass_ctx
def rm_command(ctx: Context, name: str) -> None:
    """Remove an app that no task uses."""
    ctx.site().remove_app(name)
    click.echo(f"Removed app {name}")
