"""Per-GPU memory of ARC pretraining under DeepSpeed ZeRO-3, computed from the model shapes.

    est = estimate(encoder_shape, {"llama": llama_shape}, Setup(micro_batch=16, segment_tokens=256), world_size=8)
    est.per_gpu["llama"]      # {line: GiB}, the step of that decoder; `arctrain train --dry-run` prints them
    python benchmarks/memory_estimate.py --gpus 8 64      # the table of README "Memory per GPU"

What is counted, per GPU, with N GPUs (ZeRO-3 partitions every parameter, gradient and optimizer state by N):
- trainable (encoder without its last 2 layers, final norm and LM head; projectors; special vectors):
  16 bytes per parameter / N = bf16 weight 2 + bf16 gradient 2 + fp32 master weight 4 + Adam m 4 + Adam v 4;
- frozen decoders: bf16 weights only, 2 bytes per parameter / N (deepspeed.zero.Init partitions them), or 2 bytes
  per parameter on every GPU when they are replicated (model.frozen_decoders, arctrain/model/build.py);
- gathered weights: ZeRO-3 materialises whole layers just in time, at most `stage3_max_live_parameters`
  (1e9 in ds_configs/zero3_bf16.json) in bf16, plus the reduce and prefetch buckets (5e7 elements each);
- activations of one micro-batch, bf16 weights, sdpa/FlashAttention (no T x T scores). With activation
  checkpointing (train.encoder_checkpointing, train.decoder_checkpointing: each part on or off) every layer keeps
  its input (2 x hidden bytes per token) and the layer recomputed in backward holds what autograd saves for it,
  per token 12 h + 4 kv + 6 i bytes in a frozen layer (RMSNorm's fp32 upcasts, q, k, v, attention output, gate,
  up, silu(gate); a frozen linear saves no input) and 20 h + 4 kv + 8 i in a trainable one (h hidden, kv the k/v
  width, i intermediate); without it every layer holds all of that at once. These are measured
  with torch's saved-tensor hooks on transformers' LlamaDecoderLayer (tests/train/test_memory_estimate.py keeps them
  honest). The frozen decoder needs its activations too: the loss's gradient flows through it into the
  projector and the encoder;
- the active decoder's LM head, partitioned: gathered whole in bf16 while its loss runs (arctrain/model/loss.py),
  outside the live-parameter budget (it is not a module call ZeRO-3 traces); replicated, it is in the weights;
- logits: computed only at target positions (the LM head runs on the target positions' hidden states alone,
  arctrain/model/arc.py), never at the memory vectors, BOS or prefix. In one piece: bf16 logits (2 bytes) + the
  fp32 log-softmax that cross-entropy saves (4) + its fp32 gradient in backward (4) = 10 bytes per (target,
  entry); chunked (model.loss_chunk_tokens, arctrain/model/loss.py) only one chunk's exist at a time, recomputed
  in backward: bf16 + fp32 logits + fp32 softmax + bf16 gradient = 12 bytes per (chunk target, entry).
Not counted: the CUDA context and NCCL buffers (about 1-2 GB), allocator fragmentation, the data loader.
The decoder of a step is one of the decoders: the peak is that of the decoder with the largest step.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

GB = 1024**3
TRAINABLE_BYTES = 16
FROZEN_BYTES = 2
ACT_BYTES = 2  # bf16
LOGIT_BYTES = 10  # per (target, vocabulary entry), the loss in one piece
CHUNK_LOGIT_BYTES = 12  # per (target of a chunk, vocabulary entry), chunked
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
    return shape_from_dict(json.loads((Path(path) / "config.json").read_text()))


def shape_from_dict(cfg: dict) -> Shape:
    """The Shape of a Llama/Mistral/Qwen2 config.json's contents."""
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


def activation_bytes(s: Shape, layers: int, tokens: int, trainable: bool, checkpointed: bool = True) -> int:
    """With activation checkpointing: every layer's input, plus the one layer being recomputed. Without: what every
    layer saves, all at once (a layer's bf16 input is not among it: RMSNorm saves its fp32 upcast, counted)."""
    if checkpointed:
        return ACT_BYTES * tokens * s.hidden * layers + layer_saved_bytes(s, tokens, trainable)
    return layers * layer_saved_bytes(s, tokens, trainable)


@dataclass(frozen=True)
class Setup:
    """What the estimate needs from a run's config besides the model shapes."""

    micro_batch: int = 16
    segment_tokens: int = 256  # encoder tokens per compressed segment (and about as many target tokens)
    chunks: int = 1  # segments (chunks) per sample: data.max_chunks for long QA contexts
    text_tokens: int = 0  # decoder text before the vectors: data.interleave_tokens
    factor: int = 4
    truncated_layers: int = 2
    projector_hidden: int = 2048
    loss_chunk_tokens: int = 1024  # 0: the cross-entropy in one piece
    replicated: tuple[str, ...] = ()  # decoders held whole in bf16 on every GPU, outside ZeRO-3's partitioning
    max_live_parameters: int = MAX_LIVE_PARAMETERS  # the DeepSpeed config's stage3_max_live_parameters
    bucket_elements: int = BUCKET_ELEMENTS  # its reduce_bucket_size + stage3_prefetch_bucket_size
    zero_stage: int = 3  # train.zero_stage
    hpz_partition: int = 0  # train.zero_hpz: zero_hpz_partition_size, the GPUs of a node (0: no hpZ)
    encoder_checkpointing: bool = True  # train.encoder_checkpointing
    decoder_checkpointing: bool = True  # train.decoder_checkpointing


@dataclass
class Estimate:
    parameters: list[tuple[str, int]]  # (component, parameters)
    per_gpu: dict[str, dict[str, float]] = field(default_factory=dict)  # decoder -> {line: GiB}, that decoder's step

    def total(self, decoder: str) -> float:
        return sum(self.per_gpu[decoder].values())

    def peak(self) -> float:
        return max(self.total(name) for name in self.per_gpu)


def projector_params(encoder: Shape, decoder: Shape, hidden: int) -> int:
    return encoder.hidden * hidden + hidden * decoder.hidden


def estimate(encoder: Shape, decoders: dict[str, Shape], setup: Setup, world_size: int) -> Estimate:
    """Parameters per component, and per-GPU GiB of a step of each decoder, with `world_size` GPUs."""
    n, kept = world_size, encoder.layers - setup.truncated_layers
    projectors = {name: projector_params(encoder, d, setup.projector_hidden) for name, d in decoders.items()}
    enc_params = encoder_params(encoder, setup.truncated_layers)
    trainable = enc_params + sum(projectors.values()) + 2 * encoder.hidden * len(decoders)
    frozen = {name: causal_lm_params(d) for name, d in decoders.items()}
    rows = [("encoder (trainable)", enc_params)]
    rows += [(f"projector {name} (trainable)", p) for name, p in projectors.items()]
    rows += [(f"decoder {name} (frozen)", p) for name, p in frozen.items()]
    rows += [("trainable total", trainable), ("frozen total", sum(frozen.values()))]

    enc_tokens = setup.micro_batch * setup.segment_tokens * setup.chunks
    # Decoder sequence: BOS + [interleaved text] + compressed vectors + the special vector + about as many target
    # tokens as one segment has encoder tokens.
    vectors = setup.chunks * -(-setup.segment_tokens // setup.factor)
    dec_len = 1 + setup.text_tokens + vectors + 1 + setup.segment_tokens
    dec_tokens, targets = setup.micro_batch * dec_len, setup.micro_batch * setup.segment_tokens
    replicated = sum(p for name, p in frozen.items() if name in setup.replicated)
    partitioned = sum(frozen.values()) - replicated
    if setup.zero_stage == 2:  # bf16 weights whole on every GPU; gradients, master weights and Adam partitioned
        assert not partitioned, "ZeRO-2 partitions no weights: the frozen decoders are replicated"
        static = {"trainable: bf16 weights (2 B/param), grads + Adam (14 B/param / N)": trainable * (2 + 14 / n)}
    else:
        static = {"trainable: weights, grads, Adam (16 B/param / N)": trainable * TRAINABLE_BYTES / n}
    if partitioned:
        static["frozen decoders, partitioned: bf16 (2 B/param / N)"] = partitioned * FROZEN_BYTES / n
    if replicated:
        static["frozen decoders, replicated: bf16 (2 B/param)"] = replicated * FROZEN_BYTES
    if setup.zero_stage == 3 and setup.hpz_partition:
        static[f"hpZ: second bf16 copy within a node (2 B/param / {setup.hpz_partition})"] = (
            (trainable + partitioned) * FROZEN_BYTES / setup.hpz_partition
        )
    if setup.zero_stage == 3:
        live = min(setup.max_live_parameters, trainable + partitioned)  # never more than what is partitioned
        static["gathered layers + comm buckets"] = (live + setup.bucket_elements) * 2
    else:
        static["comm buckets"] = setup.bucket_elements * 2
    enc_ckpt, dec_ckpt = setup.encoder_checkpointing, setup.decoder_checkpointing
    static[f"encoder activations ({_ckpt(enc_ckpt)})"] = activation_bytes(encoder, kept, enc_tokens, True, enc_ckpt)
    est = Estimate(rows)
    for name, d in decoders.items():
        if setup.loss_chunk_tokens:
            logits = CHUNK_LOGIT_BYTES * min(setup.loss_chunk_tokens, targets) * d.vocab
            logit_line = f"decoder {name} logits + loss (chunks of {setup.loss_chunk_tokens} targets)"
        else:
            logits, logit_line = LOGIT_BYTES * targets * d.vocab, f"decoder {name} logits + loss (target positions)"
        head = {}
        if name not in setup.replicated:  # gathered whole (bf16) by the loss, outside the live-parameter budget
            head = {f"decoder {name} LM head, gathered while its loss runs": FROZEN_BYTES * d.vocab * d.hidden}
        step = {
            **static,
            **head,
            f"decoder {name} activations ({_ckpt(dec_ckpt)})": activation_bytes(
                d, d.layers, dec_tokens, False, dec_ckpt
            ),
            logit_line: logits,
        }
        est.per_gpu[name] = {k: v / GB for k, v in step.items()}
    return est


def cross_node_bytes(encoder: Shape, decoders: dict[str, Shape], setup: Setup, world_size: int, per_node: int) -> dict:
    """Bytes each GPU exchanges with other nodes in one micro-batch step of each decoder, by collective.

    A collective over all N ranks moves, per GPU, the (N - g) / N of the tensor held on other nodes (g GPUs per
    node); one within a node moves nothing across. ZeRO-3: the forward and the backward all-gather every partitioned
    weight they use in bf16 (hpZ: the backward's from the node's copy), and gradients are reduce-scattered in fp32
    (communication_data_type); ZeRO-2: gradients reduce-scattered in fp32, then the updated bf16 weights
    all-gathered after the optimizer step."""
    n, g = world_size, per_node
    outside = max(n - g, 0) / n
    trainable = encoder_params(encoder, setup.truncated_layers) + 2 * encoder.hidden * len(decoders)
    trainable += sum(projector_params(encoder, d, setup.projector_hidden) for d in decoders.values())
    out = {}
    for name, d in decoders.items():
        gathered = trainable + (0 if name in setup.replicated else causal_lm_params(d))
        if setup.zero_stage == 2:
            parts = {"grad reduce-scatter (fp32)": 4 * trainable, "weight all-gather (bf16)": 2 * trainable}
        else:
            backward = 0 if setup.hpz_partition else 2 * gathered
            parts = {
                "forward all-gather (bf16)": 2 * gathered,
                "backward all-gather (bf16)": backward,
                "grad reduce-scatter (fp32)": 4 * trainable,
            }
        out[name] = {k: v * outside for k, v in parts.items()}
    return out


def _ckpt(on: bool) -> str:
    return "checkpointed" if on else "not checkpointed"


def format_estimate(est: Estimate, world_size: int) -> str:
    lines = ["parameters"] + [f"  {name:<34} {count / 1e9:8.3f} B" for name, count in est.parameters]
    for name, parts in est.per_gpu.items():
        lines.append(f"\nper GPU, N={world_size} GPUs, a {name} step (GiB)")
        lines += [f"  {part:<58} {gib:7.2f}" for part, gib in parts.items()]
        lines.append(f"  {'total':<58} {sum(parts.values()):7.2f}")
    return "\n".join(lines)


# --- a run's estimate, and where its frozen decoders go --------------------------------------------------------

REPLICATE_FRACTION = 0.85  # of the GPU's memory: the rest is for the CUDA context, NCCL and fragmentation


def segment_tokens(cfg) -> int:
    """Encoder tokens per segment: QA's setting, or the first shard directory's manifest's."""
    if cfg.data.qa.train:
        return cfg.data.chunk_tokens
    return int(json.loads((Path(cfg.data.sources[0][0]) / "manifest.json").read_text())["segment_tokens"])


def run_estimate(cfg, world_size: int, ds_config: dict, replicated: tuple[str, ...] = (), **setup_fields) -> Estimate:
    """The estimate for a run's config (arctrain.config.schema.Config) and its DeepSpeed config; `setup_fields` override
    what the config says (e.g. encoder_checkpointing=False, to compare choices)."""
    encoder, decoders, setup = run_setup(cfg, ds_config, replicated, **setup_fields)
    return estimate(encoder, decoders, setup, world_size)


def run_setup(cfg, ds_config: dict, replicated: tuple[str, ...] = (), **setup_fields):
    """(encoder shape, decoder shapes, Setup) of a run's config and DeepSpeed config."""
    zero = ds_config.get("zero_optimization", {})

    def number(key: str, default: int) -> int:
        value = zero.get(key, default)
        return int(value) if isinstance(value, int | float) else default  # "auto": DeepSpeed's default

    setup = Setup(
        micro_batch=cfg.data.micro_batch_size,
        segment_tokens=segment_tokens(cfg),
        chunks=cfg.data.max_chunks if cfg.data.qa.train and cfg.data.max_chunks else 1,
        text_tokens=0 if cfg.data.qa.train else cfg.data.interleave_tokens,
        factor=cfg.model.pooling_factor,
        truncated_layers=cfg.model.n_truncated_layers,
        projector_hidden=max(d.projector_hidden for d in cfg.decoders),
        loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        replicated=replicated,
        max_live_parameters=number("stage3_max_live_parameters", MAX_LIVE_PARAMETERS),
        bucket_elements=number("reduce_bucket_size", BUCKET_ELEMENTS // 2)
        + number("stage3_prefetch_bucket_size", BUCKET_ELEMENTS // 2),
        encoder_checkpointing=cfg.train.encoder_checkpointing,
        decoder_checkpointing=cfg.train.decoder_checkpointing,
        zero_stage=cfg.train.zero_stage,
        hpz_partition=int(zero.get("zero_hpz_partition_size", 0) or 0) if cfg.train.zero_hpz else 0,
    )
    setup = replace(setup, **setup_fields)
    encoder = shape_from_config(Path(cfg.model.encoder_path))
    return encoder, {d.name: shape_from_config(Path(d.path)) for d in cfg.decoders}, setup


def gpu_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB


def placement(cfg, world_size: int, ds_config: dict, gpu_gib: float | None = None) -> tuple[tuple[str, ...], str]:
    """(decoders to replicate, why): model.frozen_decoders, "auto" decided by the estimate against the GPU."""
    names = tuple(d.name for d in cfg.decoders)
    mode = cfg.model.frozen_decoders
    if cfg.train.zero_stage == 2:
        return names, "ZeRO-2 partitions no weights (train.zero_stage=2)"
    if mode != "auto":
        return (names if mode == "replicated" else ()), "as configured"
    gpu_gib = gpu_memory_gib() if gpu_gib is None else gpu_gib
    try:
        peak = run_estimate(cfg, world_size, ds_config, names).peak()
    except KeyError as err:  # a config.json without a key the Llama-style shape needs
        return (), f"auto, no estimate for these models (config.json has no {err}): partitioned"
    if gpu_gib is None:
        return (), f"auto, no GPU here (replicated they would need an estimated {peak:.1f} GiB per GPU)"
    budget = REPLICATE_FRACTION * gpu_gib
    if peak <= budget:
        return names, f"auto, an estimated {peak:.1f} GiB per GPU fits in {budget:.1f} GiB ({gpu_gib:.0f} GiB GPU)"
    return (), f"auto, replicated they would need an estimated {peak:.1f} GiB per GPU, over {budget:.1f} GiB"
