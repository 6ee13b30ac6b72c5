"""Parameter groups, AdamW and the warm-up + decay schedule.

Two learning rates, as in ARC: the encoder's, and the projectors' (with the special vectors). Weight decay applies
to matrices only, never to norms or the special vectors. The schedule is a `LambdaLR` factor on each group's
own peak and floor (megatron-core's `OptimizerParamScheduler`, with `max_lr`/`min_lr` per group), set from the
optimizer step counter before every step (`set_lr`), so a step DeepSpeed skips (non-finite gradients) neither
leaves an idle decoder's group at LR 0 nor puts the schedule behind the step counter.
"""

import warnings

import torch
from torch import nn

from arctrain.config.schema import OptimConfig


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


DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Warm-up from 0 to each group's peak over `warmup_steps`, then `decay` down to min_lr_ratio * peak at
    `total_steps` (WSD: constant until the last `wsd_decay_steps`, then linear). Weight decay stays constant."""
    with warnings.catch_warnings():  # megatron-core says, on import, that it runs without Apex/TE: we use neither
        warnings.simplefilter("ignore", UserWarning)
        # megatron-core is slow to import; only the LR schedule needs it
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    peaks = {
        g["name"]: {
            "max_lr": g["lr"],
            "min_lr": g["lr"] * cfg.min_lr_ratio,
            "start_wd": g["weight_decay"],
            "end_wd": g["weight_decay"],
        }
        for g in optimizer.param_groups
    }
    for group in optimizer.param_groups:
        group.update(peaks[group["name"]])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=max(g["max_lr"] for g in optimizer.param_groups),
        min_lr=0.0,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),  # a run inside its warm-up never decays
        lr_decay_style=DECAY_STYLES[cfg.decay],
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # the config's schedule wins over a checkpoint's
        wsd_decay_steps=cfg.wsd_decay_steps or None,
        lr_wsd_decay_style="linear",
    )
    scheduler.peaks = peaks  # re-applied by set_lr: a checkpoint's param groups bring back their own peaks
    return scheduler


def set_lr(scheduler, step: int, decoder: str | None = None) -> None:
    """Every group's LR for optimizer step `step` (0-based) from the step counter alone: the scheduler's
    step count becomes `step + 1` (warm-up reaches the peak at step warmup_steps - 1), then the groups of the
    decoders other than `decoder` get LR 0 (`idle_decoders`)."""
    for group in scheduler.optimizer.param_groups:
        group.update(scheduler.peaks[group["name"]])  # this run's config, also after loading a checkpoint
    scheduler.step(step + 1 - scheduler.num_steps)
    if decoder is not None:
        idle_decoders(scheduler.optimizer, decoder)
