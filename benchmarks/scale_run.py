"""The data pipeline at size: build shards from GBs of jsonl.zst with 2 workers, then train on them.

    python benchmarks/scale_run.py --models artifacts/tiny --gb 1 --steps 300        # the full run
    python benchmarks/scale_run.py --models artifacts/tiny --gb 0.03 --steps 200     # a shared 2-core box

1. `--files` .jsonl.zst files of synthetic text (the models' corpus repeated; ids 0..N in every file, so the
   default `--id-scope file` keeps them apart) adding up to `--gb` GB of text.
2. `arc-data build --workers W`: wall time, encoder tokens/s and characters/s against the tokenizers' own rate
   (benchmarks/shard_build.py (a): every tokenizer's encode_batch, single-threaded, on the first 10 MB of the same
   text), and the resident memory of every process of the build, sampled each 0.5 s with psutil.
3. `torchrun --nproc_per_node N -m arctrain train` (configs/tiny_cpu.yaml, the shards of 2.) for `--steps` steps,
   evaluation included: the memory of every rank and loader worker over the run.
A process's memory is bounded when its RSS in the last quarter of the run is not above its RSS in the second
quarter by more than noise; both are printed per process, with the peak.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zstandard

REPO = Path(__file__).resolve().parents[1]


def write_inputs(corpus: Path, out: Path, gb: float, files: int) -> tuple[list[Path], list[str]]:
    """`files` .jsonl.zst files of `gb` GB of text in all; returns them and the first 10 MB of texts."""
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    per_file, sample, sample_bytes, paths = gb * 1e9 / files, [], 0, []
    for f in range(files):
        path = out / f"part-{f:03d}.jsonl.zst"
        with open(path, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as zst:
            size, k = 0, 0
            while size < per_file:
                text = records[(k + f) % len(records)]["text"]
                zst.write((json.dumps({"id": k, "text": text}) + "\n").encode())
                size += len(text.encode())
                if sample_bytes < 10e6:
                    sample.append(text)
                    sample_bytes += len(text.encode())
                k += 1
        paths.append(path)
    return paths, sample


def monitored(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, dict, str]:
    """Run `cmd`, sampling the RSS (MB) of it and every descendant each 0.5 s: (seconds, {pid: (name, [rss])}, out).
    Its output goes to `log`, and every 20th sample of every process to `log` with suffix .rss.jsonl (with its CPU
    seconds), so a run stopped before the end still shows how far it got and what it used."""
    start = time.time()
    out = open(log, "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    root, series, k = psutil.Process(proc.pid), {}, 0
    with open(log.with_suffix(".rss.jsonl"), "w") as rss_log:
        while proc.poll() is None:
            row = {}
            try:
                for p in [root, *root.children(recursive=True)]:
                    name = " ".join(p.cmdline()[1:4])[:60]
                    series.setdefault(p.pid, (name, []))[1].append(p.memory_info().rss / 2**20)
                    row[p.pid] = (name, round(series[p.pid][1][-1]), round(sum(p.cpu_times()[:2]), 1))
            except psutil.Error:
                pass
            if k % 20 == 0:
                rss_log.write(json.dumps({"s": round(time.time() - start), "pid: (name, rss_mb, cpu_s)": row}) + "\n")
                rss_log.flush()
            k += 1
            time.sleep(0.5)
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{text[-3000:]}")
    return time.time() - start, series, text


def memory_report(series: dict) -> list[str]:
    lines = []
    for pid, (name, rss) in sorted(series.items()):
        if len(rss) < 8:
            continue  # a helper that lived for a few seconds
        q = len(rss) // 4
        second, last = max(rss[q : 2 * q]), max(rss[3 * q :])
        lines.append(f"  pid {pid:>7} {name:<60} peak {max(rss):7.0f} MB; 2nd quarter {second:7.0f}, last {last:7.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="encoder/, llama/, mistral/ and corpus.jsonl")
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from shard_build import time_tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        (work / "raw").mkdir(parents=True, exist_ok=True)
        inputs, sample = write_inputs(args.models / "corpus.jsonl", work / "raw", args.gb, args.files)
        compressed = sum(p.stat().st_size for p in inputs) / 1e6
        print(f"{args.gb} GB of text in {args.files} .jsonl.zst files ({compressed:.1f} MB compressed)")
        names = ("encoder", "llama", "mistral")
        wall, _ = time_tokenizers({n: args.models / n for n in names}, sample)
        own_rate = sum(map(len, sample)) / wall
        print(f"tokenizers' own rate (all three, one process): {own_rate / 1e6:.2f}M chars/s")

        shards = work / "shards"
        build = [
            sys.executable,
            "-m",
            "data_tools.cli",
            "build",
            *[a for p in inputs for a in ("--input", str(p))],
            "--out",
            str(shards),
            "--overwrite",
            "--workers",
            str(args.workers),
            "--segment-tokens",
            "16",
            "--encoder-tokenizer",
            str(args.models / "encoder"),
            "--decoder",
            f"llama={args.models / 'llama'}",
            "--decoder",
            f"mistral={args.models / 'mistral'}",
        ]
        seconds, series, out = monitored(build, work / "build.log")  # its progress bar: how far it got
        summary = next(line for line in out.splitlines() if line.startswith("arc-data build:"))
        print(summary)
        manifest = json.loads((shards / "manifest.json").read_text())
        entries = [s for e in manifest["splits"].values() for s in e["shards"]]
        n, tar_bytes = sum(s["samples"] for s in entries), sum(s["bytes"] for s in entries)
        index_bytes = sum(s["index"]["bytes"] for s in entries)
        print(
            f"shards (format {manifest['format_version']}): {tar_bytes / 1e9:.2f} GB of tars + "
            f"{index_bytes / 1e6:.0f} MB of indexes for {n:,} samples: {tar_bytes / n:,.0f} bytes per sample, "
            f"{tar_bytes / (args.gb * 1e9):.2f} bytes per byte of text"
        )
        rate = args.gb * 1e9 / seconds
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
        print(
            f"build: {seconds:.0f}s, {rate / 1e6:.2f}M chars/s = {rate / own_rate:.2f}x the tokenizers' own rate "
            f"in one process ({args.workers} workers; {load})"
        )
        print("\n".join(memory_report(series)))

        run_dir = work / "run"
        train = [
            "torchrun",
            "--nproc_per_node",
            str(args.nproc),
            "-m",
            "arctrain",
            "train",
            "--config",
            str(REPO / "configs/tiny_cpu.yaml"),
            f"model.encoder_path={args.models / 'encoder'}",
            f"decoders.0.path={args.models / 'llama'}",
            f"decoders.1.path={args.models / 'mistral'}",
            f"data.shards={shards}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={args.steps}",
            f"checkpoint.interval={args.steps}",
            f"eval.interval={max(args.steps // 4, 1)}",
            "logging.wandb_mode=disabled",
            "data.num_workers=2",
        ]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        seconds, series, out = monitored(train, work / "train.log", env)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [m["train/loss"] for m in metrics if "train/loss" in m]
        waits = [m["data_wait_fraction"] for m in metrics if "data_wait_fraction" in m]
        print(
            f"train: {args.steps} steps on {args.nproc} ranks in {seconds:.0f}s; train/loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}; data wait fraction mean {sum(waits) / len(waits):.3f}"
        )
        print("\n".join(memory_report(series)))
        for m in metrics:
            val = {k[4:]: round(v, 3) for k, v in m.items() if re.match(r"val/", k)}
            if val:
                print(f"  val at step {m['step']}: {val}")


if __name__ == "__main__":
    main()
