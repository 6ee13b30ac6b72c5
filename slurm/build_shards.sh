#!/bin/bash
# Build tokenized shards as a SLURM array job, CPU only: one array task per input part, then one merge.
# Submit from the arctrain checkout (logs/ must exist: SLURM does not create it):
#
#   mkdir -p logs
#   ls /data/raw/*.jsonl.zst > parts.txt        # one part per line: a file or a glob (arc-data expands it, sorted)
#   PARTS=parts.txt OUT=/data/shards ENCODER_TOKENIZER=/models/encoder \
#   DECODERS="llama=/models/llama mistral=/models/mistral" BUILD_ARGS="--segment-tokens 256" \
#   sbatch --array=0-$(($(grep -c . parts.txt) - 1)) --cpus-per-task=16 slurm/build_shards.sh
#
# Every #SBATCH default below can be overridden on the sbatch command line (--array, --cpus-per-task, --mem, ...).
#
# What a task does: array task i builds part i (line i+1 of PARTS, blank lines ignored) into $OUT/parts/<i>,
# numbering its shards from i * SHARD_STRIDE (`arc-data build --start-shard`), so no two parts share a shard name.
# It then marks part i done. The task that finds every part done merges: `arc-data merge` hard-links all parts'
# shards into $OUT (no copy; parts/ can be deleted afterwards) and writes $OUT/manifest.json. A failed task leaves
# its part unmarked, so nothing is merged; resubmit just that index (`sbatch --array=3 ...`, same environment)
# and the merge follows when it succeeds. To run only the merge: ARC_STEP=merge sbatch --array=0 slurm/build_shards.sh
#
# Environment: PARTS, OUT, ENCODER_TOKENIZER, DECODERS ("NAME=PATH ..."), all required; BUILD_ARGS (more
# `arc-data build` flags); WORKERS (default: the task's CPUs); SHARD_STRIDE (default 10000 shards per part);
# ARC_STEP (build, or merge); ARC_REPO (default the submit directory); ARC_VENV (default $ARC_REPO/.venv).
#
#SBATCH --job-name=arc-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --array=0
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

log() { echo "[$(date '+%F %T')] $*"; }
die() { echo "arc-data-slurm: error: $*" >&2; exit 2; }

ARC_REPO=${ARC_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ARC_REPO"
venv=${ARC_VENV:-$ARC_REPO/.venv}
# shellcheck disable=SC1091
if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi
command -v arc-data >/dev/null || die "arc-data not found: set ARC_VENV or activate an environment"
for var in PARTS OUT ENCODER_TOKENIZER DECODERS; do
    [[ -n ${!var:-} ]] || die "$var is not set (see the header of slurm/build_shards.sh)"
done
[[ -f $PARTS ]] || die "PARTS: no such file '$PARTS'"

mapfile -t parts < <(grep -v '^[[:space:]]*$' "$PARTS")
n_parts=${#parts[@]}
((n_parts > 0)) || die "PARTS '$PARTS' lists no input"
task=${SLURM_ARRAY_TASK_ID:-0}
stride=${SHARD_STRIDE:-10000}
part_dir() { printf '%s/parts/%05d' "$OUT" "$1"; }

merge() {
    local dirs=() i
    for ((i = 0; i < n_parts; i++)); do dirs+=("$(part_dir "$i")"); done
    log "merging $n_parts parts into $OUT"
    arc-data merge --overwrite --out "$OUT" "${dirs[@]}"
}

if [[ ${ARC_STEP:-build} == merge ]]; then
    merge
    exit 0
fi

((task < n_parts)) || die "array task $task, but PARTS lists only $n_parts parts (use --array=0-$((n_parts - 1)))"
done_dir=$OUT/parts/done
mkdir -p "$done_dir"
rm -f "$done_dir/$task"  # a rerun of this part is not done until it succeeds
decoder_args=()
for spec in $DECODERS; do decoder_args+=(--decoder "$spec"); done
read -r -a extra_args <<<"${BUILD_ARGS:-}"

log "job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}} task $task/$n_parts on $(hostname): ${parts[$task]} -> $(part_dir "$task")"
arc-data build --input "${parts[$task]}" --out "$(part_dir "$task")" --overwrite \
    --encoder-tokenizer "$ENCODER_TOKENIZER" "${decoder_args[@]}" \
    --workers "${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}" --start-shard $((task * stride)) "${extra_args[@]}"
touch "$done_dir/$task"

# The last task to finish sees every part done; mkdir is atomic, so exactly one of the tasks that see it merges.
n_done=$(find "$done_dir" -maxdepth 1 -type f | wc -l)
if ((n_done == n_parts)) && mkdir "$OUT/parts/merging" 2>/dev/null; then
    trap 'rmdir "$OUT/parts/merging"' EXIT  # released whatever happens, so a rerun can merge again
    merge
else
    log "part $task done ($n_done/$n_parts parts); the last part to finish merges"
fi
