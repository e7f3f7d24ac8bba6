"""Lease-and-complete throughput of 1, 2 and 4 launchers sharing one PostgreSQL database.

    python bench/lease_scaling.py [--launchers 1,2,4] [--tasks-per-launcher 500]
                                  [--slots 32] [--sleep 0.5]

For each launcher count n: a throw-away PostgreSQL server (tests/harness/postgres.py,
one database per run), a site with ``cpus_per_node = --slots``; n real ``balsam
launcher`` processes start on the empty site and register; then ``n x
--tasks-per-launcher`` tasks ``sleep --sleep`` (each a 1/--slots share of a node) are
committed READY in one transaction (nothing to stage or preprocess: the launchers'
leases move them on), and the clock runs from that commit to the last JOB_FINISHED
event.  ``sleep`` tasks with many slots keep the CPU
mostly idle, so the figure is the coordination (lease, start, report, postprocess
fast-forward, on one database) rather than this 2-core machine's fork rate; the ideal
is ``n x slots / sleep`` tasks/s.  Afterwards every task must have exactly one run
(one RUNNING event) and be JOB_FINISHED.

Prints one JSON line per launcher count and a final line with the 4-vs-1 ratio of
tasks/s (target >= 3).  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BALSAM_DISABLE_PLUGIN_AUTOLOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select  # noqa: E402

from balsam_core.api import Site  # noqa: E402
from balsam_core.models import Launcher, Task, TaskEvent  # noqa: E402
from tests.harness.postgres import PostgresServer  # noqa: E402
from tests.harness.sites import set_config  # noqa: E402

BALSAM = shutil.which("balsam", path=str(Path(sys.executable).parent)) or "balsam"


def count(site: Site, query: object) -> int:
    with site.db.session() as s:
        return int(s.scalar(query) or 0)  # type: ignore[arg-type]


def run(server: PostgresServer, root: Path, n: int, args: argparse.Namespace) -> dict:
    """One measurement with *n* launchers (see the module docstring)."""
    name = f"lease_scaling_{n}_{os.getpid()}"
    url = server.create_database(name)
    site_dir = root / f"site{n}"
    Site.init(site_dir, database=url).db.dispose()
    set_config(site_dir, cpus_per_node=args.slots)
    site = Site.open(site_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SITE", "BALSAM_TASK_ID")}
    logs = [open(root / f"launcher{n}-{i}.log", "wb") for i in range(n)]
    procs = [
        subprocess.Popen([BALSAM, "--site", str(site_dir), "launcher"], env=env,
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for log in logs
    ]
    try:
        deadline = time.time() + 120
        while count(site, select(func.count()).select_from(Launcher)) < n:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"launchers did not start; see {root}")
            time.sleep(0.1)
        time.sleep(1.0)  # let them reach their idle loop (imports, processing worker)
        tasks = n * args.tasks_per_launcher
        # READY, in one transaction: with nothing to stage or preprocess, the launchers'
        # leases take them straight on (moving them runnable in a second transaction
        # raced with those leases).
        site.add_tasks(
            [{"command": ["sleep", str(args.sleep)], "node_packing_count": args.slots}] * tasks
        )
        started = time.time()
        print(f"{n} launcher(s): {tasks} x sleep {args.sleep} on {n} x {args.slots} slots",
              file=sys.stderr)
        done_query = select(func.count()).select_from(Task).where(Task.state == "JOB_FINISHED")
        deadline = time.time() + 30 + 4 * tasks * args.sleep / (n * args.slots)
        while count(site, done_query) < tasks:
            if time.time() > deadline:
                raise SystemExit(f"not finished in time: {site.count()}; see {root}")
            time.sleep(0.2)
        with site.db.session() as s:
            end = s.scalar(
                select(func.max(TaskEvent.time)).where(TaskEvent.to_state == "JOB_FINISHED")
            )
            runs = s.scalar(
                select(func.count()).select_from(TaskEvent).where(TaskEvent.to_state == "RUNNING")
            )
            per_launcher = dict(
                s.execute(
                    select(TaskEvent.launcher_id, func.count())
                    .where(TaskEvent.to_state == "RUNNING")
                    .group_by(TaskEvent.launcher_id)
                ).all()
            )
        if runs != tasks:
            raise SystemExit(f"{runs} runs for {tasks} tasks: not exactly once; see {root}")
        seconds = end - started
        rate = tasks / seconds
        ideal = n * args.slots / args.sleep
        return {
            "bench": "lease_scaling", "backend": "postgresql", "launchers": n,
            "tasks": tasks, "slots_per_launcher": args.slots, "task": f"sleep {args.sleep}",
            "seconds": round(seconds, 3), "tasks_per_s": round(rate, 1),
            "ideal_tasks_per_s": round(ideal, 1), "efficiency": round(rate / ideal, 3),
            "runs_per_launcher": sorted(per_launcher.values()),
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        site.db.dispose()
        server.drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launchers", default="1,2,4")
    parser.add_argument("--tasks-per-launcher", type=int, default=500)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--sleep", type=float, default=0.5)
    args = parser.parse_args()
    counts = [int(c) for c in args.launchers.split(",")]
    common = {"python": platform.python_version(), "cpus": os.cpu_count()}
    root = Path(tempfile.mkdtemp(prefix="balsam-lease-scaling-"))
    rates: dict[int, float] = {}
    try:
        with PostgresServer() as server:
            for n in counts:
                result = run(server, root, n, args)
                rates[n] = result["tasks_per_s"]
                print(json.dumps({**result, "loadavg_1m": os.getloadavg()[0], **common}),
                      flush=True)
        if 1 in rates and 4 in rates:
            ratio = rates[4] / rates[1]
            print(json.dumps({
                "bench": "lease_scaling_ratio", "ratio_4_vs_1": round(ratio, 2),
                "tasks_per_s_1": rates[1], "tasks_per_s_4": rates[4], "target": 3.0,
                "target_met": ratio >= 3.0, **common,
            }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
