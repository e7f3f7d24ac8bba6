"""Per-task launch overhead of each MPI launcher plugin against ``direct``, in one run.

    python bench/mpi_overhead.py [--tasks 100] [--repeat 3]

For each launcher (``direct``, ``mpich``, ``openmpi``; the MPI ones need
``mpiexec.mpich`` / ``mpiexec.openmpi`` installed):

(a) baseline: the bare command run *tasks* times back to back with ``subprocess.run``
    (``/bin/true`` for direct, ``mpiexec.<flavour> -n 1 /bin/true`` for MPI);
(b) Balsam: the same *tasks* one-rank ``/bin/true`` tasks run by the launcher with a
    single slot (so they run one after another and the time per task is the full
    launch path: lease, place, build the command, start, reap, report), measured from
    the first RUNNING event to the last RUN_DONE.

Prints one JSON object per launcher (stdout): seconds per task for both, Balsam's
overhead on top of the bare command, and the ratio of each plugin's per-task time to
``direct``'s measured in the same run.  Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from balsam_core import plugins
from balsam_core.api import Site
from balsam_core.launcher.nodes import local_nodes
from balsam_core.launcher.pilot import Launcher, LauncherOptions
from balsam_core.models import TaskEvent
from balsam_core.states import State
from balsam_core.transitions import Change

TRUE = shutil.which("true") or "/bin/true"

#: launcher -> (executable, site mpi_flags) to run single-node tasks on this machine.
LAUNCHERS: dict[str, tuple[str | None, list[str]]] = {
    "direct": (None, []),
    "mpich": ("mpiexec.mpich", ["-launcher", "fork"]),
    "openmpi": (
        "mpiexec.openmpi",
        ["--oversubscribe", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])],
    ),
}


def bare(executable: str | None, flags: list[str], tasks: int) -> float:
    """Seconds per run of the bare command."""
    argv = [TRUE] if executable is None else [executable, *flags, "-n", "1", TRUE]
    started = time.perf_counter()
    for _ in range(tasks):
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - started) / tasks


def through_balsam(name: str, executable: str | None, flags: list[str], tasks: int,
                   root: Path) -> float:
    """Seconds per task through the launcher with one slot."""
    site_dir = root / f"site-{name}-{time.monotonic_ns()}"
    Site.init(site_dir, mpi=name, cpus_per_node=1).db.dispose()
    if executable is not None:
        with open(site_dir / "balsam.toml", "a") as f:
            f.write(f'\n[plugins.{name}]\nexecutable = "{executable}"\ncpu_bind = "none"\n')
        text = (site_dir / "balsam.toml").read_text()
        (site_dir / "balsam.toml").write_text(
            text.replace("mpi_flags = []", "mpi_flags = " + json.dumps(flags))
        )
    site = Site.open(site_dir)
    ids = site.add_tasks([{"command": [TRUE]}] * tasks)
    site.transition([Change(i, s) for i in ids for s in (State.STAGED_IN, State.PREPROCESSED)])
    Launcher(
        site, LauncherOptions(nodes=local_nodes(1, 1, 0), idle_timeout_s=0.5), processing=False
    ).run()
    with site.db.session() as s:
        first = s.scalar(select(func.min(TaskEvent.time)).where(TaskEvent.to_state == "RUNNING"))
        last = s.scalar(select(func.max(TaskEvent.time)).where(TaskEvent.to_state == "RUN_DONE"))
        done = s.scalar(select(func.count()).where(TaskEvent.to_state == "RUN_DONE"))
    site.db.dispose()
    if done != tasks:
        raise SystemExit(f"{name}: only {done} of {tasks} tasks finished (see {site_dir})")
    return (last - first) / (tasks - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ[plugins.AUTOLOAD_SWITCH] = "0"  # the MPI plugins are installed distributions
    available = {
        name: spec for name, spec in LAUNCHERS.items()
        if spec[0] is None or shutil.which(spec[0])
    }
    with tempfile.TemporaryDirectory(prefix="balsam-bench-mpi-") as tmp:
        results = {}
        for name, (executable, flags) in available.items():
            print(f"{name}: {args.tasks} x true, best of {args.repeat}", file=sys.stderr)
            results[name] = (
                min(bare(executable, flags, args.tasks) for _ in range(args.repeat)),
                min(through_balsam(name, executable, flags, args.tasks, Path(tmp))
                    for _ in range(args.repeat)),
            )
    direct_per_task = results["direct"][1]
    for name, (bare_s, balsam_s) in results.items():
        print(json.dumps({
            "bench": "mpi_launch_overhead", "launcher": name, "tasks": args.tasks,
            "bare_s_per_task": round(bare_s, 5), "balsam_s_per_task": round(balsam_s, 5),
            "balsam_overhead_s": round(balsam_s - bare_s, 5),
            "ratio_vs_direct": round(balsam_s / direct_per_task, 2),
            "python": platform.python_version(), "cpus": os.cpu_count(),
        }))


if __name__ == "__main__":
    main()
