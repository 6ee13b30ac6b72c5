"""arctrain/checkpoint.py without a process group: what a resume is refused for, and the configs a run keeps."""

import json
from pathlib import Path

import pytest

from arctrain.checkpoint import TRAINER_STATE, Checkpointer, resume_fingerprint
from arctrain.config import load_config

REPO = Path(__file__).resolve().parents[1]


def config(*overrides: str):
    return load_config(REPO / "configs/tiny_cpu.yaml", list(overrides))


def written(run_dir: Path, cfg, world_size: int = 2) -> Checkpointer:
    """A run dir whose latest checkpoint was written under `cfg`."""
    tag = run_dir / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    state = {"step": 10, "next_batch": 10, "world_size": world_size, "fingerprint": resume_fingerprint(cfg)}
    (tag / TRAINER_STATE).write_text(json.dumps(state))
    (run_dir / "checkpoints" / "latest").write_text("step_00000010\n")
    return Checkpointer(run_dir, keep=2, rank=0)


@pytest.mark.parametrize(
    "changed, key, old, new",
    [
        ("data.micro_batch_size=4", "data.micro_batch_size", "8", "4"),
        ("train.grad_accum=2", "train.grad_accum", "1", "2"),
        ("train.seed=1", "train.seed", "0", "1"),
        ("data.task_ratio=0.2", "data.task_ratio", "0.5", "0.2"),
        ("data.shards=[a:1,b:2]", "data.shards", "['artifacts/shards:1']", "['a:1', 'b:2']"),
        ("decoders.1.weight=3", "decoders", "['llama:1', 'mistral:1']", "['llama:1', 'mistral:3']"),
        ("train.decoder_hold=4", "train.decoder_hold", "1", "4"),
    ],
)
def test_resume_with_changed_data_settings_is_refused_naming_the_key(tmp_path, changed, key, old, new):
    ckpt = written(tmp_path, config())
    with pytest.raises(ValueError) as err:
        ckpt.check_resumable(2, resume_fingerprint(config(changed)))
    assert str(err.value) == (
        f"{tmp_path / 'checkpoints' / 'step_00000010'} was written with {key}={old}, this run has {key}={new}: "
        f"resuming would change which samples follow; keep {key} or start a new run directory"
    )


def test_resume_with_changed_schedule_or_intervals_is_allowed(tmp_path):
    ckpt = written(tmp_path, config())
    ckpt.check_resumable(2, resume_fingerprint(config("train.steps=300", "optim.encoder_lr=1e-4", "eval.interval=7")))
    with pytest.raises(ValueError, match="written by 2 ranks; resume it with 2 ranks"):
        ckpt.check_resumable(1, resume_fingerprint(config()))


def test_every_launch_keeps_its_config(tmp_path):
    from arctrain.train import save_launch_config

    save_launch_config(config("train.steps=10"), tmp_path)
    save_launch_config(config("train.steps=20"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "launches").iterdir()) == ["config_001.yaml", "config_002.yaml"]
    assert load_config(tmp_path / "launches" / "config_001.yaml").train.steps == 10
    assert load_config(tmp_path / "config.yaml").train.steps == 20  # the newest launch's, read by export/eval
