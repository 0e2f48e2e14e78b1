#!/bin/bash
# A single-node Slurm cluster on this host's loopback, for tests: `slurm_cluster.sh start DIR` starts
# munged, slurmctld and slurmd (as root, no systemd, no cgroups) with everything they write under DIR,
# waits until the node takes jobs, and prints the SLURM_CONF that the Slurm commands need;
# `slurm_cluster.sh stop DIR` stops the three daemons (by the process ids they wrote under DIR).
#
# Needs Debian's slurm-wlm and munge (`apt-get install -y slurm-wlm munge`). The node is `localhost`
# with this machine's cores and memory; memory is not a consumable resource (a job's --mem is
# checked against the node's memory, not reserved), so jobs are packed by cores alone.
set -euo pipefail

action=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_cluster.sh start|stop DIR}")
conf=$dir/slurm.conf

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() {
    for daemon in slurmd slurmctld munged; do
        if [ -s "$dir/$daemon.pid" ]; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
        fi
    done
    for daemon in slurmd slurmctld munged; do
        if [ -s "$dir/$daemon.pid" ]; then
            pid=$(cat "$dir/$daemon.pid")
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$daemon.pid"
        fi
    done
}

start() {
    for program in munged slurmctld slurmd sinfo; do
        command -v "$program" >/dev/null || { echo "$program is not installed: apt-get install -y slurm-wlm munge" >&2; exit 1; }
    done
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
    chmod 700 "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"

    local cpus memory
    cpus=$(nproc)
    memory=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$conf" <<EOF
ClusterName=ensir-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
MailProg=/bin/true
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    slurmd -f "$conf" -N localhost
    for _ in $(seq 150); do
        if [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = "idle" ]; then
            echo "$conf"
            return
        fi
        sleep 0.2
    done
    echo "the Slurm node did not become idle in 30 s; logs in $dir" >&2
    sinfo >&2 || true
    stop
    exit 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
