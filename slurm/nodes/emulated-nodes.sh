#!/usr/bin/env bash
# Several emulated "nodes" on one Linux machine: network namespaces with their own host
# names and addresses, an mpirun launch agent instead of ssh, optional shaped links and
# a multi-node Slurm (one slurmd per node). To try multi-node jobs on a workstation.
#
# Usage (as root):
#   slurm/nodes/emulated-nodes.sh up [N] [--rate 1gbit] [--delay 1ms] [--no-slurm]
#   slurm/nodes/emulated-nodes.sh status          # exit 0 when up (and Slurm idle), 3 when down
#   slurm/nodes/emulated-nodes.sh exec NODE CMD...  # run CMD on node NODE (n1, n2, ...)
#   slurm/nodes/emulated-nodes.sh mpirun ARGS...    # mpirun on n1 with the hostfile and options
#   slurm/nodes/emulated-nodes.sh env               # print the Open MPI settings (for eval)
#   slurm/nodes/emulated-nodes.sh down              # stop and remove exactly what `up` made
#
# From a script (what CI, the tests and `mpipar-calibrate` across nodes use):
#   slurm/nodes/emulated-nodes.sh up 2                        # nodes n1, n2 with 2 slots each
#   slurm/nodes/emulated-nodes.sh mpirun -n 4 .venv/bin/python jobs/resnet_dp.py --data synthetic
#   # the same by hand: any command on node n1, with the environment of $DIR/mpi.env
#   slurm/nodes/emulated-nodes.sh exec n1 mpirun -n 4 --hostfile /tmp/mpipar-nodes/hostfile \
#       .venv/bin/python -m pytest --only-mpi tests/test_data_parallel_exact.py
#   slurm/nodes/emulated-nodes.sh exec n1 sbatch -N 2 --wait slurm/resnet_dp.sh --data synthetic --max-steps 2
#   PATH=/tmp/mpipar-nodes/slurm-bin:$PATH sbatch -N 2 --wait slurm/resnet_dp.sh ...   # the same
#   slurm/nodes/emulated-nodes.sh down
#
# What `up` makes (and `down` removes, by name and by recorded PID, never by pattern):
#   - namespaces mpipar-n1..mpipar-nN (the nodes) and mpipar-sw (a switch: one bridge),
#     each node's eth0 a veth to a bridge port, addresses 198.18.0.I/24 (node nI);
#     /etc/netns/mpipar-nI/hosts naming every node.
#   - under $DIR (default /tmp/mpipar-nodes): hostfile ("nI slots=S"), mpi.env (Open MPI
#     options), bin/node-agent (the launch agent PRRTE calls instead of ssh), state, logs.
#   - with --rate/--delay: a user-space link emulator (slurm/nodes/link-emulator.c, compiled
#     at `up`; the kernel has no netem) in the switch, shaping each node's uplink like
#     netem's "delay D rate R"; packets leave each node at RATE and arrive DELAY later.
#   - unless --no-slurm: munged on its own socket, slurmctld on n1 and one slurmd per node
#     (config in $DIR/slurm/etc/slurm.conf, pmix). Clients must run on a node with
#     SLURM_CONF set: `exec NODE` does both, and so do the wrappers in $DIR/slurm-bin
#     (sbatch, srun, squeue, ...). It coexists with slurm/local-cluster.sh.
#
# A process runs "on node nI" when it is in nI's network namespace with host name nI
# (nsenter --net, unshare --uts --mount, /etc/hosts bound to the node's hosts file).
#
# Environment:
#   MPIPAR_NODES_DIR    state, config and logs          (default /tmp/mpipar-nodes)
#   MPIPAR_NODES_SLOTS  MPI slots per node in the hostfile (default 2)
#   MPIPAR_NODES_CPUS   CPUs each slurmd advertises, whatever the hardware (default 8): jobs
#                       run side by side; ask for a layout with --ntasks-per-node
#   MPIRUN              the mpirun of the `mpirun` command (default: mpirun on PATH)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
DIR=${MPIPAR_NODES_DIR:-/tmp/mpipar-nodes}
PREFIX=mpipar-
SWITCH=${PREFIX}sw
SUBNET=198.18.0.0/24
SLOTS=${MPIPAR_NODES_SLOTS:-2}
SLURM_CPUS=${MPIPAR_NODES_CPUS:-8}
MAX_NODES=32
PIDS=$DIR/pids
SLURM=$DIR/slurm
SLURM_CONF_FILE=$SLURM/etc/slurm.conf

log() { printf 'emulated-nodes: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

node_names() { [[ -f $DIR/nodes ]] && cat "$DIR/nodes"; return 0; }
node_index() { [[ $1 =~ ^n([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}"; }
node_addr() { echo "198.18.0.$(node_index "$1")"; }
netns_of() { echo "$PREFIX$1"; }

# --- processes we started: "name pid starttime" lines in $PIDS (as slurm/local-cluster.sh) ---

stat_field() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"
    echo "${fields[$2 - 1]:-}"
}
is_ours_alive() {  # is_ours_alive PID START: still that process, and not a zombie
    local state
    state=$(stat_field "$1" 1) || return 1
    [[ $state != Z && $state != X && $(stat_field "$1" 20) == "$2" ]]
}
recorded_pid() {  # recorded_pid NAME -> "pid start" of a live recorded process
    [[ -f $PIDS ]] || return 1
    local name pid start
    while read -r name pid start; do
        if [[ $name == "$1" ]] && is_ours_alive "$pid" "$start"; then echo "$pid $start"; return 0; fi
    done <"$PIDS"
    return 1
}
record() {  # record NAME PID COMM: check that PID runs COMM, then write down its PID and start time
    local name=$1 pid=$2 comm
    for _ in $(seq 1 25); do  # nsenter/unshare/sh exec into the daemon
        comm=$(cat "/proc/$pid/comm" 2>/dev/null) || die "$name exited at once; see $DIR/log/ and $SLURM/log/"
        [[ $comm == "$3" ]] && break
        sleep 0.1
    done
    [[ $comm == "$3" ]] || die "expected $3 at PID $pid for $name, found '$comm'"
    echo "$name $pid $(stat_field "$pid" 20)" >>"$PIDS"
}
wait_until_gone() {  # wait_until_gone SECONDS PID START
    for _ in $(seq 1 $(($1 * 10))); do
        is_ours_alive "$2" "$3" || return 0
        sleep 0.1
    done
    return 1
}
stop_pid() {  # stop_pid WHAT PID START: TERM, wait, KILL
    local what=$1 pid=$2 start=$3
    is_ours_alive "$pid" "$start" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until_gone 10 "$pid" "$start"; then
        log "$what (PID $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until_gone 5 "$pid" "$start" || log "$what (PID $pid) still running after SIGKILL"
    fi
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${seconds}s waiting for $what; logs in $DIR/log/ and $SLURM/log/"
}

# --- running on a node ----------------------------------------------------------------

# in_node NODE CMD...: CMD in NODE's network namespace, with its host name and hosts file.
# nsenter rather than `ip netns exec`, which mounts a /sys without cgroups (slurmd exits).
in_node() {
    local node=$1 netns
    shift
    netns=$(netns_of "$node")
    [[ -e /run/netns/$netns ]] || die "no node '$node' (namespace $netns); nodes: $(node_names | tr '\n' ' ')"
    exec nsenter --net="/run/netns/$netns" unshare --uts --mount --propagation private \
        /bin/sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
        in-node "/etc/netns/$netns/hosts" "$node" "$@"
}

node_env() {  # the environment every command on a node gets
    [[ -f $DIR/mpi.env ]] && source "$DIR/mpi.env"
    [[ -f $SLURM_CONF_FILE ]] && export SLURM_CONF=$SLURM_CONF_FILE
    return 0
}

# PRRTE's plm_ssh_agent: `AGENT [options] HOST COMMAND...`, as it would call ssh. Like the ssh
# client it stays on the calling node while the command runs on HOST, passes TERM/INT/HUP on,
# and exits 255 when the remote side died of a signal (ssh's "connection lost"), so that
# mpirun sees a node that dies as a failed daemon.
cmd_agent() {
    while [[ ${1:-} == -* ]]; do shift; done
    local host=${1:?usage: agent [options] HOST COMMAND} remote status
    shift
    host=${host%%.*}
    [[ -n $(node_index "$host") ]] || die "agent: '$host' is not an emulated node (n1, n2, ...)"
    (in_node "$host" /bin/sh -c "$*") &
    remote=$!
    trap 'kill -TERM $remote 2>/dev/null' TERM INT HUP
    status=0
    for _ in $(seq 1 1000000); do  # wait returns early when a trapped signal arrives
        wait "$remote" && status=0 || status=$?
        kill -0 "$remote" 2>/dev/null || break
    done
    ((status > 128)) && exit 255
    exit "$status"
}

write_mpi_env() {
    cat >"$DIR/mpi.env" <<EOF
# Open MPI settings for jobs across the emulated nodes (written by emulated-nodes.sh up).
# mpirun must itself run on a node (emulated-nodes.sh exec n1 ...): its daemons connect back to it.
export PRTE_MCA_plm_ssh_agent=$DIR/bin/node-agent    # instead of ssh (OMPI_MCA_plm_rsh_agent is ignored)
export PRTE_MCA_hwloc_default_binding_policy=none     # --bind-to none: else every node's first rank gets core 0
export OMPI_MCA_mpi_yield_when_idle=1                 # spinning ranks starve the emulated network on few cores
export OMPI_MCA_btl=tcp,sm,self                       # shared memory inside a node, TCP across
export OMPI_MCA_btl_tcp_if_include=$SUBNET          # TCP on the emulated links only
export OMPI_MCA_btl_tcp_flags=send,inplace,need-ack,need-csum  # the default half-serialises two-way traffic
export OMPI_MCA_coll=^han                             # Open MPI 5's hierarchical collectives: 5x slower here
export OMPI_MCA_btl_tcp_eager_limit=4194304          # messages up to 4 MiB go at once: no rendezvous round trip
export OMPI_MCA_btl_tcp_max_send_size=4194304       # ... and the rest of a larger one in 4 MiB pieces
export PMIX_MCA_psec=native
EOF
    if [[ $(id -u) -eq 0 ]]; then
        echo 'export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1' >>"$DIR/mpi.env"
    fi
}

# --- network ----------------------------------------------------------------------------

make_network() {
    local count=$1 node netns i
    ip netns add "$SWITCH"
    echo "$SWITCH" >>"$DIR/namespaces"
    ip -n "$SWITCH" link set lo up
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    : >"$DIR/hosts"
    printf '127.0.0.1\tlocalhost\n' >>"$DIR/hosts"
    for i in $(seq 1 "$count"); do printf '198.18.0.%d\tn%d\n' "$i" "$i" >>"$DIR/hosts"; done
    : >"$DIR/hostfile"
    for i in $(seq 1 "$count"); do
        node=n$i
        netns=$(netns_of "$node")
        ip netns add "$netns"
        echo "$netns" >>"$DIR/namespaces"
        echo "$node" >>"$DIR/nodes"
        mkdir -p "/etc/netns/$netns"
        cp "$DIR/hosts" "/etc/netns/$netns/hosts"
        ip -n "$netns" link set lo up
        ip link add name eth0 netns "$netns" type veth peer name "port-$node" netns "$SWITCH"
        ip -n "$netns" addr add "$(node_addr "$node")/24" dev eth0
        ip -n "$netns" link set eth0 up
        ip -n "$SWITCH" link set "port-$node" master br0
        ip -n "$SWITCH" link set "port-$node" up
        echo "$node slots=$SLOTS" >>"$DIR/hostfile"
    done
}

node_reachable() {  # every node answers n1 on TCP (no ping needed): wait until the bridge forwards
    local node said
    for node in $(node_names); do
        said=$(nsenter --net="/run/netns/$(netns_of n1)" timeout 2 \
            bash -c "exec 3<>/dev/tcp/$(node_addr "$node")/1" 2>&1) || true
        [[ $said == *refused* ]] || return 1
    done
}

# --- shaped links -------------------------------------------------------------------------

parse_rate() {  # 1gbit, 500mbit, 100kbit, 1000000 (bit/s) -> bit/s
    local value=${1,,}
    [[ $value =~ ^([0-9]+(\.[0-9]+)?)(gbit|mbit|kbit|bit)?$ ]] || die "bad --rate '$1' (e.g. 1gbit, 500mbit)"
    local number=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]:-bit}
    local scale=1
    case $unit in gbit) scale=1000000000 ;; mbit) scale=1000000 ;; kbit) scale=1000 ;; esac
    awk -v n="$number" -v s="$scale" 'BEGIN { printf "%.0f", n * s }'
}

parse_delay() {  # 1ms, 250us, 0.5ms -> nanoseconds
    local value=${1,,}
    [[ $value =~ ^([0-9]+(\.[0-9]+)?)(ms|us|s)$ ]] || die "bad --delay '$1' (e.g. 1ms, 200us)"
    local scale=1000000
    case ${BASH_REMATCH[3]} in us) scale=1000 ;; s) scale=1000000000 ;; esac
    awk -v n="${BASH_REMATCH[1]}" -v s="$scale" 'BEGIN { printf "%.0f", n * s }'
}

build_emulator() {
    local missing=()
    command -v iptables >/dev/null || missing+=(iptables)
    command -v gcc >/dev/null || missing+=(gcc)
    [[ -f /usr/include/libnetfilter_queue/libnetfilter_queue.h ]] || missing+=(libnetfilter-queue-dev)
    if [[ ${#missing[@]} -gt 0 ]]; then
        command -v apt-get >/dev/null || die "shaped links need ${missing[*]}; install them, or drop --rate/--delay"
        log "installing ${missing[*]} for the link emulator"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}"; } >"$DIR/log/apt.log" 2>&1 || die "apt-get failed; see $DIR/log/apt.log"
    fi
    gcc -O2 -Wall -o "$DIR/bin/link-emulator" "$HERE/link-emulator.c" -lnetfilter_queue -lnfnetlink \
        2>"$DIR/log/gcc.log" || die "could not compile the link emulator; see $DIR/log/gcc.log"
}

start_emulator() {
    local rate=$1 delay=$2 node i=0 queues=()
    build_emulator
    ip netns exec "$SWITCH" sysctl -qw net.bridge.bridge-nf-call-iptables=1 ||
        die "no br_netfilter in this kernel: links cannot be shaped (drop --rate/--delay)"
    for node in $(node_names); do
        ip netns exec "$SWITCH" iptables -A FORWARD -m physdev --physdev-in "port-$node" \
            -j NFQUEUE --queue-num "$i" --queue-bypass ||
            die "iptables NFQUEUE on the bridge failed (needs xt_physdev and xt_NFQUEUE)"
        queues+=("$i")
        i=$((i + 1))
    done
    log "shaping every node's uplink: rate $rate bit/s, delay $((delay / 1000)) us"
    # Real-time priority: a late release is a late packet. Exits by itself after a day.
    nsenter --net="/run/netns/$SWITCH" chrt -f 10 "$DIR/bin/link-emulator" --rate "$rate" \
        --delay-ns "$delay" --max-seconds 86400 "${queues[@]}" \
        </dev/null >>"$DIR/log/link-emulator.log" 2>&1 &
    record link-emulator $! link-emulator
    echo "rate_bps=$rate delay_ns=$delay" >"$DIR/shaping"
}

# --- Slurm ----------------------------------------------------------------------------------

write_slurm_config() {
    local node nodes
    nodes=$(node_names | paste -sd, -)
    mkdir -p "$SLURM"/{etc,state,spool,tmp,log,run}
    for node in $(node_names); do mkdir -p "$SLURM/spool/$node" "$SLURM/tmp/$node"; done
    {
        cat <<EOF
# Written by slurm/nodes/emulated-nodes.sh: one slurmd per emulated node. Rewritten on every 'up'.
ClusterName=mpipar-nodes
SlurmctldHost=n1($(node_addr n1))
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SLURM/run/munge.socket,cred_expire=30
StateSaveLocation=$SLURM/state
SlurmdSpoolDir=$SLURM/spool/%n
TmpFS=$SLURM/tmp/%n
SlurmctldPidFile=$SLURM/run/slurmctld.pid
SlurmdPidFile=$SLURM/run/slurmd-%n.pid
SlurmctldLogFile=$SLURM/log/slurmctld.log
SlurmdLogFile=$SLURM/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
MinJobAge=5
SchedulerParameters=batch_sched_delay=0,sched_interval=10
KillWait=5
MailProg=/bin/true
ReturnToService=2
EOF
        for node in $(node_names); do
            echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node CPUs=$SLURM_CPUS State=UNKNOWN"
        done
        echo "PartitionName=nodes Nodes=$nodes Default=YES MaxTime=INFINITE State=UP"
    } >"$SLURM_CONF_FILE"
    echo 'PMIxEnv=PMIX_MCA_psec=native' >"$SLURM/etc/mpi.conf"
}

pmix_dirs() { compgen -G '/usr/lib/*/pmix2/lib/libpmix.so.2' | xargs -r -n1 dirname; }

start_slurm() {
    local tool node missing=()
    for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    [[ -n $(pmix_dirs) ]] || missing+=(libpmix2)
    [[ ${#missing[@]} -eq 0 ]] ||
        die "Slurm is missing (${missing[*]}): run 'slurm/local-cluster.sh up' once (installs it), or use --no-slurm"
    for tool in $(pmix_dirs); do [[ -e $tool/libpmix.so ]] || ln -s libpmix.so.2 "$tool/libpmix.so"; done
    write_slurm_config
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 "$SLURM/munge"
    chown munge:munge "$SLURM/run"
    setsid setpriv --reuid=munge --regid=munge --init-groups munged -F \
        --socket="$SLURM/run/munge.socket" --pid-file="$SLURM/munge/munged.pid" \
        --seed-file="$SLURM/munge/munged.seed" --log-file="$SLURM/log/munged.log" \
        </dev/null >>"$SLURM/log/munged.stdout" 2>&1 &
    record munged $! munged
    wait_for 10 "munged" bash -c "munge -S '$SLURM/run/munge.socket' -n </dev/null | unmunge -S '$SLURM/run/munge.socket'"
    (in_node n1 slurmctld -D -c -f "$SLURM_CONF_FILE") </dev/null >>"$SLURM/log/slurmctld.stdout" 2>&1 &
    record slurmctld $! slurmctld
    for node in $(node_names); do
        (in_node "$node" slurmd -D -N "$node" -f "$SLURM_CONF_FILE") </dev/null \
            >>"$SLURM/log/slurmd-$node.stdout" 2>&1 &
        record "slurmd-$node" $! slurmd
    done
    write_slurm_wrappers
    wait_for 30 "every node idle in sinfo" slurm_idle
}

# $DIR/slurm-bin/sbatch etc.: the Slurm commands for this cluster from anywhere. Outside the
# nodes they run on n1 (with SLURM_CONF); on a node (a job's own srun, scontrol) they are the
# real command, so a job that inherited this PATH behaves as on a real cluster.
write_slurm_wrappers() {
    local tool real
    mkdir -p "$DIR/slurm-bin"
    for tool in sbatch srun salloc squeue scancel sinfo scontrol; do
        real=$(command -v "$tool") || continue
        cat >"$DIR/slurm-bin/$tool" <<EOF
#!/bin/sh
# $tool on the emulated nodes (written by emulated-nodes.sh up)
export SLURM_CONF=$SLURM_CONF_FILE
case "\$(ip netns identify \$\$ 2>/dev/null)" in $PREFIX*) exec $real "\$@" ;; esac
exec $(printf %q "$SELF") exec n1 $real "\$@"
EOF
        chmod +x "$DIR/slurm-bin/$tool"
    done
}

on_n1() { (in_node n1 env SLURM_CONF="$SLURM_CONF_FILE" "$@"); }

slurm_idle() {
    local states
    states=$(on_n1 timeout 10 sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]]
}

cancel_slurm_jobs() {
    recorded_pid slurmctld >/dev/null || return 0
    local jobs
    jobs=$(on_n1 timeout 10 squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null | tr '\n' ' ') || return 0
    [[ -z ${jobs// } ]] && return 0
    log "cancelling Slurm jobs: $jobs"
    # shellcheck disable=SC2086
    on_n1 timeout 10 scancel $jobs || true
    for _ in $(seq 1 75); do
        [[ -z $(on_n1 timeout 10 squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null | tr -d '[:space:]') ]] && return 0
        sleep 0.2
    done
    log "jobs still ending after 15 s; stopping the daemons anyway"
}

# --- commands -------------------------------------------------------------------------------

cmd_up() {
    local count=2 rate="" delay="" slurm=1
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then count=$1; shift; fi
    while [[ $# -gt 0 ]]; do
        case $1 in
            --rate) rate=$(parse_rate "${2:?--rate needs a value}"); shift 2 ;;
            --delay) delay=$(parse_delay "${2:?--delay needs a value}"); shift 2 ;;
            --no-slurm) slurm=0; shift ;;
            *) die "unknown option '$1'; usage: up [N] [--rate 1gbit] [--delay 1ms] [--no-slurm]" ;;
        esac
    done
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces); try: sudo $0 up $count"
    ((count >= 1 && count <= MAX_NODES)) || die "N must be 1..$MAX_NODES, got $count"
    if [[ -f $DIR/nodes ]]; then
        die "nodes are already up ($(node_names | tr '\n' ' ')); run '$0 down' first"
    fi
    if [[ -n $rate || -n $delay ]]; then
        [[ -n $rate ]] || die "--delay needs --rate too (e.g. --rate 1gbit --delay 1ms)"
        ((rate <= 2000000000)) || die "--rate above 2gbit cannot be emulated here (the emulator tops out near 8 Gbit/s on 2 cores); use 2gbit or less"
    fi
    local name
    for name in "$SWITCH" $(seq -f "${PREFIX}n%g" 1 "$count"); do
        [[ ! -e /run/netns/$name ]] || die "namespace $name exists but was not made by this script ($DIR/nodes is missing); remove it with 'ip netns del $name'"
    done
    local started=$SECONDS
    rm -rf "$DIR" && mkdir -p "$DIR"/{bin,log}
    trap 'log "up failed: bringing down what was made"; cmd_down' EXIT
    make_network "$count"
    printf '#!/bin/sh\nexec %q agent "$@"\n' "$SELF" >"$DIR/bin/node-agent"
    chmod +x "$DIR/bin/node-agent"
    write_mpi_env
    wait_for 10 "the switch to forward between nodes" node_reachable
    if [[ -n $rate ]]; then start_emulator "$rate" "${delay:-0}"; fi
    if [[ $slurm -eq 1 ]]; then start_slurm; fi
    trap - EXIT
    log "up in $((SECONDS - started)) s: $(node_names | tr '\n' ' ')($SLOTS MPI slots each), state in $DIR"
    log "try: $0 mpirun -n $((count * SLOTS)) hostname"
}

cmd_down() {
    local name pid start netns
    trap - EXIT
    if [[ ! -d $DIR ]]; then log "not up (no $DIR)"; return 0; fi
    [[ -f $DIR/nodes ]] && cancel_slurm_jobs
    if [[ -f $PIDS ]]; then  # newest first: slurmd, slurmctld, munged, the emulator
        while read -r name pid start; do
            stop_pid "$name" "$pid" "$start"
        done < <(tac "$PIDS")
    fi
    # Whatever still runs on a node (jobs, mpirun) ends with it, like a node switched off.
    if [[ -f $DIR/namespaces ]]; then
        while read -r netns; do
            [[ -e /run/netns/$netns ]] || continue
            for pid in $(ip netns pids "$netns" 2>/dev/null); do
                start=$(stat_field "$pid" 20) || continue
                log "killing PID $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) still on $netns"
                kill -KILL "$pid" 2>/dev/null || true
            done
        done <"$DIR/namespaces"
        while read -r netns; do
            [[ -e /run/netns/$netns ]] && ip netns del "$netns"
            [[ $netns == "$SWITCH" ]] || rm -rf "/etc/netns/${netns:?}"
        done <"$DIR/namespaces"
    fi
    rm -rf "$DIR/nodes" "$DIR/namespaces" "$PIDS" "$DIR/shaping" "$DIR/mpi.env" "$DIR/hostfile" "$DIR/slurm-bin"
    log "down (logs kept in $DIR/log/ and $SLURM/log/)"
}

cmd_status() {
    local node up=0 name pid start
    if [[ ! -f $DIR/nodes ]]; then echo "down"; return 3; fi
    for node in $(node_names); do
        if [[ -e /run/netns/$(netns_of "$node") ]]; then
            echo "$node: $(node_addr "$node") (namespace $(netns_of "$node"))"
        else
            echo "$node: namespace missing"; up=3
        fi
    done
    [[ -f $DIR/shaping ]] && echo "shaped: $(cat "$DIR/shaping")" || echo "links: unshaped"
    if [[ -f $PIDS ]]; then
        while read -r name pid start; do
            if is_ours_alive "$pid" "$start"; then echo "$name: running, PID $pid"; else echo "$name: DEAD"; up=3; fi
        done <"$PIDS"
    fi
    if recorded_pid slurmctld >/dev/null; then
        on_n1 timeout 10 sinfo -N -o '%N %t %c %P' | sed 's/^/  /' || up=3
        echo "Slurm commands: export PATH=$DIR/slurm-bin:\$PATH (or: $0 exec n1 sbatch ...)"
    fi
    echo "hostfile $DIR/hostfile, Open MPI settings $DIR/mpi.env"
    return $up
}

cmd_exec() {
    local node=${1:?usage: exec NODE COMMAND...}
    shift
    [[ $# -gt 0 ]] || die "usage: exec NODE COMMAND..."
    node_env
    in_node "$node" "$@"
}

cmd_mpirun() {
    [[ -f $DIR/hostfile ]] || die "nodes are not up; run '$0 up' first"
    node_env
    in_node n1 "${MPIRUN:-mpirun}" --hostfile "$DIR/hostfile" "$@"
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    exec) shift; cmd_exec "$@" ;;
    mpirun) shift; cmd_mpirun "$@" ;;
    agent) shift; cmd_agent "$@" ;;
    env) cat "$DIR/mpi.env" 2>/dev/null || die "nodes are not up" ;;
    *) echo "usage: $0 up [N] [--rate R] [--delay D] [--no-slurm] | down | status | exec NODE CMD... | mpirun ARGS... | env" >&2
       exit 2 ;;
esac
