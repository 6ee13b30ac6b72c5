"""Load a run's latest checkpoint as `arctrain train` does at this world size, and save what the engine then holds.

    RANK=.. WORLD_SIZE=.. ... python tests/checkpoint/elastic_probe.py OUT.pt --config configs/tiny_cpu.yaml k=v ...

OUT.pt (rank 0): the trainer state, the grad_accum the run would use, every optimizer param group without its
parameters, the Adam step of every ZeRO-3 sub-group (and how many distinct step tensors hold them), and per
trainable parameter its full fp32 weight, exp_avg and exp_avg_sq gathered from the partitions
(deepspeed.utils.safe_get_full_*). tests/checkpoint/test_elastic.py compares them with the checkpoint's own partitions.
"""

import sys

import torch


def main(out: str, argv: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from arctrain.distributed import init_distributed
    from arctrain.train.loop import build_checkpointer, build_engine, parse_args

    cfg, _ = parse_args(argv)
    rank, world_size, device = init_distributed()
    checkpointer = build_checkpointer(cfg, rank, world_size, device)
    engine, _, _ = build_engine(cfg, world_size, None, rank, universal=checkpointer.elastic(world_size))
    state = checkpointer.load(engine, world_size)
    params = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:  # collectives: every rank gathers every parameter, in the same order
            params[name] = {
                "fp32": safe_get_full_fp32_param(param),
                "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq"),
            }
    base = engine.optimizer.optimizer  # torch's AdamW over the flat fp32 partitions
    dump = {
        "state": state,
        "grad_accum": cfg.train.grad_accum,
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
        "adam_steps": [float(base.state[flat]["step"]) for flat in engine.optimizer.fp32_partitioned_groups_flat],
        "adam_step_tensors": len(
            {id(base.state[flat]["step"]) for flat in engine.optimizer.fp32_partitioned_groups_flat}
        ),
        "params": params,
    }
    if rank == 0:
        torch.save(dump, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
