#!/usr/bin/env bash
# Stop what slurm/local/up.sh started in STATE_DIR: its jobs, slurmd, slurmctld (by their pid
# files), and munged when up.sh started it.
#   bash slurm/local/down.sh [STATE_DIR]
S=${1:-/tmp/megatron-ntp-slurm}
export SLURM_CONF=$S/slurm.conf
if [ -f "$SLURM_CONF" ] && command -v scancel >/dev/null; then
  scancel --user="$(id -un)" 2>/dev/null || true
fi
stop() {  # pid file, name
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || { echo "stopped $2"; return 0; }; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null; echo "killed $2"
}
stop "$S/slurmd.pid" slurmd
stop "$S/slurmctld.pid" slurmctld
if [ -f "$S/munged.started" ]; then
  stop /run/munge/munged.pid munged
  rm -f "$S/munged.started"
fi
