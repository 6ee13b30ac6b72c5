"""Bytes on disk per sample and per byte of text: the shard format at git revision `--before` vs this tree's.

    python benchmarks/shard_size.py --models artifacts/tiny --docs 1000 --segment-tokens 16 256

The first `--docs` documents of the models' corpus.jsonl are built by `arc-data build --workers 1` of each tree
(`--before` is extracted with `git archive`) at each `--segment-tokens` (window 4, the default). Per build: samples,
tar members per sample, tar bytes per sample and per byte of text (UTF-8), the members' own bytes (the payload,
from the tar headers), the index files' bytes, and the build's CPU seconds (one process: reading, segmenting,
tokenizing, writing).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(tree: Path, models: Path, data: Path, out: Path, segment_tokens: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "data_tools.cli",
        "build",
        "--input",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        "--segment-tokens",
        str(segment_tokens),
        "--encoder-tokenizer",
        str(models / "encoder"),
        "--decoder",
        f"llama={models / 'llama'}",
        "--decoder",
        f"mistral={models / 'mistral'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree)
    cpu = float(re.search(r"CPU ([\d.]+)s main", run.stdout).group(1))
    return {**json.loads((out / "manifest.json").read_text()), "cpu": cpu}


def measure(out: Path, manifest: dict) -> dict:
    shards = [s for e in manifest["splits"].values() for s in e["shards"]]
    members = payload = 0
    for shard in shards:
        with tarfile.open(out / shard["name"]) as tar:
            for info in tar:
                members += 1
                payload += info.size
    samples = sum(s["samples"] for s in shards)
    index = sum(s.get("index", {}).get("bytes", 0) for s in shards)
    return {
        "version": manifest["format_version"],
        "samples": samples,
        "members": members / samples,
        "tar": sum(s["bytes"] for s in shards),
        "payload": payload,
        "index": index,
        "cpu": manifest["cpu"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="encoder/, llama/, mistral/ and corpus.jsonl")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--segment-tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--before", default="db27661", help="git revision of the format to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = (args.models / "corpus.jsonl").read_text().splitlines()[: args.docs]
        (work / "in.jsonl").write_text("".join(line + "\n" for line in lines))
        text_bytes = sum(len(json.loads(line)["text"].encode()) for line in lines)
        before = work / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        print(f"{len(lines)} documents, {text_bytes / 1e6:.2f} MB of text; encoder + llama + mistral, window 4")
        for n in args.segment_tokens:
            rows = {}
            for label, tree in ((f"before ({args.before})", before), ("after", REPO)):
                out = work / f"{label[:6]}-{n}"
                rows[label] = measure(out, build(tree, args.models, work / "in.jsonl", out, n))
            for label, r in rows.items():
                print(
                    f"  --segment-tokens {n:>3} {label:>17}: format {r['version']}, {r['samples']:,} samples, "
                    f"{r['members']:.0f} members each; tar {r['tar'] / r['samples']:,.0f} B/sample "
                    f"({r['tar'] / text_bytes:.2f} B per text byte; payload {r['payload'] / r['samples']:,.0f} B), "
                    f"index {r['index'] / r['samples']:.0f} B/sample; build CPU {r['cpu']:.1f}s"
                )
            old, new = rows.values()
            print(f"  --segment-tokens {n:>3}: tars {old['tar'] / new['tar']:.2f}x smaller")


if __name__ == "__main__":
    main()
