"""Per-GPU memory of ARC pretraining under DeepSpeed ZeRO-3, computed from the model shapes.

    python benchmarks/memory_estimate.py                          # Llama 3.2 3B encoder, Llama 3.1 8B + Mistral 7B
    python benchmarks/memory_estimate.py --gpus 8 64 --micro-batch 16 --segment-tokens 256 --factor 4
    python benchmarks/memory_estimate.py --encoder /models/Llama-3.2-3B \\
        --decoder llama=/models/Llama-3.1-8B --decoder mistral=/models/Mistral-7B-v0.3   # shapes from config.json

What is counted, per GPU, with N GPUs (ZeRO-3 partitions every parameter, gradient and optimizer state by N):
- trainable (encoder without its last 2 layers, final norm and LM head; projectors; special vectors):
  16 bytes per parameter / N = bf16 weight 2 + bf16 gradient 2 + fp32 master weight 4 + Adam m 4 + Adam v 4;
- frozen decoders: bf16 weights only, 2 bytes per parameter / N (deepspeed.zero.Init partitions them too);
- gathered weights: ZeRO-3 materialises whole layers just in time, at most `stage3_max_live_parameters`
  (1e9 in ds_configs/zero3_bf16.json) in bf16, plus the reduce and prefetch buckets (5e7 elements each);
- activations of one micro-batch, bf16 weights, sdpa/FlashAttention (no T x T scores), activation checkpointing
  on: every layer keeps its input (2 x hidden bytes per token) and the layer recomputed in backward holds what
  autograd saves for it, per token 12 h + 4 kv + 6 i bytes in a frozen layer (RMSNorm's fp32 upcasts, q, k, v,
  attention output, gate, up, silu(gate); a frozen linear saves no input) and 20 h + 4 kv + 8 i in a trainable
  one (h hidden, kv the k/v width, i intermediate). These are measured with torch's saved-tensor hooks on
  transformers' LlamaDecoderLayer (tests/test_memory_estimate.py keeps them honest). The frozen decoder needs
  its activations too: the loss's gradient flows through it into the projector and the encoder;
- logits: transformers computes them at every decoder position: bf16 logits (2 bytes) + the fp32 log-softmax
  that cross-entropy saves (4, measured) + its fp32 gradient in backward (4) = 10 bytes per (position, entry).
Not counted: the CUDA context and NCCL buffers (about 1-2 GB), allocator fragmentation, the data loader.
The decoder of a step is one of the decoders: the peak is that of the decoder with the largest step.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GB = 1024**3
TRAINABLE_BYTES = 16
FROZEN_BYTES = 2
ACT_BYTES = 2  # bf16
LOGIT_BYTES = 10
MAX_LIVE_PARAMETERS = 1_000_000_000  # ds_configs/zero3_bf16.json
BUCKET_ELEMENTS = 2 * 50_000_000  # reduce_bucket_size + stage3_prefetch_bucket_size


@dataclass(frozen=True)
class Shape:
    """The numbers of a Llama/Mistral config.json that decide parameter and activation sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


# From each model's config.json on the Hugging Face hub (meta-llama/Llama-3.2-3B, meta-llama/Llama-3.1-8B,
# mistralai/Mistral-7B-v0.3).
PUBLISHED = {
    "Llama-3.2-3B": Shape(3072, 8192, 28, 24, 8, 128256, tied=True),
    "Llama-3.1-8B": Shape(4096, 14336, 32, 32, 8, 128256, tied=False),
    "Mistral-7B-v0.3": Shape(4096, 14336, 32, 32, 8, 32768, tied=False),
}


def shape_from_config(path: Path) -> Shape:
    cfg = json.loads((path / "config.json").read_text())
    return Shape(
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        vocab=cfg["vocab_size"],
        tied=cfg.get("tie_word_embeddings", False),
        head_dim=cfg.get("head_dim") or 0,
    )


def layer_params(s: Shape) -> int:
    q_out, kv_out = s.heads * s.hd, s.kv_heads * s.hd
    attention = s.hidden * q_out + 2 * s.hidden * kv_out + q_out * s.hidden  # q, k, v, o (no biases)
    return attention + 3 * s.hidden * s.intermediate + 2 * s.hidden  # gate, up, down; 2 RMSNorms


def causal_lm_params(s: Shape) -> int:
    """Parameters of the whole LlamaForCausalLM / MistralForCausalLM."""
    head = 0 if s.tied else s.vocab * s.hidden
    return s.vocab * s.hidden + s.layers * layer_params(s) + s.hidden + head


def encoder_params(s: Shape, truncated: int) -> int:
    """The ARC encoder: embeddings and the kept layers; no final norm, no LM head."""
    return s.vocab * s.hidden + (s.layers - truncated) * layer_params(s)


def layer_saved_bytes(s: Shape, tokens: int, trainable: bool) -> int:
    """What autograd saves in one layer's forward (bf16, fp32 RMSNorm upcast, sdpa), measured per token."""
    kv = s.kv_heads * s.hd
    if trainable:  # + the bf16 inputs of the linears (norm outputs, attention output, down_proj input)
        return tokens * (20 * s.hidden + 4 * kv + 8 * s.intermediate)
    return tokens * (12 * s.hidden + 4 * kv + 6 * s.intermediate)


def activation_bytes(s: Shape, layers: int, tokens: int, trainable: bool) -> int:
    """Activation checkpointing: every layer's input, plus the one layer being recomputed."""
    return ACT_BYTES * tokens * s.hidden * layers + layer_saved_bytes(s, tokens, trainable)


def estimate(args: argparse.Namespace, encoder: Shape, decoders: dict[str, Shape]) -> tuple[list, dict]:
    """(rows of the parameter table, per-GPU GiB per N and decoder)."""
    kept = encoder.layers - args.truncated_layers
    projectors = {
        n: encoder.hidden * args.projector_hidden + args.projector_hidden * d.hidden for n, d in decoders.items()
    }
    trainable = (
        encoder_params(encoder, args.truncated_layers) + sum(projectors.values()) + 2 * encoder.hidden * len(decoders)
    )
    frozen = sum(causal_lm_params(d) for d in decoders.values())
    rows = [("encoder (trainable)", encoder_params(encoder, args.truncated_layers))]
    rows += [(f"projector {n} (trainable)", p) for n, p in projectors.items()]
    rows += [(f"decoder {n} (frozen)", causal_lm_params(d)) for n, d in decoders.items()]

    enc_tokens = args.micro_batch * args.segment_tokens
    # Decoder sequence: BOS + compressed vectors + the special vector + about as many target tokens as encoder tokens.
    dec_len = 1 + -(-args.segment_tokens // args.factor) + 1 + args.segment_tokens
    dec_tokens = args.micro_batch * dec_len
    per_gpu = {}
    for n in args.gpus:
        static = {
            "trainable: weights, grads, Adam (16 B/param / N)": trainable * TRAINABLE_BYTES / n,
            "frozen decoders: bf16 weights (2 B/param / N)": frozen * FROZEN_BYTES / n,
            "gathered layers + comm buckets": (MAX_LIVE_PARAMETERS + BUCKET_ELEMENTS) * 2,
            "encoder activations (checkpointed)": activation_bytes(encoder, kept, enc_tokens, trainable=True),
        }
        for name, d in decoders.items():
            step = {
                **static,
                f"decoder {name} activations (checkpointed)": activation_bytes(
                    d, d.layers, dec_tokens, trainable=False
                ),
                f"decoder {name} logits + loss": LOGIT_BYTES * dec_tokens * d.vocab,
            }
            per_gpu[(n, name)] = {k: v / GB for k, v in step.items()}
    return rows + [("trainable total", trainable), ("frozen total", frozen)], per_gpu


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
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    encoder = shape_from_config(args.encoder) if args.encoder else PUBLISHED["Llama-3.2-3B"]
    if args.decoder:
        decoders = {spec.split("=", 1)[0]: shape_from_config(Path(spec.split("=", 1)[1])) for spec in args.decoder}
    else:
        decoders = {"llama": PUBLISHED["Llama-3.1-8B"], "mistral": PUBLISHED["Mistral-7B-v0.3"]}
    rows, per_gpu = estimate(args, encoder, decoders)
    print(
        f"micro-batch {args.micro_batch} x {args.segment_tokens} encoder tokens, x{args.factor} pooling, bf16, ZeRO-3"
    )
    print("\nparameters")
    for name, count in rows:
        print(f"  {name:<34} {count / 1e9:8.3f} B")
    for (n, name), parts in per_gpu.items():
        print(f"\nper GPU, N={n} GPUs, a {name} step (GiB)")
        for part, gib in parts.items():
            print(f"  {part:<52} {gib:7.2f}")
        print(f"  {'total':<52} {sum(parts.values()):7.2f}")


if __name__ == "__main__":
    main()
