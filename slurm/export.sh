#!/bin/bash
# Export a training run (DeepSpeed ZeRO-3 checkpoint) to a Hugging Face directory, on one node, CPU only.
# Submit from the arctrain checkout (logs/ must exist: SLURM does not create it):
#
#   mkdir -p logs
#   RUN_DIR=/runs/arc4 EXPORT_DIR=/exports/arc4 sbatch slurm/export.sh
#   RUN_DIR=/runs/arc4 sbatch --dependency=afterok:<training job id> slurm/export.sh   # EXPORT_DIR=RUN_DIR/hf
#
# Consolidating ZeRO-3 shards needs host memory for the trainable weights in fp32 (the 3B encoder: ~12 GB),
# not a GPU. Environment: RUN_DIR (required), EXPORT_DIR (default $RUN_DIR/hf), ARC_REPO, ARC_VENV.
#
#SBATCH --job-name=arc-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

ARC_REPO=${ARC_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ARC_REPO"
venv=${ARC_VENV:-$ARC_REPO/.venv}
# shellcheck disable=SC1091
if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi
if [[ -z ${RUN_DIR:-} || ! -f $RUN_DIR/checkpoints/latest ]]; then
    echo "arctrain-slurm: error: RUN_DIR='${RUN_DIR:-}' has no checkpoints/latest (set RUN_DIR to a training run)" >&2
    exit 2
fi
EXPORT_DIR=${EXPORT_DIR:-$RUN_DIR/hf}
export DS_ACCELERATOR=cpu  # no GPU needed to consolidate the checkpoint
echo "[$(date '+%F %T')] job $SLURM_JOB_ID on $(hostname): export $RUN_DIR ($(cat "$RUN_DIR/checkpoints/latest")) -> $EXPORT_DIR"
echo "[$(date '+%F %T')] git commit $(git -C "$ARC_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
srun --ntasks=1 arctrain export --run "$RUN_DIR" --out "$EXPORT_DIR"
echo "[$(date '+%F %T')] exported to $EXPORT_DIR"
