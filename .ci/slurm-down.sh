#!/usr/bin/env bash
# Stop exactly the daemons .ci/slurm-up.sh started (the pids it recorded), nothing else.
set -uo pipefail

DIR="${NUCFLOW_SLURM_DIR:-/var/spool/slurm-nucflow}"
say() { printf 'slurm-down: %s\n' "$*"; }

# Cancel jobs first so no worker job outlives its controller.
if [[ -f "$DIR/slurmctld.pid" ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    scancel --user=root >/dev/null 2>&1 || true
fi

stop() { # name (pid file $DIR/NAME.pid)
    local name=$1 file="$DIR/$1.pid" pid
    if [[ ! -f $file ]]; then
        say "$name: not started by slurm-up (no $file)"
        return
    fi
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid"
            say "$name (pid $pid) killed"
        else
            say "$name (pid $pid) stopped"
        fi
    else
        say "$name (pid $pid) was not running"
    fi
    rm -f "$file"
}
stop slurmd
stop slurmctld
stop munged
