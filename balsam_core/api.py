"""The Python API: open a site, manage apps and tasks, and act from inside a running task.

Researchers::

    from balsam_core.api import Site
    site = Site.open("~/runs/mysite")
    site.add_app("sim", "python sim.py --temp {temp}")
    ids = site.add_tasks({"app": "sim", "parameters": {"temp": t}} for t in range(1000))
    site.add_task(command="python reduce.py", parents=ids, name="reduce")

Inside a task the launcher started (``BALSAM_SITE`` and ``BALSAM_TASK_ID`` are set)::

    from balsam_core import api
    me = api.current_task()
    api.spawn_child(command=["./analyze", "out.h5"])

Every call runs in one transaction: on any error nothing is written.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, text, update
from sqlalchemy.orm import Session, aliased

from . import config as config_mod
from . import migrations, taskspec, transitions
from .db import Database, bulk_insert, resolve_url, safe_url
from .errors import DependencyCycle, NotFound, ValidationError
from .models import JSON, App, Task, TaskDependency, TaskEvent, TaskTag, dump_json
from .plugin_types import TransitionEvent
from .plugins import PluginManager, get_plugin_manager
from .site import SITE_ENV, find_site_dir, make_site_dir, render_config
from .states import END, NOT_STARTED, RETRYABLE, State, parse_state
from .transitions import Change, chunks

TASK_ENV = "BALSAM_TASK_ID"


class Site:
    """An opened site: its configuration, its database and the plugins it composes."""

    def __init__(self, config: config_mod.SiteConfig, plugins: PluginManager | None = None):
        self.config = config
        self.plugins = plugins or get_plugin_manager()
        url = resolve_url(config.site.database, config.site_dir)
        self.db = Database(url, config.site.busy_timeout_s)

    def __repr__(self) -> str:
        return f"Site({str(self.config.site_dir)!r})"

    # ------------------------------------------------------------------ open / create

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Site:
        """Open the site at *path* (else ``$BALSAM_SITE``, else the cwd or a parent).

        The plugins the site selects, and their settings, are checked first.
        """
        site = cls(config_mod.load(find_site_dir(path)))
        site.plugins.check_site(site.config)
        site.db.check_schema()
        return site

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        database: str = "sqlite:///balsam.db",
        scheduler: str = "local",
        mpi: str = "direct",
        packing: str = "fifo",
        task_source: str = "database",
        cpus_per_node: int = 0,
        gpus_per_node: int = 0,
        plugins: PluginManager | None = None,
    ) -> Site:
        """Create a site: folders, a commented ``balsam.toml``, and the database schema.

        The plugin names are checked before anything is written.
        """
        plugins = plugins or get_plugin_manager()
        for kind, value in (
            ("scheduler", scheduler),
            ("mpi_launcher", mpi),
            ("packing_strategy", packing),
            ("task_source", task_source),
        ):
            plugins.get(kind, value)
        if cpus_per_node < 0 or gpus_per_node < 0:
            raise ValidationError("cpus_per_node and gpus_per_node must be >= 0")
        site_dir = Path(path).expanduser().resolve()
        text_ = render_config(
            name=name or site_dir.name,
            database=database,
            scheduler=scheduler,
            mpi=mpi,
            packing=packing,
            task_source=task_source,
            cpus_per_node=cpus_per_node,
            gpus_per_node=gpus_per_node,
        )
        # Validate the exact text we are about to write, before creating anything.
        config = config_mod.from_dict(config_mod.tomllib.loads(text_), site_dir)
        site = cls(config, plugins)
        existed = site_dir.exists()
        make_site_dir(site_dir)
        try:
            if site.db.is_sqlite and site.db.url.database:
                db_file = Path(site.db.url.database)
                db_file.parent.mkdir(parents=True, exist_ok=True)
                db_file.touch(mode=0o600, exist_ok=True)
                db_file.chmod(0o600)
            site.db.create_schema()
            # Written last: a directory with a balsam.toml is a complete site.
            config_file = site_dir / config_mod.CONFIG_NAME
            config_file.touch(mode=0o600)  # it may hold a database password
            config_file.write_text(text_)
        except BaseException:
            site.db.dispose()
            shutil.rmtree(site_dir) if not existed else _empty(site_dir)
            raise
        return site

    @property
    def site_dir(self) -> Path:
        return self.config.site_dir

    def selected(self, kind: str) -> Any:
        """A new instance of the plugin the site selects for *kind* (``scheduler``,
        ``mpi_launcher``, ``task_source``, ``packing_strategy``)."""
        return self.plugins.create(kind, self.config.selections()[kind][0], self.config)

    def info(self) -> dict[str, Any]:
        """What the site is made of: paths, database (password hidden), the plugin stack."""
        stack = {}
        for kind, names in self.config.selections().items():
            stack[kind] = [
                {"name": n, "provider": str(self.plugins.get(kind, n).provider)} for n in names
            ]
        with self.db.session() as s:
            counts = dict(s.execute(select(Task.state, func.count()).group_by(Task.state)).all())
        return {
            "name": self.config.site.name,
            "site_dir": str(self.site_dir),
            "config": str(self.config.path),
            "database": safe_url(self.db.url),
            "schema_version": migrations.SCHEMA_VERSION,
            "plugins": stack,
            "tasks": counts,
        }

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[_Tx]:
        """One database transaction; observers hear of its transitions after it commits."""
        tx = _Tx()
        with self.db.session(write=write) as session:
            tx.session = session
            yield tx
        self.plugins.notify_transitions(tx.events)

    def transition(
        self, changes: Sequence[Change], *, launcher_id: int | None = None
    ) -> list[TransitionEvent]:
        """Apply state changes (checked against the state table) in one transaction."""
        with self.transaction() as tx:
            tx.apply(changes, launcher_id=launcher_id)
        return tx.events

    def set_state(self, task_id: int, state: str | State, message: str = "") -> None:
        """Move one task to *state* (e.g. from an error handler deciding the outcome)."""
        try:
            target = parse_state(state)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        self.transition([Change(task_id, target, message)])

    # ------------------------------------------------------------------ apps

    def add_app(
        self,
        name: str,
        command: str | Sequence[str],
        *,
        preprocess: str | Sequence[str] | None = None,
        postprocess: str | Sequence[str] | None = None,
        envscript: str | None = None,
        environment: Mapping[str, str] | None = None,
        description: str = "",
    ) -> App:
        """Register an app: an argv template whose ``{name}`` fields tasks fill in."""
        where = f"app '{name}'"
        if not name or "/" in name or name != name.strip():
            raise ValidationError(f"app name {name!r} must be non-empty, without '/' or spaces")
        argv = taskspec.parse_argv(command, where)
        taskspec.template_fields(argv)
        app = App(
            name=name,
            command=argv,
            preprocess=taskspec.parse_argv(preprocess, where, "preprocess") if preprocess else None,
            postprocess=(
                taskspec.parse_argv(postprocess, where, "postprocess") if postprocess else None
            ),
            envscript=envscript,
            environment=taskspec.check_environment(environment, "environment", where),
            description=description,
        )
        with self.transaction() as tx:
            if tx.session.scalar(select(App.id).where(App.name == name)) is not None:
                raise ValidationError(f"app '{name}' already exists (remove it first)")
            tx.session.add(app)
        return app

    def apps(self) -> list[App]:
        """Every app, by name."""
        with self.db.session() as s:
            return list(s.scalars(select(App).order_by(App.name)))

    def app(self, name: str) -> App:
        """The app called *name*."""
        with self.db.session() as s:
            return self._app(s, name)

    @staticmethod
    def _app(session: Session, name: str) -> App:
        app = session.scalar(select(App).where(App.name == name))
        if app is None:
            known = ", ".join(session.scalars(select(App.name).order_by(App.name))) or "none"
            raise NotFound(f"no app named '{name}' (apps: {known})")
        return app

    def remove_app(self, name: str) -> None:
        """Remove an app no task uses."""
        with self.transaction() as tx:
            app = self._app(tx.session, name)
            used = tx.session.scalar(select(func.count()).where(Task.app_id == app.id))
            if used:
                raise ValidationError(f"app '{name}' is used by {used} task(s); remove them first")
            tx.session.delete(app)

    # ------------------------------------------------------------------ adding tasks

    def add_task(self, app: str | None = None, **spec: Any) -> Task:
        """Add one task; keyword arguments are the task fields (see :mod:`taskspec`)."""
        if app is not None:
            spec["app"] = app
        (task_id,) = self.add_tasks([spec], labels=["new task"])
        return self.task(task_id)

    def add_tasks(
        self,
        specs: Iterable[Mapping[str, Any]],
        *,
        labels: Sequence[str] | None = None,
        spawned_by: int | None = None,
    ) -> list[int]:
        """Add many tasks in one transaction; return their ids in order.

        Each spec is a mapping of task fields.  Errors name the spec as
        ``new task #N`` (N counted from 1), or by its entry in *labels* (e.g.
        ``tasks.jsonl line 7``), and nothing is written.
        """
        with _gc_paused():
            return self._add_tasks(list(specs), labels, spawned_by)

    def _add_tasks(
        self,
        specs: list[Mapping[str, Any]],
        labels: Sequence[str] | None,
        spawned_by: int | None,
    ) -> list[int]:
        if labels is None:
            labels = [f"new task #{i}" for i in range(1, len(specs) + 1)]
        elif len(labels) != len(specs):
            raise ValueError("add_tasks: one label per spec")
        rows = [taskspec.normalize_task(spec, where) for spec, where in zip(specs, labels)]
        if not rows:
            return []
        now = time.time()
        with self.transaction() as tx:
            ids, tx_events = self._insert_tasks(tx.session, rows, labels, spawned_by, now)
            tx.events += tx_events
        return ids

    def _insert_tasks(
        self,
        session: Session,
        rows: list[dict[str, Any]],
        labels: Sequence[str],
        spawned_by: int | None,
        now: float,
    ) -> tuple[list[int], list[TransitionEvent]]:
        app_names = {r["app"] for r in rows if r["app"] is not None}
        apps = {a.name: a for a in session.scalars(select(App).where(App.name.in_(app_names)))}
        fields = {name: taskspec.template_fields(a.command) for name, a in apps.items()}
        parent_ids = sorted({p for r in rows for p in r["parents"]})
        parent_states = transitions.current_states(session, parent_ids, lock=False)
        for where, row in zip(labels, rows):
            name = row.pop("app")
            if name is not None:
                if name not in apps:
                    known = ", ".join(sorted(session.scalars(select(App.name)))) or "none"
                    raise ValidationError(f"{where}: no app named '{name}' (apps: {known})")
                if row["parameters"].keys() != fields[name]:
                    taskspec.check_parameters(name, fields[name], row["parameters"], where)
                row["app_id"] = apps[name].id
            else:
                row["app_id"] = None
            for parent in row["parents"]:
                state = parent_states.get(parent)
                if state is None:
                    raise ValidationError(f"{where}: parent task {parent} does not exist")
                if state in (State.FAILED, State.USER_KILLED):
                    raise ValidationError(
                        f"{where}: parent task {parent} is {state.value}; retry it first"
                    )
        ids = self._allocate_ids(session, len(rows))
        n = len(rows)
        finished = State.JOB_FINISHED
        states = [
            State.AWAITING_PARENTS
            if any(parent_states[p] is not finished for p in r["parents"])
            else State.READY
            for r in rows
        ]
        constants = {
            "state_time": now, "created": now, "spawned_by": spawned_by, "num_retries": 0,
            "return_code": None, "lease_launcher_id": None, "lease_expires": None,
            "batch_job_id": None,
        }
        table = Task.__table__
        by_column: dict[str, Sequence[Any]] = {"id": ids, "state": [s.value for s in states]}
        for column in table.columns:
            name = column.name
            if name in by_column:
                continue
            if name in constants:
                by_column[name] = [constants[name]] * n
                continue
            values = [r[name] for r in rows]
            if isinstance(column.type, JSON):
                first = values[0]
                if all(v is first for v in values):  # a shared default: serialize once
                    values = [dump_json(first)] * n
                else:
                    values = [dump_json(v) for v in values]
            by_column[name] = values
        bulk_insert(session, table, by_column)
        deps = [(p, task_id) for task_id, r in zip(ids, rows) for p in r["parents"]]
        if deps:
            parent_col, child_col = zip(*deps)
            bulk_insert(
                session, TaskDependency.__table__, {"parent_id": parent_col, "child_id": child_col}
            )
        tags = [(task_id, k, v) for task_id, r in zip(ids, rows) for k, v in r["tags"].items()]
        if tags:
            task_col, key_col, value_col = zip(*tags)
            bulk_insert(
                session, TaskTag.__table__, {"task_id": task_col, "key": key_col, "value": value_col}
            )
        message = "created" if spawned_by is None else f"spawned by task {spawned_by}"
        events = [
            TransitionEvent(task_id, State.CREATED, state, now, message)
            for task_id, state in zip(ids, states)
        ]
        transitions.record_events(session, events)
        return ids, events

    @staticmethod
    def _allocate_ids(session: Session, count: int) -> list[int]:
        """Reserve *count* new task ids (inside the write transaction)."""
        if session.get_bind().dialect.name == "postgresql":
            return list(
                session.scalars(
                    text("SELECT nextval('task_id_seq') FROM generate_series(1, :n)"),
                    {"n": count},
                )
            )
        # SQLite: the caller holds the write lock (BEGIN IMMEDIATE), so the counter is
        # stable; AUTOINCREMENT's counter never goes down, so a deleted task's id (and
        # its default working directory) is never handed out again.
        used = session.scalar(text("SELECT seq FROM sqlite_sequence WHERE name = 'task'")) or 0
        start = max(used, session.scalar(select(func.max(Task.id))) or 0) + 1
        return list(range(start, start + count))

    # ------------------------------------------------------------------ dependencies

    def add_dependency(self, child: int, parents: int | Sequence[int]) -> None:
        """Make *child* wait for *parents*; a dependency that closes a cycle is refused."""
        parents = sorted({parents} if isinstance(parents, int) else set(parents))
        with self.transaction() as tx:
            s = tx.session
            states = transitions.current_states(s, [child, *parents])
            for task_id in (child, *parents):
                if task_id not in states:
                    raise NotFound(f"no task with id {task_id}")
            if states[child] not in NOT_STARTED:
                raise ValidationError(
                    f"task {child} is {states[child].value}: dependencies can only be added "
                    "before a task starts"
                )
            existing = set(
                s.scalars(select(TaskDependency.parent_id).where(TaskDependency.child_id == child))
            )
            new = [p for p in parents if p not in existing]
            for parent in new:
                cycle = _path(s, start=parent, goal=child)
                if cycle is not None:
                    chain = " -> ".join(str(t) for t in [child, *cycle])
                    raise DependencyCycle(
                        f"adding {parent} as parent of {child} closes a cycle: {chain} "
                        "(each waits for the next)"
                    )
            for parent in new:
                if states[parent] in (State.FAILED, State.USER_KILLED):
                    raise ValidationError(
                        f"parent task {parent} is {states[parent].value}; retry it first"
                    )
            if not new:
                return
            s.execute(
                insert(TaskDependency.__table__),
                [{"parent_id": p, "child_id": child} for p in new],
            )
            if states[child] is State.READY and any(
                states[p] is not State.JOB_FINISHED for p in new
            ):
                tx.apply([Change(child, State.AWAITING_PARENTS, f"now waits for {new}")])

    def parents(self, task_id: int) -> list[int]:
        """Ids of the tasks *task_id* waits for."""
        return self._linked(TaskDependency.parent_id, TaskDependency.child_id, task_id)

    def children(self, task_id: int) -> list[int]:
        """Ids of the tasks waiting for *task_id*."""
        return self._linked(TaskDependency.child_id, TaskDependency.parent_id, task_id)

    def _linked(self, wanted: Any, given: Any, task_id: int) -> list[int]:
        with self.db.session() as s:
            return list(s.scalars(select(wanted).where(given == task_id).order_by(wanted)))

    # ------------------------------------------------------------------ queries

    def task(self, task_id: int) -> Task:
        """The task with id *task_id*."""
        with self.db.session() as s:
            task = s.get(Task, task_id)
            if task is None:
                raise NotFound(f"no task with id {task_id}")
            return task

    def tasks(
        self,
        *,
        state: str | State | Sequence[str | State] | None = None,
        workflow: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent: int | None = None,
        ids: Sequence[int] | None = None,
        after_id: int | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        """Tasks matching every filter given, by id; page with *after_id* and *limit*."""
        first, *rest = list((tags or {}).items()) or [None]
        query = filter_tasks(
            select(Task), state=state, workflow=workflow, tags=dict(rest), parent=parent, ids=ids
        )
        order = Task.id
        if first is not None:
            # Driven from the tag index, whose entries for one key=value come in task id
            # order: a page needs no sort, and a tag no task has costs one index probe
            # (a correlated EXISTS would scan every candidate task).
            tag = aliased(TaskTag)
            query = query.join(
                tag, and_(tag.task_id == Task.id, tag.key == first[0], tag.value == str(first[1]))
            )
            order = tag.task_id
        if after_id is not None:
            query = query.where(order > after_id)
        query = query.order_by(order)
        if limit is not None:
            query = query.limit(limit)
        with self.db.session() as s:
            return list(s.scalars(query))

    def count(self, **filters: Any) -> dict[str, int]:
        """``{state: count}`` of the tasks matching the filters of :meth:`tasks`."""
        query = filter_tasks(select(Task.state, func.count()), **filters).group_by(Task.state)
        with self.db.session() as s:
            return dict(s.execute(query).all())

    def history(self, task_id: int) -> list[TaskEvent]:
        """Every recorded state change of the task, oldest first."""
        with self.db.session() as s:
            if s.get(Task, task_id) is None:
                raise NotFound(f"no task with id {task_id}")
            return list(
                s.scalars(
                    select(TaskEvent)
                    .where(TaskEvent.task_id == task_id)
                    .order_by(TaskEvent.time, TaskEvent.id)
                )
            )

    # ------------------------------------------------------------------ kill / retry / delete

    def kill(
        self, task_ids: int | Sequence[int], *, recursive: bool = False, reason: str = "killed"
    ) -> list[int]:
        """Kill tasks; return the ids that changed.

        Tasks already in an end state are left alone.  Dependants that can no longer
        run are killed in any case (DESIGN §5); ``recursive`` also kills every
        descendant in the DAG and every task spawned from these, whatever its state.
        """
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        with self.transaction() as tx:
            s = tx.session
            missing = set(ids) - set(transitions.current_states(s, ids, lock=False))
            if missing:
                raise NotFound(f"no task with id {min(missing)}")
            targets = set(ids) | (_descendants(s, ids) if recursive else set())
            states = transitions.current_states(s, sorted(targets))
            tx.apply(
                [
                    Change(t, State.USER_KILLED, reason)
                    for t in sorted(targets)
                    if states[t] not in END
                ]
            )
        return sorted({e.task_id for e in tx.events})

    def retry(self, task_ids: int | Sequence[int]) -> list[int]:
        """Run failed or errored tasks again; return their ids.

        A FAILED task goes back to READY (or AWAITING_PARENTS while a parent is
        unfinished); a task in RUN_ERROR / RUN_TIMEOUT to RESTART_READY.
        """
        ids = list(dict.fromkeys([task_ids] if isinstance(task_ids, int) else task_ids))
        with self.transaction() as tx:
            s = tx.session
            states = transitions.current_states(s, ids)
            changes = []
            waiting = transitions.unfinished_parent_counts(s, ids)
            for task_id in ids:
                if task_id not in states:
                    raise NotFound(f"no task with id {task_id}")
                state = states[task_id]
                if state not in RETRYABLE:
                    allowed = ", ".join(sorted(s.value for s in RETRYABLE))
                    raise ValidationError(
                        f"task {task_id} is {state.value}: only {allowed} tasks can be retried"
                    )
                if state is State.FAILED:
                    target = State.AWAITING_PARENTS if waiting.get(task_id) else State.READY
                else:
                    target = State.RESTART_READY
                changes.append(Change(task_id, target, "retry requested"))
            tx.apply(changes)
        return ids

    def delete(self, task_ids: int | Sequence[int], *, force: bool = False) -> int:
        """Delete tasks with their events, tags and dependencies; return how many.

        Running tasks, and tasks that others still wait for, are refused unless *force*.
        """
        ids = sorted(set([task_ids] if isinstance(task_ids, int) else task_ids))
        with self.transaction() as tx:
            s = tx.session
            states = transitions.current_states(s, ids)
            for task_id in ids:
                if task_id not in states:
                    raise NotFound(f"no task with id {task_id}")
                if states[task_id] is State.RUNNING and not force:
                    raise ValidationError(f"task {task_id} is RUNNING: kill it first")
            if not force:
                for part in chunks(ids):
                    waiting = s.execute(
                        select(TaskDependency.child_id, TaskDependency.parent_id)
                        .join(Task, Task.id == TaskDependency.child_id)
                        .where(
                            TaskDependency.parent_id.in_(part),
                            TaskDependency.child_id.not_in(ids),
                            Task.state.not_in([st.value for st in END]),
                        )
                        .limit(1)
                    ).first()
                    if waiting:
                        raise ValidationError(
                            f"task {waiting[1]} has dependant task {waiting[0]} still to run: "
                            "delete or kill it too"
                        )
            orphans = set()
            for part in chunks(ids):
                orphans |= set(
                    s.scalars(
                        select(TaskDependency.child_id).where(TaskDependency.parent_id.in_(part))
                    )
                )
            orphans -= set(ids)
            for part in chunks(ids):
                for model, column in (
                    (TaskEvent, TaskEvent.task_id),
                    (TaskTag, TaskTag.task_id),
                    (TaskDependency, TaskDependency.child_id),
                    (TaskDependency, TaskDependency.parent_id),
                ):
                    s.execute(delete(model).where(column.in_(part)))
                s.execute(update(Task).where(Task.spawned_by.in_(part)).values(spawned_by=None))
                s.execute(delete(Task).where(Task.id.in_(part)))
            # Dependants that waited only for deleted (or finished) parents can run now.
            waiting = transitions.current_states(s, sorted(orphans))
            still = transitions.unfinished_parent_counts(s, sorted(orphans))
            tx.apply(
                [
                    Change(c, State.READY, "remaining parents finished (others deleted)")
                    for c, state in waiting.items()
                    if state is State.AWAITING_PARENTS and not still.get(c)
                ]
            )
        return len(ids)


def filter_tasks(
    query: Any,
    *,
    state: str | State | Sequence[str | State] | None = None,
    workflow: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent: int | None = None,
    ids: Sequence[int] | None = None,
) -> Any:
    """*query* (a select over Task) narrowed to the tasks matching every filter given."""
    if state is not None:
        states = [state] if isinstance(state, (str, State)) else list(state)
        try:
            values = [parse_state(s).value for s in states]
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        query = query.where(Task.state.in_(values))
    if workflow is not None:
        query = query.where(Task.workflow == workflow)
    for key, value in (tags or {}).items():
        # Correlated EXISTS: checked per candidate row through the tag table's primary
        # key, instead of materializing every task carrying a common tag.
        query = query.where(
            select(TaskTag.task_id)
            .where(TaskTag.task_id == Task.id, TaskTag.key == key, TaskTag.value == str(value))
            .exists()
        )
    if parent is not None:
        query = query.where(
            Task.id.in_(select(TaskDependency.child_id).where(TaskDependency.parent_id == parent))
        )
    if ids is not None:
        query = query.where(Task.id.in_(list(ids)))
    return query


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a bulk add allocates millions of small,
    acyclic objects, and collections triggered by them cost a fifth of its time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _empty(directory: Path) -> None:
    """Remove everything inside *directory* (a failed ``init`` into an empty one)."""
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


class _Tx:
    """A transaction handle: the session and the transitions applied in it."""

    session: Session

    def __init__(self) -> None:
        self.events: list[TransitionEvent] = []

    def apply(self, changes: Sequence[Change], **kwargs: Any) -> list[TransitionEvent]:
        events = transitions.apply(self.session, changes, **kwargs)
        self.events += events
        return events


def _path(session: Session, start: int, goal: int) -> list[int] | None:
    """A chain of parent links from *start* up to *goal* (``[start, ..., goal]``), if any.

    Breadth-first over the dependency table, one query per level.
    """
    previous: dict[int, int | None] = {start: None}
    frontier = [start]
    while frontier:
        if goal in previous:
            break
        rows = []
        for part in chunks(frontier):
            rows += _parent_rows(session, part)
        frontier = []
        for child, parent in rows:
            if parent not in previous:
                previous[parent] = child
                frontier.append(parent)
    if goal not in previous:
        return None
    chain = [goal]
    while previous[chain[-1]] is not None:
        chain.append(previous[chain[-1]])  # type: ignore[arg-type]
    return list(reversed(chain))


def _parent_rows(session: Session, children: Sequence[int]) -> list[tuple[int, int]]:
    """``(child, parent)`` dependency rows of *children*."""
    return list(
        session.execute(
            select(TaskDependency.child_id, TaskDependency.parent_id).where(
                TaskDependency.child_id.in_(children)
            )
        ).all()
    )


def _descendants(session: Session, roots: Sequence[int]) -> set[int]:
    """Every task below *roots* through dependencies or spawning."""
    found: set[int] = set()
    frontier = list(roots)
    while frontier:
        new: set[int] = set()
        for part in chunks(frontier):
            new |= set(
                session.scalars(
                    select(TaskDependency.child_id).where(TaskDependency.parent_id.in_(part))
                )
            )
            new |= set(session.scalars(select(Task.id).where(Task.spawned_by.in_(part))))
        frontier = sorted(new - found - set(roots))
        found |= new
    return found - set(roots)


# ---------------------------------------------------------------------- inside a task


_current: Site | None = None


def current_site() -> Site:
    """The site of the running task (``$BALSAM_SITE``), opened once per process."""
    global _current
    wanted = find_site_dir(os.environ.get(SITE_ENV) or None)
    if _current is None or wanted != _current.site_dir:
        _current = Site.open(wanted)
    return _current


def current_task_id() -> int:
    """``$BALSAM_TASK_ID``, set by the launcher for the tasks it starts."""
    value = os.environ.get(TASK_ENV)
    if not value or not value.isdigit():
        raise ValidationError(f"${TASK_ENV} is not set: this process was not started by Balsam")
    return int(value)


def current_task() -> Task:
    """The task this process runs as."""
    return current_site().task(current_task_id())


def add_task(app: str | None = None, **spec: Any) -> Task:
    """Add a task to the running task's site; its workflow by default."""
    site = current_site()
    spec.setdefault("workflow", site.task(current_task_id()).workflow)
    return site.add_task(app, **spec)


def spawn_child(app: str | None = None, **spec: Any) -> Task:
    """Add a task spawned by the running one (recorded as ``spawned_by``); it runs at once
    unless it names parents. A recursive kill of the spawner reaches it."""
    site = current_site()
    me = current_task_id()
    spec.setdefault("workflow", site.task(me).workflow)
    if app is not None:
        spec["app"] = app
    (task_id,) = site.add_tasks([spec], labels=[f"child of task {me}"], spawned_by=me)
    return site.task(task_id)


def kill(task_id: int, *, recursive: bool = False) -> list[int]:
    """Kill a task of the running task's site, recording who asked."""
    reason = f"killed by task {os.environ.get(TASK_ENV, '?')} on {socket.gethostname()}"
    return current_site().kill(task_id, recursive=recursive, reason=reason)
