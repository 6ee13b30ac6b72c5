"""Train an ARC compressor with DeepSpeed ZeRO-3.

    torchrun --nproc_per_node 8 -m arctrain train --config configs/llama_mistral_1node.yaml
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m arctrain train --config configs/tiny_cpu.yaml train.steps=20
    sbatch slurm/pretrain.sh                     # srun -> torchrun -> this, on every node

A run restarted with the same `checkpoint.dir` resumes from its latest checkpoint. SIGUSR1 or SIGTERM on any
rank: every rank saves a checkpoint and the process exits with EXIT_PREEMPTED (75), "preempted, resume me".
"""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from arctrain.checkpoint.checkpointer import Checkpointer, resume_fingerprint, training_state
from arctrain.checkpoint.init_from import load_initial_weights
from arctrain.config.deepspeed import deepspeed_config
from arctrain.config.load import load_config
from arctrain.config.schema import Config
from arctrain.data import ValSet, Vocab, build_train_loader
from arctrain.data.qa import QAValBatches
from arctrain.distributed import (
    MAX,
    Preemption,
    all_reduce,
    collective_timeout,
    hpz_group_once,
    init_distributed,
    on_device,
    reduce_floats,
    set_collective_timeout,
)
from arctrain.faults import fault_point
from arctrain.model import build_model
from arctrain.model.flops import FlopCounter, peak_tflops
from arctrain.train.align_init import align_projectors
from arctrain.train.fail_fast import end_failed_rank, stop_watching, watch_failures
from arctrain.train.memory import placement
from arctrain.train.metrics import LossMeter, MetricsLogger, Window
from arctrain.train.optim import build_optimizer, build_scheduler, set_lr
from arctrain.train.preflight import check_paths, check_shards, default_world_size, dry_run
from arctrain.train.run_log import SampleLog, print_summary, record_run_data, run_logger, save_launch_config
from arctrain.train.validate import Validation

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, requeue and resume
EXIT_DIVERGED = 3  # max_bad_steps non-finite steps in a row: checkpoint saved, needs a human


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="arctrain train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher (LOCAL_RANK wins)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 decoders.1.path=…")
    parser.add_argument("--dry-run", action="store_true", help="check everything, print sizes and memory, no training")
    parser.add_argument("--world-size", type=int, help="with --dry-run: ranks to size for (default $WORLD_SIZE or 8)")
    parser.add_argument("--gpu", help="with --dry-run: the card to size for, e.g. h100-80gb (default: this one)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    return cfg, args


def build_engine(
    cfg: Config,
    world_size: int,
    init_from: Path | None = None,
    rank: int = 0,
    say=print,
    universal=False,
    device=None,
    fresh: bool = False,
):
    """The DeepSpeed engine around the ARC model, and the LR schedule (set by the trainer each step, not handed to
    DeepSpeed, which would skip it on a skipped step); `init_from`: a run or checkpoint whose trainable weights
    the model starts from (loaded before `deepspeed.initialize`, so the optimizer's master weights are those);
    `universal`: the checkpoint to resume was written at another world size (arctrain/checkpoint/elastic.py);
    `fresh`: no checkpoint to resume, so `projector_init: aligned` projectors are fitted (after `init_from`)."""
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    # imports deepspeed, which picks its accelerator on import: after DS_ACCELERATOR is set
    from arctrain.train.zero_trace import keep_trace_per_decoder

    ds_config = deepspeed_config(cfg, world_size)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    torch.manual_seed(cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    replicated, why = placement(cfg, world_size, ds_config)
    say(f"frozen decoders: {'replicated' if replicated else 'partitioned by ZeRO-3'} ({why})")
    with hpz_group_once():  # several zero.Init contexts under hpZ (train.zero_hpz)
        model = build_arc_model(cfg, dtype, ds_config, replicated)
        if init_from is not None:
            load_initial_weights(model, init_from, rank, device or torch.device("cpu"), say)
        if fresh:
            align_projectors(model, cfg, rank, world_size, device or torch.device("cpu"), say)
        optimizer = build_optimizer(model, cfg.optim, ds_config)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    keep_trace_per_decoder(engine)  # a decoder switch keeps ZeRO-3's prefetch (arctrain/train/zero_trace.py)
    scheduler.optimizer = engine.optimizer  # the same param groups, as DeepSpeed's ZeRO-3 optimizer holds them
    return engine, model, scheduler


def build_arc_model(cfg: Config, dtype: torch.dtype, ds_config: dict | None, replicated: tuple[str, ...] = ()):
    """The ARC model, activation checkpointing switched on in the encoder and the decoders as configured."""

    model = build_model(
        cfg.model,
        cfg.decoders,
        dtype,
        ds_config=ds_config,
        gradient_checkpointing=cfg.train.encoder_checkpointing,
        replicated=replicated,
    )
    if cfg.train.decoder_checkpointing:
        model.enable_decoder_checkpointing()
    return model


class StepOutput(NamedTuple):
    loss_sum: torch.Tensor  # () float64 on the device: this rank's summed cross-entropy over its target tokens
    tokens: torch.Tensor  # (1,) float64 on the device: target tokens of the step over all ranks and micro-batches


def train_step(engine, batches: list, device: torch.device, world_size: int, meter=None) -> StepOutput:
    """One optimizer step over this rank's micro-batches (all of one decoder), as one process on all ranks' data
    would take it: the loss is the summed cross-entropy over every target token of the step on every rank,
    divided by their number (torchtitan's global valid tokens; transformers' 4.46 gradient-accumulation fix).

    The model returns each micro-batch's mean over its own n targets. DeepSpeed averages gradients over the
    world_size ranks and (not here: scale_wrt_gas=False) over micro-batches, so the loss handed to backward is
    mean * n * world_size / global_tokens. The token count comes from the batches' CPU-side counts, summed over
    ranks by one all-reduce of a device tensor that nothing on the host waits for."""
    decoder = batches[0].decoder
    tokens = all_reduce(on_device([float(sum(b.stats.targets for b in batches))], device), device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        assert batch.decoder == decoder, "one decoder per optimizer step"
        n = batch.stats.targets
        out = engine(batch.to(device, non_blocking=True), decoder)
        fault_point("train_step")  # tests: a rank that raises or dies mid-step (arctrain/faults.py)
        scale = (n * world_size / tokens.clamp(min=1)).to(out.loss.dtype)  # exactly 1.0 when n is the mean
        engine.backward(out.loss * scale, scale_wrt_gas=False)
        engine.step()  # DeepSpeed counts micro-steps; the optimizer steps at the last one
        loss_sum += out.loss.detach().to(torch.float64) * n
        if meter is not None:
            meter.add(decoder, batch.task, out.loss, n)
    return StepOutput(loss_sum, tokens)


def build_checkpointer(cfg: Config, rank: int, world_size: int, device: torch.device, say=print):
    """The run directory's checkpointer; refuses a resume under changed settings (at another world size it sets
    train.grad_accum to keep the checkpoint's micro-batches per step), then keeps this launch's config."""

    run_dir = Path(cfg.checkpoint.dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, rank, device, cfg.checkpoint.interval, cfg.train.steps)
    accum = checkpointer.check_resumable(world_size, resume_fingerprint(cfg), cfg.train.grad_accum, cfg.train.steps)
    if accum != cfg.train.grad_accum:
        say(
            f"train.grad_accum {cfg.train.grad_accum} -> {accum}: {checkpointer.latest()} ran "
            f"{accum * world_size} micro-batches per step, this run has {world_size} ranks"
        )
        cfg.train.grad_accum = accum
    if rank == 0:
        save_launch_config(cfg, run_dir)
        record_run_data(cfg, run_dir)  # the segment length, for the export (arctrain/export/write.py)
    return checkpointer


def build_data(cfg: Config, rank: int, world_size: int, next_batch: int):
    """(the training loader at this rank's local batch `next_batch`, the val set: data.ValSet, QA val batches, or
    None)."""

    vocab = Vocab.from_config(cfg)
    val = None
    if cfg.data.qa.train and cfg.eval.interval:
        val = QAValBatches(cfg, vocab)
    elif cfg.eval.interval:  # the val samples are picked once; each (decoder, task)'s batches collated once
        val = ValSet(cfg, vocab, rank, world_size)
    loader = build_train_loader(cfg, rank, world_size, vocab)
    loader.load_state_dict({"next_batch": next_batch})
    return loader, val


def train(cfg: Config) -> int:
    rank, world_size, device = init_distributed(cfg.comm.init_timeout_seconds)
    watch_failures(rank, world_size)  # a rank that raises ends every rank at once
    run_dir = Path(cfg.checkpoint.dir)
    say = run_logger(run_dir, rank)
    checkpointer = build_checkpointer(cfg, rank, world_size, device, say)
    fresh = checkpointer.latest() is None  # nothing to resume: init_from and aligned projectors apply
    init_from = Path(cfg.train.init_from) if cfg.train.init_from and fresh else None
    elastic = checkpointer.elastic(world_size)
    engine, model, scheduler = build_engine(cfg, world_size, init_from, rank, say, elastic, device, fresh)
    state = checkpointer.load(engine, world_size) or {"step": 0, "bad_steps": 0, "skipped_steps": 0}
    resumed = f"resumed from step {state['step']}" + (f" (written by {state['world_size']} ranks)" if elastic else "")
    say(f"{resumed if state['step'] else 'starting at step 0'} in {run_dir} (world size {world_size}, {device.type})")
    loader, val = build_data(cfg, rank, world_size, state["step"] * cfg.train.grad_accum)
    validation = Validation(cfg, rank, world_size, device, val)
    logger = MetricsLogger(run_dir, cfg.logging, rank, _plain(cfg), resume_step=state["step"])
    keys_log = SampleLog.open(run_dir / "logs", rank, world_size, state["step"]) if cfg.logging.sample_keys else None
    meter = LossMeter([d.name for d in cfg.decoders], cfg.data.tasks, device)
    window = Window(FlopCounter(model))
    peak = peak_tflops()
    preemption = Preemption()
    batches = iter(loader)
    exit_code = 0
    step = state["step"]
    set_collective_timeout(cfg.comm.train_timeout_seconds)  # a stopped or dead rank now ends every rank

    engine.train()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]  # the whole step first: its token count
        window.wait += time.perf_counter() - t0
        set_lr(scheduler, step, micro[0][1].decoder)
        out = train_step(engine, [batch for _, batch in micro], device, world_size, meter)
        for b, batch in micro:
            window.count(batch.decoder, batch.stats)
            if keys_log is not None:
                keys_log.write(step + 1, loader.global_batch(b), batch.keys)
        state["step"] = step = step + 1
        window.time += time.perf_counter() - t0
        # DeepSpeed reduces the gradient norm over ranks and skips a step whose norm is not finite (a non-finite
        # loss gives one), on every rank alike: the host reads that once per step, inside engine.step().
        bad = not engine.was_step_applied()
        state["bad_steps"] = state["bad_steps"] + 1 if bad else 0
        state["skipped_steps"] += bad
        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            logger.log(step, _train_metrics(engine, out, meter, window, world_size, peak, state))
            meter.reset()
            window.reset()
        if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
            logger.log(step, validation(engine))

        tag = None
        if state["bad_steps"] >= cfg.train.max_bad_steps:
            tag = f"diverged_step_{step:08d}"
            exit_code = EXIT_DIVERGED
            say(
                f"stopping: {state['bad_steps']} steps in a row had a non-finite loss or gradient norm; lower "
                f"optim.*_lr or check the data; checkpoint {tag} saved, `latest` stays on the last good one"
            )
        elif preemption.agreed(device):
            say(f"preempted at step {step}: saving a checkpoint, exit code {EXIT_PREEMPTED} (resume me)")
            exit_code = EXIT_PREEMPTED
        if exit_code or checkpointer.due(step):
            with collective_timeout(cfg.comm.init_timeout_seconds, then=cfg.comm.train_timeout_seconds):
                saved = checkpointer.save(engine, step, training_state(state, cfg, world_size, scheduler), tag)
                say(f"checkpoint: {saved}")
        if exit_code:
            break
    logger.close()
    if rank == 0 and not exit_code:
        print_summary(run_dir)
    return exit_code


def _train_metrics(engine, out: StepOutput, meter, window, world_size: int, peak, state: dict) -> dict:
    """The logging interval's metrics; the loss is the last step's, token-weighted over all ranks (collectives)."""
    loss_sum = all_reduce(out.loss_sum, out.tokens.device)
    metrics = {"train/loss": (loss_sum / out.tokens.clamp(min=1)).item(), **meter.reduce("train")}
    metrics["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
    metrics.update(window.rates(world_size, peak))
    for group in engine.optimizer.param_groups:
        if not group["name"].endswith("_no_decay"):  # same schedule as its decay twin
            metrics[f"lr/{group['name']}"] = group["lr"]
    metrics["skipped_steps"] = state["skipped_steps"]
    elements = reduce_floats([_local_param_elements(engine.module)], out.tokens.device, MAX)[0]
    metrics["param_elements_per_rank"] = elements
    return metrics


def _plain(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _local_param_elements(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions (frozen decoders included)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    try:
        cfg, args = parse_args(argv)
        check_shards(cfg)
        if args.dry_run:
            dry_run(cfg, args.world_size or default_world_size(), gpu=args.gpu)
            raise SystemExit(0)
    except ValueError as err:  # config and data errors: one line, before any process group
        print(f"arctrain train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        code = train(cfg)
    except ValueError as err:  # e.g. a checkpoint this run cannot resume: every rank says it and stops
        print(f"arctrain train: error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:  # a bug, a bad batch, an OOM, a timed-out collective, a dead peer: every rank ends
        end_failed_rank(cfg.comm, err)
    stop_watching()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
