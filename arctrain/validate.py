"""Validation during training: loss per decoder and task, with the compressed context and without it.

    logger.log(step, evaluate(engine, cfg, rank, world_size, device, vocab, val))

`val` is a `data.ValSet` (a fixed sample spread over every val shard of every source, the same for any world
size, picked once per run: arctrain/data/val.py) or, for QA fine-tuning, `data.qa.QAValBatches`. Every rank runs
the same number of batches per (decoder, task, source), so the ZeRO-3 gathers inside forward stay in step; the
token-weighted sums stay on the device and are reduced once per metric set.
"""

import torch

from arctrain.metrics import LossMeter


def evaluate(engine, cfg, rank: int, world_size: int, device: torch.device, vocab, val) -> dict[str, float]:
    """Val loss per decoder and task, with compressed context and without (the gain from compression); with several
    val sources also per source (`val/<decoder>/<task>/<source>/loss`)."""
    names = [d.name for d in cfg.decoders]
    with_ctx, no_ctx = LossMeter(names, cfg.data.tasks, device), LossMeter(names, cfg.data.tasks, device)
    sources = getattr(val, "names", [])
    per_source = tuple(f"{t}/{s}" for t in cfg.data.tasks for s in sources) if len(sources) > 1 else ()
    src_ctx, src_no_ctx = LossMeter(names, per_source, device), LossMeter(names, per_source, device)
    engine.eval()
    with torch.no_grad():
        for name in names:
            for task in cfg.data.tasks:
                for source, batch in val_batches(name, task, rank, world_size, val):
                    n = batch.stats.targets  # the no-context batch scores the same target tokens
                    batch = batch.to(device, non_blocking=True)
                    loss = engine.module(batch, name).loss
                    loss_no_ctx = engine.module(batch, name, use_context=False).loss
                    with_ctx.add(name, task, loss, n)
                    no_ctx.add(name, task, loss_no_ctx, n)
                    if per_source:
                        src_ctx.add(name, f"{task}/{source}", loss, n)
                        src_no_ctx.add(name, f"{task}/{source}", loss_no_ctx, n)
    engine.train()
    metrics = {**with_ctx.reduce("val"), **no_ctx.reduce("val", "loss_no_context")}
    if per_source:  # the same on every rank (a collective)
        metrics |= {**src_ctx.reduce("val"), **src_no_ctx.reduce("val", "loss_no_context")}
    return metrics


def val_batches(decoder: str, task: str, rank: int, world_size: int, val):
    """(source, batch) pairs; QA val batches have no source."""
    from arctrain.data.qa import QA

    if task == QA:
        return ((None, b) for b in val.batches(decoder, rank, world_size))
    return val.batches(decoder, task)
