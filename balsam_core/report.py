"""What happened, from the task history: states, throughput, runs and node utilization.

Everything is computed from TaskEvent rows (DESIGN §4) in five queries, whatever
the number of tasks: counts by state, the first and last event, the JOB_FINISHED
times, run outcomes by state, and one row per run (its RUNNING event, the event
that ended it and the READY / RESTART_READY event before it, found through the
``(task_id, time)`` index).  The rest is arithmetic on plain data
(:func:`compute`)::

    from balsam_core.api import Site
    from balsam_core.report import build_report, write_png
    report = build_report(Site.open("~/runs/mysite"), workflow="sim", bins=30)
    print(report.utilization, report.throughput_per_min)
    write_png(report, "report.png")        # needs matplotlib

Definitions:

* **window**: from the first event to the last one; while some run is still open
  (RUNNING without a later event) up to the report's *now* instead, since that run
  counts until then.  The window is cut into *bins* of equal width.
* **run**: from a RUNNING event to the task's next event, the one leaving RUNNING
  (RUN_DONE, RUN_ERROR, RUN_TIMEOUT or USER_KILLED).  A task may have several runs.
* **footprint** of a run: ``num_nodes / node_packing_count`` for a one-node task
  (tasks sharing a node), else ``num_nodes``.
* **node utilization** of a bin: the busy node-seconds of the runs inside it over
  ``nodes * bin width``.  The node count is not recorded anywhere yet, so it is a
  parameter; by default the peak concurrent footprint (rounded up to whole nodes),
  which makes 100% mean "as busy as at the busiest moment".
* **queue wait**: from a task's READY / RESTART_READY event to its RUNNING event.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import func, or_, select
from sqlalchemy.orm import aliased

from .api import Site, filter_tasks
from .errors import BalsamError, ValidationError
from .models import Task, TaskEvent
from .states import State

#: Events that put a task in the queue for a launcher.
QUEUED_STATES = (State.READY, State.RESTART_READY)
#: Outcome name of a run that has not ended.
OPEN = "RUNNING"


class PlotUnavailable(BalsamError):
    """``write_png`` needs matplotlib, which is optional."""


@dataclass(frozen=True)
class Bin:
    """One time slice of the report window."""

    start: float
    end: float
    #: Tasks that reached JOB_FINISHED in this bin, and up to its end.
    finished: int
    finished_cumulative: int
    throughput_per_min: float
    #: Node-seconds spent in runs inside this bin.
    busy_node_s: float
    #: ``busy_node_s / (nodes * width)``; None without a node count.
    utilization: float | None


@dataclass
class Report:
    """The numbers of one report (times are epoch seconds, durations seconds)."""

    workflow: str | None
    tags: dict[str, str]
    #: The time open runs count up to.
    now: float
    #: Tasks matching the filters, by current state.
    states: dict[str, int]
    tasks: int
    first_event: float | None
    last_event: float | None
    #: The window: first event to last event, or to *now* while a run is open.
    start: float | None
    end: float | None
    finished: int
    #: Finished tasks per minute over the whole window.
    throughput_per_min: float | None
    runs: int
    #: Runs by how they ended (``RUNNING``: not yet).
    run_outcomes: dict[str, int]
    runs_open: int
    #: Over the runs that ended.
    run_time_mean_s: float | None
    run_time_median_s: float | None
    queue_wait_mean_s: float | None
    queue_wait_median_s: float | None
    #: Nodes available, and where that number came from: ``"given"`` or ``"peak"``.
    nodes: float | None
    nodes_source: str
    #: Largest sum of footprints of runs at the same moment.
    peak_footprint: float
    busy_node_s: float
    #: Mean over the window: ``busy_node_s / (nodes * span)``.
    utilization: float | None
    bin_width_s: float | None
    bins: list[Bin]
    #: Every JOB_FINISHED time, sorted (for plots; left out of :meth:`to_dict`).
    finished_times: list[float] = field(default_factory=list, repr=False)

    @property
    def span_s(self) -> float:
        return 0.0 if self.start is None or self.end is None else self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain data (for JSON)."""
        data = asdict(self)
        del data["finished_times"]
        data["span_s"] = self.span_s
        return data


class Run(NamedTuple):
    """One stay in RUNNING."""

    task_id: int
    start: float
    #: None while still running.
    end: float | None
    footprint: float
    #: Seconds from READY / RESTART_READY to RUNNING, if that event is known.
    queue_wait: float | None


def footprint(num_nodes: int, node_packing_count: int) -> float:
    """Nodes a task occupies: a share of one node when it packs, else ``num_nodes``."""
    if num_nodes == 1:
        return 1.0 / max(node_packing_count, 1)
    return float(num_nodes)


# ---------------------------------------------------------------------- queries


def build_report(
    site: Site,
    *,
    workflow: str | None = None,
    tags: Mapping[str, str] | None = None,
    bins: int = 20,
    nodes: float | None = None,
    now: float | None = None,
) -> Report:
    """Report on the tasks of *site* matching *workflow* and *tags*.

    *nodes*: nodes available (default: the peak concurrent footprint, rounded up);
    *now*: the time open runs count up to (default: the current time).
    """
    if bins < 1:
        raise ValidationError(f"bins must be >= 1, got {bins}")
    if nodes is not None and not (nodes > 0 and math.isfinite(nodes)):
        raise ValidationError(f"nodes must be a positive number, got {nodes}")
    tags = {k: str(v) for k, v in (tags or {}).items()}
    now = time.time() if now is None else now
    ids = None
    if workflow is not None or tags:
        ids = filter_tasks(select(Task.id), workflow=workflow, tags=tags)

    def scoped(query: Any) -> Any:
        """*query* on TaskEvent, limited to the selected tasks."""
        return query if ids is None else query.where(TaskEvent.task_id.in_(ids))

    with site.db.session() as s:
        db = s.connection()  # Core execution: none of the ORM's per-row work
        if db.dialect.name == "postgresql":
            # One snapshot for every query, while launchers keep writing.
            db.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # The correlated look-ups below look expensive to the planner, whose JIT
            # then spends longer compiling than the query takes to run.
            db.exec_driver_sql("SET LOCAL jit = off")
        states = dict(
            db.execute(
                filter_tasks(select(Task.state, func.count()), workflow=workflow, tags=tags)
                .group_by(Task.state)
            ).all()
        )
        # Two subqueries: SQLite answers a lone min() or max() from the index.
        first, last = db.execute(
            select(
                scoped(select(func.min(TaskEvent.time))).scalar_subquery(),
                scoped(select(func.max(TaskEvent.time))).scalar_subquery(),
            )
        ).one()
        finished_times = sorted(
            db.scalars(
                scoped(select(TaskEvent.time).where(TaskEvent.to_state == State.JOB_FINISHED.value))
            )
        )
        outcomes = dict(
            db.execute(
                scoped(select(TaskEvent.to_state, func.count()))
                .where(TaskEvent.from_state == State.RUNNING.value)
                .group_by(TaskEvent.to_state)
            ).all()
        )
        runs = query_runs(s, ids)
    return compute(
        runs, finished_times, states=states, first_event=first, last_event=last,
        run_outcomes=outcomes, workflow=workflow, tags=tags, bins=bins, nodes=nodes, now=now,
    )


def query_runs(session: Any, task_ids: Any = None) -> list[Run]:
    """Every run (of the tasks the ``select`` *task_ids* names, else of all), in one query.

    One row per RUNNING event; its end (the task's next event leaving RUNNING) and
    its queue time (the task's last READY / RESTART_READY event before it) are
    correlated look-ups on the ``(task_id, time)`` index of the events.  Events at
    the same time are ordered by id.
    """
    running = State.RUNNING.value
    run, nxt, prev = (aliased(TaskEvent, name=n) for n in ("run", "nxt", "prev"))
    end = (
        select(func.min(nxt.time))
        .where(
            nxt.task_id == run.task_id,
            nxt.from_state == running,
            nxt.time >= run.time,
            or_(nxt.time > run.time, nxt.id > run.id),
        )
        .scalar_subquery()
    )
    queued = (
        select(func.max(prev.time))
        .where(
            prev.task_id == run.task_id,
            prev.to_state.in_([s.value for s in QUEUED_STATES]),
            prev.time <= run.time,
            or_(prev.time < run.time, prev.id < run.id),
        )
        .scalar_subquery()
    )
    query = (
        select(run.task_id, run.time, end, queued, Task.num_nodes, Task.node_packing_count)
        .join(Task, Task.id == run.task_id)
        .where(run.to_state == running)
    )
    if task_ids is not None:
        query = query.where(run.task_id.in_(task_ids))
    result = session.connection().execute(query)
    return [
        Run(task_id, start, stop, footprint(num_nodes, packing),
            None if queued_at is None else start - queued_at)
        for block in result.partitions(10_000)
        for task_id, start, stop, queued_at, num_nodes, packing in block
    ]


# ---------------------------------------------------------------------- arithmetic


def compute(
    runs: Sequence[Run],
    finished_times: Sequence[float],
    *,
    states: Mapping[str, int],
    first_event: float | None,
    last_event: float | None,
    run_outcomes: Mapping[str, int] | None = None,
    workflow: str | None = None,
    tags: Mapping[str, str] | None = None,
    bins: int = 20,
    nodes: float | None = None,
    now: float | None = None,
) -> Report:
    """The report from plain data (no database): runs, finish times, state counts,
    and how many runs ended in each state (*run_outcomes*; open runs are added)."""
    now = time.time() if now is None else now
    finished_times = sorted(finished_times)
    open_runs = [r for r in runs if r.end is None]
    start, end = first_event, last_event
    if start is not None and end is not None and open_runs:
        end = max(end, now)
    # Open runs count until *now*, never past the window nor before their start.
    intervals = [
        (r.start, r.end if r.end is not None else max(r.start, min(now, end or now)), r.footprint)
        for r in runs
    ]
    peak, busy_at = _sweep(intervals)
    nodes_source = "given"
    if nodes is None:
        nodes_source = "peak"
        nodes = float(math.ceil(peak - 1e-9)) if peak > 0 else None

    outcomes = {k: v for k, v in sorted((run_outcomes or {}).items()) if v}
    if open_runs:
        outcomes[OPEN] = len(open_runs)
    durations = [r.end - r.start for r in runs if r.end is not None]
    waits = [r.queue_wait for r in runs if r.queue_wait is not None]

    span = 0.0 if start is None or end is None else end - start
    width = span / bins if span > 0 else None
    bin_list: list[Bin] = []
    if width is not None:
        assert start is not None and end is not None
        edges = [start + i * width for i in range(bins)] + [end]
        integral = busy_at(edges)
        counts = [0] * bins
        for t in finished_times:
            counts[min(max(int((t - start) / width), 0), bins - 1)] += 1
        total = 0
        for i in range(bins):
            total += counts[i]
            busy = integral[i + 1] - integral[i]
            bin_width = edges[i + 1] - edges[i]
            bin_list.append(
                Bin(
                    start=edges[i], end=edges[i + 1], finished=counts[i],
                    finished_cumulative=total,
                    throughput_per_min=counts[i] * 60.0 / bin_width if bin_width > 0 else 0.0,
                    busy_node_s=busy,
                    utilization=busy / (nodes * bin_width) if nodes and bin_width > 0 else None,
                )
            )
    busy_total = sum((e - s) * fp for s, e, fp in intervals)
    return Report(
        workflow=workflow,
        tags=dict(tags or {}),
        now=now,
        states={s.value: states[s.value] for s in State if states.get(s.value)},
        tasks=sum(states.values()),
        first_event=first_event,
        last_event=last_event,
        start=start,
        end=end,
        finished=len(finished_times),
        throughput_per_min=len(finished_times) * 60.0 / span if span > 0 else None,
        runs=len(runs),
        run_outcomes=outcomes,
        runs_open=len(open_runs),
        run_time_mean_s=statistics.fmean(durations) if durations else None,
        run_time_median_s=statistics.median(durations) if durations else None,
        queue_wait_mean_s=statistics.fmean(waits) if waits else None,
        queue_wait_median_s=statistics.median(waits) if waits else None,
        nodes=nodes,
        nodes_source=nodes_source,
        peak_footprint=peak,
        busy_node_s=busy_total,
        utilization=busy_total / (nodes * span) if nodes and span > 0 else None,
        bin_width_s=width,
        bins=bin_list,
        finished_times=finished_times,
    )


def _sweep(
    intervals: Sequence[tuple[float, float, float]],
) -> tuple[float, Callable[[Sequence[float]], list[float]]]:
    """Peak concurrent footprint of *intervals* ``(start, end, footprint)``, and a
    function giving the busy node-seconds from the first change up to each of some
    sorted times.  One sort, then linear: no cost per (run, bin) pair."""
    changes = sorted([(s, fp) for s, e, fp in intervals] + [(e, -fp) for s, e, fp in intervals])
    # At equal times ends sort first: back-to-back runs do not overlap.
    peak = level = 0.0
    for _, delta in changes:
        level += delta
        if level > peak:
            peak = level

    def busy_at(times: Sequence[float]) -> list[float]:
        out, acc, level, last, j = [], 0.0, 0.0, None, 0
        for t in times:
            while j < len(changes) and changes[j][0] <= t:
                when, delta = changes[j]
                if last is not None:
                    acc += level * (when - last)
                last, level = when, level + delta
                j += 1
            if last is not None and t > last:
                acc += level * (t - last)
                last = t
            out.append(acc)
        return out

    return round(peak, 9), busy_at


# ---------------------------------------------------------------------- plot


def write_png(report: Report, path: str | Path, title: str | None = None) -> None:
    """Plot *report* to a PNG: completed tasks (cumulative) and node utilization per bin.

    Needs matplotlib (optional); draws with the Agg backend, without pyplot.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotUnavailable("--png needs matplotlib: pip install matplotlib") from None

    unit, scale = _time_unit(report.span_s)
    t0 = report.start or 0.0
    fig = Figure(figsize=(10, 6.5), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    fig.suptitle(title or "Balsam report", fontsize=14, fontweight="bold")

    xs = [0.0] + [(t - t0) / scale for t in report.finished_times] + [report.span_s / scale]
    ys = list(range(len(report.finished_times) + 1)) + [len(report.finished_times)]
    top.step(xs, ys, where="post", color="tab:blue", linewidth=2)
    top.fill_between(xs, ys, step="post", color="tab:blue", alpha=0.15)
    rate = report.throughput_per_min
    top.set_title(
        f"Completed tasks (JOB_FINISHED), cumulative: {report.finished} of {report.tasks}"
        + (f", {rate:.3g} tasks/min overall" if rate is not None else ""),
        fontsize=11,
    )
    top.set_ylabel("tasks completed")
    top.set_ylim(bottom=0, top=max(1, report.finished) * 1.08)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.grid(alpha=0.3)

    if report.bins:
        lefts = [(b.start - t0) / scale for b in report.bins]
        widths = [(b.end - b.start) / scale for b in report.bins]
        values = [100.0 * (b.utilization or 0.0) for b in report.bins]
        bottom.bar(lefts, values, width=widths, align="edge", color="tab:green",
                   edgecolor="white", linewidth=0.5, label="per bin")
        if report.utilization is not None:
            mean = 100.0 * report.utilization
            bottom.axhline(mean, color="black", linestyle="--", linewidth=1.2,
                           label=f"mean {mean:.1f}%")
        bottom.axhline(100.0, color="gray", linewidth=0.8)
        # Head room above 100% for the legend, clear of the bars.
        bottom.set_ylim(0, max(100.0, max(values)) * 1.18)
        bottom.legend(loc="upper right", ncol=2, fontsize=9)
    else:
        bottom.text(0.5, 0.5, "no runs", ha="center", va="center", transform=bottom.transAxes)
    nodes = _nodes_text(report)
    width = f", bins of {fmt_duration(report.bin_width_s)}" if report.bin_width_s else ""
    bottom.set_title(f"Node utilization per bin ({nodes}{width})", fontsize=11)
    bottom.set_ylabel("node utilization (%)")
    bottom.set_xlabel(f"time since first event ({unit}); first event at {_clock(report.start)}")
    bottom.set_xlim(0, max(report.span_s / scale, 1e-9))
    bottom.grid(alpha=0.3)
    fig.savefig(Path(path), format="png")


def _time_unit(span: float) -> tuple[str, float]:
    if span < 120:
        return "s", 1.0
    if span < 2 * 3600:
        return "min", 60.0
    if span < 2 * 86400:
        return "h", 3600.0
    return "days", 86400.0


def _nodes_text(report: Report) -> str:
    if report.nodes is None:
        return "nodes: unknown (no runs)"
    n = f"{report.nodes:g} node" + ("" if report.nodes == 1 else "s")
    if report.nodes_source == "given":
        return f"{n} (given)"
    return f"{n} = peak concurrent footprint"


def fmt_duration(seconds: float | None) -> str:
    """``12.5s``, ``3m07s``, ``2h05m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 1 else f"{seconds:.1f}s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m}m{s:02d}s"
    if seconds < 86400:
        h, m = divmod(round(seconds / 60), 60)
        return f"{h}h{m:02d}m"
    d, h = divmod(round(seconds / 3600), 24)
    return f"{d}d{h:02d}h"


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")
