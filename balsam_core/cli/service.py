"""``balsam service``: the elastic queue (see :mod:`balsam_core.service`)."""

from __future__ import annotations


import click

from ..service import Service
from .common import Context, pass_ctx, setup_logging


@click.command("service")
@click.option("--once", is_flag=True, help="Run one period and exit.")
@click.option("--period", "period_s", type=click.FloatRange(min=0, min_open=True),
              help="Seconds between periods (default: [service] period_s).")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@pass_ctx
def service_command(ctx: Context, once: bool, period_s: float | None, verbose: bool) -> None:
    """Keep batch jobs queued for the backlog: sync, submit, retire, reclaim.

    One service per site; SIGTERM or Ctrl-C ends it between two steps.
    """
    setup_logging(verbose)
    Service(ctx.site()).run(period_s=period_s, once=once)
