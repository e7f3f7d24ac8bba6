"""A real Slurm cluster for the tests: ``start.sh`` / ``stop.sh`` beside this file.

:class:`SlurmCluster` brings up Debian's slurm-wlm on this one machine as a cluster of
fake nodes ``c1..cN`` (one ``slurmd`` each, 4 CPUs declared per node), with slurmdbd
(+ MariaDB) so that ``sacct`` works and Torque-style ``qsub``/``qstat``/``qdel``
(slurm-wlm-torque).  ``start.sh`` installs the Debian packages when they are missing
(needs root and the package mirror), is idempotent, and takes ~3.5 s from nothing,
~0.7 s when everything already runs.

The session fixture ``slurm_cluster`` (tests/conftest.py) starts the cluster once per
test session and stops it at the end **only if this session started it** (another test
session on the machine may be using it; ``BALSAM_SLURM_KEEP=1`` keeps it up anyway).
Starting is serialised between processes with a lock file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SlurmCluster", "SlurmUnavailable"]

HERE = Path(__file__).parent
#: Seconds start.sh may take (an apt-get install included).
START_TIMEOUT_S = 900


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be brought up here (not root, no packages, start failed)."""


@dataclass
class SlurmCluster:
    """A running (or startable) test cluster."""

    nodes: int = 2
    cpus_per_node: int = 4
    state_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("BALSAM_SLURM_STATE", "/tmp/balsam-slurm"))
    )
    started_here: bool = False

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(f"c{i}" for i in range(1, self.nodes + 1))

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            SLURM_NODES=str(self.nodes),
            SLURM_CPUS_PER_NODE=str(self.cpus_per_node),
            SLURM_STATE=str(self.state_dir),
            SLURM_ACCOUNTING="1",
            SLURM_TORQUE="1",
        )

    def running(self) -> bool:
        """True if slurmctld answers and every node is usable."""
        if shutil.which("scontrol") is None:
            return False
        try:
            ping = subprocess.run(["scontrol", "ping"], capture_output=True, timeout=5)
            if ping.returncode != 0:
                return False
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-p", "debug", "-t", "idle,mix,alloc", "-o", "%N"],
                capture_output=True, text=True, timeout=5,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return set(out.split()) >= set(self.node_names)

    def start(self) -> None:
        """Bring the cluster up (idempotent); SlurmUnavailable with the log tail on failure."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("the Slurm test cluster needs root (daemons, /etc/slurm)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir.parent / ".balsam-slurm.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            was_running = self.running()
            try:
                proc = subprocess.run(
                    ["bash", str(HERE / "start.sh")], env=self._env(), capture_output=True,
                    text=True, timeout=START_TIMEOUT_S, stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                raise SlurmUnavailable(f"start.sh did not finish in {START_TIMEOUT_S} s") from None
            if proc.returncode != 0:
                tail = " | ".join(proc.stderr.strip().splitlines()[-8:])
                raise SlurmUnavailable(f"start.sh failed (exit {proc.returncode}): {tail}")
            self.started_here = not was_running

    def stop(self) -> None:
        """Stop the daemons (by PID file); jobs still there are cancelled first."""
        subprocess.run(
            ["bash", str(HERE / "stop.sh")], env=self._env(), capture_output=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )

    # ------------------------------------------------------------------ helpers for tests

    @staticmethod
    def job_state(job_id: str) -> str:
        """squeue's state of *job_id* ('' if squeue does not know it)."""
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
            capture_output=True, text=True, timeout=10,
        ).stdout
        return out.strip()

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 20.0) -> str:
        """Wait until *job_id* is in one of *states*; return the last state seen."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            time.sleep(0.1)
        return state
