# Shared by slurm/pretrain.sh and slurm/finetune.sh (sourced by the batch script, never run on its own).
#
# What a training job does, top to bottom:
#   1. arc_setup: cd to the checkout, activate its virtualenv, check CONFIG and the overrides (one line on error).
#   2. arc_banner: job id, restart count, nodes, config, git commit and the resume point go to the log.
#   3. arc_train: `srun` starts one `torchrun` per node (c10d rendezvous on the first node); torchrun starts one
#      `arctrain train` rank per GPU (or NPROC_PER_NODE ranks on CPU-only nodes).
#   4. USR1 (SLURM's `--signal=B:USR1@300`, or `scancel --signal=USR1 --batch JOB`) reaches only this shell:
#      the trap forwards it to srun, srun forwards it to every torchrun, torchrun (--signals-to-handle) to every
#      rank; the ranks agree, save a checkpoint and exit 75. torchrun itself then exits 1 (it reports a signal,
#      not its workers' codes), so "preempted" is: training exited 75, or we forwarded a signal and it failed.
#   5. Preempted and SLURM_RESTART_COUNT < MAX_RESTARTS: `scontrol requeue`; the job starts again later with
#      the same job id and run directory, and `arctrain train` resumes from checkpoints/latest.
#      Any other failure exits non-zero and is not requeued.
#
# Environment (all optional except where the job script sets a default):
#   CONFIG           YAML config (relative paths are relative to the checkout)
#   RUN_DIR          run directory = checkpoint.dir (default runs/<job name>-<job id>; the id survives requeue)
#   OVERRIDES        space-separated key=value config overrides, e.g. "train.steps=50 data.shards=/data/x"
#   NPROC_PER_NODE   ranks per node; default: GPUs allocated on the node, or 1 without GPUs
#   MAX_RESTARTS     requeues allowed (preemptions + node failures), default 50
#   SHUTDOWN_TIMEOUT seconds ranks get to checkpoint after the signal before torchrun kills them, default 240
#   RDZV_PORT        rendezvous port on the first node, default 29500 + job id % 1000
#   ARC_REPO         the arctrain checkout, default the submit directory
#   ARC_VENV         virtualenv to activate, default $ARC_REPO/.venv when it exists

set -euo pipefail

EX_TEMPFAIL=75  # arctrain train: "preempted, checkpoint saved, resume me"

arc_log() { echo "[$(date '+%F %T')] $*"; }
arc_die() { echo "arctrain-slurm: error: $*" >&2; exit 2; }

arc_setup() {
    cd "$ARC_REPO"
    local venv=${ARC_VENV:-$ARC_REPO/.venv}
    # shellcheck disable=SC1091
    if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi
    command -v torchrun >/dev/null || arc_die "torchrun not found: set ARC_VENV or activate an environment"
    [[ -f $CONFIG ]] || arc_die "CONFIG: no such file '$CONFIG' (relative to $ARC_REPO)"
    RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    read -r -a ARC_OVERRIDES <<<"${OVERRIDES:-}"
    ARC_OVERRIDES+=("checkpoint.dir=$RUN_DIR")
    # Fail in seconds on the batch node, not after every rank has started: the checks of `arctrain train`.
    python - "$CONFIG" "${ARC_OVERRIDES[@]}" <<'EOF' || exit 2
import sys
from arctrain.train.preflight import check_paths
from arctrain.config.load import load_config
try:
    check_paths(load_config(sys.argv[1], sys.argv[2:]))
except ValueError as err:
    sys.exit(f"arctrain-slurm: error: {sys.argv[1]}: {err}")
EOF
}

arc_resume_point() {
    local latest=$RUN_DIR/checkpoints/latest
    if [[ -f $latest ]]; then echo "checkpoints/$(cat "$latest")"; else echo "none (fresh start)"; fi
}

arc_banner() {
    local commit
    commit=$(git -C "$ARC_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ $commit != unknown && -n $(git -C "$ARC_REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        commit="$commit (with uncommitted changes)"
    fi
    arc_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) restart ${SLURM_RESTART_COUNT:-0}/${MAX_RESTARTS}"
    arc_log "nodes ${SLURM_JOB_NUM_NODES}: ${ARC_NODES[*]}; ranks per node ${ARC_NPROC} (${ARC_DEVICE})"
    arc_log "config ${CONFIG}; overrides: ${ARC_OVERRIDES[*]}"
    arc_log "git commit ${commit}; run dir ${RUN_DIR}"
    arc_log "resume from: $(arc_resume_point)"
}

arc_detect_ranks() {
    mapfile -t ARC_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    if [[ $gpus =~ ^[0-9]+$ ]] && ((gpus > 0)); then
        ARC_DEVICE="${gpus} GPUs"
        ARC_NPROC=${NPROC_PER_NODE:-$gpus}
    else
        # No GPU allocated: DeepSpeed's CPU accelerator, whose process group is gloo.
        export DS_ACCELERATOR=cpu
        ARC_DEVICE="CPU, DS_ACCELERATOR=cpu"
        ARC_NPROC=${NPROC_PER_NODE:-1}
    fi
}

ARC_SIGNALLED=""
ARC_SRUN_PID=""

arc_forward() {  # $1 = signal name
    ARC_SIGNALLED=$1
    arc_log "received SIG$1: forwarding to the training processes to checkpoint and exit"
    if [[ -n $ARC_SRUN_PID ]]; then kill "-$1" "$ARC_SRUN_PID" 2>/dev/null || true; fi
}

arc_launch() {  # runs srun in the background and waits for it, returning its exit status
    local port=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
    # --kill-on-bad-exit=1: a node whose torchrun fails (a rank raised, died or timed out in a collective) ends the
    # others at once, instead of leaving them waiting in a collective. A preemption's ranks have all saved (the
    # save ends with a barrier) before any of them exits.
    # srun does not inherit --cpus-per-task from sbatch on SLURM 22.05-23.02: pass it on explicitly. --ntasks too:
    # a job requeued onto fewer nodes keeps its first allocation's SLURM_NTASKS in its environment.
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        --kill-on-bad-exit=1 \
        torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$ARC_NPROC" --max_restarts=0 \
        --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="${ARC_NODES[0]}:$port" \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
        -m arctrain train --config "$CONFIG" "${ARC_OVERRIDES[@]}" &
    ARC_SRUN_PID=$!
    local rc
    while :; do
        rc=0
        wait "$ARC_SRUN_PID" || rc=$?
        # A trapped signal interrupts `wait` (status > 128) while srun is still running: wait again.
        if ((rc > 128)) && kill -0 "$ARC_SRUN_PID" 2>/dev/null; then continue; fi
        return "$rc"
    done
}

arc_finish() {  # $1 = training exit status: exit, or requeue when preempted
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if ((rc == 0)); then
        arc_log "training finished; latest checkpoint: $(arc_resume_point)"
        exit 0
    fi
    if [[ $ARC_SIGNALLED == TERM ]]; then  # SLURM requeues a job it preempts itself; scancel means stop
        arc_log "stopped by SIGTERM (exit status $rc; scancel, time limit or SLURM preemption): not requeueing;" \
            "checkpoint: $(arc_resume_point)"
        exit "$rc"
    fi
    if ((rc != EX_TEMPFAIL)) && [[ -z $ARC_SIGNALLED ]]; then
        arc_log "training failed with exit status $rc: not requeueing"
        exit "$rc"
    fi
    arc_log "preempted (exit status $rc, signal ${ARC_SIGNALLED:-none}); checkpoint: $(arc_resume_point)"
    if ((restarts >= MAX_RESTARTS)); then
        arc_log "restart count $restarts reached MAX_RESTARTS=$MAX_RESTARTS: not requeueing"
        exit 1
    fi
    arc_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

arc_train_job() {
    MAX_RESTARTS=${MAX_RESTARTS:-50}
    SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
    arc_setup
    arc_detect_ranks
    arc_banner
    trap 'arc_forward USR1' USR1
    # TERM comes from SLURM itself (scancel, time limit, preemption) to every process of the job: ranks get it
    # too, so only note it here and keep waiting for their checkpoint; a cancelled job is not requeued.
    trap 'ARC_SIGNALLED=TERM; arc_log "received SIGTERM: waiting for the training processes"' TERM
    local rc=0
    arc_launch || rc=$?
    arc_finish "$rc"
}
