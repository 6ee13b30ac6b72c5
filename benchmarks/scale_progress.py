"""How far a running (or stopped) `benchmarks/scale_run.py` build got, and the projection to its end.

    python benchmarks/scale_progress.py --dir /tmp/i13c/scale --corpus artifacts/tiny/corpus.jsonl [--rss FILE]

From the build's progress bar (DIR/build.log), the shards on disk (closed ones have their .idx.npy) and an RSS log
(DIR/build.rss.jsonl as scale_run.py writes it, or --rss: lines {"t", "rss_mb": {pid: [name, MB]}}).
Assumes scale_run.py's defaults: 4 files, `--gb 1`.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--dir", type=Path, required=True)
parser.add_argument("--corpus", type=Path, required=True)
parser.add_argument("--rss", type=Path)
args = parser.parse_args()
work = args.dir
corpus = [len(json.loads(line)["text"].encode()) for line in open(args.corpus)]
total_docs = 0
for f in range(4):  # scale_run.write_inputs: file f cycles the corpus from record f up to 1e9 / 4 bytes of text
    size, k = 0, 0
    while size < 1e9 / 4:
        size += corpus[(k + f) % len(corpus)]
        k += 1
    total_docs += k

bars = re.findall(
    r"(\d+)doc \[(\d+):(\d+)(?::(\d+))?, *[\d.]+doc/s, ([\d,]+) enc tok/s\]", (work / "build.log").read_text()
)


def seconds(bar) -> int:
    return int(bar[3]) + 60 * int(bar[2]) + 3600 * int(bar[1]) if bar[3] else 60 * int(bar[1]) + int(bar[2])


done, elapsed = int(bars[-1][0]), seconds(bars[-1])
print(
    f"docs {done:,} of {total_docs:,} ({done / total_docs:.1%}) in {elapsed / 60:.1f} min, {done / elapsed:.1f} docs/s"
)
recent = next(b for b in bars if seconds(b) >= elapsed - 600)
rate = (done - int(recent[0])) / max(elapsed - seconds(recent), 1)
left = total_docs - done
at_mean = left / (done / elapsed) / 60
print(f"last 10 min {rate:.1f} docs/s: {left / rate / 60:.0f} min left at that rate, {at_mean:.0f} at the mean")
tars = sorted(work.glob("shards/*.tar"))
for tar in tars:
    index = tar.with_name(tar.name.replace(".tar", ".idx.npy"))
    size, n = tar.stat().st_size, len(np.load(index)) if index.exists() else 0
    per = (
        f", {n:,} samples, {size / n:,.0f} B/sample, index {index.stat().st_size / n:.0f} B/sample" if n else " (open)"
    )
    print(f"  {tar.name}: {size / 1e6:.0f} MB{per}")
written, text = sum(t.stat().st_size for t in tars), done / total_docs * 1e9
print(f"shards so far {written / 1e9:.2f} GB for ~{text / 1e9:.3f} GB of text: {written / text:.2f} B per text byte")
rows = [json.loads(line) for line in open(args.rss or work / "build.rss.jsonl")]
pids: dict = {}
for row in rows:
    for pid, (name, rss, *_) in (row.get("rss_mb") or row["pid: (name, rss_mb, cpu_s)"]).items():
        pids.setdefault(pid, (name, []))[1].append(rss)
for pid, (name, rss) in pids.items():
    q = len(rss) // 4  # a short run has fewer than 4 samples: its quarters fall back to the first sample
    print(
        f"  pid {pid} {name[:45]:<45} RSS MB: first {rss[0]:.0f}, "
        f"2nd quarter max {max(rss[q : 2 * q], default=rss[0]):.0f}, "
        f"last quarter max {max(rss[3 * q :]):.0f}, peak {max(rss):.0f} ({len(rss)} samples)"
    )
