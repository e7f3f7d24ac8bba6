"""``balsam report`` and :mod:`balsam_core.report`: numbers from known task histories.

Histories are driven through the real state table with explicit event times
(``Change.time``), starting from creation events moved to ``T0``, so every expected
figure is exact arithmetic.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from balsam_core.api import Site
from balsam_core.cli import cli
from balsam_core.cli.report import report_command
from balsam_core.models import TaskEvent
from balsam_core.report import Run, build_report, compute, footprint
from balsam_core.states import State
from balsam_core.transitions import Change

T0 = 1_700_000_000.0
S = State


# ---------------------------------------------------------------------- helpers


def make_tasks(site: Site, n: int, **spec: Any) -> list[int]:
    """*n* READY tasks whose creation events are at ``T0``."""
    ids = site.add_tasks([{"command": "true", **spec} for _ in range(n)])
    with site.db.session(write=True) as s:
        s.execute(update(TaskEvent).where(TaskEvent.task_id.in_(ids)).values(time=T0))
    return ids


def start(site: Site, task_id: int, at: float, *, restart: bool = False) -> None:
    """Stage, preprocess (at the queue time) and start *task_id* at ``T0 + at``."""
    if restart:
        changes = [Change(task_id, S.RUNNING, time=T0 + at)]
    else:
        changes = [
            Change(task_id, S.STAGED_IN, time=T0),
            Change(task_id, S.PREPROCESSED, time=T0),
            Change(task_id, S.RUNNING, time=T0 + at),
        ]
    site.transition(changes)


def finish(site: Site, task_id: int, at: float) -> None:
    """RUN_DONE -> POSTPROCESSED -> JOB_FINISHED at ``T0 + at``."""
    site.transition(
        [Change(task_id, s, time=T0 + at) for s in (S.RUN_DONE, S.POSTPROCESSED, S.JOB_FINISHED)]
    )


def job(site: Site, task_id: int, begin: float, end: float) -> None:
    start(site, task_id, begin)
    finish(site, task_id, end)


def back_to_back(site: Site, **spec: Any) -> list[int]:
    """4 one-node tasks of 10 s on 2 nodes: two at 0-10 s, two at 10-20 s."""
    ids = make_tasks(site, 4, **spec)
    for i, task_id in enumerate(ids):
        begin = 10.0 * (i // 2)
        job(site, task_id, begin, begin + 10)
    return ids


@pytest.fixture
def site_dir(sqlite_site: Site) -> Iterator[Path]:
    yield sqlite_site.site_dir


@pytest.fixture(autouse=True)
def _report_registered() -> Iterator[None]:
    """``balsam report`` on the CLI group (whether or not cli/__init__ adds it yet)."""
    added = "report" not in cli.commands
    if added:
        cli.add_command(report_command)
    yield
    if added:
        cli.commands.pop("report", None)


def run(site_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--site", str(site_dir), "report", *args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result.stdout


def one_error(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def utilizations(report: Any) -> list[float | None]:
    return [b.utilization for b in report.bins]


# ---------------------------------------------------------------------- the numbers


def test_back_to_back_runs_fill_two_nodes(site: Site) -> None:
    back_to_back(site)
    report = build_report(site, bins=4, now=T0 + 1000)

    assert report.states == {"JOB_FINISHED": 4} and report.tasks == 4
    assert (report.first_event, report.last_event) == (T0, T0 + 20)
    assert (report.start, report.end, report.span_s) == (T0, T0 + 20, 20.0)  # nothing open
    assert report.finished == 4
    assert report.throughput_per_min == pytest.approx(12.0)  # 4 tasks in 1/3 min
    assert [b.finished for b in report.bins] == [0, 0, 2, 2]
    assert [b.finished_cumulative for b in report.bins] == [0, 0, 2, 4]
    assert [b.throughput_per_min for b in report.bins] == pytest.approx([0, 0, 24, 24])
    assert report.bin_width_s == 5.0
    edges = [(b.start - T0, b.end - T0) for b in report.bins]
    assert edges == [(0, 5), (5, 10), (10, 15), (15, 20)]

    assert (report.nodes, report.nodes_source, report.peak_footprint) == (2, "peak", 2.0)
    assert report.busy_node_s == pytest.approx(40.0)
    assert report.utilization == pytest.approx(1.0)
    assert utilizations(report) == pytest.approx([1.0] * 4)
    assert [b.busy_node_s for b in report.bins] == pytest.approx([10.0] * 4)

    assert report.runs == 4 and report.runs_open == 0
    assert report.run_outcomes == {"RUN_DONE": 4}
    assert report.run_time_mean_s == report.run_time_median_s == 10.0
    assert report.queue_wait_median_s == pytest.approx(5.0)  # 0, 0, 10, 10
    assert report.queue_wait_mean_s == pytest.approx(5.0)

    given = build_report(site, bins=4, nodes=4)
    assert (given.nodes, given.nodes_source) == (4, "given")
    assert given.utilization == pytest.approx(0.5)
    assert utilizations(given) == pytest.approx([0.5] * 4)


def test_uneven_bins_split_runs_and_count_finish_at_the_end_in_the_last_bin(site: Site) -> None:
    back_to_back(site)
    report = build_report(site, bins=3)  # 6.67 s bins: runs straddle bin edges
    assert [b.finished for b in report.bins] == [0, 2, 2]
    assert [b.busy_node_s for b in report.bins] == pytest.approx([40 / 3] * 3)
    assert report.bins[-1].end == T0 + 20
    one = build_report(site, bins=1)
    assert [(b.finished, b.utilization) for b in one.bins] == [(4, pytest.approx(1.0))]


def test_a_running_task_counts_until_now(site: Site) -> None:
    done, running = make_tasks(site, 2)
    job(site, done, 0, 10)
    start(site, running, 5)
    report = build_report(site, bins=4, now=T0 + 20)

    assert report.states == {"JOB_FINISHED": 1, "RUNNING": 1}
    assert report.last_event == T0 + 10
    assert report.end == T0 + 20  # the window reaches "now" while a run is open
    assert report.runs == 2 and report.runs_open == 1
    assert report.run_outcomes == {"RUN_DONE": 1, "RUNNING": 1}
    assert report.busy_node_s == pytest.approx(10 + 15)
    assert (report.nodes, report.peak_footprint) == (2, 2.0)
    assert report.utilization == pytest.approx(25 / 40)
    # 0-5: one task; 5-10: both; 10-20: the running one.
    assert utilizations(report) == pytest.approx([0.5, 1.0, 0.5, 0.5])
    assert report.run_time_mean_s == report.run_time_median_s == 10.0  # ended runs only
    assert report.throughput_per_min == pytest.approx(1 / (20 / 60))


def test_killed_and_restarted_runs(site: Site) -> None:
    done, killed, flaky = make_tasks(site, 3)
    job(site, done, 0, 10)
    start(site, killed, 0)
    site.transition([Change(killed, S.USER_KILLED, "killed", time=T0 + 4)])
    # Fails at 2 s; restarted at the same instant (ties are ordered by event id).
    start(site, flaky, 0)
    site.transition(
        [
            Change(flaky, S.RUN_ERROR, time=T0 + 2),
            Change(flaky, S.RESTART_READY, time=T0 + 2),
            Change(flaky, S.RUNNING, time=T0 + 2),
        ]
    )
    finish(site, flaky, 10)

    report = build_report(site, bins=2)
    assert report.states == {"JOB_FINISHED": 2, "USER_KILLED": 1}
    assert report.finished == 2
    assert report.runs == 4 and report.runs_open == 0
    assert report.run_outcomes == {"RUN_DONE": 2, "RUN_ERROR": 1, "USER_KILLED": 1}
    assert report.run_time_median_s == pytest.approx(6.0)  # 2, 4, 8, 10
    assert report.run_time_mean_s == pytest.approx((10 + 4 + 2 + 8) / 4)
    assert report.busy_node_s == pytest.approx(10 + 4 + 2 + 8)
    assert report.peak_footprint == 3.0
    # 0-5 s: done 5 + killed 4 + flaky 2 + 3 of 3 nodes; 5-10 s: done 5 + flaky 5.
    assert utilizations(report) == pytest.approx([14 / 15, 10 / 15])
    # Queue waits: 0 for the three first runs (READY at 0 -> RUNNING at 0), and 0 for
    # the restart (RESTART_READY at 2 -> RUNNING at 2), not 2 s since READY.
    assert report.queue_wait_median_s == report.queue_wait_mean_s == 0.0


def test_packed_tasks_count_a_share_of_a_node(site: Site) -> None:
    packed = make_tasks(site, 4, node_packing_count=2)
    (wide,) = make_tasks(site, 1, num_nodes=3, node_packing_count=4)  # multi-node: not shared
    for task_id in packed:
        job(site, task_id, 0, 10)
    job(site, wide, 10, 20)

    report = build_report(site, bins=2)
    assert report.peak_footprint == 3.0 and report.nodes == 3
    assert report.busy_node_s == pytest.approx(4 * 0.5 * 10 + 3 * 10)
    assert utilizations(report) == pytest.approx([2 / 3, 1.0])
    assert footprint(1, 2) == 0.5 and footprint(1, 1) == 1.0 and footprint(3, 4) == 3.0

    third = build_report(site, bins=2, nodes=6)
    assert utilizations(third) == pytest.approx([1 / 3, 0.5])


def test_fractional_peak_rounds_up_to_a_whole_node(site: Site) -> None:
    (task_id,) = make_tasks(site, 1, node_packing_count=4)
    job(site, task_id, 0, 10)
    report = build_report(site, bins=1)
    assert (report.peak_footprint, report.nodes) == (0.25, 1)
    assert report.utilization == pytest.approx(0.25)


def test_filters_by_workflow_and_tags(site: Site) -> None:
    back_to_back(site, workflow="a", tags={"size": "big"})
    other = make_tasks(site, 2, workflow="b", tags={"size": "big"})
    small = make_tasks(site, 1, workflow="a", tags={"size": "small"})
    job(site, other[0], 30, 90)
    start(site, other[1], 30)
    job(site, small[0], 0, 40)

    a_big = build_report(site, workflow="a", tags={"size": "big"}, bins=4)
    assert (a_big.tasks, a_big.runs, a_big.finished) == (4, 4, 4)
    assert (a_big.end, a_big.utilization) == (T0 + 20, pytest.approx(1.0))

    a = build_report(site, workflow="a", bins=4)
    assert (a.tasks, a.runs, a.finished, a.last_event) == (5, 5, 5, T0 + 40)
    assert a.peak_footprint == 3.0

    big = build_report(site, tags={"size": "big"}, bins=4, now=T0 + 100)
    assert (big.tasks, big.runs, big.runs_open, big.finished) == (6, 6, 1, 5)
    assert big.states == {"JOB_FINISHED": 5, "RUNNING": 1}
    assert big.end == T0 + 100

    everything = build_report(site, now=T0 + 100)
    assert (everything.tasks, everything.runs, everything.finished) == (7, 7, 6)

    none = build_report(site, workflow="nope")
    assert (none.tasks, none.runs, none.bins, none.start) == (0, 0, [], None)
    assert none.utilization is None
    assert build_report(site, tags={"size": "huge"}).tasks == 0


def test_tasks_that_never_ran(site: Site) -> None:
    make_tasks(site, 3)
    report = build_report(site)
    assert report.states == {"READY": 3}
    assert (report.runs, report.nodes, report.utilization, report.bins) == (0, None, None, [])
    assert report.throughput_per_min is None  # every event at one instant


def test_compute_from_plain_runs() -> None:
    """The arithmetic without a database (what a simulator would feed in)."""
    runs = [Run(1, 0.0, 30.0, 1.0, None), Run(2, 0.0, 60.0, 1.0, 2.0), Run(3, 30.0, None, 2.0, 4.0)]
    report = compute(
        runs, [30.0, 60.0], states={"JOB_FINISHED": 2, "RUNNING": 1},
        first_event=0.0, last_event=60.0, run_outcomes={"RUN_DONE": 2}, bins=2, now=120.0,
    )
    # At 30 s run 1 ends as run 3 starts: 2 - 1 + 2 = 3 nodes.
    assert report.end == 120.0 and report.peak_footprint == 3.0 and report.nodes == 3
    assert [b.busy_node_s for b in report.bins] == pytest.approx([30 + 60 + 60, 0 + 0 + 120])
    assert report.run_outcomes == {"RUN_DONE": 2, "RUNNING": 1}
    assert report.queue_wait_median_s == 3.0


def test_bad_arguments(sqlite_site: Site) -> None:
    from balsam_core.errors import ValidationError

    with pytest.raises(ValidationError, match="bins"):
        build_report(sqlite_site, bins=0)
    with pytest.raises(ValidationError, match="nodes"):
        build_report(sqlite_site, nodes=0)


# ---------------------------------------------------------------------- CLI


def test_cli_text(sqlite_site: Site, site_dir: Path) -> None:
    back_to_back(sqlite_site, workflow="sim")
    out = ok(run(site_dir, "--bins", "4"))
    assert "Tasks        4 (all tasks)" in out
    assert "States       JOB_FINISHED 4" in out
    assert "Finished     4 (12.00 tasks/min)" in out
    assert "Runs         4: RUN_DONE 4" in out
    assert "Run time     mean 10.0s, median 10.0s" in out
    assert "Queue wait   median 5.0s" in out
    assert "Nodes        2 (peak concurrent footprint; set with --nodes N)" in out
    assert "Utilization  100.0% mean" in out
    assert "Per bin of 5.0s:" in out
    bins = out.split("Per bin of 5.0s:\n")[1].splitlines()
    assert bins[0].split() == ["START", "FINISHED", "TASKS/MIN", "UTIL"]
    assert [line.split()[:4] for line in bins[1:]] == [
        ["+0s", "0", "0.00", "100.0%"], ["+5.0s", "0", "0.00", "100.0%"],
        ["+10.0s", "2", "24.00", "100.0%"], ["+15.0s", "2", "24.00", "100.0%"],
    ]
    assert all(line.endswith(" " + "#" * 40) for line in bins[1:])
    # Columns line up: every bin row starts its UTIL column where the header does.
    col = bins[0].index("UTIL")
    assert all(line[col:].startswith("100.0%") for line in bins[1:])

    given = ok(run(site_dir, "--bins", "2", "--nodes", "8", "--wf", "sim"))
    assert "Tasks        4 (workflow sim)" in given
    assert "Nodes        8 (--nodes)" in given
    assert "Utilization  25.0% mean (40.0 busy node-s of 160.0)" in given
    assert "#" * 10 + "\n" in given and "#" * 11 not in given


def test_cli_filters_and_nothing_matching(sqlite_site: Site, site_dir: Path) -> None:
    back_to_back(sqlite_site, workflow="sim", tags={"size": "big"})
    assert "Tasks        4 (workflow sim, size=big)" in ok(
        run(site_dir, "-w", "sim", "--tag", "size=big")
    )
    assert ok(run(site_dir, "--tag", "size=small")) == "No tasks match (size=small).\n"
    assert "Error: " in one_error(run(site_dir, "--tag", "nonsense"), 2)
    assert "--bins" in one_error(run(site_dir, "--bins", "0"), 2)
    assert "--nodes" in one_error(run(site_dir, "--nodes", "0"), 2)


def test_cli_json(sqlite_site: Site, site_dir: Path) -> None:
    back_to_back(sqlite_site)
    data = json.loads(ok(run(site_dir, "--bins", "4", "--json")))
    assert data["tasks"] == 4 and data["finished"] == 4
    assert data["throughput_per_min"] == pytest.approx(12.0)
    assert data["utilization"] == pytest.approx(1.0)
    assert (data["nodes"], data["nodes_source"]) == (2, "peak")
    assert data["span_s"] == 20.0 and data["start"] == T0 and data["end"] == T0 + 20
    assert [b["utilization"] for b in data["bins"]] == pytest.approx([1.0] * 4)
    assert [b["finished"] for b in data["bins"]] == [0, 0, 2, 2]
    assert data["run_outcomes"] == {"RUN_DONE": 4}
    assert "finished_times" not in data
    given = json.loads(ok(run(site_dir, "--json", "--nodes", "4")))
    assert given["utilization"] == pytest.approx(0.5)


def test_cli_png(sqlite_site: Site, site_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    back_to_back(sqlite_site, workflow="sim")
    png = tmp_path / "report.png"
    out = ok(run(site_dir, "--bins", "4", "--png", str(png)))
    assert out.endswith(f"Wrote {png}\n")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # With --json the stdout stays pure JSON; the note goes to stderr.
    again = tmp_path / "again.png"
    result = run(site_dir, "--json", "--png", str(again))
    assert json.loads(ok(result))["tasks"] == 4
    assert result.stderr == f"Wrote {again}\n"
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    line = one_error(run(site_dir, "--png", str(tmp_path / "missing" / "x.png")), 1)
    assert "cannot write" in line and "missing" in line


def test_cli_png_without_matplotlib(
    sqlite_site: Site, site_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    back_to_back(sqlite_site)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    png = tmp_path / "r.png"
    line = one_error(run(site_dir, "--png", str(png)), 1)
    assert line == "Error: --png needs matplotlib: pip install matplotlib"
    assert not png.exists()
