"""Shards -> batches: a streaming IterableDataset for torch's DataLoader, exact resume.

    loader = build_train_loader(cfg, rank, world_size)        # checks shards against the models' tokenizers
    loader.load_state_dict({"next_batch": 1200})              # resume: the whole loader state is one index
    for b, batch in loader:                                   # b = 1200, 1201, ...; batch: ARCBatch
        ...
    for source, batch in ValSet(cfg, vocab, rank, world_size).batches("llama", "continuation"): ...  # data/val.py

Worker w of W produces the batches start + w, start + w + W, ...; the DataLoader takes them from its workers in
turn, so a rank sees b = start, start + 1, ... whatever the number of workers. Local batch b of a rank is global
micro-batch `Layout.global_batch(b)`, whose samples do not depend on the world size (docs/ARCHITECTURE.md §3).
"""

import zlib
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoTokenizer

from arctrain.config import Config
from arctrain.data.sampling import SEGMENT, Layout, Schedule, SourceMixer, SourceStream, rng
from arctrain.data.shards import ShardReader, Source, open_source, shard_table
from arctrain.model.batch import (
    ARCBatch,
    Example,
    collate,
    example_tokens,
    has_target,
    pretraining_example,
    within_budget,
)


@dataclass(frozen=True)
class Vocab:
    """What examples need from the tokenizers, computed once in the main process (workers never tokenize)."""

    enc_pad_id: int
    bos_id: dict[str, int | None]  # per decoder
    pad_id: dict[str, int]
    prefix_ids: dict[str, list[int]]

    @classmethod
    def from_config(cls, cfg: Config) -> "Vocab":
        enc = AutoTokenizer.from_pretrained(cfg.model.encoder_path)
        bos, pad, prefix = {}, {}, {}
        for d in cfg.decoders:
            tok = AutoTokenizer.from_pretrained(d.path)
            bos[d.name] = tok.bos_token_id
            pad[d.name] = _pad_id(tok)
            prefix[d.name] = tok.encode(d.prefix, add_special_tokens=False) if d.prefix else []
        return cls(_pad_id(enc), bos, pad, prefix)


def _pad_id(tok) -> int:
    # Padding is masked out everywhere; a tokenizer without a pad token can pad with EOS (or 0).
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return candidate


def tokenizer_paths(cfg: Config) -> dict[str, str]:
    """The tokenizers shards must have been built with, by manifest name."""
    return {"encoder": cfg.model.encoder_path, **{d.name: d.path for d in cfg.decoders}}


def layout(cfg: Config, rank: int = 0, world_size: int = 1) -> Layout:
    return Layout(rank, world_size, cfg.train.grad_accum)


def schedule(cfg: Config, world_size: int = 1) -> Schedule:
    """The decoder and task plan over global micro-batch indices (world_size x grad_accum of them per step)."""
    return Schedule(
        decoders=tuple(d.name for d in cfg.decoders),
        weights=tuple(d.weight for d in cfg.decoders),
        grad_accum=layout(cfg, 0, world_size).per_step,
        round_robin=cfg.train.decoder_schedule == "round_robin",
        task_ratio=cfg.data.task_ratio,
        hold=cfg.train.decoder_hold,
        fair=cfg.train.decoder_schedule == "fair",
    )


class BatchMaker:
    """Reads samples and turns them into one decoder's examples and a collated batch."""

    def __init__(self, cfg: Config, vocab: Vocab, sources: list[Source], budget: int = 0):
        self.model, self.vocab, self.interleave = cfg.model, vocab, cfg.data.interleave_tokens
        self.budget = budget  # data.tokens_per_micro_batch for training batches; validation's keep every sample
        # Every source's streams are read at once: keep each stream's shard (and the next) open and indexed.
        cache = max(8, len(sources) * (2 * cfg.data.shard_streams + 2))
        self.reader = ShardReader(shard_table(sources), max_open=cache, max_indexes=cache)

    def example(self, path: str, i: int, decoder: str, task: str, seed: int, b: int) -> tuple[str, Example]:
        suffixes = ["encoder.ids.npy", "encoder.offsets.npy", f"{decoder}.ids.npy", f"{decoder}.offsets.npy"]
        key, arrays = self.reader.read(path, i, suffixes)
        enc = _segments(arrays["encoder.ids.npy"], arrays["encoder.offsets.npy"])
        dec = _segments(arrays[f"{decoder}.ids.npy"], arrays[f"{decoder}.offsets.npy"])
        if len(enc) != len(dec) or not enc:
            raise ValueError(f"{path}: sample {key} has {len(enc)} encoder but {len(dec)} {decoder} segments")
        # Continuation needs a next segment when there is one; a one-segment sample gives an empty target (left out
        # by `collate`).
        # Interleaved continuation also wants text before the segment: it starts at segment 1 when that leaves a next.
        first = 1 if task == "continuation" and self.interleave and len(enc) >= 3 else 0
        choices = len(enc) if task == "reconstruction" else max(len(enc) - 1, 1)
        seg = first + int(rng(seed, SEGMENT, b, zlib.crc32(key.encode())).integers(choices - first))
        return key, pretraining_example(task, enc, dec, seg, self.vocab.prefix_ids[decoder], self.interleave)

    def collate(self, examples: list[Example], keys: list[str], decoder: str, task: str) -> ARCBatch:
        """The batch without the examples that have no target token (a continuation drawn from a one-segment
        sample): they would cost an encoder pass and a decoder row for a loss of nothing. Leaving them out changes
        no loss or gradient (the loss is averaged over target tokens); the count goes to `BatchStats.skipped_rows`.
        A batch with no target at all is kept whole: under ZeRO-3 every rank runs the model every step. Then the
        token budget (data.tokens_per_micro_batch) picks what the micro-batch takes (`budget_batch`)."""
        kept = [j for j, example in enumerate(examples) if has_target(example)] or list(range(len(examples)))
        batch = budget_batch(
            self.budget, self.model, self.vocab, [examples[j] for j in kept], [keys[j] for j in kept], decoder, task
        )
        batch.stats = replace(batch.stats, skipped_rows=len(examples) - len(kept))
        return batch


def budget_batch(budget: int, model, vocab: Vocab, examples: list[Example], keys: list[str], decoder: str,
                 task: str) -> ARCBatch:  # fmt: skip
    """`collate_batch` of the examples a micro-batch of `budget` tokens takes (batch.within_budget; 0: all of them),
    the skipped and left ones counted in `BatchStats`. A window with no example within the budget is a config error."""
    if not budget:
        return collate_batch(model, vocab, examples, keys, decoder, task)
    bos = vocab.bos_id[decoder] is not None
    sizes = [example_tokens(e, model.pooling_factor, model.n_vectors, bos) for e in examples]
    taken, over, left = within_budget(sizes, budget)
    if not taken:
        raise ValueError(
            f"data.tokens_per_micro_batch={budget}: every sample of a micro-batch is larger on its own "
            f"(sample {keys[0]}: {sizes[0]} encoder + decoder tokens); raise the budget"
        )
    batch = collate_batch(model, vocab, [examples[j] for j in taken], [keys[j] for j in taken], decoder, task)
    batch.stats = replace(batch.stats, over_budget=over, budget_full=left)
    return batch


def collate_batch(model, vocab: Vocab, examples: list[Example], keys: list[str], decoder: str, task: str) -> ARCBatch:
    """`collate` with the run's pooling settings (config.ModelConfig) and `decoder`'s special token ids."""
    return collate(
        examples,
        pooling=model.pooling,
        factor=model.pooling_factor,
        n_vectors=model.n_vectors,
        enc_pad_id=vocab.enc_pad_id,
        dec_pad_id=vocab.pad_id[decoder],
        bos_id=vocab.bos_id[decoder],
        task=task,
        decoder=decoder,
        keys=keys,
    )


def _segments(ids, offsets) -> list[list[int]]:
    ids = ids.tolist()
    return [ids[offsets[j] : offsets[j + 1]] for j in range(len(offsets) - 1)]


class TrainBatches(IterableDataset):
    """Endless batches (b, ARCBatch) of one rank from local index `start`, split across DataLoader workers."""

    def __init__(self, cfg: Config, vocab: Vocab, sources: list[Source], weights: list[float], rank: int,
                 world_size: int, start: int = 0):  # fmt: skip
        super().__init__()
        self.cfg, self.vocab, self.sources, self.weights = cfg, vocab, sources, tuple(weights)
        self.layout, self.start = layout(cfg, rank, world_size), start
        self.seed = cfg.train.seed + cfg.data.seed_offset
        self.schedule = schedule(cfg, world_size)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        maker = BatchMaker(self.cfg, self.vocab, self.sources, self.cfg.data.tokens_per_micro_batch)  # per worker
        mixer = SourceMixer(self.seed, self.weights)
        data = self.cfg.data
        streams = [
            SourceStream(self.seed, s, src.sizes, data.shuffle_buffer, data.shard_streams)
            for s, src in enumerate(self.sources)
        ]
        b = self.start + worker
        while True:
            yield b, self.batch(b, maker, mixer, streams)
            b += n_workers

    def batch(self, b: int, maker: BatchMaker, mixer: SourceMixer, streams: list[SourceStream]) -> ARCBatch:
        g = self.layout.global_batch(b)
        decoder, task = self.schedule.plan(self.seed, g)
        d = self.schedule.data_batch(g)  # g, or in fair mode the global batch every decoder reads in turn
        keys, examples = [], []
        for source, shard, i in self.picks(d, mixer, streams):
            key, example = maker.example(self.sources[source].shards[shard], i, decoder, task, self.seed, d)
            keys.append(key)
            examples.append(example)
        return maker.collate(examples, keys, decoder, task)

    def picks(self, g: int, mixer: SourceMixer, streams: list[SourceStream]) -> list[tuple[int, int, int]]:
        """(source, shard, sample index) of each sample of global micro-batch g. Global position p = g * mbs + k
        draws its source from the mixing weights (exact over positions) and takes that source's next position."""
        mbs = self.cfg.data.micro_batch_size
        out = []
        for p in range(g * mbs, (g + 1) * mbs):
            source, j = mixer.locate(p)
            out.append((source, *streams[source].locate(j)))
        return out


class TrainLoader:
    """A rank's training batches with a resumable position: `state_dict()` is {"next_batch": index}."""

    def __init__(self, dataset: TrainBatches, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.next_batch = dataset.start

    def __iter__(self):
        self.dataset.start = self.next_batch
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers else None,
        )
        for b, batch in loader:
            assert b == self.next_batch, f"loader order broke: got batch {b}, expected {self.next_batch}"
            self.next_batch = b + 1
            yield b, batch

    def global_batch(self, b: int) -> int:
        """The global micro-batch index of this rank's batch b (world-size independent, sampling.Layout)."""
        return self.dataset.layout.global_batch(b)

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])


def build_train_loader(cfg: Config, rank: int, world_size: int, vocab: Vocab | None = None) -> TrainLoader:
    """The training loader of `rank`; refuses shards whose tokenizers differ from the configured models'."""
    if cfg.data.qa:
        from arctrain.data.qa import build_qa_loader

        dataset = build_qa_loader(cfg, vocab or Vocab.from_config(cfg), schedule(cfg, world_size), rank, world_size)
        return TrainLoader(dataset, cfg.data.num_workers)
    paths = tokenizer_paths(cfg)
    sources = [open_source(path, "train", paths) for path, _ in cfg.data.sources]
    weights = [weight for _, weight in cfg.data.sources]
    dataset = TrainBatches(cfg, vocab or Vocab.from_config(cfg), sources, weights, rank, world_size)
    return TrainLoader(dataset, cfg.data.num_workers)


def val_batches(cfg: Config, decoder: str, task: str, rank: int, world_size: int, vocab: Vocab | None = None):
    """This rank's validation batches for one decoder and task (arctrain/data/val.py; the trainer keeps a `ValSet`
    for the whole run instead, which collates them once)."""
    from arctrain.data.val import ValSet

    for _, batch in ValSet(cfg, vocab or Vocab.from_config(cfg), rank, world_size).batches(decoder, task):
        yield batch
