"""SQLAlchemy 2 models of the site database (DESIGN §4).

Times are epoch seconds (float): portable across SQLite and PostgreSQL, cheap to
compare, and formatted only for display.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


_encode = json.JSONEncoder(separators=(",", ":")).encode


def dump_json(value: Any) -> str | None:
    """Serialize a JSON column value the way :class:`JSON` stores it."""
    if value is None:
        return None
    if not value:
        return "[]" if isinstance(value, (list, tuple)) else "{}"
    return _encode(value)


class JSON(TypeDecorator[Any]):
    """JSON kept in a TEXT column, serialized by us.

    Cheaper than the dialects' JSON types for bulk inserts of mostly empty values
    (no per-value round trip through a generic serializer) and identical on SQLite
    and PostgreSQL; nothing queries inside these values.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return dump_json(value)

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return load_json(value)


_EMPTY_JSON = {"[]": list, "{}": dict}


def load_json(value: str | None) -> Any:
    """A :class:`JSON` column's value from its stored text (rows read without SQLAlchemy)."""
    if value is None:
        return None
    empty = _EMPTY_JSON.get(value)  # most values: decoding them dominated reading rows
    return empty() if empty is not None else json.loads(value)


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value facts about the database itself, e.g. ``schema_version``."""

    __tablename__ = "balsam_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class App(Base):
    """A program and how to call it: an argv template with ``{param}`` fields."""

    __tablename__ = "app"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    command: Mapped[list[str]] = mapped_column(JSON)
    preprocess: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    postprocess: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    envscript: Mapped[str | None] = mapped_column(Text, default=None)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[float] = mapped_column(Float, default=time.time)


#: SQL: the task names files to stage in (its ``input_files`` or ``stage_in`` are not
#: empty).  The partial index ``ix_task_staging`` holds exactly these tasks, and a query
#: uses it only when it repeats this text.
HAS_STAGING = "input_files != '[]' OR stage_in != '[]'"

#: SQL: a killed task still leased to a launcher (which has yet to end it): the rows of
#: the partial index ``ix_task_killed``, which a query uses only when it repeats this text.
KILLED_HELD = "state = 'USER_KILLED' AND lease_launcher_id IS NOT NULL"


def _partial_index(name: str, *columns: str, where: str) -> Index:
    """An index of the rows matching the SQL condition *where*, on SQLite and PostgreSQL."""
    return Index(name, *columns, sqlite_where=text(where), postgresql_where=text(where))


class Task(Base):
    """One run of a program, its resources, its place in the DAG, and its state."""

    __tablename__ = "task"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    workflow: Mapped[str] = mapped_column(String(200), default="default")
    app_id: Mapped[int | None] = mapped_column(ForeignKey("app.id"), default=None)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: A literal argv when the task has no app.
    command: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    #: Relative to the site's ``data/``; None means ``<workflow>/<name>_<id>``.
    workdir: Mapped[str | None] = mapped_column(Text, default=None)
    num_nodes: Mapped[int] = mapped_column(Integer, default=1)
    ranks_per_node: Mapped[int] = mapped_column(Integer, default=1)
    threads_per_rank: Mapped[int] = mapped_column(Integer, default=1)
    gpus_per_rank: Mapped[int] = mapped_column(Integer, default=0)
    node_packing_count: Mapped[int] = mapped_column(Integer, default=1)
    wall_time_min: Mapped[float] = mapped_column(Float, default=0.0)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mpi_flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    input_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    stage_in: Mapped[list[Any]] = mapped_column(JSON, default=list)
    stage_out: Mapped[list[Any]] = mapped_column(JSON, default=list)
    post_error_handler: Mapped[bool] = mapped_column(Boolean, default=False)
    post_timeout_handler: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_timeout_retry: Mapped[bool] = mapped_column(Boolean, default=True)
    num_retries: Mapped[int] = mapped_column(Integer, default=0)
    #: Per-task override of ``[recovery] max_retries``.
    max_retries: Mapped[int | None] = mapped_column(Integer, default=None)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    return_code: Mapped[int | None] = mapped_column(Integer, default=None)
    state: Mapped[str] = mapped_column(String(32))
    state_time: Mapped[float] = mapped_column(Float, default=time.time)
    #: Which task spawned this one at run time (lineage, not a dependency).
    spawned_by: Mapped[int | None] = mapped_column(
        ForeignKey("task.id", ondelete="SET NULL"), default=None
    )
    lease_launcher_id: Mapped[int | None] = mapped_column(
        ForeignKey("launcher.id", ondelete="SET NULL"), default=None
    )
    lease_expires: Mapped[float | None] = mapped_column(Float, default=None)
    batch_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("batch_job.id", ondelete="SET NULL"), default=None
    )
    created: Mapped[float] = mapped_column(Float, default=time.time)

    app: Mapped[App | None] = relationship(lazy="joined")
    tag_rows: Mapped[list[TaskTag]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        Index("ix_task_state_id", "state", "id"),
        Index("ix_task_workflow_state_id", "workflow", "state", "id"),
        # Partial: most tasks have neither, and bulk inserts then skip these indexes.
        _partial_index("ix_task_lease", "lease_launcher_id", where="lease_launcher_id IS NOT NULL"),
        # What a heartbeat and a lease expiry read, without a pass over every held task.
        _partial_index("ix_task_killed", "lease_launcher_id", where=KILLED_HELD),
        _partial_index("ix_task_lease_expires", "lease_expires", where="lease_expires IS NOT NULL"),
        # Partial: what the processing worker looks for among a backlog of tasks with
        # nothing to do before their run (``fastforward.work_before_run``).
        _partial_index("ix_task_staging", "state", "id", where=HAS_STAGING),
        _partial_index("ix_task_app_state", "app_id", "state", where="app_id IS NOT NULL"),
        _partial_index("ix_task_spawned_by", "spawned_by", where="spawned_by IS NOT NULL"),
        {"sqlite_autoincrement": True},
    )

    @property
    def tags(self) -> dict[str, str]:
        """The task's ``key=value`` tags."""
        return {t.key: t.value for t in self.tag_rows}

    @property
    def default_workdir(self) -> str:
        """``<workflow>/<name>_<id>``: the working directory of a task that names none."""
        return _default_workdir(self)


#: Where, in its working directory, a task's standard output and error go.
STDOUT_FILE, STDERR_FILE = "stdout", "stderr"


def _default_workdir(row: Any) -> str:
    return f"{row.workflow}/{row.name}_{row.id}"


def workdir_of(row: Any) -> str:
    """A task's working directory relative to data/: its own, or the default one
    (*row*: a Task or a row with its ``id``, ``name``, ``workflow`` and ``workdir``)."""
    return row.workdir or _default_workdir(row)


class TaskTag(Base):
    """One ``key=value`` tag of a task, kept in its own table so filters use an index."""

    __tablename__ = "task_tag"
    task_id: Mapped[int] = mapped_column(
        ForeignKey("task.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(String(400))

    __table_args__ = (Index("ix_task_tag_kv", "key", "value", "task_id"),)


class TaskDependency(Base):
    """``child`` waits for ``parent`` to finish."""

    __tablename__ = "task_dependency"
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("task.id", ondelete="CASCADE"), primary_key=True
    )
    child_id: Mapped[int] = mapped_column(
        ForeignKey("task.id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_task_dependency_child", "child_id", "parent_id"),)


class TaskEvent(Base):
    """Append-only provenance: one row per state change."""

    __tablename__ = "task_event"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("task.id", ondelete="CASCADE"))
    time: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    launcher_id: Mapped[int | None] = mapped_column(Integer, default=None)
    batch_job_id: Mapped[int | None] = mapped_column(Integer, default=None)

    __table_args__ = (
        Index("ix_task_event_task", "task_id", "time"),
        Index("ix_task_event_time", "time"),
    )


class BatchJob(Base):
    """A batch-job request and what the scheduler made of it."""

    __tablename__ = "batch_job"
    id: Mapped[int] = mapped_column(primary_key=True)
    scheduler_id: Mapped[str | None] = mapped_column(String(200), default=None, index=True)
    queue: Mapped[str] = mapped_column(String(200))
    project: Mapped[str] = mapped_column(String(200), default="")
    num_nodes: Mapped[int] = mapped_column(Integer)
    wall_time_min: Mapped[int] = mapped_column(Integer)
    job_mode: Mapped[str] = mapped_column(String(32), default="mpi")
    filter_workflow: Mapped[str | None] = mapped_column(String(200), default=None)
    filter_tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(32), index=True)
    native_state: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    #: Who asked for it: "user" (``balsam queue submit``, the API) or "service"; the
    #: service retires only its own queued jobs.
    origin: Mapped[str] = mapped_column(String(32), default="user", server_default="user")
    created: Mapped[float] = mapped_column(Float, default=time.time)
    submit_time: Mapped[float | None] = mapped_column(Float, default=None)
    start_time: Mapped[float | None] = mapped_column(Float, default=None)
    end_time: Mapped[float | None] = mapped_column(Float, default=None)


class BatchJobEvent(Base):
    """Append-only history of a batch job: one row per Balsam state change."""

    __tablename__ = "batch_job_event"
    id: Mapped[int] = mapped_column(primary_key=True)
    batch_job_id: Mapped[int] = mapped_column(ForeignKey("batch_job.id", ondelete="CASCADE"))
    time: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    native_state: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_batch_job_event_job", "batch_job_id", "time"),)


class Launcher(Base):
    """A running (or once running) pilot launcher and its heartbeat."""

    __tablename__ = "launcher"
    id: Mapped[int] = mapped_column(primary_key=True)
    batch_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("batch_job.id", ondelete="SET NULL"), default=None
    )
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(32), default="mpi")
    #: The launcher's task filters: only this workflow / these tags.
    workflow: Mapped[str | None] = mapped_column(String(200), default=None)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started: Mapped[float] = mapped_column(Float, default=time.time)
    heartbeat: Mapped[float] = mapped_column(Float, default=time.time)
    #: When it stopped: its release, or its last heartbeat once another process found it
    #: lost (no heartbeat for ``lease_s``) and reclaimed its tasks.
    stopped: Mapped[float | None] = mapped_column(Float, default=None)

    #: The launchers not known to have stopped: where a lease expiry looks for lost ones.
    __table_args__ = (_partial_index("ix_launcher_live", "heartbeat", where="stopped IS NULL"),)
