"""`train.init_from`: another run's (or an export's) trainable weights copied into a freshly built model."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from arctrain.checkpoint.checkpointer import TRAINER_STATE, checkpoint_dir, consolidate
from arctrain.distributed import broadcast_object
from arctrain.export.load import export_weight_files
from arctrain.faults import fault_point


def source_checkpoint(path: Path) -> Path:
    """`train.init_from`: a run directory (its latest checkpoint), one checkpoint directory in it, or an export
    (`arctrain export` / `arctrain import-arc`: config.json of model_type arc_encoder), checked to be complete."""
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        export_weight_files(path)  # raises unless it is an export with all its weight files
        return path
    if (path / TRAINER_STATE).is_file() and path.name.startswith("step_"):
        return checkpoint_dir(path.parents[1], int(path.name.split("_")[1]))
    return checkpoint_dir(path, None)


def initial_weights(source: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint or export `train.init_from` names, and its full fp32 trainable weights by name (an export's
    names are the trainer's: encoder.*, projectors.NAME.*, specials.NAME.*)."""
    path = source_checkpoint(source)
    if (path / "config.json").is_file():
        state = {}
        for file in export_weight_files(path):
            state.update(load_file(file))
        return path, {name: t.float() for name, t in state.items()}
    return path, consolidate(path)


def load_initial_weights(model: torch.nn.Module, source: Path, rank: int, device: torch.device, say) -> None:
    """Copy another run's (or an export's) trainable weights into a model built under `deepspeed.zero.Init`,
    before the optimizer exists (DeepSpeed's optimizer takes its fp32 master copy from the parameters at
    `initialize`). The pooling settings may differ from the source's: they have no weights.

    Tensors are matched by name: this model's trainable tensors missing from the source (e.g. the projector of a
    decoder added now) keep their initialisation, the source's tensors this model lacks are not used; both are
    reported. A shape mismatch is an error on every rank. Rank 0 reads the consolidated fp32 weights (any world
    size wrote them) and each tensor reaches the other ranks' partitions through GatheredParameters."""
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    plan: list[dict] = [{}]
    state: dict[str, torch.Tensor] = {}
    if rank == 0:
        try:
            fault_point("convert")  # tests: a slow consolidation while the other ranks wait (comm.init_timeout)
            ckpt, state = initial_weights(source)
            plan = [_init_plan(ckpt, state, {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in trainable})]
        except (FileNotFoundError, ValueError) as err:  # every rank must hear of it, or they wait forever
            plan = [{"error": f"train.init_from: {err}"}]
    plan = broadcast_object(plan[0], device)  # its bytes on the training device, as NCCL needs
    if plan["error"]:
        raise ValueError(plan["error"])
    load = set(plan["load"])
    for name, param in trainable:
        if name not in load:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(state[name])
    n_loaded = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in trainable if n in load)
    say(f"initialised {len(load)} tensors ({n_loaded:,} parameters) from {plan['ckpt']}")
    if plan["new"]:
        say(f"not in {plan['ckpt']}, kept their initialisation: {_names(plan['new'])}")
    if plan["unused"]:
        say(f"in {plan['ckpt']} but not in this model, not used: {_names(plan['unused'])}")


def _init_plan(ckpt: Path, state: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> dict:
    wrong = [
        f"{n} is {tuple(state[n].shape)} there, {s} here"
        for n, s in shapes.items()
        if n in state and tuple(state[n].shape) != s
    ]
    return {
        "ckpt": str(ckpt),
        "error": f"train.init_from {ckpt}: other shapes than this model's: {'; '.join(wrong[:3])}" if wrong else "",
        "load": [n for n in shapes if n in state],
        "new": [n for n in shapes if n not in state],
        "unused": [n for n in state if n not in shapes],
    }


def _names(names: list[str]) -> str:
    """Tensor names shortened to their module prefixes (projectors.qwen.*), for a log line."""
    prefixes = sorted({".".join(n.split(".")[:2]) for n in names})
    return ", ".join(f"{p}.*" for p in prefixes)
