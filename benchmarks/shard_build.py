"""Shard building throughput: the tokenizers on their own vs `arc-data build` with 1 and 2 workers.

    python benchmarks/shard_build.py --models artifacts/tiny --mb 10 --repeats 2 [--segment-tokens 16]

On the same documents and tokenizers (encoder + every decoder), in one run:
  (a) each tokenizer's own `encode_batch` over the documents (batches of 256, no special tokens), timed around the
      calls only and summed over tokenizers; single-threaded (TOKENIZERS_PARALLELISM=false), as a build worker is;
  (b) `arc-data build --workers 1`, (c) `--workers 2`: the wall time of the whole command (interpreter start,
      tokenizer loading, reading, segmentation, writing tars and sha256 included), and its CPU time.
Targets: throughput (b)/(a) = time(a)/time(b) >= 0.8 and (c)/(b) = time(b)/time(c) >= 1.6. Each measurement is
the best of --repeats (the machine may be shared). For calibration, (a) is also run in 2 processes (half of the
documents each): the speed-up the machine itself gives 2 processes bounds what (c)/(b) can show.
Without --models, tiny models are made in a temporary dir.
"""

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_docs(corpus: Path, mb: float, out: Path) -> list[str]:
    """The corpus repeated (with fresh ids) up to `mb` megabytes of text, written as jsonl."""
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    texts, size, k = [], 0, 0
    with open(out, "w") as fh:
        while size < mb * 1e6:
            record = records[k % len(records)]
            fh.write(json.dumps({"id": f"{record['id']}#{k}", "text": record["text"]}) + "\n")
            texts.append(record["text"])
            size += len(record["text"].encode())
            k += 1
    return texts


def time_tokenizers(paths: dict[str, Path], texts: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of encode_batch over `texts`, summed over the tokenizers."""
    from transformers import AutoTokenizer

    wall = cpu = 0.0
    for name, path in paths.items():
        backend = AutoTokenizer.from_pretrained(path).backend_tokenizer
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(texts), 256):
            backend.encode_batch(texts[i : i + 256], add_special_tokens=False)
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        print(f"  (a) {name}: {time.perf_counter() - start:.2f}s")
    return wall, cpu


def _encode_half(paths: dict[str, Path], texts: list[str], barrier, queue) -> None:
    from transformers import AutoTokenizer

    backends = [AutoTokenizer.from_pretrained(path).backend_tokenizer for path in paths.values()]
    barrier.wait()  # both processes start encoding together
    start = time.time()
    for backend in backends:
        for i in range(0, len(texts), 256):
            backend.encode_batch(texts[i : i + 256], add_special_tokens=False)
    queue.put((start, time.time()))


def time_tokenizers_parallel(paths: dict[str, Path], texts: list[str], n: int = 2) -> float:
    """(a) split over n processes: what the machine itself allows (n cores, memory bandwidth, other load)."""
    context = mp.get_context("spawn")
    barrier, queue = context.Barrier(n), context.Queue()
    procs = [context.Process(target=_encode_half, args=(paths, texts[k::n], barrier, queue)) for k in range(n)]
    for proc in procs:
        proc.start()
    spans = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return max(end for _, end in spans) - min(start for start, _ in spans)


def time_build(
    paths: dict[str, Path], data: Path, out: Path, workers: int, segment_tokens: int | None
) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the command and its worker processes, its summary line)."""
    decoders = [a for name, p in paths.items() if name != "encoder" for a in ("--decoder", f"{name}={p}")]
    cmd = [
        shutil.which("arc-data") or "arc-data",
        "build",
        "--input",
        str(data),
        "--out",
        str(out),
        "--overwrite",
        "--encoder-tokenizer",
        str(paths["encoder"]),
        *decoders,
        "--workers",
        str(workers),
        "--no-progress",
    ]
    if segment_tokens is not None:
        cmd += ["--segment-tokens", str(segment_tokens)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"build failed: {run.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"  {run.stdout.strip()}")
    return wall, cpu, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, help="dir with encoder/, llama/, mistral/, corpus.jsonl")
    parser.add_argument("--mb", type=float, default=10.0, help="megabytes of text")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--segment-tokens", type=int, help="passed to both builds (default: arc-data's)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="arc-shard-bench-"))
    models = args.models
    if models is None:
        from arctrain.testing.tiny_models import make_tiny_models

        models = work / "tiny"
        make_tiny_models(models, pretrain_steps=0, log=lambda *_: None)
    paths = {name: models / name for name in ("encoder", "llama", "mistral")}
    texts = make_docs(models / "corpus.jsonl", args.mb, work / "docs.jsonl")
    n_chars = sum(len(t) for t in texts)
    print(
        f"{len(texts)} documents, {n_chars / 1e6:.1f}M characters; segment tokens {args.segment_tokens or 'default'}; "
        f"tokenizers {', '.join(paths)}; cpus {os.cpu_count()}"
    )

    results = {"a": [], "a2": [], "b": [], "c": []}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}")
        results["a"].append(time_tokenizers(paths, texts))
        print(f"  (a) all tokenizers: {results['a'][-1][0]:.2f}s wall, {results['a'][-1][1]:.2f}s CPU")
        results["a2"].append(time_tokenizers_parallel(paths, texts))
        print(f"  (a) in 2 processes, half the documents each: {results['a2'][-1]:.2f}s wall")
        for key, workers in (("b", 1), ("c", 2)):
            wall, cpu, summary = time_build(
                paths, work / "docs.jsonl", work / f"out-{workers}", workers, args.segment_tokens
            )
            results[key].append((wall, cpu, summary))
            print(f"  ({key}) --workers {workers}: {wall:.2f}s wall, {cpu:.2f}s CPU")
    # The fixed cost of a build (interpreter, imports, loading tokenizers): a build of one short document.
    (work / "one.jsonl").write_text(json.dumps({"id": "one", "text": texts[0][:1000]}) + "\n")
    start_wall, start_cpu, _ = min(
        time_build(paths, work / "one.jsonl", work / "out-one", 1, args.segment_tokens) for _ in range(args.repeats)
    )
    # Best of the repeats, wall and CPU each on its own: the least disturbed measurement of each.
    a, b, c = ((min(r[0] for r in results[k]), min(r[1] for r in results[k])) for k in "abc")
    c_out = min(results["c"], key=lambda r: r[1])[2]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; best of {args.repeats}:")
    for key, (wall, cpu) in zip("abc", (a, b, c)):
        print(f"  ({key}) {wall:.2f}s wall, {cpu:.2f}s CPU")
    print(f"  fixed cost of a build: {start_wall:.2f}s wall {start_cpu:.2f}s CPU")
    print(
        f"(b)/(a) throughput = {a[0] / b[0]:.2f} wall, {a[1] / b[1]:.2f} CPU, {a[1] / (b[1] - start_cpu):.2f} CPU "
        "without the fixed cost (target >= 0.8)"
    )
    a2 = min(results["a2"])
    print(
        f"(c)/(b) throughput = {b[0] / c[0]:.2f} wall (target >= 1.6); the tokenizers' own 2-process speed-up "
        f"on this machine now: {a[0] / a2:.2f}"
    )
    # On a shared machine wall times move with other people's load; CPU times much less. With 2 cores to itself,
    # (c) could at best take max(its CPU / 2, its main process's CPU, one worker's CPU) (workers share evenly).
    main_c, workers_c = (float(x) for x in re.search(r"CPU ([\d.]+)s main \+ ([\d.]+)s workers", c_out).groups())
    bound = b[1] / max(c[1] / 2, main_c, workers_c / 2)
    print(
        f"  (c) CPU: {main_c:.1f}s main process + {workers_c:.1f}s workers; (c)/(b) bound on 2 idle cores: {bound:.2f}"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
