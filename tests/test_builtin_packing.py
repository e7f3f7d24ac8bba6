"""The built-in packing strategies ``fifo`` and ``best-fit``: pure, no processes, no DB."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytest

from balsam_core import (
    ActiveJob,
    BackfillWindow,
    BatchJobState,
    JobRequest,
    NodeResources,
    PackingStrategy,
    PackingStrategyPlugin,
    Placement,
    PluginContext,
    QueuePolicy,
    TaskRequirements,
)
from balsam_core.builtin import packing
from balsam_core.config import from_dict

NOW = 1_000_000.0
STRATEGIES = ["fifo", "best-fit"]


def make(name: str, **settings: float) -> PackingStrategy:
    """Build a strategy through its record, as the plugin manager does."""
    records = {r.name: r for r in packing.balsam_packing_strategies()}
    record = records[name]
    cfg = from_dict({"packing": {"use": name}}, Path("."))
    built = record.settings(**settings) if settings else None
    return record.factory(PluginContext(site_dir=Path("."), config=cfg, settings=built))


def task(tid: int, waited: float = 0.0, **kw: float) -> TaskRequirements:
    return TaskRequirements(task_id=tid, ready_since=NOW - waited, **kw)  # type: ignore[arg-type]


def node(name: str, cpus: int = 8, gpus: Sequence[int] = (), share: float = 1.0) -> NodeResources:
    return NodeResources(name, cpus, tuple(gpus), share)


def by_task(placements: list[Placement]) -> dict[int, Placement]:
    return {p.task_id: p for p in placements}


def check_valid(
    ready: Sequence[TaskRequirements], free: Sequence[NodeResources], placements: list[Placement]
) -> dict[str, list[float]]:
    """Assert nothing is over-committed; return what is left per node [cpus, gpus, share]."""
    tasks = {t.task_id: t for t in ready}
    nodes = {n.name: n for n in free}
    left = {n.name: [n.cpus, len(n.gpu_ids), n.free_fraction] for n in free}
    gpus_used: dict[str, set[int]] = defaultdict(set)
    whole: set[str] = set()
    seen: set[int] = set()
    for p in placements:
        t = tasks[p.task_id]
        assert p.task_id not in seen, "task placed twice"
        seen.add(p.task_id)
        assert len(p.nodes) == t.num_nodes == len(set(p.nodes))
        assert len(p.gpu_ids) == len(p.nodes)
        for name, ids in zip(p.nodes, p.gpu_ids):
            n = nodes[name]
            assert len(ids) == t.gpus_per_node == len(set(ids))
            assert set(ids) <= set(n.gpu_ids), "GPU id the node does not have"
            assert not gpus_used[name] & set(ids), "GPU handed out twice"
            gpus_used[name] |= set(ids)
            if t.node_fraction >= 1.0:
                assert n.idle, f"whole-node task {t.task_id} on busy node {name}"
                assert name not in whole, "idle node handed out twice"
                whole.add(name)
            left[name][0] -= t.cpus_per_node
            left[name][1] -= t.gpus_per_node
            left[name][2] -= t.node_fraction
    for name, (cpus, gpus, share) in left.items():
        assert cpus >= 0 and gpus >= 0 and share >= -1e-9, f"{name} over-committed"
    return left


def fits_anywhere(t: TaskRequirements, left: dict[str, list[float]]) -> bool:
    ok = [
        name
        for name, (cpus, gpus, share) in left.items()
        if cpus >= t.cpus_per_node
        and gpus >= t.gpus_per_node
        and share >= (1.0 - 1e-9 if t.node_fraction >= 1.0 else t.node_fraction - 1e-9)
    ]
    return len(ok) >= t.num_nodes


def random_case(rng: random.Random) -> tuple[list[TaskRequirements], list[NodeResources]]:
    free = []
    for i in range(rng.randint(1, 12)):
        cpus = rng.choice([0, 1, 2, 4, 8, 16])
        gpus = sorted(rng.sample(range(4), rng.randint(0, 4)))
        free.append(node(f"n{i}", cpus, gpus, rng.choice([1.0, 1.0, 0.75, 0.5, 0.25, 0.0])))
    ready = [
        task(
            i,
            waited=rng.choice([0.0, 10.0]),
            num_nodes=rng.choice([1, 1, 1, 2, 3]),
            ranks_per_node=rng.randint(1, 4),
            threads_per_rank=rng.randint(1, 2),
            gpus_per_rank=rng.choice([0, 0, 1]),
            node_packing_count=rng.choice([1, 2, 3, 4]),
        )
        for i in range(rng.randint(0, 40))
    ]
    return ready, free


# --------------------------------------------------------------------------- records


def test_records_and_protocol() -> None:
    records = packing.balsam_packing_strategies()
    assert [r.name for r in records] == STRATEGIES
    assert all(isinstance(r, PackingStrategyPlugin) for r in records)
    for name in STRATEGIES:
        assert isinstance(make(name), PackingStrategy)
        assert isinstance(make(name, starvation_s=5.0), PackingStrategy)
    with pytest.raises(ValueError, match="starvation_s"):
        packing.PackingSettings(starvation_s=-1)


# --------------------------------------------------------------------------- node packing


@pytest.mark.parametrize("name", STRATEGIES)
def test_never_over_commits_and_leaves_nothing_placeable(name: str) -> None:
    strategy = make(name)
    for seed in range(200):
        rng = random.Random(seed)
        ready, free = random_case(rng)
        placements = strategy.place(ready, free, NOW)
        left = check_valid(ready, free, placements)
        # No task is starving, so no reservation: a greedy pass leaves nothing that fits.
        placed = {p.task_id for p in placements}
        for t in ready:
            if t.task_id not in placed:
                assert not fits_anywhere(t, left), f"seed {seed}: task {t.task_id} fits"


@pytest.mark.parametrize("name", STRATEGIES)
def test_never_over_commits_with_starving_tasks(name: str) -> None:
    strategy = make(name, starvation_s=5.0)
    for seed in range(200):
        ready, free = random_case(random.Random(seed))
        check_valid(ready, free, strategy.place(ready, free, NOW))


@pytest.mark.parametrize("name", STRATEGIES)
def test_multi_node_tasks_only_on_idle_nodes(name: str) -> None:
    free = [node("a"), node("b", share=0.5), node("c"), node("d", cpus=2)]
    ready = [task(1, num_nodes=2, ranks_per_node=4), task(2, num_nodes=2, ranks_per_node=4)]
    placements = by_task(make(name).place(ready, free, NOW))
    assert set(placements[1].nodes) == {"a", "c"}  # b is busy, d too small
    assert 2 not in placements


@pytest.mark.parametrize("name", STRATEGIES)
def test_gpu_ids_are_distinct_and_from_the_node(name: str) -> None:
    free = [node("g", cpus=16, gpus=(0, 1, 2, 3))]
    ready = [task(i, ranks_per_node=2, gpus_per_rank=1, node_packing_count=4) for i in range(3)]
    placements = make(name).place(ready, free, NOW)
    assert [p.task_id for p in placements] == [0, 1]  # only 4 GPUs
    ids = [i for p in placements for i in p.gpu_ids[0]]
    assert sorted(ids) == [0, 1, 2, 3]
    multi = [task(9, num_nodes=2, gpus_per_rank=2)]
    two = [node("x", gpus=(5, 6, 7)), node("y", gpus=(1, 2))]
    (p,) = make(name).place(multi, two, NOW)
    assert p.nodes == ("x", "y") and p.gpu_ids == ((5, 6), (1, 2))


@pytest.mark.parametrize("name", STRATEGIES)
def test_node_packing_count_shares_one_node(name: str) -> None:
    free = [node("a", cpus=64), node("b", cpus=64)]
    ready = [task(i, ranks_per_node=2, node_packing_count=4) for i in range(5)]
    placements = make(name).place(ready, free, NOW)
    assert len(placements) == 5
    on_node = defaultdict(list)
    for p in placements:
        on_node[p.nodes[0]].append(p.task_id)
    assert sorted(len(v) for v in on_node.values()) == [1, 4]  # 4 share a node, not 3+2
    # A half-busy node takes two more quarter tasks, not three, despite its CPUs.
    half = [node("h", cpus=64, share=0.5)]
    assert len(make(name).place(ready, half, NOW)) == 2


def test_fifo_first_fit_in_given_order() -> None:
    free = [node("big", cpus=16), node("small", cpus=2, share=0.5)]
    ready = [task(1, ranks_per_node=2, node_packing_count=2), task(2, ranks_per_node=16)]
    placements = by_task(make("fifo").place(ready, free, NOW))
    assert placements[1].nodes == ("big",)  # first node where it fits...
    assert 2 not in placements  # ...so the big task that came second finds "big" busy


def test_best_fit_largest_first_on_the_tightest_node() -> None:
    free = [node("big", cpus=16), node("small", cpus=2, share=0.5)]
    ready = [task(1, ranks_per_node=2, node_packing_count=2), task(2, ranks_per_node=16)]
    placements = by_task(make("best-fit").place(ready, free, NOW))
    assert placements[2].nodes == ("big",)  # the larger task went first
    assert placements[1].nodes == ("small",)  # the small one where it leaves least free
    cpu_task = [task(3, node_packing_count=2)]
    gpu_and_cpu = [node("gpu", cpus=8, gpus=(0, 1)), node("cpu", cpus=8)]
    (p,) = make("best-fit").place(cpu_task, gpu_and_cpu, NOW)
    assert p.nodes == ("cpu",)  # keeps the GPU node free


@pytest.mark.parametrize("name", STRATEGIES)
def test_starving_task_reserves_least_loaded_nodes_and_others_backfill(name: str) -> None:
    free = [node("a", share=0.25), node("b"), node("c", share=0.5), node("d", share=0.25)]
    big = task(1, waited=600, num_nodes=3)
    small = [task(i, waited=1, node_packing_count=4) for i in (2, 3)]
    # Not starving yet: small tasks go anywhere (fifo: first node "a").
    fresh = by_task(make(name).place([task(1, waited=60, num_nodes=3), *small], free, NOW))
    assert 1 not in fresh and len(fresh) == 2
    # Starving: b, c and a (the three least loaded; a ties with d and comes first in
    # `free`) are reserved, so they drain; the small tasks backfill d only.
    placements = make(name).place([big, *small], free, NOW)
    assert [p.nodes for p in placements] == [("d",)]


@pytest.mark.parametrize("name", STRATEGIES)
def test_no_reservation_for_a_task_that_can_never_fit(name: str) -> None:
    free = [node("a"), node("b")]
    ready = [task(1, waited=600, num_nodes=3), task(2, waited=600, ranks_per_node=99)]
    ready += [task(i, waited=1) for i in (3, 4)]
    placements = make(name).place(ready, free, NOW)
    assert sorted(p.task_id for p in placements) == [3, 4]


def simulate(name: str, starvation_s: float, horizon: float = 1500.0) -> float | None:
    """A 2-node task against a stream of 1-node tasks; when does the big one start?

    Four nodes finish their 60 s tasks at staggered times (never two in one 10 s tick)
    and new 1-node tasks arrive faster than they run, so without a reservation the big
    task never sees two idle nodes at once.
    """
    strategy = make(name, starvation_s=starvation_s)
    names = ["n0", "n1", "n2", "n3"]
    busy_until = {n: 15.0 * (i + 1) for i, n in enumerate(names)}
    ready = [TaskRequirements(0, num_nodes=2, ranks_per_node=4, ready_since=0.0)]
    now, next_id = 0.0, 1
    while now <= horizon:
        ready += [
            TaskRequirements(i, ranks_per_node=4, ready_since=now) for i in (next_id, next_id + 1)
        ]
        next_id += 2
        free = [node(n) if busy_until[n] <= now else node(n, cpus=0, share=0.0) for n in names]
        placements = strategy.place(ready, free, now)
        check_valid(ready, free, placements)
        for p in placements:
            if p.task_id == 0:
                return now
            for n in p.nodes:
                busy_until[n] = now + 60.0
        started = {p.task_id for p in placements}
        ready = [t for t in ready if t.task_id not in started]
        now += 10.0
    return None


@pytest.mark.parametrize("name", STRATEGIES)
def test_big_task_is_not_starved_by_a_stream_of_small_ones(name: str) -> None:
    assert simulate(name, starvation_s=math.inf) is None  # the scenario does starve it
    started = simulate(name, starvation_s=300.0)
    assert started is not None and started <= 300.0 + 60.0 + 10.0


@pytest.mark.parametrize("name", STRATEGIES)
def test_stops_early_and_handles_empty_input(name: str) -> None:
    strategy = make(name)
    assert strategy.place([], [node("a")], NOW) == []
    assert strategy.place([task(1)], [], NOW) == []
    full = [node(f"n{i}", cpus=0, share=0.0) for i in range(1000)]
    many = [task(i, node_packing_count=i % 7 + 1) for i in range(5_000)]
    assert strategy.place(many, full, NOW) == []


# --------------------------------------------------------------------------- job packing


def backlog(n: int, wall: float = 10.0, **kw: float) -> list[TaskRequirements]:
    return [task(i, wall_time_min=wall, **kw) for i in range(n)]


def area(requests: Sequence[JobRequest]) -> float:
    return sum(r.num_nodes * r.wall_time_min for r in requests)


def within(requests: Sequence[JobRequest], queues: dict[str, QueuePolicy]) -> None:
    for r in requests:
        p = queues[r.queue]
        assert p.submit
        assert p.min_nodes <= r.num_nodes <= p.max_nodes, r
        assert p.min_wall_min <= r.wall_time_min <= p.max_wall_min, r
        assert isinstance(r.wall_time_min, int)


@pytest.mark.parametrize("name", STRATEGIES)
def test_size_jobs_shelf_packs_the_backlog(name: str) -> None:
    strategy = make(name)
    q = {"q": QueuePolicy(max_queued=5, max_nodes=8, max_wall_min=60)}
    # 30 one-node 10-min tasks on <= 8 nodes: shelves of 8, 8, 8, 6 -> 8 nodes x 40 min.
    assert strategy.size_jobs(backlog(30), q, [], [], NOW) == [JobRequest("q", 8, 40)]
    # Shorter wall limit: two shelves per job -> two jobs, covering all the work.
    short = {"q": QueuePolicy(max_queued=5, max_nodes=8, max_wall_min=20)}
    jobs = strategy.size_jobs(backlog(30), short, [], [], NOW)
    assert jobs == [JobRequest("q", 8, 20), JobRequest("q", 8, 20)]
    within(jobs, short)
    assert area(jobs) >= 30 * 10
    # Few tasks: as wide as their parallelism, as long as the longest.
    few = backlog(3, wall=25) + backlog(2, wall=5)
    assert strategy.size_jobs(few, q, [], [], NOW) == [JobRequest("q", 5, 25)]


def test_size_jobs_respects_minimums_and_clamps_long_tasks() -> None:
    strategy = make("fifo")
    policy = QueuePolicy(max_queued=5, min_nodes=4, max_nodes=8, min_wall_min=30, max_wall_min=60)
    q = {"q": policy}
    assert strategy.size_jobs(backlog(3, wall=5), q, [], [], NOW) == [JobRequest("q", 4, 30)]
    # A task longer than the queue allows still gets the longest job allowed.
    assert strategy.size_jobs(backlog(1, wall=500), q, [], [], NOW) == [JobRequest("q", 4, 60)]


def test_size_jobs_default_wall_time_and_shared_nodes() -> None:
    q = {"q": QueuePolicy(max_queued=5, max_nodes=8, max_wall_min=60)}
    assert make("fifo").size_jobs(backlog(2, wall=0), q, [], [], NOW) == [JobRequest("q", 2, 10)]
    custom = make("fifo", default_wall_min=7.0)
    assert custom.size_jobs(backlog(2, wall=0), q, [], [], NOW) == [JobRequest("q", 2, 7)]
    # Eight quarter-node tasks need two nodes, not eight.
    shared = backlog(8, node_packing_count=4)
    assert make("fifo").size_jobs(shared, q, [], [], NOW) == [JobRequest("q", 2, 10)]
    # A 3-node task is 3 nodes wide.
    wide = backlog(2, num_nodes=3)
    assert make("fifo").size_jobs(wide, q, [], [], NOW) == [JobRequest("q", 6, 10)]


def test_size_jobs_submit_false_and_max_queued() -> None:
    strategy = make("best-fit")
    work = backlog(30)
    off = {"q": QueuePolicy(submit=False, max_queued=5, max_nodes=8, max_wall_min=60)}
    assert strategy.size_jobs(work, off, [], [], NOW) == []
    q = {"q": QueuePolicy(max_queued=2, max_nodes=4, max_wall_min=20)}
    jobs = strategy.size_jobs(work, q, [], [], NOW)
    assert len(jobs) == 2  # would need 4 jobs, max_queued caps it
    queued = ActiveJob("q", 1, 10, BatchJobState.QUEUED)
    assert len(strategy.size_jobs(work, q, [queued], [], NOW)) == 1
    assert strategy.size_jobs(work, q, [queued, queued], [], NOW) == []
    # Jobs of another queue, and running or finished ones, take no slot.
    other = ActiveJob("other", 1, 10, BatchJobState.QUEUED)
    done = ActiveJob("q", 1, 10, BatchJobState.FINISHED)
    running = ActiveJob("q", 1, 1, BatchJobState.RUNNING, start_time=NOW)
    assert len(strategy.size_jobs(work, q, [other, done, running, running], [], NOW)) == 2


def test_size_jobs_subtracts_queued_and_running_capacity() -> None:
    strategy = make("fifo")
    q = {"q": QueuePolicy(max_queued=5, max_nodes=8, max_wall_min=60)}
    queued = ActiveJob("q", 8, 40, BatchJobState.QUEUED)
    assert strategy.size_jobs(backlog(30), q, [queued], [], NOW) == []
    # Running for 50 of its 60 minutes: 10 minutes x 8 nodes left take 8 tasks.
    running = ActiveJob("q", 8, 60, BatchJobState.RUNNING, start_time=NOW - 50 * 60)
    assert strategy.size_jobs(backlog(30), q, [running], [], NOW) == [JobRequest("q", 8, 30)]
    # A finished job absorbs nothing; a job too narrow for the tasks neither.
    finished = ActiveJob("q", 8, 40, BatchJobState.FINISHED)
    narrow = ActiveJob("q", 1, 600, BatchJobState.QUEUED)
    jobs = strategy.size_jobs(backlog(4, num_nodes=2), q, [finished, narrow], [], NOW)
    assert jobs == [JobRequest("q", 8, 10)]


def test_size_jobs_prefers_backfill_windows() -> None:
    strategy = make("fifo")
    q = {"q": QueuePolicy(max_queued=5, max_nodes=16, max_wall_min=60)}
    window = BackfillWindow("q", 4, 30.5)
    # 8 tasks of 10 min fit in 4 nodes x 30 min: one job in the window, nothing else.
    assert strategy.size_jobs(backlog(8), q, [], [window], NOW) == [JobRequest("q", 4, 20)]
    # 20 tasks: the window takes 12 (3 shelves), a regular job the other 8.
    jobs = strategy.size_jobs(backlog(20), q, [], [window], NOW)
    assert jobs == [JobRequest("q", 4, 30), JobRequest("q", 8, 10)]
    # Windows too short for the tasks, of unknown queues or below min_nodes are ignored.
    small = {"q": QueuePolicy(max_queued=5, min_nodes=8, max_nodes=16, max_wall_min=60)}
    ignored = [BackfillWindow("q", 4, 600), BackfillWindow("zz", 64, 600)]
    assert strategy.size_jobs(backlog(8), small, [], ignored, NOW) == [JobRequest("q", 8, 10)]
    assert strategy.size_jobs(backlog(8, wall=45), q, [], [window], NOW) == [
        JobRequest("q", 8, 45)
    ]


def test_size_jobs_routes_wide_tasks_to_a_queue_that_fits_them() -> None:
    q = {
        "small": QueuePolicy(max_queued=5, max_nodes=2, max_wall_min=60),
        "big": QueuePolicy(max_queued=5, min_nodes=8, max_nodes=64, max_wall_min=60),
    }
    work = backlog(2) + [task(99, num_nodes=16, wall_time_min=30)]
    jobs = make("fifo").size_jobs(work, q, [], [], NOW)
    assert jobs == [JobRequest("small", 2, 10), JobRequest("big", 16, 30)]


@pytest.mark.parametrize("name", STRATEGIES)
def test_size_jobs_property_limits_and_coverage(name: str) -> None:
    strategy = make(name)
    for seed in range(150):
        rng = random.Random(seed)
        queues = {}
        for qn in ("a", "b"):
            lo_n, lo_w = rng.randint(1, 4), rng.randint(1, 30)
            queues[qn] = QueuePolicy(
                submit=rng.random() < 0.8,
                max_queued=1000,
                min_nodes=lo_n,
                max_nodes=lo_n + rng.randint(0, 16),
                min_wall_min=lo_w,
                max_wall_min=lo_w + rng.randint(0, 120),
            )
        work = [
            task(
                i,
                num_nodes=rng.choice([1, 1, 2, 4]),
                node_packing_count=rng.choice([1, 2, 4]),
                wall_time_min=rng.choice([0, 5, 15, 60, 200]),
            )
            for i in range(rng.randint(0, 60))
        ]
        jobs = strategy.size_jobs(work, queues, [], [], NOW)
        within(jobs, queues)
        open_q = [p for p in queues.values() if p.submit]
        if open_q and all(t.num_nodes <= min(p.max_nodes for p in open_q) for t in work):
            # Every task fits every open queue; each counts at most the queue's wall limit.
            cap = min(p.max_wall_min for p in open_q)
            need = sum(t.node_footprint * min(t.wall_time_min or 10, cap) for t in work)
            assert area(jobs) >= need - 1e-6, f"seed {seed}"
        if not open_q or not work:
            assert jobs == []
