"""Test harness: sites on SQLite and on a real PostgreSQL server started here.

``backend`` runs a test once per database: ``sqlite`` always, ``postgresql`` on a
server this harness starts with ``initdb``/``pg_ctl`` (one per session, a fresh
database per test).  With ``BALSAM_REQUIRE_REAL=1`` (set by ``scripts/test.sh`` in CI)
a skipped real-component test fails the run instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests see exactly the built-in plugins unless they opt in to entry points.
os.environ["BALSAM_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.pop("BALSAM_SITE", None)
os.environ.pop("BALSAM_TASK_ID", None)

from balsam_core import plugins  # noqa: E402
from balsam_core.api import Site  # noqa: E402
from tests.harness.postgres import PostgresServer, find_pg_bin  # noqa: E402
from tests.harness.slurm import SlurmCluster, SlurmUnavailable  # noqa: E402

REQUIRE_REAL = os.environ.get("BALSAM_REQUIRE_REAL") == "1"
_db_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_component: needs a real server or program; must not skip in CI"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_REAL and report.skipped and item.get_closest_marker("real_component"):
        report.outcome = "failed"
        report.longrepr = f"real-component test skipped with BALSAM_REQUIRE_REAL=1: {report.longrepr}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgresql":
            item.add_marker("real_component")


@pytest.fixture(autouse=True)
def _fresh_plugin_manager() -> Iterator[None]:
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (skipped when not installed)."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database of the current backend."""
    if backend == "sqlite":
        yield "sqlite:///balsam.db"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"balsam_t{os.getpid()}_{next(_db_counter)}"
    url = server.create_database(name)
    yield url
    server.drop_database(name)


@pytest.fixture
def site(tmp_path: Path, database_url: str) -> Iterator[Site]:
    """A new site on the current backend, with its default (built-in) plugin stack."""
    site = Site.init(tmp_path / "site", database=database_url)
    yield site
    site.db.dispose()


@pytest.fixture
def sqlite_site(tmp_path: Path) -> Iterator[Site]:
    """A new site on SQLite only (for tests about the CLI and files)."""
    site = Site.init(tmp_path / "site")
    yield site
    site.db.dispose()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real 2-node Slurm cluster (c1, c2; 4 CPUs each) with sacct and Torque wrappers.

    Started once per session with ``tests/harness/slurm/start.sh``; stopped at the end
    only if this session started it (unless ``BALSAM_SLURM_KEEP=1``).  Skipped when it
    cannot be brought up here (a failure with ``BALSAM_REQUIRE_REAL=1``).
    """
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm test cluster: {exc}")
    yield cluster
    if cluster.started_here and os.environ.get("BALSAM_SLURM_KEEP") != "1":
        cluster.stop()
