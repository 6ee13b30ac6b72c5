"""One typed config tree: defaults in dataclasses, a YAML file overrides them, `a.b=c` overrides the file.

    cfg = load_config("configs/tiny_cpu.yaml", ["train.steps=20", "decoders.1.path=/models/mistral"])
    save_config(cfg, "runs/x/config.yaml")        # resolved; load_config of it gives an equal Config
    ds = deepspeed_config(cfg, world_size=8)      # what deepspeed.initialize(config=...) gets

Every user error is a `ConfigError` (a ValueError) whose one-line message names where the value came from
(file and line, or the command line), the dotted key and the value.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arctrain.config.tree import ConfigError
from data_tools.inputs import SUFFIXES

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(key, f"{value!r} {why}")


@dataclass
class ModelConfig:
    encoder_path: str
    """Hugging Face directory of the encoder backbone (a decoder-only LM); its tokenizer tokenizes contexts."""
    n_truncated_layers: int = 2
    """Number of last backbone layers removed (the paper removes 2)."""
    pooling: Literal["mean_pooled_queries", "mean"] = "mean_pooled_queries"
    """Mean-pooled queries in the last kept layer (the paper), or plain mean of the final states (ablation)."""
    pooling_factor: int = 4
    """Compression factor x: about x tokens per memory vector."""
    n_vectors: int = 0
    """When > 0, every segment is compressed into exactly this many vectors instead of len/pooling_factor."""
    attn_implementation: Literal["packed"] = "packed"
    """The encoder's attention: packed segments, no padding (arctrain/model/attention.py picks the kernel: flash-attn
    or PyTorch's varlen_attn on CUDA, exact per-segment attention on the CPU). The weights' dtype is
    train.precision's."""
    loss_chunk_tokens: int = 1024
    """Cross-entropy over the vocabulary in chunks of this many target tokens (the LM head weight gathered once):
    the (targets, vocab) fp32 logits never exist at once. 0: all targets in one piece."""

    frozen_decoders: Literal["auto", "replicated", "partitioned"] = "auto"
    """Frozen decoders partitioned by ZeRO-3 (all-gathered in every forward and backward), or replicated: whole, in
    bf16, on every GPU, no gathering. auto: replicated when arctrain/train/memory.py's estimate of the peak with them
    replicated fits in 85% of the GPU's memory, else partitioned (always partitioned without a GPU)."""
    rope: Literal["checkpoint", "plain"] = "checkpoint"
    """The encoder's RoPE: "checkpoint" keeps the backbone config's scaling (e.g. Llama 3.x `rope_type: llama3`),
    "plain" applies unscaled RoPE with its rope_theta, as the reference ARC-Encoder does (and imported checkpoints)."""
    freeze_encoder_embeddings: bool = False
    """Keep the encoder's token embeddings frozen (no gradient, no optimizer state): with a real LLM's 49k-256k
    vocabulary they are most of the encoder's parameters and AdamW time (docs/benchmarks.md "Learning")."""

    def __post_init__(self) -> None:
        _require(bool(self.encoder_path), "encoder_path", self.encoder_path, "must be a model directory")
        _require(self.n_truncated_layers >= 0, "n_truncated_layers", self.n_truncated_layers, "must be >= 0")
        _require(self.pooling_factor >= 1, "pooling_factor", self.pooling_factor, "must be >= 1")
        _require(self.n_vectors >= 0, "n_vectors", self.n_vectors, "must be >= 0 (0: use pooling_factor)")
        _require(self.loss_chunk_tokens >= 0, "loss_chunk_tokens", self.loss_chunk_tokens, "must be >= 0")


@dataclass
class DecoderConfig:
    name: str
    """Short name, [a-z0-9_]+; it keys the projector, the special vectors and the shard tokenizer."""
    path: str
    """Hugging Face directory of the frozen decoder (weights and tokenizer)."""
    projector_hidden: int = 2048
    """Hidden width of the two-layer, bias-free projector."""
    weight: float = 1.0
    """Relative frequency of this decoder's optimizer steps (train.decoder_schedule = "random")."""
    prefix: str = ""
    """Text put before the compressed vectors, e.g. "Document: "."""
    rope: Literal["checkpoint", "plain"] = "checkpoint"
    """This decoder's RoPE: its config's scaling ("checkpoint") or unscaled with its rope_theta ("plain", the
    reference's choice; use it with a projector trained by the reference)."""
    attn_implementation: Literal["packed"] = "packed"
    """This decoder's attention: packed rows, no padding, through transformers' AttentionInterface (the decoder stays
    its stock class); flash-attn's varlen kernel when that package is installed (`pip install -e .[gpu]`)."""
    projector_init: Literal["random", "identity", "aligned"] = "random"
    """"identity": the projector starts as the identity map; for an encoder cut from this very decoder (same
    width, same residual space; needs projector_hidden >= that width). See docs/benchmarks.md "Learning".
    "aligned": for a decoder of another family (or one added later): the projector starts at the least-squares map
    from the encoder's vectors to the decoder's own embeddings of the same text, fitted on train.align_vectors
    encoder vectors before step 0 (needs projector_hidden >= the encoder's width; docs/benchmarks.md
    "Multi-decoder")."""

    def __post_init__(self) -> None:
        ok_name = bool(self.name) and set(self.name) <= _NAME_CHARS
        _require(ok_name, "name", self.name, "must match [a-z0-9_]+")
        _require(bool(self.path), "path", self.path, "must be a model directory")
        _require(self.projector_hidden >= 1, "projector_hidden", self.projector_hidden, "must be >= 1")
        _require(self.weight > 0, "weight", self.weight, "must be > 0")


def parse_source(entry: str) -> tuple[str, float]:
    """Parse "dir:weight" or "dir" (weight 1); a colon followed by a non-number stays in the path."""
    head, sep, tail = entry.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return entry, 1.0


@dataclass
class QAConfig:
    train: list[str] = field(default_factory=list)
    """QA fine-tuning instead of shards: QA files (.jsonl, .jsonl.zst, .parquet; arctrain's records or the released
    fine-tuning set's, arctrain/data/qa_records.py), one or a list / comma list of "path", "path:weight" or
    "path:weight:shots", mixed by weight as shard sources are. The passages are compressed, the loss is on the
    answer (one drawn per epoch from a list) and the decoder's EOS."""
    val: list[str] = field(default_factory=list)
    """QA files for evaluation (needed with data.qa.train when eval.interval > 0): answer loss with vs without
    passages."""
    shots: int = 0
    """Few-shot examples before each QA record (other records of its source, their passages compressed too), for
    sources that do not give their own shots."""
    max_passages: int = 4
    """A record's first 1..max_passages passages (a seeded draw per epoch) are compressed together."""
    context: Literal["joint", "segments"] = "joint"
    """joint: a record's passages compressed as one encoder sequence of at most data.qa.context_tokens (the
    reference's fine-tuning); segments: cut into chunks of data.chunk_tokens as `arc-data build` cuts documents into
    segments, each compressed on its own, at most data.max_chunks of them (the paper's long-context setting)."""
    context_tokens: int = 2048
    """With data.qa.context=joint: at most this many encoder tokens of passages per record (longer ones are cut,
    and counted at the start and in the context_tokens_dropped metric)."""
    chat_template: bool = True
    """Render QA prompts with a decoder's chat template when its tokenizer has one (arctrain/data/prompt.py)."""

    def __post_init__(self) -> None:
        _require(self.shots >= 0, "shots", self.shots, "must be >= 0")
        _require(self.max_passages >= 1, "max_passages", self.max_passages, "must be >= 1")
        _require(self.context_tokens >= 1, "context_tokens", self.context_tokens, "must be >= 1")
        for key in ("train", "val"):
            for entry in getattr(self, key):
                try:
                    parse_qa_source(entry)
                except ValueError as err:
                    _require(False, key, entry, str(err).partition(": ")[2])


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)
    """Shard directories (`arc-data build` output): one dir, or a list / comma list of "dir:weight" or dirs."""
    qa: QAConfig = field(default_factory=QAConfig)
    """QA fine-tuning (data.qa.train) instead of shards: its files and how records become prompts."""
    chunk_tokens: int = 256
    """A context given as text (QA passages with data.qa.context=segments; `arctrain generate`/`eval` take the export's
    value) is cut into chunks of about this many encoder tokens at word boundaries, each compressed on its own
    (positions 0.. per chunk), their vectors concatenated: the cut `arc-data build --segment-tokens` makes for
    shards (arctrain/data/chunks.py). The paper's long-context setting: 1024."""
    max_chunks: int = 0
    """At most this many chunks of a context are compressed, the first ones; the rest is dropped and counted
    (0: no limit). Bounds the decoder positions of a long context (configs/llama_mistral_long_context.yaml)."""
    interleave_tokens: int = 0
    """Interleaved continuation: up to this many decoder tokens of the document text just before the compressed
    segment come first, as plain text without loss (the reference's `interleave`: up to 256 = its seq_len)."""
    val_shards: list[str] | None = None
    """Directories whose val split is used for evaluation; default: the val split of `shards`."""
    task_ratio: float = 0.2
    """Fraction of batches that are reconstruction; the rest are continuation."""
    micro_batch_size: int = 16
    """Samples per rank per forward pass; with `tokens_per_micro_batch`, the window of samples a micro-batch draws
    from (at most that many)."""
    tokens_per_micro_batch: int = 0
    """Token budget of a training micro-batch, encoder tokens plus decoder positions (0: none, every micro-batch
    takes micro_batch_size samples). A micro-batch takes the first samples of its window of micro_batch_size that
    fit; the rest of the window is left (counted: samples_left_by_budget), a sample larger than the budget on its own
    is skipped (counted: samples_over_budget_skipped). The number of micro-batches per step does not change
    (train.grad_accum), nor the samples each global micro-batch draws: resume stays exact at any world size.
    Validation batches keep micro_batch_size samples."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    shuffle_buffer: int = 1000
    """Samples are shuffled within consecutive blocks of this many stream positions (1: no shuffle)."""
    shard_streams: int = 8
    """Each source is read as this many interleaved streams over distant parts of its shuffled shard list, so
    neighbouring samples (one global batch) come from that many shards and input files (arctrain/data/sampling.py)."""
    seed_offset: int = 0
    """Added to train.seed for the data order, to change the order without changing the initialisation."""
    verify_shards: bool = False
    """At start-up, check every shard's sha256 against manifest.json (reads every byte; sizes are always checked)."""

    def __post_init__(self) -> None:
        qa = self.qa.train
        _require(bool(self.shards or qa), "shards", self.shards, "must name a shard directory (or set data.qa.train)")
        _require(not (self.shards and qa), "qa.train", qa, "and data.shards are both set: train on one of them")
        _require(self.chunk_tokens >= 1, "chunk_tokens", self.chunk_tokens, "must be >= 1")
        _require(self.max_chunks >= 0, "max_chunks", self.max_chunks, "must be >= 0 (0: no limit)")
        _require(self.interleave_tokens >= 0, "interleave_tokens", self.interleave_tokens, "must be >= 0")
        why = "applies to QA contexts in chunks (data.qa.train with data.qa.context=segments): shard segments are "
        why += "cut by arc-data build --segment-tokens, joint contexts by data.qa.context_tokens"
        segments = bool(qa) and self.qa.context == "segments"
        _require(not self.max_chunks or segments, "max_chunks", self.max_chunks, why)
        why = "applies to continuation on shards, not to data.qa.train"
        _require(not self.interleave_tokens or not qa, "interleave_tokens", self.interleave_tokens, why)
        for entry in self.shards:
            path, weight = parse_source(entry)
            _require(bool(path), "shards", entry, "has an empty directory")
            _require(weight > 0, "shards", entry, "must have a weight > 0")
        _require(0.0 <= self.task_ratio <= 1.0, "task_ratio", self.task_ratio, "must be in [0, 1]")
        _require(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        budget = self.tokens_per_micro_batch
        _require(budget >= 0, "tokens_per_micro_batch", budget, "must be >= 0 (0: no token budget)")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _require(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        _require(self.shard_streams >= 1, "shard_streams", self.shard_streams, "must be >= 1")

    @property
    def sources(self) -> list[tuple[str, float]]:
        """The training sources as (directory, mixing weight)."""
        return [parse_source(entry) for entry in self.shards]

    @property
    def val_dirs(self) -> list[str]:
        return [parse_source(e)[0] for e in (self.val_shards if self.val_shards is not None else self.shards)]

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("qa",) if self.qa.train else ("reconstruction", "continuation")


@dataclass
class OptimConfig:
    encoder_lr: float = 1e-5
    """Peak learning rate of the encoder (embeddings and kept layers)."""
    projector_lr: float = 5e-5
    """Peak learning rate of the projectors and special vectors."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not on 1-D tensors: norms, biases; arctrain/train/optim.py)."""
    warmup_steps: int = 1000
    """Linear warm-up from 0 to the peak learning rates, in optimizer steps."""
    decay: Literal["cosine", "constant", "linear", "wsd"] = "cosine"
    """Decay after warm-up, down to min_lr_ratio * peak at train.steps (wsd: warm-up, stable, then a linear decay
    over the last `wsd_decay_steps`)."""
    min_lr_ratio: float = 0.1
    """The LR at the end of the decay, as a fraction of the peak."""
    wsd_decay_steps: int = 0
    """With decay = "wsd": the number of final steps the LR decays over."""
    clip: float = 1.0
    """Gradient norm clip (0: no clipping)."""

    def __post_init__(self) -> None:
        _require(self.encoder_lr >= 0, "encoder_lr", self.encoder_lr, "must be >= 0")
        _require(self.projector_lr >= 0, "projector_lr", self.projector_lr, "must be >= 0")
        ok_betas = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        _require(ok_betas, "betas", self.betas, "must be two numbers in [0, 1)")
        _require(self.eps > 0, "eps", self.eps, "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        ok_wsd = (self.wsd_decay_steps > 0) == (self.decay == "wsd")
        _require(ok_wsd, "wsd_decay_steps", self.wsd_decay_steps, "must be > 0 with decay=wsd, and 0 otherwise")
        _require(self.clip >= 0, "clip", self.clip, "must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the whole run."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and rank (all of one decoder). A resume at another world size sets it so that
    ranks x grad_accum stays the checkpoint's (arctrain/checkpoint/elastic.py)."""
    seed: int = 0
    """Seeds the weights' initialisation, the data order and the decoder schedule."""
    encoder_checkpointing: bool = False
    """Activation checkpointing in the encoder's layers: each layer keeps only its input and is recomputed in
    backward (about a third more encoder compute for much less activation memory; arctrain/train/memory.py)."""
    decoder_checkpointing: bool = False
    """Activation checkpointing in the frozen decoders' layers. Their activations are needed for the gradient that
    flows through them into the projector and encoder; recomputing them costs about a third of the decoders'
    compute, so turn it on only where `arctrain train --dry-run` says the step does not fit without it."""
    activation_checkpointing: bool | None = None
    """The earlier single switch (run directories written before the split carry it): true turns on both
    encoder_checkpointing and decoder_checkpointing. Normalised to null once applied."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """Weights and compute dtype; the DeepSpeed file must agree (its bf16.enabled)."""
    decoder_schedule: Literal["random", "round_robin", "fair"] = "random"
    """How the decoder of each optimizer step is chosen: weighted random from the seed, or in turn; "fair" (the
    reference's `fair_instruct`): in turn, and the n decoders' consecutive steps read the same batches (each
    sample trains every decoder)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (fills zero_optimization.stage of the DeepSpeed file, which says "auto" or the same):
    3 partitions weights, gradients and optimizer state over all ranks (weights all-gathered in every forward and
    backward); 2 keeps the trainable weights whole on every rank and partitions gradients and optimizer state (no
    gathering; the frozen decoders are then replicated). `arctrain train --dry-run` estimates each choice."""
    zero_hpz: bool = False
    """With zero_stage 3: hpZ (ZeRO++'s hierarchical partitioning), a second copy of the weights partitioned within
    each node (zero_hpz_partition_size = GPUs per node), so backward's all-gathers stay inside the node."""
    decoder_hold: int = 1
    """Keep each chosen decoder for this many consecutive optimizer steps; the choice is made per block of steps,
    the same on every rank. (Each decoder keeps its own ZeRO-3 prefetch trace, arctrain/train/zero_trace.py, so a switch
    costs no prefetch.)"""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    init_from: str = ""
    """Start from other trainable weights: a run directory (latest checkpoint), a checkpoint directory
    (RUN/checkpoints/step_N, written at any world size), or an export (`arctrain export`, `arctrain import-arc`).
    Optimizer, schedule and data start afresh; the pooling settings may differ (they have no weights). Tensors are
    matched by name: a decoder added now gets a new projector (train only it with optim.encoder_lr=0). Used only
    when this run has no checkpoint yet; a restarted run resumes from its own."""
    align_vectors: int = 16384
    """Encoder vectors, over all ranks, that a `decoders.N.projector_init: aligned` projector is fitted on before
    step 0: each rank reads its first training micro-batches until it has its share (arctrain/model/align.py). Several
    times the encoder's width keeps the fit well posed."""
    align_ridge: float = 1e-3
    """Ridge of that fit, relative to the mean eigenvalue of the encoder vectors' Gram matrix."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", self.steps, "must be >= 1")
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _require(self.decoder_hold >= 1, "decoder_hold", self.decoder_hold, "must be >= 1")
        _require(self.zero_stage in (2, 3), "zero_stage", self.zero_stage, "must be 2 or 3")
        _require(not self.zero_hpz or self.zero_stage == 3, "zero_hpz", self.zero_hpz, "needs zero_stage 3")
        _require(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "must be >= 1")
        _require(self.align_vectors >= 1, "align_vectors", self.align_vectors, "must be >= 1")
        _require(self.align_ridge >= 0, "align_ridge", self.align_ridge, "must be >= 0")
        if self.activation_checkpointing:
            self.encoder_checkpointing = self.decoder_checkpointing = True
        self.activation_checkpointing = None


@dataclass
class CommConfig:
    """How long a collective may wait for the slowest rank (torchtitan's comm.*_timeout_seconds)."""

    init_timeout_seconds: float = 300.0
    """Start-up, checkpoint loading and saving: generous, rank 0 may convert a checkpoint alone meanwhile (a resume at
    another world size, train.init_from)."""
    train_timeout_seconds: float = 100.0
    """Once training runs: a rank that stopped (a hung GPU, a stalled filesystem) or died ends every rank after
    this long, the cause in the log, instead of a job that waits forever."""

    def __post_init__(self) -> None:
        for key in ("init_timeout_seconds", "train_timeout_seconds"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")


@dataclass
class CheckpointConfig:
    dir: str = "runs/arctrain"
    """The run directory: checkpoints/, metrics.jsonl, logs/, config.yaml (resolved)."""
    interval: int = 1000
    """Save every this many optimizer steps (and at the end, and on preemption)."""
    keep: int = 2
    """Number of most recent checkpoints kept (0: keep all)."""

    def __post_init__(self) -> None:
        _require(bool(self.dir), "dir", self.dir, "must be a directory")
        _require(self.interval >= 1, "interval", self.interval, "must be >= 1")
        _require(self.keep >= 0, "keep", self.keep, "must be >= 0")


@dataclass
class EvalConfig:
    interval: int = 1000
    """Evaluate every this many optimizer steps (0: never)."""
    batches: int = 8
    """Validation set size, in micro-batches of data.micro_batch_size samples: the same samples for any world size,
    split across ranks and shared equally by the val sources (arctrain/data/val.py)."""

    def __post_init__(self) -> None:
        _require(self.interval >= 0, "interval", self.interval, "must be >= 0")
        _require(self.batches >= 1, "batches", self.batches, "must be >= 1")


@dataclass
class LoggingConfig:
    interval: int = 10
    """Log metrics every this many optimizer steps."""
    wandb_project: str = "arctrain"
    """The wandb project of the run."""
    wandb_entity: str | None = None
    """The wandb team or user (null: wandb's default)."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """offline: logged locally, synced later with `wandb sync`; online: streamed; disabled: metrics.jsonl only."""
    sample_keys: bool = False
    """Record the sample keys each rank consumes, per step, in RUN_DIR/logs/samples_rank{r}.jsonl (audits, resume)."""

    def __post_init__(self) -> None:
        _require(self.interval >= 1, "interval", self.interval, "must be >= 1")


@dataclass
class Config:
    model: ModelConfig
    decoders: list[DecoderConfig]
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    deepspeed: str = "ds_configs/zero3_bf16.json"
    """DeepSpeed JSON; batch sizes, clip and precision are filled in from this config (`deepspeed_config`)."""

    def __post_init__(self) -> None:
        _require(len(self.decoders) > 0, "decoders", self.decoders, "must list at least one decoder")
        names = [d.name for d in self.decoders]
        for i, name in enumerate(names):
            _require(name not in names[:i], f"decoders.{i}.name", name, "is not unique")
        if self.train.zero_stage == 2:
            why = "must be replicated or auto with train.zero_stage=2 (ZeRO-2 partitions no weights)"
            _require(self.model.frozen_decoders != "partitioned", "model.frozen_decoders", "partitioned", why)
        if self.train.decoder_schedule == "fair":
            why = "must be 1 with train.decoder_schedule=fair (each step's batches go to every decoder in turn)"
            _require(self.train.decoder_hold == 1, "train.decoder_hold", self.train.decoder_hold, why)
            for i, d in enumerate(self.decoders):
                why = "has no effect with train.decoder_schedule=fair (every decoder gets every batch): leave it 1"
                _require(d.weight == 1.0, f"decoders.{i}.weight", d.weight, why)
        room = self.train.steps - self.optim.warmup_steps
        why = f"must be <= train.steps - optim.warmup_steps = {room} (the decay ends at train.steps)"
        _require(self.optim.wsd_decay_steps <= max(room, 0), "optim.wsd_decay_steps", self.optim.wsd_decay_steps, why)


@dataclass(frozen=True)
class QASource:
    path: str
    weight: float = 1.0
    shots: int = 0

    @property
    def name(self) -> str:
        """The file name without its format suffix: the dataset's name in eval tables and val metrics."""
        name = Path(self.path).name
        return next((name[: -len(s)] for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), name)


def parse_qa_source(entry: str, default_shots: int = 0) -> QASource:
    """ "path", "path:weight" or "path:weight:shots"; a tail that is not a number stays in the path."""
    parts = entry.rsplit(":", 2)
    numbers = []
    while len(parts) > 1 and len(numbers) < 2 and _is_number(parts[-1]):
        numbers.insert(0, parts.pop())
    path = ":".join(parts)
    if len(numbers) == 2 and not numbers[1].isdigit():
        raise ValueError(f"{entry!r}: shots must be a whole number (path:weight:shots)")
    weight = float(numbers[0]) if numbers else 1.0
    shots = int(numbers[1]) if len(numbers) == 2 else default_shots
    if not path:
        raise ValueError(f"{entry!r}: no file")
    if weight <= 0:
        raise ValueError(f"{entry!r}: the weight must be > 0")
    return QASource(path, weight, shots)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
