#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for ferry's tests: munge, slurmctld and slurmd from
# Debian's packages (installed when absent), all state under one scratch directory.
#
#   scripts/slurm-cluster.sh start    # prints `export SLURM_CONF=...` for clients
#   scripts/slurm-cluster.sh stop
#   scripts/slurm-cluster.sh env      # the export line again
#
# FERRY_SLURM_DIR (default /tmp/ferry-slurm) holds config, state, spool, logs and sockets.
# FERRY_SLURM_CPUS (default 8) is what the node advertises, whatever the machine has.
# Facts behind the settings: ../shared/notes/slurm.md (measured on these machines).
set -euo pipefail
DIR=${FERRY_SLURM_DIR:-/tmp/ferry-slurm}
CPUS=${FERRY_SLURM_CPUS:-8}
CONF=$DIR/etc/slurm.conf

need() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "slurm-cluster: need root to install ${missing[*]}" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

write_conf() {
  mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
  chmod 755 "$DIR/munge"
  cat > "$CONF" <<CONF
ClusterName=ferrytest
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${FERRY_SLURM_PORT:-16817}
SlurmdPort=$(( ${FERRY_SLURM_PORT:-16817} + 1 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
MpiDefault=pmix
MailProg=/bin/true
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start_munge() {
  if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  if ! [ -S "$DIR/munge/munge.socket.2" ] || ! kill -0 "$(cat "$DIR/munge/munged.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
      --seed-file="$DIR/munge/seed" </dev/null >/dev/null 2>&1
  fi
}

wait_idle() {
  for _ in $(seq 1 100); do
    if SLURM_CONF=$CONF timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      return 0
    fi
    sleep 0.1
  done
  echo "slurm-cluster: the node did not come up; see $DIR/log" >&2
  SLURM_CONF=$CONF sinfo >&2 || true
  return 1
}

case "${1:-}" in
  start)
    need
    # A cluster of this directory left running is replaced, not doubled.
    "$0" stop >/dev/null 2>&1 || true
    write_conf
    start_munge
    # The daemons must not keep this script's stdout: callers read it with $(...).
    SLURM_CONF=$CONF slurmctld -f "$CONF" -i </dev/null >/dev/null 2>&1
    SLURM_CONF=$CONF slurmd -f "$CONF" -N localhost </dev/null >/dev/null 2>&1
    wait_idle
    echo "export SLURM_CONF=$CONF"
    ;;
  stop)
    pids=""
    for f in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
      pid=$(cat "$f" 2>/dev/null || true)
      if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then pids="$pids $pid"; fi
      rm -f "$f"
    done
    # Wait for them to go, so a start right after finds the ports free.
    for _ in $(seq 1 50); do
      alive=""
      for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ -z "$alive" ] && break
      sleep 0.1
    done
    ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
