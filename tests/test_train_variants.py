"""The paper's pretraining variants end to end (1 gloo rank, ZeRO-3): fair multi-decoder steps with interleaved
continuation at x8, then QA fine-tuning at x4 from those weights (train.init_from) with contexts in chunks."""

import json
from pathlib import Path

import pytest
import torch
from test_train import metrics, overrides, run, sample_keys

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def fair_x8(tiny_models, tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fair_x8")
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=4", "checkpoint.interval=4",
                     "model.pooling_factor=8", "train.decoder_schedule=fair", "data.interleave_tokens=8")  # fmt: skip
    assert run(args, 1, run_dir / "log") == [0], (run_dir / "log.rank0").read_text()[-3000:]
    return run_dir


def test_fair_steps_train_every_decoder_on_the_same_samples(fair_x8):
    keys = {step: ks for step, _, ks in sample_keys(fair_x8, 0)}
    assert keys[1] == keys[2] and keys[3] == keys[4] and keys[1] != keys[3]
    lines = {m["step"]: m for m in metrics(fair_x8) if "train/loss" in m}
    decoders = [next(k.split("/")[1] for k in lines[s] if k.startswith("train/") and k.count("/") == 3)
                for s in (1, 2, 3, 4)]  # fmt: skip
    assert decoders == ["llama", "mistral", "llama", "mistral"]


def test_x4_fine_tuning_from_the_x8_run_keeps_its_weights_and_pools_at_x4(fair_x8, tiny_models, tiny_shards,
                                                                          tiny_qa, tmp_path):  # fmt: skip
    """The pooling factor has no weights: with LRs 0 the x4 run's checkpoint is the x8 run's, bitwise; its batches
    and its export compress at x4, QA passages in chunks of 16 tokens, at most 2, the rest counted in the metrics."""
    from arctrain.checkpoint import checkpoint_dir, consolidate
    from arctrain.export import export
    from arctrain.infer import ARCGenerator

    train, _ = tiny_qa
    run_dir = tmp_path / "ft"
    args = overrides(
        tiny_models,
        tiny_shards,
        run_dir,
        "train.steps=2",
        "checkpoint.interval=2",
        f"train.init_from={fair_x8}",
        "model.pooling_factor=4",
        "data.shards=[]",
        f"data.qa={train}",
        "data.chunk_tokens=16",
        "data.max_chunks=2",
        "data.qa_context=segments",
        "optim.encoder_lr=0",
        "optim.projector_lr=0",
    )
    args = [a for a in args if not a.startswith("data.shards=/")]  # fmt: skip
    assert run(args, 1, tmp_path / "log") == [0], (tmp_path / "log.rank0").read_text()[-3000:]
    assert "initialised" in (tmp_path / "log.rank0").read_text()
    source, tuned = consolidate(checkpoint_dir(fair_x8, None)), consolidate(checkpoint_dir(run_dir, None))
    assert sorted(source) == sorted(tuned) and all(torch.equal(source[n], tuned[n]) for n in source)
    assert all(m.get("context_tokens_dropped", 0) > 0 for m in metrics(run_dir) if "train/loss" in m)

    out = export(run_dir, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["pooling_factor"], config["segment_tokens"]) == (4, 16)
    arc = ARCGenerator(out, tiny_models / "llama")
    passage = json.loads(train.read_text().splitlines()[0])["passages"]
    chunks = arc.segments(passage)
    got = arc.generate([arc.context_example(passage, "\nAnswer:")], max_new_tokens=1)
    assert got.memory_vectors == sum(-(-len(c) // 4) for c in chunks)  # x4 vectors from the x8 weights
