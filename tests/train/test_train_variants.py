"""The paper's pretraining variants end to end (1 gloo rank, ZeRO-3): fair multi-decoder steps with interleaved
continuation at x8, then QA fine-tuning at x4 from those weights (train.init_from) with contexts in chunks."""

import json
from pathlib import Path

import pytest
import torch
from helpers import metrics, overrides, run, sample_keys

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def fair_x8(tiny_models, tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fair_x8")
    args = overrides(
        tiny_models,
        tiny_shards,
        run_dir,
        "train.steps=4",
        "checkpoint.interval=4",
        "model.pooling_factor=8",
        "train.decoder_schedule=fair",
        "data.interleave_tokens=8",
    )
    assert run(args, 1, run_dir / "log") == [0], (run_dir / "log.rank0").read_text()[-3000:]
    return run_dir


def test_fair_steps_train_every_decoder_on_the_same_samples(fair_x8):
    keys = {step: ks for step, _, ks in sample_keys(fair_x8, 0)}
    assert keys[1] == keys[2] and keys[3] == keys[4] and keys[1] != keys[3]
    lines = {m["step"]: m for m in metrics(fair_x8) if "train/loss" in m}
    decoders = [
        next(k.split("/")[1] for k in lines[s] if k.startswith("train/") and k.count("/") == 3) for s in (1, 2, 3, 4)
    ]
    assert decoders == ["llama", "mistral", "llama", "mistral"]


@pytest.fixture(scope="module")
def x4_qa(fair_x8, tiny_models, tiny_shards, tiny_qa, tmp_path_factory) -> Path:
    """2 steps of QA fine-tuning at x4 from the x8 run, LRs 0, passages in chunks of 16 tokens, at most 2."""
    run_dir = tmp_path_factory.mktemp("x4_qa") / "run"
    args = overrides(
        tiny_models,
        tiny_shards,
        run_dir,
        "train.steps=2",
        "checkpoint.interval=2",
        f"train.init_from={fair_x8}",
        "model.pooling_factor=4",
        "data.shards=[]",
        f"data.qa={tiny_qa[0]}",
        "data.chunk_tokens=16",
        "data.max_chunks=2",
        "data.qa_context=segments",
        "optim.encoder_lr=0",
        "optim.projector_lr=0",
    )
    args = [a for a in args if not a.startswith("data.shards=/")]
    log = run_dir.parent / "log"
    assert run(args, 1, log) == [0], (run_dir.parent / "log.rank0").read_text()[-3000:]
    assert "initialised" in (run_dir.parent / "log.rank0").read_text()
    return run_dir


def test_x4_fine_tuning_from_the_x8_run_keeps_its_weights_and_pools_at_x4(fair_x8, x4_qa):
    """The pooling factor has no weights: with LRs 0 the x4 run's checkpoint is the x8 run's, bitwise; QA passages
    in chunks of 16 tokens, at most 2, the rest counted in the metrics."""
    from arctrain.checkpoint.checkpointer import checkpoint_dir, consolidate

    source, tuned = consolidate(checkpoint_dir(fair_x8, None)), consolidate(checkpoint_dir(x4_qa, None))
    assert sorted(source) == sorted(tuned) and all(torch.equal(source[n], tuned[n]) for n in source)
    assert all(m.get("context_tokens_dropped", 0) > 0 for m in metrics(x4_qa) if "train/loss" in m)


def test_its_export_pools_at_x4_and_generate_and_eval_cut_contexts_as_it_was_trained(
    x4_qa, tiny_models, tiny_qa, tmp_path, capsys
):
    """The export compresses at x4 and records how the run cut its QA passages (`qa_context`: segments, chunks of
    16, at most 2, data.qa_context_tokens 2048). ARCGenerator, `arctrain generate` and `arctrain eval` cut contexts
    that way when no flag says otherwise; flags override it. An export without the record (older) keeps the
    defaults: every chunk of segment_tokens (eval: one joint sequence of at most 2048 tokens)."""
    from arctrain.cli import main as arctrain
    from arctrain.export.write import export
    from arctrain.inference.eval import EVAL_CONTEXT
    from arctrain.inference.generate import ARCGenerator
    from arctrain.model import Memory

    out = export(x4_qa, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["pooling_factor"], config["segment_tokens"]) == (4, 16)
    trained = {"context": "segments", "chunk_tokens": 16, "max_chunks": 2, "context_tokens": 2048}
    assert config["qa_context"] == {**trained, "chat_template": True}  # data.qa_chat_template
    assert "passages in chunks of 16 encoder tokens, at most 2" in (out / "README.md").read_text()
    llama = tiny_models / "llama"
    passage = json.loads(tiny_qa[0].read_text().splitlines()[0])["passages"]

    def vectors(arc: ARCGenerator) -> tuple[list, int]:
        example = arc.context_example(passage, "\nAnswer:")
        memory = next(p for p in example.pieces if isinstance(p, Memory))
        return memory.segments, arc.generate([example], max_new_tokens=1).memory_vectors

    arc = ARCGenerator(out, llama)
    chunks = arc.segments(passage)  # every chunk of 16 tokens
    assert len(chunks) > 2 and all(0 < len(c) <= 16 for c in chunks)
    assert vectors(arc) == (chunks[:2], sum(-(-len(c) // 4) for c in chunks[:2]))  # x4 vectors of the first 2
    assert vectors(ARCGenerator(out, llama, max_chunks=0)) == (chunks, sum(-(-len(c) // 4) for c in chunks))
    joint = ARCGenerator(out, llama, context="joint")
    assert (joint.pieces.context, joint.pieces.context_tokens, joint.pieces.chunker.max_chunks) == ("joint", 2048, 0)

    old = tmp_path / "old"
    old.mkdir()
    for file in out.iterdir():
        (old / file.name).symlink_to(file)
    (old / "config.json").unlink()
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "qa_context"}))
    assert vectors(ARCGenerator(old, llama)) == (chunks, sum(-(-len(c) // 4) for c in chunks))
    pieces = ARCGenerator(old, llama, fallback=EVAL_CONTEXT).pieces
    assert (pieces.context, pieces.context_tokens, pieces.chunker.max_chunks) == ("joint", 2048, 0)

    (tmp_path / "doc.txt").write_text(passage)
    argv = [
        "generate",
        "--model",
        str(out),
        "--decoder",
        str(llama),
        "--context-file",
        str(tmp_path / "doc.txt"),
        "--prompt",
        "\nAnswer:",
        "--max-new-tokens",
        "1",
        "--dtype",
        "fp32",
    ]
    arctrain(argv)
    assert f"--max-chunks 2: 1 of 1 contexts cut short, {len(chunks) - 2} chunks" in capsys.readouterr().err
    arctrain([*argv, "--max-chunks", "0"])
    assert "contexts cut short" not in capsys.readouterr().err  # every chunk
    with pytest.raises(SystemExit) as exit_info:
        arctrain([*argv, "--context", "joint", "--max-chunks", "1"])
    err = capsys.readouterr().err.strip()
    assert (
        exit_info.value.code == 2
        and len(err.splitlines()) == 1
        and "--max-chunks 1 applies with --context segments" in err
    )

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(tiny_qa[1].read_text().splitlines(keepends=True)[:2]))
    results = []
    for flags in ([], ["--context", "joint", "--chunk-tokens", "8"]):
        arctrain(
            [
                "eval",
                "--model",
                str(out),
                "--decoder",
                str(llama),
                "--data",
                str(qa),
                "--shots",
                "0",
                "--max-new-tokens",
                "1",
                "--dtype",
                "fp32",
                "--out",
                str(tmp_path / "eval.json"),
                *flags,
            ]
        )
        capsys.readouterr()
        result = json.loads((tmp_path / "eval.json").read_text())
        cut = result["context_cut"]
        results.append(
            (result["context"], cut["chunk_tokens"], cut["max_chunks"], cut["context_tokens"], cut["truncated"])
        )
    assert results == [("segments", 16, 2, 2048, 2), ("joint", 8, 0, 2048, 0)]  # as trained; as told
