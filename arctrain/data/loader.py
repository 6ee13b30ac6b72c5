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

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from arctrain.config.schema import Config
from arctrain.data.batch import ARCBatch
from arctrain.data.batching import BatchMaker, Vocab, tokenizer_paths
from arctrain.data.qa import build_qa_loader
from arctrain.data.sampling import Layout, Schedule, SourceMixer, SourceStream
from arctrain.data.shards import Source, open_source
from arctrain.data.val import ValSet


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


class TrainBatches(IterableDataset):
    """Endless batches (b, ARCBatch) of one rank from local index `start`, split across DataLoader workers."""

    def __init__(
        self,
        cfg: Config,
        vocab: Vocab,
        sources: list[Source],
        weights: list[float],
        rank: int,
        world_size: int,
        start: int = 0,
    ):
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
    if cfg.data.qa.train:
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

    for _, batch in ValSet(cfg, vocab or Vocab.from_config(cfg), rank, world_size).batches(decoder, task):
        yield batch
