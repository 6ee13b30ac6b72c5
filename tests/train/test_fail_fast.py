"""A rank that stops or dies ends every rank, with the cause in the log (comm.*_timeout_seconds, 2 gloo ranks).

The ranks are started as torchrun starts them (tests/helpers.py `launch`); here no torchrun is around to end the
others, so what ends rank 0 is arctrain's own collective timeout or the dead peer's closed connection.
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import latest, launch, overrides, step_losses, wait, wait_for  # noqa: E402

from arctrain.train.fail_fast import EXIT_COLLECTIVE_TIMEOUT, EXIT_RANK_FAILED  # noqa: E402

SHORT = ["train.steps=100000", "checkpoint.interval=100000", "comm.train_timeout_seconds=5"]


def _training(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and len(step_losses(run_dir)) >= 3


@pytest.mark.distributed
def test_a_stopped_rank_ends_the_others_with_the_cause_logged(tiny_models, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    procs = launch(overrides(tiny_models, tiny_shards, run_dir, *SHORT), 2, tmp_path / "log")
    try:
        wait_for(lambda: _training(run_dir))
        procs[1].send_signal(signal.SIGSTOP)  # a hung GPU, a stalled filesystem
        assert wait(procs[:1], timeout=300) == [EXIT_COLLECTIVE_TIMEOUT]
    finally:
        procs[1].kill()  # what torchrun does to the rest of the node once rank 0 has ended
        procs[1].wait()
    log = (tmp_path / "log.rank0").read_text()
    assert "rank 0: a collective waited longer than comm.train_timeout_seconds=5" in log, log[-2000:]


@pytest.mark.distributed
def test_a_killed_rank_ends_the_others(tiny_models, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(tiny_models, tiny_shards, run_dir, *SHORT[:2], "checkpoint.interval=1")  # saves all the time
    procs = launch(args, 2, tmp_path / "log")
    try:
        wait_for(lambda: _training(run_dir))
        procs[1].send_signal(signal.SIGKILL)
        assert wait(procs[:1], timeout=300)[0] != 0
    finally:
        procs[1].wait()


@pytest.mark.distributed
def test_an_exception_on_one_rank_ends_every_rank_with_its_cause(tiny_models, tiny_shards, tmp_path, monkeypatch):
    """Rank 1 raises inside its 3rd step (arctrain/faults.py); the collective timeout is 600 s away, so rank 0 can end
    only because rank 1 told it (FailureWatch), and its log names rank 1's error."""
    monkeypatch.setenv("ARCTRAIN_FAULT", "train_step:1:3:raise")
    run_dir = tmp_path / "run"
    args = overrides(tiny_models, tiny_shards, run_dir, *SHORT[:2], "comm.train_timeout_seconds=600")
    procs = launch(args, 2, tmp_path / "log")
    assert wait(procs, timeout=600) == [EXIT_RANK_FAILED, 1]
    cause = "rank 1 failed: InjectedFault: injected fault at train_step #3"
    rank0, rank1 = (tmp_path / "log.rank0").read_text(), (tmp_path / "log.rank1").read_text()
    assert f"arctrain train: error: rank 0: ending, {cause}" in rank0, rank0[-2000:]
    assert "Traceback" in rank1 and f"arctrain train: error: {cause}" in rank1, rank1[-2000:]
    assert "timeout" not in rank0.lower()


@contextlib.contextmanager
def _fault(spec: str):
    os.environ["ARCTRAIN_FAULT"] = spec  # launch() hands os.environ to the ranks
    try:
        yield
    finally:
        del os.environ["ARCTRAIN_FAULT"]


@pytest.fixture(scope="module")
def killed_in_save(tiny_models, tiny_shards, tmp_path_factory) -> tuple[Path, Path]:
    """4 steps, a checkpoint every 2; rank 1 is SIGKILLed inside the second save, its partition written, nothing else.
    (run dir, log prefix)."""
    root = tmp_path_factory.mktemp("killed_in_save")
    run_dir = root / "run"
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=4", "checkpoint.interval=2", *SHORT[2:])
    with _fault("checkpoint_save:1:2:kill"):
        codes = wait(launch(args, 2, root / "log"), timeout=600)
    assert codes == [EXIT_RANK_FAILED, -signal.SIGKILL], (root / "log.rank0").read_text()[-2000:]
    return run_dir, root / "log"


@pytest.mark.distributed
def test_a_rank_killed_inside_a_save_leaves_latest_on_the_previous_checkpoint(
    killed_in_save, tiny_models, tiny_shards, tmp_path
):
    run_dir, log = killed_in_save
    rank0 = Path(f"{log}.rank0").read_text()
    assert "rank 0: ending, another rank's process ended (killed, out of host memory?)" in rank0, rank0[-2000:]
    assert latest(run_dir) == "step_00000002"
    partial = run_dir / "checkpoints" / "step_00000004"  # rank 1 died after DeepSpeed's files, before its RNG state
    assert partial.is_dir() and not (partial / "rng_rank1.pt").exists()

    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=4", "checkpoint.interval=2", *SHORT[2:])
    assert wait(launch(args, 2, tmp_path / "resume"), timeout=600) == [0, 0]
    assert "resumed from step 2" in (tmp_path / "resume.rank0").read_text()
    assert latest(run_dir) == "step_00000004" and sorted(step_losses(run_dir)) == [1, 2, 3, 4]


@pytest.mark.distributed
def test_a_slow_rank_0_conversion_does_not_trip_the_train_timeout(killed_in_save, tiny_models, tiny_shards, tmp_path):
    """train.init_from: rank 0 consolidates the checkpoint alone, 12 s slower than usual, while rank 1 waits in a
    collective; the train timeout (5 s) would end it, the init timeout (comm.init_timeout_seconds) does not."""
    source, _ = killed_in_save
    run_dir = tmp_path / "run"
    args = overrides(
        tiny_models,
        tiny_shards,
        run_dir,
        "train.steps=2",
        "checkpoint.interval=2",
        *SHORT[2:],
        f"train.init_from={source}",
        "comm.init_timeout_seconds=120",
    )
    with _fault("convert:0:1:sleep12"):
        codes = wait(launch(args, 2, tmp_path / "log"), timeout=600)
    rank0 = (tmp_path / "log.rank0").read_text()
    assert codes == [0, 0], rank0[-2000:]
    assert "ARCTRAIN_FAULT: sleep12 at convert #1" in rank0 and "initialised " in rank0
    assert sorted(step_losses(run_dir)) == [1, 2]
