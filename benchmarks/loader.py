"""Throughput of the training data loader alone (no model): samples/s for several worker counts.

    python benchmarks/loader.py --models artifacts/tiny --shards artifacts/shards
    python benchmarks/loader.py --models artifacts/tiny --shards artifacts/shards --batches 400 --workers 0 1 2 4

`--models` holds encoder/, llama/, mistral/ (`arctrain make-tiny-models`), `--shards` is `arc-data build` output
for them. Each run times `--batches` batches of `--micro-batch` samples after a warm-up (worker start-up and
tar indexing excluded), through arctrain.data exactly as the trainer calls it: random access into the tars,
example building and collate. The baseline is a plain sequential `webdataset.WebDataset` pass over the same
shards that decodes every member of a sample (what a non-resumable streaming reader costs), so the ratio says
what random access and collate cost on top of reading.

Then the cost of taking one ready batch from a loader worker (the trainer's data wait when the worker is ahead):
a real batch sent as an `ARCBatch` (CPU tensors travel as numpy bytes, see ARCBatch.__getstate__) vs the same
tensors in a plain dict (torch's default: a shared-memory segment per tensor), rounds interleaved.
"""

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from arctrain.config.load import load_config
from arctrain.data import Vocab, build_train_loader


def loader_rate(cfg, vocab: Vocab, batches: int, warmup: int) -> float:
    it = iter(build_train_loader(cfg, rank=0, world_size=1, vocab=vocab))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.data.micro_batch_size / (time.perf_counter() - start)


def webdataset_rate(shards: Path, samples: int) -> float:
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    start, n = time.perf_counter(), 0
    while n < samples:  # the pass repeats if the split is smaller than the sample count
        for _ in dataset:
            n += 1
            if n == samples:
                break
    return samples / (time.perf_counter() - start)


class _Repeat(IterableDataset):
    def __init__(self, item):
        self.item = item

    def __iter__(self):
        while True:
            yield self.item


def receive_ms(item, gets: int, gap_s: float = 0.005) -> float:
    """Mean time of `next()` on a 1-worker DataLoader that is ahead (the main process pauses `gap_s` between gets)."""
    it = iter(DataLoader(_Repeat(item), batch_size=None, num_workers=1, prefetch_factor=4))
    for _ in range(20):
        next(it)
    total = 0.0
    for _ in range(gets):
        time.sleep(gap_s)
        start = time.perf_counter()
        next(it)
        total += time.perf_counter() - start
    return 1e3 * total / gets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    overrides = [
        f"model.encoder_path={args.models / 'encoder'}",
        *(f"decoders.{i}.name={n}" for i, n in enumerate(("llama", "mistral"))),
        *(f"decoders.{i}.path={args.models / n}" for i, n in enumerate(("llama", "mistral"))),
        f"data.shards={args.shards}",
        f"data.micro_batch_size={args.micro_batch}",
        "train.precision=fp32",
        "deepspeed=ds_configs/zero3_cpu.json",
    ]
    cfg = load_config(None, overrides)
    vocab = Vocab.from_config(cfg)
    base = webdataset_rate(args.shards, args.batches * args.micro_batch)
    print(f"plain webdataset, sequential, all members decoded: {base:9.0f} samples/s")
    print(f"{'workers':>7} {'samples/s':>10} {'vs 0 workers':>13} {'vs webdataset':>14}")
    first = None
    for workers in args.workers:
        cfg.data.num_workers = workers
        rate = loader_rate(cfg, vocab, args.batches, warmup=max(workers, 1) * 2)
        first = first or rate
        print(f"{workers:>7} {rate:>10.0f} {rate / first:>12.2f}x {rate / base:>13.2f}x")

    cfg.data.num_workers = 0
    _, batch = next(iter(build_train_loader(cfg, rank=0, world_size=1, vocab=vocab)))
    as_dict = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    rounds = {"ARCBatch (numpy bytes)": [], "dict of tensors (shared memory)": []}
    for _ in range(3):
        rounds["ARCBatch (numpy bytes)"].append(receive_ms(batch, 200))
        rounds["dict of tensors (shared memory)"].append(receive_ms(as_dict, 200))
    print(f"taking one ready batch of {args.micro_batch} samples from a worker, ms (median of 3 rounds of 200):")
    medians = {name: statistics.median(ms) for name, ms in rounds.items()}
    for name, ms in medians.items():
        print(f"  {name:32} {ms:6.2f}  rounds {', '.join(f'{m:.2f}' for m in rounds[name])}")
    ratio = medians["dict of tensors (shared memory)"] / medians["ARCBatch (numpy bytes)"]
    print(f"  shared memory / numpy bytes: {ratio:.1f}x")


if __name__ == "__main__":
    main()
