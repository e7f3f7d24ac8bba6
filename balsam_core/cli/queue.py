"""``balsam queue submit|ls|cancel|history``: batch jobs by hand."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import click

from .. import batchjobs
from ..config import JOB_MODES
from ..errors import BalsamError, ValidationError
from ..models import BatchJob
from .common import Context, echo_json, fmt_time, pass_ctx, parse_pairs, shorten, table


@click.group("queue")
def queue_group() -> None:
    """Submit, list and cancel batch jobs."""


def job_dict(job: BatchJob) -> dict[str, Any]:
    """A batch job as plain data (for --json)."""
    return {
        "id": job.id, "scheduler_id": job.scheduler_id, "queue": job.queue,
        "project": job.project, "num_nodes": job.num_nodes, "wall_time_min": job.wall_time_min,
        "job_mode": job.job_mode, "workflow": job.filter_workflow, "tags": job.filter_tags,
        "state": job.state, "native_state": job.native_state, "message": job.message,
        "origin": job.origin, "created": job.created, "submit_time": job.submit_time,
        "start_time": job.start_time, "end_time": job.end_time,
    }


def _short_time(epoch: float | None) -> str:
    return "-" if epoch is None else dt.datetime.fromtimestamp(epoch).strftime("%m-%d %H:%M:%S")


@queue_group.command("submit")
@click.option("-n", "--num-nodes", type=click.IntRange(min=1), required=True, help="Nodes.")
@click.option("-t", "--wall-time-min", type=click.IntRange(min=1), required=True,
              help="Wall time in minutes.")
@click.option("-q", "--queue", help="Queue (default: the first of [scheduler.queues]).")
@click.option("-A", "--project", help="Project / account (default: [scheduler] project).")
@click.option("--job-mode", type=click.Choice(JOB_MODES), default="mpi", show_default=True,
              help="Launcher mode inside the job.")
@click.option("--wf", "workflow", help="Only run tasks of this workflow.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Only run tasks with this tag.")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True),
              help="The launcher exits after this many seconds with nothing to run.")
@pass_ctx
def submit_command(
    ctx: Context, num_nodes: int, wall_time_min: int, queue: str | None, project: str | None,
    job_mode: str, workflow: str | None, tags: Sequence[str], idle_timeout: float | None,
) -> None:
    """Submit one batch job that runs the launcher on NODES for WALL minutes."""
    filters = parse_pairs(tags, "--tag")
    site = ctx.site()
    if queue is None:
        queues = list(site.config.scheduler.queues)
        if not queues:
            raise ValidationError("no queue given (-q) and none in [scheduler.queues]")
        queue = queues[0]
    _quiet_job_logs()
    job = batchjobs.submit(
        site, site.selected("scheduler"), num_nodes=num_nodes, wall_time_min=wall_time_min,
        queue=queue, project=project, job_mode=job_mode, workflow=workflow, tags=filters,
        idle_timeout_s=idle_timeout,
    )
    if job.state != "QUEUED":
        raise BalsamError(f"batch job {job.id}: {job.message}")
    click.echo(f"batch job {job.id} submitted as {job.scheduler_id} "
               f"({queue}, {num_nodes} node(s) x {wall_time_min} min)")


@queue_group.command("ls")
@click.option("--all", "show_all", is_flag=True, help="Also jobs that ended.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-sync", is_flag=True, help="Show the recorded states; do not ask the scheduler.")
@pass_ctx
def ls_command(ctx: Context, show_all: bool, as_json: bool, no_sync: bool) -> None:
    """List batch jobs (live ones unless --all), with their scheduler states."""
    site = ctx.site()
    if not no_sync:
        _quiet_job_logs()
        try:
            batchjobs.sync(site, site.selected("scheduler"))
        except BalsamError as exc:
            click.echo(f"Warning: {exc}; showing the recorded states", err=True)
    jobs = batchjobs.jobs(site, include_ended=show_all)
    if as_json:
        echo_json([job_dict(j) for j in jobs])
        return
    if not jobs:
        click.echo("No batch jobs." if show_all else "No live batch jobs (--all shows every one).")
        return
    rows = [
        (j.id, j.scheduler_id, j.queue, j.num_nodes, j.wall_time_min, j.job_mode, j.state,
         j.native_state or "-", _short_time(j.submit_time), _short_time(j.start_time),
         _short_time(j.end_time), shorten(j.message, 60))
        for j in jobs
    ]
    click.echo(table(rows, ("ID", "SCHED_ID", "QUEUE", "NODES", "WALL", "MODE", "STATE",
                            "NATIVE", "SUBMITTED", "STARTED", "ENDED", "MESSAGE")))


@queue_group.command("cancel")
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, type=click.IntRange(min=1))
@pass_ctx
def cancel_command(ctx: Context, job_ids: Sequence[int]) -> None:
    """Cancel batch jobs (a job that already ended is left as it is)."""
    site = ctx.site()
    # an unknown id fails before anything is cancelled
    before = {job_id: batchjobs.get(site, job_id).state for job_id in job_ids}
    scheduler = site.selected("scheduler")
    _quiet_job_logs()
    for job_id in job_ids:
        job = batchjobs.cancel(site, scheduler, job_id)
        if job.state == before[job_id]:
            click.echo(f"batch job {job_id} had already ended ({job.state})")
        else:
            click.echo(f"batch job {job_id} cancelled")


@queue_group.command("history")
@click.argument("job_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def history_command(ctx: Context, job_id: int, as_json: bool) -> None:
    """Every state change of one batch job."""
    events = batchjobs.history(ctx.site(), job_id)
    if as_json:
        echo_json([
            {"time": e.time, "from_state": e.from_state, "to_state": e.to_state,
             "native_state": e.native_state, "message": e.message} for e in events
        ])
        return
    rows = [(fmt_time(e.time), e.from_state or "-", e.to_state, e.native_state or "-", e.message)
            for e in events]
    click.echo(table(rows, ("TIME", "FROM", "TO", "NATIVE", "MESSAGE")))


def _quiet_job_logs() -> None:
    """The command prints its own one-line outcome; the batch-job log lines (shown by
    Python's last-resort handler when logging is not set up) would repeat it."""
    logger = logging.getLogger(batchjobs.__name__)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
