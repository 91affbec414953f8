#!/usr/bin/env bash
# Start a real one-node Slurm cluster (slurmctld + slurmd + munged) on localhost.
#
# Idempotent: a second run with the daemons still up only checks them. Run as root.
# Writes /etc/slurm/slurm.conf (the default path every Slurm client reads, so sbatch
# started by dask-jobqueue needs no SLURM_CONF) and keeps state, logs and the pids it
# started under $NUCFLOW_SLURM_DIR (default /var/spool/slurm-nucflow).
# Stop with .ci/slurm-down.sh, which ends exactly the daemons recorded here.
set -euo pipefail

DIR="${NUCFLOW_SLURM_DIR:-/var/spool/slurm-nucflow}"
CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$CONF"

say() { printf 'slurm-up: %s\n' "$*"; }
die() { printf 'slurm-up: ERROR: %s\n' "$*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts daemons)"

# --- packages -----------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$DIR"/{state,spool,log} /etc/slurm

# --- munge --------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating munge key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge

if alive /run/munge/munged.pid; then
    say "munged already running (pid $(cat /run/munge/munged.pid))"
else
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do alive /run/munge/munged.pid && break; sleep 0.1; done
    alive /run/munge/munged.pid || die "munged did not start; see /var/log/munge/munged.log"
    # Only a munged we started is ours to stop.
    cp /run/munge/munged.pid "$DIR/munged.pid"
fi
munge -n | unmunge >/dev/null || die "munge round trip failed"

# --- slurm.conf ---------------------------------------------------------------------
# 80 % of the machine's memory, so slurmd never finds less than it was promised.
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
cat >"$CONF.new" <<EOF
# Written by nucflow .ci/slurm-up.sh: a one-node test cluster on localhost.
ClusterName=nucflow
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# sacct needs slurmdbd; finished jobs are logged here instead.
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# Trust the CPUs/memory below even where the machine differs (CI machines vary).
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
    mv "$CONF.new" "$CONF"
    say "wrote $CONF (RealMemory=${mem_mb} MB)"
    changed=1
else
    rm -f "$CONF.new"
    changed=0
fi
# slurmd refuses to start when it finds no cgroup.conf on some builds; an empty one is fine.
[[ -f /etc/slurm/cgroup.conf ]] || echo "CgroupPlugin=autodetect" >/etc/slurm/cgroup.conf

# --- daemons ------------------------------------------------------------------------
start() { # name, command...
    local name=$1; shift
    if alive "$DIR/$name.pid"; then
        if [[ $changed -eq 1 ]]; then
            scontrol reconfigure >/dev/null 2>&1 || true
        fi
        say "$name already running (pid $(cat "$DIR/$name.pid"))"
        return
    fi
    say "starting $name"
    nohup "$@" >>"$DIR/log/$name.stdout" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}
start slurmctld /usr/sbin/slurmctld -D -i -f "$CONF"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld did not answer; see $DIR/log/slurmctld.log"
start slurmd /usr/sbin/slurmd -D -N localhost -f "$CONF"

# --- wait until usable --------------------------------------------------------------
state=""
for _ in $(seq 150); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)
    [[ $state == idle || $state == mixed || $state == allocated ]] && break
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
[[ $state == idle || $state == mixed || $state == allocated ]] \
    || die "node localhost is '$state', not idle; see $DIR/log/slurmd.log"

out=$(timeout 60 srun -N1 -n1 --mem=100M -t 1 hostname 2>&1) \
    || die "trivial srun failed: $out"
say "srun ran on: $out"
sinfo
say "up. Client config: $CONF; logs: $DIR/log; stop with .ci/slurm-down.sh"
