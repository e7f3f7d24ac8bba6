"""Engine and session setup for SQLite (default) and PostgreSQL.

SQLite runs in WAL mode with a busy timeout and foreign keys on; write sessions
start with ``BEGIN IMMEDIATE`` so that two writers queue on the lock instead of
failing when a read snapshot is upgraded.  Database failures reach users as one
:class:`~balsam_core.errors.DatabaseError` line; URLs in messages never show a password.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite.base import SQLiteCompiler
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from . import migrations
from .errors import DatabaseError
from .models import Base, Meta, Task

_WRITE = "balsam_write"
#: Every open Database, so a forked child can drop the connections it inherited.
_open: weakref.WeakSet[Database] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent keeps using those connections: the child must neither use nor close them.
    for database in list(_open):
        database.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def resolve_url(url: str, site_dir: Path) -> URL:
    """Parse *url*; a relative SQLite path is taken relative to *site_dir*."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise DatabaseError(f"invalid database URL {url!r} in [site] database") from None
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if path and path != ":memory:" and not os.path.isabs(path):
            parsed = parsed.set(database=str(site_dir / path))
    elif parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


_SAFE_TEXT = re.compile(r"^[A-Za-z0-9_{}\[\]:,. -]*$")


def _literal(value: object) -> str | None:
    """*value* as an SQL literal when that is unambiguous and safe, else None."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str) and _SAFE_TEXT.match(value):
        return f"'{value}'"
    return None


def bulk_insert(session: Session, table: Table, columns: Mapping[str, Sequence[object]]) -> None:
    """Insert rows given column-wise (``{column: values}``, driver-ready values) with
    one ``executemany`` straight on the driver.

    Bypasses SQLAlchemy's per-row parameter processing, and writes a column whose value
    is the same plain number, NULL or quote-free word in every row as a literal instead
    of binding it per row: binding dominates bulk inserts of wide rows.  Callers
    serialize JSON themselves (see :func:`balsam_core.models.dump_json`).
    """
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"bulk_insert into {table.name}: columns of different lengths")
    (count,) = lengths
    if not count:
        return
    conn = session.connection()
    marker = {"qmark": "?", "format": "%s", "pyformat": "%s"}[conn.dialect.paramstyle]
    values: list[str] = []
    bound: list[Sequence[object]] = []
    for column in columns.values():
        literal = _literal(column[0]) if count > 1 and len(set(column)) == 1 else None
        if literal is None:
            values.append(marker)
            bound.append(column)
        else:
            values.append(literal)
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join(values)})"
    conn.exec_driver_sql(sql, list(zip(*bound)) if bound else [()] * count)


def safe_url(url: URL) -> str:
    """The URL as text with its password hidden."""
    return url.render_as_string(hide_password=True)


class _SqliteCompiler(SQLiteCompiler):
    """SQLite's statement compiler, rendering the table hints that SQLAlchemy's drops
    (``select(...).with_hint(Task, "INDEXED BY ix_name", "sqlite")``): SQLite keeps no
    statistics, and a query that must go through a small partial index names it (see
    :func:`balsam_core.fastforward.work_before_run`)."""

    def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
        return text


def indexed_by(query: Any, index: str) -> Any:
    """*query* (a select over Task) reading ``task`` through *index* on SQLite (see
    :class:`_SqliteCompiler`); unchanged elsewhere."""
    return query.with_hint(Task, f"INDEXED BY {index}", "sqlite")


class Database:
    """One site database: engines, sessions, schema version checks."""

    def __init__(self, url: str | URL, busy_timeout_s: float = 5.0) -> None:
        self.url = make_url(url) if isinstance(url, str) else url
        self.busy_timeout_s = busy_timeout_s
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = self._make_engine()
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        _open.add(self)

    def __repr__(self) -> str:
        return f"Database({safe_url(self.url)})"

    def _make_engine(self) -> Engine:
        if self.is_sqlite:
            # The driver's own timeout is the busy timeout; autocommit off at the
            # DBAPI level so that we issue BEGIN ourselves.
            engine = create_engine(
                self.url,
                connect_args={"timeout": self.busy_timeout_s, "isolation_level": None},
            )
            engine.dialect.statement_compiler = _SqliteCompiler
            timeout_ms = int(self.busy_timeout_s * 1000)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = NORMAL")
                cur.execute("PRAGMA foreign_keys = ON")
                cur.execute("PRAGMA cache_size = -65536")  # 64 MiB: bulk index updates
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
                write = conn.get_execution_options().get(_WRITE, False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        if self.url.get_backend_name() == "postgresql":
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise DatabaseError(
                    "PostgreSQL needs the psycopg driver: pip install 'balsam-core[postgres]'"
                ) from None
            return create_engine(
                self.url,
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=5,
                connect_args={"connect_timeout": 10},
            )
        raise DatabaseError(
            f"unsupported database {safe_url(self.url)}: use sqlite:///PATH or postgresql://..."
        )

    # ------------------------------------------------------------------ sessions

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session inside one transaction, committed on success, rolled back on error.

        ``write=True`` takes the SQLite write lock at the start (``BEGIN IMMEDIATE``).
        """
        engine = self._write_engine if write else self.engine
        with self.translate_errors(), Session(engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn driver errors about locks and connections into :class:`DatabaseError`."""
        try:
            yield
        except sa_exc.OperationalError as exc:
            raise DatabaseError(self._describe(exc)) from exc
        except sa_exc.InterfaceError as exc:
            raise DatabaseError(self._describe(exc)) from exc

    def _describe(self, exc: sa_exc.DBAPIError) -> str:
        where = safe_url(self.url)
        raw = str(exc.orig) if exc.orig is not None else str(exc)
        text = "; ".join(" ".join(line.split()) for line in raw.splitlines() if line.strip())
        if self.url.password:
            text = text.replace(str(self.url.password), "***")
        if "database is locked" in text:
            return (
                f"database {where} is locked: another process held it for more than "
                f"{self.busy_timeout_s:g} s ([site] busy_timeout_s)"
            )
        if exc.connection_invalidated or "connect" in text.lower() or "unable to open" in text:
            return f"cannot connect to database {where}: {text}"
        return f"database {where}: {text}"

    # ------------------------------------------------------------------ schema

    def create_schema(self) -> None:
        """Create every table of a new database and stamp the current schema version."""
        with self.translate_errors(), self._write_engine.begin() as conn:
            Base.metadata.create_all(conn)
            if conn.execute(select(Meta).where(Meta.key == "schema_version")).first() is None:
                conn.execute(
                    Meta.__table__.insert().values(
                        key="schema_version", value=str(migrations.SCHEMA_VERSION)
                    )
                )

    def schema_version(self) -> int | None:
        """The database's schema version, or None when it holds no Balsam schema."""
        with self.translate_errors(), self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, Meta.__tablename__):
                return None
            value = conn.execute(
                select(Meta.value).where(Meta.key == "schema_version")
            ).scalar_one_or_none()
            return int(value) if value is not None else None

    def check_schema(self) -> None:
        """Raise unless the database has exactly the schema version of this code."""
        version = self.schema_version()
        where = safe_url(self.url)
        if version is None:
            raise DatabaseError(f"database {where} holds no Balsam site: run 'balsam site init'")
        if version < migrations.SCHEMA_VERSION:
            raise DatabaseError(
                f"database {where} has schema version {version}, this Balsam needs "
                f"{migrations.SCHEMA_VERSION}: run 'balsam site upgrade'"
            )
        if version > migrations.SCHEMA_VERSION:
            raise DatabaseError(
                f"database {where} has schema version {version}, newer than this Balsam "
                f"({migrations.SCHEMA_VERSION}): upgrade balsam-core"
            )

    def upgrade(self) -> list[int]:
        """Run the missing migration steps, each in its own transaction; return them."""
        version = self.schema_version()
        if version is None or version > migrations.SCHEMA_VERSION:
            self.check_schema()  # raises the message for either case
        assert version is not None
        done = []
        for step in range(version + 1, migrations.SCHEMA_VERSION + 1):
            try:
                with self.translate_errors(), self._write_engine.begin() as conn:
                    migrations.MIGRATIONS[step](conn)
                    conn.execute(
                        Meta.__table__.update()
                        .where(Meta.key == "schema_version")
                        .values(value=str(step))
                    )
            except sa_exc.DBAPIError as exc:
                raise DatabaseError(
                    f"schema upgrade step {step} failed and was rolled back "
                    f"(database stays at version {step - 1}): {self._describe(exc)}"
                ) from exc
            done.append(step)
        return done

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
