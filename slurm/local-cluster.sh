#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, to try batch scripts before a real cluster.
#
# Usage (as root, Debian/Ubuntu):
#   slurm/local-cluster.sh up       # install Slurm + munge if missing, configure, start, wait until idle
#   slurm/local-cluster.sh status   # exit 0 when the node is up and answering, 3 when down
#   slurm/local-cluster.sh env      # print `export SLURM_CONF=...` (for: eval "$(... env)")
#   slurm/local-cluster.sh down     # cancel jobs, stop exactly the daemons `up` started
#
# Everything lives under $MPIPAR_SLURM_DIR (default /tmp/mpipar-slurm): the config
# (etc/slurm.conf, etc/mpi.conf), state, spool, logs and the PIDs of the daemons started.
# /etc/slurm/slurm.conf becomes a symlink to that config only when no slurm.conf exists
# there; an existing site config is never touched (then export SLURM_CONF, see `env`).
#
# Environment:
#   MPIPAR_SLURM_DIR     where config, state and logs go   (default /tmp/mpipar-slurm)
#   MPIPAR_SLURM_CPUS    CPUs the node advertises          (default: max(24, nproc))
#   MPIPAR_SLURM_PORTS   slurmctld and slurmd TCP ports    (default "6817 6818")
#
# No systemd needed: munged, slurmctld and slurmd are started by hand. No cgroups, no
# accounting (no sacct): read results from `sbatch --wait`'s exit code and --output files.
set -euo pipefail

DIR=${MPIPAR_SLURM_DIR:-/tmp/mpipar-slurm}
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/run/pids
SYSTEM_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
read -r CTLD_PORT SLURMD_PORT <<<"${MPIPAR_SLURM_PORTS:-6817 6818}"
export SLURM_CONF=$CONF

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes we started: "name pid starttime" lines in $PIDS -----------------------

# Field $2 of /proc/PID/stat counted after the ")" that ends the command name.
stat_field() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"
    echo "${fields[$2 - 1]:-}"
}
proc_state() { stat_field "$1" 1; }            # R, S, D, Z, ...
proc_start() { stat_field "$1" 20; }           # start time in clock ticks since boot

# True when PID still is the process we recorded (same start time) and not a zombie.
is_ours_alive() {
    local pid=$1 start=$2 state
    state=$(proc_state "$pid") || return 1
    [[ $state != Z && $state != X && $(proc_start "$pid") == "$start" ]]
}

recorded_pid() {  # recorded_pid NAME -> "pid start" of a live recorded process, or fail
    [[ -f $PIDS ]] || return 1
    local name pid start
    while read -r name pid start; do
        if [[ $name == "$1" ]] && is_ours_alive "$pid" "$start"; then
            echo "$pid $start"; return 0
        fi
    done <"$PIDS"
    return 1
}

record() {  # record NAME PID: check that PID runs NAME, then write down its PID and start time
    local name=$1 pid=$2 comm
    sleep 0.2
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || die "$name exited at once; see the logs in $DIR/log/"
    [[ $comm == "$name" ]] || die "expected $name at PID $pid, found '$comm'"
    grep -v "^$name " "$PIDS" 2>/dev/null >"$PIDS.new" || true
    echo "$name $pid $(proc_start "$pid")" >>"$PIDS.new"
    mv "$PIDS.new" "$PIDS"
}

stop_recorded() {  # TERM, wait, then KILL; a zombie counts as stopped
    local name=$1 pid start
    read -r pid start < <(recorded_pid "$name") || return 0
    log "stopping $name (PID $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until_gone 10 "$pid" "$start"; then
        log "$name (PID $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until_gone 5 "$pid" "$start" || die "$name (PID $pid) still running after SIGKILL"
    fi
}

wait_until_gone() {  # wait_until_gone SECONDS PID START: true once it exited (zombie or reaped)
    for _ in $(seq 1 $(($1 * 5))); do
        is_ours_alive "$2" "$3" || return 0
        sleep 0.2
    done
    return 1
}

# Our daemons were re-parented to PID 1, which here may reap them only seconds later.
wait_for_reaping() {
    local name pid start
    for _ in $(seq 1 50); do
        while read -r name pid start; do
            [[ $(proc_start "$pid" 2>/dev/null) == "$start" ]] && { sleep 0.2; continue 2; }
        done <"$PIDS"
        return 0
    done
    log "exited daemons not yet reaped by PID 1 (zombies, harmless)"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${seconds}s waiting for $what; logs in $DIR/log/"
}

# --- install and configure ------------------------------------------------------------

pmix_dirs() { compgen -G '/usr/lib/*/pmix2/lib/libpmix.so.2' | xargs -r -n1 dirname; }

install_packages() {
    local missing=() tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ -n $(pmix_dirs) ]] || missing+=(libpmix2)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm (slurmctld, slurmd, client), munge and PMIx by hand"
    log "installing slurmctld slurmd slurm-client munge libpmix2 (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$DIR/log"
    # Not the slurm-wlm metapackage: it pulls ~40 packages none of which is needed here.
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge libpmix2; } >"$DIR/log/apt.log" 2>&1; then
        tail -n 20 "$DIR/log/apt.log" >&2
        die "apt-get failed; full log in $DIR/log/apt.log"
    fi
}

# Debian ships libpmix.so.2 but Slurm's pmix plugin dlopens libpmix.so (only in libpmix-dev):
# without the link srun fails with "can not load PMIx library".
fix_pmix_link() {
    local dir
    for dir in $(pmix_dirs); do
        [[ -e $dir/libpmix.so ]] || ln -s libpmix.so.2 "$dir/libpmix.so"
    done
}

write_config() {
    local cpus=${MPIPAR_SLURM_CPUS:-$(( $(nproc) > 24 ? $(nproc) : 24 ))}
    mkdir -p "$DIR"/{etc,state,spool,log,run}
    cat >"$CONF.new" <<EOF
# Written by mpipar's slurm/local-cluster.sh: a one-node test cluster. Rewritten on every 'up'.
ClusterName=mpipar-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its credential expires (default 120 s).
AuthInfo=cred_expire=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups and no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
# Advertise $cpus CPUs whatever the hardware has, so 4-rank jobs run on a 2-core machine.
SlurmdParameters=config_overrides
# Impossible requests fail at submit time instead of pending forever.
EnforcePartLimits=ALL
# Quick turnaround: 'sbatch --wait' polls every 2 s; batch jobs start at once; requeued
# jobs are picked up within 10 s of becoming eligible (default 60 s).
MinJobAge=5
SchedulerParameters=batch_sched_delay=0,sched_interval=10
KillWait=10
MailProg=/bin/true
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
    # The pip Open MPI wheel otherwise prints a block of "Sorry! You were supposed to get help" per rank.
    echo 'PMIxEnv=PMIX_MCA_psec=native' >"$DIR/etc/mpi.conf"
}

link_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        return 0
    elif [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        log "$SYSTEM_CONF exists and is not ours; left alone. Point the Slurm commands at this cluster with:"
        log "  export SLURM_CONF=$CONF"
    else
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        ln -s "$CONF" "$SYSTEM_CONF"
    fi
}

unlink_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

# --- daemons --------------------------------------------------------------------------

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_munged() {
    if recorded_pid munged >/dev/null || munge_works; then
        return 0  # ours already, or a site munged we can use (and must not stop)
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    log "starting munged"
    setsid setpriv --reuid=munge --regid=munge --init-groups \
        munged -F </dev/null >>"$DIR/log/munged.log" 2>&1 &
    record munged $!
    wait_for 10 "munged" munge_works
}

start_slurmctld() {
    recorded_pid slurmctld >/dev/null && return 0
    port_in_use "$CTLD_PORT" && die "port $CTLD_PORT is in use (another slurmctld?); set MPIPAR_SLURM_PORTS"
    log "starting slurmctld"
    # -c: start with no jobs and no node state from an earlier run.
    setsid slurmctld -D -c -f "$CONF" </dev/null >>"$DIR/log/slurmctld.stdout" 2>&1 &
    record slurmctld $!
    wait_for 30 "slurmctld to answer 'scontrol ping'" ctld_up
}

start_slurmd() {
    recorded_pid slurmd >/dev/null && return 0
    port_in_use "$SLURMD_PORT" && die "port $SLURMD_PORT is in use (another slurmd?); set MPIPAR_SLURM_PORTS"
    log "starting slurmd"
    setsid slurmd -D -N "$NODE" -f "$CONF" </dev/null >>"$DIR/log/slurmd.stdout" 2>&1 &
    record slurmd $!
    wait_for 30 "node $NODE to become idle" node_idle
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_idle() { [[ $(sinfo -h -N -n "$NODE" -o %t 2>/dev/null) == idle ]]; }

cancel_jobs() {
    ctld_up || return 0
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -z ${jobs// } ]] && return 0
    log "cancelling jobs still in the queue: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs || true
    for _ in $(seq 1 150); do
        # Ended jobs stay listed for MinJobAge seconds; wait only for those not yet ended.
        [[ -z $(squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null | tr -d '[:space:]') ]] && return 0
        sleep 0.2
    done
    log "jobs still ending after 30 s; stopping the daemons anyway"
}

# --- commands -------------------------------------------------------------------------

cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "needs root (apt-get, munged, slurmd launching jobs); try: sudo $0 up"
    local started=$SECONDS
    install_packages
    fix_pmix_link
    mkdir -p "$DIR/run"
    if ! recorded_pid slurmctld >/dev/null; then
        write_config  # never rewrite the config under a running slurmctld
    fi
    start_munged
    start_slurmctld
    start_slurmd
    link_system_conf
    log "up in $((SECONDS - started)) s: node $NODE idle, $(sinfo -h -N -o '%c CPUs, partition %P')"
    log "config $CONF, logs $DIR/log/; try: sbatch --wait slurm/resnet_dp.sh --data synthetic --max-steps 3"
}

cmd_down() {
    local started=$SECONDS
    if [[ ! -f $PIDS ]]; then
        log "not running (no $PIDS)"
        unlink_system_conf
        return 0
    fi
    cancel_jobs
    stop_recorded slurmd
    stop_recorded slurmctld
    stop_recorded munged
    wait_for_reaping
    rm -f "$PIDS"
    unlink_system_conf
    log "down in $((SECONDS - started)) s (logs kept in $DIR/log/)"
}

cmd_status() {
    local name pid start up=1
    for name in munged slurmctld slurmd; do
        if read -r pid start < <(recorded_pid "$name"); then
            echo "$name: running, PID $pid"
        elif [[ $name == munged ]] && munge_works; then
            echo "munged: not started by this script, but a munged answers"
        else
            echo "$name: not running"; up=0
        fi
    done
    if ctld_up; then
        sinfo -N -o '%N %t %c %P' | sed 's/^/  /'
        squeue | sed 's/^/  /'
    else
        up=0
    fi
    echo "SLURM_CONF=$CONF"
    [[ $up -eq 1 ]] && node_idle_or_busy && return 0
    return 3
}

node_idle_or_busy() { [[ $(sinfo -h -N -n "$NODE" -o %t 2>/dev/null) =~ ^(idle|mix|alloc)$ ]]; }

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
