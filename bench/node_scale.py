"""The launcher's start path and a lease's fitting, against the allocation's size.

    python bench/node_scale.py [--nodes 100 1000 4000] [--cpus-per-node 64] [--starts 400]

A launcher spans every node of its batch job.  With serial tasks packed on all of them
(``node_packing_count`` = the node's CPUs) and every slot busy, each exit frees one
slot and the loop refills it: the exit's release, the placement of the head of its
queue (the configured packing strategy, given every node, busy ones with nothing
free), the booking, and the turn's check whether to lease more.  That is what is
timed here, through the launcher's own methods (``Launcher._start_placed`` and
``_wants_lease``, with ``_start`` replaced by a stub: the exec is not what is measured).
Also timed: ``fitting``, which the ``database`` task source runs inside its lease
transaction, on 512 rows and the room the launcher asks a lease for (every node of
the allocation, busy ones with nothing free, then room ahead).

Baselines, measured in the same run: for a start, the same work on a one-node
allocation of the same node size (``ratio`` = cost at N nodes / cost at one node; 1.0:
the cost does not grow with the allocation); for ``fitting``, the same rows into the
same room without the busy nodes listed (``fitting_ratio``).  One JSON line per
strategy and node count.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import timeit
from pathlib import Path

os.environ.setdefault("BALSAM_DISABLE_PLUGIN_AUTOLOAD", "1")

from balsam_core.api import Site  # noqa: E402
from balsam_core.builtin.database_source import fitting  # noqa: E402
from balsam_core.builtin.packing import BestFitPacking, FifoPacking  # noqa: E402
from balsam_core.launcher.pilot import Launcher, LauncherOptions  # noqa: E402
from balsam_core.plugin_types import (  # noqa: E402
    LeasedTask,
    NodeSpec,
    Placement,
    StateUpdate,
    TaskRequirements,
)
from balsam_core.states import State  # noqa: E402

STRATEGIES = {"fifo": FifoPacking, "best-fit": BestFitPacking}
#: The columns ``fitting`` reads of a lease's row.
_Row = collections.namedtuple(
    "_Row", "id num_nodes ranks_per_node threads_per_rank gpus_per_rank node_packing_count"
    " wall_time_min state_time",
)


class Allocation:
    """A launcher on *nodes* x *cpus* with every slot busy, ``_start`` stubbed."""

    def __init__(self, site: Site, strategy: str, nodes: int, cpus: int, seed: int) -> None:
        specs = tuple(NodeSpec(f"node{i:05d}", cpus) for i in range(nodes))
        self.launcher = Launcher(
            site, LauncherOptions(nodes=specs), packing=STRATEGIES[strategy](), processing=False
        )
        self.launcher._start = self._started  # type: ignore[method-assign]
        self.cpus = cpus
        self.ids = itertools.count(1)
        self.running: list[int] = []
        self.rng = random.Random(seed)
        pool = self.launcher.pool
        for spec in specs:  # booked directly: the fill is not what is measured
            for _ in range(cpus):
                req = self.requirements()
                pool.take(Placement(req.task_id, (spec.name,)), req)
                self.running.append(req.task_id)

    def requirements(self) -> TaskRequirements:
        return TaskRequirements(next(self.ids), node_packing_count=self.cpus, ready_since=0.0)

    def queue(self, count: int) -> None:
        """Put *count* more tasks in the launcher's queue (as a lease would)."""
        for _ in range(count):
            req = self.requirements()
            self.launcher.queue[req.task_id] = LeasedTask(
                req.task_id, "t", "wf", ("true",), "wf/t", {}, req, State.PREPROCESSED
            )

    def _started(self, task: LeasedTask, *_: object) -> list[StateUpdate]:
        self.running.append(task.task_id)
        return []

    def turn(self, now: float) -> float:
        """One exit and what the loop does about it; returns the seconds that took.  The
        queue is then topped up as the launcher's lease policy asks (untimed: a lease
        comes from another thread)."""
        victim = self.running.pop(self.rng.randrange(len(self.running)))
        began = time.perf_counter()
        self.launcher.pool.release(victim)
        self.launcher._start_placed(now)
        wants_lease = self.launcher._wants_lease(now)
        took = time.perf_counter() - began
        if wants_lease:
            self.queue(self.launcher._lease_request(now)[1])
        return took

    def per_start_us(self, starts: int) -> float:
        now = time.time()
        for _ in range(10):  # the first brings the pool's records up to date after the fill
            self.turn(now)
        return sum(self.turn(now) for _ in range(starts)) / starts * 1e6

    def fitting_ms(self, rows: int = 512) -> tuple[float, float]:
        """A lease's ``fitting`` of *rows* serial tasks into the room the launcher asks
        for (every node, busy ones too, and room ahead), and into that room without the
        busy nodes: ms per lease, best of 5 each."""
        free, _ = self.launcher._lease_request(time.time())
        room = [n for n in free if n.cpus > 0]
        lease = [_Row(i, 1, 1, 1, 0, self.cpus, 0.0, 0.0) for i in range(rows)]
        return tuple(  # type: ignore[return-value]
            min(timeit.repeat(lambda: fitting(lease, nodes), number=1, repeat=5)) * 1e3
            for nodes in (free, room)
        )


def measure(site: Site, strategy: str, nodes: int, cpus: int, starts: int) -> dict[str, float]:
    """µs per start, and ms per lease's fitting with and without the busy nodes:
    medians over three allocations."""
    samples = [Allocation(site, strategy, nodes, cpus, seed) for seed in range(3)]
    start_us = statistics.median(a.per_start_us(starts) for a in samples)
    fits = [a.fitting_ms() for a in samples]
    for a in samples:
        a.launcher.procs.close()
    return {
        "us_per_start": round(start_us, 1),
        "fitting_ms": round(statistics.median(f[0] for f in fits), 3),
        "fitting_ms_room_only": round(statistics.median(f[1] for f in fits), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--cpus-per-node", type=int, default=64)
    parser.add_argument("--starts", type=int, default=400, help="timed starts per allocation")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="balsam-node-scale-"))
    site = Site.init(root / "site")  # no task is written: the launchers never run
    try:
        for strategy in STRATEGIES:
            base = measure(site, strategy, 1, args.cpus_per_node, args.starts)["us_per_start"]
            for nodes in args.nodes:
                got = measure(site, strategy, nodes, args.cpus_per_node, args.starts)
                print(json.dumps({
                    "bench": "node_scale", "strategy": strategy, "nodes": nodes,
                    "cpus_per_node": args.cpus_per_node, "slots": nodes * args.cpus_per_node,
                    **got, "baseline": "the same on one node", "baseline_us_per_start": base,
                    "ratio": round(got["us_per_start"] / base, 2),
                    "fitting_ratio": round(got["fitting_ms"] / got["fitting_ms_room_only"], 2),
                }), flush=True)
    finally:
        site.db.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
