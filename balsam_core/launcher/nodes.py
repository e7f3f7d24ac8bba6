"""What the launcher's nodes hold: capacity, what each running task took, what is free."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..plugin_types import NodeResources, NodeSpec, Placement, TaskRequirements


@dataclass
class _Node:
    spec: NodeSpec
    cpus: int = 0
    share: float = 0.0
    gpus: set[int] = field(default_factory=set)


class NodePool:
    """Book-keeping of the allocation's nodes; the launcher's only view of free resources."""

    def __init__(self, nodes: Sequence[NodeSpec]) -> None:
        if not nodes:
            raise ValueError("an allocation needs at least one node")
        self._nodes = {n.name: _Node(n) for n in nodes}
        self._held: dict[int, tuple[Placement, TaskRequirements]] = {}
        self._free: list[NodeResources] | None = None  # until the next take or release

    @property
    def nodes(self) -> list[NodeSpec]:
        return [n.spec for n in self._nodes.values()]

    def free(self) -> list[NodeResources]:
        """Every node with what is left on it (busy nodes too, with nothing free)."""
        return list(self._free_now())

    def has_room(self) -> bool:
        """Is any CPU free on a node not fully shared out?"""
        return any(n.cpus < n.spec.cpus and n.share < 1.0 - 1e-9 for n in self._nodes.values())

    def _free_now(self) -> list[NodeResources]:
        if self._free is None:
            self._free = [
                NodeResources(
                    name=n.spec.name,
                    cpus=n.spec.cpus - n.cpus,
                    gpu_ids=tuple(g for g in n.spec.gpu_ids if g not in n.gpus)
                    if n.gpus else n.spec.gpu_ids,
                    free_fraction=max(0.0, 1.0 - n.share),
                )
                for n in self._nodes.values()
            ]
        return self._free

    def take(self, placement: Placement, req: TaskRequirements) -> None:
        """Book *placement* for a task; refuses (ValueError) anything over capacity."""
        if placement.task_id in self._held:
            raise ValueError(f"task {placement.task_id} already holds nodes")
        gpu_ids = placement.gpu_ids or ((),) * len(placement.nodes)
        cpus, share = req.cpus_per_node, req.node_fraction
        for name, gpus in zip(placement.nodes, gpu_ids):
            node = self._nodes[name]
            if (
                node.cpus + cpus > node.spec.cpus
                or node.share + share > 1.0 + 1e-9
                or (gpus and not node.gpus.isdisjoint(gpus))
                or (gpus and not set(gpus) <= set(node.spec.gpu_ids))
            ):
                raise ValueError(f"placement of task {placement.task_id} over-commits node {name}")
        for name, gpus in zip(placement.nodes, gpu_ids):
            node = self._nodes[name]
            node.cpus += cpus
            node.share += share
            node.gpus.update(gpus)
        self._held[placement.task_id] = (placement, req)
        self._free = None

    def release(self, task_id: int) -> None:
        """Give back what *task_id* held (no-op if it held nothing)."""
        held = self._held.pop(task_id, None)
        if held is None:
            return
        placement, req = held
        self._free = None
        gpu_ids = placement.gpu_ids or ((),) * len(placement.nodes)
        for name, gpus in zip(placement.nodes, gpu_ids):
            node = self._nodes[name]
            node.cpus -= req.cpus_per_node
            node.share = max(0.0, node.share - req.node_fraction)
            node.gpus.difference_update(gpus)


def local_nodes(count: int, cpus_per_node: int, gpus_per_node: int) -> tuple[NodeSpec, ...]:
    """This machine as *count* virtual nodes.

    One node gets every CPU (``cpus_per_node`` or the machine's count); several split
    the machine's CPUs between them unless ``cpus_per_node`` says how many each has.
    """
    host = socket.gethostname()
    if count == 1:
        cpus = cpus_per_node or os.cpu_count() or 1
        return (NodeSpec(host, cpus, tuple(range(gpus_per_node))),)
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // count)
    return tuple(
        NodeSpec(f"{host}-{i}", cpus, tuple(range(gpus_per_node))) for i in range(count)
    )
