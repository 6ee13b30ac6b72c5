"""Validation during training: loss per decoder and task, with the compressed context and without it.

    validation = Validation(cfg, rank, world_size, device, val)
    logger.log(step, validation(engine))

`val` is a `data.ValSet` (a fixed sample spread over every val shard of every source, the same for any world
size, picked once per run: arctrain/data/val.py) or, for QA fine-tuning, `data.qa.QAValBatches` (fixed too).
Every rank runs the same number of batches per (decoder, task, source), so the ZeRO-3 gathers inside forward
stay in step; the token-weighted sums stay on the device and are reduced once per metric set.

The no-context losses are computed at a run's first evaluation only: without context the model is the frozen
decoder reading the batch's own tokens (no encoder, projector or special vector takes part), and the batches are
fixed for the run, so every later evaluation would compute the same numbers. Later evaluations run half the
forwards and report the kept values.
"""

import torch

from arctrain.data.qa import QA
from arctrain.train.metrics import LossMeter


class Validation:
    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, val):
        self.cfg, self.rank, self.world_size, self.device, self.val = cfg, rank, world_size, device, val
        self.no_context: dict[str, float] | None = None  # from the first evaluation

    def __call__(self, engine) -> dict[str, float]:
        """Val loss per decoder and task, with compressed context and without (the gain from compression); with
        several val sources also per source (`val/<decoder>/<task>/<source>/loss`)."""
        cfg, device = self.cfg, self.device
        names = [d.name for d in cfg.decoders]
        sources = getattr(self.val, "names", [])
        per_source = tuple(f"{t}/{s}" for t in cfg.data.tasks for s in sources) if len(sources) > 1 else ()
        meters = {  # (context used, per source) -> meter
            (ctx, by_source): LossMeter(names, per_source if by_source else cfg.data.tasks, device)
            for ctx in (True, False)
            for by_source in (False, True)
        }
        contexts = (True,) if self.no_context is not None else (True, False)
        engine.eval()
        with torch.no_grad():
            for name in names:
                for task in cfg.data.tasks:
                    for source, batch in val_batches(name, task, self.rank, self.world_size, self.val):
                        n = batch.stats.targets  # the no-context batch scores the same target tokens
                        batch = batch.to(device, non_blocking=True)
                        for ctx in contexts:
                            loss = engine.module(batch, name, use_context=ctx).loss
                            meters[ctx, False].add(name, task, loss, n)
                            if per_source:
                                meters[ctx, True].add(name, f"{task}/{source}", loss, n)
        engine.train()
        metrics = meters[True, False].reduce("val")
        if per_source:  # the same on every rank (a collective)
            metrics |= meters[True, True].reduce("val")
        if self.no_context is None:
            self.no_context = meters[False, False].reduce("val", "loss_no_context")
            if per_source:
                self.no_context |= meters[False, True].reduce("val", "loss_no_context")
        return metrics | self.no_context


def val_batches(decoder: str, task: str, rank: int, world_size: int, val):
    """(source, batch) pairs; QA val batches have no source."""

    if task == QA:
        return ((None, b) for b in val.batches(decoder, rank, world_size))
    return val.batches(decoder, task)
