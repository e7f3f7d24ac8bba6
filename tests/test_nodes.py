"""The launcher's node book-keeping (``NodePool``): what is free after any sequence of
starts and exits, kept node by node, equals what a recount from scratch gives."""

from __future__ import annotations

import random

import pytest

from balsam_core import NodeResources, NodeSpec, Placement, TaskRequirements, nodes_with_room
from balsam_core.builtin.packing import FifoPacking
from balsam_core.launcher.nodes import NodePool

SPECS = [NodeSpec(f"n{i}", cpus=8, gpu_ids=(0, 1, 2, 3)) for i in range(6)]


def recount(held: dict[int, tuple[Placement, TaskRequirements]]) -> list[NodeResources]:
    """What is free on SPECS with *held* running, counted from scratch."""
    cpus = {n.name: n.cpus for n in SPECS}
    share = {n.name: 1.0 for n in SPECS}
    gpus = {n.name: set(n.gpu_ids) for n in SPECS}
    for placement, req in held.values():
        for k, name in enumerate(placement.nodes):
            cpus[name] -= req.cpus_per_node
            share[name] -= req.node_fraction
            gpus[name] -= set(placement.gpu_ids[k] if placement.gpu_ids else ())
    return [
        NodeResources(n.name, cpus[n.name], tuple(sorted(gpus[n.name])), max(0.0, share[n.name]))
        for n in SPECS
    ]


def test_free_room_follows_every_start_and_exit() -> None:
    pool, packer, rng = NodePool(SPECS), FifoPacking(), random.Random(7)
    held: dict[int, tuple[Placement, TaskRequirements]] = {}
    next_id, full = 1, 0
    for _ in range(400):
        if held and rng.random() < 0.4:
            task_id = rng.choice(sorted(held))
            pool.release(task_id)
            del held[task_id]
        else:
            req = TaskRequirements(
                next_id, num_nodes=rng.choice([1, 1, 1, 2]), ranks_per_node=rng.randint(1, 3),
                gpus_per_rank=rng.choice([0, 0, 1]), node_packing_count=rng.choice([1, 2, 4, 8]),
            )
            next_id += 1
            for placement in packer.place([req], pool.free(), 0.0):
                pool.take(placement, req)
                held[req.task_id] = (placement, req)
        expected = recount(held)
        got = pool.free()
        assert [(r.name, r.cpus, sorted(r.gpu_ids)) for r in got] == [
            (r.name, r.cpus, list(r.gpu_ids)) for r in expected
        ]
        assert [r.free_fraction for r in got] == pytest.approx([r.free_fraction for r in expected])
        assert pool.free_cpus == sum(r.cpus for r in expected if r.free_fraction > 1e-9)
        assert pool.has_room() == any(r.cpus > 0 and r.free_fraction > 1e-9 for r in expected)
        full += not pool.has_room()
    assert full  # the nodes were filled up at times


def test_free_is_a_copy_and_over_commits_are_refused() -> None:
    pool = NodePool(SPECS[:1])
    pool.free().clear()
    assert len(pool.free()) == 1
    req = TaskRequirements(1, ranks_per_node=8)
    pool.take(Placement(1, ("n0",)), req)
    assert not pool.has_room() and pool.free_cpus == 0
    with pytest.raises(ValueError, match="already holds"):
        pool.take(Placement(1, ("n0",)), req)
    with pytest.raises(ValueError, match="over-commits node n0"):
        pool.take(Placement(2, ("n0",)), TaskRequirements(2))
    pool.release(1)
    pool.release(1)  # a second release is a no-op
    assert pool.has_room() and pool.free() == [NodeResources("n0", 8, (0, 1, 2, 3), 1.0)]


def test_an_allocation_lists_each_node_once() -> None:
    with pytest.raises(ValueError, match="lists node n0 twice"):
        NodePool([SPECS[0], SPECS[0]])
    with pytest.raises(ValueError, match="at least one node"):
        NodePool([])


def test_nodes_with_room_are_those_with_a_cpu_and_a_share_free() -> None:
    rng = random.Random(3)
    free = [
        NodeResources(f"n{i}", rng.choice([0, 0, 1, 8]), (), rng.choice([0.0, 1e-12, 0.5, 1.0]))
        for i in range(200)
    ]
    plain = [i for i, n in enumerate(free) if n.cpus > 0 and n.free_fraction > 1e-9]
    assert nodes_with_room(free) == plain and plain
    assert nodes_with_room([]) == []
