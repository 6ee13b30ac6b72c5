"""Helpers of scripts/gpu_check.sh: the imports it needs, models of real shapes with random weights, the report.

    python scripts/gpu_check.py imports SITE                       # each module's version and where it comes from
    python scripts/gpu_check.py models --tokenizers DIR --out DIR [--tiny]   # encoder/, llama/, mistral/
    python scripts/gpu_check.py report NAME=RUN_DIR ... [--ranks N]  # tokens/s, TFLOPs, MFU, memory per run

Real shapes (no hub): the encoder is Llama-3.2-1B-shaped, the decoders a Llama-3.2-1B-shaped LlamaForCausalLM and
a 1B-class MistralForCausalLM (Mistral's 32768 vocabulary, grouped-query attention, untied head). Weights are
random (bf16), tokenizers are the tiny models' (`arctrain make-tiny-models`: each decoder its own), whose ids all
fall inside the real vocabularies. `--tiny` makes the same three with tiny dimensions, for a CPU run of the script.
"""

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
MISTRAL_1B = dict(
    hidden_size=2048,
    intermediate_size=7168,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=32768,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    max_position_embeddings=8192,
    sliding_window=None,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)


def make_models(tokenizers: Path, out: Path, tiny: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [
        ("encoder", LlamaConfig, LlamaForCausalLM, LLAMA_1B),
        ("llama", LlamaConfig, LlamaForCausalLM, LLAMA_1B),
        ("mistral", MistralConfig, MistralForCausalLM, MISTRAL_1B),
    ]
    for i, (name, config_cls, model_cls, shape) in enumerate(specs):
        tok = AutoTokenizer.from_pretrained(tokenizers / name)
        dims = {**shape, **TINY, "vocab_size": max(len(tok), 256)} if tiny else dict(shape)
        assert dims["vocab_size"] >= len(tok), (name, len(tok))
        config = config_cls(
            **dims,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            dtype="bfloat16",
        )
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


# What the check imports: the training, export and generate path and `arc-data build` (distribution name, module).
IMPORTS = [
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("deepspeed", "deepspeed"),
    ("megatron-core", "megatron.core"),
    ("webdataset", "webdataset"),
    ("zstandard", "zstandard"),
    ("msgpack", "msgpack"),
    ("pyarrow", "pyarrow"),
    ("pydantic", "pydantic"),
    ("arctrain", "arctrain.train.loop"),
]


def imports(site: Path) -> None:
    """Import every module the check needs; print each version and whether it came from SITE (the wheels
    installed by --wheels) or from this Python; one line naming what is missing otherwise."""
    from importlib.metadata import version

    missing = []
    for dist, module in IMPORTS:
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"{dist} ({err})")
            continue
        where = "wheels" if site.is_dir() and Path(mod.__file__).resolve().is_relative_to(site.resolve()) else "python"
        print(f"import {module:<22} {version(dist):<14} from {where}: {Path(mod.__file__).parent}")
    if missing:
        raise SystemExit(
            f"gpu_check: missing here: {', '.join(missing)}; add them to scripts/gpu_wheels.txt, run "
            f"scripts/gpu_wheels.sh DIR on a machine with PyPI and pass --wheels DIR"
        )


def run_row(name: str, run_dir: Path) -> dict:
    """One run's figures: the means over its logged intervals after the first (warm-up), peak memory, losses, and
    ZeRO-3 trace invalidations after the first logged step (every decoder has run by then)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [m for m in lines if "train/loss" in m]
    if not train:
        raise SystemExit(f"{run_dir}: no training metrics")
    timed = train[1:] or train

    def mean(key: str) -> float | None:
        values = [m[key] for m in timed if key in m]
        return sum(values) / len(values) if values else None

    stdout = (run_dir / "stdout.log").read_text()
    marker = f"step {train[0]['step']}: "
    after = stdout.split(marker, 1)[1] if marker in stdout else ""
    return {
        "run": name,
        "steps": train[-1]["step"],
        "enc_tok_s": mean("enc_tokens_per_s"),
        "dec_tok_s": mean("dec_tokens_per_s"),
        "tflops": mean("tflops_per_rank"),
        "mfu": mean("mfu"),
        "peak_gib": max(m["peak_memory_gb"] for m in train),
        "loss": (train[0]["train/loss"], train[-1]["train/loss"]),
        "invalidations": after.count("Invalidate trace cache"),
        "warmup_step": train[0]["step"],
    }


def report(runs: list[str], ranks: int, seconds: float | None) -> None:
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (--tiny)"
    rows = [run_row(name, Path(path)) for name, path in (spec.split("=", 1) for spec in runs)]
    print(f"GPU check: {card}, {ranks} rank(s), torch {torch.__version__}" + (f", {seconds:.0f} s" if seconds else ""))
    print(
        f"{'frozen decoders':<16} {'steps':>5} {'enc tok/s':>10} {'dec tok/s':>10} {'TFLOPs/GPU':>10} {'MFU':>6} "
        f"{'peak GiB':>8} {'loss first -> last':>19} {'trace invalidations':>19}"
    )
    for r in rows:
        mfu = f"{r['mfu']:6.3f}" if r["mfu"] is not None else f"{'n/a':>6}"
        print(
            f"{r['run']:<16} {r['steps']:5d} {r['enc_tok_s']:10.0f} {r['dec_tok_s']:10.0f} {r['tflops']:10.2f} {mfu} "
            f"{r['peak_gib']:8.2f} {r['loss'][0]:8.4f} -> {r['loss'][1]:7.4f} {r['invalidations']:19d}"
        )
    print(
        f"figures: means over the logged intervals after the first (steps 1-{rows[0]['warmup_step']}: warm-up); "
        f"trace invalidations: ZeRO-3 prefetch traces thrown away after step {rows[0]['warmup_step']} (goal 0)"
    )
    if ranks == 1:
        print(
            "NCCL across ranks: not tested: one rank runs no collective between GPUs (a world of one); the "
            "collectives' device placement is covered on CPU by tests/train/test_distributed.py, and across nodes by "
            "the 2-node gloo SLURM tests"
        )
    else:
        print(f"NCCL: {ranks} ranks on one node (not across nodes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models")
    p.add_argument("--tokenizers", required=True, type=Path, help="arctrain make-tiny-models output")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU)")
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR (metrics.jsonl and stdout.log inside)")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--seconds", type=float, help="the check's wall time so far")
    p = sub.add_parser("imports")
    p.add_argument("site", type=Path, help="the folder --wheels installed into (may not exist)")
    args = parser.parse_args()
    if args.command == "models":
        make_models(args.tokenizers, args.out, args.tiny)
    elif args.command == "imports":
        imports(args.site)
    else:
        report(args.runs, args.ranks, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
