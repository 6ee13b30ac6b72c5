"""The validation set: a fixed sample of every val shard of every source, the same for any world size.

    val = ValSet(cfg, vocab, rank, world_size)       # once per run: picks the samples
    for source, batch in val.batches("llama", "continuation"):   # collated on the first call, then kept
        ...

`eval.batches x data.micro_batch_size` samples in all, shared equally between the val sources (`data.val_shards`,
default the training sources); within a source they are evenly spaced over its val samples in manifest order, so
every val shard contributes once a source has at least as many picks as shards. Pick g of source s goes to rank
g % world_size; each rank batches its picks of one source at a time (batches are tagged by source) and every rank
runs the same number of batches per source (ZeRO-3), a rank with fewer picks padding with an example that has
no target tokens (it adds nothing to a token-weighted loss). The segment of each sample comes from (VAL_SEED,
pick), so the set, and its loss, do not depend on the world size, train.seed or the evaluation step.
"""

import dataclasses
from math import ceil
from pathlib import Path

from arctrain.config.schema import Config
from arctrain.data.batch import ARCBatch, Example, Text
from arctrain.data.batching import BatchMaker, Vocab, tokenizer_paths
from arctrain.data.shards import Source, open_source

VAL_SEED = 0  # validation samples do not depend on train.seed: the same every run
PAD_KEY = "pad"


def source_names(dirs: list[str]) -> list[str]:
    """A short name per source for metric keys: the directory name, made unique with its position if needed."""
    names = [Path(d).name or str(i) for i, d in enumerate(dirs)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def spread(n_samples: int, n_picks: int) -> list[int]:
    """`n_picks` positions evenly spaced over `n_samples` (all of them when there are fewer)."""
    if n_picks >= n_samples:
        return list(range(n_samples))
    return [(2 * k + 1) * n_samples // (2 * n_picks) for k in range(n_picks)]


class ValSet:
    def __init__(self, cfg: Config, vocab: Vocab, rank: int, world_size: int):
        self.cfg, self.vocab, self.rank, self.world_size = cfg, vocab, rank, world_size
        self.sources: list[Source] = [open_source(p, "val", tokenizer_paths(cfg)) for p in cfg.data.val_dirs]
        self.names = source_names(cfg.data.val_dirs)
        total = cfg.eval.batches * cfg.data.micro_batch_size
        quota = [total // len(self.sources) + (s < total % len(self.sources)) for s in range(len(self.sources))]
        # picks[s]: (global pick number, shard path, index in shard) of source s, every rank's
        self.picks: list[list[tuple[int, str, int]]] = []
        first = 0
        for source, q in zip(self.sources, quota):
            flat = [(path, i) for path, n in zip(source.shards, source.sizes) for i in range(n)]
            positions = spread(len(flat), q)
            self.picks.append([(first + k, *flat[p]) for k, p in enumerate(positions)])
            first += len(positions)
        self._batches: dict[tuple[str, str], list[tuple[str, ARCBatch]]] = {}

    @property
    def samples(self) -> int:
        return sum(len(p) for p in self.picks)

    def batches(self, decoder: str, task: str) -> list[tuple[str, ARCBatch]]:
        """This rank's (source name, batch) pairs for one decoder and task, built on the first call."""
        if (decoder, task) not in self._batches:
            self._batches[decoder, task] = list(self._build(decoder, task))
        return self._batches[decoder, task]

    def _build(self, decoder: str, task: str):
        mbs = self.cfg.data.micro_batch_size
        maker = BatchMaker(self.cfg, self.vocab, self.sources)
        try:
            for name, picks in zip(self.names, self.picks):
                mine = picks[self.rank :: self.world_size]
                n_batches = ceil(ceil(len(picks) / self.world_size) / mbs)  # the busiest rank's batch count
                keyed = [maker.example(path, i, decoder, task, VAL_SEED, g) for g, path, i in mine]
                for b in range(n_batches):
                    chunk = keyed[b * mbs : (b + 1) * mbs]
                    if not chunk:  # this rank has run out of picks: a batch that counts no tokens
                        chunk = [(PAD_KEY, _no_targets(maker.example(*picks[0][1:], decoder, task, VAL_SEED, 0)[1]))]
                    examples, keys = [ex for _, ex in chunk], [key for key, _ in chunk]
                    yield name, maker.collate(examples, keys, decoder, task)
        finally:
            maker.reader.close()


def _no_targets(example: Example) -> Example:
    return Example([dataclasses.replace(p, loss=False) if isinstance(p, Text) else p for p in example.pieces])
