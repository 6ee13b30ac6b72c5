"""Memory of one loader worker's shard reader as it touches many samples: before and after the shard index.

    python benchmarks/loader_memory.py                          # 1M samples in 1,000 shards of 1,000
    python benchmarks/loader_memory.py --shards 200 --before ce048a0

One synthetic shard of `--per-shard` samples (a real sample's metadata, ids and offsets for an encoder and two
decoders, 200 tokens each in 4 segments) is written per format with arc-data's own SplitWriter, which also writes
its index; it is hard-linked `--shards` times so the directory holds many distinct shards on little disk. Each
reader runs in a fresh process (as a DataLoader worker is) and reads every sample of every shard once, in order, by
(shard, index), the encoder's and one decoder's ids and offsets as the loader does, printing its resident set size
(RSS, /proc/self/statm) and read rate as it goes:

- `before`: arctrain/data/shards.py's ShardReader at git revision `--before` (a Python dict of member offsets
  per sample, for every shard ever touched) on format-2 shards;
- `index`: the current ShardReader on format-2 shards (json + .npy members, index .npy per shard, bounded LRU);
- `tar`: the current ShardReader on the same shards without their index (format 1: each shard indexed from its
  tar headers on first use, same bounded LRU);
- `packed`: the current ShardReader on format-3 shards (one .mp member per sample, index .npy per shard).
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NAMES = ("encoder", "llama", "mistral")


def write_template(out: Path, per_shard: int, version: int) -> Path:
    from data_tools.sample_format import MEMBER, members_v2, pack
    from data_tools.samples import Sample
    from data_tools.shards import SplitWriter

    out.mkdir(parents=True)
    writer = SplitWriter(out, "train", 1 << 40, 0, list(NAMES))
    rng = np.random.default_rng(0)
    offsets = np.array([0, 50, 100, 150, 200], dtype=np.int64)
    for i in range(per_shard):
        meta = {
            "doc_id": str(i),
            "source": "data/part-000.jsonl.zst",
            "window": 0,
            "n_segments": 4,
            "char_spans": [[0, 250], [250, 500], [500, 750], [750, 1000]],
        }
        tokens = {name: (rng.integers(0, 30000, 200, dtype=np.uint16), offsets) for name in NAMES}
        members = {MEMBER: pack(meta, tokens)} if version == 3 else members_v2(meta, tokens)
        writer.write(Sample({"__key__": f"{i:016x}-00000", **members}, (200, 200, 200)))
    writer.close()
    return out / "train-000000.tar"


def make_shards(root: Path, shards: int, per_shard: int, version: int) -> list[str]:
    template = write_template(root / "template", per_shard, version)
    paths = []
    for s in range(shards):
        path = root / f"train-{s:06d}.tar"
        os.link(template, path)
        os.link(template.with_name("train-000000.idx.npy"), path.with_name(f"train-{s:06d}.idx.npy"))
        paths.append(str(path))
    return paths


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_reader(mode: str, paths: list[str], per_shard: int, before: str) -> None:
    """In this process: touch every sample, print one JSON line per checkpoint."""
    import arctrain.data  # noqa: F401  (what a loader worker has imported, the same for every mode)

    if mode == "before":
        # The old reader imports the tokenizer hash from where it lived then (arctrain/, now data_tools/).
        sys.modules.setdefault("arctrain.tokenizer_id", importlib.import_module("data_tools.tokenizer_id"))
        module = types.ModuleType("old_shards")
        exec(
            subprocess.check_output(["git", "-C", str(REPO), "show", f"{before}:arctrain/data/shards.py"]), vars(module)
        )
        reader = module.ShardReader(dict.fromkeys(paths, per_shard))
    else:
        from arctrain.data.shards import ShardReader

        with_index = mode in ("index", "packed")
        reader = ShardReader({p: (per_shard, p.replace(".tar", ".idx.npy") if with_index else None) for p in paths})
    suffixes = ["encoder.ids.npy", "encoder.offsets.npy", "llama.ids.npy", "llama.offsets.npy"]
    marks = {int(len(paths) * per_shard * f) for f in (0.1, 0.25, 0.5, 1.0)}
    n, start = 0, time.perf_counter()
    print(json.dumps({"samples": 0, "rss_mb": round(rss_mb(), 1)}), flush=True)
    for path in paths:
        for i in range(per_shard):
            reader.read(path, i, suffixes)
            n += 1
            if n in marks:
                rate = n / (time.perf_counter() - start)
                print(
                    json.dumps({"samples": n, "rss_mb": round(rss_mb(), 1), "samples_per_s": round(rate)}), flush=True
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--before", default="ce048a0", help="git revision of the reader to compare with")
    parser.add_argument("--modes", nargs="+", default=["before", "index", "tar", "packed"])
    parser.add_argument("--_reader", help=argparse.SUPPRESS)
    parser.add_argument("--_root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._reader:
        paths = sorted(str(p) for p in Path(args._root).glob("train-*.tar"))
        run_reader(args._reader, paths, args.per_shard, args.before)
        return
    with tempfile.TemporaryDirectory() as tmp:
        roots = {v: Path(tmp) / f"v{v}" for v in (2, 3)}
        for version, root in roots.items():
            make_shards(root, args.shards, args.per_shard, version)
        label = {
            "before": f"before ({args.before}), format 2",
            "index": "format 2, index files",
            "tar": "format 2, no index files",
            "packed": "format 3, index files",
        }
        print(f"{args.shards} shards x {args.per_shard} samples, one fresh process per reader")
        for mode in args.modes:
            root = roots[3 if mode == "packed" else 2]
            cmd = [
                sys.executable,
                __file__,
                "--_reader",
                mode,
                "--_root",
                str(root),
                "--per-shard",
                str(args.per_shard),
                "--before",
                args.before,
            ]
            lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
            points = [json.loads(line) for line in lines]
            shown = ", ".join(f"{p['samples']:,}: +{p['rss_mb'] - points[0]['rss_mb']:.0f}" for p in points[1:])
            print(
                f"{label[mode]:>30}: RSS {points[0]['rss_mb']:.0f} MB after imports; growth (MB) after {shown} "
                f"samples ({points[-1].get('samples_per_s', 0):,} samples/s)"
            )


if __name__ == "__main__":
    main()
