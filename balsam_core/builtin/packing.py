"""Built-in packing strategies ``fifo`` and ``best-fit`` (pure: no I/O, no clock).

**Node packing** (:meth:`place`) puts ready tasks onto the free part of the launcher's
nodes.  A one-node task needs, on one node, ``cpus_per_node`` CPU slots,
``gpus_per_node`` distinct GPU ids and ``1/node_packing_count`` of the node's
``free_fraction``; a multi-node task (and a one-node task with
``node_packing_count == 1``) needs whole idle nodes.  Both strategies keep a running
tally of what they hand out, so a node is never over-committed within one call.

* ``fifo`` takes tasks in the order given (oldest first) and puts each on the first
  node(s), in the order of ``free``, where it fits.
* ``best-fit`` takes larger tasks first (``node_footprint``, then CPUs, then GPUs) and
  puts each on the node(s) it leaves with the least free capacity (fewest free GPUs,
  then CPUs, then node share), the first such node on ties.

**Anti-starvation rule** (both strategies).  A task is *starving* once it has been
ready for ``starvation_s`` (``[plugins.fifo]`` / ``[plugins.best-fit]``, default 300 s):
``now - ready_since >= starvation_s``.
Starving tasks are considered before all others, oldest first.  The first starving
task that does not fit is the *head-of-line* task: it reserves the ``k`` least-loaded
nodes (most free share, then CPUs, then GPUs, then order in ``free``; ``k`` =
``num_nodes``), and no other task is placed on them in this call, so they drain.
Every other task may still backfill the remaining nodes.  As reserved nodes only
drain while the others fill, the nodes picked at the next call are at least as free,
so the task eventually fits.  At most one reservation per call; none for a task that needs more
nodes than ``free`` lists (so the launcher should pass every node of its allocation,
busy ones with zero free) or more CPUs/GPUs than an idle node offers.

**Job packing** (:meth:`size_jobs`, shared by both strategies): see :func:`size_jobs`.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from balsam_core import (
    ActiveJob,
    BackfillWindow,
    BatchJobState,
    JobRequest,
    NodeResources,
    PackingStrategyPlugin,
    Placement,
    PluginContext,
    QueuePolicy,
    TaskRequirements,
    hookimpl,
    nodes_with_room,
)

__all__ = [
    "BestFitPacking",
    "FifoPacking",
    "PackingSettings",
    "balsam_packing_strategies",
    "size_jobs",
]

_EPS = 1e-9
#: What a task needs on each node: (num_nodes, cpus, gpus, share of the node).
_Shape = tuple[int, int, int, float]
#: A node in a shape's heap: ``(*rank, index, version)``.
_Entry = tuple[float, ...]


@dataclass(frozen=True)
class PackingSettings:
    """``[plugins.fifo]`` / ``[plugins.best-fit]``: knobs of the built-in strategies."""

    #: Seconds a task may wait before it is starving and may reserve nodes.
    starvation_s: float = 300.0
    #: Wall time assumed by job packing for a task with ``wall_time_min == 0``.
    default_wall_min: float = 10.0

    def __post_init__(self) -> None:
        if self.starvation_s < 0:
            raise ValueError("starvation_s must be >= 0")
        if self.default_wall_min <= 0:
            raise ValueError("default_wall_min must be > 0")


# --------------------------------------------------------------------------- node packing


def _shape(t: TaskRequirements) -> _Shape:
    """What *t* needs on each node; multi-node and unshared tasks need idle nodes."""
    share = t.node_fraction
    return (t.num_nodes, t.cpus_per_node, t.gpus_per_node, 1.0 if share >= 1.0 - _EPS else share)


class _Node:
    """The mutable free part of one node during a :meth:`place` call."""

    __slots__ = ("index", "name", "cpus", "gpus", "share", "version", "reserved")

    def __init__(self, index: int, res: NodeResources) -> None:
        self.index, self.name = index, res.name
        self.cpus, self.gpus, self.share = res.cpus, tuple(res.gpu_ids), res.free_fraction
        self.version = 0  # bumped at every change, to spot stale heap entries
        self.reserved = False

    def fits(self, shape: _Shape) -> bool:
        _, cpus, gpus, share = shape
        return (
            not self.reserved
            and self.cpus >= cpus
            and len(self.gpus) >= gpus
            and self.share >= share - _EPS
        )

    @property
    def live(self) -> bool:
        return not self.reserved and self.cpus > 0 and self.share > _EPS


class _Pool:
    """The free nodes and, per task shape, a heap of the nodes that fit it, best first.

    A heap entry is ``(*rank, index, version)``: fifo ranks by index alone, best-fit by
    what the node has left (GPUs, CPUs, share), so the smallest fitting node wins.
    Free space only shrinks during a call, so a node that stops fitting a shape never
    fits it again: such entries are dropped lazily.  Best-fit re-pushes a node into
    every heap it still fits after each change (its rank changed).  Only nodes with
    room get a tally (a launcher with thousands of busy nodes lists them all at every
    start); the others are read as given, when a reservation ranks every node.  Cost:
    one pass over *free*, O(nodes with room) per distinct task shape tried (shapes
    needing at least what a failed shape needs are skipped), plus O(log nodes) per
    placement, O(shapes x log nodes) for best-fit.
    """

    def __init__(self, free: Sequence[NodeResources], best_fit: bool) -> None:
        self.free = free
        self.best_fit = best_fit
        self.heaps: dict[_Shape, list[_Entry]] = {}
        #: The tallies of the nodes with room, by index in *free*.
        self.nodes = {i: _Node(i, free[i]) for i in nodes_with_room(free)}
        self.open = list(self.nodes.values())  # compacted when a heap is built
        self.live = len(self.open)

    def _entry(self, node: _Node) -> _Entry:
        if self.best_fit:
            return (len(node.gpus), node.cpus, node.share, node.index, node.version)
        return (node.index, node.version)

    def _heap(self, shape: _Shape) -> list[_Entry]:
        heap = self.heaps.get(shape)
        if heap is None:
            self.open = [n for n in self.open if n.live]
            _, cpus, gpus, share = shape
            share -= _EPS
            entry = self._entry
            heap = self.heaps[shape] = [
                entry(n)
                for n in self.open
                if n.cpus >= cpus and n.share >= share and len(n.gpus) >= gpus
            ]
            heapq.heapify(heap)
        return heap

    def _best(self, heap: list[_Entry], shape: _Shape) -> _Node | None:
        """The best node of *heap* that still fits, dropping stale entries on the way."""
        while heap:
            index, version = heap[0][-2:]
            node = self.nodes[int(index)]
            if node.fits(shape) and (version == node.version or not self.best_fit):
                return node
            heapq.heappop(heap)
        return None

    def place(self, t: TaskRequirements, shape: _Shape) -> Placement | None:
        """Place *t* (of *shape*) on fitting nodes and update the tally, or return None."""
        heap = self._heap(shape)
        chosen: list[_Node] = []
        while len(chosen) < t.num_nodes:
            node = self._best(heap, shape)
            if node is None:  # the shape never fits again in this call
                del self.heaps[shape]
                return None
            chosen.append(node)
            if t.num_nodes > 1:
                heapq.heappop(heap)  # distinct nodes; they all become busy below
        chosen.sort(key=lambda n: n.index)
        gpu_ids = []
        for node in chosen:
            gpu_ids.append(node.gpus[: t.gpus_per_node])
            node.gpus = node.gpus[t.gpus_per_node :]
            node.cpus -= t.cpus_per_node
            node.share -= shape[3]
            node.version += 1
            if not node.live:
                self.live -= 1
            elif self.best_fit:
                entry = self._entry(node)
                for other, h in self.heaps.items():
                    if node.fits(other):
                        heapq.heappush(h, entry)
        return Placement(t.task_id, tuple(n.name for n in chosen), tuple(gpu_ids))

    def reserve(self, t: TaskRequirements) -> bool:
        """Reserve the ``num_nodes`` least-loaded nodes for *t*, if it could ever use them."""
        if len(self.free) < t.num_nodes:
            return False
        idle = [r for r in self.free if r.free_fraction >= 1.0 - _EPS]
        if idle and (
            t.cpus_per_node > max(r.cpus for r in idle)
            or t.gpus_per_node > max(len(r.gpu_ids) for r in idle)
        ):
            return False
        # Every node, as it is now: a tally, or as given (a node without room is unchanged).
        now = [self.nodes.get(i) or _Node(i, r) for i, r in enumerate(self.free)]
        ranked = sorted(now, key=lambda d: (-d.share, -d.cpus, -len(d.gpus), d.index))
        for node in ranked[: t.num_nodes]:
            self.live -= node.live
            node.reserved = True
        return True


def _place(
    tasks: Iterable[TaskRequirements], pool: _Pool, now: float, starvation_s: float
) -> list[Placement]:
    """The loop shared by both strategies; *tasks* come starving-first (see module doc)."""
    placements: list[Placement] = []
    failed: set[_Shape] = set()  # shapes that fit nowhere any more
    reserved = False
    for t in tasks:
        if not pool.live:
            break
        shape = _shape(t)
        if shape not in failed and shape not in pool.heaps and any(
            all(map(operator.ge, shape, f)) for f in failed
        ):
            failed.add(shape)  # needs at least what a shape that failed needs
        placement = None if shape in failed else pool.place(t, shape)
        if placement is not None:
            placements.append(placement)
            continue
        failed.add(shape)  # free space only shrinks during a call
        if not reserved and now - t.ready_since >= starvation_s:
            reserved = pool.reserve(t)
    return placements


def _starving_first(
    ready: Sequence[TaskRequirements],
    now: float,
    starvation_s: float,
    rest_key: Callable[[TaskRequirements], tuple[float, ...]] | None,
) -> list[TaskRequirements]:
    starving = [t for t in ready if now - t.ready_since >= starvation_s]
    # Usually none starves: then one pass over the tasks (the launcher places from the
    # head of its queue at every start) instead of two.
    others = [t for t in ready if now - t.ready_since < starvation_s] if starving else list(ready)
    starving.sort(key=lambda t: t.ready_since)
    if rest_key is not None:
        others.sort(key=rest_key)
    return starving + others


# --------------------------------------------------------------------------- job packing

#: Identical tasks packed as one group: (wall minutes, node footprint, num_nodes, count).
_Group = tuple[float, float, int, int]
_LIVE = frozenset(
    {
        BatchJobState.PENDING_SUBMISSION,
        BatchJobState.QUEUED,
        BatchJobState.RUNNING,
        BatchJobState.UNKNOWN,
    }
)
_WAITING = frozenset({BatchJobState.PENDING_SUBMISSION, BatchJobState.QUEUED})


def _shelf_pack(
    groups: list[_Group], width: float, height: float, cap: float = math.inf
) -> tuple[list[_Group], float, float]:
    """Next-fit-decreasing-height shelf packing of *groups* into a *width* x *height* job.

    *groups* are sorted by wall time, longest first; durations are cut to *cap*.
    Returns what is left over (same order), and the width and height actually used.
    """
    rest: list[_Group] = []
    base = shelf_h = shelf_w = used_w = 0.0
    shelf = False
    for group in groups:
        dur, w, _, left = group
        dur = min(dur, cap)
        if w > width + _EPS or dur > height + _EPS:
            rest.append(group)
            continue
        while left:
            if shelf:  # dur <= shelf_h as groups are sorted: fill the current shelf
                k = min(left, int((width - shelf_w + _EPS) / w) if w > 0 else left)
                shelf_w += k * w
                left -= k
                used_w = max(used_w, shelf_w)
            if left:
                if base + shelf_h + dur > height + _EPS:
                    break
                base, shelf_h, shelf_w = base + shelf_h, dur, 0.0  # open a shelf on top
                shelf = True
        if left:
            rest.append(group[:3] + (left,))
    return rest, used_w, base + shelf_h


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def size_jobs(
    backlog: Sequence[TaskRequirements],
    queues: Mapping[str, QueuePolicy],
    active: Sequence[ActiveJob],
    windows: Sequence[BackfillWindow],
    now: float,
    default_wall_min: float = 10.0,
) -> list[JobRequest]:
    """Batch jobs (nodes x wall time) to submit for *backlog*, within the queue policies.

    Each task is a rectangle: ``node_footprint`` nodes wide (fractional for shared
    nodes) and ``wall_time_min`` long (*default_wall_min* when 0).  Tasks are sorted
    longest first and packed into jobs with next-fit-decreasing-height *shelf
    packing*: a shelf is as long as its first task, tasks sit side by side on it
    until the job's nodes are used, then a new shelf starts on top, while the sum of
    shelf heights fits the job's wall time.

    1. Capacity already there absorbs work first: every live job in *active*
       (pending, queued, running, unknown; running ones first) is a bin of its nodes x
       its remaining wall time (the whole wall time while queued).
    2. Backfill windows (largest first) of queues that may submit get a job if work
       fits in them as it is: the job is the packed extent, never beyond the window,
       the queue's ``max_nodes``/``max_wall_min``, nor below its minimums.
    3. Then each queue in turn, while it has free slots (``max_queued`` minus its
       pending and queued jobs, window jobs included): the job is as wide as the
       remaining work's parallelism (sum of footprints, at least the widest task), cut
       to ``[min_nodes, max_nodes]``, and as long as its shelves, cut to
       ``[min_wall_min, max_wall_min]``.  Tasks longer than ``max_wall_min`` count as
       ``max_wall_min`` (they time out or continue in a later job); tasks wider than
       ``max_nodes`` are left to other queues.

    Queues with ``submit = false`` get no request.  Identical tasks are packed as one
    group, so the cost is O(tasks log tasks + task shapes x jobs).
    """
    counts: dict[tuple[float, float, int], int] = {}
    for t in backlog:
        shape = (t.wall_time_min or default_wall_min, t.node_footprint, t.num_nodes)
        counts[shape] = counts.get(shape, 0) + 1
    groups: list[_Group] = sorted((s + (c,) for s, c in counts.items()), reverse=True)

    for job in sorted(active, key=lambda j: j.state != BatchJobState.RUNNING):
        if groups and job.state in _LIVE:
            left = job.wall_time_min
            if job.state == BatchJobState.RUNNING and job.start_time is not None:
                left -= (now - job.start_time) / 60.0
            groups = _shelf_pack(groups, job.num_nodes, max(left, 0.0))[0]

    slots = {
        name: p.max_queued - sum(1 for j in active if j.queue == name and j.state in _WAITING)
        for name, p in queues.items()
        if p.submit
    }
    requests: list[JobRequest] = []

    def emit(name: str, p: QueuePolicy, used_w: float, used_h: float) -> None:
        nodes = min(max(_ceil(used_w), p.min_nodes), p.max_nodes)
        wall = min(max(_ceil(used_h), p.min_wall_min), p.max_wall_min)
        requests.append(JobRequest(name, nodes, wall))
        slots[name] -= 1

    for win in sorted(windows, key=lambda w: -w.num_nodes * w.wall_time_min):
        p = queues.get(win.queue)
        if not groups or p is None or slots.get(win.queue, 0) <= 0:
            continue
        width = min(win.num_nodes, p.max_nodes)
        height = min(math.floor(win.wall_time_min + _EPS), p.max_wall_min)
        if width < p.min_nodes or height < p.min_wall_min:
            continue
        rest, used_w, used_h = _shelf_pack(groups, width, height)
        if rest != groups:
            groups = rest
            emit(win.queue, p, used_w, used_h)

    for name, p in queues.items():
        while groups and slots.get(name, 0) > 0:
            fit = [g for g in groups if g[2] <= p.max_nodes]
            if not fit:
                break
            parallel = _ceil(sum(g[1] * g[3] for g in fit))
            width = min(p.max_nodes, max(p.min_nodes, parallel, max(g[2] for g in fit)))
            rest, used_w, used_h = _shelf_pack(fit, width, p.max_wall_min, cap=p.max_wall_min)
            emit(name, p, used_w, used_h)
            groups = sorted([g for g in groups if g[2] > p.max_nodes] + rest, reverse=True)
    return requests


# --------------------------------------------------------------------------- strategies


class FifoPacking:
    """``fifo``: oldest first, each task on the first node(s) where it fits."""

    best_fit = False

    def __init__(self, settings: PackingSettings | None = None) -> None:
        self.settings = settings or PackingSettings()

    @classmethod
    def from_context(cls, context: PluginContext) -> FifoPacking:
        """The factory of the plugin record."""
        return cls(context.settings)

    def _order(self, ready: Sequence[TaskRequirements], now: float) -> list[TaskRequirements]:
        return _starving_first(ready, now, self.settings.starvation_s, None)

    def place(
        self, ready: Sequence[TaskRequirements], free: Sequence[NodeResources], now: float
    ) -> list[Placement]:
        """Place some of *ready* onto *free* (see the module docstring); never over-commits."""
        pool = _Pool(free, self.best_fit)
        return _place(self._order(ready, now), pool, now, self.settings.starvation_s)

    def size_jobs(
        self,
        backlog: Sequence[TaskRequirements],
        queues: Mapping[str, QueuePolicy],
        active: Sequence[ActiveJob],
        windows: Sequence[BackfillWindow],
        now: float,
    ) -> list[JobRequest]:
        """Batch jobs for *backlog*: shelf packing, see :func:`size_jobs`."""
        return size_jobs(backlog, queues, active, windows, now, self.settings.default_wall_min)


class BestFitPacking(FifoPacking):
    """``best-fit``: largest first, each task where it leaves the least free capacity."""

    best_fit = True

    def _order(self, ready: Sequence[TaskRequirements], now: float) -> list[TaskRequirements]:
        return _starving_first(
            ready,
            now,
            self.settings.starvation_s,
            lambda t: (-t.node_footprint, -t.cpus_per_node, -t.gpus_per_node),
        )


@hookimpl
def balsam_packing_strategies() -> list[PackingStrategyPlugin]:
    """The built-in strategies ``fifo`` and ``best-fit``."""
    return [
        PackingStrategyPlugin(
            "fifo",
            FifoPacking.from_context,
            "oldest task first, on the first node where it fits",
            settings=PackingSettings,
        ),
        PackingStrategyPlugin(
            "best-fit",
            BestFitPacking.from_context,
            "largest task first, on the node it leaves fullest",
            settings=PackingSettings,
        ),
    ]
