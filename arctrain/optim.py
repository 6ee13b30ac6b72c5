"""Parameter groups, AdamW and the warm-up + decay schedule.

Two learning rates, as in ARC: the encoder's, and the projectors' (with the special vectors). Weight decay applies
to matrices only, never to norms or the special vectors. The schedule is a `LambdaLR` factor on each group's
own peak, so one function serves both rates and its state is a plain `state_dict`.
"""

import math

import torch
from torch import nn

from arctrain.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters by part and decay: the encoder, and each decoder's projector and special vectors.

    Each decoder has its own groups ("decoder": its name) so that a step of one decoder can leave the others'
    weights alone (`idle_decoders`).
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoder" if name.startswith("encoder.") else name.split(".")[1]  # projectors.<d>. / specials.<d>.
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions report their full shape here
        groups.setdefault((part, len(shape) >= 2), []).append(param)
    return [
        {
            "params": params,
            "name": f"{'encoder' if part == 'encoder' else 'projector/' + part}{'' if decay else '_no_decay'}",
            "decoder": None if part == "encoder" else part,
            "lr": cfg.encoder_lr if part == "encoder" else cfg.projector_lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(groups.items())
    ]


def idle_decoders(optimizer: torch.optim.Optimizer, decoder: str) -> None:
    """Learning rate 0 for the groups of decoders other than this step's (the scheduler restores them next step).

    Under ZeRO-3 the optimizer steps every partition; with zero gradients and a zero learning rate an idle
    projector keeps its weights (its Adam moments decay, as its gradient is zero).
    """
    for group in optimizer.param_groups:
        if group.get("decoder") not in (None, decoder):
            group["lr"] = 0.0


def build_optimizer(model: nn.Module, cfg: OptimConfig, ds_config: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kwargs = {"betas": tuple(cfg.betas), "eps": cfg.eps}
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload needs DeepSpeed's CPU Adam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warm-up, then decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
