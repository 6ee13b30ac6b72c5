"""How a rank ends when something fails: at once, every rank, the cause in one line (docs/usage.md, GPU notes).

    watch_failures(rank, world_size)     # after init_distributed: another rank's failure ends this one
    ...train...
    except Exception as err: end_failed_rank(cfg.comm, err)    # never returns
    stop_watching()                      # a normal end

A rank that raises (a bad batch, an out-of-memory, a bug) prints its traceback and cause, tells every rank through the
FailureWatch and exits 1; the others print that cause and exit EXIT_RANK_FAILED within seconds, wherever they wait.
A rank that stops (SIGSTOP, a hung GPU) or dies (SIGKILL) tells nobody: the others' collectives time out
(comm.*_timeout_seconds: EXIT_COLLECTIVE_TIMEOUT) or, under gloo, fail at once on the closed connection. Nothing is
torn down on the way out (destroying the process group would wait for the others): torchrun ends the node's other
ranks and srun (--kill-on-bad-exit=1) the other nodes.
"""

import contextlib
import os
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch.distributed as dist

from arctrain.distributed import is_peer_gone, is_timeout

EXIT_COLLECTIVE_TIMEOUT = 4  # a collective timed out (comm.*_timeout_seconds): another rank stopped or died
EXIT_RANK_FAILED = 5  # another rank raised or died; the cause is in this rank's log (the failing rank exits 1)


class FailureWatch:
    """A rank that fails tells every rank at once, so that none waits for its collective timeout.

    A rank whose peer raised is stuck in a collective (NCCL notices a dead peer only at its timeout), so its main
    thread cannot act; a thread blocked in a wait on torch's TCPStore (the rendezvous store at MASTER_ADDR:MASTER_PORT,
    on a connection of its own) can, and the wait costs nothing while training runs: no per-step host sync. The
    failing rank writes its cause and wakes every rank's watch, which prints the cause and ends its process
    (`on_failure`). At the end of a run each rank wakes its own watch with no cause, and it ends quietly."""

    def __init__(self, rank: int, world_size: int, on_failure):

        self.rank, self.world_size, self.on_failure = rank, world_size, on_failure
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        self.prefix = f"arctrain/failure/{attempt}"
        # Two connections: a TCPStore client runs one request at a time, and the watch's wait never returns early.
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.waiter, self.store = (
            dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=300)) for _ in range(2)
        )
        self.thread = threading.Thread(target=self._watch, name="arctrain-failure-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            while True:
                try:
                    self.waiter.wait([f"{self.prefix}/wake/{self.rank}"], timedelta(days=7))
                    break
                except dist.DistStoreError:  # a week went by: wait on
                    continue
            key = f"{self.prefix}/cause"
            cause = self.waiter.get(key).decode() if self.waiter.check([key]) else ""
        except dist.DistError:  # the store's host ended: the run is over, or its collectives will say what happened
            return
        if cause:
            self.on_failure(cause)

    def report(self, cause: str) -> None:
        """Tell every rank that this one fails, and why (one line)."""
        try:
            self.store.set(f"{self.prefix}/cause", cause)
            for rank in range(self.world_size):
                if rank != self.rank:  # this rank ends itself, with its own exit code
                    self.store.set(f"{self.prefix}/wake/{rank}", "1")
            time.sleep(1.0)  # the store may live in this process (rank 0 without torchrun): let the wake-ups leave
        except dist.DistError:
            pass

    def cause(self, wait_s: float) -> str | None:
        """Another rank's reported cause, waiting up to `wait_s` for it (a dead peer's connection closes at once,
        its report may come a moment later)."""
        deadline = time.time() + wait_s
        while True:
            try:
                if self.store.check([f"{self.prefix}/cause"]):
                    return self.store.get(f"{self.prefix}/cause").decode()
            except dist.DistError:
                return None
            if time.time() > deadline:
                return None
            time.sleep(0.2)

    def close(self) -> None:
        """The run ended normally: the watch ends without a word."""
        with contextlib.suppress(dist.DistError):
            self.store.set(f"{self.prefix}/wake/{self.rank}", "")
        # Wait for the watch to leave the store: a thread still inside a TCPStore call when the interpreter exits
        # aborts the process ("terminate called without an active exception"), failing a run that completed.
        self.thread.join(timeout=30)


_watch: list[FailureWatch] = []  # this process's watch, beside torch.distributed's own default group


def watch_failures(rank: int, world_size: int) -> None:
    """Start this rank's FailureWatch (several ranks only): another rank's report ends this process."""
    if world_size > 1 and not _watch:
        try:
            _watch.append(FailureWatch(rank, world_size, _ended_by_another_rank))
        except (dist.DistError, KeyError, ValueError) as err:  # no store to reach: the collective timeouts still hold
            print(
                f"arctrain train: rank {rank}: no failure watch ({err}); a failing rank ends the others only "
                f"through comm.train_timeout_seconds",
                file=sys.stderr,
            )


def report_failure(cause: str) -> None:
    """Every rank's watch hears `cause` (a no-op without a watch)."""
    for watch in _watch:
        watch.report(cause)


def reported_cause(wait_s: float = 5.0) -> str | None:
    """The cause another rank reported, waiting up to `wait_s` for it; None without one."""
    return _watch[0].cause(wait_s) if _watch else None


def stop_watching() -> None:
    while _watch:
        _watch.pop().close()


def _ended_by_another_rank(cause: str) -> None:
    print(f"arctrain train: error: rank {os.environ.get('RANK', '0')}: ending, {cause}", file=sys.stderr, flush=True)
    os._exit(EXIT_RANK_FAILED)


def end_failed_rank(comm, err: Exception) -> None:
    """End this rank at once, the cause in one line (and every other rank: told through the FailureWatch, or by a
    collective that fails). No teardown: destroying the process group would wait for the others; torchrun then
    ends this node's ranks and srun (--kill-on-bad-exit) the other nodes."""
    rank = os.environ.get("RANK", "0")
    short = " ".join(str(err).split())[:300]
    if is_timeout(err):
        code = EXIT_COLLECTIVE_TIMEOUT
        line = (
            f"rank {rank}: a collective waited longer than comm.train_timeout_seconds={comm.train_timeout_seconds:g} "
            f"(comm.init_timeout_seconds={comm.init_timeout_seconds:g} in start-up and saves): another rank "
            f"stopped, died or fell far behind; no checkpoint was saved ({short[:200]})"
        )
    elif is_peer_gone(err):
        code = EXIT_RANK_FAILED
        cause = reported_cause(wait_s=5.0)
        if not cause:  # an empty report is no cause either
            cause = (
                "another rank's process ended (killed, out of host memory?): its own log and the job's say why; no "
                f"checkpoint was saved ({short[:200]})"
            )
        line = f"rank {rank}: ending, {cause}"
    else:
        traceback.print_exc()
        cause = f"rank {rank} failed: {type(err).__name__}: {short} (traceback in rank {rank}'s log)"
        code = 1
        line = cause
        report_failure(cause)
    print(f"arctrain train: error: {line}", file=sys.stderr, flush=True)
    os._exit(code)
