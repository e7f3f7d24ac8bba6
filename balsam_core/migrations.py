"""Schema versioning of the site database.

A justified stand-in for Alembic, which is not among Balsam's dependencies: the
schema is small and owned by one package, so versions are a number in the
``balsam_meta`` table and each step is a plain function run in one transaction
(transactional DDL on both SQLite and PostgreSQL).  A new database is created from
the models and stamped with :data:`SCHEMA_VERSION`; an older one is brought forward
by ``balsam site upgrade``, which runs the steps in order.

To change the schema: edit :mod:`balsam_core.models`, bump :data:`SCHEMA_VERSION`,
and add ``MIGRATIONS[n]`` that upgrades a version ``n-1`` database in place, e.g.::

    def _add_task_priority(conn: Connection) -> None:
        conn.exec_driver_sql("ALTER TABLE task ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    MIGRATIONS[2] = _add_task_priority

A step describes the tables as they were at its version (not through the models,
which keep changing), so that it does the same thing forever.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, Connection, Float, ForeignKey, Index, Integer, MetaData, String
from sqlalchemy import Table, Text

#: The schema version this code reads and writes.
SCHEMA_VERSION = 4


def _batch_job_history(conn: Connection) -> None:
    """Version 2: ``batch_job.origin`` and the ``batch_job_event`` history table."""
    conn.exec_driver_sql(
        "ALTER TABLE batch_job ADD COLUMN origin VARCHAR(32) NOT NULL DEFAULT 'user'"
    )
    meta = MetaData()
    Table("batch_job", meta, Column("id", Integer, primary_key=True))  # FK target only
    events = Table(
        "batch_job_event",
        meta,
        Column("id", Integer, primary_key=True),
        Column("batch_job_id", Integer, ForeignKey("batch_job.id", ondelete="CASCADE"),
               nullable=False),
        Column("time", Float, nullable=False),
        Column("from_state", String(32)),
        Column("to_state", String(32), nullable=False),
        Column("native_state", String(64), nullable=False),
        Column("message", Text, nullable=False),
        Index("ix_batch_job_event_job", "batch_job_id", "time"),
    )
    events.create(conn)


def _work_indexes(conn: Connection) -> None:
    """Version 3: the partial indexes through which the processing worker finds tasks
    with work before their run without reading the backlog of tasks that have none."""
    conn.exec_driver_sql(
        "CREATE INDEX ix_task_staging ON task (state, id) "
        "WHERE input_files != '[]' OR stage_in != '[]'"
    )
    conn.exec_driver_sql(
        "CREATE INDEX ix_task_app_state ON task (app_id, state) WHERE app_id IS NOT NULL"
    )


def _liveness_indexes(conn: Connection) -> None:
    """Version 4: the partial indexes through which a heartbeat finds its killed tasks and
    a lease expiry finds lost launchers and expired leases, each without a pass over the
    tasks that launchers hold (a launcher's leases last as long as its heartbeat)."""
    conn.exec_driver_sql(
        "CREATE INDEX ix_task_killed ON task (lease_launcher_id) "
        "WHERE state = 'USER_KILLED' AND lease_launcher_id IS NOT NULL"
    )
    conn.exec_driver_sql(
        "CREATE INDEX ix_task_lease_expires ON task (lease_expires) "
        "WHERE lease_expires IS NOT NULL"
    )
    conn.exec_driver_sql(
        "CREATE INDEX ix_launcher_live ON launcher (heartbeat) WHERE stopped IS NULL"
    )


#: ``MIGRATIONS[n]`` upgrades a version ``n-1`` database to version ``n``.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _batch_job_history, 3: _work_indexes, 4: _liveness_indexes,
}
