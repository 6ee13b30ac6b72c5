"""Training-step benchmark: data-wait fraction, loader speed vs the trainer's consumption, memory per rank.

    python benchmarks/train_step.py --models artifacts/tiny --shards artifacts/shards --steps 40

Runs `arctrain train` (configs/tiny_cpu.yaml, DeepSpeed ZeRO-3, gloo on CPU) at world size 1 and 2, one after the
other on the same machine, and the data loader alone in this process. Reports, as ratios:
- data-wait fraction: time the training loop spent in `next(loader)` / step time (target < 1%);
- loader samples/s (one loader process, as each rank has) / the trainer's samples/s per rank (target >= 20x);
- per-rank parameter elements and peak RSS at world size 2 vs 1 (ZeRO-3 partitions everything, frozen decoders too).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def overrides(models: Path, shards: Path, run_dir: Path, steps: int, workers: int) -> list[str]:
    return [
        f"model.encoder_path={models / 'encoder'}",
        f"decoders.0.path={models / 'llama'}",
        f"decoders.1.path={models / 'mistral'}",
        f"data.shards={shards}",
        f"data.num_workers={workers}",
        f"checkpoint.dir={run_dir}",
        f"train.steps={steps}",
        f"checkpoint.interval={steps}",
        "logging.interval=5",
        "logging.wandb_mode=disabled",
        "eval.interval=0",
    ]


def train(world: int, args, run_dir: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--master_port=29631",
        "-m",
        "arctrain",
        "train",
        "--config",
        str(REPO / "configs/tiny_cpu.yaml"),
        *overrides(args.models, args.shards, run_dir, args.steps, args.workers),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // world))}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["step"] > 5]  # the first window includes start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers of the training runs")
    args = parser.parse_args()

    from loader import loader_rate

    from arctrain.config.load import load_config
    from arctrain.data import Vocab

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            results[world] = train(world, args, Path(tmp) / f"world{world}")
        cfg = load_config(REPO / "configs/tiny_cpu.yaml", overrides(args.models, args.shards, Path(tmp), 1, 0))
        loader = loader_rate(cfg, Vocab.from_config(cfg), batches=200, warmup=10)

    def mean(world: int, key: str) -> float:
        return statistics.mean(m[key] for m in results[world])

    micro = cfg.data.micro_batch_size
    print(f"tiny_cpu.yaml, micro-batch {micro}, {args.steps} steps, data.num_workers={args.workers}")
    print("world  samples/s (all ranks)  per rank  data-wait  param elements/rank  peak RSS GiB/rank")
    for world in (1, 2):
        print(
            f"{world:>5}  {mean(world, 'samples_per_s'):>21.1f}  {mean(world, 'samples_per_s') / world:>8.1f}  "
            f"{100 * mean(world, 'data_wait_fraction'):>8.2f}%  {results[world][-1]['param_elements_per_rank']:>19,.0f}"
            f"  {max(m['peak_memory_gb'] for m in results[world]):>17.2f}"
        )
    per_rank = mean(2, "samples_per_s") / 2
    ratio = loader / per_rank
    print(f"loader alone (1 process, 0 workers): {loader:.0f} samples/s = {ratio:.0f}x a rank's consumption")
    print(
        f"world 2 / world 1 per rank: parameter elements "
        f"{results[2][-1]['param_elements_per_rank'] / results[1][-1]['param_elements_per_rank']:.2f}x, "
        f"peak RSS {max(m['peak_memory_gb'] for m in results[2]) / max(m['peak_memory_gb'] for m in results[1]):.2f}x"
    )


if __name__ == "__main__":
    main()
