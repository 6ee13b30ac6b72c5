"""arctrain/train/optim.py: every group's LR set from the step counter (megatron-core's OptimizerParamScheduler)."""

import math

import pytest
import torch
from torch import nn

from arctrain.config.schema import OptimConfig
from arctrain.train.optim import build_scheduler, set_lr


def groups() -> torch.optim.AdamW:
    """An encoder group and two decoders' projector groups, as `param_groups` makes them."""
    params = [nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    return torch.optim.AdamW(
        [
            {"params": [params[0]], "name": "encoder", "decoder": None, "lr": 1e-3, "weight_decay": 0.1},
            {"params": [params[1]], "name": "projector/llama", "decoder": "llama", "lr": 4e-3, "weight_decay": 0.1},
            {"params": [params[2]], "name": "projector/mistral", "decoder": "mistral", "lr": 4e-3, "weight_decay": 0.0},
        ]
    )


def expected(step: int, peak: float, cfg: OptimConfig, total: int) -> float:
    """Independent of megatron: warm-up to the peak at step warmup-1, then decay to min_lr_ratio * peak at the
    last step (n = step + 1 optimizer steps taken)."""
    n = step + 1
    if n <= cfg.warmup_steps:
        return peak * n / cfg.warmup_steps
    progress = (n - cfg.warmup_steps) / (total - cfg.warmup_steps)
    low = peak * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.decay == "linear":
        return low + (peak - low) * (1 - progress)
    if cfg.decay == "wsd":
        start = total - cfg.wsd_decay_steps
        return peak if n <= start else low + (peak - low) * (1 - (n - start) / cfg.wsd_decay_steps)
    return peak


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd"])
def test_each_group_follows_its_own_peak_and_floor(decay):
    cfg = OptimConfig(warmup_steps=4, decay=decay, min_lr_ratio=0.1, wsd_decay_steps=5 if decay == "wsd" else 0)
    opt = groups()
    sched = build_scheduler(opt, cfg, total_steps=20)
    for step in range(20):
        set_lr(sched, step)
        for g, peak in zip(opt.param_groups, (1e-3, 4e-3, 4e-3), strict=True):
            assert g["lr"] == pytest.approx(expected(step, peak, cfg, 20), rel=1e-12, abs=1e-15), (step, g["name"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]  # decay untouched
    if decay != "constant":
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # min_lr_ratio * peak at the last step


def test_lr_comes_from_the_step_counter_after_a_skipped_step_and_idle_decoders():
    """DeepSpeed skips its scheduler on a non-finite step; here nothing is skipped: step 7's LR is step 7's,
    whatever happened before, and a decoder idle at step 6 (LR 0) has its LR back at step 7."""
    cfg = OptimConfig(warmup_steps=3, decay="cosine")
    fresh, opt = groups(), groups()
    sched = build_scheduler(opt, cfg, 10)
    set_lr(sched, 5, "llama")
    set_lr(sched, 6, "llama")  # mistral idle
    assert opt.param_groups[2]["lr"] == 0.0 and opt.param_groups[1]["lr"] > 0
    set_lr(sched, 6, "llama")  # the same step again (the step was skipped): the same LRs, not one step on
    set_lr(sched, 7, "mistral")
    reference = build_scheduler(fresh, cfg, 10)
    set_lr(reference, 7)
    assert [g["lr"] for g in opt.param_groups] == [fresh.param_groups[0]["lr"], 0.0, fresh.param_groups[2]["lr"]]
    assert sched.state_dict()["num_steps"] == 8


def test_a_run_shorter_than_its_warm_up_only_warms_up():
    opt = groups()
    sched = build_scheduler(opt, OptimConfig(warmup_steps=10), total_steps=3)
    set_lr(sched, 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 10)


def test_the_configured_peaks_win_over_a_loaded_checkpoints():
    """Loading optimizer state brings back the param groups as saved (their max_lr too): a resume with another
    optim.*_lr uses the new one from the next step on."""
    opt = groups()
    sched = build_scheduler(opt, OptimConfig(warmup_steps=0, decay="constant"), total_steps=10)
    for group in opt.param_groups:
        group["max_lr"] = group["min_lr"] = 7.0  # what an older run's checkpoint held
    set_lr(sched, 3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 4e-3, 4e-3]


def test_a_wsd_decay_longer_than_the_run_is_one_line():
    from pathlib import Path

    from arctrain.config.load import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs/tiny_cpu.yaml"

    with pytest.raises(ValueError, match=r"optim.wsd_decay_steps: 50 must be <= train.steps - optim.warmup_steps = 30"):
        load_config(tiny, ["optim.decay=wsd", "optim.wsd_decay_steps=50", "train.steps=40"])
    with pytest.raises(ValueError, match=r"optim.wsd_decay_steps: 0 must be > 0 with decay=wsd"):
        load_config(tiny, ["optim.decay=wsd"])
