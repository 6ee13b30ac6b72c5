"""`arctrain export`: a 2-rank ZeRO-3 run -> Hugging Face directory; round trip through both loaders; bad input.

Fixtures (`trained_run`, `exported`) are in conftest.py: about 40 s once per session, shared with the
inference and evaluation tests. The tests here add about 15 s.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from arctrain.cli import main as arctrain
from arctrain.config.load import load_config
from arctrain.export.load import load_export
from arctrain.export.write import consolidate
from arctrain.model import build_model
from data_tools.tokenizer_id import tokenizer_hash

TEXTS = [
    "Return the absolute value of the argument.",
    "Hi",  # shorter than the pooling factor: one vector
    "The module provides an interface to the operating system, with functions for files, processes and the "
    "environment; every function raises OSError when the system call fails.",
]


def _inputs(tokenizer_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask  # (S, L) right-padded


@pytest.fixture(scope="module")
def reference(trained_run, tiny_models):
    """The trained model as arctrain builds it (original model dirs), with the run's consolidated weights."""
    cfg = load_config(trained_run / "config.yaml")
    model = build_model(cfg.model, cfg.decoders)
    ids, mask = _inputs(tiny_models / "encoder")
    with torch.no_grad():
        untrained = model.compress(ids, mask)
        ckpt = trained_run / "checkpoints" / (trained_run / "checkpoints" / "latest").read_text().strip()
        missing, unexpected = model.load_state_dict(consolidate(ckpt), strict=False)
        assert unexpected == [] and missing and all(k.startswith("decoders.") for k in missing)
        vectors = model.compress(ids, mask)
        projected = {name: model.projectors[name](torch.cat(vectors)) for name in model.projectors}
        specials = {name: model.specials[name]() for name in model.specials}
    assert not torch.allclose(torch.cat(untrained), torch.cat(vectors)), "training did not change the encoder"
    return vectors, projected, specials


def test_export_directory(exported, trained_run, tiny_models, tiny_shards):
    names = {p.name for p in exported.iterdir()}
    expected = {"config.json", "model.safetensors", "configuration_arc.py", "modeling_arc.py", "README.md"}
    assert expected | {"tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "arc_encoder"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_arc.ARCEncoderConfig",
        "AutoModel": "modeling_arc.ARCEncoderModel",
    }
    assert config["backbone"]["model_type"] == "llama" and config["backbone"]["num_hidden_layers"] == 6 - 2
    assert config["segment_tokens"] == json.loads((tiny_shards / "manifest.json").read_text())["segment_tokens"]
    # pretraining: no QA contexts (a QA run's: tests/train/test_train_variants.py)
    assert config.get("qa_context") is None
    assert [(d["name"], d["architecture"], d["hidden_size"]) for d in config["decoders"]] == [
        ("llama", "LlamaForCausalLM", 128),
        ("mistral", "MistralForCausalLM", 160),
    ]
    for d in config["decoders"]:
        assert d["tokenizer_hash"] == tokenizer_hash(tiny_models / d["name"])
    assert tokenizer_hash(exported) == tokenizer_hash(tiny_models / "encoder")
    # The standalone files import nothing from the trainer.
    for name in ("configuration_arc.py", "modeling_arc.py"):
        imports = re.findall(r"^\s*(?:from|import) (\S+)", (exported / name).read_text(), re.M)
        assert imports and not [m for m in imports if m.startswith("arctrain")], imports
    card = (exported / "README.md").read_text()
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "step 4" in card and f"{last['train/loss']:.4g}" in card and str(tiny_shards) in card


def test_round_trip_with_arctrain_classes(exported, reference, tiny_models):
    vectors, projected, specials = reference
    encoder, projectors, special_vectors, _ = load_export(exported)
    ids, mask = _inputs(exported)
    with torch.no_grad():
        got = encoder.compress(ids, mask)
        assert [v.shape for v in got] == [v.shape for v in vectors]
        assert [len(v) for v in got][1] == 1
        torch.testing.assert_close(torch.cat(got), torch.cat(vectors), rtol=1e-5, atol=1e-6)
        for name, want in projected.items():
            torch.testing.assert_close(projectors[name](torch.cat(got)), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(special_vectors[name](), specials[name], rtol=0, atol=0)


STANDALONE = """
import sys, torch
try:
    import arctrain
except ModuleNotFoundError:
    pass
else:
    sys.exit("arctrain is importable here: " + arctrain.__file__)
from transformers import AutoModel, AutoTokenizer
model_dir, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    vectors = model.compress(enc.input_ids, enc.attention_mask)
    projected = {d["name"]: model.project(torch.cat(vectors), d["name"]) for d in model.config.decoders}
    specials = {d["name"]: torch.stack([model.special(d["name"], k) for k in ("rec", "cont")])
                for d in model.config.decoders}
torch.save({"vectors": vectors, "projected": projected, "specials": specials, "class": type(model).__module__}, out)
"""


def test_round_trip_with_transformers_only(exported, reference, tmp_path):
    """AutoModel + trust_remote_code in a Python that cannot import arctrain.

    How arctrain is kept out: `python -S` skips site.py, so no .pth file runs — in particular not the editable
    install's finder (`__editable___arctrain_*_finder`), the only way this venv can import arctrain. PYTHONPATH
    then names the venv's site-packages directory alone (its .pth files are not processed there), and the working
    directory is a fresh tmp dir, not the repository. The script exits non-zero if `import arctrain` succeeds.
    """
    script = tmp_path / "standalone.py"
    script.write_text(f"TEXTS = {TEXTS!r}\n" + STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": sysconfig.get_paths()["purelib"], "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "vectors.pt"
    proc = subprocess.run(
        [sys.executable, "-S", str(script), str(exported), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["class"].startswith("transformers_modules.")  # the copy in the export, via auto_map
    vectors, projected, specials = reference
    assert [v.shape for v in got["vectors"]] == [v.shape for v in vectors]
    torch.testing.assert_close(torch.cat(got["vectors"]), torch.cat(vectors), rtol=1e-5, atol=1e-6)
    for name, want in projected.items():
        torch.testing.assert_close(got["projected"][name], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["specials"][name], specials[name], rtol=0, atol=0)


def test_export_of_an_earlier_step(trained_run, exported, tmp_path):
    arctrain(["export", "--run", str(trained_run), "--step", "2", "--out", str(tmp_path / "s2")])
    assert "step 2" in (tmp_path / "s2" / "README.md").read_text()
    early, late = load_export(tmp_path / "s2")[0], load_export(exported)[0]
    assert early.embed_tokens.weight.shape == late.embed_tokens.weight.shape == (2048, 96)
    assert not torch.equal(early.embed_tokens.weight, late.embed_tokens.weight)  # steps 3-4 moved the weights


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        arctrain(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("arctrain: error: ")
    return err


def _copy_run(trained_run: Path, dest: Path) -> Path:
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns("*optim_states.pt", "rng_*"))
    return dest


def test_bad_input_is_one_line(trained_run, exported, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no such checkpoint" in _fails(["export", "--run", str(trained_run), "--step", "3", "--out", out], capsys)
    assert "not a run directory" in _fails(["export", "--run", str(tmp_path), "--out", out], capsys)
    assert "not empty" in _fails(["export", "--run", str(trained_run), "--out", str(exported)], capsys)

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained_run / "config.yaml", bare / "config.yaml")
    assert "no checkpoint" in _fails(["export", "--run", str(bare), "--out", out], capsys)

    no_state = _copy_run(trained_run, tmp_path / "no_state")
    (no_state / "checkpoints" / "step_00000004" / "trainer_state.json").unlink()
    # asked for by step: refused; as `latest`, the older complete step is used instead (tests/e2e/test_bad_inputs.py)
    assert "trainer_state.json" in _fails(["export", "--run", str(no_state), "--step", "4", "--out", out], capsys)

    no_model = _copy_run(trained_run, tmp_path / "no_model")
    for f in (no_model / "checkpoints" / "step_00000004").glob("*model_states.pt"):
        f.unlink()
    assert "no DeepSpeed model files" in _fails(["export", "--run", str(no_model), "--out", out], capsys)

    broken = tmp_path / "broken_export"
    shutil.copytree(exported, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_export(broken)


def test_segment_length_comes_from_the_run_even_when_the_shards_moved(trained_run, tiny_shards, tmp_path, capsys):
    """The run records its segment length (data.json); an old run without it and without its shards is one line."""
    segment = json.loads((tiny_shards / "manifest.json").read_text())["segment_tokens"]
    assert json.loads((trained_run / "data.json").read_text())["segment_tokens"] == segment
    moved = Path(shutil.copytree(trained_run, tmp_path / "moved"))  # with optimizer states: consolidation reads them
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(str(tiny_shards), str(tmp_path / "gone")))
    arctrain(["export", "--run", str(moved), "--out", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["segment_tokens"] == segment
    (moved / "data.json").unlink()
    capsys.readouterr()  # the first export's progress bars
    err = _fails(["export", "--run", str(moved), "--out", str(tmp_path / "b")], capsys)
    assert "segment length" in err and "--segment-tokens" in err
    arctrain(["export", "--run", str(moved), "--out", str(tmp_path / "b"), "--segment-tokens", "24"])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["segment_tokens"] == 24


def test_model_card_example_runs_with_a_tokenizer_without_pad_token(exported, tmp_path):
    """The card's Python block, as written, on an export whose tokenizer has no pad token (as Llama 3's)."""
    from transformers import AutoTokenizer

    no_pad = tmp_path / "no_pad"
    shutil.copytree(exported, no_pad)
    tok = AutoTokenizer.from_pretrained(no_pad)
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    assert AutoTokenizer.from_pretrained(no_pad).pad_token is None
    card = (exported / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("THIS_DIR", str(no_pad))
    scope: dict = {}
    exec(code, scope)  # noqa: S102  (our own model card)
    assert len(scope["vectors"]) == 2 and scope["embeds"].shape[-1] == 128  # llama's hidden size


def test_the_exported_encoder_computes_no_padding(exported, reference):
    """The standalone model runs each segment length once, on the real tokens only: every layer call sees (G, n, D)
    with n a real segment length, never the padded width; the vectors stay arctrain's."""
    model = AutoModel.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32)
    ids, mask = _inputs(exported)
    seen = []
    model.encoder.layers[0].register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    with torch.no_grad():
        vectors = model.compress(ids, mask)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(lengths) and max(lengths) == ids.shape[1]  # the inputs are padded
    assert sorted(seen) == sorted((1, n) for n in lengths)  # one call per length, no padded position
    torch.testing.assert_close(torch.cat(vectors), torch.cat(reference[0]), rtol=1e-5, atol=1e-6)
