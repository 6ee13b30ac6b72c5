"""Metrics: per-interval losses, throughput, honest FLOPs and MFU, to stdout, metrics.jsonl and wandb.

FLOPs per token (DESIGN.md §6): the encoder trains, so forward + backward is about 6N per encoder token; a frozen
decoder runs forward (2N) and a backward for input gradients only (2N), about 4N per decoder token; the
projector trains (6N per projected vector). Attention's quadratic term is left out, as in the usual 6N estimate.
"""

import json
import resource
import secrets
import time
from pathlib import Path

import torch

from arctrain.config import LoggingConfig
from arctrain.data.sampling import CONTINUATION, RECONSTRUCTION
from arctrain.distributed import all_reduce

TASKS = (RECONSTRUCTION, CONTINUATION)
# Dense bf16 peak of one accelerator, by a substring of its name; MFU is reported only where it is known.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def numel(module: torch.nn.Module, trainable: bool | None = None) -> int:
    """Parameter count, correct under ZeRO-3 (where each rank holds a partition)."""
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in module.parameters()
        if trainable is None or p.requires_grad == trainable
    )


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class FlopCounter:
    def __init__(self, model: torch.nn.Module):
        self.enc = numel(model.encoder)
        self.proj = {name: numel(p) for name, p in model.projectors.items()}
        self.dec = {name: numel(d) for name, d in model.decoders.items()}

    def __call__(self, decoder: str, enc_tokens: int, vectors: int, dec_tokens: int) -> float:
        return 6 * self.enc * enc_tokens + 6 * self.proj[decoder] * vectors + 4 * self.dec[decoder] * dec_tokens


class LossMeter:
    """Token-weighted loss sums per (decoder, task) on this rank, kept on the training device and reduced over
    ranks when read: adding one is a device op (no host sync), reading is one collective."""

    def __init__(self, decoders: list[str], tasks: tuple[str, ...] = TASKS, device: torch.device | None = None):
        self.keys = [(d, t) for d in decoders for t in tasks]
        self.device = device or torch.device("cpu")
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
        self.samples = self.enc_tokens = self.dec_tokens = 0

    def count(self, decoder: str, counts) -> None:
        """`counts`: a batch's `BatchCounts` (arctrain/model/batch.py), computed in collate."""
        self.samples += counts.samples
        self.enc_tokens += counts.enc_tokens
        self.dec_tokens += counts.dec_tokens
        self.flop += self.flops(decoder, counts.enc_tokens, counts.vectors, counts.dec_tokens)

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
        }
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
