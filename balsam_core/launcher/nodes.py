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
    #: Position in the allocation (and in :meth:`NodePool.free`).
    index: int
    cpus: int = 0
    share: float = 0.0
    gpus: set[int] = field(default_factory=set)

    @property
    def free_slots(self) -> int:
        """CPUs a task could still get here (none once the node's share is handed out)."""
        return self.spec.cpus - self.cpus if self.share < 1.0 - 1e-9 else 0

    def resources(self) -> NodeResources:
        """What is free on the node."""
        return NodeResources(
            name=self.spec.name,
            cpus=self.spec.cpus - self.cpus,
            gpu_ids=tuple(g for g in self.spec.gpu_ids if g not in self.gpus)
            if self.gpus else self.spec.gpu_ids,
            free_fraction=max(0.0, 1.0 - self.share),
        )


class NodePool:
    """Book-keeping of the allocation's nodes; the launcher's only view of free resources.

    A start or an exit changes the nodes of one task, so what is free is brought up to
    date node by node: with thousands of nodes, nothing here costs per node of the
    allocation at each start but :meth:`free`'s copy of a list.
    """

    def __init__(self, nodes: Sequence[NodeSpec]) -> None:
        if not nodes:
            raise ValueError("an allocation needs at least one node")
        self._nodes = {n.name: _Node(n, i) for i, n in enumerate(nodes)}
        if len(self._nodes) < len(nodes):
            twice = next(n.name for i, n in enumerate(nodes) if self._nodes[n.name].index != i)
            raise ValueError(f"the allocation lists node {twice} twice")
        self._held: dict[int, tuple[Placement, TaskRequirements]] = {}
        self._free = [n.resources() for n in self._nodes.values()]
        #: Every node with nothing taken, in the allocation's order.
        self.idle = tuple(self._free)
        self._stale: dict[int, _Node] = {}  # changed since _free was brought up to date
        #: CPU slots of the allocation, and those a task could still get (free CPUs of
        #: nodes whose share is not all handed out).
        self.cpus = self.free_cpus = sum(n.cpus for n in nodes)

    @property
    def nodes(self) -> list[NodeSpec]:
        return [n.spec for n in self._nodes.values()]

    def free(self) -> list[NodeResources]:
        """Every node with what is left on it (busy nodes too, with nothing free), in
        the allocation's order."""
        for index, node in self._stale.items():
            self._free[index] = node.resources()
        self._stale.clear()
        return list(self._free)

    def has_room(self) -> bool:
        """Is any CPU free on a node not fully shared out?"""
        return self.free_cpus > 0

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
            slots = node.free_slots
            node.cpus += cpus
            node.share += share
            node.gpus.update(gpus)
            self._changed(node, slots)
        self._held[placement.task_id] = (placement, req)

    def release(self, task_id: int) -> None:
        """Give back what *task_id* held (no-op if it held nothing)."""
        held = self._held.pop(task_id, None)
        if held is None:
            return
        placement, req = held
        gpu_ids = placement.gpu_ids or ((),) * len(placement.nodes)
        for name, gpus in zip(placement.nodes, gpu_ids):
            node = self._nodes[name]
            slots = node.free_slots
            node.cpus -= req.cpus_per_node
            node.share = max(0.0, node.share - req.node_fraction)
            node.gpus.difference_update(gpus)
            self._changed(node, slots)

    def _changed(self, node: _Node, slots_before: int) -> None:
        self._stale[node.index] = node
        self.free_cpus += node.free_slots - slots_before


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
