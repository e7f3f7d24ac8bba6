#!/usr/bin/env bash
# Stop what start.sh started, by PID file only (never by process name). Bounded waits.
#   PURGE=1 also deletes the state directory (job state, MariaDB datadir, logs).
set -uo pipefail
STATE=${SLURM_STATE:-/tmp/balsam-slurm}

stop_pidfile() {  # SIGTERM, wait <=15 s, then SIGKILL
  [[ -s $1 ]] || return 0
  local p; p=$(cat "$1")
  kill -0 "$p" 2>/dev/null || { rm -f "$1"; return 0; }
  echo "[slurm-harness] stopping $(basename "$1" .pid) (pid $p)" >&2
  kill "$p" 2>/dev/null
  local end=$((SECONDS + 15))
  while kill -0 "$p" 2>/dev/null && (( SECONDS < end )); do sleep 0.1; done
  kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
  rm -f "$1"
}

# Cancel jobs first so that no slurmstepd outlives its slurmd (bounded: 10 s).
if [[ -s $STATE/slurmctld.pid ]] && timeout 5 scontrol ping >/dev/null 2>&1; then
  ids=$(timeout 5 squeue -h -o %i 2>/dev/null || true)
  if [[ -n $ids ]]; then
    # shellcheck disable=SC2086  # one word per job id
    timeout 5 scancel $ids 2>/dev/null
    end=$((SECONDS + 10))
    while [[ -n $(timeout 5 squeue -h -t PD,R,CG -o %i 2>/dev/null) ]] && (( SECONDS < end )); do sleep 0.2; done
  fi
fi

for f in "$STATE"/slurmd.*.pid; do [[ -e $f ]] && stop_pidfile "$f"; done
# A wedged slurmstepd (ppid 1) keeps its node COMPLETING: kill only those holding files
# of this cluster's state directory open.
for d in /proc/[0-9]*; do
  [[ $(readlink "$d/exe" 2>/dev/null) == /usr/sbin/slurmstepd ]] || continue
  if ls -l "$d/fd" 2>/dev/null | grep -qF -- "$STATE/"; then
    echo "[slurm-harness] killing leftover slurmstepd ${d#/proc/}" >&2
    kill -9 "${d#/proc/}" 2>/dev/null
  fi
done
stop_pidfile "$STATE/slurmctld.pid"
stop_pidfile "$STATE/slurmdbd.pid"
stop_pidfile "$STATE/mysqld.pid"
# munged is shared with anything else on the machine that uses munge: left running.
[[ ${PURGE:-0} == 1 ]] && rm -rf "$STATE"
exit 0
