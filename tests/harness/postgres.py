"""Throw-away PostgreSQL servers for the test-suite.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary data directory
and starts a private postmaster on ``127.0.0.1`` on a free TCP port, tuned for
speed (``fsync=off``, ``synchronous_commit=off``, ``full_page_writes=off``):
the data is disposable.  :meth:`PostgresServer.create_database` then hands out
SQLAlchemy URLs (``postgresql+psycopg://...``) for per-test databases.

Typical use::

    with PostgresServer() as server:
        url = server.create_database("balsam_test")
        ...
        server.drop_database("balsam_test")

Running as root (as in CI containers): PostgreSQL refuses to run as root, so
every server command (``initdb``, ``pg_ctl``) runs through
``runuser -u postgres --`` and the data directory is chowned to ``postgres``
(the system user is created with ``useradd`` if missing).  The base directory
must then be traversable by ``postgres``; the default (the system temp dir,
``/tmp``) is, but pytest's ``tmp_path`` for root (``/tmp/pytest-of-root``,
mode 0700) is *not*.  ``psql`` is only a client and always runs as the caller.

Only standard-library modules are used; binaries are found by
:func:`find_pg_bin` (Debian's ``/usr/lib/postgresql/<ver>/bin``, then ``PATH``).

Measured cost (PostgreSQL 15.18, Debian 12, 2 vCPUs, as root, 8 runs):
``start()`` takes 1.2-2.2 s, almost all of it ``initdb`` (1.1-2.1 s;
``pg_ctl start`` itself ~0.13 s); ``create_database()`` 0.15-0.45 s;
``stop()`` ~0.15 s.  Start one server per test session and create a database
per test (or module), not a server per test.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import types
import urllib.parse
from collections.abc import Sequence

__all__ = ["PostgresServer", "find_pg_bin"]

#: Programs that must all live in the directory returned by :func:`find_pg_bin`.
REQUIRED_PROGRAMS: tuple[str, ...] = ("initdb", "pg_ctl", "postgres", "pg_isready")

#: Allowed database and role names (validated before they reach any SQL).
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")

#: Name of the unprivileged OS user the server runs as when we are root.
_PG_OS_USER = "postgres"

#: Seconds any single helper command may take before we give up.
_CMD_TIMEOUT = 60.0

#: Server options passed to the postmaster (``-o``); port and socket dir are added.
_SERVER_SETTINGS: tuple[str, ...] = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
)


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin`` (numeric, e.g. 9.6 < 15)."""
    version = path.parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (-1,)


def _has_programs(directory: pathlib.Path) -> bool:
    return all(os.access(directory / prog, os.X_OK) for prog in REQUIRED_PROGRAMS)


def find_pg_bin() -> pathlib.Path | None:
    """Return the directory holding ``initdb``, ``pg_ctl``, ``postgres`` and ``pg_isready``.

    Debian installs the server binaries outside ``PATH`` in
    ``/usr/lib/postgresql/<version>/bin``; those are checked first, newest
    version first.  Otherwise the directory of ``initdb`` found on ``PATH`` is
    used if it also holds the other programs.  Returns ``None`` when nothing
    suitable is installed.
    """
    candidates = sorted(
        pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True
    )
    for directory in candidates:
        if _has_programs(directory):
            return directory
    initdb = shutil.which("initdb")
    if initdb is not None:
        directory = pathlib.Path(initdb).resolve().parent
        if _has_programs(directory):
            return directory
    return None


def _free_port() -> int:
    """Ask the kernel for a currently unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _validate_name(name: str) -> str:
    """Return ``name`` if it matches ``^[a-z_][a-z0-9_]*$`` (<= 63 chars), else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > 63:
        raise ValueError(
            f"invalid PostgreSQL name {name!r}: must match ^[a-z_][a-z0-9_]*$ (max 63 chars)"
        )
    return name


def _quote_ident(name: str) -> str:
    """Validate ``name`` (see :func:`_validate_name`) and return it double-quoted."""
    return f'"{_validate_name(name)}"'


def _quote_literal(value: str) -> str:
    """Return ``value`` as a standard-conforming SQL string literal."""
    if "\x00" in value:
        raise ValueError("SQL string literals cannot contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a text file, or a note if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _ensure_os_user(user: str) -> None:
    """Create the system user ``user`` (root only) if it does not exist yet."""
    import pwd  # POSIX only; imported lazily so the module imports anywhere

    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/bin/sh", user],
        capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False,
    )
    try:
        pwd.getpwnam(user)  # also fine if a concurrent process created it
    except KeyError:
        raise RuntimeError(
            f"could not create OS user {user!r}: {result.stderr.strip()}"
        ) from None


class PostgresServer:
    """A private, disposable PostgreSQL server on ``127.0.0.1``.

    :param base_dir: directory in which a fresh data directory is created
        (``tempfile.mkdtemp``); defaults to the system temp dir.  Keep it
        short: the Unix socket lives in the data directory and socket paths
        are limited to ~100 bytes.
    :param pg_bin: directory with the server binaries; defaults to
        :func:`find_pg_bin`.
    :param port: TCP port; defaults to a free port picked at start-up.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        pg_bin: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.base_dir = pathlib.Path(base_dir) if base_dir is not None else pathlib.Path(
            tempfile.gettempdir()
        )
        self._pg_bin = pathlib.Path(pg_bin) if pg_bin is not None else None
        self._requested_port = port
        self.port: int | None = None
        self.data_dir: pathlib.Path | None = None
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0

    # ------------------------------------------------------------------ paths
    @property
    def pg_bin(self) -> pathlib.Path:
        """Directory holding the server binaries (resolved lazily)."""
        if self._pg_bin is None:
            found = find_pg_bin()
            if found is None:
                raise RuntimeError(
                    "PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_isready) "
                    "not found; run scripts/install-system-deps.sh"
                )
            self._pg_bin = found
        return self._pg_bin

    @property
    def log_file(self) -> pathlib.Path:
        """Server log (inside the data directory)."""
        return self._require_data_dir() / "server.log"

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self.port is not None and self.data_dir is not None

    def url(self, database: str, user: str = "balsam", password: str = "secret") -> str:
        """SQLAlchemy URL for ``database`` as ``user`` (does not create anything)."""
        _validate_name(database)
        _validate_name(user)
        return (
            f"postgresql+psycopg://{user}:{urllib.parse.quote(password, safe='')}"
            f"@127.0.0.1:{self._require_port()}/{database}"
        )

    # -------------------------------------------------------------- lifecycle
    def start(self) -> PostgresServer:
        """initdb a fresh data directory and start the server; returns ``self``.

        :raises RuntimeError: if initdb or start-up fails (the message includes
            the tail of the server log); the data directory is removed then.
        """
        if self.data_dir is not None:
            raise RuntimeError("server already started")
        pg_bin = self.pg_bin
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            _ensure_os_user(_PG_OS_USER)
        self.data_dir = pathlib.Path(tempfile.mkdtemp(prefix="pg-", dir=self.base_dir))
        try:
            if self._as_root:
                shutil.chown(self.data_dir, user=_PG_OS_USER, group=_PG_OS_USER)
            self._initdb(pg_bin)
            self._pg_ctl_start(pg_bin)
        except BaseException:
            self._remove_data_dir()
            raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m fast``, else SIGKILL) and delete its data.

        Safe to call more than once and on a server that never started.
        """
        atexit.unregister(self.stop)
        if self.data_dir is None:
            return
        try:
            pid_file = self.data_dir / "postmaster.pid"
            if pid_file.exists():
                pid = self._postmaster_pid()
                try:
                    ok = self._run_server_cmd(
                        [str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir),
                         "-m", "fast", "-t", "30", "stop"],
                        timeout=45,
                    ).returncode == 0
                except (subprocess.TimeoutExpired, OSError):
                    ok = False
                if not ok and pid is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            self._remove_data_dir()

    def halt(self) -> None:
        """Stop the postmaster (``pg_ctl -m fast``: clients are disconnected) but keep
        the data directory and port, so :meth:`resume` brings the same server back.
        For fault-injection tests."""
        data_dir = self._require_data_dir()
        result = self._run_server_cmd(
            [str(self.pg_bin / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-t", "30", "stop"],
            timeout=45,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {(result.stdout + result.stderr).strip()}")

    def resume(self) -> None:
        """Start a server stopped by :meth:`halt` again, on the same port."""
        self._require_data_dir()
        port = self._require_port()
        requested, self._requested_port = self._requested_port, port
        try:
            self._pg_ctl_start(self.pg_bin)
        finally:
            self._requested_port = requested

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PostgresServer port={self.port} data_dir={self.data_dir}>"

    # -------------------------------------------------------------- databases
    def create_database(self, name: str, user: str = "balsam", password: str = "secret") -> str:
        """Create role ``user`` (LOGIN PASSWORD, if missing) and database ``name`` owned by it.

        An existing role keeps its password (the server trusts all local
        connections anyway).  Fails if the database already exists.

        :returns: ``postgresql+psycopg://user:password@127.0.0.1:PORT/name``
        :raises ValueError: if ``name`` or ``user`` is not ``^[a-z_][a-z0-9_]*$``.
        :raises RuntimeError: if psql fails.
        """
        db_ident = _quote_ident(name)
        role_ident = _quote_ident(user)
        create_role = f"CREATE ROLE {role_ident} LOGIN PASSWORD {_quote_literal(password)}"
        tag = "$balsam$"
        if tag in create_role:
            raise ValueError("password must not contain '$balsam$'")
        # A DO block makes "create if missing" race-free under parallel tests.
        self.psql(
            f"DO {tag} BEGIN {create_role}; "
            f"EXCEPTION WHEN duplicate_object THEN NULL; END {tag}"
        )
        self.psql(f"CREATE DATABASE {db_ident} OWNER {role_ident}")
        return self.url(name, user, password)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its connections first."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL command as superuser ``postgres`` via ``psql -c``; return stdout.

        The command is passed as a single argv element (no shell involved).
        """
        psql = self.pg_bin / "psql"
        if not os.access(psql, os.X_OK):
            psql = pathlib.Path(shutil.which("psql") or "psql")
        argv = [
            str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self._require_port()),
            "-U", "postgres", "-d", _validate_name(database),
            "-c", sql,
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT,
            env=self._client_env(), check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"psql failed (exit {result.returncode}) running {sql!r}:\n"
                f"{result.stderr.strip()}"
            )
        return result.stdout

    # --------------------------------------------------------------- internals
    def _require_data_dir(self) -> pathlib.Path:
        if self.data_dir is None:
            raise RuntimeError("server not started")
        return self.data_dir

    def _require_port(self) -> int:
        if self.port is None:
            raise RuntimeError("server not started")
        return self.port

    def _server_argv(self, argv: Sequence[str]) -> list[str]:
        """Prefix ``argv`` with ``runuser -u postgres --`` when running as root."""
        if self._as_root:
            return ["runuser", "-u", _PG_OS_USER, "--", *argv]
        return list(argv)

    def _run_server_cmd(
        self, argv: Sequence[str], timeout: float = _CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        # cwd="/": the postgres user may not be able to enter the caller's cwd.
        return subprocess.run(
            self._server_argv(argv), capture_output=True, text=True, timeout=timeout,
            cwd="/", env=self._client_env(), stdin=subprocess.DEVNULL, check=False,
        )

    @staticmethod
    def _client_env() -> dict[str, str]:
        """Caller's environment minus libpq/server variables that could redirect us."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "10"
        return env

    def _initdb(self, pg_bin: pathlib.Path) -> None:
        data_dir = self._require_data_dir()
        if self._as_root:
            probe = self._run_server_cmd(["test", "-w", str(data_dir), "-a", "-x", str(data_dir)])
            if probe.returncode != 0:
                raise RuntimeError(
                    f"user {_PG_OS_USER!r} cannot access {data_dir}; choose a base_dir "
                    f"whose parents are world-traversable (e.g. /tmp), not {self.base_dir}"
                )
        result = self._run_server_cmd(
            [str(pg_bin / "initdb"), "-D", str(data_dir), "-A", "trust", "-E", "UTF8",
             "--locale=C.UTF-8", "--no-sync", "-U", "postgres"],
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()[-3000:]}"
            )

    def _pg_ctl_start(self, pg_bin: pathlib.Path) -> None:
        data_dir = self._require_data_dir()
        # A port picked by binding port 0 can be stolen before the postmaster
        # binds it; retry with a fresh port in that (rare) case.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            port = self._requested_port if self._requested_port is not None else _free_port()
            options = " ".join(
                ["-h", "127.0.0.1", "-p", str(port), "-k", str(data_dir)]
                + [arg for setting in _SERVER_SETTINGS for arg in ("-c", setting)]
            )
            try:
                result = self._run_server_cmd(
                    [str(pg_bin / "pg_ctl"), "-D", str(data_dir), "-l", str(self.log_file),
                     "-w", "-t", "30", "start", "-o", options],
                    timeout=45,
                )
                output = (result.stdout + result.stderr).strip()
                ok = result.returncode == 0
            except subprocess.TimeoutExpired:
                output, ok = "pg_ctl start timed out", False
            if ok:
                self.port = port
                return
            log_tail = _tail(self.log_file)
            port_taken = "could not bind" in log_tail or "Address already in use" in log_tail
            self._kill_postmaster()
            if not (port_taken and attempt + 1 < attempts):
                raise RuntimeError(
                    f"PostgreSQL failed to start on 127.0.0.1:{port} "
                    f"(data dir {data_dir}): {output}\n"
                    f"--- tail of {self.log_file} ---\n{log_tail}"
                )

    def _postmaster_pid(self) -> int | None:
        data_dir = self._require_data_dir()
        try:
            first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, IndexError, ValueError):
            return None

    def _kill_postmaster(self) -> None:
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                (self._require_data_dir() / "postmaster.pid").unlink()

    def _remove_data_dir(self) -> None:
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir = None
        self.port = None
