"""``balsam report``: states, throughput, run times and node utilization from the history."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from ..report import OPEN, PlotUnavailable, Report, build_report, fmt_duration, write_png
from .common import Context, echo_json, fmt_time, pass_ctx, parse_pairs, table

BAR_WIDTH = 40


@click.command("report")
@click.option("-w", "--wf", "--workflow", "workflow", metavar="NAME",
              help="Only tasks of this workflow.")
@click.option("-t", "--tag", "tags", multiple=True, metavar="K=V",
              help="Only tasks with this tag (repeatable).")
@click.option("--bins", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Time bins the window is cut into.")
@click.option("--nodes", type=click.FloatRange(min=0, min_open=True),
              help="Nodes available [default: the peak concurrent node footprint of the runs].")
@click.option("--png", "png", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also plot completed tasks and node utilization to FILE (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@pass_ctx
def report_command(
    ctx: Context, workflow: str | None, tags: Sequence[str], bins: int, nodes: float | None,
    png: str | None, as_json: bool,
) -> None:
    """Summarize the task history: states, throughput, runs and node utilization.

    A run lasts from RUNNING to the task's next event; runs still going count until
    now.  A one-node task with --node-packing-count K occupies 1/K node.  Utilization
    per bin = busy node-seconds / (nodes x bin width).
    """
    filters = parse_pairs(tags, "--tag")
    if png is not None:
        _need_matplotlib()
        folder = Path(png).absolute().parent
        if not folder.is_dir():
            raise click.ClickException(f"cannot write {png}: no directory {folder}")
    site = ctx.site()
    report = build_report(site, workflow=workflow, tags=filters, bins=bins, nodes=nodes)
    if png is not None:  # first: a failure prints nothing but the error
        try:
            write_png(report, png, title=_title(site.config.site.name, report))
        except OSError as exc:
            raise click.ClickException(f"cannot write {png}: {exc.strerror or exc}") from None
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(render_text(report))
    if png is not None:
        click.echo(f"Wrote {png}", err=as_json)


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--png needs matplotlib: pip install matplotlib") from None


def _scope(report: Report) -> str:
    parts = []
    if report.workflow is not None:
        parts.append(f"workflow {report.workflow}")
    parts += [f"{k}={v}" for k, v in report.tags.items()]
    return ", ".join(parts) or "all tasks"


def _title(site_name: str, report: Report) -> str:
    return f"Balsam report: site {site_name} ({_scope(report)})"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _bar(value: float | None) -> str:
    if value is None:
        return ""
    bar = "#" * round(min(value, 1.0) * BAR_WIDTH)
    return bar + ("+" if value > 1.0 + 1e-9 else "")


def render_text(report: Report) -> str:
    """The aligned text summary of a report."""
    if report.tasks == 0:
        return f"No tasks match ({_scope(report)})."
    lines: list[tuple[str, str]] = []
    add = lambda key, value: lines.append((key, value))  # noqa: E731
    add("Tasks", f"{report.tasks} ({_scope(report)})")
    add("States", ", ".join(f"{s} {n}" for s, n in report.states.items()))
    until = "now, runs still open" if report.runs_open else "last event"
    add("Span", f"{fmt_time(report.start)} -> {fmt_time(report.end)} "
                f"({fmt_duration(report.span_s)}, first event to {until})")
    rate = report.throughput_per_min
    add("Finished", f"{report.finished}" + (f" ({rate:.2f} tasks/min)" if rate is not None else ""))
    outcomes = ", ".join(
        f"{'still running' if k == OPEN else k} {v}" for k, v in report.run_outcomes.items()
    )
    add("Runs", f"{report.runs}" + (f": {outcomes}" if outcomes else ""))
    if report.run_time_mean_s is not None:
        add("Run time", f"mean {fmt_duration(report.run_time_mean_s)}, "
                        f"median {fmt_duration(report.run_time_median_s)} (ended runs)")
    if report.queue_wait_median_s is not None:
        add("Queue wait", f"median {fmt_duration(report.queue_wait_median_s)}, "
                          f"mean {fmt_duration(report.queue_wait_mean_s)} (READY -> RUNNING)")
    if report.nodes is None:
        add("Nodes", "- (no runs; give --nodes N)")
    elif report.nodes_source == "given":
        add("Nodes", f"{report.nodes:g} (--nodes)")
    else:
        add("Nodes", f"{report.nodes:g} (peak concurrent footprint; set with --nodes N)")
    if report.utilization is not None:
        add("Utilization", f"{_pct(report.utilization)} mean ({report.busy_node_s:.1f} busy "
                           f"node-s of {report.nodes * report.span_s:.1f})")
    width = max(len(k) for k, _ in lines)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
    if not report.bins:
        return text
    rows = [
        (f"+{fmt_duration(b.start - report.start)}" if report.start is not None else "-",
         b.finished, f"{b.throughput_per_min:.2f}", _pct(b.utilization), _bar(b.utilization))
        for b in report.bins
    ]
    binned = table(rows, ("START", "FINISHED", "TASKS/MIN", "UTIL", ""))
    return f"{text}\n\nPer bin of {fmt_duration(report.bin_width_s)}:\n{binned}"

