"""Plugin records, the protocols implementations satisfy, and the plain data they exchange.

Registration hooks (see :mod:`balsam_core.hookspecs`) return the records defined here:
small frozen dataclasses naming what a plugin provides.  The site configuration picks
one record of each kind *by name*; the core then calls ``record.factory(context)`` to
build the implementation.  Implementations are duck-typed against the ``Protocol``
classes below.

Packing strategies and recovery policies are pure: they see only the plain data
classes here (requirements, free resources, the time "now") and return decisions.
"""

from __future__ import annotations

import enum
import itertools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .states import BatchJobState, State

if TYPE_CHECKING:  # pragma: no cover
    import click

    from .config import SiteConfig

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


# --------------------------------------------------------------------------- plain data


@dataclass(frozen=True)
class TaskRequirements:
    """What one task needs from the allocation; the input of node and job packing."""

    task_id: int
    num_nodes: int = 1
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    gpus_per_rank: int = 0
    #: How many such tasks may share one node (1 = the node is the task's alone).
    node_packing_count: int = 1
    #: Expected run time; 0 means unknown (and unlimited).
    wall_time_min: float = 0.0
    #: When the task became runnable (epoch seconds); strategies use it against starvation.
    ready_since: float = 0.0

    @property
    def cpus_per_node(self) -> int:
        return self.ranks_per_node * self.threads_per_rank

    @property
    def gpus_per_node(self) -> int:
        return self.ranks_per_node * self.gpus_per_rank

    @property
    def node_fraction(self) -> float:
        """Share of each node the task occupies (``1/node_packing_count`` for one-node tasks)."""
        return 1.0 / self.node_packing_count if self.num_nodes == 1 else 1.0

    @property
    def node_footprint(self) -> float:
        """Nodes the task occupies, counting shared nodes fractionally."""
        return self.num_nodes * self.node_fraction


@dataclass(frozen=True)
class NodeResources:
    """The free part of one compute node."""

    name: str
    cpus: int
    gpu_ids: tuple[int, ...] = ()
    #: Free share of the node for ``node_packing_count`` accounting (1.0 = idle).
    free_fraction: float = 1.0

    @property
    def idle(self) -> bool:
        return self.free_fraction >= 1.0 - 1e-9


_CPUS = operator.attrgetter("cpus")


def nodes_with_room(free: Sequence[NodeResources]) -> list[int]:
    """The indices, in order, of the nodes of *free* with a CPU and some share free.

    A launcher lists every node of its allocation, busy ones with nothing free, at every
    start: nodes without a free CPU are skipped in C (tens of nanoseconds each)."""
    with_cpus = itertools.compress(range(len(free)), map(_CPUS, free))
    return [i for i in with_cpus if free[i].free_fraction > 1e-9]


@dataclass(frozen=True)
class Placement:
    """A packing decision: run *task_id* on *nodes*, with GPU ids per node."""

    task_id: int
    nodes: tuple[str, ...]
    gpu_ids: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class QueuePolicy:
    """What the site may submit to one batch queue (``[scheduler.queues.NAME]``)."""

    submit: bool = True
    max_queued: int = 1
    min_nodes: int = 1
    max_nodes: int = 1
    min_wall_min: int = 1
    max_wall_min: int = 60

    def __post_init__(self) -> None:
        for name in ("max_queued", "min_nodes", "max_nodes", "min_wall_min", "max_wall_min"):
            if getattr(self, name) < (0 if name == "max_queued" else 1):
                raise ValueError(f"{name} must be {'>= 0' if name == 'max_queued' else '>= 1'}")
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) > max_nodes ({self.max_nodes})")
        if self.min_wall_min > self.max_wall_min:
            raise ValueError(
                f"min_wall_min ({self.min_wall_min}) > max_wall_min ({self.max_wall_min})"
            )


@dataclass(frozen=True)
class ActiveJob:
    """A batch job already queued or running, as seen by job packing."""

    queue: str
    num_nodes: int
    wall_time_min: float
    state: BatchJobState
    #: Epoch seconds when it started running (None while queued).
    start_time: float | None = None


@dataclass(frozen=True)
class BackfillWindow:
    """Idle nodes the scheduler could start a job on now, and for how long."""

    queue: str
    num_nodes: int
    wall_time_min: float


@dataclass(frozen=True)
class JobRequest:
    """A batch job that job packing asks the service to submit."""

    queue: str
    num_nodes: int
    wall_time_min: int
    job_mode: str = "mpi"


@dataclass(frozen=True)
class BatchJobSpec:
    """Everything a scheduler needs to render and submit one batch job."""

    job_id: int
    queue: str
    project: str
    num_nodes: int
    wall_time_min: int
    job_mode: str
    #: The command the job runs (the Balsam launcher), as an argv list.
    launcher_argv: tuple[str, ...]
    #: Where the script, its output and its error file go.
    workdir: Path
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerJobStatus:
    """One batch job as the scheduler reports it."""

    scheduler_id: str
    state: BatchJobState
    native_state: str
    num_nodes: int | None = None
    wall_time_min: float | None = None


@dataclass(frozen=True)
class NodeSpec:
    """A node of an allocation and its capacity."""

    name: str
    cpus: int
    gpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Allocation:
    """The nodes a launcher runs on and when they are taken away (epoch s; None = never)."""

    nodes: tuple[NodeSpec, ...]
    end_time: float | None = None


@dataclass(frozen=True)
class LaunchSpec:
    """One task start, as the MPI launcher plugin sees it."""

    task_id: int
    argv: tuple[str, ...]
    nodes: tuple[str, ...]
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    gpus_per_rank: int = 0
    gpu_ids: tuple[tuple[int, ...], ...] = ()
    #: The complete environment of the launch command (the launcher's own plus the task's).
    env: Mapping[str, str] = field(default_factory=dict)
    #: Extra launcher flags from the site defaults and the task.
    mpi_flags: tuple[str, ...] = ()
    #: Names in ``env`` set for this task (its app and task environment, ``BALSAM_*``):
    #: an MPI launcher must forward them to ranks on other nodes.
    export: tuple[str, ...] = ()
    #: False: do not bind ranks to CPUs (a serial-mode agent spreads its tasks over
    #: the whole node).
    bind: bool = True

    @property
    def num_ranks(self) -> int:
        return len(self.nodes) * self.ranks_per_node


@dataclass(frozen=True)
class LaunchCommand:
    """The argv and the complete environment that start one task. Never a shell string."""

    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class LeasedTask:
    """A task handed to a launcher by a task source, with all it needs to run."""

    task_id: int
    name: str
    workflow: str
    argv: tuple[str, ...]
    workdir: str
    env: Mapping[str, str]
    requirements: TaskRequirements
    state: State
    num_retries: int = 0
    post_error_handler: bool = False
    post_timeout_handler: bool = False
    auto_timeout_retry: bool = False
    mpi_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class LauncherInfo:
    """A launcher introducing itself to a task source."""

    host: str
    pid: int
    mode: str = "mpi"
    batch_job_id: int | None = None
    #: Only tasks of this workflow / with all these tags are leased to it.
    workflow: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StateUpdate:
    """A state change a launcher reports for one of its leased tasks."""

    task_id: int
    state: State
    message: str = ""
    return_code: int | None = None
    time: float | None = None


@dataclass(frozen=True)
class TransitionEvent:
    """A recorded state change, as the observer hook receives it (after commit)."""

    task_id: int
    from_state: State | None
    to_state: State
    time: float
    message: str = ""
    launcher_id: int | None = None


class RecoveryAction(str, enum.Enum):
    """What to do with a task that failed or timed out."""

    #: Run it again as it is (RESTART_READY), after ``delay_s``.
    RETRY = "retry"
    #: Send it back to READY: stage-in and preprocess run again.
    RESTART = "restart"
    #: Give up: FAILED, with the decision's message.
    FAIL = "fail"
    #: Run the app's error/timeout handler, which sets the next state itself.
    HANDLE = "handle"


@dataclass(frozen=True)
class TaskFailure:
    """A failed or timed-out run, as a recovery policy sees it."""

    task_id: int
    state: State  # RUN_ERROR or RUN_TIMEOUT
    return_code: int | None
    #: Runs already retried.
    num_retries: int
    #: The task's own retry limit; None: the policy's (``[recovery] max_retries``).
    max_retries: int | None = None
    post_error_handler: bool = False
    post_timeout_handler: bool = False
    auto_timeout_retry: bool = False
    has_postprocess: bool = False
    stderr_tail: str = ""
    now: float = 0.0

    @property
    def signal(self) -> int | None:
        """The signal that ended the run, when a negative return code says so."""
        return -self.return_code if self.return_code is not None and self.return_code < 0 else None


@dataclass(frozen=True)
class RecoveryDecision:
    """A recovery policy's verdict."""

    action: RecoveryAction
    message: str = ""
    delay_s: float = 0.0


# --------------------------------------------------------------------------- protocols


@runtime_checkable
class Scheduler(Protocol):
    """A batch scheduler adapter: a script template, render/parse pairs, a state table."""

    def render_script(self, job: BatchJobSpec) -> str:
        """The submit script for *job*."""

    def submit(self, script: Path, job: BatchJobSpec) -> str:
        """Submit *script*; return the scheduler's id for the new job."""

    def status(self, scheduler_ids: Sequence[str]) -> dict[str, SchedulerJobStatus]:
        """States of many jobs in one call; ids the scheduler no longer knows are omitted."""

    def cancel(self, scheduler_id: str) -> None:
        """Cancel a queued or running job."""

    def allocation(self) -> Allocation:
        """The nodes and end time of the allocation the caller runs inside."""

    def backfill_windows(self) -> list[BackfillWindow]:
        """Idle node windows the scheduler reports (empty when it cannot tell)."""


@runtime_checkable
class MpiLauncher(Protocol):
    """Turns a :class:`LaunchSpec` into the argv + environment that start a task."""

    def check(self) -> None:
        """Raise :class:`~balsam_core.errors.PluginError` if the launcher cannot work here
        (e.g. its executable is missing). Called once when a launcher starts."""

    def command(self, spec: LaunchSpec) -> LaunchCommand:
        """The command starting *spec* on exactly its nodes."""


@runtime_checkable
class TaskSource(Protocol):
    """Hands runnable tasks to launchers, exactly once, and takes back their state changes."""

    def register(self, info: LauncherInfo) -> int:
        """Record a starting launcher; return its id (used in every later call)."""

    def lease(
        self, launcher_id: int, free: Sequence[NodeResources], limit: int
    ) -> list[LeasedTask]:
        """Lease up to *limit* runnable tasks that fit the *free* resources together.

        Runnable: PREPROCESSED and RESTART_READY, and READY or STAGED_IN tasks with
        nothing to do before their run (:func:`balsam_core.nothing_to_do`), whose skipped
        steps the lease records (:func:`balsam_core.skip`): a launcher's processing
        worker leaves those to the task source.
        A node may be listed more than once: capacity the launcher leases ahead for
        (its tasks start when the node frees up); a multi-node task needs distinct nodes.
        """

    def report(self, launcher_id: int, updates: Sequence[StateUpdate]) -> list[int]:
        """Record a batch of state changes; return ids refused (lease lost or task killed)."""

    def heartbeat(self, launcher_id: int) -> set[int]:
        """Renew the launcher's leases; return ids of its leased tasks that were killed.

        Called on the launcher's loop thread every ``heartbeat_s``: its cost should not
        grow with the number of tasks the launcher holds."""

    def release(self, launcher_id: int) -> None:
        """Give back every lease the launcher holds (end of allocation)."""

    def expire_leases(self, now: float) -> int:
        """Reclaim tasks whose lease ran out (those of a launcher with no heartbeat for
        ``lease_s`` among them): running ones to RUN_TIMEOUT; return how many.

        May stop after a batch (the caller may be a launcher's loop): while it returns
        more than 0, callers call again."""


@runtime_checkable
class PackingStrategy(Protocol):
    """Pure decisions: tasks onto free node slots, and backlog into batch-job sizes."""

    def place(
        self, ready: Sequence[TaskRequirements], free: Sequence[NodeResources], now: float
    ) -> list[Placement]:
        """Place some of *ready* onto *free*; never over-commit a node.

        The launcher calls this after every exit that frees room, with the head of its
        queue (oldest first, a few per free CPU slot) and every node of its allocation,
        in the allocation's order, busy ones with nothing free (so that a reservation
        can pick them).  With thousands of nodes, most of them busy, a call should not
        do Python work per busy node.
        """

    def size_jobs(
        self,
        backlog: Sequence[TaskRequirements],
        queues: Mapping[str, QueuePolicy],
        active: Sequence[ActiveJob],
        windows: Sequence[BackfillWindow],
        now: float,
    ) -> list[JobRequest]:
        """Batch jobs to submit so the backlog gets done within the queue policies."""


@runtime_checkable
class RecoveryPolicy(Protocol):
    """One link of the recovery chain."""

    def decide(self, failure: TaskFailure) -> RecoveryDecision | None:
        """A decision for *failure*, or None to pass it to the next policy."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PluginContext:
    """What a factory receives when the site selects its record."""

    #: The site directory.
    site_dir: Path
    #: The whole validated site configuration.
    config: SiteConfig
    #: This record's ``[plugins.<name>]`` table, built into ``record.settings``
    #: (``None`` when the record declares no settings).
    settings: Any = None


@dataclass(frozen=True)
class PluginRecord:
    """Base of every registration record: a name, a factory and a one-line description."""

    kind: ClassVar[str] = ""
    name: str
    factory: Callable[[PluginContext], Any]
    description: str
    #: A dataclass type for ``[plugins.<name>]``; the core builds it from the TOML table,
    #: checking keys and types, and its ``__post_init__`` may raise ValueError.
    settings: type | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"plugin name {self.name!r} must be lower-case letters, digits, '-', '_' or '.'"
            )
        if not callable(self.factory):
            raise TypeError(f"{self.kind} {self.name!r}: factory is not callable")


@dataclass(frozen=True)
class SchedulerPlugin(PluginRecord):
    """Provides a :class:`Scheduler`; selected by ``[scheduler] use``."""

    kind: ClassVar[str] = "scheduler"


@dataclass(frozen=True)
class MpiLauncherPlugin(PluginRecord):
    """Provides an :class:`MpiLauncher`; selected by ``[launcher] mpi``."""

    kind: ClassVar[str] = "mpi_launcher"


@dataclass(frozen=True)
class TaskSourcePlugin(PluginRecord):
    """Provides a :class:`TaskSource`; selected by ``[task_source] use``."""

    kind: ClassVar[str] = "task_source"


@dataclass(frozen=True)
class PackingStrategyPlugin(PluginRecord):
    """Provides a :class:`PackingStrategy`; selected by ``[packing] use``."""

    kind: ClassVar[str] = "packing_strategy"


@dataclass(frozen=True)
class RecoveryPolicyPlugin(PluginRecord):
    """Provides a :class:`RecoveryPolicy`; listed in ``[recovery] chain``."""

    kind: ClassVar[str] = "recovery_policy"


@dataclass(frozen=True)
class CliCommandPlugin(PluginRecord):
    """Adds a ``balsam <name>`` command; ``factory(None)`` returns a ``click.Command``.

    CLI commands exist before any site is opened, so the factory gets no context.
    """

    kind: ClassVar[str] = "cli_command"
    factory: Callable[[None], click.Command]  # type: ignore[assignment]


#: Every record type, by kind.
RECORD_TYPES: Mapping[str, type[PluginRecord]] = {
    cls.kind: cls
    for cls in (
        SchedulerPlugin,
        MpiLauncherPlugin,
        TaskSourcePlugin,
        PackingStrategyPlugin,
        RecoveryPolicyPlugin,
        CliCommandPlugin,
    )
}
