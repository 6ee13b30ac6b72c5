"""Metrics: per-interval losses, throughput, FLOPs and MFU (the FLOP model is arctrain/model/flops.py), to stdout,
metrics.jsonl and wandb."""

import json
import resource
import secrets
import time
from pathlib import Path

import torch

from arctrain.config.schema import LoggingConfig
from arctrain.data.sampling import CONTINUATION, RECONSTRUCTION
from arctrain.distributed import all_reduce
from arctrain.model.flops import FlopCounter, peak_tflops  # noqa: F401  (their home is arctrain/model/flops.py)

TASKS = (RECONSTRUCTION, CONTINUATION)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class LossMeter:
    """Token-weighted loss sums per (decoder, task) on this rank, kept on the training device and reduced over
    ranks when read: adding one is a device op (no host sync), reading is one collective."""

    def __init__(self, decoders: list[str], tasks: tuple[str, ...], device: torch.device):
        self.keys = [(d, t) for d in decoders for t in tasks]
        self.device = device  # the training device: NCCL reduces only tensors on the GPU
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(
            len(self.keys), 2, dtype=torch.float64, device=self.device
        )  # (K, [loss*tokens, tokens])

    def add(self, decoder: str, task: str, loss: torch.Tensor, n_tokens: int) -> None:
        """`loss`: the mean cross-entropy (a device scalar) over `n_tokens` target tokens (a host count)."""
        i = self.keys.index((decoder, task))
        self.sums[i, 0] += loss.detach().to(torch.float64) * n_tokens
        self.sums[i, 1] += n_tokens

    def reduce(self, prefix: str, suffix: str = "loss") -> dict[str, float]:
        """`{prefix}/{decoder}/{task}/{suffix}` averaged over all ranks' tokens (a collective: every rank calls)."""
        sums = all_reduce(self.sums, self.device).tolist()
        return {f"{prefix}/{d}/{t}/{suffix}": s / n for (d, t), (s, n) in zip(self.keys, sums) if n > 0}


class Window:
    """Time, data wait and what was processed over one logging interval, from the batches' CPU-side counts."""

    def __init__(self, flops: FlopCounter):
        self.flops = flops
        self.reset()

    def reset(self) -> None:
        self.time = self.wait = self.flop = 0.0
        self.samples = self.enc_tokens = self.dec_tokens = self.dropped_tokens = self.skipped_rows = 0
        self.over_budget = self.budget_full = 0
        self.enc_computed = self.dec_computed = 0  # positions the kernels ran, padding included

    def count(self, decoder: str, stats) -> None:
        """`stats`: a batch's `BatchStats` (arctrain/data/batch.py), computed in collate on the CPU."""
        self.samples += stats.samples
        self.enc_tokens += stats.enc_tokens
        self.dec_tokens += stats.dec_tokens
        self.dropped_tokens += stats.dropped_tokens
        self.skipped_rows += stats.skipped_rows
        self.over_budget += stats.over_budget
        self.budget_full += stats.budget_full
        self.enc_computed += stats.enc_computed if stats.enc_computed >= 0 else stats.enc_tokens
        self.dec_computed += stats.dec_computed if stats.dec_computed >= 0 else stats.dec_tokens
        self.flop += self.flops(decoder, stats)  # real tokens only (BatchStats counts no padding)

    def rates(self, world_size: int, peak: float | None) -> dict[str, float]:
        """Per-rank rates averaged over the window, and the fraction of step time spent waiting for data."""
        seconds = max(self.time, 1e-9)
        out = {
            "samples_per_s": self.samples * world_size / seconds,
            "enc_tokens_per_s": self.enc_tokens * world_size / seconds,
            "dec_tokens_per_s": self.dec_tokens * world_size / seconds,
            "tflops_per_rank": self.flop / seconds / 1e12,
            "data_wait_fraction": self.wait / seconds,
            "peak_memory_gb": peak_memory_gb(),
            # Fraction of computed positions that are padding (packed micro-batches: 0).
            "padding/encoder": 1 - self.enc_tokens / max(self.enc_computed, 1) if self.enc_computed else 0.0,
            "padding/decoder": 1 - self.dec_tokens / max(self.dec_computed, 1) if self.dec_computed else 0.0,
        }
        if self.dropped_tokens:  # data.max_chunks cut contexts short: this rank's count over the window
            out["context_tokens_dropped"] = self.dropped_tokens
        if self.skipped_rows:  # examples with no target left out of their batches: this rank's count over the window
            out["rows_without_target_skipped"] = self.skipped_rows
        if self.over_budget:  # samples larger than data.tokens_per_micro_batch on their own: this rank's count
            out["samples_over_budget_skipped"] = self.over_budget
        if self.budget_full:  # samples of a window left because the token budget was full: this rank's count
            out["samples_left_by_budget"] = self.budget_full
        if peak is not None:
            out["mfu"] = out["tflops_per_rank"] / peak
        return out


class MetricsLogger:
    """Rank 0 writes stdout, RUN_DIR/metrics.jsonl and wandb; other ranks only take part in reductions."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, rank: int, config: dict, resume_step: int):
        self.rank, self.path, self.wandb = rank, run_dir / "metrics.jsonl", None
        if rank != 0:
            return
        self._truncate_after(resume_step)
        if cfg.wandb_mode != "disabled":
            self.wandb = _init_wandb(run_dir, cfg, config)

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines so each step appears once."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in lines))

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        if self.rank != 0:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if not k.startswith("lr/"))
            print(f"step {step}: {shown}", flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _init_wandb(run_dir: Path, cfg: LoggingConfig, config: dict):
    """A wandb run whose id is kept in the run dir, so that a resumed training continues the same wandb run."""
    # wandb only when logging.wandb_mode is not disabled
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        mode=cfg.wandb_mode,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=config,
        name=run_dir.name,
    )
