#!/usr/bin/env bash
# A single-node Slurm on this machine, as root, without systemd (Debian packages slurmctld,
# slurmd, slurm-client, munge; installed with apt-get when missing). For the tests in
# tests/slurm and for trying slurm/train.sbatch on a workstation.
#
#   bash slurm/local/up.sh [STATE_DIR]        (default /tmp/megatron-ntp-slurm)
#   export SLURM_CONF=STATE_DIR/slurm.conf    (printed last)
#   bash slurm/local/down.sh [STATE_DIR]
#
# No accounting database (sbatch, squeue, scontrol, scancel work; sacct does not). Settings
# chosen for fast tests: the scheduler runs every second, and a requeued job may start again
# after AuthInfo cred_expire (5 s here; Slurm holds a requeued batch job back for the job
# credential's lifetime, 120 s by default).
# Exit status: 0 up; 3 Slurm is not installed and cannot be (not root, or apt-get failed);
# 1 anything else. Ports: SLURM_LOCAL_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail
S=${1:-/tmp/megatron-ntp-slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
HOST=$(hostname -s)
export DEBIAN_FRONTEND=noninteractive
log() { echo "[slurm/local/up] $*"; }

pkgs="slurmctld slurmd slurm-client munge"
missing=""
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
for p in $pkgs; do installed "$p" || missing="$missing $p"; done  # removed-but-configured counts as missing
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then log "Slurm packages missing ($missing) and not root: cannot install"; exit 3; fi
  if ! command -v apt-get >/dev/null; then log "Slurm packages missing ($missing) and no apt-get"; exit 3; fi
  start=$(date +%s)
  log "installing$missing with apt-get"
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >"${TMPDIR:-/tmp}/slurm-apt.log" 2>&1; then
    log "apt-get failed:"; tail -n 20 "${TMPDIR:-/tmp}/slurm-apt.log"; exit 3
  fi
  log "installed in $(( $(date +%s) - start )) s"
fi
if [ "$(id -u)" != 0 ]; then log "slurmd must run as root here (SlurmdUser=root)"; exit 3; fi

mkdir -p "$S"/{state,spool,log}

# --- munge (the Debian postinst generates the key; make one if it did not).
if [ ! -s /etc/munge/munge.key ]; then
  /usr/sbin/mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  touch "$S/munged.started"  # down.sh stops munged only when this script started it
  for _ in $(seq 40); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
fi

mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$S/slurm.conf" <<EOF
ClusterName=megatronntp
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=3600
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$S/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$S/slurmctld.pid" || /usr/sbin/slurmctld -f "$SLURM_CONF"
alive "$S/slurmd.pid" || /usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  state=$(sinfo -h -o %t 2>/dev/null || true)
  case "$state" in idle*|mix*|alloc*) break ;; esac
  sleep 0.5
done
case "$(sinfo -h -o %t 2>/dev/null || true)" in
  idle*|mix*|alloc*) ;;
  *) log "the node did not come up:"; sinfo 2>&1 || true; tail -n 20 "$S/log/slurmctld.log" "$S/log/slurmd.log" 2>/dev/null || true; exit 1 ;;
esac
sinfo
echo "export SLURM_CONF=$SLURM_CONF"
