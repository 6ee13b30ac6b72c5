"""Per-GPU memory of ARC pretraining under DeepSpeed ZeRO-3, from the model shapes (model: arctrain/train/memory.py).

    python benchmarks/memory_estimate.py                          # Llama 3.2 3B encoder, Llama 3.1 8B + Mistral 7B
    python benchmarks/memory_estimate.py --gpus 8 64 --micro-batch 16 --segment-tokens 256 --factor 4
    python benchmarks/memory_estimate.py --encoder /models/Llama-3.2-3B \\
        --decoder llama=/models/Llama-3.1-8B --decoder mistral=/models/Mistral-7B-v0.3   # shapes from config.json
    python benchmarks/memory_estimate.py --loss-chunk-tokens 0 --replicated llama mistral
    python benchmarks/memory_estimate.py --gpus 64 --no-decoder-checkpointing --zero-stage 3 --hpz 8 \\
        --replicated llama mistral
"""

import argparse
from pathlib import Path

from arctrain.train.memory import PUBLISHED, Setup, cross_node_bytes, estimate, format_estimate, shape_from_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", type=Path, help="HF directory of the encoder backbone (default: Llama 3.2 3B shapes)")
    p.add_argument("--decoder", action="append", default=[], metavar="NAME=PATH", help="HF directory of a decoder")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="data-parallel world sizes")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU per forward")
    p.add_argument("--segment-tokens", type=int, default=256, help="encoder tokens per compressed segment")
    p.add_argument("--factor", type=int, default=4, help="pooling factor x")
    p.add_argument("--truncated-layers", type=int, default=2)
    p.add_argument("--projector-hidden", type=int, default=2048)
    p.add_argument("--loss-chunk-tokens", type=int, default=1024, help="0: the cross-entropy in one piece")
    p.add_argument("--replicated", nargs="*", default=[], metavar="NAME", help="decoders replicated, not partitioned")
    p.add_argument("--no-encoder-checkpointing", action="store_true", help="train.encoder_checkpointing=false")
    p.add_argument("--no-decoder-checkpointing", action="store_true", help="train.decoder_checkpointing=false")
    p.add_argument(
        "--zero-stage", type=int, choices=[2, 3], default=3, help="train.zero_stage (2: decoders replicated)"
    )
    p.add_argument("--hpz", type=int, default=0, metavar="G", help="train.zero_hpz with G GPUs per node")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the bytes moved across nodes")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    encoder = shape_from_config(args.encoder) if args.encoder else PUBLISHED["Llama-3.2-3B"]
    if args.decoder:
        decoders = {spec.split("=", 1)[0]: shape_from_config(Path(spec.split("=", 1)[1])) for spec in args.decoder}
    else:
        decoders = {"llama": PUBLISHED["Llama-3.1-8B"], "mistral": PUBLISHED["Mistral-7B-v0.3"]}
    setup = Setup(
        micro_batch=args.micro_batch,
        segment_tokens=args.segment_tokens,
        factor=args.factor,
        truncated_layers=args.truncated_layers,
        projector_hidden=args.projector_hidden,
        loss_chunk_tokens=args.loss_chunk_tokens,
        replicated=tuple(args.replicated),
        encoder_checkpointing=not args.no_encoder_checkpointing,
        decoder_checkpointing=not args.no_decoder_checkpointing,
        zero_stage=args.zero_stage,
        hpz_partition=args.hpz,
    )
    zero = f"ZeRO-{args.zero_stage}" + (f" + hpZ ({args.hpz} per node)" if args.hpz else "")
    print(
        f"micro-batch {args.micro_batch} x {args.segment_tokens} encoder tokens, x{args.factor} pooling, bf16, {zero}"
    )
    for i, n in enumerate(args.gpus):
        text = format_estimate(estimate(encoder, decoders, setup, n), n)
        print("\n" + (text if i == 0 else text.split("\n\n", 1)[1]))  # the parameter table once
        for name, parts in cross_node_bytes(encoder, decoders, setup, n, args.gpus_per_node).items():
            moved = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items())
            print(f"  across nodes ({args.gpus_per_node} GPUs each), a {name} micro-batch step, GB per GPU: {moved}")


if __name__ == "__main__":
    main()
