#!/usr/bin/env bash
# The GPU check: models of real shapes with random weights (no hub), 30 steps of ZeRO-3 in bf16 over NCCL with
# packed attention (flash-attn's varlen kernel when installed, else PyTorch's varlen_attn), then export and generate
# on the GPU. One command:
#
#   scripts/gpu_check.sh            # on a machine with a CUDA GPU (NPROC=8 for all of a node's GPUs)
#   scripts/gpu_check.sh --tiny     # the same steps at tiny dimensions on CPU (tests/test_gpu_check.py runs it)
#
# Prints the card, the dry run, tokens/s, TFLOPs and MFU per GPU, peak memory and the losses, then a generation.
# Environment: OUT (work directory, default /tmp/arc-gpu-check), STEPS (30), NPROC (1), TOKENIZERS (an existing
# `arctrain make-tiny-models` directory to take the tokenizers and corpus from; made here otherwise, ~1 minute).
set -euo pipefail
TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/arc-gpu-check}
STEPS=${STEPS:-30}
NPROC=${NPROC:-1}
TOKENIZERS=${TOKENIZERS:-$OUT/tokenizers}
MODELS=$OUT/models SHARDS=$OUT/shards RUN=$OUT/run
START=$SECONDS
say() { echo "gpu_check [$((SECONDS - START))s]: $*"; }
cd "$REPO"
mkdir -p "$OUT"

if [[ $TINY == 0 ]]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU here (--tiny runs on CPU)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    DEVICE=cuda DTYPE=bf16 SEGMENT=256 MICRO=8 SIZE=() DOCS=100000
    PRECISION=(train.precision=bf16 deepspeed=ds_configs/zero3_bf16.json)
else
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEVICE=cpu DTYPE=fp32 SEGMENT=16 MICRO=4 SIZE=(--tiny) DOCS=300
    PRECISION=(train.precision=fp32 deepspeed=ds_configs/zero3_cpu.json)
fi
say "attention kernel: $(python -c "from arctrain.model.attention import kernel_name; print(kernel_name('$DEVICE'))")"

if [[ ! -f $TOKENIZERS/mistral/tokenizer.json ]]; then
    say "tokenizers (arctrain make-tiny-models --pretrain-steps 0)"
    arctrain make-tiny-models --out "$TOKENIZERS" --pretrain-steps 0 --encoder-pretrain-steps 0 > /dev/null
fi
say "models: random weights, real shapes${SIZE:+ (tiny)}"
python scripts/gpu_check.py models --tokenizers "$TOKENIZERS" --out "$MODELS" "${SIZE[@]}"

say "shards ($SEGMENT-token segments)"
head -n "$DOCS" "$TOKENIZERS/corpus.jsonl" > "$OUT/corpus.jsonl"
arc-data build --input "$OUT/corpus.jsonl" --out "$SHARDS" --segment-tokens "$SEGMENT" --overwrite --no-progress \
    --encoder-tokenizer "$MODELS/encoder" --decoder "llama=$MODELS/llama" --decoder "mistral=$MODELS/mistral" > /dev/null

ARGS=(--config configs/llama_mistral_1node.yaml "model.encoder_path=$MODELS/encoder" "decoders.0.path=$MODELS/llama"
      "decoders.1.path=$MODELS/mistral" "data.shards=$SHARDS" "checkpoint.dir=$RUN" "train.steps=$STEPS"
      optim.warmup_steps=5 eval.interval=0 "checkpoint.interval=$STEPS" "data.micro_batch_size=$MICRO"
      data.num_workers=2 data.shuffle_buffer=64 logging.interval=5 logging.wandb_mode=disabled "${PRECISION[@]}")
say "dry run"
arctrain train --dry-run --world-size "$NPROC" "${ARGS[@]}"

say "training: $STEPS steps, ZeRO-3, $NPROC rank(s)"
rm -rf "$RUN"
torchrun --standalone --nproc_per_node "$NPROC" -m arctrain train "${ARGS[@]}" > "$OUT/train.log" 2>&1 \
    || { tail -n 40 "$OUT/train.log"; exit 1; }
grep -E " (frozen decoders|starting at step)" "$RUN/logs/train.log" | cut -d' ' -f3- || true
python scripts/gpu_check.py report "$RUN"

say "export and generate ($DEVICE, $DTYPE)"
arctrain export --run "$RUN" --out "$OUT/export" --overwrite
head -n 1 "$OUT/corpus.jsonl" | python -c "import json, sys; print(json.loads(sys.stdin.read())['text'][:2000])" \
    > "$OUT/context.txt"
arctrain generate --model "$OUT/export" --decoder "$MODELS/llama" --context-file "$OUT/context.txt" \
    --prompt $'\nIn short,' --max-new-tokens 16 --device "$DEVICE" --dtype "$DTYPE" | sed 's/^/generated: /'
say "done"
