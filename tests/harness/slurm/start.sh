#!/usr/bin/env bash
# Bring up a one-machine Slurm "cluster" for the Balsam tests on Debian 12, as root,
# without systemd: munged + (optional) MariaDB + slurmdbd + slurmctld + one slurmd per
# fake node c1..cN (Debian's slurmd runs several daemons on one host via `slurmd -N`).
# Idempotent (a second run finds everything up and returns in well under a second);
# every wait is bounded.  Stop with stop.sh beside this file.
#
# Environment knobs:
#   SLURM_NODES=2            fake nodes c1..cN, each its own slurmd on its own port
#   SLURM_CPUS_PER_NODE=4    CPUs declared per node (may exceed the real cores)
#   SLURM_ACCOUNTING=1       1: MariaDB + slurmdbd so that `sacct` works; 0: none
#   SLURM_TORQUE=1           1: Torque-style qsub/qstat/qdel (slurm-wlm-torque) + spank_pbs
#   SLURM_STATE=/tmp/balsam-slurm   state, logs and spool directories
#   SLURM_SKIP_INSTALL=1     never apt-get (fail if something is missing)
#
# Pitfalls handled here (each cost someone an afternoon):
# * every fake node reports the machine's hostname: slurm.conf sets NodeHostname to it
#   and `SlurmdParameters=config_overrides` stops slurmd from rejecting the node
#   because its real CPU count differs from the declared one;
# * libpmix2 must be installed before slurmd starts, else `srun --mpi=pmix` hangs;
# * each slurmd gets its own TmpFS (PMIx puts client dirs there; a shared /tmp collides);
# * `EnforcePartLimits=ALL` makes sbatch refuse impossible requests (too many nodes)
#   at once instead of leaving them pending forever;
# * squeue forgets finished jobs after MinJobAge: use sacct (slurmdbd) for older ones;
# * KillWait=10: between Slurm's SIGTERM (time limit, scancel) and its SIGKILL a Balsam
#   launcher ends its tasks and writes their states; 2 s was too short for that;
# * the image's policy-rc.d keeps package postinst scripts from starting daemons, so
#   everything is started here, by hand.
set -euo pipefail

NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS_PER_NODE:-4}
ACCT=${SLURM_ACCOUNTING:-1}
TORQUE=${SLURM_TORQUE:-1}
STATE=${SLURM_STATE:-/tmp/balsam-slurm}
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
HOST=$(hostname -s)
BASEPORT=17001
MYSQL_PORT=3307
MYSQL_SOCK=$STATE/mysqld.sock

log() { echo "[slurm-harness] $*" >&2; }
wait_for() {  # wait_for <seconds> <cmd...>
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS >= end )) && return 1
    sleep 0.1
  done
}
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop_pidfile <file>: SIGTERM, wait <=15 s, then SIGKILL
  pid_alive "$1" || return 0
  local p; p=$(cat "$1"); kill "$p" 2>/dev/null || true
  local end=$((SECONDS + 15))
  while kill -0 "$p" 2>/dev/null && (( SECONDS < end )); do sleep 0.1; done
  kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null || true
}

# ------------------------------------------------------------------ install
if [[ ${SLURM_SKIP_INSTALL:-0} != 1 ]]; then
  pkgs=(slurmctld slurmd slurm-client munge libpmix2)
  [[ $ACCT == 1 ]] && pkgs+=(slurmdbd mariadb-server)
  [[ $TORQUE == 1 ]] && pkgs+=(slurm-wlm-torque)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
for prog in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
  [[ -x $prog ]] || { log "$prog is missing (apt-get install slurmctld slurmd slurm-client munge)"; exit 1; }
done
mkdir -p "$STATE" /etc/slurm/plugstack.conf.d
[[ -f /etc/slurm/plugstack.conf ]] || echo 'include /etc/slurm/plugstack.conf.d/*.conf' > /etc/slurm/plugstack.conf
SPANK_PBS=/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pbs.so
if [[ $TORQUE == 1 && -e $SPANK_PBS ]]; then
  echo "optional $SPANK_PBS" > /etc/slurm/plugstack.conf.d/pbs.conf
else
  rm -f /etc/slurm/plugstack.conf.d/pbs.conf
fi

# ------------------------------------------------------------------ munge
if [[ ! -s /etc/munge/munge.key ]]; then   # normally created by the munge postinst
  /usr/sbin/mungekey --create --force
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 15 sh -c 'munge -n | unmunge' || { log "munged did not come up"; exit 1; }
fi

# ------------------------------------------------------------------ slurm.conf
if [[ $ACCT == 1 ]]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
cat > "$STATE/slurm.conf.new" <<EOF
# Written by tests/harness/slurm/start.sh (Balsam test harness); overwritten on each run.
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d.%n
TmpFS=$STATE/tmp.%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
$ACCT_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
MessageTimeout=10
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
OverTimeLimit=0
Waittime=0
NodeName=c[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$BASEPORT-$((BASEPORT + NODES - 1)) CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=30 State=UP
EOF
CONF_CHANGED=0
if ! cmp -s "$STATE/slurm.conf.new" "$CONF"; then cp "$STATE/slurm.conf.new" "$CONF"; CONF_CHANGED=1; fi
mkdir -p "$STATE/ctld"
for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/d.c$i" "$STATE/tmp.c$i"; done

# ------------------------------------------------------------------ MariaDB + slurmdbd
if [[ $ACCT == 1 ]]; then
  MYSQL=(mariadb --no-defaults -S "$MYSQL_SOCK" -uroot)
  if ! mariadb-admin --no-defaults -S "$MYSQL_SOCK" -uroot ping >/dev/null 2>&1; then
    if [[ ! -d $STATE/mysql/mysql ]]; then
      log "initialising MariaDB datadir"
      mkdir -p "$STATE/mysql"
      timeout 120 mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
        --auth-root-authentication-method=normal --skip-test-db >"$STATE/mysql-init.log" 2>&1
    fi
    log "starting mariadbd on 127.0.0.1:$MYSQL_PORT"
    setsid /usr/sbin/mariadbd --no-defaults --datadir="$STATE/mysql" --user=root \
      --bind-address=127.0.0.1 --port=$MYSQL_PORT --socket="$MYSQL_SOCK" \
      --pid-file="$STATE/mysqld.pid" --log-error="$STATE/mysqld.err" \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb-admin --no-defaults -S "$MYSQL_SOCK" -uroot ping \
      || { log "mariadbd did not come up"; tail -20 "$STATE/mysqld.err" >&2; exit 1; }
  fi
  "${MYSQL[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
                    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  cat > "$STATE/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$STATE/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
DebugLevel=info
EOF
  if ! cmp -s "$STATE/slurmdbd.conf.new" "$DBDCONF"; then
    install -m 0600 "$STATE/slurmdbd.conf.new" "$DBDCONF"; stop_pidfile "$STATE/slurmdbd.pid"
  fi
  if ! pid_alive "$STATE/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
  fi
  wait_for 30 sacctmgr -n show cluster || { log "slurmdbd not responding"; tail -20 "$STATE/slurmdbd.log" >&2; exit 1; }
  if [[ -z $(sacctmgr -n -P show cluster ci format=cluster) ]]; then
    sacctmgr -i add cluster ci >/dev/null
  fi
fi

# ------------------------------------------------------------------ slurmctld
if pid_alive "$STATE/slurmctld.pid" && [[ $CONF_CHANGED == 0 ]]; then
  :
else
  stop_pidfile "$STATE/slurmctld.pid"
  log "starting slurmctld"
  /usr/sbin/slurmctld -i      # -i: ignore unreadable state files
fi
wait_for 30 scontrol ping || { log "slurmctld not responding"; tail -20 "$STATE/slurmctld.log" >&2; exit 1; }

# ------------------------------------------------------------------ slurmd(s)
for f in "$STATE"/slurmd.c*.pid; do       # slurmds left from a run with more nodes
  [[ -e $f ]] || continue
  i=${f##*/slurmd.c}; i=${i%.pid}
  (( i > NODES )) && { stop_pidfile "$f"; rm -f "$f"; }
done
for i in $(seq 1 "$NODES"); do
  n=c$i
  if pid_alive "$STATE/slurmd.$n.pid" && [[ $CONF_CHANGED == 0 ]]; then continue; fi
  stop_pidfile "$STATE/slurmd.$n.pid"
  log "starting slurmd -N $n (port $((BASEPORT + i - 1)))"
  /usr/sbin/slurmd -N "$n"
done

# ------------------------------------------------------------------ wait for usable nodes
nodes_up() { [[ $(sinfo -h -N -p debug -t idle,mix,alloc -o '%N' | sort -u | wc -l) -ge $NODES ]]; }
if ! wait_for 30 nodes_up; then
  scontrol update NodeName="c[1-$NODES]" State=RESUME 2>/dev/null || true
  wait_for 30 nodes_up || { log "nodes not up"; sinfo -N -l >&2; exit 1; }
fi
log "cluster up: $NODES node(s) x $CPUS CPUs, accounting=$ACCT, torque=$TORQUE"
