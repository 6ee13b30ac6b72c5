"""Replicated frozen decoders (outside ZeRO-3's partitioning) train exactly like partitioned ones: 2 gloo ranks,
fp32, the same per-step losses; and "auto" decides from the memory estimate against the GPU's memory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import metrics, overrides, run, step_losses, tiny_paths  # noqa: E402

from arctrain.config.deepspeed import REPO_ROOT, deepspeed_config  # noqa: E402
from arctrain.config.load import load_config  # noqa: E402
from arctrain.train.memory import placement, run_estimate  # noqa: E402


@pytest.mark.distributed
def test_replicated_decoders_give_the_losses_of_partitioned_ones(tiny_models, tiny_shards, tmp_path):
    runs = {}
    for mode in ("partitioned", "replicated"):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=3", f"model.frozen_decoders={mode}")
        assert run(args, 2, run_dir / "log") == [0, 0], (run_dir / "log.rank0").read_text()[-3000:]
        runs[mode] = run_dir
        assert f"frozen decoders: {mode}" in (run_dir / "logs" / "train.log").read_text()
    partitioned, replicated = step_losses(runs["partitioned"]), step_losses(runs["replicated"])
    assert partitioned.keys() == replicated.keys() == {1, 2, 3}
    for step, loss in partitioned.items():
        assert replicated[step] == pytest.approx(loss, rel=1e-6), step
    # Each rank holds half of the partitioned decoders' elements, none of the replicated ones in the engine.
    held = {mode: metrics(d)[-1]["param_elements_per_rank"] for mode, d in runs.items()}
    assert held["replicated"] < held["partitioned"]


def test_auto_replicates_when_the_estimate_fits_the_gpu(tiny_models, tiny_shards):
    cfg = load_config(
        REPO_ROOT / "configs/llama_mistral_1node.yaml",
        tiny_paths(tiny_models, tiny_shards),
    )
    ds = deepspeed_config(cfg, 8)
    peak = run_estimate(cfg, 8, ds, ("llama", "mistral")).peak()
    assert placement(cfg, 8, ds, gpu_gib=80.0)[0] == ("llama", "mistral")
    assert placement(cfg, 8, ds, gpu_gib=peak / 0.85 * 0.99)[0] == ()  # just over 85% of the card
    assert placement(cfg, 8, ds, gpu_gib=None)[0] == ()  # no GPU here: partitioned
