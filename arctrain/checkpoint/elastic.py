"""Resume at another world size: the global batch is kept, the ZeRO-3 state is resharded (docs/ARCHITECTURE.md §6).

    accum = resume_grad_accum(state, where, world_size, grad_accum)  # the checkpoint fixes micro-batches per step
    ds_config["checkpoint"] = {"load_universal": True}                # before deepspeed.initialize
    load_universal(engine, ckpt, rank, device)                        # rank 0 converts, every rank loads its share

The data order is a function of global micro-batch indices (arctrain/data/sampling.py `Layout`), so a step is the
same micro-batches at any world size as long as world_size x grad_accum stays what the checkpoint ran with. The
weights and Adam moments go through DeepSpeed's universal checkpoint: `ds_to_universal` (run as its command, on
rank 0) writes every trainable parameter's full fp32 weight, exp_avg and exp_avg_sq, and the ZeRO-3 engine, built
with `checkpoint.load_universal`, loads and repartitions them for this world size. Frozen decoders are in neither:
they load from their directories, as on every start.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from arctrain.distributed import barrier, broadcast_object
from arctrain.faults import fault_point

UNIVERSAL = "universal"  # RUN_DIR/checkpoints/universal/step_N: the converted checkpoint, removed once loaded


def resume_grad_accum(state: dict, where: Path, world_size: int, grad_accum: int) -> int:
    """The accumulation steps a resume at `world_size` runs with. The checkpoint fixes the micro-batches per step
    (its world size x its grad_accum): the configured grad_accum when it keeps that number, else (the world size
    changed, grad_accum left as it was) the one that keeps it exactly; anything else is refused in one line."""
    old_world = state.get("world_size", world_size)
    old_accum = state.get("grad_accum", state.get("fingerprint", {}).get("train.grad_accum", grad_accum))
    per_step = old_world * old_accum
    if world_size * grad_accum == per_step:
        return grad_accum
    if world_size == old_world:
        raise ValueError(
            f"{where} was written with train.grad_accum={old_accum}, this run has train.grad_accum={grad_accum}: "
            f"resuming would change which samples follow; keep train.grad_accum or start a new run directory"
        )
    if grad_accum == old_accum and per_step % world_size == 0:
        return per_step // world_size
    fix = (
        f"use train.grad_accum={per_step // world_size}"
        if per_step % world_size == 0
        else f"resume on a number of ranks that divides {per_step}"
    )
    raise ValueError(
        f"{where} ran {per_step} micro-batches per step ({old_world} ranks x train.grad_accum={old_accum}); "
        f"{world_size} ranks x train.grad_accum={grad_accum} would change the global batch: {fix}, or start a new "
        f"run directory"
    )


def to_universal(ckpt: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO-3 checkpoint `ckpt`, written to `out` (replaced)."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ckpt),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
    ]
    # A file conversion: on a GPU node it must not open a CUDA context beside rank 0's training process.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = " ".join((result.stderr.strip().splitlines() or ["no output"])[-1].split())
        raise ValueError(f"{ckpt}: DeepSpeed's ds_to_universal could not convert it for another world size: {tail}")


def saved_param_groups(universal: Path) -> list[dict]:
    """The optimizer's param groups as the checkpoint saved them (hyperparameters and arctrain's tags: name,
    decoder, weight_decay, peaks), without their parameters."""
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    sd = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    return [{k: v for k, v in group.items() if k != "params"} for group in sd[OPTIMIZER_STATE_DICT][PARAM_GROUPS]]


def restore_param_groups(optimizer, saved: list[dict]) -> None:
    """Put back each group's own hyperparameters. DeepSpeed's ZeRO-3 universal load copies group 0's onto every
    group ("the hyperparameters of each parameter should be the same", stage3.py): the encoder's name, weight
    decay and LR would land on the projectors' and the no-decay groups, and no group would keep its decoder tag."""
    groups = optimizer.param_groups
    names = [g.get("name") for g in saved]
    if len(groups) != len(saved):
        raise ValueError(f"the checkpoint has {len(saved)} optimizer param groups ({names}), this model {len(groups)}")
    for group, old in zip(groups, saved):
        group.update(old)


def separate_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give every ZeRO-3 sub-group its own Adam step counter. DeepSpeed's universal load assigns one `step` tensor
    to all of them; torch's Adam increments it in place once per sub-group, so after the first step every group
    after the first would count a step too many (and its bias correction be off)."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_universal(engine, ckpt: Path, rank: int, device: torch.device) -> None:
    """Load checkpoint `ckpt` (written at another world size) into `engine` (built with checkpoint.load_universal):
    rank 0 converts it, every rank loads its partitions, then what DeepSpeed's load leaves wrong is put right: each
    param group's hyperparameters and each sub-group's Adam step counter."""
    out = ckpt.parent / UNIVERSAL / ckpt.name
    result: dict = {}
    if rank == 0:
        try:
            fault_point("convert")  # tests: a slow conversion while the other ranks wait (comm.init_timeout)
            to_universal(ckpt, out)
            result = {"groups": saved_param_groups(out)}
        except (ValueError, FileNotFoundError, RuntimeError) as err:  # every rank must hear of it, or they wait
            result = {"error": str(err)}
    result = broadcast_object(result, device)
    if "error" in result:
        raise ValueError(result["error"])
    path, _ = engine.load_checkpoint(
        str(out.parent),
        tag=out.name,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise ValueError(f"{out}: DeepSpeed could not load the universal checkpoint")
    restore_param_groups(engine.optimizer, result["groups"])
    separate_adam_steps(engine.optimizer.optimizer)
    barrier(device)  # every rank has read it
    if rank == 0:
        shutil.rmtree(out.parent, ignore_errors=True)  # a cache of `ckpt`, as large as it
