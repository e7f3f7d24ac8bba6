#!/usr/bin/env python
"""Benchmark: bulk task insertion and filtered task pages at scale (default 1M tasks).

Usage::

    python bench/bench_tasks.py [--tasks N] [--backend sqlite|postgresql|both] [--out FILE]

Every measurement is printed on stdout as one JSON object (and appended to ``--out``);
progress goes to stderr.  Each measurement carries a baseline measured in the same run
(the raw DB-API driver doing the same work) and the ratio against it, plus, where the
issue sets one, the target and whether it is met.  Nothing is asserted.

Measurements (see bench/README.md):

* ``bulk_insert`` -- N tasks through ``Site.add_tasks`` in chunks; baseline: one plain
  ``executemany`` per table of pre-built tuples (the same task, tag and event rows)
  into a fresh site database.
* ``tasks_page``, ``tasks_page_deep``, ``tasks_page_tag_nomatch``, ``count``,
  ``cli_ls_inprocess``, ``cli_ls_subprocess`` -- filtered queries on the N-task site
  after its states were made realistic; median of ``--repeat`` runs after one warm-up;
  baseline: the API's own main SELECT (captured) replayed on a raw driver connection.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sqlalchemy  # noqa: E402
from sqlalchemy import event as sa_event  # noqa: E402

from balsam_core.api import Site  # noqa: E402
from balsam_core.models import Task  # noqa: E402

#: Targets from the issue.
TARGET_INSERT_TASKS_PER_S = 50_000.0
TARGET_PAGE_SECONDS = 0.3

#: The app every task runs; one template parameter.
APP_NAME = "sim"
APP_COMMAND = "python sim.py --temp {temp}"
NUM_WORKFLOWS = 10
NUM_CAMPAIGNS = 7  # coprime with NUM_WORKFLOWS: tag and workflow are independent

#: The filter of the page queries (about 1/700 of the tasks match).
QUERY_STATE = "RUNNING"
QUERY_WORKFLOW = "wf3"
QUERY_TAG = ("campaign", "c2")
PAGE = 50

#: Realistic state mix, applied with one UPDATE: hash(id) % 100 below the bound.
STATE_MIX = (("JOB_FINISHED", 30), ("FAILED", 35), ("RUNNING", 45))  # rest stay READY
HASH_SQL = "(((id * 2654435761) % 4294967296) % 100)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the workload


def task_tags(i: int) -> dict[str, str]:
    """1-2 tags: every task has a campaign, every third one a size."""
    tags = {"campaign": f"c{i % NUM_CAMPAIGNS}"}
    if i % 3 == 0:
        tags["size"] = "large"
    return tags


def make_spec(i: int) -> dict[str, Any]:
    """The i-th task spec (0-based): an app with one parameter, a workflow, 1-2 tags."""
    return {
        "app": APP_NAME,
        "parameters": {"temp": 200 + i},
        "workflow": f"wf{i % NUM_WORKFLOWS}",
        "tags": task_tags(i),
    }


def raw_rows(
    n: int, app_id: int, now: float
) -> tuple[list[str], list[tuple], list[tuple], list[tuple]]:
    """The rows ``Site.add_tasks`` writes for ``make_spec(0..n-1)``, as driver tuples:
    (task columns, task rows, tag rows, event rows).  Ids are 1..n (a fresh database)."""
    fixed: dict[str, Any] = {
        "name": APP_NAME, "app_id": app_id, "command": None, "workdir": None,
        "num_nodes": 1, "ranks_per_node": 1, "threads_per_rank": 1, "gpus_per_rank": 0,
        "node_packing_count": 1, "wall_time_min": 0.0, "environment": "{}",
        "mpi_flags": "[]", "input_files": "[]", "stage_in": "[]", "stage_out": "[]",
        "post_error_handler": False, "post_timeout_handler": False,
        "auto_timeout_retry": True, "num_retries": 0, "max_retries": None, "data": "{}",
        "return_code": None, "state": "READY", "state_time": now, "spawned_by": None,
        "lease_launcher_id": None, "lease_expires": None, "batch_job_id": None,
        "created": now,
    }
    varying = {"id", "workflow", "parameters"}
    columns = [c.name for c in Task.__table__.columns]
    unknown = set(columns) - set(fixed) - varying
    if unknown:
        raise SystemExit(f"bench: task table has columns this benchmark does not know: {unknown}")
    workflows = [f"wf{k}" for k in range(NUM_WORKFLOWS)]
    getters: list[Callable[[int], Any]] = []
    for name in columns:
        if name == "id":
            getters.append(lambda i: i + 1)
        elif name == "workflow":
            getters.append(lambda i: workflows[i % NUM_WORKFLOWS])
        elif name == "parameters":
            getters.append(lambda i: '{"temp":%d}' % (200 + i))
        else:
            getters.append(lambda i, v=fixed[name]: v)
    tasks = [tuple(g(i) for g in getters) for i in range(n)]
    tags = [(i + 1, k, v) for i in range(n) for k, v in task_tags(i).items()]
    events = [(i + 1, now, "CREATED", "READY", "created", None, None) for i in range(n)]
    return columns, tasks, tags, events


# ---------------------------------------------------------------------- backends


class Backend:
    name = ""
    marker = "?"

    def new_database(self, label: str) -> str:
        """A database URL for ``Site.init`` (a fresh, empty database)."""
        raise NotImplementedError

    def connect(self, site: Site, autocommit: bool = True) -> Any:
        """A raw DB-API connection to the site's database."""
        raise NotImplementedError

    def raw_script(self, site: Site) -> tuple[str, list[str]]:
        """Python source (and argv) that runs one SQL query with the bare driver."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {}

    def after_prepare(self, conn: Any) -> None:
        """Hook after the state UPDATEs."""

    def close(self) -> None:
        pass


class SqliteBackend(Backend):
    name = "sqlite"
    marker = "?"
    #: What balsam_core.db sets on every connection; the raw baseline uses the same.
    PRAGMAS = (
        "PRAGMA busy_timeout = 5000",
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA foreign_keys = ON",
        "PRAGMA cache_size = -65536",
    )

    def new_database(self, label: str) -> str:
        return "sqlite:///balsam.db"

    def connect(self, site: Site, autocommit: bool = True) -> Any:
        conn = sqlite3.connect(site.db.url.database, isolation_level=None, timeout=5)
        for pragma in self.PRAGMAS:
            conn.execute(pragma)
        return conn

    def raw_script(self, site: Site) -> tuple[str, list[str]]:
        src = (
            "import json, sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1])\n"
            "rows = conn.execute(sys.argv[2], json.loads(sys.argv[3])).fetchall()\n"
            "print(len(rows))\n"
        )
        return src, [str(site.db.url.database)]

    def versions(self) -> dict[str, str]:
        return {"sqlite": sqlite3.sqlite_version}


class PostgresBackend(Backend):
    name = "postgresql"
    marker = "%s"

    def __init__(self, base_dir: str | None) -> None:
        from tests.harness.postgres import PostgresServer

        self.server = PostgresServer(base_dir=base_dir)
        log("starting a throwaway PostgreSQL server ...")
        self.server.start()
        log(f"PostgreSQL up: {self.server!r}")
        self.count = 0

    def new_database(self, label: str) -> str:
        self.count += 1
        return self.server.create_database(f"bench_{label}_{self.count}")

    @staticmethod
    def conninfo(site: Site) -> str:
        return site.db.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def connect(self, site: Site, autocommit: bool = True) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo(site), autocommit=autocommit)

    def raw_script(self, site: Site) -> tuple[str, list[str]]:
        src = (
            "import json, sys, psycopg\n"
            "conn = psycopg.connect(sys.argv[1], autocommit=True)\n"
            "rows = conn.execute(sys.argv[2], json.loads(sys.argv[3])).fetchall()\n"
            "print(len(rows))\n"
        )
        return src, [self.conninfo(site)]

    def after_prepare(self, conn: Any) -> None:
        # 45% of the rows were just updated: autovacuum would VACUUM ANALYZE the table
        # within a minute; do it now so that the plans do not depend on its timing.
        t0 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        log(f"VACUUM ANALYZE: {time.perf_counter() - t0:.1f} s")

    def versions(self) -> dict[str, str]:
        import psycopg

        out = subprocess.run(
            [str(self.server.pg_bin / "postgres"), "--version"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
        match = re.search(r"\d+(\.\d+)+", out)
        return {"psycopg": psycopg.__version__, "postgresql": match.group(0) if match else out}

    def close(self) -> None:
        self.server.stop()


# ---------------------------------------------------------------------- output


class Report:
    def __init__(self, out: Path | None, common: dict[str, Any]) -> None:
        self.out = out
        self.common = common
        self.records: list[dict[str, Any]] = []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, record: dict[str, Any]) -> None:
        record = {**record, **self.common, "loadavg_1m": round(os.getloadavg()[0], 2)}
        line = json.dumps(record, sort_keys=False)
        print(line, flush=True)
        if self.out is not None:
            with self.out.open("a") as fh:
                fh.write(line + "\n")
        self.records.append(record)


def git_info() -> dict[str, Any]:
    """The commit, and the state of balsam_core in the working tree (others edit it)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
            ).stdout
        except OSError:
            return ""

    status = git("status", "--porcelain", "--", "balsam_core").splitlines()
    diff = git("diff", "HEAD", "--", "balsam_core")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "balsam_core")
    for path in untracked.split():
        try:
            diff += (REPO / path).read_text(errors="replace")
        except OSError:
            pass
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "balsam_core_dirty": [line[3:] for line in status],
        "balsam_core_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, list[float], Any]:
    """Median of *repeat* timed calls after one warm-up; also the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


# ---------------------------------------------------------------------- phases


def new_site(backend: Backend, base: Path, label: str) -> Site:
    site_dir = base / f"{backend.name}-{label}"
    if site_dir.exists():
        shutil.rmtree(site_dir)
    site = Site.init(site_dir, database=backend.new_database(label))
    site.add_app(APP_NAME, APP_COMMAND)
    return site


def bench_bulk_insert(
    backend: Backend, base: Path, n: int, chunk: int, report: Report, baseline: bool
) -> Site:
    site = new_site(backend, base, "api")
    log(f"{backend.name}: bulk insert of {n} tasks through Site.add_tasks, chunks of {chunk}")
    api_seconds = 0.0
    build_seconds = 0.0
    chunk_rates = []
    for start in range(0, n, chunk):
        t0 = time.perf_counter()
        specs = [make_spec(i) for i in range(start, min(start + chunk, n))]
        t1 = time.perf_counter()
        ids = site.add_tasks(specs)
        t2 = time.perf_counter()
        assert len(ids) == len(specs)
        build_seconds += t1 - t0
        api_seconds += t2 - t1
        chunk_rates.append(round(len(specs) / (t2 - t1)))
        log(f"  {start + len(specs):>9} tasks  chunk {len(specs) / (t2 - t1):>9.0f} tasks/s")
        del specs, ids
    api_rate = n / api_seconds
    log(f"{backend.name}: API {api_seconds:.2f} s = {api_rate:.0f} tasks/s "
        f"(+ {build_seconds:.2f} s building the spec dicts, not counted)")

    record: dict[str, Any] = {
        "bench": "bulk_insert", "backend": backend.name, "tasks": n,
        "seconds": round(api_seconds, 3), "tasks_per_s": round(api_rate),
        "chunk": chunk, "chunk_tasks_per_s": chunk_rates,
        "spec_build_seconds": round(build_seconds, 3),
    }
    extra_records: list[dict[str, Any]] = []
    if baseline:
        raw_site = new_site(backend, base, "raw")
        app_id = raw_site.app(APP_NAME).id
        log(f"{backend.name}: building {n} raw rows (task, tag, event tuples) ...")
        columns, tasks, tags, events = raw_rows(n, app_id, time.time())
        ev_cols = "task_id, time, from_state, to_state, message, launcher_id, batch_job_id"
        m = backend.marker
        statements = [
            ("task", f"INSERT INTO task ({', '.join(columns)}) "
                     f"VALUES ({', '.join([m] * len(columns))})", tasks),
            ("task_tag", f"INSERT INTO task_tag (task_id, key, value) VALUES ({m}, {m}, {m})", tags),
            ("task_event", f"INSERT INTO task_event ({ev_cols}) VALUES ({', '.join([m] * 7)})",
             events),
        ]
        conn = backend.connect(raw_site, autocommit=False)
        log(f"{backend.name}: raw executemany of {len(tasks)} task + {len(tags)} tag + "
            f"{len(events)} event rows ...")
        by_table = {}
        t0 = time.perf_counter()
        if backend.name == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
        cur = conn.cursor()
        for table, sql, rows in statements:
            ts = time.perf_counter()
            cur.executemany(sql, rows)
            by_table[table] = round(time.perf_counter() - ts, 3)
        tc = time.perf_counter()
        conn.commit() if backend.name != "sqlite" else conn.execute("COMMIT")
        by_table["commit"] = round(time.perf_counter() - tc, 3)
        raw_seconds = time.perf_counter() - t0
        raw_rate = n / raw_seconds
        log(f"{backend.name}: raw {raw_seconds:.2f} s = {raw_rate:.0f} tasks/s {by_table}")
        check_same_rows(backend, site, conn, n)
        conn.close()
        raw_site.db.dispose()
        if backend.name == "postgresql":
            extra_records.append(
                copy_floor(backend, base, n, raw_rate, columns, tasks, tags, events)
            )
        del tasks, tags, events
        if backend.name == "sqlite":
            shutil.rmtree(raw_site.site_dir, ignore_errors=True)
        record.update(
            baseline="raw driver: one executemany per table (task, task_tag, task_event) "
                     "of pre-built tuples, one transaction, fresh site database",
            baseline_seconds=round(raw_seconds, 3), baseline_tasks_per_s=round(raw_rate),
            baseline_seconds_by_table=by_table,
            ratio=round(api_rate / raw_rate, 3), ratio_def="tasks_per_s / baseline_tasks_per_s",
        )
    record.update(
        target=f">= {TARGET_INSERT_TASKS_PER_S:.0f} tasks/s",
        target_met=api_rate >= TARGET_INSERT_TASKS_PER_S,
    )
    report.emit(record)
    for extra in extra_records:
        report.emit(extra)
    return site


def copy_floor(
    backend: Backend, base: Path, n: int, executemany_rate: float, columns: list[str],
    tasks: list[tuple], tags: list[tuple], events: list[tuple],
) -> dict[str, Any]:
    """PostgreSQL only: the same rows through COPY, the fastest way in (for reference)."""
    site = new_site(backend, base, "copy")
    conn = backend.connect(site, autocommit=False)
    ev_cols = "task_id, time, from_state, to_state, message, launcher_id, batch_job_id"
    log(f"{backend.name}: COPY of the same rows ...")
    by_table = {}
    t0 = time.perf_counter()
    cur = conn.cursor()
    for table, cols, rows in (("task", ", ".join(columns), tasks),
                              ("task_tag", "task_id, key, value", tags),
                              ("task_event", ev_cols, events)):
        ts = time.perf_counter()
        with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        by_table[table] = round(time.perf_counter() - ts, 3)
    tc = time.perf_counter()
    conn.commit()
    by_table["commit"] = round(time.perf_counter() - tc, 3)
    seconds = time.perf_counter() - t0
    conn.close()
    site.db.dispose()
    rate = n / seconds
    log(f"{backend.name}: COPY {seconds:.2f} s = {rate:.0f} tasks/s {by_table}")
    return {
        "bench": "driver_copy", "backend": backend.name, "tasks": n,
        "seconds": round(seconds, 3), "tasks_per_s": round(rate), "seconds_by_table": by_table,
        "note": "reference, not the API: the same task, tag and event rows via COPY FROM STDIN",
        "baseline": "raw driver executemany (the bulk_insert baseline of this run)",
        "baseline_tasks_per_s": round(executemany_rate),
        "ratio": round(rate / executemany_rate, 3), "ratio_def": "tasks_per_s / baseline_tasks_per_s",
        "target": f">= {TARGET_INSERT_TASKS_PER_S:.0f} tasks/s",
        "target_met": rate >= TARGET_INSERT_TASKS_PER_S,
    }


def check_same_rows(backend: Backend, site: Site, raw_conn: Any, n: int) -> None:
    """Warn (stderr) unless the raw baseline wrote the same rows as the API."""
    api_conn = backend.connect(site)
    skip = {"state_time", "created"}
    columns = [c.name for c in Task.__table__.columns]
    keep = [i for i, c in enumerate(columns) if c not in skip]
    m = backend.marker
    problems = []
    for task_id in sorted({1, (n + 1) // 2, n}):
        rows = []
        for conn in (api_conn, raw_conn):
            cur = conn.cursor()
            cur.execute(f"SELECT {', '.join(columns)} FROM task WHERE id = {m}", (task_id,))
            row = cur.fetchone()
            cur.execute(f"SELECT key, value FROM task_tag WHERE task_id = {m} ORDER BY key",
                        (task_id,))
            tags = cur.fetchall()
            cur.execute(f"SELECT from_state, to_state, message FROM task_event "
                        f"WHERE task_id = {m}", (task_id,))
            rows.append(([row[i] for i in keep] if row else None, tags, cur.fetchall()))
        if rows[0] != rows[1]:
            problems.append(f"task {task_id}: api {rows[0]} != raw {rows[1]}")
    for table in ("task", "task_tag", "task_event"):
        counts = []
        for conn in (api_conn, raw_conn):
            cur = conn.cursor()
            cur.execute(f"SELECT count(*) FROM {table}")
            counts.append(cur.fetchone()[0])
        if counts[0] != counts[1]:
            problems.append(f"{table}: api {counts[0]} rows != raw {counts[1]}")
    api_conn.close()
    if problems:
        log("WARNING: the raw baseline did not write the same rows as the API:")
        for p in problems:
            log("  " + p)
    else:
        log("check: raw baseline rows == API rows (sampled tasks, tags, events; row counts)")


def prepare_states(backend: Backend, site: Site) -> dict[str, int]:
    """Move tasks to a realistic mix of states with SQL UPDATEs; return the counts."""
    conn = backend.connect(site, autocommit=True)
    cases = " ".join(f"WHEN {HASH_SQL} < {bound} THEN '{state}'" for state, bound in STATE_MIX)
    sql = f"UPDATE task SET state = CASE {cases} END WHERE {HASH_SQL} < {STATE_MIX[-1][1]}"
    t0 = time.perf_counter()
    conn.execute(sql)
    log(f"{backend.name}: state UPDATE in {time.perf_counter() - t0:.1f} s")
    backend.after_prepare(conn)
    cur = conn.cursor()
    cur.execute("SELECT state, count(*) FROM task GROUP BY state ORDER BY state")
    counts = {s: c for s, c in cur.fetchall()}
    conn.close()
    log(f"{backend.name}: states {counts}")
    return counts


def page_sql(backend: Backend) -> str:
    """The matching ids, last first (to pick the deep-page ``after_id``)."""
    m = backend.marker
    return (
        f"SELECT id FROM task WHERE state = {m} AND workflow = {m} AND EXISTS "
        f"(SELECT 1 FROM task_tag WHERE task_tag.task_id = task.id AND key = {m} "
        f"AND value = {m}) ORDER BY id DESC"
    )


class Captured:
    """The SQL statements an API call sends, to replay the first one on a raw connection."""

    def __init__(self, site: Site, fn: Callable[[], Any]) -> None:
        self.statements: list[tuple[str, Any]] = []

        def hook(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
            if statement.strip().upper() not in ("BEGIN", "BEGIN IMMEDIATE"):
                self.statements.append((statement, parameters))

        sa_event.listen(site.db.engine, "before_cursor_execute", hook)
        try:
            fn()
        finally:
            sa_event.remove(site.db.engine, "before_cursor_execute", hook)
        if not self.statements:
            raise RuntimeError("the API call sent no SQL")

    @property
    def sql(self) -> str:
        return " ".join(self.statements[0][0].split())

    @property
    def params(self) -> Any:
        params = self.statements[0][1]
        return dict(params) if isinstance(params, dict) else list(params)


def bench_queries(
    backend: Backend, site_dir: Path, n: int, repeat: int, report: Report, states: dict[str, int]
) -> None:
    site = Site.open(site_dir)
    raw = backend.connect(site, autocommit=True)

    def raw_query(sql: str, params: Any, conn: Any = None) -> list[Any]:
        cur = (conn or raw).cursor()
        cur.execute(sql, params)
        return cur.fetchall()

    # The id after which only the last ~2.5 pages of matches remain.
    last = raw_query(page_sql(backend), [QUERY_STATE, QUERY_WORKFLOW, *QUERY_TAG])
    after_id = last[min(len(last) - 1, PAGE * 5 // 2)][0] if last else 0
    matches = len(last)
    log(f"{backend.name}: {matches} tasks match the page filter; deep pages after id {after_id}")
    tags = {QUERY_TAG[0]: QUERY_TAG[1]}
    page_filter = {"state": QUERY_STATE, "workflow": QUERY_WORKFLOW, "tags": tags, "limit": PAGE}
    common = {
        "backend": backend.name, "tasks": n, "repeat": repeat, "stat": "median",
        "filter": page_filter, "matching_tasks": matches, "states": states,
    }

    def compare(bench: str, api_fn: Callable[[], Any], raw_fn: Callable[[], Any],
                baseline: str, target: bool, extra: dict[str, Any] | None = None,
                count_rows: Callable[[Any], int] = len, statements: int | None = None) -> None:
        log(f"{backend.name}: {bench} ...")
        api_s, api_times, api_res = median_time(api_fn, repeat)
        raw_s, raw_times, raw_res = median_time(raw_fn, repeat)
        record = {
            "bench": bench, **common, **(extra or {}),
            "seconds": round(api_s, 5), "times": [round(t, 5) for t in api_times],
            "rows": count_rows(api_res), "api_sql_statements": statements,
            "baseline": baseline, "baseline_seconds": round(raw_s, 5),
            "baseline_times": [round(t, 5) for t in raw_times],
            "baseline_rows": count_rows(raw_res),
            "ratio": round(api_s / raw_s, 2) if raw_s else None,
            "ratio_def": "seconds / baseline_seconds",
            "target": f"< {TARGET_PAGE_SECONDS} s" if target else None,
            "target_met": (api_s < TARGET_PAGE_SECONDS) if target else None,
        }
        if record["rows"] != record["baseline_rows"]:
            log(f"WARNING: {bench}: API returned {record['rows']} rows, "
                f"raw {record['baseline_rows']}")
        log(f"{backend.name}: {bench}: {api_s * 1000:.1f} ms (raw {raw_s * 1000:.1f} ms, "
            f"x{record['ratio']}, API sent {statements} SQL statements)")
        report.emit(record)

    def api_vs_same_sql(bench: str, api_fn: Callable[[], Any], target: bool,
                        extra: dict[str, Any] | None = None,
                        count_rows: Callable[[Any], int] = len) -> Captured:
        captured = Captured(site, api_fn)  # also the warm-up of the API call
        sql, params = captured.sql, captured.params
        compare(bench, api_fn, lambda: raw_query(sql, params),
                "the API's own main SELECT replayed on an open raw driver connection",
                target, {**(extra or {}), "baseline_sql": sql, "baseline_params": params},
                count_rows, statements=len(captured.statements))
        return captured

    page = api_vs_same_sql(
        "tasks_page",
        lambda: site.tasks(state=QUERY_STATE, workflow=QUERY_WORKFLOW, tags=tags, limit=PAGE),
        target=True,
    )
    api_vs_same_sql(
        "tasks_page_deep",
        lambda: site.tasks(state=QUERY_STATE, workflow=QUERY_WORKFLOW, tags=tags,
                           after_id=after_id, limit=PAGE),
        target=True, extra={"after_id": after_id, "filter": {**page_filter, "after_id": after_id}},
    )
    nomatch = {QUERY_TAG[0]: "c99"}
    api_vs_same_sql(
        "tasks_page_tag_nomatch",
        lambda: site.tasks(tags=nomatch, limit=PAGE),
        target=True, extra={"filter": {"tags": nomatch, "limit": PAGE}, "matching_tasks": 0},
    )
    api_vs_same_sql(
        "count",
        lambda: site.count(workflow=QUERY_WORKFLOW),
        target=False, extra={"filter": {"workflow": QUERY_WORKFLOW}},
        count_rows=lambda res: sum(dict(res).values()) if res else 0,
    )

    # The whole `balsam task ls` command, in-process (click's CliRunner) ...
    from click.testing import CliRunner

    from balsam_core.cli import cli

    args = ["--site", str(site_dir), "task", "ls", "--state", QUERY_STATE,
            "--workflow", QUERY_WORKFLOW, "--tag", "=".join(QUERY_TAG), "--limit", str(PAGE)]
    runner = CliRunner()
    sql, params = page.sql, page.params

    def cli_inprocess() -> list[str]:
        result = runner.invoke(cli, args)
        if result.exit_code != 0:
            raise RuntimeError(f"balsam task ls failed ({result.exit_code}): {result.output}")
        return [line for line in result.stdout.splitlines()[1:] if line.strip()]

    def raw_connect_query() -> list[Any]:
        conn = backend.connect(site, autocommit=True)
        try:
            return raw_query(sql, params, conn)
        finally:
            conn.close()

    command = "balsam " + " ".join(args)
    compare(
        "cli_ls_inprocess", cli_inprocess, raw_connect_query,
        "raw driver: connect, the API's page SELECT (as tasks_page), close; in-process",
        target=True, extra={"command": command, "baseline_sql": sql},
    )

    # ... and as a subprocess (interpreter start-up and imports included).
    script = Path(sys.executable).parent / "balsam"
    argv = [str(script)] if script.exists() else [
        sys.executable, "-c", "from balsam_core.cli import main; main()"]
    src, src_args = backend.raw_script(site)

    def cli_subprocess() -> list[str]:
        proc = subprocess.run([*argv, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"balsam task ls failed ({proc.returncode}): {proc.stderr}")
        return [line for line in proc.stdout.splitlines()[1:] if line.strip()]

    def raw_subprocess() -> list[Any]:
        proc = subprocess.run(
            [sys.executable, "-c", src, *src_args, sql, json.dumps(params)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"raw query subprocess failed: {proc.stderr}")
        return [None] * int(proc.stdout.strip())

    python_only, _, _ = median_time(
        lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), repeat
    )
    compare(
        "cli_ls_subprocess", cli_subprocess, raw_subprocess,
        f"subprocess: {Path(sys.executable).name} -c '<import {backend.name} driver, connect, "
        "the API's page SELECT>'", target=True,
        extra={"command": command, "baseline_sql": sql,
               "python_startup_seconds": round(python_only, 4)},
    )
    raw.close()
    site.db.dispose()


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000, help="tasks to insert (1M)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--chunk", type=int, default=100_000, help="specs per add_tasks call")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query (median)")
    parser.add_argument("--workdir", type=Path, help="where sites go (default: a new dir in /tmp)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw insert baseline")
    parser.add_argument("--no-queries", action="store_true", help="only measure the insert")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite sites")
    opts = parser.parse_args(argv)
    if opts.tasks < 1 or opts.chunk < 1 or opts.repeat < 1:
        parser.error("--tasks, --chunk and --repeat must be >= 1")

    base = opts.workdir or Path(tempfile.mkdtemp(prefix="balsam-bench-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    backends = ["sqlite", "postgresql"] if opts.backend == "both" else [opts.backend]
    info = git_info()
    common = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": info["commit"], "balsam_core_dirty": info["balsam_core_dirty"],
        "balsam_core_diff_sha1": info["balsam_core_diff_sha1"],
        "python": platform.python_version(), "sqlalchemy": sqlalchemy.__version__,
        "cpus": os.cpu_count(),
    }
    log(f"sites under {base}; commit {info['commit']}"
        + (f" (balsam_core modified: {info['balsam_core_dirty']})"
           if info["balsam_core_dirty"] else ""))
    for name in backends:
        backend: Backend = (
            SqliteBackend() if name == "sqlite" else PostgresBackend(base_dir=None)
        )
        try:
            report = Report(opts.out, {**common, "versions": backend.versions()})
            site = bench_bulk_insert(
                backend, base, opts.tasks, min(opts.chunk, opts.tasks), report,
                baseline=not opts.no_baseline,
            )
            site_dir = site.site_dir
            if not opts.no_queries:
                states = prepare_states(backend, site)
                site.db.dispose()
                bench_queries(backend, site_dir, opts.tasks, opts.repeat, report, states)
            site.db.dispose()
        finally:
            backend.close()  # the PostgreSQL server (and its data) never outlives the run
    if not opts.keep and opts.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    elif opts.keep:
        log(f"kept the sites under {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
