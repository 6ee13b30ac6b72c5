"""The process group and the few collectives the trainer calls itself.

    rank, world_size, device = init_distributed()
    total = all_reduce(torch.tensor([n_tokens]), device)       # a tensor on `device`, summed over ranks
    if Preemption().agreed(device): ...

Every tensor handed to torch.distributed here is on the training device: NCCL (GPU runs) takes only CUDA tensors
and rejects CPU ones ("No backend type associated with device type cpu"); gloo (CPU runs) takes CPU tensors. The
device is an argument, never guessed, so a CPU test can check that it is honoured. A result is read on the host
(`.item()`, `.tolist()`) only by the caller, at a logging interval, not per micro-batch.
"""

import contextlib
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout
from torch.utils.cpp_extension import get_default_build_root

SUM, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """The process group from torchrun's, srun + torchrun's or the deepspeed launcher's environment (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_*); one process without them runs as a world of one. NCCL and the local GPU
    when CUDA is there, gloo and the CPU otherwise. Its collectives fail after `timeout_s` (comm.init_timeout_seconds:
    start-up and checkpoint loading, where rank 0 may convert a checkpoint alone; `set_collective_timeout` then
    shortens it for training)."""
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    if "RANK" not in os.environ:  # plain `arctrain train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        wait_for_extension_locks()  # DeepSpeed JIT-builds its CPU comm op in init_distributed
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def on_device(values: list[float], device: torch.device, dtype=torch.float64) -> torch.Tensor:
    """Host numbers as a tensor on `device`, without the host waiting for the device: a blocking copy to a GPU
    synchronizes its stream, a copy from pinned memory with non_blocking=True does not."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def all_reduce(tensor: torch.Tensor, device: torch.device, op=SUM) -> torch.Tensor:
    """`tensor` reduced over all ranks, as a new tensor on `device` (a collective: every rank calls it). NCCL
    reduces asynchronously on the GPU's stream: nothing waits until the result is read on the host."""
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out, op=op)
    return out


def reduce_floats(values: list[float], device: torch.device, op=SUM) -> list[float]:
    """Host numbers reduced over ranks in one collective (float64 on `device`), read back on the host."""
    return all_reduce(on_device(values, device), device, op).tolist()


def broadcast_object(obj, device: torch.device):
    """Rank 0's picklable `obj` on every rank (a collective). Its bytes travel as a tensor on `device`: under NCCL
    the training GPU, under gloo the CPU."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def barrier(device: torch.device) -> None:
    """Every rank waits here. NCCL's barrier is pinned to this rank's GPU (device_ids) so that it does not guess
    one; gloo has no device."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def set_collective_timeout(seconds: float) -> None:
    """Every later collective of the default process group fails after `seconds` instead of waiting on (torchtitan
    sets its comm.train_timeout_seconds the same way once training runs): a rank that stopped or died ends the
    others, whose error names the cause (`is_timeout`)."""

    _set_pg_timeout(timedelta(seconds=seconds), None)


@contextlib.contextmanager
def collective_timeout(seconds: float, then: float):
    """`seconds` inside (a checkpoint save: ranks finish writing at different times), `then` after."""
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        set_collective_timeout(then)


def is_timeout(err: BaseException) -> bool:
    """A collective that gave up waiting: gloo's "Timed out", NCCL's watchdog timeout."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def is_peer_gone(err: BaseException) -> bool:
    """A collective that failed because another rank's process ended: gloo's closed or reset connection, NCCL's
    "remote process exited"."""
    text = str(err).lower()
    gone = ("connection closed", "connection reset", "broken pipe", "remote process exited", "communicator was aborted")
    return isinstance(err, RuntimeError) and any(phrase in text for phrase in gone)


@contextlib.contextmanager
def hpz_group_once():
    """Build a model for ZeRO-3 with hpZ (zero_hpz_partition_size > 1) from several `from_pretrained` calls.

    Every `deepspeed.zero.Init` without an explicit `zero_param_parallel_group` creates DeepSpeed's node-local
    parameter group, and the second creation fails ("ZeRO parameter intra parallel group is already initialized");
    transformers' `from_pretrained` opens its own zero.Init and cannot pass the group. Inside this context the group
    is created by the first zero.Init and reused by the others (DeepSpeed 0.19)."""
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    from deepspeed.utils import groups

    create = groups._create_zero_param_parallel_group

    def once(group_size: int) -> None:
        if groups._get_zero_param_intra_parallel_group() is None:
            create(group_size)

    groups._create_zero_param_parallel_group = once
    try:
        yield
    finally:
        groups._create_zero_param_parallel_group = create


class Preemption:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it after each step with one tiny all-reduce."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (a collective: every rank calls it each step)."""
        return bool(all_reduce(on_device([float(self.flag)], device, torch.float32), device, MAX).item())


# --- stale JIT-build locks --------------------------------------------------------------------------------------


def extension_locks() -> list[Path]:
    """Lock files of torch JIT extension builds (DeepSpeed's ops): ROOT[/py311_cpu]/<op>/lock."""

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def lock_holders(lock: Path) -> list[int]:
    """Pids on this host that hold `lock` open: torch's FileBaton keeps the file open while it builds."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(lock) for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # gone, or another user's process
            continue
    return pids


def wait_for_extension_locks(stale_after_s: float = 600.0, poll_s: float = 2.0) -> None:
    """A build killed midway leaves its lock behind, and torch then waits on it forever without a word. Wait
    while some process on this host builds (or, with no holder here, while the lock is younger than
    `stale_after_s`: a node sharing this home may be building); then say in one line what to delete."""
    for lock in extension_locks():
        said = False
        while lock.exists():
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            holders = lock_holders(lock)
            if not holders and age > stale_after_s:
                raise ValueError(
                    f"{lock} is left over from a killed build of the DeepSpeed op {lock.parent.name} (no process "
                    f"holds it, {age / 60:.0f} min old): delete it (rm {lock}) and start again"
                )
            if not said:
                who = f"process {holders[0]}" if holders else "no process on this host; a build on another node?"
                print(f"waiting for {lock} ({who}); if no build runs, delete it", file=sys.stderr, flush=True)
                said = True
            time.sleep(poll_s)
