#!/usr/bin/env bash
# The main job on the embedded default, on 2 CPU processes (run by `make demo`, which installs first):
#   1. tiny real models (Llama encoder, Llama and Mistral decoders, briefly pretrained) + the embedded corpus
#   2. tokenized WebDataset shards of the corpus for all three tokenizers (arc-data build)
#   3. DeepSpeed ZeRO-3 training with both decoders and evaluation (configs/tiny_cpu.yaml)
# Steps 1 and 2 are skipped when their outputs exist (delete artifacts/ to rebuild); the run starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
ART=${ART:-artifacts}
RUN_DIR=${RUN_DIR:-runs/tiny_cpu}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_SILENT=true
start=$(date +%s)

if [ ! -f "$ART/tiny/mistral/config.json" ]; then
    echo "== 1/3 tiny models and the embedded corpus -> $ART/tiny"
    arctrain make-tiny-models --out "$ART/tiny" --pretrain-steps "${PRETRAIN_STEPS:-600}"
fi
if [ ! -f "$ART/shards/manifest.json" ]; then
    echo "== 2/3 shards -> $ART/shards"
    arc-data build --input "$ART/tiny/corpus.jsonl" --out "$ART/shards" --overwrite \
        --encoder-tokenizer "$ART/tiny/encoder" \
        --decoder llama="$ART/tiny/llama" --decoder mistral="$ART/tiny/mistral" \
        --segment-tokens 16 --val-fraction 0.05 --shard-size-mb 1 --workers 2
    arc-data verify "$ART/shards"
fi
echo "== 3/3 ZeRO-3 training on 2 CPU processes -> $RUN_DIR"
rm -rf "$RUN_DIR"
torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29517}" -m arctrain train \
    --config configs/tiny_cpu.yaml checkpoint.dir="$RUN_DIR" \
    model.encoder_path="$ART/tiny/encoder" decoders.0.path="$ART/tiny/llama" decoders.1.path="$ART/tiny/mistral" \
    data.shards="$ART/shards" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$|return func" || true
test -f "$RUN_DIR/checkpoints/latest" || { echo "demo: training failed (see above)" >&2; exit 1; }
echo "demo finished in $(( $(date +%s) - start ))s"
