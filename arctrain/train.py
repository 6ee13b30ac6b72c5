"""Train an ARC compressor with DeepSpeed ZeRO-3.

    torchrun --nproc_per_node 8 -m arctrain train --config configs/llama_mistral_1node.yaml
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m arctrain train --config configs/tiny_cpu.yaml train.steps=20
    sbatch slurm/pretrain.sh                     # srun -> torchrun -> this, on every node

A run restarted with the same `checkpoint.dir` resumes from its latest checkpoint. SIGUSR1 or SIGTERM on any
rank: every rank saves a checkpoint and the process exits with EXIT_PREEMPTED (75), "preempted, resume me".
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, requeue and resume
EXIT_DIVERGED = 3  # max_bad_steps non-finite steps in a row: checkpoint saved, needs a human


def parse_args(argv: list[str]):
    from arctrain.config import check_paths, load_config

    parser = argparse.ArgumentParser(prog="arctrain train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 decoders.1.path=…")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    return cfg


def check_shards(cfg) -> None:
    """Refuse shards built with other tokenizers before any process group starts."""
    from arctrain.data import open_source, tokenizer_paths

    for path, _ in cfg.data.sources:
        open_source(path, "train", tokenizer_paths(cfg))
    for path in cfg.data.val_dirs if cfg.eval.interval else []:
        open_source(path, "val", tokenizer_paths(cfg))
    if cfg.data.qa:  # every record checked now: a bad line is one error here, not a crash in a loader worker
        from arctrain.data.qa import read_qa

        for path in filter(None, (cfg.data.qa, cfg.data.qa_val)):
            read_qa(Path(path))


def init_distributed() -> tuple[int, int, torch.device]:
    """The process group from torchrun's (or srun + torchrun's) environment; one process runs standalone."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `arctrain train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


class Preemption:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it after each step with one tiny all-reduce."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.flag)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def build_engine(cfg, world_size: int, init_from: Path | None = None, rank: int = 0, say=print):
    """The DeepSpeed engine around the ARC model; `init_from`: a run or checkpoint whose trainable weights the model
    starts from (loaded before `deepspeed.initialize`, so the optimizer's master weights are those)."""
    import deepspeed

    from arctrain.checkpoint import load_initial_weights
    from arctrain.config import deepspeed_config
    from arctrain.model import build_model
    from arctrain.optim import build_optimizer, build_scheduler

    ds_config = deepspeed_config(cfg, world_size)
    torch.manual_seed(cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = build_model(
        cfg.model,
        cfg.decoders,
        dtype,
        ds_config=ds_config,
        gradient_checkpointing=cfg.train.activation_checkpointing,
    )
    if cfg.train.activation_checkpointing:
        model.enable_decoder_checkpointing()
    if init_from is not None:
        load_initial_weights(model, init_from, rank, say)
    optimizer = build_optimizer(model, cfg.optim, ds_config)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, model


def evaluate(engine, cfg, rank: int, world_size: int, device, vocab, val) -> dict[str, float]:
    """Val loss per decoder and task, with compressed context and without (the gain from compression); with several
    val sources also per source (`val/<decoder>/<task>/<source>/loss`). `val`: a data.ValSet or QAValBatches."""
    from arctrain.metrics import LossMeter

    names = [d.name for d in cfg.decoders]
    with_ctx, no_ctx = LossMeter(names, cfg.data.tasks), LossMeter(names, cfg.data.tasks)
    sources = getattr(val, "names", [])
    per_source = [t + "/" + s for t in cfg.data.tasks for s in sources] if len(sources) > 1 else []
    src_ctx, src_no_ctx = LossMeter(names, tuple(per_source)), LossMeter(names, tuple(per_source))
    engine.eval()
    with torch.no_grad():
        for name in names:
            for task in cfg.data.tasks:
                for source, batch in _val_batches(name, task, rank, world_size, val):
                    batch = batch.to(device)
                    out = engine.module(batch, name)
                    loss, n = out.loss.item(), int(out.n_tokens)
                    out = engine.module(batch, name, use_context=False)
                    loss_no_ctx, n_no_ctx = out.loss.item(), int(out.n_tokens)
                    with_ctx.add(name, task, loss, n)
                    no_ctx.add(name, task, loss_no_ctx, n_no_ctx)
                    if per_source:
                        src_ctx.add(name, f"{task}/{source}", loss, n)
                        src_no_ctx.add(name, f"{task}/{source}", loss_no_ctx, n_no_ctx)
    engine.train()
    metrics = {**with_ctx.reduce("val"), **no_ctx.reduce("val", "loss_no_context")}
    if per_source:  # the same on every rank (a collective)
        metrics |= {**src_ctx.reduce("val"), **src_no_ctx.reduce("val", "loss_no_context")}
    return metrics


def _val_batches(decoder: str, task: str, rank: int, world_size: int, val):
    """(source, batch) pairs; QA val batches have no source."""
    from arctrain.data.qa import QA

    if task == QA:
        return ((None, b) for b in val.batches(decoder, rank, world_size))
    return val.batches(decoder, task)


def train(cfg) -> int:
    from arctrain.checkpoint import Checkpointer
    from arctrain.config import save_config
    from arctrain.data import ValSet, Vocab, build_train_loader
    from arctrain.metrics import FlopCounter, LossMeter, MetricsLogger, peak_memory_gb, peak_tflops
    from arctrain.optim import idle_decoders

    rank, world_size, device = init_distributed()
    run_dir = Path(cfg.checkpoint.dir)
    if rank == 0:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    preemption = Preemption()
    say = _logger(run_dir, rank)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, rank)
    init_from = Path(cfg.train.init_from) if cfg.train.init_from and checkpointer.latest() is None else None
    engine, model = build_engine(cfg, world_size, init_from, rank, say)
    state = checkpointer.load(engine, world_size) or {"step": 0, "next_batch": 0, "bad_steps": 0, "skipped_steps": 0}
    step = state["step"]
    say(f"{'resumed from step ' + str(step) if step else 'starting at step 0'} in {run_dir} "
        f"(world size {world_size}, {device.type})")  # fmt: skip

    vocab = Vocab.from_config(cfg)
    val = None
    if cfg.data.qa and cfg.eval.interval:
        from arctrain.data.qa import QAValBatches

        val = QAValBatches(cfg, vocab)
    elif cfg.eval.interval:  # the val samples are picked once; each (decoder, task)'s batches collated once
        val = ValSet(cfg, vocab, rank, world_size)
    loader = build_train_loader(cfg, rank, world_size, vocab)
    loader.load_state_dict({"next_batch": state["next_batch"]})
    batches = iter(loader)
    logger = MetricsLogger(run_dir, cfg.logging, rank, dataclasses.asdict(cfg), resume_step=step)
    keys_log = SampleLog(run_dir / "logs" / f"samples_rank{rank}.jsonl", step) if cfg.logging.sample_keys else None
    meter, flops, peak = LossMeter([d.name for d in cfg.decoders], cfg.data.tasks), FlopCounter(model), peak_tflops()
    window = {"time": 0.0, "wait": 0.0, "samples": 0, "enc_tokens": 0, "dec_tokens": 0, "flops": 0.0}
    exit_code = 0

    def trainer_state() -> dict:
        return {"step": step, "next_batch": loader.next_batch, "bad_steps": state["bad_steps"],
                "skipped_steps": state["skipped_steps"], "world_size": world_size}  # fmt: skip

    engine.train()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        step_loss, decoder = 0.0, None
        for _ in range(cfg.train.grad_accum):
            t_wait = time.perf_counter()
            b, batch = next(batches)
            window["wait"] += time.perf_counter() - t_wait
            assert decoder in (None, batch.decoder), "one decoder per optimizer step"
            decoder = batch.decoder
            batch = batch.to(device, non_blocking=True)
            out = engine(batch, decoder)
            engine.backward(out.loss)
            idle_decoders(engine.optimizer, decoder)
            engine.step()
            loss = out.loss.item()
            step_loss += loss / cfg.train.grad_accum
            meter.add(decoder, batch.task, loss, int(out.n_tokens))
            if keys_log is not None:
                keys_log.write(step + 1, b, batch.keys)
            _count(window, batch, decoder, flops)
        step += 1
        window["time"] += time.perf_counter() - t0

        loss_non_finite = _over_ranks(not math.isfinite(step_loss), torch.distributed.ReduceOp.MAX) > 0  # every rank
        bad = loss_non_finite or not engine.was_step_applied()
        state["bad_steps"] = state["bad_steps"] + 1 if bad else 0
        state["skipped_steps"] += int(bad)
        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            metrics = {"train/loss": _over_ranks(step_loss) / world_size, **meter.reduce("train")}
            metrics.update(_throughput(window, engine, world_size, peak, peak_memory_gb()))
            metrics["skipped_steps"] = state["skipped_steps"]
            metrics["param_elements_per_rank"] = _over_ranks(
                _local_param_elements(engine.module), torch.distributed.ReduceOp.MAX
            )
            logger.log(step, metrics)
            meter.reset()
            window = dict.fromkeys(window, 0)
        if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
            logger.log(step, evaluate(engine, cfg, rank, world_size, device, vocab, val))

        if state["bad_steps"] >= cfg.train.max_bad_steps:
            say(
                f"stopping: {state['bad_steps']} steps in a row had a non-finite loss or gradient norm "
                f"(last loss {step_loss}); lower optim.*_lr or check the data; checkpoint saved"
            )
            exit_code = EXIT_DIVERGED
        elif preemption.agreed():
            say(f"preempted at step {step}: saving a checkpoint, exit code {EXIT_PREEMPTED} (resume me)")
            exit_code = EXIT_PREEMPTED
        if exit_code or step % cfg.checkpoint.interval == 0 or step == cfg.train.steps:
            path = checkpointer.save(engine, step, trainer_state())
            say(f"checkpoint: {path}")
        if exit_code:
            break
    logger.close()
    if rank == 0 and not exit_code:
        _summary(run_dir)
    return exit_code


def _logger(run_dir: Path, rank: int):
    """Rank 0 prints and keeps the same lines in RUN_DIR/logs/train.log."""

    def say(message: str) -> None:
        if rank == 0:
            print(message)
            with open(run_dir / "logs" / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return say


def _count(window: dict, batch, decoder: str, flops) -> None:
    enc_tokens = int(batch.enc_mask.sum())
    dec_tokens = int(batch.attention_mask.sum())
    vectors = int(batch.n_vectors.sum()) + 2
    window["samples"] += batch.dec_ids.shape[0]
    window["enc_tokens"] += enc_tokens
    window["dec_tokens"] += dec_tokens
    window["flops"] += flops(decoder, enc_tokens, vectors, dec_tokens)


def _throughput(window: dict, engine, world_size: int, peak: float | None, memory_gb: float) -> dict[str, float]:
    """Per-rank rates averaged over the logging window, and the fraction of step time spent waiting for data."""
    seconds = max(window["time"], 1e-9)
    out = {
        "grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "samples_per_s": window["samples"] * world_size / seconds,
        "enc_tokens_per_s": window["enc_tokens"] * world_size / seconds,
        "dec_tokens_per_s": window["dec_tokens"] * world_size / seconds,
        "tflops_per_rank": window["flops"] / seconds / 1e12,
        "data_wait_fraction": window["wait"] / seconds,
        "peak_memory_gb": memory_gb,
    }
    if peak is not None:
        out["mfu"] = out["tflops_per_rank"] / peak
    for group in engine.optimizer.param_groups:
        if not group["name"].endswith("_no_decay"):  # same schedule as its decay twin
            out[f"lr/{group['name']}"] = group["lr"]
    return out


class SampleLog:
    """One line per micro-batch: step, batch index and sample keys; lines past a resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step] if (
            path.is_file()) else []  # fmt: skip
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, b: int, keys: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "batch": b, "keys": keys}) + "\n")


def _local_param_elements(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions (frozen decoders included)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def _over_ranks(value: float, op=torch.distributed.ReduceOp.SUM) -> float:
    """One number reduced over all ranks (a collective: every rank calls it)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op)
    return t.item()


def _summary(run_dir: Path) -> None:
    """Where things are, and the final val losses with and without compressed context."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    val = next((r for r in reversed(lines) if any(k.startswith("val/") for k in r)), None)
    print(f"\nrun dir:     {run_dir}\ncheckpoint:  {run_dir / 'checkpoints'} (latest: "
          f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()})\nmetrics:     {run_dir / 'metrics.jsonl'}\n"
          f"logs:        {run_dir / 'logs'}")  # fmt: skip
    if val is None:
        return
    print(f"\nval loss at step {val['step']} (with compressed context vs no context):")
    for key in sorted(k for k in val if k.startswith("val/") and k.endswith("/loss")):
        no_ctx = val.get(key + "_no_context")
        versus = f"   vs {no_ctx:7.3f}" if no_ctx is not None else ""
        print(f"  {key[4:-5]:<28} {val[key]:7.3f}{versus}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    try:
        cfg = parse_args(argv)
        check_shards(cfg)
    except ValueError as err:  # config and data errors: one line, before any process group
        print(f"arctrain train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        code = train(cfg)
    except ValueError as err:  # e.g. a checkpoint this run cannot resume: every rank says it and stops
        print(f"arctrain train: error: {err}", file=sys.stderr)
        code = 2
    torch.distributed.destroy_process_group()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
