#!/bin/bash
# ARC fine-tuning on SLURM: srun -> one torchrun per node -> one `arctrain train` rank per GPU (DeepSpeed ZeRO-3).
# Submit from the arctrain checkout (logs/ must exist: SLURM does not create it):
#
#   mkdir -p logs
#   RUN_DIR=/runs/arc4_ft OVERRIDES="train.init_from=/runs/arc4 data.qa.train=/data/qa.jsonl data.qa.val=/data/qa_val.jsonl" \
#       sbatch slurm/finetune.sh
#
# QA fine-tuning (configs/llama_mistral_finetune.yaml): passages compressed, loss on the answers, starting from the
# weights of a pretraining run (train.init_from; a requeued job resumes its own checkpoint instead).
#   # Nodes without GPUs (the local test cluster): drop the GPU request, NPROC_PER_NODE ranks per node.
#   CONFIG=configs/tiny_cpu.yaml RUN_DIR=runs/x OVERRIDES="train.steps=50" NPROC_PER_NODE=2 \
#       sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 slurm/finetune.sh
#
# Fine-tuning is 4k-8k steps (the paper): one node of 8 GPUs by default.
# Every #SBATCH line below is a default that the sbatch command line overrides. `--gpus-per-node=0` removes the
# GPU request on a cluster that knows GPUs (GresTypes=gpu: GPU clusters, their CPU partitions, the local test
# cluster of scripts/slurm_cluster.sh); a cluster with no GPU configuration at all ignores the default request
# but rejects 0, so there just leave the option out. Without GPUs the job runs DS_ACCELERATOR=cpu (gloo).
# Environment: CONFIG, RUN_DIR, OVERRIDES, NPROC_PER_NODE, MAX_RESTARTS, ... (documented in slurm/common.sh).
# Preemption: SLURM sends USR1 300 s before the time limit; the ranks checkpoint and the job requeues itself.
#
#SBATCH --job-name=arc-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

ARC_REPO=${ARC_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $ARC_REPO/slurm/common.sh ]]; then
    echo "arctrain-slurm: error: $ARC_REPO/slurm/common.sh not found: submit from the checkout or set ARC_REPO" >&2
    exit 2
fi
CONFIG=${CONFIG:-configs/llama_mistral_finetune.yaml}
source "$ARC_REPO/slurm/common.sh"
arc_train_job
