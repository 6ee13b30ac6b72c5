"""scripts/gpu_check.sh --tiny --wheels DIR: every step the GPU check runs on an air-gapped node (an install from a
wheel folder with no index, models of the check's architectures with random weights, shards, dry run, a ZeRO-3 run
with replicated and one with partitioned frozen decoders, the report, export, generation), at tiny size on CPU; and
scripts/gpu_wheels.txt: the versions that travel are the ones tested here."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def cached_wheel(name: str) -> Path | None:
    """A wheel of `name` in pip's cache (pip builds one from a source-only package and keeps it), or None."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "--format=abspath", name], capture_output=True, text=True
    ).stdout.split()
    return Path(out[-1]) if out else None


@pytest.mark.distributed
def test_gpu_check_runs_end_to_end_at_tiny_size(tiny_models, tmp_path):
    """The wheel folder holds what pip's cache has (deepspeed's wheel, built from PyPI's source release: the one wheel
    scripts/gpu_wheels.sh builds rather than downloads); with PIP_NO_INDEX pip could not fetch anything else."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    deepspeed = cached_wheel("deepspeed")
    if deepspeed is not None:
        shutil.copy(deepspeed, wheels)
    env = {
        **os.environ,
        "WORK": str(tmp_path / "work"),
        "REPORT": str(tmp_path / "report"),
        "TOKENIZERS": str(tiny_models),
        "STEPS": "6",
        "LOG_EVERY": "2",
        "PIP_NO_INDEX": "1",
        "PYTHON": sys.executable,
    }
    cmd = ["bash", str(REPO / "scripts/gpu_check.sh"), "--tiny", "--wheels", str(wheels)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]

    site = tmp_path / "work" / "site"
    assert re.search(rf"import arctrain.train.loop +0\.1\.0 +from wheels: {site}/arctrain", out), out[:3000]
    if deepspeed is not None:
        assert re.search(rf"import deepspeed +\S+ +from wheels: {site}/deepspeed", out), out[:3000]
    for line in (
        "attention kernel: per-sequence scaled_dot_product_attention (CPU)",
        "dry run: every check passed",
        "frozen decoders: replicated (as configured)",
        "frozen decoders: partitioned by ZeRO-3 (as configured)",
        "NCCL across ranks: not tested",
    ):
        assert line in out, line

    report = (tmp_path / "report" / "report.txt").read_text().splitlines()
    assert report[0].startswith("GPU check: CPU (--tiny), 1 rank(s)")
    rows = {line.split()[0]: line.split() for line in report[2:4]}
    assert sorted(rows) == ["partitioned", "replicated"]
    for row in rows.values():
        assert row[1] == "6" and float(row[2]) > 0 and float(row[4]) >= 0 and row[5] == "n/a"  # no MFU on a CPU
        assert row[-1] == "0"  # ZeRO-3 trace invalidations after warm-up (docs/benchmarks.md)
    # The same steps on the same data: where the frozen weights live changes no loss.
    assert rows["replicated"][7:10] == rows["partitioned"][7:10], report
    generated = (tmp_path / "report" / "generate.txt").read_text().splitlines()
    assert len(generated) == 1 and generated[0][len("generated: ") :].strip()
    assert (tmp_path / "work" / "export" / "model.safetensors").is_file()
    for name in ("gpu_check.log", "dry_run.txt", "train_replicated.log", "train_partitioned.log"):
        assert (tmp_path / "report" / name).is_file(), name
    for name, arch in [
        ("encoder", "LlamaForCausalLM"),
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ]:
        assert f'"{arch}"' in (tmp_path / "work" / "models" / name / "config.json").read_text()


def test_wheels_carry_the_tested_versions():
    """Each pin of scripts/gpu_wheels.txt is the version installed here (the one the suite runs), and inside
    setup.py's range where setup.py names the package."""
    pins = [
        line.split()[0]
        for line in (REPO / "scripts/gpu_wheels.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    setup = (REPO / "setup.py").read_text()
    ranges = {
        Requirement(r).name: Requirement(r)
        for r in re.findall(r'^\s+"([a-z][a-z0-9-]*(?:==|>=|<=|~=)[^"]*)"', setup, re.M)
    }
    assert {"deepspeed", "webdataset", "zstandard", "megatron-core"} <= set(ranges)
    for pin in pins:
        name, version = pin.split("==")
        assert importlib.metadata.version(name) == version, pin
        if name in ranges:
            assert ranges[name].specifier.contains(version), (pin, str(ranges[name]))
