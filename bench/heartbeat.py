"""A launcher's heartbeat, lease expiry and loss, against the number of tasks it holds.

    python bench/heartbeat.py [--held 1 1000 16000 64000] [--backend sqlite|postgresql|both]

A launcher spanning 1,000 nodes of 64 CPUs holds 64,000 leased tasks.  Every
``heartbeat_s`` its loop thread calls the task source's ``heartbeat`` (renew its
leases, read its killed tasks) and ``expire_leases`` (reclaim what lost launchers
left).  For each count: a site (SQLite in a temporary directory, or a database on a
throwaway PostgreSQL server, tests/harness/postgres.py), that many tasks leased to one
launcher through the ``database`` task source, then each call timed (median of
``--repeat``, each a committed transaction, nothing to reclaim).

Baseline, measured in the same run on the same database: the heartbeat as it was
before leases lasted as long as their launcher's heartbeat (``cc16fa7`` and earlier):
in one write transaction, the launcher's row, every held task's lease renewed
(``UPDATE task SET lease_expires = ? WHERE lease_launcher_id = ?``) and the killed
query over the held tasks.  ``ratio`` = heartbeat / baseline.

Then the launcher is lost with all of them RUNNING (its heartbeat aged past
``lease_s``), and ``expire_leases`` is called until it returns 0, as a launcher's loop
does, a turn per call: the longest call is how long that loop stalled.  Baseline, in
the same run: the same tasks (retried, leased to a second launcher, RUNNING, lost)
reclaimed in one call, as before ``RECLAIM_BATCH`` (``reclaim_ratio`` = longest call /
baseline).  One JSON line per backend and count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("BALSAM_DISABLE_PLUGIN_AUTOLOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import update  # noqa: E402

from balsam_core import LauncherInfo, NodeResources, RawSql, State, StateUpdate  # noqa: E402
from balsam_core.api import Site  # noqa: E402
from balsam_core.builtin import database_source  # noqa: E402
from balsam_core.models import Launcher  # noqa: E402

#: The heartbeat before this change, statement for statement.
_OLD_BEAT = "UPDATE launcher SET heartbeat = ? WHERE id = ?"
_OLD_RENEW = "UPDATE task SET lease_expires = ? WHERE lease_launcher_id = ?"
_OLD_KILLED = "SELECT id FROM task WHERE lease_launcher_id = ? AND state = ?"


def median_ms(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 3)


@contextmanager
def databases(backend: str) -> Iterator[Callable[[str], str]]:
    """Yields a function giving a fresh database URL per label."""
    if backend == "sqlite":
        yield lambda label: "sqlite:///balsam.db"
        return
    from tests.harness.postgres import PostgresServer

    with PostgresServer() as server:
        yield lambda label: server.create_database(f"hb_{label}")


def lease_all(source: Any, held: int) -> tuple[int, list[int]]:
    """A new launcher holding *held* tasks; its id and theirs."""
    launcher_id = source.register(LauncherInfo("bench", os.getpid()))
    # Room for every task at once: one 64-CPU node per 64 tasks.
    room = [NodeResources(f"n{i}", 64) for i in range(held // 64 + 1)]
    ids: list[int] = []
    while len(ids) < held:
        ids += [t.task_id for t in source.lease(launcher_id, room, 5000)]
    return launcher_id, ids


def settle(site: Site) -> None:
    if site.db.url.get_backend_name() == "postgresql":
        # Plans as after autovacuum's pass over a table whose rows were all just updated.
        autocommit = site.db.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")


def measure_heartbeat(site: Site, source: Any, launcher_id: int, repeat: int) -> dict:
    def old_heartbeat() -> None:
        with site.db.session(write=True) as s:
            raw = RawSql(s)
            now = time.time()
            raw.execute(_OLD_BEAT, [now, launcher_id])
            raw.execute(_OLD_RENEW, [now + 60.0, launcher_id])
            raw.execute(_OLD_KILLED, [launcher_id, "USER_KILLED"]).fetchall()

    heartbeat = median_ms(lambda: source.heartbeat(launcher_id), repeat)
    expire = median_ms(lambda: source.expire_leases(time.time()), repeat)
    baseline = median_ms(old_heartbeat, repeat)
    return {
        "heartbeat_ms": heartbeat,
        "expire_leases_ms": expire,
        "baseline_heartbeat_ms": baseline,
        "ratio": round(heartbeat / baseline, 4),
    }


def lose(site: Site, source: Any, launcher_id: int, ids: list[int]) -> None:
    """All of *ids* RUNNING, then their launcher lost (no heartbeat for ``lease_s``)."""
    for i in range(0, len(ids), 5000):
        source.report(launcher_id, [StateUpdate(t, State.RUNNING) for t in ids[i : i + 5000]])
    lost_since = time.time() - site.config.launcher.lease_s - 1
    with site.db.session(write=True) as s:
        s.execute(update(Launcher).where(Launcher.id == launcher_id).values(heartbeat=lost_since))
    settle(site)


def measure_reclaim(site: Site, source: Any, launcher_id: int, ids: list[int]) -> dict:
    lose(site, source, launcher_id, ids)
    calls = []
    while True:
        t0 = time.perf_counter()
        reclaimed = source.expire_leases(time.time())
        calls.append(time.perf_counter() - t0)
        if not reclaimed:
            break
    # Baseline: the same tasks again, reclaimed in one call.
    site.retry(ids)
    again, ids = lease_all(source, len(ids))
    lose(site, source, again, ids)
    batch, database_source.RECLAIM_BATCH = database_source.RECLAIM_BATCH, len(ids)
    try:
        t0 = time.perf_counter()
        source.expire_leases(time.time())
        baseline = time.perf_counter() - t0
    finally:
        database_source.RECLAIM_BATCH = batch
    return {
        "reclaim_calls": len(calls),
        "reclaim_call_ms_median": round(1e3 * statistics.median(calls), 1),
        "reclaim_call_ms_max": round(1e3 * max(calls), 1),
        "reclaim_total_s": round(sum(calls), 3),
        "baseline_reclaim_s": round(baseline, 3),
        "reclaim_ratio": round(max(calls) / baseline, 4),
    }


def measure(site: Site, held: int, repeat: int) -> dict[str, object]:
    source = site.selected("task_source")
    launcher_id, ids = lease_all(source, held)
    settle(site)
    return {
        "held": held,
        **measure_heartbeat(site, source, launcher_id, repeat),
        **measure_reclaim(site, source, launcher_id, ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held", type=int, nargs="+", default=[1, 1000, 16000, 64000])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    for backend in backends:
        with databases(backend) as new_database:
            for held in args.held:
                root = Path(tempfile.mkdtemp(prefix="balsam-hb-"))
                try:
                    site = Site.init(root / "site", database=new_database(str(held)))
                    site.add_tasks([{"command": ["true"]}] * held)
                    result = measure(site, held, args.repeat)
                    site.db.dispose()
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                print(json.dumps({"backend": backend, **result}), flush=True)


if __name__ == "__main__":
    main()
