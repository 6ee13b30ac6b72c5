"""A rank that stops or dies ends every rank, with the cause in the log (comm.*_timeout_seconds, 2 gloo ranks).

The ranks are started as torchrun starts them (tests/test_train.py `launch`); here no torchrun is around to end the
others, so what ends rank 0 is arctrain's own collective timeout or the dead peer's closed connection.
"""

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train import launch, overrides, step_losses, wait, wait_for  # noqa: E402

from arctrain.train.loop import EXIT_COLLECTIVE_TIMEOUT  # noqa: E402

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
