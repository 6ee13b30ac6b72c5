"""Shards, a run directory with its checkpoint, and an export, written by arctrain before its modules moved into
folders (tests/fixtures/pre_layout/, by tests/fixtures/make_pre_layout.py), load with today's code.

What a move could break: class paths pickled into torch files (none of arctrain's are: DeepSpeed pickles its own
classes), the files a run directory must hold, and the key names of config.yaml, trainer_state.json and an export's
config.json.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from arctrain.checkpoint.checkpointer import Checkpointer, checkpoint_dir, consolidate, resume_fingerprint
from arctrain.cli import main as arctrain
from arctrain.config.load import load_config
from arctrain.data.shards import ShardReader, open_source, read_manifest, shard_table
from arctrain.export.load import load_export
from data_tools.tokenizer_id import tokenizer_hash

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_layout"
TOKENIZERS = ("encoder", "llama", "mistral")


@pytest.fixture
def pre_layout(tmp_path) -> Path:
    """A copy of the fixtures with FIXTURES_DIR (the directory they were written in) replaced by the copy's path."""
    copy = tmp_path / "pre_layout"
    shutil.copytree(FIXTURES, copy)
    for file in (copy / "run" / "config.yaml", copy / "run" / "data.json", copy / "export" / "config.json"):
        file.write_text(file.read_text().replace("FIXTURES_DIR", str(copy)))
    return copy


def _tokenizers(root: Path) -> dict[str, str]:
    return {name: str(root / "models" / name) for name in TOKENIZERS}


def test_shards_read_with_their_tokenizers(pre_layout):
    shards = pre_layout / "shards"
    manifest = read_manifest(shards)
    assert {name: manifest["tokenizers"][name]["hash"] for name in TOKENIZERS} == {
        name: tokenizer_hash(path) for name, path in _tokenizers(pre_layout).items()
    }
    source = open_source(shards, "train", _tokenizers(pre_layout), verify=True)
    assert source.samples == sum(e["samples"] for e in manifest["splits"]["train"]["shards"]) > 0
    reader = ShardReader(shard_table([source]))
    encoder = AutoTokenizer.from_pretrained(pre_layout / "models" / "encoder")
    llama = AutoTokenizer.from_pretrained(pre_layout / "models" / "llama")
    for path, n in zip(source.shards, source.sizes, strict=True):
        for i in (0, n - 1):
            _, arrays = reader.read(path, i, ["encoder.ids.npy", "llama.ids.npy"])
            ids = [np.asarray(arrays[f"{name}.ids.npy"]).tolist() for name in ("encoder", "llama")]
            texts = [tok.decode(i, skip_special_tokens=True) for tok, i in zip((encoder, llama), ids, strict=True)]
            # One sample holds the same text in every tokenizer (word-boundary spaces are each tokenizer's own).
            assert re.sub(r"\s", "", texts[0]) == re.sub(r"\s", "", texts[1])
    reader.close()


def test_run_directory_and_checkpoint_load(pre_layout):
    run = pre_layout / "run"
    cfg = load_config(run / "config.yaml")
    assert cfg.train.steps == 2 and cfg.model.encoder_path == str(pre_layout / "models" / "encoder")
    ckpt = checkpoint_dir(run, None)
    assert ckpt.name == "step_00000002"
    assert Checkpointer(run, keep=2, rank=0).trainer_state()["step"] == 2
    for file in sorted(ckpt.glob("*.pt")):  # class paths pickled in them must still import
        assert torch.load(file, map_location="cpu", weights_only=False)
    exported = load_file(pre_layout / "export" / "model.safetensors")
    weights = consolidate(ckpt)
    assert sorted(weights) == sorted(exported)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor.to(exported[name].dtype), exported[name])


def test_the_old_run_config_and_fingerprint_read_as_the_qa_section(pre_layout, capsys):
    """config.yaml and trainer_state.json name the QA keys flat (`data.qa_shots`); they load as `data.qa.*` and the
    checkpoint resumes under its own settings, and refuses a changed one naming the new key."""
    run = pre_layout / "run"
    cfg = load_config(run / "config.yaml")
    assert "data.qa_shots -> data.qa.shots" in capsys.readouterr().err
    assert (cfg.data.qa.train, cfg.data.qa.shots, cfg.data.qa.max_passages) == ([], 0, 4)
    state_file = run / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert {"data.qa", "data.qa_shots", "data.qa_max_passages"} <= set(state["fingerprint"])
    state["fingerprint"]["data.shards"] = resume_fingerprint(cfg)["data.shards"]  # written in a temporary directory
    state_file.write_text(json.dumps(state))
    checkpointer = Checkpointer(run, keep=2, rank=0)
    assert checkpointer.check_resumable(1, resume_fingerprint(cfg)) == 1
    cfg.data.qa.shots = 2
    with pytest.raises(ValueError, match=r"was written with data\.qa\.shots=0, this run has data\.qa\.shots=2"):
        checkpointer.check_resumable(1, resume_fingerprint(cfg))


def test_export_of_the_old_run_equals_the_old_export(pre_layout, tmp_path):
    arctrain(["export", "--run", str(pre_layout / "run"), "--out", str(tmp_path / "again")])
    before = load_file(pre_layout / "export" / "model.safetensors")
    now = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(before) == sorted(now)
    for name in before:
        torch.testing.assert_close(now[name], before[name])
    config_before = json.loads((pre_layout / "export" / "config.json").read_text())
    config_now = json.loads((tmp_path / "again" / "config.json").read_text())
    for key in ("model_type", "auto_map", "backbone", "decoders", "pooling", "pooling_factor", "segment_tokens"):
        assert config_now[key] == config_before[key], key


def test_old_export_loads(pre_layout):
    export = pre_layout / "export"
    encoder, projectors, specials, config = load_export(export)
    state = load_file(export / "model.safetensors")
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, state[f"encoder.{name}"].float())
    assert sorted(projectors) == ["llama", "mistral"] == sorted(d["name"] for d in config.decoders)
    model = AutoModel.from_pretrained(export, trust_remote_code=True)  # transformers alone, the code shipped inside
    plain = model.state_dict()
    assert {n: tuple(t.shape) for n, t in plain.items()} == {n: tuple(t.shape) for n, t in state.items()}
    for name, tensor in state.items():
        torch.testing.assert_close(plain[name].to(tensor.dtype), tensor)
