"""Validation during training: loss per decoder and task, with the compressed context and without it.

    logger.log(step, evaluate(engine, cfg, rank, world_size, device, vocab, qa_val))

Every rank runs the same number of fixed val batches per (decoder, task) (arctrain/data/loader.py `val_batches`),
so the ZeRO-3 gathers inside forward stay in step; the token-weighted sums stay on the device and are reduced
once per metric set.
"""

import torch

from arctrain.metrics import LossMeter


def evaluate(engine, cfg, rank: int, world_size: int, device: torch.device, vocab, qa_val=None) -> dict[str, float]:
    """Val loss per decoder and task, with compressed context and without (the gain from compression)."""
    names = [d.name for d in cfg.decoders]
    with_ctx, no_ctx = LossMeter(names, cfg.data.tasks, device), LossMeter(names, cfg.data.tasks, device)
    engine.eval()
    with torch.no_grad():
        for name in names:
            for task in cfg.data.tasks:
                for batch in val_batches(cfg, name, task, rank, world_size, vocab, qa_val):
                    n = batch.stats.targets  # the no-context batch scores the same target tokens
                    batch = batch.to(device, non_blocking=True)
                    with_ctx.add(name, task, engine.module(batch, name).loss, n)
                    no_ctx.add(name, task, engine.module(batch, name, use_context=False).loss, n)
    engine.train()
    return {**with_ctx.reduce("val"), **no_ctx.reduce("val", "loss_no_context")}


def val_batches(cfg, decoder: str, task: str, rank: int, world_size: int, vocab, qa_val):
    from arctrain.data import val_batches as shard_val_batches
    from arctrain.data.qa import QA

    if task == QA:
        return qa_val.batches(decoder, rank, world_size)
    return shard_val_batches(cfg, decoder, task, rank, world_size, vocab)
