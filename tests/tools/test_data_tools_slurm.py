"""slurm/build_shards.sh run as SLURM runs an array job's tasks (environment of each task, one after the other):
each task builds its part, and the last one merges. A live cluster runs the same script with sbatch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from data_tools.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_task(env: dict, task: int, **extra) -> subprocess.CompletedProcess:
    task_env = {**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "1"}
    return subprocess.run(
        ["bash", str(REPO / "slurm/build_shards.sh")], env={**task_env, **extra}, capture_output=True, text=True
    )


def test_array_tasks_build_parts_and_the_last_merges(tiny_models, tmp_path):
    records = (tiny_models / "corpus.jsonl").read_text().splitlines(keepends=True)[:90]
    for k in range(3):
        (tmp_path / f"raw-{k}.jsonl").write_text("".join(records[k * 30 : (k + 1) * 30]))
    # Part 0 is one file, part 1 a glob of two.
    (tmp_path / "parts.txt").write_text(f"{tmp_path}/raw-0.jsonl\n\n{tmp_path}/raw-[12].jsonl\n")
    out = tmp_path / "shards"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "ARC_REPO": str(REPO),
        "PARTS": str(tmp_path / "parts.txt"),
        "OUT": str(out),
        "ENCODER_TOKENIZER": str(tiny_models / "encoder"),
        "DECODERS": f"llama={tiny_models / 'llama'} mistral={tiny_models / 'mistral'}",
        "BUILD_ARGS": "--segment-tokens 64 --val-fraction 0.1 --no-progress",
        "SHARD_STRIDE": "500",
    }
    missing = run_task({k: v for k, v in env.items() if k != "OUT"}, 0)
    assert missing.returncode == 2 and "OUT is not set" in missing.stderr

    first = run_task(env, 1)
    assert first.returncode == 0, first.stderr
    assert "part 1 done (1/2 parts)" in first.stdout and not (out / "manifest.json").exists()
    second = run_task(env, 0)
    assert second.returncode == 0, second.stderr
    assert "merging 2 parts" in second.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["docs"] == {"read": 90, "written": 90, "skipped": {}}
    assert [s["path"] for s in manifest["sources"]] == [str(tmp_path / f"raw-{k}.jsonl") for k in range(3)]
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000500.tar"]
    assert main(["verify", str(out)]) == 0

    beyond = run_task(env, 2)
    assert beyond.returncode == 2 and "PARTS lists only 2 parts" in beyond.stderr
