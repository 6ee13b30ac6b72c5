"""`arctrain train --dry-run`: every check a real start makes, the model's sizes and the memory per GPU; no training.

    arctrain train --config configs/llama_mistral_8node.yaml --dry-run --world-size 64 model.encoder_path=... ...

Before this runs, `arctrain train` has loaded the config (keys, types, the DeepSpeed file), checked the paths and
attention kernels (`config.check_paths`) and the shards' manifests and tokenizer hashes (`train.check_shards`).
Here: the DeepSpeed config for the world size, the tokenizers, and the model built on the meta device from each
config.json (real shapes, no weights read, no memory), with every weight file's safetensors header checked against
the module's state dict (names and shapes: what `from_pretrained` would load). Then parameters per component and
`arctrain.memory`'s per-GPU estimate for that world size.
"""

import json
import os
from pathlib import Path

import torch
from torch import nn

from arctrain.config import Config, ConfigError, deepspeed_config


def default_world_size() -> int:
    """The launcher's world size when there is one (torchrun, srun), else one node of 8 GPUs."""
    return int(os.environ.get("WORLD_SIZE", "8"))


def dry_run(cfg: Config, world_size: int, say=print) -> None:
    """Raises ValueError (one line) at the first problem; prints what a real start would build."""
    from arctrain.data import Vocab

    ds_config = deepspeed_config(cfg, world_size)  # train_batch_size against micro-batch x accumulation x ranks
    Vocab.from_config(cfg)  # every tokenizer loads and gives the ids the batches need
    model = meta_model(cfg)
    say(f"dry run: {cfg.checkpoint.dir} at world size {world_size}, {cfg.train.precision}, ZeRO-3 "
        f"(global batch {ds_config['train_batch_size']} sequences)")  # fmt: skip
    say(parameter_table(model))
    say(memory_table(cfg, world_size, ds_config))
    say("dry run: every check passed; nothing was trained")


# --- the model on the meta device --------------------------------------------------------------------------


def meta_model(cfg: Config):
    """The ARC model with real shapes on the meta device, from config.json alone; weight files checked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from arctrain.model import ARCEncoder, ARCModel, Projector, SpecialVectors
    from arctrain.model.attention import check_implementation

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
            backbone, n_truncated_layers=cfg.model.n_truncated_layers, pooling=cfg.model.pooling,
            factor=cfg.model.pooling_factor, n_vectors=cfg.model.n_vectors,
        )  # fmt: skip
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
            }  # fmt: skip
        )
        specials = nn.ModuleDict({d.name: SpecialVectors(encoder.hidden_size) for d in cfg.decoders})
    return ARCModel(encoder, projectors, specials, decoders, cfg.model.loss_chunk_tokens)


def check_weights(path: Path, model: nn.Module, key: str) -> None:
    """The safetensors headers under `path` hold every tensor of `model`'s state dict, with its shape."""
    from safetensors import safe_open

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
            raise ConfigError(key, f"{str(path)!r}: {name!r} is {shapes[name]} in the weights, {tuple(tensor.shape)} "
                                   "in config.json")  # fmt: skip


# --- what it prints ----------------------------------------------------------------------------------------


def parameter_table(model) -> str:
    from arctrain.flops import matmul_params

    rows = [("encoder (trains)", model.encoder)]
    rows += [(f"projector {n} + <Rec>/<Cont> (trains)", nn.ModuleList([p, model.specials[n]]))
             for n, p in model.projectors.items()]  # fmt: skip
    rows += [(f"decoder {n} (frozen)", d) for n, d in model.decoders.items()]
    lines = [f"  {'parameters (millions)':<42} {'all':>10} {'in matmuls':>14}"]
    for name, module in rows:
        total = sum(p.numel() for p in module.parameters())
        lines.append(f"  {name:<42} {total / 1e6:10.3f} {matmul_params(module) / 1e6:14.3f}")
    return "\n".join(lines)


def memory_table(cfg: Config, world_size: int, ds_config: dict) -> str:
    from arctrain.memory import format_estimate, placement, run_estimate

    replicated, why = placement(cfg, world_size, ds_config)
    try:
        est = run_estimate(cfg, world_size, ds_config, replicated)
    except KeyError as err:
        return f"frozen decoders: partitioned: {why}\nmemory per GPU: no estimate (a config.json has no {err})"
    where = f"replicated ({', '.join(replicated)})" if replicated else "partitioned by ZeRO-3"
    table = format_estimate(est, world_size).split("\n\n", 1)[1]  # the parameters are printed above
    return (f"frozen decoders: {where}: {why} (model.frozen_decoders={cfg.model.frozen_decoders})\n"
            f"memory per GPU (arctrain/memory.py), micro-batch {cfg.data.micro_batch_size}:\n{table}\n"
            f"  peak over decoders: {est.peak():.2f} GiB")  # fmt: skip
