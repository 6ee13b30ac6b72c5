"""Every script in benchmarks/ runs end to end at tiny sizes (a smoke test: the numbers are not checked here).

The test is parametrized over the directory listing, so a new benchmark without an entry in SMOKE fails until it
gets one. The sizes are the smallest each script accepts; the scripts' docstrings give the real commands.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def _run(script: str, args: list[str], timeout: int = 300) -> str:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def scale_dir(tiny_models, tmp_path_factory) -> Path:
    """The work directory of a tiny scale_run.py (its build log and memory samples feed scale_progress.py)."""
    work = tmp_path_factory.mktemp("scale")
    _run(
        "scale_run.py",
        [
            "--models",
            tiny_models,
            "--gb",
            "0.003",
            "--files",
            1,
            "--workers",
            1,
            "--steps",
            2,
            "--nproc",
            1,
            "--dir",
            work,
        ],
        timeout=600,
    )
    return work


def _corpus_head(tiny_models: Path, out: Path, n: int = 6) -> Path:
    lines = (tiny_models / "corpus.jsonl").read_text().splitlines()[:n]
    out.write_text("\n".join(lines) + "\n")
    return out


# script -> (its arguments, text its output must hold); {name} is a fixture (or tmp_path, or docs: a few documents)
SMOKE = {
    "context_use.py": ("--models {tiny_models} --texts 4 --steps 2 --factors 4", "verbatim"),
    "learning.py": (
        "--model {tiny_models}/llama --enc-layers 1 --steps 2 --eval-every 1 --val-segments 4 --batch 2 "
        "--projector-hidden 128 --out {tmp_path}/curve.json",
        "ratio",
    ),
    "loader.py": ("--models {tiny_models} --shards {tiny_shards} --batches 3 --micro-batch 2 --workers 0", "samples/s"),
    "loader_memory.py": ("--shards 2 --per-shard 20", "format 3"),
    "memory_estimate.py": ("--gpus 8", "total"),
    "mixing.py": (
        "--ranks 2 --micro-batch 2 --files 2 --docs 40 --shard-samples 20 --shuffle-buffer 10 --shard-streams 2 "
        "--batches 2",
        "per global batch docs",
    ),
    "multi_decoder.py": (
        "--run shared --smollm2 {smollm2} --gemma {gemma3} --steps 1 --eval-every 1 --val-segments 2 --batch 2 "
        "--enc-layers 1 --gemma-init aligned --align-segments 8 --out {tmp_path}/curve.json",
        '"ratio"',
    ),
    "packing.py": ("--models {tiny_models} --batches 3 --baseline=", "pretraining"),  # timing: test_packing_benchmark
    "prefill.py": ("--lengths 256 --factors 4 --repeats 1 --threads 1", "x4"),
    "scale_progress.py": ("--dir {scale_dir} --corpus {tiny_models}/corpus.jsonl", "docs/s"),
    "scale_run.py": (None, None),  # run once by the scale_dir fixture, whose output scale_progress.py reads
    "shard_build.py": ("--models {tiny_models} --mb 0.02 --repeats 1", "workers"),
    "shard_size.py": ("--models {tiny_models} --docs 10 --segment-tokens 16", "smaller"),
    "store_quality.py": (
        "--model {exported} --decoder {tiny_models}/llama --input {docs} --segments 4 --dtypes int8 "
        "--speed-vectors 1000 --threads 1",
        "one document's vectors read",
    ),
    "train_step.py": ("--models {tiny_models} --shards {tiny_shards} --steps 10 --workers 0", "data-wait"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_at_tiny_size(script, request, tmp_path):
    assert script in SMOKE, f"benchmarks/{script} has no smoke configuration in tests/scripts/test_benchmarks.py SMOKE"
    args, expect = SMOKE[script]
    if args is None:
        request.getfixturevalue("scale_dir")
        return
    values = {"tmp_path": tmp_path}
    for name in re.findall(r"\{(\w+)\}", args):
        if name == "docs":
            values[name] = _corpus_head(request.getfixturevalue("tiny_models"), tmp_path / "docs.jsonl")
        elif name not in values:
            values[name] = request.getfixturevalue(name)
    out = _run(script, args.format(**values).split())
    assert expect in out, f"benchmarks/{script}: no {expect!r} in its output:\n{out[-2000:]}"


def test_scale_run_leaves_what_scale_progress_reads(scale_dir):
    assert "enc tok/s" in (scale_dir / "build.log").read_text()
    rows = [json.loads(line) for line in (scale_dir / "build.rss.jsonl").read_text().splitlines()]
    assert rows and all("s" in row for row in rows)  # seconds since the start, per sample
