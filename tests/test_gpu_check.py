"""scripts/gpu_check.sh --tiny: every step the GPU check runs (models of the check's architectures with random
weights, shards, dry run, ZeRO-3 training, report, export, generation), at tiny size on CPU; about 90 s."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def test_gpu_check_runs_end_to_end_at_tiny_size(tiny_models, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TOKENIZERS": str(tiny_models), "STEPS": "5"}
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--tiny"], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for line in ("attention kernel: per-sequence scaled_dot_product_attention (CPU)", "dry run: every check passed",
                 "frozen decoders: partitioned", "starting at step 0", "loss "):  # fmt: skip
        assert line in out, line
    report = out[out.index(" step     loss") :].splitlines()
    assert report[1].split()[0] == "5"  # the logged step: 5 steps, every 5
    generated = [line for line in out.splitlines() if line.startswith("generated: ")]
    assert len(generated) == 1 and generated[0][len("generated: ") :].strip()
    assert (tmp_path / "export" / "model.safetensors").is_file()
    for name, arch in [
        ("encoder", "LlamaForCausalLM"),
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ]:
        assert f'"{arch}"' in (tmp_path / "models" / name / "config.json").read_text()
