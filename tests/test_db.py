"""The database layer: SQLite settings, file modes, schema versions and upgrades."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from balsam_core import DatabaseError, migrations
from balsam_core.api import Site
from balsam_core.db import Database, resolve_url, safe_url
from balsam_core.models import Meta


def test_sqlite_pragmas(sqlite_site: Site) -> None:
    with sqlite_site.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_site_and_database_file_modes(sqlite_site: Site) -> None:
    assert stat.S_IMODE(sqlite_site.site_dir.stat().st_mode) == 0o700
    db_file = Path(str(sqlite_site.db.url.database))
    assert db_file.parent == sqlite_site.site_dir
    assert stat.S_IMODE(db_file.stat().st_mode) == 0o600


def test_relative_sqlite_url_is_relative_to_site(tmp_path: Path) -> None:
    url = resolve_url("sqlite:///state/b.db", tmp_path)
    assert url.database == str(tmp_path / "state" / "b.db")
    assert resolve_url("postgresql://u:pw@h/db", tmp_path).drivername == "postgresql+psycopg"
    assert safe_url(resolve_url("postgresql://u:pw@h/db", tmp_path)) == "postgresql+psycopg://u:***@h/db"


def test_schema_is_stamped(site: Site) -> None:
    assert site.db.schema_version() == migrations.SCHEMA_VERSION
    tables = set(inspect(site.db.engine).get_table_names())
    assert {"app", "task", "task_event", "task_dependency", "task_tag", "batch_job", "launcher"} <= tables


def test_upgrade_runs_missing_steps_and_keeps_data(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site made at version N opens after an upgrade to N+1 with all its tasks."""
    ids = site.add_tasks([{"command": f"echo {i}", "tags": {"k": str(i)}} for i in range(50)])

    def add_priority(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("ALTER TABLE task ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    new_version = migrations.SCHEMA_VERSION + 1
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", new_version)
    monkeypatch.setitem(migrations.MIGRATIONS, new_version, add_priority)
    with pytest.raises(DatabaseError, match="run 'balsam site upgrade'"):
        Site.open(site.site_dir)
    assert site.db.upgrade() == [new_version]
    reopened = Site.open(site.site_dir)
    assert [t.id for t in reopened.tasks()] == ids
    assert reopened.task(ids[7]).tags == {"k": "7"}
    with reopened.db.engine.connect() as conn:
        assert conn.execute(text("SELECT sum(priority) FROM task")).scalar() == 0
    assert reopened.db.upgrade() == []


def test_failed_upgrade_step_changes_nothing(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("ALTER TABLE task ADD COLUMN half_done INTEGER")
        conn.exec_driver_sql("THIS IS NOT SQL")

    version = migrations.SCHEMA_VERSION
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", version + 1)
    monkeypatch.setitem(migrations.MIGRATIONS, version + 1, broken)
    with pytest.raises(DatabaseError):
        site.db.upgrade()
    assert site.db.schema_version() == version
    columns = {c["name"] for c in inspect(site.db.engine).get_columns("task")}
    assert "half_done" not in columns


def test_newer_schema_is_refused(site: Site) -> None:
    with site.db.session(write=True) as s:
        s.execute(Meta.__table__.update().values(value="999"))
    with pytest.raises(DatabaseError, match="newer than this Balsam"):
        Site.open(site.site_dir)


def test_not_a_balsam_database(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(DatabaseError, match="holds no Balsam site"):
        db.check_schema()


def test_sqlite_writers_queue_instead_of_failing(sqlite_site: Site) -> None:
    """Write sessions take the lock at BEGIN, so concurrent writers wait their turn."""
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        site = Site.open(sqlite_site.site_dir)
        try:
            for i in range(20):
                site.add_tasks([{"command": f"echo {n} {i}"}] * 5)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite_site.db.session() as s:
        assert s.scalar(text("SELECT count(*) FROM task")) == 4 * 20 * 5
        assert s.scalar(text("SELECT count(DISTINCT id) FROM task")) == 400


def test_locked_database_is_one_clear_error(tmp_path: Path) -> None:
    import sqlite3

    site = Site.init(tmp_path / "s")
    site.db.dispose()
    locked = Site(site.config.__class__(
        site_dir=site.site_dir,
        site=site.config.site.__class__(busy_timeout_s=0.1),
    ))
    holder = sqlite3.connect(str(site.db.url.database), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseError, match=r"is locked: another process held it for more than 0.1 s"):
            locked.add_task(command="echo hi")
    finally:
        holder.execute("ROLLBACK")
    assert locked.count() == {}


def test_unreachable_postgres_hides_password() -> None:
    db = Database(resolve_url("postgresql://balsam:hunter2@127.0.0.1:1/nope", Path(".")))
    with pytest.raises(DatabaseError) as err:
        db.schema_version()
    assert "hunter2" not in str(err.value)
    assert str(err.value).startswith("cannot connect to database postgresql+psycopg://balsam:***@127.0.0.1:1/nope")


def test_events_are_written_with_their_state(site: Site) -> None:
    (task_id,) = site.add_tasks([{"command": "true"}])
    with site.db.session() as s:
        rows = s.execute(text("SELECT from_state, to_state, message FROM task_event")).all()
        assert rows == [("CREATED", "READY", "created")]
        assert s.scalar(select(Meta.value).where(Meta.key == "schema_version")) == str(
            migrations.SCHEMA_VERSION
        )
