"""arctrain/checkpoint/checkpointer.py without a process group: refused resumes, the configs a run keeps."""

import json
from pathlib import Path

import pytest

from arctrain.checkpoint.checkpointer import TRAINER_STATE, Checkpointer, resume_fingerprint, training_state
from arctrain.config.load import load_config

REPO = Path(__file__).resolve().parents[2]


def config(*overrides: str):
    return load_config(REPO / "configs/tiny_cpu.yaml", list(overrides))


def written(run_dir: Path, cfg, world_size: int = 2) -> Checkpointer:
    """A run dir whose latest checkpoint was written under `cfg` by `world_size` ranks."""
    tag = run_dir / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    state = {
        "step": 10,
        "next_sample": 10 * world_size * cfg.train.grad_accum * cfg.data.micro_batch_size,
        "world_size": world_size,
        "grad_accum": cfg.train.grad_accum,
        "fingerprint": resume_fingerprint(cfg),
    }
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
        ckpt.check_resumable(2, resume_fingerprint(config(changed)), config(changed).train.grad_accum)
    assert str(err.value) == (
        f"{tmp_path / 'checkpoints' / 'step_00000010'} was written with {key}={old}, this run has {key}={new}: "
        f"resuming would change which samples follow; keep {key} or start a new run directory"
    )


def test_resume_with_changed_schedule_or_intervals_is_allowed(tmp_path):
    ckpt = written(tmp_path, config())
    changed = config("train.steps=300", "optim.encoder_lr=1e-4", "eval.interval=7")
    assert ckpt.check_resumable(2, resume_fingerprint(changed), 1) == 1


@pytest.mark.parametrize(
    "accum, world, accum_now, expected",
    [
        (1, 1, 1, 2),  # 2 ranks x 1 -> 1 rank: grad_accum adapts to 2
        (1, 1, 2, 2),  # ... or was set to 2 by hand
        (2, 4, 2, 1),  # 2 ranks x 2 -> 4 ranks x 1
        (1, 2, 1, 1),  # the same world size
        (
            1,
            1,
            3,
            "ran 2 micro-batches per step (2 ranks x train.grad_accum=1); 1 ranks x train.grad_accum=3 would "
            "change the global batch: use train.grad_accum=2, or start a new run directory",
        ),
        (
            1,
            3,
            1,
            "3 ranks x train.grad_accum=1 would change the global batch: resume on a number of ranks that "
            "divides 2, or start a new run directory",
        ),
        (
            2,
            8,
            2,
            "8 ranks x train.grad_accum=2 would change the global batch: resume on a number of ranks that divides 4",
        ),
    ],
)
def test_another_world_size_keeps_the_micro_batches_per_step_or_is_refused(tmp_path, accum, world, accum_now, expected):
    ckpt = written(tmp_path, config(f"train.grad_accum={accum}"), world_size=2)
    fingerprint = resume_fingerprint(config(f"train.grad_accum={accum_now}"))
    if isinstance(expected, int):
        assert ckpt.check_resumable(world, fingerprint, accum_now) == expected
        assert ckpt.elastic(world) == (world != 2)
        return
    with pytest.raises(ValueError) as err:
        ckpt.check_resumable(world, fingerprint, accum_now)
    assert str(err.value).startswith(f"{tmp_path / 'checkpoints' / 'step_00000010'} ")
    assert expected in str(err.value)


def test_every_launch_keeps_its_config(tmp_path):
    from arctrain.train.run_log import save_launch_config

    save_launch_config(config("train.steps=10"), tmp_path)
    save_launch_config(config("train.steps=20"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "launches").iterdir()) == ["config_001.yaml", "config_002.yaml"]
    assert load_config(tmp_path / "launches" / "config_001.yaml").train.steps == 10
    assert load_config(tmp_path / "config.yaml").train.steps == 20  # the newest launch's, read by export/eval


def test_a_checkpoint_of_the_old_per_rank_data_order_is_refused_on_several_ranks(tmp_path):
    """Before the data order was global (no next_sample in trainer_state.json) 2 ranks read other samples per step;
    one rank read the same ones, so only that resumes."""
    for world_size, refused in ((2, True), (1, False)):
        ckpt = written(tmp_path / str(world_size), config(), world_size=world_size)
        state_file = ckpt.dir / "step_00000010" / TRAINER_STATE
        state = json.loads(state_file.read_text())
        del state["next_sample"], state["grad_accum"]
        state_file.write_text(json.dumps({**state, "next_batch": 10}))
        if not refused:
            assert ckpt.check_resumable(1, resume_fingerprint(config()), 1) == 1
            continue
        with pytest.raises(ValueError, match="was written before the data order was made independent of the world"):
            ckpt.check_resumable(2, resume_fingerprint(config()), 1)


def test_the_checkpointer_decides_when_a_save_is_due(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2, rank=0, interval=3, last_step=10)
    assert [step for step in range(1, 11) if checkpointer.due(step)] == [3, 6, 9, 10]


def test_the_saved_state_holds_the_data_position_and_what_a_resume_checks():
    class Schedule:
        def state_dict(self) -> dict:
            return {"num_steps": 7}

    cfg = config("train.grad_accum=2")
    state = training_state({"step": 7, "bad_steps": 0, "skipped_steps": 1}, cfg, world_size=3, scheduler=Schedule())
    assert state["next_sample"] == 7 * 3 * 2 * cfg.data.micro_batch_size  # steps x ranks x micro-batches x samples
    assert (state["step"], state["skipped_steps"], state["world_size"], state["grad_accum"]) == (7, 1, 3, 2)
    assert state["fingerprint"] == resume_fingerprint(cfg) and state["lr_schedule"] == {"num_steps": 7}
