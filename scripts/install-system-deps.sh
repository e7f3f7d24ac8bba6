#!/usr/bin/env bash
# Install the Debian packages the Balsam test-suite needs for its real-component
# tests (PostgreSQL server + client, MPICH, Open MPI, Slurm, ...). Idempotent: does nothing when every
# check passes; otherwise runs one `apt-get update -qq` and installs only the
# missing packages.
#
#   scripts/install-system-deps.sh           install what is missing
#   scripts/install-system-deps.sh --check   only report; exit 1 if anything is missing
#
# Needs root (or passwordless sudo) only when something has to be installed.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
log() { echo "[install-system-deps] $*" >&2; }

# ---------------------------------------------------------------- checks
# Each check is a command that succeeds when the dependency is present.
have_glob() { compgen -G "$1" >/dev/null; }     # have_glob PATTERN
have_cmd() { command -v "$1" >/dev/null 2>&1; }  # have_cmd PROGRAM

# Dependencies: "check command with args | debian packages to install".
# The check command is word-split (no eval); keep arguments free of spaces.
DEPS=(
  "have_glob /usr/lib/postgresql/*/bin/initdb | postgresql-15 postgresql-client-15"
  # MPICH and Open MPI side by side (mpiexec.mpich / mpiexec.openmpi), with compilers
  # for the tests' MPI probe program.
  "have_cmd mpiexec.mpich | mpich"
  "have_cmd mpicc.mpich | libmpich-dev"
  "have_cmd mpiexec.openmpi | openmpi-bin"
  "have_cmd mpicc.openmpi | libopenmpi-dev"
  # A one-machine Slurm cluster (tests/harness/slurm): controller, node daemons, client
  # commands, munge; slurmdbd + MariaDB for sacct; Torque-style qsub/qstat/qdel wrappers
  # for the PBS plugin's real command path; libpmix2 or srun --mpi=pmix hangs the node.
  "have_cmd slurmctld | slurmctld"
  "have_cmd slurmd | slurmd"
  "have_cmd sbatch | slurm-client"
  "have_cmd munged | munge"
  "have_glob /usr/lib/*/libpmix.so.2* | libpmix2"
  "have_cmd slurmdbd | slurmdbd"
  "have_cmd mariadbd | mariadb-server"
  "have_cmd qsub | slurm-wlm-torque"
)

missing_packages() {
  local entry check_str packages
  local -a check
  for entry in "${DEPS[@]}"; do
    check_str=${entry%%|*}
    read -r packages <<<"${entry#*|}" # trims surrounding spaces
    read -r -a check <<<"$check_str"
    if ! "${check[@]}"; then
      echo "$packages"
    fi
  done
}

mapfile -t missing < <(missing_packages)
if ((${#missing[@]} == 0)); then
  exit 0
fi
# One package list, split on whitespace.
read -r -a pkgs <<<"${missing[*]}"

if [[ ${1:-} == --check ]]; then
  log "missing: ${pkgs[*]}"
  exit 1
fi

if [[ $EUID -eq 0 ]]; then
  AS_ROOT=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  AS_ROOT=(sudo -n env DEBIAN_FRONTEND=noninteractive)
else
  echo "install-system-deps: need root or passwordless sudo to install: ${pkgs[*]}" >&2
  exit 1
fi

log "installing: ${pkgs[*]}"
"${AS_ROOT[@]}" timeout 300 apt-get -o DPkg::Lock::Timeout=120 update -qq
"${AS_ROOT[@]}" timeout 900 apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
  --no-install-recommends "${pkgs[@]}" >/dev/null

mapfile -t still_missing < <(missing_packages)
if ((${#still_missing[@]} > 0)); then
  log "still missing after install: ${still_missing[*]}"
  exit 1
fi
log "done"
