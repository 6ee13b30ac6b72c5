#!/usr/bin/env bash
# The GPU check, one command on a GPU node, no network needed: models of real shapes with random weights (no hub),
# a ZeRO-3 bf16 training run with the frozen decoders replicated and one with them partitioned, packed attention with
# the GPU's varlen kernel, ZeRO-3's prefetch-trace invalidations after warm-up, export and bf16 generation, and a
# table of tokens/s, TFLOPs, MFU and peak memory per run. About 5 minutes on one H100.
#
#   scripts/gpu_wheels.sh wheels/                     # on a machine with PyPI: what the node lacks (~13 MB)
#   bash scripts/gpu_check.sh --wheels wheels/        # on the node: CUDA PyTorch + transformers already there
#   bash scripts/gpu_check.sh                         # a node with arctrain's dependencies installed
#   bash scripts/gpu_check.sh --tiny [--wheels DIR]   # the same steps at tiny dimensions on CPU (the tests)
#
# --wheels DIR installs, without any index, DIR's wheels and arctrain itself (--no-deps: the node's torch stays)
# into WORK/site, put first on PYTHONPATH. Environment: WORK (work directory, default /tmp/arc-gpu-check), REPORT
# (the report's folder: report.txt and the logs, default WORK/report), STEPS (20 per run), LOG_EVERY (5), NPROC (1),
# PYTHON (python3), TOKENIZERS (an `arctrain make-tiny-models` directory to take tokenizers and corpus from).
set -euo pipefail
TINY=0 WHEELS=""
while (($#)); do
    case $1 in
        --tiny) TINY=1 ;;
        --wheels) WHEELS=$(cd "${2:?--wheels needs a folder}" && pwd); shift ;;
        *) echo "gpu_check: unknown argument $1 (--tiny, --wheels DIR)" >&2; exit 2 ;;
    esac
    shift
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/arc-gpu-check}
REPORT=${REPORT:-$WORK/report}
STEPS=${STEPS:-20} LOG_EVERY=${LOG_EVERY:-5} NPROC=${NPROC:-1} PYTHON=${PYTHON:-python3}
TOKENIZERS=${TOKENIZERS:-$WORK/tokenizers}
MODELS=$WORK/models SHARDS=$WORK/shards
mkdir -p "$WORK" "$REPORT"
WORK=$(cd "$WORK" && pwd) REPORT=$(cd "$REPORT" && pwd)  # the steps below run in the checkout
exec > >(tee "$REPORT/gpu_check.log") 2>&1
START=$SECONDS
say() { echo "gpu_check [$((SECONDS - START))s]: $*"; }
# Through this Python, whatever the node's PATH holds (its python3 may be a venv whose bin/ is not on PATH).
arctrain() { "$PYTHON" -m arctrain "$@"; }
arc-data() { "$PYTHON" -m data_tools.cli "$@"; }
torchrun() { "$PYTHON" -m torch.distributed.run "$@"; }
cd "$REPO"

if [[ -n $WHEELS ]]; then
    say "install: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS and arctrain, no index, --no-deps"
    rm -rf "$WORK/site"
    # One pip call (a second into the same --target skips folders the first made, such as bin/). arctrain is built
    # with --no-build-isolation: setuptools from this Python, nothing fetched; build/ is left beside setup.py.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$WORK/site" \
        $(compgen -G "$WHEELS/*.whl" || true) "$REPO"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
    # This deepspeed's JIT-built ops (the CPU comm op under --tiny) go beside it, not into the cache other installs
    # share: torch would rebuild them there for each copy in turn.
    export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
fi
if [[ $TINY == 0 ]]; then
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU here (--tiny runs on CPU)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    DEVICE=cuda DTYPE=bf16 SEGMENT=256 MICRO=8 SIZE=() DOCS=100000 DS=ds_configs/zero3_bf16.json
    PRECISION=(train.precision=bf16)
else
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEVICE=cpu DTYPE=fp32 SEGMENT=16 MICRO=4 SIZE=(--tiny) DOCS=300 DS=ds_configs/zero3_cpu.json
    PRECISION=(train.precision=fp32)
fi
# Every module the check runs, imported once: a missing one is named here, not minutes later in a rank's log.
(cd "$WORK" && "$PYTHON" "$REPO/scripts/gpu_check.py" imports "$WORK/site")
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
say "attention kernel: $("$PYTHON" -c "from arctrain.model.attention import kernel_name; print(kernel_name('$DEVICE'))")"

if [[ ! -f $TOKENIZERS/mistral/tokenizer.json ]]; then
    say "tokenizers (arctrain make-tiny-models --pretrain-steps 0)"
    arctrain make-tiny-models --out "$TOKENIZERS" --pretrain-steps 0 --encoder-pretrain-steps 0 > /dev/null
fi
say "models: random weights, real shapes${SIZE:+ (tiny)}"
"$PYTHON" scripts/gpu_check.py models --tokenizers "$TOKENIZERS" --out "$MODELS" "${SIZE[@]}"

say "shards ($SEGMENT-token segments)"
head -n "$DOCS" "$TOKENIZERS/corpus.jsonl" > "$WORK/corpus.jsonl"
arc-data build --input "$WORK/corpus.jsonl" --out "$SHARDS" --segment-tokens "$SEGMENT" --overwrite --no-progress \
    --encoder-tokenizer "$MODELS/encoder" --decoder "llama=$MODELS/llama" --decoder "mistral=$MODELS/mistral" > /dev/null

# The shipped DeepSpeed file with ZeRO-3's trace-cache messages on: the report counts invalidations after warm-up.
"$PYTHON" -c "import json, sys; d = json.load(open('$DS')); d['zero_optimization']['log_trace_cache_warnings'] = True
json.dump(d, open(sys.argv[1], 'w'), indent=1)" "$WORK/ds_config.json"
ARGS=(--config configs/llama_mistral_1node.yaml "model.encoder_path=$MODELS/encoder" "decoders.0.path=$MODELS/llama"
      "decoders.1.path=$MODELS/mistral" "data.shards=$SHARDS" "train.steps=$STEPS" optim.warmup_steps=5
      eval.interval=0 "checkpoint.interval=$STEPS" "data.micro_batch_size=$MICRO" data.num_workers=2
      data.shuffle_buffer=64 "logging.interval=$LOG_EVERY" logging.wandb_mode=disabled "deepspeed=$WORK/ds_config.json"
      "${PRECISION[@]}")
say "dry run"
arctrain train --dry-run --world-size "$NPROC" "${ARGS[@]}" | tee "$REPORT/dry_run.txt"

RUNS=()
for placement in replicated partitioned; do
    run=$WORK/run_$placement
    say "training: $STEPS steps, ZeRO-3, $NPROC rank(s), frozen decoders $placement"
    rm -rf "$run" && mkdir -p "$run"
    torchrun --standalone --nproc_per_node "$NPROC" -m arctrain train "${ARGS[@]}" "checkpoint.dir=$run" \
        "model.frozen_decoders=$placement" > "$run/stdout.log" 2>&1 || { tail -n 40 "$run/stdout.log"; exit 1; }
    cp "$run/stdout.log" "$REPORT/train_$placement.log"
    grep -E " (frozen decoders|starting at step)" "$run/logs/train.log" | cut -d' ' -f3- || true
    RUNS+=("$placement=$run")
done

say "export and generate ($DEVICE, $DTYPE)"
arctrain export --run "$WORK/run_replicated" --out "$WORK/export" --overwrite
head -n 1 "$WORK/corpus.jsonl" | "$PYTHON" -c "import json, sys; print(json.loads(sys.stdin.read())['text'][:2000])" \
    > "$WORK/context.txt"
arctrain generate --model "$WORK/export" --decoder "$MODELS/llama" --context-file "$WORK/context.txt" \
    --prompt $'\nIn short,' --max-new-tokens 16 --device "$DEVICE" --dtype "$DTYPE" | sed 's/^/generated: /' \
    | tee "$REPORT/generate.txt"

"$PYTHON" scripts/gpu_check.py report "${RUNS[@]}" --ranks "$NPROC" --seconds $((SECONDS - START)) \
    | tee "$REPORT/report.txt"
say "done; report in $REPORT"
