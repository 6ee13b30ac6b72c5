"""Helpers of scripts/gpu_check.sh: models of real shapes with random weights, and the report of a run.

    python scripts/gpu_check.py models --tokenizers DIR --out DIR [--tiny]   # encoder/, llama/, mistral/
    python scripts/gpu_check.py report RUN_DIR                              # tokens/s, MFU, memory, losses

Real shapes (no hub): the encoder is Llama-3.2-1B-shaped, the decoders a Llama-3.2-1B-shaped LlamaForCausalLM and
a 1B-class MistralForCausalLM (Mistral's 32768 vocabulary, grouped-query attention, untied head). Weights are
random (bf16), tokenizers are the tiny models' (`arctrain make-tiny-models`: each decoder its own), whose ids all
fall inside the real vocabularies. `--tiny` makes the same three with tiny dimensions, for a CPU run of the script.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                rope_theta=500000.0, max_position_embeddings=8192)  # fmt: skip
MISTRAL_1B = dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=32768, tie_word_embeddings=False,
                  rope_theta=1000000.0, max_position_embeddings=8192, sliding_window=None)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048)  # fmt: skip


def make_models(tokenizers: Path, out: Path, tiny: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [("encoder", LlamaConfig, LlamaForCausalLM, LLAMA_1B), ("llama", LlamaConfig, LlamaForCausalLM, LLAMA_1B),
             ("mistral", MistralConfig, MistralForCausalLM, MISTRAL_1B)]  # fmt: skip
    for i, (name, config_cls, model_cls, shape) in enumerate(specs):
        tok = AutoTokenizer.from_pretrained(tokenizers / name)
        dims = {**shape, **TINY, "vocab_size": max(len(tok), 256)} if tiny else dict(shape)
        assert dims["vocab_size"] >= len(tok), (name, len(tok))
        config = config_cls(**dims, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, dtype="bfloat16")  # fmt: skip
        torch.manual_seed(i)
        with torch.device(device):
            model = model_cls(config).to(torch.bfloat16)
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        model.save_pretrained(target)
        tok.save_pretrained(target)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {model_cls.__name__}, {n / 1e9:.3f}B parameters, vocabulary {config.vocab_size} -> {target}")
        del model


def report(run_dir: Path) -> None:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [m for m in lines if "train/loss" in m]
    if not train:
        raise SystemExit(f"{run_dir}: no training metrics")
    print(f"{'step':>5} {'loss':>8} {'enc tok/s':>10} {'dec tok/s':>10} {'TFLOPs/GPU':>10} {'MFU':>6} {'peak GiB':>9}")
    for m in train:
        mfu = f"{m['mfu']:6.3f}" if "mfu" in m else f"{'n/a':>6}"
        print(f"{m['step']:5d} {m['train/loss']:8.4f} {m['enc_tokens_per_s']:10.0f} {m['dec_tokens_per_s']:10.0f} "
              f"{m['tflops_per_rank']:10.2f} {mfu} {m['peak_memory_gb']:9.2f}")  # fmt: skip
    first, last = train[0]["train/loss"], train[-1]["train/loss"]
    print(f"loss {first:.4f} -> {last:.4f} over {train[-1]['step']} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models")
    p.add_argument("--tokenizers", required=True, type=Path, help="arctrain make-tiny-models output")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU)")
    p = sub.add_parser("report")
    p.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    if args.command == "models":
        make_models(args.tokenizers, args.out, args.tiny)
    else:
        report(args.run_dir)


if __name__ == "__main__":
    main()
