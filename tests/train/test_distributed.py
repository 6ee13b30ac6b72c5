"""arctrain/distributed.py and every collective the trainer calls: the tensors handed to torch.distributed are on
the training device given (NCCL takes only CUDA tensors), checked with a spy on CPU, where `meta` stands in for a
device other than the CPU. The real 2-rank gloo runs are in tests/train/test_train.py."""

import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from arctrain import distributed
from arctrain.distributed import MAX, Preemption, all_reduce, barrier, reduce_floats

REPO = Path(__file__).resolve().parents[2]
META = torch.device("meta")  # not the CPU: a helper that ignores the device it is given hands over a CPU tensor


class Reached(Exception):
    """Raised by the spy once the collective has been seen: a meta tensor's value cannot be read back."""


@pytest.fixture
def spy(monkeypatch):
    seen = []

    def all_reduce_spy(tensor, op=dist.ReduceOp.SUM, **kwargs):
        seen.append((tensor.device, tensor.dtype, op))
        raise Reached

    monkeypatch.setattr(dist, "all_reduce", all_reduce_spy)
    return seen


def test_all_reduce_and_reduce_floats_use_the_given_device(spy):
    with pytest.raises(Reached):
        all_reduce(torch.ones(3), META)
    with pytest.raises(Reached):
        reduce_floats([1.0, 2.0], META, MAX)
    assert spy == [(META, torch.float32, dist.ReduceOp.SUM), (META, torch.float64, MAX)]


def test_preemption_agreement_uses_the_given_device(spy):
    with pytest.raises(Reached):
        Preemption().agreed(META)
    assert spy == [(META, torch.float32, MAX)]


def test_loss_meter_keeps_and_reduces_its_sums_on_the_device(spy):
    from arctrain.train.metrics import LossMeter

    meter = LossMeter(["llama"], ("continuation",), META)
    meter.add("llama", "continuation", torch.tensor(2.0, device=META), 7)
    assert meter.sums.device == META  # accumulated on the device: no host sync per micro-batch
    with pytest.raises(Reached):
        meter.reduce("train")
    assert spy == [(META, torch.float64, dist.ReduceOp.SUM)]


def test_train_step_counts_tokens_on_the_device_before_any_forward(spy):
    """The step's global target count is reduced from the batches' CPU-side counts, on the device."""
    from arctrain.data.batch import BatchStats
    from arctrain.train.loop import train_step

    class Batch:
        decoder, task = "llama", "continuation"
        stats = BatchStats(
            samples=2, enc_tokens=10, enc_pairs=50, pooled_pairs=30, vectors=5, dec_tokens=12, dec_pairs=40, targets=4
        )

    class Engine:
        def __call__(self, *args):
            raise AssertionError("forward before the token count")

    with pytest.raises(Reached):
        train_step(Engine(), [Batch(), Batch()], META, world_size=2)
    assert spy == [(META, torch.float64, dist.ReduceOp.SUM)]


def test_barrier_names_the_gpu_under_nccl(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: calls.append(kwargs))
    barrier(torch.device("cuda", 3))
    barrier(torch.device("cpu"))
    assert calls == [{"device_ids": [3]}, {}]


def test_no_collective_outside_distributed_py():
    """Every all-reduce and barrier goes through arctrain/distributed.py (which takes the device)."""
    pattern = re.compile(r"\b(dist|torch\.distributed)\.(all_reduce|all_gather|reduce_scatter|barrier)\(")
    offenders = [
        f"{path.relative_to(REPO)}:{i}"
        for path in (REPO / "arctrain").rglob("*.py")
        if path.name != "distributed.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_a_gloo_world_of_one_reduces_for_real(tmp_path):
    """The helpers with a real process group (gloo, one rank): values come back reduced and on the device."""
    if dist.is_initialized():
        pytest.skip("a process group exists already")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        out = all_reduce(torch.tensor([1.5, 2.0]), torch.device("cpu"), MAX)
        assert out.tolist() == [1.5, 2.0] and out.device.type == "cpu"
        assert reduce_floats([3.0], torch.device("cpu")) == [3.0]
        assert Preemption().agreed(torch.device("cpu")) is False
    finally:
        dist.destroy_process_group()


def test_a_stale_extension_lock_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A build killed midway leaves ROOT/<py_cpu>/<op>/lock; with no process holding it, the start says what to
    delete instead of waiting forever. A held lock (a live build) is waited for."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert distributed.extension_locks() == [lock]
    assert distributed.lock_holders(lock) == []
    with pytest.raises(ValueError) as err:
        distributed.wait_for_extension_locks()
    assert str(err.value).startswith(f"{lock} is left over from a killed build of the DeepSpeed op deepspeed_shm_comm")
    assert f"rm {lock}" in str(err.value)

    with open(lock):  # a live builder keeps the file open: we wait, and go on once it is released
        assert distributed.lock_holders(lock) == [os.getpid()]
        monkeypatch.setattr(distributed.time, "sleep", lambda s: lock.unlink())
        distributed.wait_for_extension_locks()
    assert not lock.exists()
