"""Build the ARC model from local Hugging Face directories, optionally partitioned with ZeRO-3 at construction.

    model = build_model(cfg.model, cfg.decoders, torch.bfloat16, ds_config=ds_config)

With a ZeRO-3 `ds_config` the Hugging Face models are created and loaded through transformers' DeepSpeed
integration (`HfDeepSpeedConfig`: `from_pretrained` runs under `deepspeed.zero.Init` and loads each module's
weights on rank 0 into the partitions), and the projectors and special vectors are created under
`deepspeed.zero.Init` too. So no rank ever holds a whole decoder. Call it after the process group exists, inside
a `deepspeed.zero.Init` context or not (nested contexts are fine), but always with the ZeRO-3 `ds_config`.
"""

import contextlib
import re
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

from arctrain.model.arc import ARCModel, Projector, SpecialVectors
from arctrain.model.attention import CONFIG_VALUE, PACKED
from arctrain.model.encoder import ARCEncoder

DECODER_NAME = re.compile(r"[a-z0-9_]+")


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


ROPE_CHOICES = ("checkpoint", "plain")


def plain_rope(config) -> None:
    """RoPE without frequency scaling (e.g. no Llama-3 `rope_type: llama3`), with the config's own rope_theta:
    what the reference ARC-Encoder applies to its encoder and decoders. Changes `config` in place."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params and all(isinstance(p, dict) for p in params.values()):  # one set per layer type (Gemma 3: local, global)
        config.rope_parameters = {kind: _plain(p, config) for kind, p in params.items()}
    else:
        config.rope_parameters = _plain(params, config)


def _plain(params: dict, config) -> dict:
    plain = {"rope_type": "default", "rope_theta": params.get("rope_theta", getattr(config, "rope_theta", None))}
    if "partial_rotary_factor" in params:
        plain["partial_rotary_factor"] = params["partial_rotary_factor"]
    return plain


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype,
    attn_implementation: str = "packed",
    rope: str = "checkpoint",
    device: torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM from a local Hugging Face directory (no hub access); `rope="plain"` drops its RoPE scaling;
    `device`: loaded straight onto it. "packed" (what arctrain runs) is the attention of arctrain/model/attention.py;
    any other value is transformers' own name (sdpa for a plain generation-only load)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    if rope not in ROPE_CHOICES:
        raise ValueError(f"rope={rope!r} for {path}: expected one of {', '.join(ROPE_CHOICES)}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if rope == "plain":
        plain_rope(config)
    placement = {} if device is None else {"device_map": str(device)}
    return AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        attn_implementation=PACKED if attn_implementation == CONFIG_VALUE else attn_implementation,
        local_files_only=True,
        **placement,
    )


def build_encoder(model_cfg, dtype: torch.dtype, gradient_checkpointing: bool = False) -> ARCEncoder:
    """The truncated bidirectional backbone with pooling (what an exporter needs besides the projectors)."""
    rope = getattr(model_cfg, "rope", "checkpoint")
    backbone = load_causal_lm(model_cfg.encoder_path, dtype, model_cfg.attn_implementation, rope)
    encoder = ARCEncoder(
        backbone,
        n_truncated_layers=model_cfg.n_truncated_layers,
        pooling=model_cfg.pooling,
        factor=model_cfg.pooling_factor,
        n_vectors=model_cfg.n_vectors,
        gradient_checkpointing=gradient_checkpointing,
    )
    if getattr(model_cfg, "freeze_encoder_embeddings", False):
        encoder.embed_tokens.requires_grad_(False)
    return encoder


def build_model(
    model_cfg,
    decoder_cfgs,
    dtype: torch.dtype = torch.float32,
    *,
    ds_config: dict | None = None,
    gradient_checkpointing: bool = False,
    replicated: tuple[str, ...] = (),
) -> ARCModel:
    """Encoder, one projector and one <Rec>/<Cont> pair per decoder, frozen decoders.

    `model_cfg` needs encoder_path, n_truncated_layers, pooling, pooling_factor, n_vectors, attn_implementation (the
    encoder's) and optionally loss_chunk_tokens and rope; each decoder config needs name, path, projector_hidden and
    optionally attn_implementation (default packed) and rope. `gradient_checkpointing` applies to the encoder layers
    (see `ARCModel.enable_decoder_checkpointing` for the decoders). Decoders named in `replicated` are loaded whole,
    in `dtype`, onto this process's device (cuda:LOCAL or cpu), outside ZeRO-3: no all-gather in forward and
    backward, at 2 bytes per parameter on every rank (model.frozen_decoders; arctrain/train/memory.py decides "auto").
    """
    names = [d.name for d in decoder_cfgs]
    if not names:
        raise ValueError("decoders: at least one decoder is needed")
    for name in names:
        if not DECODER_NAME.fullmatch(name) or names.count(name) > 1:
            raise ValueError(f"decoders: name {name!r} must be unique and match [a-z0-9_]+")
    if _inside_zero_init() and not is_zero3(ds_config):
        raise ValueError(
            "build_model: called inside deepspeed.zero.Init without a ZeRO-3 ds_config; pass ds_config "
            "so that transformers loads the weights into the partitions"
        )
    unknown = set(replicated) - set(names)
    if unknown:
        raise ValueError(f"replicated decoders {sorted(unknown)}: this model has {', '.join(names)}")
    if replicated and (_inside_zero_init() or _hf_zero3_alive()):
        raise ValueError("build_model: replicated decoders must be loaded outside deepspeed.zero.Init")
    # Before the HfDeepSpeedConfig below exists: with it alive, from_pretrained would partition them.
    held = {
        d.name: load_causal_lm(
            d.path, dtype, getattr(d, "attn_implementation", CONFIG_VALUE), getattr(d, "rope", "checkpoint"), _device()
        )
        for d in decoder_cfgs
        if d.name in replicated
    }
    with _hf_zero3(ds_config) as hf_ds_config:
        encoder = build_encoder(model_cfg, dtype, gradient_checkpointing)
        decoders = nn.ModuleDict(
            {
                d.name: load_causal_lm(
                    d.path, dtype, getattr(d, "attn_implementation", CONFIG_VALUE), getattr(d, "rope", "checkpoint")
                )
                for d in decoder_cfgs
                if d.name not in replicated
            }
        )
        if hf_ds_config is None:
            projectors, specials = _trainable_parts(decoder_cfgs, encoder.hidden_size)
            projectors, specials = projectors.to(dtype), specials.to(dtype)
        else:
            with _zero_init(ds_config):  # partitioned as they are built, in the DeepSpeed config's dtype
                projectors, specials = _trainable_parts(decoder_cfgs, encoder.hidden_size)
        for d in decoder_cfgs:
            if getattr(d, "projector_init", "random") == "aligned" and d.projector_hidden < encoder.hidden_size:
                raise ValueError(
                    f"decoder {d.name}: projector_init aligned needs projector_hidden >= the encoder's width "
                    f"{encoder.hidden_size}, got {d.projector_hidden}"
                )
            if getattr(d, "projector_init", "random") == "identity":
                with _gathered(projectors[d.name], hf_ds_config is not None):
                    projectors[d.name].init_identity()
    model = ARCModel(encoder, projectors, specials, decoders, getattr(model_cfg, "loss_chunk_tokens", 0), held)
    # transformers reads this global (weakly referenced) config later too, e.g. generate() syncs ranks under ZeRO-3.
    model.hf_ds_config = hf_ds_config
    return model


def _trainable_parts(decoder_cfgs, enc_dim: int) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    projectors = nn.ModuleDict(
        {d.name: Projector(enc_dim, d.projector_hidden, _hidden_size(d.path)) for d in decoder_cfgs}
    )
    specials = nn.ModuleDict({d.name: SpecialVectors(enc_dim) for d in decoder_cfgs})
    return projectors, specials


def _hidden_size(path: str | Path) -> int:
    """A decoder's embedding size from its config: never from a (possibly partitioned) weight."""
    return AutoConfig.from_pretrained(path, local_files_only=True).hidden_size


@contextlib.contextmanager
def _hf_zero3(ds_config: dict | None):
    """Keep an `HfDeepSpeedConfig` alive so that `from_pretrained` partitions and loads with ZeRO-3."""
    if not is_zero3(ds_config):
        yield None
        return

    yield HfDeepSpeedConfig(ds_config)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _hf_zero3_alive() -> bool:
    return is_deepspeed_zero3_enabled()


def _gathered(module: nn.Module, zero3: bool):
    """The module's whole weights, written back to the partitions afterwards (ZeRO-3), or nothing to do."""
    if not zero3:
        return contextlib.nullcontext()
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def _inside_zero_init() -> bool:
    # Only look if DeepSpeed is already imported: otherwise no zero.Init can be active.
    partition_parameters = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return partition_parameters is not None and partition_parameters.zero_init_context > 0


def _zero_init(ds_config: dict):
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)
