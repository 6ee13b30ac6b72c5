"""The DeepSpeed file of a config: found, checked against the config and by DeepSpeed itself, filled in."""

import json
import os
from pathlib import Path

from arctrain.config.schema import Config
from arctrain.config.tree import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ds_path(cfg: Config) -> Path:
    """The DeepSpeed file: as given, or relative to the repository (where ds_configs/ ships)."""
    path = Path(cfg.deepspeed)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    return path


def _read_ds(cfg: Config) -> dict:
    path = _ds_path(cfg)
    if not path.is_file():
        raise ConfigError("deepspeed", f"{cfg.deepspeed!r} is not a file")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("deepspeed", f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError("deepspeed", f"{str(path)!r} must hold a JSON object")
    return ds


def _check_deepspeed(cfg: Config) -> None:
    """The DeepSpeed file must agree with the config wherever both say something ("auto" always agrees)."""
    ds, name = _read_ds(cfg), cfg.deepspeed
    agree = [
        ("train_micro_batch_size_per_gpu", cfg.data.micro_batch_size, "data.micro_batch_size"),
        ("gradient_accumulation_steps", cfg.train.grad_accum, "train.grad_accum"),
        ("gradient_clipping", cfg.optim.clip, "optim.clip"),
    ]
    for ds_key, ours, key in agree:
        theirs = ds.get(ds_key, "auto")
        if theirs != "auto" and theirs != ours:
            raise ConfigError(key, f"{ours!r} disagrees with {ds_key}={theirs!r} in {name}")
    bf16 = ds.get("bf16", {}).get("enabled", False)
    if cfg.train.precision == "bf16" and bf16 is False:
        raise ConfigError("train.precision", f"'bf16' but {name} does not enable bf16")
    if cfg.train.precision == "fp32" and bf16 is True:
        raise ConfigError("train.precision", f"'fp32' but {name} enables bf16")
    if ds.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError("deepspeed", f"{name} enables fp16; arctrain supports fp32 and bf16 (train.precision)")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError("deepspeed", f"{name} has an {section!r} section; arctrain builds it from optim.*")
    stage = ds.get("zero_optimization", {}).get("stage", "auto")
    if stage not in ("auto", cfg.train.zero_stage):
        raise ConfigError(
            "train.zero_stage", f"{cfg.train.zero_stage} disagrees with zero_optimization.stage={stage!r} in {name}"
        )
    from deepspeed.runtime.config import DeepSpeedConfig  # heavy import, only once a file has passed the above

    try:  # DeepSpeed's own validation (unknown keys, bad values) before any process group exists
        DeepSpeedConfig(_fill(ds, cfg, world_size=1))  # the world size is checked by deepspeed_config
    except Exception as err:  # pydantic, assertion and value errors alike: report them in one line
        raise ConfigError("deepspeed", f"{name} is rejected by DeepSpeed: {' '.join(str(err).split())}") from None


def gpus_per_node(world_size: int) -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE, else 8 (or the world, if smaller)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", min(8, world_size)))


def deepspeed_config(cfg: Config, world_size: int, per_node: int | None = None) -> dict:
    """The DeepSpeed config dict for `deepspeed.initialize`: the file with batch sizes, clip, precision and the ZeRO
    stage (`per_node`: ranks per node, for hpZ; default `gpus_per_node`)."""
    ds = _read_ds(cfg)
    global_batch = cfg.data.micro_batch_size * cfg.train.grad_accum * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(
            "deepspeed",
            f"train_batch_size={ds['train_batch_size']!r} in {cfg.deepspeed} is not "
            f"micro_batch_size * grad_accum * world_size = {global_batch}",
        )
    return _fill(ds, cfg, world_size, per_node or gpus_per_node(world_size))


def _fill(ds: dict, cfg: Config, world_size: int, per_node: int = 1) -> dict:
    ds["train_micro_batch_size_per_gpu"] = cfg.data.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.data.micro_batch_size * cfg.train.grad_accum * world_size
    ds["gradient_clipping"] = cfg.optim.clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.train.zero_stage
    if cfg.train.zero_hpz:
        zero["zero_hpz_partition_size"] = per_node
    if cfg.train.precision == "bf16":  # DeepSpeed reduces in the parameters' dtype otherwise: bf16 sums over 64 ranks
        ds.setdefault("communication_data_type", "fp32")
    return ds
