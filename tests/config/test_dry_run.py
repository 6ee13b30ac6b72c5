"""`arctrain train --dry-run` on every shipped config (paths overridden to the tiny models and test shards): the
checks of a real start, parameters per component and the memory estimate, exit 0, nothing trained."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import tiny_paths

from arctrain.config.deepspeed import REPO_ROOT
from arctrain.config.load import load_config
from arctrain.train.loop import main
from arctrain.train.preflight import meta_model

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def _overrides(cfg_path: Path, models: dict[str, Path], shards: Path, qa: tuple[Path, Path], run_dir: Path):
    """Paths of the test models (by the config's decoder names; `encoder`: the config's encoder) and data. The
    attention stays the config's: a dry run on a machine without flash-attn checks what it can."""
    cfg = load_config(cfg_path)
    out = [f"model.encoder_path={models['encoder']}", f"checkpoint.dir={run_dir}"]
    for i, d in enumerate(cfg.decoders):
        out.append(f"decoders.{i}.path={models[d.name]}")
    if cfg.data.qa.train:
        out += [f"data.qa.train={qa[0]}", f"data.qa.val={qa[1]}"]
    else:
        out.append(f"data.shards={shards}")
    if cfg.train.init_from:
        out.append("train.init_from=")  # a pretraining run's checkpoint: none here
    return out


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_dry_runs(cfg_path, tiny_models, tiny_shards, tiny_qa, tmp_path, capsys, request):
    run_dir = tmp_path / "run"
    names = [d.name for d in load_config(cfg_path).decoders]
    models = {name: tiny_models / name for name in ("encoder", "llama", "mistral", "gemma")}
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
    assert "attention: packed (no padding computed)" in out.out


GPU_CONFIGS = [p for p in CONFIGS if load_config(p).train.precision == "bf16"]


@pytest.mark.parametrize("gpu", ["h100-80gb", "a10g-24gb"])
@pytest.mark.parametrize("cfg_path", GPU_CONFIGS, ids=lambda p: p.name)
def test_dry_run_sizes_for_the_target_card(cfg_path, gpu, tiny_models, tiny_shards, tiny_qa, tmp_path, capsys):
    """--gpu: the frozen decoders are placed as the GPU run on that card will place them (memory.placement with the
    card's memory), not as on this GPU-less machine."""
    from arctrain.config.deepspeed import deepspeed_config
    from arctrain.train.memory import placement
    from arctrain.train.preflight import CARDS

    models = {"encoder": tiny_models / "encoder", "llama": tiny_models / "llama", "mistral": tiny_models / "mistral"}
    overrides = _overrides(cfg_path, models, tiny_shards, tiny_qa, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(cfg_path), "--dry-run", "--world-size", "16", "--gpu", gpu, *overrides])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    cfg = load_config(cfg_path, overrides)
    replicated, why = placement(cfg, 16, deepspeed_config(cfg, 16), CARDS[gpu][1])
    assert f"sized for {gpu}: {CARDS[gpu][1]:.1f} GiB" in out.out
    assert replicated and f"frozen decoders: replicated ({', '.join(replicated)}): {why}" in out.out


def test_every_card_is_in_the_flops_table_and_a_wrong_one_is_one_line(tiny_models, tiny_shards, capsys):
    from arctrain.model.flops import peak_tflops
    from arctrain.train.preflight import CARDS

    assert all(peak_tflops(f"NVIDIA {name}") for name, _ in CARDS.values())
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--config",
                str(REPO_ROOT / "configs/tiny_cpu.yaml"),
                "--dry-run",
                "--gpu",
                "h100",
                *tiny_paths(tiny_models, tiny_shards),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("arctrain train: error: --gpu 'h100': expected one of h100-80gb")


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
    args = [
        "--config",
        str(REPO_ROOT / "configs/tiny_cpu.yaml"),
        "--dry-run",
        f"decoders.0.path={bad}",
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        f"data.shards={tiny_shards}",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("arctrain train: error: decoders.0.path: ") and "mlp.gate_proj.weight" in err
