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
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection

#: The schema version this code reads and writes.
SCHEMA_VERSION = 1

#: ``MIGRATIONS[n]`` upgrades a version ``n-1`` database to version ``n``.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}
