"""Session fixtures shared by the export, inference and evaluation tests (imported by those modules).

A real run: `arctrain train` on 2 gloo processes (ZeRO-3 partitions the trainable weights across both ranks, so
the export has to consolidate them), 4 steps, then `arctrain export`. Costs about 40 s of 2 CPU cores, once.

Each importing module gets its own copy of a fixture imported from here, so the work is also cached in the
session's base temp directory (a marker is written last): the second module reuses the first one's run.
"""

import shutil
from pathlib import Path

import pytest
from conftest import train_two_ranks

from arctrain.cli import main as arctrain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def trained_run(tiny_models, tiny_shards, tmp_path_factory) -> Path:
    """RUN_DIR of 4 training steps on 2 ranks, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.getbasetemp() / "export_run"
    if (run_dir / "done").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    args = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        f"data.shards={tiny_shards}",
        f"checkpoint.dir={run_dir}",
        "train.steps=4",
        "checkpoint.interval=2",
        "logging.interval=1",
        "logging.wandb_mode=disabled",
        "eval.interval=0",
    ]
    train_two_ranks(args, run_dir)
    (run_dir / "done").touch()
    return run_dir


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    out, done = tmp_path_factory.getbasetemp() / "exported", tmp_path_factory.getbasetemp() / "exported.done"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        arctrain(["export", "--run", str(trained_run), "--out", str(out)])
        done.touch()
    return out
