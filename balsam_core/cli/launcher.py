"""``balsam launcher``: run the pilot on this allocation (or this machine)."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import click

from ..batchjobs import mark_started
from ..launcher.nodes import local_nodes
from ..launcher.pilot import Launcher, LauncherOptions
from ..launcher.serial import run_serial
from ..plugin_types import NodeSpec
from .common import Context, parse_pairs, pass_ctx, setup_logging


def split_nodes(nodes: Sequence[NodeSpec], count: int, cpus_per_node: int) -> tuple[NodeSpec, ...]:
    """*count* nodes of the allocation; one real node is split into virtual ones."""
    if len(nodes) == 1 and count > 1:
        gpus = len(nodes[0].gpu_ids)
        return local_nodes(count, cpus_per_node or max(1, nodes[0].cpus // count), gpus)
    if count > len(nodes):
        raise click.BadParameter(
            f"the allocation has {len(nodes)} node(s), cannot use {count}", param_hint="--nodes"
        )
    return tuple(nodes[:count])


@click.command("launcher")
@click.option("--mode", type=click.Choice(["mpi", "serial"]), default="mpi", show_default=True,
              help="mpi: every task through the MPI launcher plugin; serial: one agent per "
              "node (started through the MPI launcher) forks single-node tasks.")
@click.option("--wf", "workflow", help="Only run tasks of this workflow.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Only run tasks with this tag.")
@click.option("--time-limit-min", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this many minutes (default: the allocation's end).")
@click.option("--idle-timeout", type=click.FloatRange(min=0),
              help="Exit after this many seconds with nothing to run.")
@click.option("--nodes", "node_count", type=click.IntRange(min=1),
              help="Use N nodes (on one machine: split it into N virtual nodes).")
@click.option("--batch-job-id", type=int, hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@pass_ctx
def launcher_command(
    ctx: Context, mode: str, workflow: str | None, tags: Sequence[str],
    time_limit_min: float | None, idle_timeout: float | None, node_count: int | None,
    batch_job_id: int | None, verbose: bool,
) -> None:
    """Run tasks on the nodes of this allocation until it ends (or --idle-timeout)."""
    site = ctx.site()
    cfg = site.config
    setup_logging(verbose)
    scheduler = site.selected("scheduler")
    allocation = scheduler.allocation()
    nodes = allocation.nodes
    if node_count is not None:
        nodes = split_nodes(nodes, node_count, cfg.launcher.cpus_per_node)
    end_time = allocation.end_time
    if time_limit_min is not None:
        limit = time.time() + time_limit_min * 60
        end_time = limit if end_time is None else min(end_time, limit)
    options = LauncherOptions(
        nodes=tuple(nodes), end_time=end_time, idle_timeout_s=idle_timeout,
        workflow=workflow, tags=parse_pairs(tags, "--tag"), batch_job_id=batch_job_id,
    )
    if batch_job_id is not None:  # the batch job shows RUNNING from now, not from the next sync
        mark_started(site, batch_job_id, f"{mode} launcher started on {socket.gethostname()}")
    if mode == "serial":
        mpi = site.selected("mpi_launcher")
        mpi.check()
        raise SystemExit(run_serial(site, options, mpi))
    launcher = Launcher(site, options)
    launcher.install_signal_handlers()
    stats = launcher.run()
    click.echo(
        f"launcher {launcher.launcher_id}: {stats.started} started, {stats.finished} done, "
        f"{stats.failed} failed, {stats.timed_out} timed out ({launcher.stop_reason})",
        err=True,
    )
