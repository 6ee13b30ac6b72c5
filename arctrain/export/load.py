"""Reading an export: its weight files, and arctrain's own modules (ARCEncoder, projectors, specials) from it."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from arctrain.export.hf.configuration_arc import ARCEncoderConfig
from arctrain.model import ARCEncoder, Projector, SpecialVectors
from arctrain.model.build import plain_rope


def load_export(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """arctrain's own classes from an export: (ARCEncoder, projectors, specials, config).

    The same weights as `AutoModel.from_pretrained(..., trust_remote_code=True)`, in the modules the trainer uses
    (`arctrain.model.ARCEncoder`, `Projector`, `SpecialVectors`), so `ARCModel` can be rebuilt around a decoder.
    """
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoConfig, AutoModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not an exported model (no config.json)")
    config = ARCEncoderConfig.from_pretrained(model_dir)
    if config.model_type != "arc_encoder" or not config.backbone:
        raise ValueError(f"{model_dir}/config.json: not an arctrain export (model_type {config.model_type!r})")

    backbone = dict(config.backbone)
    bb_config = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
    bb_config._attn_implementation = "sdpa"
    if getattr(config, "rope", "checkpoint") == "plain":
        plain_rope(bb_config)
    encoder = ARCEncoder(
        AutoModel.from_config(bb_config),
        n_truncated_layers=0,
        pooling=config.pooling,
        factor=config.pooling_factor,
        n_vectors=config.n_vectors,
    )
    dim = encoder.hidden_size
    projectors = nn.ModuleDict(
        {d["name"]: Projector(dim, d["projector_hidden"], d["hidden_size"]) for d in config.decoders}
    )
    specials = nn.ModuleDict({d["name"]: SpecialVectors(dim) for d in config.decoders})
    holder = nn.Module()
    holder.encoder, holder.projectors, holder.specials = encoder, projectors, specials
    holder.load_state_dict(_read_weights(model_dir, load_file), strict=True)
    holder.to(dtype).eval()
    return encoder, projectors, specials, config


def export_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an export (one, or the shards its index names), checked to exist."""
    config = model_dir / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        model_type = None
    if model_type != "arc_encoder":
        raise ValueError(f"{config}: not an arctrain export (model_type {model_type!r}, expected 'arc_encoder')")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: weight file missing from the export")
    return [model_dir / name for name in files]


def _read_weights(model_dir: Path, load_file) -> dict[str, torch.Tensor]:
    state = {}
    for path in export_weight_files(model_dir):
        state.update(load_file(path))
    return state
