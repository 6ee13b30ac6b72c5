"""How mixed a global batch is: distinct documents, input files, shards and sources among its samples.

    python benchmarks/mixing.py                                   # 64 ranks x 16, two sources weighted 1:3
    python benchmarks/mixing.py --ranks 8 --micro-batch 16 --before ce048a0

No shards are read: the batch -> (source, shard, sample) mapping is a pure function (arctrain/data/sampling.py),
and a synthetic layout stands in for `arc-data build` output: per source, `--files` input files of `--docs`
documents each, a document of 1 + Poisson(2) windows (samples), all written in input order into shards of
`--shard-samples` samples (as a build writes them). For each of `--batches` global batches (steps spread over
the first epoch) the samples of every rank are located, with the current loader (`TrainBatches.picks`: a source
per sample, `data.shard_streams` interleaved lanes) and with the loader at git revision `--before` (a source per
batch, one stream per source), and counted.
"""

import argparse
import subprocess
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def layout(files: int, docs: int, shard_samples: int, seed: int):
    """(shard sizes, per source-order sample: file, document) of one synthetic source."""
    windows = 1 + np.random.default_rng(seed).poisson(2, files * docs)
    doc = np.repeat(np.arange(files * docs), windows)
    sizes = [shard_samples] * (len(doc) // shard_samples) + (
        [len(doc) % shard_samples] if len(doc) % shard_samples else []
    )
    return tuple(sizes), doc // docs, doc


def old_sampling(rev: str):
    module = types.ModuleType("old_sampling")
    exec(subprocess.check_output(["git", "-C", str(REPO), "show", f"{rev}:arctrain/data/sampling.py"]), vars(module))
    return module


def count(picks, sources, shard_samples: int) -> dict[str, int]:
    docs, files, shards, srcs = set(), set(), set(), set()
    for s, shard, i in picks:
        g = shard * shard_samples + i  # shards are full except the last: position in the source's sample order
        _, file_of, doc_of = sources[s]
        docs.add((s, int(doc_of[g])))
        files.add((s, int(file_of[g])))
        shards.add((s, shard))
        srcs.add(s)
    return {"docs": len(docs), "files": len(files), "shards": len(shards), "sources": len(srcs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--shard-samples", type=int, default=25000, help="about a 256 MB shard of 4 x 256 tokens")
    parser.add_argument("--shuffle-buffer", type=int, default=10000)
    parser.add_argument("--shard-streams", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--before", default="ce048a0")
    args = parser.parse_args()

    from arctrain.data.loader import TrainBatches
    from arctrain.data.sampling import Layout, SourceMixer, SourceStream

    sources = [layout(args.files, args.docs, args.shard_samples, seed) for seed in range(len(args.weights))]
    n_min = min(sum(s[0]) for s in sources)
    steps = np.linspace(0, n_min // (args.ranks * args.micro_batch) // 2, args.batches).astype(int)
    mbs, seed = args.micro_batch, 0
    old = old_sampling(args.before)
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(micro_batch_size=mbs))
    loaders = {}
    for name in ("before", "after"):
        per_rank = []
        for r in range(args.ranks):
            if name == "before":
                mixer = old.SourceMixer(seed, tuple(args.weights))
                streams = [
                    old.RankStream(seed, s, src[0], r, args.ranks, args.shuffle_buffer) for s, src in enumerate(sources)
                ]

                def picks(b, mixer=mixer, streams=streams):
                    s, earlier = mixer.locate(b)
                    return [(s, *streams[s].locate(j)) for j in range(earlier * mbs, (earlier + 1) * mbs)]
            else:
                mixer = SourceMixer(seed, tuple(args.weights))
                streams = [
                    SourceStream(seed, s, src[0], args.shuffle_buffer, args.shard_streams)
                    for s, src in enumerate(sources)
                ]

                def picks(b, mixer=mixer, streams=streams, r=r):  # rank r's batch b: a global micro-batch
                    g = Layout(r, args.ranks).global_batch(b)
                    return TrainBatches.picks(types.SimpleNamespace(cfg=cfg), g, mixer, streams)

            per_rank.append(picks)
        loaders[name] = per_rank
    print(
        f"{args.ranks} ranks x {mbs} = {args.ranks * mbs} samples per global batch; sources weighted {args.weights}, "
        f"each {args.files} files x {args.docs} docs in {len(sources[0][0])} shards of {args.shard_samples}; "
        f"shuffle_buffer {args.shuffle_buffer}, shard_streams {args.shard_streams}; {args.batches} batches"
    )
    for name, per_rank in loaders.items():
        counts = [count([p for picks in per_rank for p in picks(int(b))], sources, args.shard_samples) for b in steps]
        means = {k: np.mean([c[k] for c in counts]) for k in counts[0]}
        mins = {k: min(c[k] for c in counts) for k in counts[0]}
        shown = ", ".join(f"{k} {means[k]:.1f} (min {mins[k]})" for k in means)
        print(f"{name + (' (' + args.before + ')' if name == 'before' else ''):>18}: per global batch {shown}")


if __name__ == "__main__":
    main()
