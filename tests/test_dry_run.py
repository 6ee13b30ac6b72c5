"""`arctrain train --dry-run` on every shipped config (paths overridden to the tiny models and test shards): the
checks of a real start, parameters per component and the memory estimate, exit 0, nothing trained."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_paths

from arctrain.config import REPO_ROOT, load_config
from arctrain.dry_run import meta_model
from arctrain.train import main

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def _overrides(cfg_path: Path, models: dict[str, Path], shards: Path, qa: tuple[Path, Path], run_dir: Path):
    """Paths of the test models (by the config's decoder names; `encoder`: the config's encoder) and data."""
    cfg = load_config(cfg_path)
    out = [f"model.encoder_path={models['encoder']}", f"checkpoint.dir={run_dir}"]
    for i, d in enumerate(cfg.decoders):
        out.append(f"decoders.{i}.path={models[d.name]}")
    if cfg.data.qa:
        out += [f"data.qa={qa[0]}", f"data.qa_val={qa[1]}"]
    else:
        out.append(f"data.shards={shards}")
    if cfg.train.init_from:
        out.append("train.init_from=")  # a pretraining run's checkpoint: none here
    return out


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_dry_runs(cfg_path, tiny_models, tiny_shards, tiny_qa, tmp_path, capsys, request):
    run_dir = tmp_path / "run"
    names = [d.name for d in load_config(cfg_path).decoders]
    models = {"encoder": tiny_models / "encoder", "llama": tiny_models / "llama", "mistral": tiny_models / "mistral"}
    shards = tiny_shards
    if "smollm2" in names:  # the real-LLM demo: its encoder is SmolLM2's first layers (fetched once per machine)
        models["encoder"] = models["smollm2"] = request.getfixturevalue("smollm2")
        shards = request.getfixturevalue("smollm2_shards")
    args = ["--config", str(cfg_path), "--dry-run", "--world-size", "2"]
    with pytest.raises(SystemExit) as exit_:
        main(args + _overrides(cfg_path, models, shards, tiny_qa, run_dir))
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    assert "dry run: every check passed; nothing was trained" in out.out
    expected = ["encoder (trains)", f"N=2 GPUs, a {names[0]} step"] + [f"decoder {n} (frozen)" for n in names]
    for line in expected:
        assert line in out.out
    assert not run_dir.exists()  # nothing written


def test_meta_model_has_the_real_parameter_counts(tiny_models, tiny_shards):
    """The meta-device model (config.json only) has exactly the parameters of the loaded one, and no storage."""
    from arctrain.model import build_model

    cfg = load_config(
        REPO_ROOT / "configs/tiny_cpu.yaml",
        tiny_paths(tiny_models, tiny_shards),
    )
    meta, real = meta_model(cfg), build_model(cfg.model, cfg.decoders)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    shapes = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    assert shapes == {name: tuple(p.shape) for name, p in real.named_parameters()}


def test_a_weight_file_that_disagrees_with_config_json_fails_in_one_line(tiny_models, tiny_shards, tmp_path, capsys):
    bad = tmp_path / "llama"
    shutil.copytree(tiny_models / "llama", bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    args = ["--config", str(REPO_ROOT / "configs/tiny_cpu.yaml"), "--dry-run", f"decoders.0.path={bad}",
            f"model.encoder_path={tiny_models / 'encoder'}", f"decoders.1.path={tiny_models / 'mistral'}",
            f"data.shards={tiny_shards}"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("arctrain train: error: decoders.0.path: ") and "mlp.gate_proj.weight" in err
