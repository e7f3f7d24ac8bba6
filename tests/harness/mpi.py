"""Real MPICH and Open MPI for the test-suite, on one machine posing as several nodes.

:func:`build_probe` compiles :data:`PROBE_SOURCE` with the flavour's ``mpicc``: each
rank prints its rank, the world size, its node-local rank (``MPI_LOCALRANKID`` from
Hydra, ``OMPI_COMM_WORLD_LOCAL_RANK`` from Open MPI), the ``MPI_Allreduce`` sum of all
ranks, and the variables the launcher should have delivered; with an argument it then
sleeps that many seconds (for kill tests).

:func:`configure_site` selects a flavour in a site's ``balsam.toml``, with the flags
that make invented host names work here (measured on Debian 12):

* MPICH: Hydra's ``-launcher fork`` starts every "host"'s proxy locally.
* Open MPI: ``--mca plm_rsh_agent <fake-ssh>`` runs each host's daemon locally; each
  needs its own session directory (``orte_tmpdir_base``) or two daemons race on
  ``mkdir`` and fail; ``btl self,tcp`` because shared memory crashes across the fake
  nodes; ``--oversubscribe`` beyond the real cores; ``--allow-run-as-root`` as root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROBE_SOURCE = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char *env(const char *name) { const char *v = getenv(name); return v ? v : "-"; }

int main(int argc, char **argv) {
  int rank, size, sum;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  const char *local = getenv("MPI_LOCALRANKID");
  if (!local) local = env("OMPI_COMM_WORLD_LOCAL_RANK");
  printf("rank=%d size=%d local=%s sum=%d omp=%s cuda=%s var=%s task=%s\n", rank, size, local,
         sum, env("OMP_NUM_THREADS"), env("CUDA_VISIBLE_DEVICES"), env("PROBE_VAR"),
         env("BALSAM_TASK_ID"));
  fflush(stdout);
  if (argc > 1) sleep(atoi(argv[1]));
  MPI_Finalize();
  return 0;
}
"""

FAKE_SSH = """#!/bin/sh
# "ssh [options] HOST COMMAND...": run COMMAND here, in a session directory for HOST.
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
host=$1; shift
dir="${TMPDIR:-/tmp}/balsam-fake-ssh-$(id -u)/$host"
mkdir -p "$dir"
OMPI_MCA_orte_tmpdir_base=$dir exec /bin/sh -c "$*"
"""


@dataclass(frozen=True)
class Flavour:
    """One MPI implementation as Debian installs it side by side with the other."""

    name: str
    mpiexec: str
    mpicc: str

    @property
    def installed(self) -> bool:
        return shutil.which(self.mpiexec) is not None and shutil.which(self.mpicc) is not None


FLAVOURS = {
    "mpich": Flavour("mpich", "mpiexec.mpich", "mpicc.mpich"),
    "openmpi": Flavour("openmpi", "mpiexec.openmpi", "mpicc.openmpi"),
}


def build_probe(flavour: Flavour, directory: Path) -> Path:
    """Compile the probe program with *flavour*'s compiler wrapper."""
    source = directory / "probe.c"
    source.write_text(PROBE_SOURCE)
    binary = directory / f"probe-{flavour.name}"
    subprocess.run([flavour.mpicc, "-O1", "-o", str(binary), str(source)], check=True)
    return binary


def site_flags(flavour: Flavour, directory: Path) -> list[str]:
    """``[launcher] mpi_flags`` that run *flavour* on invented host names here."""
    if flavour.name == "mpich":
        return ["-launcher", "fork"]
    agent = directory / "fake-ssh"
    agent.write_text(FAKE_SSH)
    agent.chmod(0o755)
    flags = ["--oversubscribe", "--mca", "plm_rsh_agent", str(agent), "--mca", "btl", "self,tcp"]
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def configure_site(site_dir: Path, flavour: Flavour, **settings: str) -> None:
    """Select *flavour* in ``balsam.toml`` with its executable, flags and *settings*."""
    path = site_dir / "balsam.toml"
    text = path.read_text()
    flags = ", ".join(f'"{f}"' for f in site_flags(flavour, site_dir))
    text = re.sub(r"(?m)^mpi = .*$", f'mpi = "{flavour.name}"', text)
    text = re.sub(r"(?m)^mpi_flags = .*$", f"mpi_flags = [{flags}]", text)
    table = {"executable": flavour.mpiexec, **settings}
    text += f"\n[plugins.{flavour.name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in table.items())
    path.write_text(text)


def parse_probe(output: str) -> list[dict[str, str]]:
    """The probe's lines as dicts, sorted by rank."""
    rows = [
        dict(field.split("=", 1) for field in line.split())
        for line in output.splitlines()
        if line.startswith("rank=")
    ]
    return sorted(rows, key=lambda r: int(r["rank"]))
