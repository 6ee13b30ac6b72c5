"""ZeRO-3's prefetch trace survives a decoder switch: 2 gloo processes, steps alternating between the decoders.

DeepSpeed records the order of the modules of one forward and backward (PartitionedParameterCoordinator) and
prefetches by it; a step whose module order differs from the trace invalidates it ("Invalidate trace cache", logged
with zero_optimization.log_trace_cache_warnings) and the step after records a new one, without prefetch. The test
launches this file with `torchrun --standalone --nproc_per_node 2` (DS_ACCELERATOR=cpu) and counts the lines
(DeepSpeed prints them on rank 0) after a warm-up of one step per decoder.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import configs, corpus_texts, make_batch, torchrun_two_ranks  # noqa: E402

from arctrain.model import build_model  # noqa: E402
from arctrain.train.zero_trace import keep_trace_per_decoder  # noqa: E402

WARMUP = [("llama", "reconstruction"), ("mistral", "continuation")]
STEPS = [("llama", "continuation"), ("mistral", "reconstruction"), ("mistral", "continuation")] * 2
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition (and trace) even tiny tensors
        "stage3_prefetch_bucket_size": 10_000,  # prefetch a little ahead, as on a GPU
        "log_trace_cache_warnings": True,
    },
    "zero_allow_untested_optimizer": True,
}


def worker(tiny: Path, out: Path, placement: str, one_trace: bool = False) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model_cfg, decoder_cfgs = configs(tiny)
    replicated = ("llama", "mistral") if placement == "replicated" else ()
    torch.manual_seed(0)
    model = build_model(model_cfg, decoder_cfgs, ds_config=DS_CONFIG, replicated=replicated)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=1e-3), config=DS_CONFIG)
    if not one_trace:  # one_trace: DeepSpeed alone, the "before" of docs/benchmarks.md
        keep_trace_per_decoder(engine)  # as arctrain.train.loop.build_engine does
    texts = corpus_texts(tiny, heldout=False, limit=8)[4 * rank : 4 * rank + 4]
    for i, (decoder, task) in enumerate(WARMUP + STEPS):
        loss = engine(make_batch(tiny, model_cfg, decoder, task, texts), decoder).loss
        engine.backward(loss)
        engine.step()
        if rank == 0:  # between DeepSpeed's own lines, on the same stdout
            print(f"arctrain-test: step {i} ({decoder}) done", flush=True)


def invalidations_after_warmup(stdout: str) -> int:
    """'Invalidate trace cache' lines after the warm-up steps' markers."""
    marker = f"arctrain-test: step {len(WARMUP) - 1} "
    assert marker in stdout, stdout[-2000:]
    return stdout.split(marker, 1)[1].count("Invalidate trace cache")


@pytest.mark.distributed
@pytest.mark.parametrize("placement", ["partitioned", "replicated"])
def test_decoder_switches_keep_zero3s_prefetch_trace(tiny_models, tmp_path, placement):
    proc = torchrun_two_ranks(__file__, tiny_models, tmp_path, placement, timeout=600)
    assert f"arctrain-test: step {len(WARMUP + STEPS) - 1} " in proc.stdout
    # 4 decoder switches after the warm-up, none of which may throw the trace away.
    assert invalidations_after_warmup(proc.stdout) == 0, proc.stdout[-3000:]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], one_trace="--one-trace" in sys.argv)
