"""Every ZeRO choice of the config (train.zero_stage 3, 3 with hpZ, 2) builds and trains: 2 gloo processes.

The test launches this file with `torchrun --standalone --nproc_per_node 2` (DS_ACCELERATOR=cpu). For each choice,
rank by rank, `arctrain.train.loop.build_engine` builds the engine from configs/tiny_cpu.yaml exactly as a run does, and
one step of each decoder runs on the same batches; each rank writes what DeepSpeed made of it and the losses.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import corpus_texts, make_batch, torchrun_two_ranks  # noqa: E402

from arctrain.config.deepspeed import REPO_ROOT
from arctrain.config.load import load_config  # noqa: E402

# ZeRO-2 first: its replicated decoders must load before any ZeRO-3 build has made transformers' zero.Init live.
CHOICES = {"zero2": ["train.zero_stage=2"], "zero3": [], "zero3_hpz": ["train.zero_hpz=true"]}


def worker(tiny: Path, shards: Path, out: Path) -> None:
    from arctrain.distributed import init_distributed
    from arctrain.train.loop import build_engine
    from arctrain.train.optim import set_lr

    paths = [
        f"model.encoder_path={tiny / 'encoder'}",
        f"decoders.0.path={tiny / 'llama'}",
        f"decoders.1.path={tiny / 'mistral'}",
        f"data.shards={shards}",
        f"checkpoint.dir={out / 'run'}",
    ]
    # Loaded before the process group, as `arctrain train` does (DeepSpeed's validation reads the world size).
    configs = {name: load_config(REPO_ROOT / "configs/tiny_cpu.yaml", paths + o) for name, o in CHOICES.items()}
    rank, world_size, _ = init_distributed()
    texts = corpus_texts(tiny, heldout=False, limit=8)[4 * rank : 4 * rank + 4]
    result = {}
    for name, cfg in configs.items():
        engine, model, scheduler = build_engine(cfg, world_size, say=lambda *_: None)
        losses = []
        for decoder in ("llama", "mistral", "llama"):
            set_lr(scheduler, cfg.optim.warmup_steps - 1, decoder)  # the peak learning rates
            loss = engine(make_batch(tiny, cfg.model, decoder, "reconstruction", texts), decoder).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        result[name] = {
            "stage": engine.zero_optimization_stage(),
            "hpz": engine.zero_hpz_partition_size(),
            "replicated": sorted(model.replicated),
            "encoder_partitioned": hasattr(next(model.encoder.parameters()), "ds_id"),
            "losses": losses,
        }
        engine.destroy()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_every_zero_choice_builds_and_trains(tiny_models, tiny_shards, tmp_path):
    torchrun_two_ranks(__file__, tiny_models, tiny_shards, tmp_path, timeout=900)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (result["zero3"]["stage"], result["zero3"]["hpz"]) == (3, 1)
        assert (result["zero3_hpz"]["stage"], result["zero3_hpz"]["hpz"]) == (3, 2)  # the 2 ranks of this "node"
        assert result["zero3"]["encoder_partitioned"] and result["zero3_hpz"]["encoder_partitioned"]
        assert result["zero2"]["stage"] == 2 and not result["zero2"]["encoder_partitioned"]
        assert result["zero2"]["replicated"] == ["llama", "mistral"]  # ZeRO-2 partitions no weights
        for name in CHOICES:
            first, _, again = result[name]["losses"]
            assert torch.isfinite(torch.tensor(result[name]["losses"])).all() and again < first, (name, result)
        # The same model, data and learning rates: the first step's loss does not depend on the ZeRO choice.
        firsts = [result[name]["losses"][0] for name in CHOICES]
        assert max(firsts) - min(firsts) < 1e-4 * max(firsts), firsts


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
