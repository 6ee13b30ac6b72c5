#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the sbatch templates (run as root).
#
#   scripts/slurm_cluster.sh install          # apt-get slurm-wlm + munge when missing (idempotent, quiet)
#   scripts/slurm_cluster.sh start            # one node: this host, all its CPUs
#   scripts/slurm_cluster.sh start --nodes 2  # two nodes: network namespaces arcnode1, arcnode2 on a bridge
#   eval "$(scripts/slurm_cluster.sh env)"    # export SLURM_CONF, then sbatch/srun/squeue talk to it
#   scripts/slurm_cluster.sh status
#   scripts/slurm_cluster.sh stop             # daemons, namespaces, bridge, /etc/hosts lines: all gone
#
# Everything lives in $ARC_SLURM_STATE (default /tmp/arctrain-slurm); /etc/slurm is never touched, so a
# machine's own SLURM setup is left alone. Two nodes on one machine (see shared DESIGN.md §5): each node is a
# network namespace joined to a bridge by a veth pair, with its own address, /etc/hosts name and UTS hostname
# (with one shared hostname torch's rendezvous resolves both nodes to one address and hangs). slurmd is
# started through `nsenter --net=...` because `ip netns exec` remounts /sys without cgroups.
set -euo pipefail

STATE=${ARC_SLURM_STATE:-/tmp/arctrain-slurm}
CONF=$STATE/slurm.conf
BRIDGE=arcbr0
SUBNET=10.77.0        # a private /24 used only inside the namespaces created here
HOSTS_TAG="# arctrain-slurm"
NS_NODES=(arcnode1 arcnode2)
ACTIVE=/tmp/arctrain-slurm.active  # the state dir of the running cluster, for a stop after a killed test run

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

cmd_install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    if [[ $(id -u) != 0 ]]; then  # `make test` calls this: without root the slurm tests skip themselves
        log "warning: not root, so slurm-wlm and munge are not installed (tests marked slurm will skip)"
        return 0
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

# --- configuration -------------------------------------------------------------------------------------

write_conf() {  # $1 = node count; NodeName lines for this host (1) or the namespaces (2)
    local nodes=$1 ctld_host ctld_addr
    ctld_host=$(hostname)
    if [[ $nodes == 1 ]]; then ctld_addr=127.0.0.1; else ctld_addr=$SUBNET.1; fi
    mkdir -p "$STATE/ctld" "$STATE/log"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a throwaway $nodes-node cluster on $(hostname).
ClusterName=arclocal
SlurmctldHost=$ctld_host($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups here (containers): track job processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# GPU requests are valid (as on a CPU partition of a GPU cluster): sbatch --gpus-per-node=0 works.
GresTypes=gpu
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for a while: tests read their state and restart count.
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
StateSaveLocation=$STATE/ctld
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdSpoolDir=$STATE/spool-%n
EOF
    # Memory a little under the machine's, so that --mem requests work and slurmd does not find less than declared.
    local hw i
    # The CPUs this process may use; GNU nproc would also obey OMP_NUM_THREADS, which says nothing about the node.
    hw="CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) RealMemory=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    if [[ $nodes == 1 ]]; then
        echo "NodeName=$ctld_host NodeHostname=$ctld_host $hw State=UNKNOWN" >>"$CONF"
    else
        for i in "${!NS_NODES[@]}"; do
            echo "NodeName=${NS_NODES[$i]} NodeAddr=$SUBNET.$((11 + i)) $hw State=UNKNOWN" >>"$CONF"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

# --- daemons -------------------------------------------------------------------------------------------

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # already serving
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force && chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.ours"  # stop only a munged that we started
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

kill_pidfile() {  # $1 = pid file; SIGTERM, wait up to 10 s, then SIGKILL
    local pid i
    [[ -s $1 ]] || return 0
    pid=$(cat "$1")
    if kill "$pid" 2>/dev/null; then
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

wait_idle() {  # $1 = node count; wait until every node is idle (slurmd registered)
    local i
    for i in $(seq 150); do
        if [[ $(SLURM_CONF=$CONF sinfo -h -t idle -o '%n' 2>/dev/null | wc -l) -ge $1 ]]; then return 0; fi
        sleep 0.2
    done
    SLURM_CONF=$CONF sinfo -N >&2 || true
    die "nodes did not become idle in 30 s; logs in $STATE/log"
}

# --- two nodes: bridge + namespaces ---------------------------------------------------------------------

net_up() {
    local i ns ip
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in "${!NS_NODES[@]}"; do
        ns=${NS_NODES[$i]}
        ip=$SUBNET.$((11 + i))
        ip netns add "$ns"
        ip link add "arcv$i" type veth peer name "arcv${i}p"
        ip link set "arcv$i" master "$BRIDGE" up
        # Same interface name in every node, so one GLOO_SOCKET_IFNAME=arc0 fits the whole job.
        ip link set "arcv${i}p" netns "$ns"
        ip -n "$ns" link set "arcv${i}p" name arc0
        ip -n "$ns" addr add "$ip/24" dev arc0
        ip -n "$ns" link set arc0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "$SUBNET.1"
        echo "$ip $ns $HOSTS_TAG" >>/etc/hosts
    done
}

net_down() {
    local i ns
    for i in "${!NS_NODES[@]}"; do
        ns=${NS_NODES[$i]}
        ip link del "arcv$i" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -q "$HOSTS_TAG" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite in place instead of replacing the file.
        local kept
        kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

start_ns_slurmd() {  # $1 = node name (= namespace name = hostname inside it)
    nsenter --net="/var/run/netns/$1" unshare --uts \
        sh -c "hostname $1 && exec env SLURM_CONF=$CONF slurmd -N $1"
}

# --- commands ------------------------------------------------------------------------------------------

cmd_start() {
    local nodes=1
    if [[ ${1:-} == --nodes ]]; then nodes=${2:?--nodes needs a value}; fi
    [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2, got '$nodes'"
    [[ $(id -u) == 0 ]] || die "must run as root (daemons, namespaces, /etc/hosts)"
    if pid_alive "$STATE/slurmctld.pid"; then die "a cluster is already running ($CONF); stop it first"; fi
    # Another slurmctld on the port would answer our sinfo/sbatch and make this start look fine.
    if (exec 3<>/dev/tcp/127.0.0.1/6817) 2>/dev/null; then
        local other
        other=$(cat "$ACTIVE" 2>/dev/null || echo "?")
        die "port 6817 is in use: another slurmctld runs (state $other; stop it: ARC_SLURM_STATE=$other $0 stop)"
    fi
    cmd_install
    mkdir -p "$STATE"
    rm -rf "${STATE:?}/ctld"  # no job state from an earlier cluster
    write_conf "$nodes"
    echo "$nodes" >"$STATE/nodes"
    start_munge
    echo "$STATE" >"$ACTIVE"
    if [[ $nodes == 2 ]]; then
        net_down  # what a killed earlier run may have left (our names only)
        net_up
    fi
    SLURM_CONF=$CONF slurmctld -i
    if [[ $nodes == 1 ]]; then
        SLURM_CONF=$CONF slurmd
    else
        local ns
        for ns in "${NS_NODES[@]}"; do start_ns_slurmd "$ns"; done
    fi
    wait_idle "$nodes"
    log "$nodes-node cluster up; run: export SLURM_CONF=$CONF"
}

cmd_stop() {
    [[ -d $STATE ]] || return 0
    if pid_alive "$STATE/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --full --quiet --user=root 2>/dev/null || true
        sleep 1
    fi
    local f
    for f in "$STATE"/slurmd-*.pid; do [[ -e $f ]] && kill_pidfile "$f"; done
    kill_pidfile "$STATE/slurmctld.pid"
    net_down
    if [[ -e $STATE/munged.ours ]]; then
        kill_pidfile /run/munge/munged.pid
        rm -f "$STATE/munged.ours"
    fi
    rm -f "$STATE/nodes"
    if [[ $(cat "$ACTIVE" 2>/dev/null) == "$STATE" ]]; then rm -f "$ACTIVE"; fi
    log "stopped"
}

cmd_status() {
    pid_alive "$STATE/slurmctld.pid" || { echo "not running"; return 1; }
    SLURM_CONF=$CONF sinfo -N -o '%N %T %c %O'
    SLURM_CONF=$CONF squeue
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$CONF" ;;
        *) die "usage: $0 install | start [--nodes 1|2] | stop | status | env" ;;
    esac
}

main "$@"
