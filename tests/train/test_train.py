"""The DeepSpeed ZeRO-3 trainer on 2 CPU processes (gloo): learning, exact resume, preemption, checkpoints.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), one
subprocess each, so a test can signal or kill a single rank and read each rank's exit code.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, latest, launch, metrics, overrides, run, sample_keys, step_losses, wait, wait_for

from arctrain.train.loop import EXIT_PREEMPTED

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def straight(tiny_models, tiny_shards, tmp_path_factory) -> Path:
    """The reference: 20 steps without interruption."""
    run_dir = tmp_path_factory.mktemp("straight")
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=20", "checkpoint.interval=10")
    assert run(args, 2, run_dir / "log") == [0, 0]
    return run_dir


def test_resume_after_sigkill_is_exact(straight, tiny_models, tiny_shards, tmp_path):
    """20 steps straight == 10 steps, SIGKILL of a rank after the step-10 checkpoint, restart to 20: bitwise."""
    run_dir = tmp_path / "killed"
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=20", "checkpoint.interval=10")
    procs = launch(args, 2, tmp_path / "first")
    wait_for(lambda: latest(run_dir) == "step_00000010" or any(p.poll() is not None for p in procs))
    procs[1].send_signal(signal.SIGKILL)
    codes = wait(procs)
    assert codes[1] == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "step_00000020").exists(), "the kill came too late to test anything"

    assert run(args, 2, tmp_path / "second") == [0, 0]
    assert "resumed from step 10" in (tmp_path / "second.rank0").read_text()
    assert step_losses(run_dir) == step_losses(straight)  # bitwise: floats compared exactly
    assert sorted(step_losses(run_dir)) == list(range(1, 21))
    for rank in (0, 1):
        assert sample_keys(run_dir, rank) == sample_keys(straight, rank)


def test_sigusr1_checkpoints_and_exits_preempted(straight, tiny_models, tiny_shards, tmp_path):
    run_dir = tmp_path / "preempted"
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=20", "checkpoint.interval=100")
    procs = launch(args, 2, tmp_path / "first")
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(step_losses(run_dir)) >= 3)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the others must agree and stop with it
    assert wait(procs) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    tag = latest(run_dir)
    assert tag is not None and 3 <= int(tag.split("_")[1]) < 20
    assert f"preempted at step {int(tag.split('_')[1])}" in (tmp_path / "first.rank0").read_text()

    assert run(args, 2, tmp_path / "second") == [0, 0]
    assert step_losses(run_dir) == step_losses(straight)


def test_checkpoint_holds_no_frozen_weights(straight, tiny_models):
    """The step-20 checkpoint is about trainable params + Adam state; the frozen decoders would add far more."""
    from transformers import AutoConfig

    from arctrain.config.load import load_config
    from arctrain.model import build_model

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", overrides(tiny_models, Path("."), Path("."))[:3])
    model = build_model(cfg.model, cfg.decoders)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert AutoConfig.from_pretrained(tiny_models / "llama").hidden_size  # the decoders are real
    ckpt = straight / "checkpoints" / "step_00000020"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    expected = trainable * 4 * 3  # fp32 weights + two Adam moments
    assert 0.9 * expected < size < 1.2 * expected + 200_000, (size, expected)
    assert frozen * 4 > 0.5 * expected  # so their presence would have shown
    names = sorted(f.name for f in ckpt.iterdir())
    assert names == sorted(
        ["trainer_state.json", "rng_rank0.pt", "rng_rank1.pt"]
        + [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    )
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["next_sample"] == 20 * 2 * 4  # steps x micro-batches x samples
    assert (state["world_size"], state["grad_accum"]) == (2, 1)
    # keep: 2 -> steps 10 and 20 remain
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000020"]


def test_zero3_partitions_halve_per_rank_parameters(straight, tiny_models, tiny_shards, tmp_path):
    run_dir = tmp_path / "one"
    assert run(overrides(tiny_models, tiny_shards, run_dir, "train.steps=1"), 1, tmp_path / "log") == [0]
    one = metrics(run_dir)[0]["param_elements_per_rank"]
    two = metrics(straight)[0]["param_elements_per_rank"]
    assert 0.45 * one <= two <= 0.55 * one, (one, two)


def train_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "arctrain", "train", "--config", str(REPO / "configs/tiny_cpu.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("train.stepz=3", "train.stepz: unknown key"),
        ("train.steps=many", "train.steps: 'many' is not a number"),
        ("deepspeed=ds_configs/zero3_bf16.json", "train.precision: 'fp32' but ds_configs/zero3_bf16.json enables"),
        ("decoders.0.path=/nonexistent/llama", "decoders.0.path: '/nonexistent/llama' is not a directory"),
        ("train.init_from=/nonexistent/run", "train.init_from: /nonexistent/run: not a run directory (no config.yaml)"),
    ],
)
def test_config_errors_are_one_line(tiny_models, tiny_shards, tmp_path, bad, expected):
    result = train_cli(*overrides(tiny_models, tiny_shards, tmp_path / "run"), bad)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("arctrain train: error:"), result.stderr[-2000:]
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_shards_of_other_tokenizers_are_refused(tiny_models, tiny_shards, tmp_path):
    """Decoders swapped: the shards' manifest says llama's tokenizer is another one than the configured model's."""
    result = train_cli(
        *overrides(tiny_models, tiny_shards, tmp_path / "run"),
        f"decoders.0.path={tiny_models / 'mistral'}",
        f"decoders.1.path={tiny_models / 'llama'}",
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "llama" in lines[0] and str(tiny_shards) in lines[0], result.stderr[-2000:]


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_models, tiny_shards, tmp_path):
    """An encoder with a NaN weight: every step is skipped and counted; after max_bad_steps a checkpoint, exit 3."""
    import shutil

    from safetensors.torch import load_file, save_file

    from arctrain.train.loop import EXIT_DIVERGED

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_models / "encoder", encoder)
    weights = load_file(encoder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, encoder / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=10", "train.max_bad_steps=3")
    args[0] = f"model.encoder_path={encoder}"
    assert run(args, 1, tmp_path / "log") == [EXIT_DIVERGED]
    assert latest(run_dir) is None  # a restart resumes the last good checkpoint (here: none), never this one
    diverged = run_dir / "checkpoints" / "diverged_step_00000003"
    assert json.loads((diverged / "trainer_state.json").read_text())["skipped_steps"] == 3
    assert [m["skipped_steps"] for m in metrics(run_dir)] == [1, 2, 3]
    # DeepSpeed skipped its scheduler on each of these steps; the LR still follows the step counter (warm-up).
    assert [m["lr/encoder"] for m in metrics(run_dir)] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-12)
    log = (tmp_path / "log.rank0").read_text()
    assert "3 steps in a row had a non-finite loss or gradient norm" in log and "diverged_step_00000003 saved" in log


def test_training_makes_compressed_context_useful(tiny_models, tiny_shards, tmp_path):
    """The demo config with both decoders: the loss falls and the compressed context helps on val."""
    run_dir = tmp_path / "learn"
    args = overrides(tiny_models, tiny_shards, run_dir, "eval.interval=150", "logging.interval=10")
    args = [a for a in args if not a.startswith("data.micro_batch_size")]  # the demo's own batch size
    assert run(args, 2, tmp_path / "log") == [0, 0]
    lines = metrics(run_dir)
    train = [m["train/loss"] for m in lines if "train/loss" in m]
    assert sum(train[-3:]) / 3 < sum(train[:2]) / 2 - 0.2, train
    val = next(m for m in reversed(lines) if "val/llama/reconstruction/loss" in m)
    # Measured (= make demo): llama reconstruction 4.510 vs 4.912, continuation 4.576 vs 4.933; mistral 4.891 vs
    # 5.278 and 5.019 vs 5.419. These decoders cannot copy from context; the most any compressor could reach is in
    # docs/benchmarks.md "Context use".
    for decoder in ("llama", "mistral"):
        recon, cont = f"val/{decoder}/reconstruction/", f"val/{decoder}/continuation/"
        assert val[cont + "loss"] < val[cont + "loss_no_context"] - 0.2, val
        assert val[recon + "loss"] < val[recon + "loss_no_context"] - 0.3, val


def test_resume_that_would_change_the_global_batch_is_refused(straight, tiny_models, tiny_shards, tmp_path):
    """Another world size is fine (tests/checkpoint/test_elastic.py) as long as ranks x grad_accum stays
    2 micro-batches."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(straight, run_dir)
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=30")
    assert run([*args, "train.grad_accum=3"], 1, tmp_path / "log") == [2]
    out = (tmp_path / "log.rank0").read_text()
    assert (
        "step_00000020 ran 2 micro-batches per step (2 ranks x train.grad_accum=1); 1 ranks x train.grad_accum=3 "
        "would change the global batch: use train.grad_accum=2, or start a new run directory"
    ) in out

    assert run([*args, "data.micro_batch_size=2"], 2, tmp_path / "mbs") == [2, 2]
    errors = [line for line in (tmp_path / "mbs.rank0").read_text().splitlines() if "error" in line]
    assert errors == [
        f"arctrain train: error: {run_dir / 'checkpoints' / 'step_00000020'} was written with "
        "data.micro_batch_size=4, this run has data.micro_batch_size=2: resuming would change which samples "
        "follow; keep data.micro_batch_size or start a new run directory"
    ]
    assert sorted(p.name for p in (run_dir / "launches").iterdir()) == ["config_001.yaml"]  # refused: not kept
    assert "micro_batch_size: 4" in (run_dir / "config.yaml").read_text()


def test_the_deepspeed_launchers_local_rank_is_accepted(tiny_models, tiny_shards, tmp_path):
    """`deepspeed --module arctrain train ...` runs `python -m arctrain --local_rank=N train ...`."""
    cmd = [
        sys.executable,
        "-m",
        "arctrain",
        "--local_rank=1",
        "train",
        "--config",
        str(REPO / "configs/tiny_cpu.yaml"),
        *overrides(tiny_models, tiny_shards, tmp_path / "run"),
        "train.stepz=3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("arctrain train: error: train.stepz: unknown key")  # parsed past --local_rank


def test_init_from_another_run_at_another_world_size(straight, tiny_models, tiny_shards, tmp_path):
    """A new run starts from the weights 2 ranks wrote, on 1 rank. With both learning rates 0 its checkpoint holds
    exactly the source's weights; restarted, it resumes its own checkpoint and does not load the source again."""
    from arctrain.checkpoint.checkpointer import checkpoint_dir, consolidate

    run_dir = tmp_path / "init"
    frozen_lr = ("optim.encoder_lr=0", "optim.projector_lr=0", "checkpoint.interval=2")
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=2", f"train.init_from={straight}", *frozen_lr)
    assert run(args, 1, tmp_path / "first") == [0]
    source, copy = consolidate(checkpoint_dir(straight, None)), consolidate(checkpoint_dir(run_dir, None))
    log = (tmp_path / "first.rank0").read_text()
    assert f"initialised {len(source)} tensors" in log and "step_00000020" in log, log[-3000:]
    assert sorted(source) == sorted(copy)
    assert all(torch.equal(source[name], copy[name]) for name in source)

    args = [a.replace("train.steps=2", "train.steps=3") for a in args]
    assert run(args, 1, tmp_path / "second") == [0]
    log = (tmp_path / "second.rank0").read_text()
    assert "resumed from step 2" in log and "initialised" not in log


def test_init_from_a_run_with_other_shapes_is_refused(straight, tiny_models, tiny_shards, tmp_path):
    args = overrides(
        tiny_models, tiny_shards, tmp_path / "run", f"train.init_from={straight}", "decoders.0.projector_hidden=64"
    )
    assert run(args, 1, tmp_path / "log") == [2]
    out = (tmp_path / "log.rank0").read_text()
    errors = [line for line in out.splitlines() if "error" in line.lower() and "arctrain" in line]
    assert len(errors) == 1 and "other shapes than this model's: projectors.llama." in errors[0], out[-3000:]
    assert "Traceback" not in out


def test_init_plan_reports_new_and_unused_tensors():
    """A decoder added (qwen) keeps its new projector; a decoder dropped (mistral) is reported as not used."""
    from arctrain.checkpoint.init_from import _init_plan, _names

    state = {n: torch.zeros(2, 3) for n in ("encoder.w", "projectors.llama.0.weight", "projectors.mistral.0.weight")}
    shapes = {"encoder.w": (2, 3), "projectors.llama.0.weight": (2, 3), "projectors.qwen.0.weight": (4, 3)}
    plan = _init_plan(Path("ck"), state, shapes)
    assert plan["error"] == "" and plan["load"] == ["encoder.w", "projectors.llama.0.weight"]
    assert _names(plan["new"]) == "projectors.qwen.*" and _names(plan["unused"]) == "projectors.mistral.*"
    shapes["encoder.w"] = (3, 2)
    assert _init_plan(Path("ck"), state, shapes)["error"] == (
        "train.init_from ck: other shapes than this model's: encoder.w is (2, 3) there, (3, 2) here"
    )


def test_qa_fine_tuning_from_a_pretraining_run_resumes_exactly(straight, tiny_models, tiny_shards, tiny_qa, tmp_path):
    """QA fine-tuning (train.init_from the pretraining run): 12 steps straight == 6 steps + restart to 12, bitwise;
    the answer loss falls; val has the answer loss with and without the compressed passages."""
    train, val = tiny_qa

    def qa_args(run_dir, steps):
        args = overrides(
            tiny_models,
            tiny_shards,
            run_dir,
            f"train.steps={steps}",
            f"train.init_from={straight}",
            "data.shards=[]",
            f"data.qa={train}",
            f"data.qa_val={val}",
            "eval.interval=6",
            "eval.batches=2",
            "checkpoint.interval=6",
        )
        return [a for a in args if not a.startswith("data.shards=/")]

    assert run(qa_args(tmp_path / "straight", 12), 2, tmp_path / "a") == [0, 0]
    assert "initialised" in (tmp_path / "a.rank0").read_text()
    # data.qa and data.qa_val: the old names of data.qa.train and data.qa.val, said once, by rank 0
    notes = [
        [line for line in (tmp_path / f"a.rank{rank}").read_text().splitlines() if "-> data.qa." in line]
        for rank in (0, 1)
    ]
    assert notes == [
        [
            "config: old key names read as the new ones (data.qa -> data.qa.train, data.qa_val -> "
            "data.qa.val); write the new names"
        ],
        [],
    ]
    assert run(qa_args(tmp_path / "split", 6), 2, tmp_path / "b") == [0, 0]
    assert run(qa_args(tmp_path / "split", 12), 2, tmp_path / "c") == [0, 0]
    assert "resumed from step 6" in (tmp_path / "c.rank0").read_text()
    assert step_losses(tmp_path / "split") == step_losses(tmp_path / "straight")
    for rank in (0, 1):
        assert sample_keys(tmp_path / "split", rank) == sample_keys(tmp_path / "straight", rank)
    losses = step_losses(tmp_path / "straight")
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)), losses
    val_line = next(m for m in reversed(metrics(tmp_path / "straight")) if "val/llama/qa/loss" in m)
    assert {"val/mistral/qa/loss", "val/llama/qa/loss_no_context", "val/mistral/qa/loss_no_context"} <= set(val_line)
    assert any("train/llama/qa/loss" in m or "train/mistral/qa/loss" in m for m in metrics(tmp_path / "straight"))

    from arctrain.export.load import load_export
    from arctrain.export.write import export

    _, _, _, config = load_export(export(tmp_path / "straight", tmp_path / "hf"))
    assert config.segment_tokens == 256  # data.chunk_tokens
    assert "QA fine-tuning on" in (tmp_path / "hf" / "README.md").read_text()


def test_qa_files_are_checked_before_launch(tiny_models, tiny_shards, tmp_path):
    """A bad record is a counted skip named by file:line; a file without a usable record is one error line."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q", "answers": ["a"]}\n')
    args = [a for a in overrides(tiny_models, tiny_shards, tmp_path / "run") if not a.startswith("data.shards")]
    result = train_cli(*args, "data.shards=[]", f"data.qa.train={qa}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[0].startswith(f"warning: skipped {qa}:1: no_passage"), result.stderr
    assert lines[-1] == f"arctrain train: error: {qa}: no usable QA records (no_passage=1)"
    assert not (tmp_path / "run").exists()


def test_val_loss_is_reported_per_source_and_overall(tiny_models, tiny_shards, tmp_path):
    """Per source and overall; the no-context losses of later evaluations are the first's, and equal what a fresh
    evaluation after the same training steps computes (a run that evaluates only at its last step)."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    rows = {}
    for interval in (2, 4):
        run_dir = tmp_path / f"run-{interval}"
        args = overrides(
            tiny_models,
            f"{tiny_shards},{other}",
            run_dir,
            "train.steps=4",
            f"eval.interval={interval}",
            "eval.batches=2",
            "checkpoint.interval=100",
        )
        assert run(args, 1, tmp_path / f"log-{interval}") == [0]
        rows[interval] = [m for m in metrics(run_dir) if "val/llama/continuation/loss" in m]
    assert [m["step"] for m in rows[2]] == [2, 4] and [m["step"] for m in rows[4]] == [4]
    val, fresh = ({k: v for k, v in row.items() if k != "time"} for row in (rows[2][-1], rows[4][0]))
    assert val == fresh  # kept no-context losses, and with-context ones: evaluating does not change training
    assert rows[2][0]["val/llama/continuation/loss"] != val["val/llama/continuation/loss"]  # trained in between
    for decoder in ("llama", "mistral"):
        for task in ("reconstruction", "continuation"):
            for suffix in ("loss", "loss_no_context"):
                overall = val[f"val/{decoder}/{task}/{suffix}"]
                per_source = [val[f"val/{decoder}/{task}/{name}/{suffix}"] for name in (tiny_shards.name, "other")]
                # Overall is the token-weighted mean of the sources' losses.
                assert min(per_source) - 1e-9 <= overall <= max(per_source) + 1e-9, (overall, per_source)
