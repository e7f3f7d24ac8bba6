"""Launcher mode ``serial``: one agent per node, each forking single-node tasks.

``balsam launcher --mode serial`` does not start tasks itself.  It writes the run's
options to ``log/serial-<stamp>.json`` and starts one *agent* per node through the
site's MPI launcher plugin (``-n <nodes> -ppn 1``, each agent bound to its whole
node).  An agent finds its node from its MPI rank, then runs an ordinary
:class:`~balsam_core.launcher.pilot.Launcher` on that one node with the ``direct``
launcher: it leases single-node tasks from the task source itself, packs them on its
node, and shuts down on its own when the allocation ends.  Only rank 0 runs
pre/post-processing, so one worker serves the whole allocation.

Stopping early (SIGTERM/SIGINT to ``balsam launcher``) does not rely on ``mpiexec``
forwarding signals -- Open MPI kills ranks about a second after forwarding SIGTERM,
too soon to end tasks cleanly.  The master creates the run's *stop file* instead;
each agent checks it at least every :data:`STOP_CHECK_S` and shuts down (running
tasks -> RUN_TIMEOUT, leases released).  Only an ``mpiexec`` still alive after the
agents' grace period is signalled.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..api import Site
from ..errors import PluginError
from ..mpi_support import RANK_VARIABLES
from ..plugin_types import LaunchSpec, MpiLauncher, NodeSpec
from ..site import SITE_ENV
from .pilot import STOP_CHECK_S, Launcher, LauncherOptions

log = logging.getLogger(__name__)


def write_run_file(path: Path, options: LauncherOptions) -> None:
    """The options every agent of a serial run starts from."""
    path.write_text(json.dumps(asdict(options)))


def read_run_file(path: Path) -> LauncherOptions:
    raw = json.loads(path.read_text())
    raw["nodes"] = tuple(
        NodeSpec(n["name"], n["cpus"], tuple(n["gpu_ids"])) for n in raw["nodes"]
    )
    return LauncherOptions(**raw)


def agent_command(
    site: Site, run_file: Path, options: LauncherOptions, mpi: MpiLauncher
) -> tuple[tuple[str, ...], dict[str, str]]:
    """argv and env that start one agent per node through the MPI launcher."""
    cpus = min(n.cpus for n in options.nodes)
    env = {**os.environ, SITE_ENV: str(site.site_dir)}
    spec = LaunchSpec(
        task_id=0,
        argv=(sys.executable, "-m", "balsam_core.launcher.serial", str(run_file)),
        nodes=tuple(n.name for n in options.nodes),
        ranks_per_node=1,
        threads_per_rank=cpus,
        bind=False,  # the agent's tasks spread over the whole node
        env=env,
        mpi_flags=tuple(site.config.launcher.mpi_flags),
        export=(SITE_ENV,),
    )
    try:
        command = mpi.command(spec)
    except PluginError as exc:
        raise PluginError(
            f"serial mode: cannot start {len(options.nodes)} agent(s) through "
            f"[launcher] mpi = {site.config.launcher.mpi!r}: {exc}"
        ) from None
    return command.argv, dict(command.env)


def run_serial(site: Site, options: LauncherOptions, mpi: MpiLauncher) -> int:
    """Start the agents, wait for them, stop them on SIGTERM/SIGINT; their exit status."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_file = site.config.log_dir / f"serial-{stamp}.json"
    stop_file = run_file.with_suffix(".stop")
    options = replace(options, stop_file=str(stop_file))
    write_run_file(run_file, options)
    argv, env = agent_command(site, run_file, options, mpi)
    log.info("starting %d serial agent(s): %s", len(options.nodes), shlex.join(argv))
    stop_requested: list[float] = []

    def request_stop(signum: int, _frame: object) -> None:
        if not stop_requested:
            log.info("received %s: stopping the agents", signal.Signals(signum).name)
            stop_file.touch()
            stop_requested.append(time.time())

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    agents = subprocess.Popen(argv, env=env, cwd=site.site_dir, start_new_session=True)
    try:
        # Agents stop by themselves margin_s before end_time; allow them the grace after.
        late = options.grace_s + 2 * STOP_CHECK_S + 10.0
        while True:
            try:
                return agents.wait(timeout=STOP_CHECK_S)
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            overdue = (stop_requested and now > stop_requested[0] + late) or (
                options.end_time is not None and now > options.end_time + late
            )
            if overdue:
                log.warning("agents did not stop in time: signalling mpiexec")
                _end(agents, options.grace_s)
                return agents.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if agents.poll() is None:
            _end(agents, options.grace_s)
        for path in (run_file, stop_file):
            path.unlink(missing_ok=True)


def _end(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the agents' process group, SIGKILL after *grace_s*."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def agent_rank(num_nodes: int) -> int:
    """This agent's MPI rank, from the variable its MPI runtime sets (0 on a lone node)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    if num_nodes == 1:  # started by the direct launcher: no MPI runtime
        return 0
    raise SystemExit(f"serial agent: no MPI rank variable set (looked for {', '.join(RANK_VARIABLES)})")


def agent_main(run_file: str) -> int:
    """Run the launcher of one node of a serial run (``python -m balsam_core.launcher.serial``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s agent %(process)d: %(message)s"
    )
    options = read_run_file(Path(run_file))
    rank = agent_rank(len(options.nodes))
    if rank >= len(options.nodes):
        raise SystemExit(f"serial agent: rank {rank} but only {len(options.nodes)} node(s)")
    node = options.nodes[rank]
    # No leasing ahead: what one agent holds in its queue, the other nodes cannot run.
    options = replace(options, nodes=(node,), prefetch=0)
    site = Site.open(os.environ.get(SITE_ENV))
    direct = site.plugins.create("mpi_launcher", "direct", site.config)
    launcher = Launcher(site, options, mpi=direct, processing=rank == 0, mode="serial")
    launcher.install_signal_handlers()
    stats = launcher.run()
    log.info(
        "node %s: %d started, %d done, %d failed, %d timed out (%s)", node.name,
        stats.started, stats.finished, stats.failed, stats.timed_out, launcher.stop_reason,
    )
    return 0


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1]))
