"""Task source ``database``: leases runnable tasks straight from the site database.

A lease is ``lease_launcher_id`` on the task row, taken in the same transaction that
picks the rows: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the ``BEGIN IMMEDIATE`` write
lock on SQLite — so each runnable task goes to exactly one launcher.  State reports are
accepted only from the lease holder; a kill is never overwritten.

A launcher's leases last as long as its heartbeat (``launcher.heartbeat``, written
every ``heartbeat_s``): renewing them is one row's write, whatever the launcher holds.
A launcher with no heartbeat for ``lease_s`` is lost: :meth:`expire_leases` reclaims
its tasks and marks it stopped.  Leases with a time of their own (``lease_expires``)
are the processing worker's claims, which it renews itself, and the RUNNING tasks a
launcher leaves behind at its release.

Tasks with nothing to do around their run (:mod:`balsam_core.fastforward`) skip the
processing worker: a READY one is leased and moved to PREPROCESSED in the lease's
transaction, and a RUN_DONE report takes it on to JOB_FINISHED in the report's.
"""

from __future__ import annotations

import collections
import itertools
import logging
import operator
import time
from collections.abc import Sequence
from typing import Any

from balsam_core import (
    RUNNABLE,
    Change,
    LeasedTask,
    LEASED_FROM,
    NOTHING_TO_DO_SQL,
    LauncherInfo,
    NodeResources,
    PluginContext,
    RawSql,
    Site,
    State,
    StateUpdate,
    TaskRequirements,
    TaskSourcePlugin,
    hookimpl,
    is_allowed,
    leasable_sql,
    models,
    nodes_with_room,
    render_argv,
    skip,
    task_environment,
)

Launcher = models.Launcher
load_json = models.load_json
log = logging.getLogger(__name__)

_RUNNABLE = frozenset(s.value for s in RUNNABLE)

#: Most tasks one :meth:`DatabaseTaskSource.expire_leases` call reclaims (one
#: transaction: 30-55 ms on SQLite, 90-210 ms on PostgreSQL here, when all were
#: RUNNING): a lost launcher may have held tens of thousands (64,000 at once: 1.6 s,
#: holding SQLite's write lock that long, and 5-7 s), and the caller is a launcher's loop.
RECLAIM_BATCH = 1000


#: What a lease reads of each task (``task`` joined with its ``app``), as the fields of
#: :class:`_LeaseRow`: what a launcher needs to place and start the task.
_LEASE_FIELDS = {
    "id": "task.id", "name": "task.name", "workflow": "task.workflow",
    "workdir": "task.workdir", "state": "task.state", "state_time": "task.state_time",
    "command": "task.command", "parameters": "task.parameters",
    "environment": "task.environment", "num_nodes": "task.num_nodes",
    "ranks_per_node": "task.ranks_per_node", "threads_per_rank": "task.threads_per_rank",
    "gpus_per_rank": "task.gpus_per_rank", "node_packing_count": "task.node_packing_count",
    "wall_time_min": "task.wall_time_min", "num_retries": "task.num_retries",
    "post_error_handler": "task.post_error_handler",
    "post_timeout_handler": "task.post_timeout_handler",
    "auto_timeout_retry": "task.auto_timeout_retry", "mpi_flags": "task.mpi_flags",
    "app_command": "app.command", "app_environment": "app.environment",
}
_LeaseRow = collections.namedtuple("_LeaseRow", list(_LEASE_FIELDS))  # type: ignore[misc]

#: The lease query for one leasable state (a raw statement: see balsam_core.rawsql;
#: SQLAlchemy's compilation of four such queries was most of a launcher's first lease).
#: Parameters: now, whole free nodes, most free CPUs and GPUs on a node, the filters'
#: values, limit.  With ``state = '...'`` inline, the (state, id) index yields rows
#: oldest first: a lease reads about ``limit`` rows of each state, whatever the backlog.
_LEASE_SELECT = (
    "SELECT " + ", ".join(_LEASE_FIELDS.values())
    + " FROM task LEFT OUTER JOIN app ON app.id = task.app_id WHERE {leasable}"
    " AND (task.lease_launcher_id IS NULL OR task.lease_expires < ?)"
    " AND (task.num_nodes = 1 OR task.num_nodes <= ?)"
    " AND task.ranks_per_node * task.threads_per_rank <= ?"
    " AND task.ranks_per_node * task.gpus_per_rank <= ?{filters}"
    " ORDER BY task.id LIMIT ?{lock}"
)
_WORKFLOW_FILTER = " AND task.workflow = ?"
_TAG_FILTER = (
    " AND EXISTS (SELECT 1 FROM task_tag WHERE task_tag.task_id = task.id"
    " AND task_tag.key = ? AND task_tag.value = ?)"
)


def requirements(task: Any) -> TaskRequirements:
    """What *task* (a Task row, or a row of its columns) needs from the allocation (the
    packing strategies' view of it)."""
    return TaskRequirements(
        task_id=task.id,
        num_nodes=task.num_nodes,
        ranks_per_node=task.ranks_per_node,
        threads_per_rank=task.threads_per_rank,
        gpus_per_rank=task.gpus_per_rank,
        node_packing_count=task.node_packing_count,
        wall_time_min=task.wall_time_min,
        ready_since=task.state_time,
    )


def fitting(
    tasks: Sequence[Any], free: Sequence[NodeResources]
) -> list[tuple[Any, TaskRequirements]]:
    """The tasks, in order, that fit into *free* together (first fit on a scratch copy),
    each with its requirements.

    The lease query only checks each task against the biggest free node; without this a
    launcher could hold tasks it has no room for while another launcher idles.  A node
    listed twice (capacity the launcher leases ahead for) counts once per task: a
    multi-node task needs distinct node names.  Runs inside the lease's transaction, so
    it looks only at nodes with room (a launcher lists all of its nodes, busy ones too)
    and tries no task that needs at least what a task that did not fit needs.
    """
    left = [
        [n.name, n.cpus, len(n.gpu_ids), n.free_fraction]
        for n in (free[i] for i in nodes_with_room(free))
    ]
    chosen = []
    failed: list[tuple[int, int, int, float]] = []  # free room only shrinks
    first = 0  # the nodes before it have no CPU left (first fit fills them in order)
    for task in tasks:
        while first < len(left) and left[first][1] <= 0:
            first += 1
        if first == len(left):
            break  # no CPU left anywhere
        req = requirements(task)
        shape = (req.num_nodes, req.cpus_per_node, req.gpus_per_node, req.node_fraction)
        if any(all(map(operator.ge, shape, f)) for f in failed):
            continue
        room: dict[str, list] = {}
        for node in itertools.islice(left, first, None):
            if (
                node[1] >= req.cpus_per_node
                and node[2] >= req.gpus_per_node
                and node[3] >= req.node_fraction - 1e-9
            ):
                room.setdefault(node[0], node)
                if len(room) == req.num_nodes:
                    break
        if len(room) < req.num_nodes:
            failed.append(shape)
            continue
        for node in room.values():
            node[1] -= req.cpus_per_node
            node[2] -= req.gpus_per_node
            node[3] -= req.node_fraction
        chosen.append((task, req))
    return chosen


#: The states of the tasks a launcher holds, and whether a clean run ends them.
_HELD = (
    f"SELECT task.id, task.state, ({NOTHING_TO_DO_SQL[State.RUN_DONE]})"
    " FROM task LEFT OUTER JOIN app ON app.id = task.app_id"
    " WHERE task.id {ids} AND task.lease_launcher_id = ?"
)
#: Taking leases (raw statements: see balsam_core.rawsql).
_LEASE = (
    "UPDATE task SET lease_launcher_id = ?, lease_expires = NULL, batch_job_id = ? WHERE id {ids}"
)
#: Giving back leases: the start of each statement that does; those of reported
#: tasks no longer running.
_UNLEASE = "UPDATE task SET lease_launcher_id = NULL, lease_expires = NULL WHERE"
_UNLEASE_ENDED = _UNLEASE + " id {ids} AND state <> ?"
#: A launcher's row (statement compilation was most of what its start waited for).
_REGISTER = (
    "INSERT INTO launcher (host, pid, mode, batch_job_id, workflow, tags, started, heartbeat)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
#: A launcher's heartbeat (which renews all its leases: a lost launcher found alive
#: again is live again), and its tasks killed meanwhile.
_HEARTBEAT = "UPDATE launcher SET heartbeat = ?, stopped = NULL WHERE id = ?"
_KILLED = (
    "SELECT id FROM task INDEXED BY ix_task_killed"
    f" WHERE lease_launcher_id = ? AND {models.KILLED_HELD}"
)
#: Lease expiry: lost launchers (no heartbeat since the parameter), and leases with a
#: time of their own that ran out.  Like the kills, each is read through a small partial
#: index, not by a pass over the held tasks (which ``ix_task_lease`` would be).
_LOST = "SELECT id, heartbeat FROM launcher WHERE stopped IS NULL AND heartbeat < ?"
_EXPIRED = (
    "SELECT id, state, lease_launcher_id FROM task INDEXED BY ix_task_lease_expires"
    " WHERE lease_expires < ? AND lease_launcher_id IS NOT NULL"
)
_HELD_BY = "SELECT id, state, lease_launcher_id FROM task WHERE lease_launcher_id {ids}"
_UNLEASE_IDS = _UNLEASE + " id {ids}"
_STOPPED_LOST = "UPDATE launcher SET stopped = heartbeat WHERE id {ids}"
#: Release: the launcher's row first (the order every writer of both takes), then its
#: leases: RUNNING tasks (whose end it could not report) keep theirs until ``lease_s``
#: from now, when :meth:`DatabaseTaskSource.expire_leases` reclaims them.
_RELEASE = "UPDATE launcher SET stopped = ? WHERE id = ?"
_KEEP_RUNNING = (
    "UPDATE task SET lease_expires = ? WHERE lease_launcher_id = ? AND state = 'RUNNING'"
)
_UNLEASE_HELD = _UNLEASE + " lease_launcher_id = ? AND state <> 'RUNNING'"


class DatabaseTaskSource:
    """Leases tasks from the site database (see the module docstring)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.lease_s = site.config.launcher.lease_s
        self._infos: dict[int, LauncherInfo] = {}
        self._lease_statements_of: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    @classmethod
    def from_context(cls, context: PluginContext) -> DatabaseTaskSource:
        return cls(Site(context.config))

    def register(self, info: LauncherInfo) -> int:
        now = time.time()
        with self.site.db.session(write=True) as s:
            launcher_id = RawSql(s).insert(_REGISTER, [
                info.host, info.pid, info.mode, info.batch_job_id, info.workflow,
                models.dump_json(dict(info.tags)), now, now,
            ])
        self._infos[launcher_id] = info
        return launcher_id

    def _info(self, launcher_id: int) -> LauncherInfo:
        """The launcher's filters and batch job (from its row if another instance registered it)."""
        info = self._infos.get(launcher_id)
        if info is None:
            with self.site.db.session() as s:
                row = s.get(Launcher, launcher_id)
                if row is None:
                    raise ValueError(f"no launcher with id {launcher_id}")
                info = LauncherInfo(
                    row.host, row.pid, row.mode, row.batch_job_id, row.workflow, dict(row.tags)
                )
            self._infos[launcher_id] = info
        return info

    def lease(
        self, launcher_id: int, free: Sequence[NodeResources], limit: int
    ) -> list[LeasedTask]:
        if not free or limit <= 0:
            return []
        now = time.time()
        info = self._info(launcher_id)
        idle = len({n.name for n in free if n.idle})
        max_cpus = max(n.cpus for n in free)
        max_gpus = max(len(n.gpu_ids) for n in free)
        with self.site.transaction() as tx:
            raw = RawSql(tx.session)
            statements, filters = self._lease_statements(launcher_id, info, raw.postgres)
            params = [now, idle, max_cpus, max_gpus, *filters, limit]
            rows = [
                _LeaseRow._make(row)
                for sql in statements for row in raw.execute(sql, params).fetchall()
            ]
            rows.sort(key=operator.itemgetter(0))  # by id
            chosen = fitting(rows[:limit], free)
            if not chosen:
                return []
            tasks = [task for task, _ in chosen]
            tx.apply(
                [c for t in tasks if t.state not in _RUNNABLE for c in skip(t.id, State(t.state))],
                launcher_id=launcher_id, batch_job_id=info.batch_job_id,
                states={t.id: State(t.state) for t in tasks},
            )
            raw.execute(
                _LEASE,
                [launcher_id, info.batch_job_id, raw.ids(t.id for t in tasks)],
            )
            return [self._leased(task, req) for task, req in chosen]

    def _lease_statements(
        self, launcher_id: int, info: LauncherInfo, postgres: bool
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The launcher's lease statements, one per leasable state, and the values of its
        filters (fixed per launcher: made once).

        One query per state: with ``state = '...'`` the (state, id) index gives rows in
        id order, so a lease reads about ``limit`` rows of each state.  One query over
        all of them read and sorted every row in those states: with a large backlog,
        every lease cost milliseconds per thousand tasks.
        """
        made = self._lease_statements_of.get(launcher_id)
        if made is None:
            filters = _WORKFLOW_FILTER if info.workflow is not None else ""
            filters += _TAG_FILTER * len(info.tags)
            values = [info.workflow] if info.workflow is not None else []
            for key, value in info.tags.items():
                values += [key, str(value)]
            lock = " FOR UPDATE OF task SKIP LOCKED" if postgres else ""
            statements = tuple(
                _LEASE_SELECT.format(leasable=leasable_sql(state), filters=filters, lock=lock)
                for state in LEASED_FROM
            )
            made = self._lease_statements_of[launcher_id] = (statements, tuple(values))
        return made

    def _leased(self, task: _LeaseRow, req: TaskRequirements) -> LeasedTask:
        """A lease's row (with its requirements) as what the launcher runs."""
        app_command = load_json(task.app_command)
        argv = tuple(
            render_argv(app_command, load_json(task.parameters)) if app_command is not None
            else load_json(task.command) or ()
        )
        return LeasedTask(
            task_id=task.id,
            name=task.name,
            workflow=task.workflow,
            argv=argv,
            workdir=models.workdir_of(task),
            env=task_environment(load_json(task.app_environment), load_json(task.environment)),
            requirements=req,
            state=State(task.state) if task.state in _RUNNABLE else State.PREPROCESSED,
            num_retries=task.num_retries,
            post_error_handler=bool(task.post_error_handler),
            post_timeout_handler=bool(task.post_timeout_handler),
            auto_timeout_retry=bool(task.auto_timeout_retry),
            mpi_flags=tuple(load_json(task.mpi_flags) or ()),
        )

    def report(self, launcher_id: int, updates: Sequence[StateUpdate]) -> list[int]:
        """Apply the holder's updates in one transaction; refuse (and return) the ids it
        no longer holds, that were killed, or whose move the state table forbids."""
        if not updates:
            return []
        ids = sorted({u.task_id for u in updates})
        info = self._info(launcher_id)
        with self.site.transaction() as tx:
            raw = RawSql(tx.session)
            states: dict[int, State] = {}
            clean_end: set[int] = set()  # a clean run of these is their end
            held = raw.execute(
                _HELD + (" FOR UPDATE OF task" if raw.postgres else ""),
                [raw.ids(ids), launcher_id],
            ).fetchall()
            for task_id, state, clean in held:
                states[task_id] = State(state)
                if clean:
                    clean_end.add(task_id)
            before = dict(states)
            refused: set[int] = set()
            changes: list[StateUpdate] = []  # the accepted ones, and the steps they skip
            for u in updates:
                current = states.get(u.task_id)
                if u.task_id in refused or current in (None, State.USER_KILLED):
                    refused.add(u.task_id)
                elif current == u.state and u.state == State.RUNNING:
                    continue  # a batch retried after its commit was lost: applied already
                elif not is_allowed(current, u.state):  # type: ignore[arg-type]
                    log.warning(
                        "launcher %d reported task %d %s -> %s, which is not allowed: refused",
                        launcher_id, u.task_id, current, u.state,
                    )
                    refused.add(u.task_id)
                else:
                    changes.append(u)
                    if u.state is State.RUN_DONE and u.task_id in clean_end:
                        changes += skip(u.task_id, State.RUN_DONE)
                    states[u.task_id] = changes[-1].state
            tx.apply(
                changes, launcher_id=launcher_id, batch_job_id=info.batch_job_id, states=before
            )
            done = [c.task_id for c in changes if c.state is not State.RUNNING]
            if done:
                raw.execute(_UNLEASE_ENDED, [raw.ids(done), State.RUNNING.value])
        return sorted(refused)

    def heartbeat(self, launcher_id: int) -> set[int]:
        with self.site.db.session(write=True) as s:
            raw = RawSql(s)
            raw.execute(_HEARTBEAT, [time.time(), launcher_id])
            return {task_id for (task_id,) in raw.execute(_KILLED, [launcher_id]).fetchall()}

    def release(self, launcher_id: int) -> None:
        """Give back leases of tasks not running; a RUNNING task keeps its lease for
        ``lease_s``, after which :meth:`expire_leases` reclaims it (its end was never
        reported)."""
        now = time.time()
        with self.site.db.session(write=True) as s:
            raw = RawSql(s)
            raw.execute(_RELEASE, [now, launcher_id])
            raw.execute(_KEEP_RUNNING, [now + self.lease_s, launcher_id])
            raw.execute(_UNLEASE_HELD, [launcher_id])
        self._infos.pop(launcher_id, None)
        self._lease_statements_of.pop(launcher_id, None)

    def expire_leases(self, now: float) -> int:
        """Reclaim up to :data:`RECLAIM_BATCH` tasks of lost launchers (no heartbeat for
        ``lease_s``; marked stopped once none is left) or whose own lease time ran out:
        RUNNING tasks -> RUN_TIMEOUT ("launcher N lost: lease expired"; the recovery
        chain takes them from there), other leases cleared.  Cheap when there is nothing
        to reclaim (two reads of small indexes, no write lock), so every launcher calls
        it with its heartbeat."""
        lost_before = now - self.lease_s
        with self.site.db.session() as s:
            raw = RawSql(s)
            if (
                raw.execute(_LOST + " LIMIT 1", [lost_before]).fetchone() is None
                and raw.execute(_EXPIRED + " LIMIT 1", [now]).fetchone() is None
            ):
                return 0
        with self.site.transaction() as tx:
            raw = RawSql(tx.session)
            # On PostgreSQL, a launcher's row is locked before its tasks (as its release
            # does); NO KEY UPDATE leaves the key-share locks of event inserts alone.
            lost = dict(raw.execute(
                _LOST + (" FOR NO KEY UPDATE SKIP LOCKED" if raw.postgres else ""), [lost_before]
            ).fetchall())
            expired = {row[0]: row for row in raw.execute(
                _EXPIRED + " LIMIT ?" + (" FOR UPDATE SKIP LOCKED" if raw.postgres else ""),
                [now, RECLAIM_BATCH],
            ).fetchall()}
            room = RECLAIM_BATCH - len(expired)
            if lost and room > 0:
                # Not SKIP LOCKED: a lost launcher is marked stopped once this finds none
                # of its tasks left, so a task skipped here would stay leased to it forever.
                held = raw.execute(
                    _HELD_BY + " LIMIT ?" + (" FOR UPDATE" if raw.postgres else ""),
                    [raw.ids(lost), room],
                ).fetchall()
                expired.update((row[0], row) for row in held)
                if len(held) < room:
                    raw.execute(_STOPPED_LOST, [raw.ids(lost)])
            tx.apply([
                Change(task_id, State.RUN_TIMEOUT, f"launcher {who} lost: lease expired" + (
                    f" (no heartbeat for {now - lost[who]:.0f} s)" if who in lost else ""
                ))
                for task_id, state, who in expired.values()
                if state == State.RUNNING.value
            ])
            if expired:
                raw.execute(_UNLEASE_IDS, [raw.ids(expired)])
        return len(expired)


@hookimpl
def balsam_task_sources() -> list[TaskSourcePlugin]:
    return [
        TaskSourcePlugin(
            "database",
            DatabaseTaskSource.from_context,
            "lease runnable tasks from the site database (SQLite or PostgreSQL)",
        )
    ]
