"""The start-up checks of `arctrain train`, and `--dry-run`: every check a real start makes, the model's sizes and
the memory per GPU; no training.

    arctrain train --config configs/llama_mistral_8node.yaml --dry-run --world-size 64 model.encoder_path=... ...

Every start, before any process group: the config has loaded (keys, types, the DeepSpeed file), then `check_paths`
(model and shard directories, QA files, train.init_from) and `check_shards` (manifests and tokenizer hashes). The
dry run adds: the DeepSpeed config for the world size, the tokenizers, and the model built on the meta device from each
config.json (real shapes, no weights read, no memory), with every weight file's safetensors header checked against
the module's state dict (names and shapes: what `from_pretrained` would load). Then parameters per component and
`arctrain.train.memory`'s per-GPU estimate for that world size.

It runs where the GPU run will not (a login node: no GPU, no flash-attn): what only the GPU nodes have is reported,
not required, and the sizes are for the card of `--gpu` (a name of CARDS; default the GPU here, else h100-80gb),
whose memory decides model.frozen_decoders=auto exactly as the GPU run will (arctrain/train/memory.py `placement`).
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from arctrain.checkpoint.init_from import source_checkpoint
from arctrain.config.deepspeed import deepspeed_config, gpus_per_node
from arctrain.config.schema import Config, ConfigError, parse_qa_source
from arctrain.data import Vocab, open_source, tokenizer_paths
from arctrain.data.qa import check_qa
from arctrain.model import ARCEncoder, ARCModel, Projector, SpecialVectors
from arctrain.model.attention import check_implementation
from arctrain.model.flops import matmul_params
from arctrain.train.memory import (
    REPLICATE_FRACTION,
    cross_node_bytes,
    estimate,
    format_estimate,
    gpu_memory_gib,
    placement,
    run_estimate,
    run_setup,
)

# --gpu names: (a substring of torch.cuda.get_device_name() in arctrain/model/flops.py's PEAK_TFLOPS, memory in GiB: the
# total nvidia-smi reports, MiB / 1024, what torch's total_memory gives too).
CARDS = {
    "h100-80gb": ("H100", 79.6),
    "h100-nvl-94gb": ("H100 NVL", 93.6),
    "h200-141gb": ("H200", 140.4),
    "gh200-96gb": ("GH200", 95.6),
    "b200-180gb": ("B200", 179.1),
    "a100-80gb": ("A100", 80.0),
    "a100-40gb": ("A100", 40.0),
    "l40s-48gb": ("L40S", 45.0),
    "a10g-24gb": ("A10G", 22.5),
    "a10-24gb": ("A10", 22.5),
}
DEFAULT_CARD = "h100-80gb"


def target_card(gpu: str | None) -> tuple[str, float]:
    """(what is sized for, its memory in GiB): `--gpu`, else the GPU of this machine, else DEFAULT_CARD."""

    if gpu is not None:
        if gpu not in CARDS:
            raise ValueError(f"--gpu {gpu!r}: expected one of {', '.join(CARDS)}")
        return gpu, CARDS[gpu][1]
    here = gpu_memory_gib()
    if here is not None:
        return f"this machine's {torch.cuda.get_device_name()}", here
    return f"{DEFAULT_CARD} (no GPU here; --gpu chooses)", CARDS[DEFAULT_CARD][1]


def default_world_size() -> int:
    """The launcher's world size when there is one (torchrun, srun), else one node of 8 GPUs."""
    return int(os.environ.get("WORLD_SIZE", "8"))


def dry_run(cfg: Config, world_size: int, say=print, gpu: str | None = None) -> None:
    """Raises ValueError (one line) at the first problem; prints what a real start would build."""

    card, gpu_gib = target_card(gpu)
    ds_config = deepspeed_config(cfg, world_size)  # train_batch_size against micro-batch x accumulation x ranks
    Vocab.from_config(cfg)  # every tokenizer loads and gives the ids the batches need
    model = meta_model(cfg)
    zero = f"ZeRO-{cfg.train.zero_stage}" + (" + hpZ" if cfg.train.zero_hpz else "")
    say(
        f"dry run: {cfg.checkpoint.dir} at world size {world_size}, {cfg.train.precision}, {zero} "
        f"(global batch {ds_config['train_batch_size']} sequences), sized for {card}: {gpu_gib:.1f} GiB"
    )
    for line in attention_report(cfg):
        say(line)
    say(parameter_table(model))
    say(memory_table(cfg, world_size, ds_config, gpu_gib))
    say("dry run: every check passed; nothing was trained")


def attention_report(cfg: Config) -> list[str]:
    """The kernel the packed attention will use on the GPU nodes (arctrain/model/attention.py)."""
    return [
        "attention: packed (no padding computed); on CUDA flash_attn_varlen_func where flash-attn is installed, "
        "else torch.nn.attention.varlen.varlen_attn (no build step)"
    ]


# --- the model on the meta device --------------------------------------------------------------------------


def meta_model(cfg: Config):
    """The ARC model with real shapes on the meta device, from config.json alone; weight files checked."""
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    def causal_lm(path: str, attn: str, key: str) -> nn.Module:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            attn = check_implementation(attn, key)
            lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        check_weights(Path(path), lm, key)
        return lm

    backbone = causal_lm(cfg.model.encoder_path, cfg.model.attn_implementation, "model.encoder_path")
    try:
        encoder = ARCEncoder(
            backbone,
            n_truncated_layers=cfg.model.n_truncated_layers,
            pooling=cfg.model.pooling,
            factor=cfg.model.pooling_factor,
            n_vectors=cfg.model.n_vectors,
        )
    except ValueError as err:
        raise ConfigError("model", str(err)) from None
    decoders = nn.ModuleDict(
        {d.name: causal_lm(d.path, d.attn_implementation, f"decoders.{i}.path") for i, d in enumerate(cfg.decoders)}
    )
    with torch.device("meta"):
        projectors = nn.ModuleDict(
            {
                d.name: Projector(encoder.hidden_size, d.projector_hidden, decoders[d.name].config.hidden_size)
                for d in cfg.decoders
            }
        )
        specials = nn.ModuleDict({d.name: SpecialVectors(encoder.hidden_size) for d in cfg.decoders})
    return ARCModel(encoder, projectors, specials, decoders, cfg.model.loss_chunk_tokens)


def check_weights(path: Path, model: nn.Module, key: str) -> None:
    """The safetensors headers under `path` hold every tensor of `model`'s state dict, with its shape."""

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = files or (["model.safetensors"] if (path / "model.safetensors").is_file() else [])
    if not files:
        raise ConfigError(key, f"{str(path)!r} has no model.safetensors (or index): no weights to load")
    shapes = {}
    for name in files:
        if not (path / name).is_file():
            raise ConfigError(key, f"{str(path / name)!r} is listed in the index but missing")
        with safe_open(path / name, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    for name, tensor in model.state_dict().items():
        if name not in shapes:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise ConfigError(key, f"{str(path)!r}: the weights have no {name!r}")
        if shapes[name] != tuple(tensor.shape):
            raise ConfigError(
                key, f"{str(path)!r}: {name!r} is {shapes[name]} in the weights, {tuple(tensor.shape)} in config.json"
            )


# --- what it prints ----------------------------------------------------------------------------------------


def parameter_table(model) -> str:
    rows = [("encoder (trains)", model.encoder)]
    rows += [
        (f"projector {n} + <Rec>/<Cont> (trains)", nn.ModuleList([p, model.specials[n]]))
        for n, p in model.projectors.items()
    ]
    rows += [(f"decoder {n} (frozen)", d) for n, d in model.decoders.items()]
    lines = [f"  {'parameters (millions)':<42} {'all':>10} {'in matmuls':>14}"]
    for name, module in rows:
        total = sum(p.numel() for p in module.parameters())
        lines.append(f"  {name:<42} {total / 1e6:10.3f} {matmul_params(module) / 1e6:14.3f}")
    return "\n".join(lines)


def memory_table(cfg: Config, world_size: int, ds_config: dict, gpu_gib: float) -> str:
    replicated, why = placement(cfg, world_size, ds_config, gpu_gib)  # as the GPU run decides, for its card
    try:
        est = run_estimate(cfg, world_size, ds_config, replicated)
    except KeyError as err:
        return f"frozen decoders: partitioned: {why}\nmemory per GPU: no estimate (a config.json has no {err})"
    where = f"replicated ({', '.join(replicated)})" if replicated else "partitioned by ZeRO-3"
    table = format_estimate(est, world_size).split("\n\n", 1)[1]  # the parameters are printed above
    return (
        f"frozen decoders: {where}: {why} (model.frozen_decoders={cfg.model.frozen_decoders})\n"
        f"memory per GPU (arctrain/train/memory.py), micro-batch {cfg.data.micro_batch_size}:\n{table}\n"
        f"  peak over decoders: {est.peak():.2f} GiB\n"
        f"{checkpointing_table(cfg, world_size, ds_config, replicated)}\n"
        f"{zero_table(cfg, world_size, ds_config, replicated, gpu_gib)}"
    )


def zero_table(cfg: Config, world_size: int, ds_config: dict, replicated: tuple[str, ...], gpu_gib: float) -> str:
    """Each ZeRO choice (train.zero_stage, train.zero_hpz): peak GiB per GPU, whether it fits the card, and the GB
    each GPU exchanges with other nodes per micro-batch step (the largest decoder's)."""

    per_node = gpus_per_node(world_size)
    everything = tuple(d.name for d in cfg.decoders)
    choices = [
        ("ZeRO-3", 3, 0, replicated),
        (f"ZeRO-3 + hpZ ({per_node} per node)", 3, per_node, replicated),
        ("ZeRO-2 (decoders replicated)", 2, 0, everything),
    ]
    budget = REPLICATE_FRACTION * gpu_gib
    lines = [
        f"ZeRO choices at {world_size} GPUs, {per_node} per node (train.zero_stage, train.zero_hpz): peak GiB "
        f"per GPU, fits {budget:.1f} GiB?, GB per GPU across nodes per micro-batch step"
    ]
    for label, stage, hpz, held in choices:
        encoder, decoders, setup = run_setup(cfg, ds_config, held, zero_stage=stage, hpz_partition=hpz)
        peak = estimate(encoder, decoders, setup, world_size).peak()
        moved = max(
            sum(parts.values()) for parts in cross_node_bytes(encoder, decoders, setup, world_size, per_node).values()
        )
        mine = (stage, bool(hpz)) == (cfg.train.zero_stage, cfg.train.zero_hpz)
        lines.append(
            f"  {label:<34} {peak:7.2f}  {'fits' if peak <= budget else 'no  '}  {moved / 1e9:8.2f}"
            + ("  <- this config" if mine else "")
        )
    return "\n".join(lines)


def checkpointing_table(cfg: Config, world_size: int, ds_config: dict, replicated: tuple[str, ...]) -> str:
    """The estimated peak for each choice of activation checkpointing, the configured one marked."""

    lines = ["activation checkpointing (train.encoder_checkpointing, train.decoder_checkpointing): peak GiB per GPU"]
    for enc in (True, False):
        for dec in (True, False):
            peak = run_estimate(
                cfg, world_size, ds_config, replicated, encoder_checkpointing=enc, decoder_checkpointing=dec
            ).peak()
            mine = (enc, dec) == (cfg.train.encoder_checkpointing, cfg.train.decoder_checkpointing)
            lines.append(
                f"  encoder {'on ' if enc else 'off'}  decoders {'on ' if dec else 'off'}  {peak:7.2f}"
                + ("  <- this config" if mine else "")
            )
    return "\n".join(lines)


def check_paths(cfg: Config) -> None:
    """The model and shard directories exist (call before starting process groups; configs may be templates)."""
    dirs = [("model.encoder_path", cfg.model.encoder_path)]
    dirs += [(f"decoders.{i}.path", d.path) for i, d in enumerate(cfg.decoders)]
    dirs += [("data.shards", path) for path, _ in cfg.data.sources]
    dirs += [("data.val_shards", path) for path in cfg.data.val_dirs]
    for key, path in dirs:
        if not Path(path).is_dir():
            raise ConfigError(key, f"{path!r} is not a directory")

    for key in ("train", "val"):
        for entry in getattr(cfg.data.qa, key):
            path = parse_qa_source(entry).path
            if not Path(path).is_file():
                raise ConfigError(f"data.qa.{key}", f"{path!r} is not a file")
    if cfg.data.qa.train and cfg.eval.interval and not cfg.data.qa.val:
        why = "is needed with data.qa.train when eval.interval > 0 (or set eval.interval=0)"
        raise ConfigError("data.qa.val", why)
    if cfg.train.init_from:
        try:
            source_checkpoint(Path(cfg.train.init_from))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError("train.init_from", str(err)) from None


def check_shards(cfg: Config) -> None:
    """Refuse shards built with other tokenizers, or missing or cut short (or, with data.verify_shards, changed),
    before any process group starts."""

    for path, _ in cfg.data.sources:
        open_source(path, "train", tokenizer_paths(cfg), cfg.data.verify_shards)
    for path in cfg.data.val_dirs if cfg.eval.interval else []:
        open_source(path, "val", tokenizer_paths(cfg), cfg.data.verify_shards)
    if cfg.data.qa.train:  # every record checked now (skips counted), long contexts counted; not in a loader worker
        check_qa(cfg)
