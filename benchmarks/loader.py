"""Throughput of the training data loader alone (no model): samples/s for several worker counts.

    python benchmarks/loader.py --models artifacts/tiny --shards artifacts/shards
    python benchmarks/loader.py --models artifacts/tiny --shards artifacts/shards --batches 400 --workers 0 1 2 4

`--models` holds encoder/, llama/, mistral/ (`arctrain make-tiny-models`), `--shards` is `arc-data build` output
for them. Each run times `--batches` batches of `--micro-batch` samples after a warm-up (worker start-up and
tar indexing excluded), through arctrain.data exactly as the trainer calls it: random access into the tars,
example building and collate. The baseline is a plain sequential `webdataset.WebDataset` pass over the same
shards that decodes every member of a sample (what a non-resumable streaming reader costs), so the ratio says
what random access and collate cost on top of reading.
"""

import argparse
import time
from pathlib import Path

import webdataset as wds

from arctrain.config import load_config
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


if __name__ == "__main__":
    main()
