"""What a run directory holds besides checkpoints: the launch configs, data.json, logs, the closing summary."""

import json
import time
from pathlib import Path

from arctrain.config.load import save_config
from arctrain.config.schema import Config
from arctrain.data.shards import read_manifest

RUN_DATA = "data.json"  # in the run directory: record_run_data


def record_run_data(cfg: Config, run_dir: Path) -> None:
    """RUN_DIR/data.json: what the export needs to know about the training data, kept with the run (the shards may
    move or go): the segment length the encoder was trained on, per source. Written by rank 0 at every start."""
    if cfg.data.qa.train:
        sources = [{"qa": cfg.data.qa.train, "segment_tokens": cfg.data.chunk_tokens}]
    else:
        sources = [{"shards": d, "segment_tokens": read_manifest(d)["segment_tokens"]} for d, _ in cfg.data.sources]
    record = {"segment_tokens": sources[0]["segment_tokens"], "sources": sources}
    (run_dir / RUN_DATA).write_text(json.dumps(record, indent=1) + "\n")


def save_launch_config(cfg: Config, run_dir: Path) -> Path:
    """RUN_DIR/config.yaml (what export and eval read: the newest launch's) and RUN_DIR/launches/config_<n>.yaml,
    one per launch, so a resumed run keeps the settings of every segment it ran with."""

    launches = run_dir / "launches"
    launches.mkdir(parents=True, exist_ok=True)
    path = launches / f"config_{len(list(launches.glob('config_*.yaml'))) + 1:03d}.yaml"
    save_config(cfg, path)
    save_config(cfg, run_dir / "config.yaml")
    return path


def run_logger(run_dir: Path, rank: int):
    """Rank 0 prints and keeps the same lines in RUN_DIR/logs/train.log."""

    def say(message: str) -> None:
        if rank == 0:
            print(message)
            with open(run_dir / "logs" / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return say


class SampleLog:
    """One line per micro-batch: step, global micro-batch index and sample keys; lines past a resumed step are
    dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(path, resume_step)

    @classmethod
    def open(cls, logs: Path, rank: int, world_size: int, resume_step: int) -> "SampleLog":
        """This rank's log; rank 0 also truncates the logs of ranks a resume at a smaller world size lacks."""
        if rank == 0:
            for path in logs.glob("samples_rank*.jsonl"):
                if int(path.stem.removeprefix("samples_rank")) >= world_size:
                    _truncate_after(path, resume_step)
        return cls(logs / f"samples_rank{rank}.jsonl", resume_step)

    def write(self, step: int, b: int, keys: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "batch": b, "keys": keys}) + "\n")


def _truncate_after(path: Path, step: int) -> None:
    """Drop a JSON-lines log's lines past `step` (a resumed run repeats those steps)."""
    kept = []
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def print_summary(run_dir: Path) -> None:
    """Where things are, and the final val losses with and without compressed context."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    val = next((r for r in reversed(lines) if any(k.startswith("val/") for k in r)), None)
    print(
        f"\nrun dir:     {run_dir}\ncheckpoint:  {run_dir / 'checkpoints'} (latest: "
        f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()})\nmetrics:     {run_dir / 'metrics.jsonl'}\n"
        f"logs:        {run_dir / 'logs'}"
    )
    if val is None:
        return
    print(f"\nval loss at step {val['step']} (with compressed context vs no context):")
    for key in sorted(k for k in val if k.startswith("val/") and k.endswith("/loss")):
        no_ctx = val.get(key + "_no_context")
        versus = f"   vs {no_ctx:7.3f}" if no_ctx is not None else ""
        print(f"  {key[4:-5]:<28} {val[key]:7.3f}{versus}")
