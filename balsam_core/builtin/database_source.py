"""Task source ``database``: leases runnable tasks straight from the site database.

A lease is ``(lease_launcher_id, lease_expires)`` on the task row, taken in the same
transaction that picks the rows: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
``BEGIN IMMEDIATE`` write lock on SQLite — so each runnable task goes to exactly one
launcher.  State reports are accepted only from the lease holder; a kill is never
overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import and_, or_, select, update

from balsam_core import (
    RUNNABLE,
    Change,
    LeasedTask,
    LauncherInfo,
    NodeResources,
    PluginContext,
    Site,
    State,
    StateUpdate,
    TaskRequirements,
    TaskSourcePlugin,
    hookimpl,
    models,
    render_argv,
)

Task, TaskTag, Launcher = models.Task, models.TaskTag, models.Launcher


class DatabaseTaskSource:
    """Leases tasks from the site database (see the module docstring)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.lease_s = site.config.launcher.lease_s
        self._filters: dict[int, LauncherInfo] = {}

    @classmethod
    def from_context(cls, context: PluginContext) -> DatabaseTaskSource:
        return cls(Site(context.config))

    def register(self, info: LauncherInfo) -> int:
        now = time.time()
        with self.site.db.session(write=True) as s:
            launcher = Launcher(
                host=info.host, pid=info.pid, mode=info.mode, batch_job_id=info.batch_job_id,
                started=now, heartbeat=now,
            )
            s.add(launcher)
            s.flush()
            self._filters[launcher.id] = info
            return launcher.id

    def lease(
        self, launcher_id: int, free: Sequence[NodeResources], limit: int
    ) -> list[LeasedTask]:
        if not free or limit <= 0:
            return []
        now = time.time()
        idle = sum(1 for n in free if n.idle)
        max_cpus = max(n.cpus for n in free)
        max_gpus = max(len(n.gpu_ids) for n in free)
        query = (
            select(Task)
            .where(
                Task.state.in_([st.value for st in RUNNABLE]),
                or_(Task.lease_launcher_id.is_(None), Task.lease_expires < now),
                or_(Task.num_nodes == 1, Task.num_nodes <= idle),
                Task.ranks_per_node * Task.threads_per_rank <= max_cpus,
                Task.ranks_per_node * Task.gpus_per_rank <= max_gpus,
            )
            .order_by(Task.id)
            .limit(limit)
        )
        info = self._filters.get(launcher_id)
        if info is not None:
            if info.workflow is not None:
                query = query.where(Task.workflow == info.workflow)
            for key, value in info.tags.items():
                query = query.where(
                    Task.id.in_(
                        select(TaskTag.task_id).where(TaskTag.key == key, TaskTag.value == value)
                    )
                )
        with self.site.db.session(write=True) as s:
            if s.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=Task)
            tasks = list(s.scalars(query))
            if not tasks:
                return []
            s.execute(
                update(Task)
                .where(Task.id.in_([t.id for t in tasks]))
                .values(lease_launcher_id=launcher_id, lease_expires=now + self.lease_s)
                .execution_options(synchronize_session=False)
            )
            return [self._leased(t) for t in tasks]

    def _leased(self, task: models.Task) -> LeasedTask:
        app = task.app
        if app is not None:
            argv = tuple(render_argv(app.command, task.parameters))
            env = {**app.environment, **task.environment}
        else:
            argv, env = tuple(task.command or ()), dict(task.environment)
        return LeasedTask(
            task_id=task.id,
            name=task.name,
            workflow=task.workflow,
            argv=argv,
            workdir=task.workdir or task.default_workdir,
            env=env,
            requirements=TaskRequirements(
                task_id=task.id,
                num_nodes=task.num_nodes,
                ranks_per_node=task.ranks_per_node,
                threads_per_rank=task.threads_per_rank,
                gpus_per_rank=task.gpus_per_rank,
                node_packing_count=task.node_packing_count,
                wall_time_min=task.wall_time_min,
                ready_since=task.state_time,
            ),
            state=State(task.state),
            num_retries=task.num_retries,
            post_error_handler=task.post_error_handler,
            post_timeout_handler=task.post_timeout_handler,
            auto_timeout_retry=task.auto_timeout_retry,
            mpi_flags=tuple(task.mpi_flags),
        )

    def report(self, launcher_id: int, updates: Sequence[StateUpdate]) -> list[int]:
        if not updates:
            return []
        ids = sorted({u.task_id for u in updates})
        with self.site.transaction() as tx:
            held = {
                task_id: state
                for task_id, state in tx.session.execute(
                    select(Task.id, Task.state).where(
                        Task.id.in_(ids), Task.lease_launcher_id == launcher_id
                    )
                )
            }
            refused = sorted(
                {u.task_id for u in updates if held.get(u.task_id) in (None, State.USER_KILLED)}
            )
            accepted = [u for u in updates if u.task_id not in refused]
            tx.apply(
                [Change(u.task_id, u.state, u.message, u.return_code) for u in accepted],
                launcher_id=launcher_id,
            )
            done = [u.task_id for u in accepted if u.state is not State.RUNNING]
            if done:
                tx.session.execute(
                    update(Task)
                    .where(Task.id.in_(done), Task.state != State.RUNNING.value)
                    .values(lease_launcher_id=None, lease_expires=None)
                    .execution_options(synchronize_session=False)
                )
        return refused

    def heartbeat(self, launcher_id: int) -> set[int]:
        now = time.time()
        with self.site.db.session(write=True) as s:
            s.execute(update(Launcher).where(Launcher.id == launcher_id).values(heartbeat=now))
            s.execute(
                update(Task)
                .where(Task.lease_launcher_id == launcher_id)
                .values(lease_expires=now + self.lease_s)
                .execution_options(synchronize_session=False)
            )
            return set(
                s.scalars(
                    select(Task.id).where(
                        Task.lease_launcher_id == launcher_id,
                        Task.state == State.USER_KILLED.value,
                    )
                )
            )

    def release(self, launcher_id: int) -> None:
        with self.site.db.session(write=True) as s:
            s.execute(
                update(Task)
                .where(Task.lease_launcher_id == launcher_id)
                .values(lease_launcher_id=None, lease_expires=None)
                .execution_options(synchronize_session=False)
            )
            s.execute(update(Launcher).where(Launcher.id == launcher_id).values(stopped=time.time()))
        self._filters.pop(launcher_id, None)

    def expire_leases(self, now: float) -> int:
        with self.site.transaction() as tx:
            expired = list(
                tx.session.execute(
                    select(Task.id, Task.state, Task.lease_launcher_id).where(
                        and_(Task.lease_expires.is_not(None), Task.lease_expires < now)
                    )
                )
            )
            tx.apply(
                [
                    Change(i, State.RUN_TIMEOUT, f"lease of launcher {who} expired")
                    for i, state, who in expired
                    if state == State.RUNNING.value
                ]
            )
            if expired:
                tx.session.execute(
                    update(Task)
                    .where(Task.id.in_([i for i, _, _ in expired]))
                    .values(lease_launcher_id=None, lease_expires=None)
                    .execution_options(synchronize_session=False)
                )
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
