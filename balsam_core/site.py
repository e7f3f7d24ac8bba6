"""Site directories: finding one, and creating one with a commented ``balsam.toml``."""

from __future__ import annotations

import os
from pathlib import Path

from .config import CONFIG_NAME
from .errors import SiteNotFound, ValidationError

SITE_ENV = "BALSAM_SITE"


def find_site_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The site directory: *path*, else ``$BALSAM_SITE``, else the first directory from the
    current one upwards that holds a ``balsam.toml``."""
    if path is None:
        path = os.environ.get(SITE_ENV) or None
        if path is None:
            here = Path.cwd().resolve()
            for candidate in (here, *here.parents):
                if (candidate / CONFIG_NAME).is_file():
                    return candidate
            raise SiteNotFound(
                f"no Balsam site in {here} or above it: pass --site DIR, set {SITE_ENV}, "
                "or create one with 'balsam site init DIR'"
            )
        source = f"${SITE_ENV}"
    else:
        source = "--site"
    site = Path(path).expanduser().resolve()
    if not (site / CONFIG_NAME).is_file():
        raise SiteNotFound(f"{site} (from {source}) is not a Balsam site: it has no {CONFIG_NAME}")
    return site


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(
    *,
    name: str,
    database: str,
    scheduler: str,
    mpi: str,
    packing: str,
    task_source: str,
    cpus_per_node: int,
    gpus_per_node: int,
) -> str:
    """The commented ``balsam.toml`` that ``balsam site init`` writes."""
    return f"""\
# Balsam site configuration. Every key is optional; the values shown are the defaults
# unless 'balsam site init' was told otherwise. 'balsam site info' shows the result and
# 'balsam plugins' lists the names each 'use' / 'mpi' / 'chain' entry may take.

[site]
name = {_toml_str(name)}
# SQLAlchemy URL. A relative SQLite path is relative to this directory.
# PostgreSQL: "postgresql://USER:PASSWORD@HOST:PORT/DB" (needs balsam-core[postgres]).
database = {_toml_str(database)}
# Seconds a writer waits for a locked SQLite database before giving up.
busy_timeout_s = 5.0
# Directories outside this site that stage-in/out may read or write.
allowed_roots = []

[scheduler]
# Batch scheduler plugin: "local" runs launchers as processes on this machine.
use = {_toml_str(scheduler)}
# Allocation / account charged for batch jobs.
project = ""

# Queue policy, one table per queue the service may submit to.
[scheduler.queues.local]
submit = true        # may the service submit here?
max_queued = 1       # batch jobs waiting in the queue at once
min_nodes = 1
max_nodes = 1
min_wall_min = 1
max_wall_min = 60

[service]
# 'balsam service': every period_s it syncs batch jobs, reclaims tasks of dead
# launchers, and submits jobs sized to the backlog (at most one per
# submit_interval_s; after failures the gap doubles, up to max_backoff_s).
period_s = 60.0
submit_interval_s = 60.0
max_backoff_s = 3600.0
# Launchers of service jobs exit after this long with nothing to run (0: never).
job_idle_timeout_s = 300.0
job_mode = "mpi"

[launcher]
# MPI launcher plugin: "direct" forks one-rank, one-node tasks without MPI.
mpi = {_toml_str(mpi)}
# CPU slots and GPUs per node; cpus_per_node = 0 counts this machine's CPUs.
cpus_per_node = {cpus_per_node}
gpus_per_node = {gpus_per_node}
# Flags added to every MPI launch, e.g. ["--bind-to", "core"].
mpi_flags = []
# A launcher heartbeats every heartbeat_s; with none for lease_s it counts as lost
# and its tasks are reclaimed (running ones -> RUN_TIMEOUT).
heartbeat_s = 10.0
lease_s = 60.0

[task_source]
use = {_toml_str(task_source)}

[packing]
# Node and job packing strategy: "fifo" or "best-fit" (or a plugin's).
use = {_toml_str(packing)}

[recovery]
# Policies asked in order when a task fails or times out; the first answer wins.
chain = ["app-handler", "retry-timeout", "retry-transient"]
max_retries = 3
# Exit codes and signals that retry-transient retries, with backoff_s doubling.
transient_exit_codes = []
transient_signals = [7, 9, 11]
backoff_s = 1.0

# Settings of a plugin go in a table named after it, e.g.
# [plugins.slurm]
# partition = "debug"
"""


def make_site_dir(path: Path) -> Path:
    """Create the site directory (mode 0700) with ``data/`` and ``log/``.

    Refuses a directory that already holds a site or other files.
    """
    site = path.expanduser().resolve()
    if (site / CONFIG_NAME).exists():
        raise ValidationError(f"{site} is already a Balsam site")
    if site.exists() and (not site.is_dir() or any(site.iterdir())):
        raise ValidationError(f"{site} exists and is not an empty directory")
    site.mkdir(parents=True, exist_ok=True)
    site.chmod(0o700)
    for sub in ("data", "log"):
        (site / sub).mkdir(mode=0o700, exist_ok=True)
    return site
