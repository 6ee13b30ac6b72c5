"""ZeRO-3 (arctrain/model under DeepSpeed): the full model with both decoders, built partitioned, in 2 gloo
processes, against a single-process reference.

The test launches this file with `torchrun --standalone --nproc_per_node 2` (DS_ACCELERATOR=cpu). Each rank builds
the model with a ZeRO-3 config (decoders and encoder partitioned by `from_pretrained` under `zero.Init`, projectors
and special vectors under `zero.Init`), activation checkpointing on in the encoder and the decoders, runs one
micro-batch per decoder (llama reconstruction, mistral continuation, different texts per rank) with the
cross-entropy in chunks of 3 targets (the partitioned LM head gathered in forward and backward), steps, and writes
its losses; rank 0 writes the initial trainable weights and the full averaged gradients of a few parameters.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import configs, corpus_texts, make_batch, torchrun_two_ranks  # noqa: E402

from arctrain.model import build_model  # noqa: E402

MICRO_BATCHES = [("llama", "reconstruction"), ("mistral", "continuation")]
CHECKED_GRADS = [
    "projectors.llama.0.weight",
    "projectors.mistral.1.weight",
    "specials.mistral.cont",
    "specials.llama.rec",
    "encoder.layers.3.mlp.down_proj.weight",
    "encoder.embed_tokens.weight",
]
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": len(MICRO_BATCHES),
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even tiny tensors
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 1.0,
}


def rank_texts(tiny: Path, rank: int) -> list[str]:
    return corpus_texts(tiny, heldout=False, limit=8)[4 * rank : 4 * rank + 4]


def worker(tiny: Path, out: Path) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model_cfg, decoder_cfgs = configs(tiny, loss_chunk_tokens=3)  # the loss in chunks; the reference in one piece
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = build_model(model_cfg, decoder_cfgs, ds_config=DS_CONFIG, gradient_checkpointing=True)
    model.enable_decoder_checkpointing()
    weight = model.decoders["mistral"].lm_head.weight
    partitioned = weight.numel() == 0 and weight.ds_tensor.numel() < weight.ds_numel
    named = dict(model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([named[n] for n in named if n.startswith(("projectors", "specials"))]):
        if rank == 0:
            torch.save(
                {n: p.detach().clone() for n, p in named.items() if n.startswith(("projectors", "specials"))},
                out / "initial_trainable.pt",
            )
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    losses = []
    for i, (decoder, task) in enumerate(MICRO_BATCHES):
        output = engine(make_batch(tiny, model_cfg, decoder, task, rank_texts(tiny, rank)), decoder)
        engine.backward(output.loss)
        losses.append(output.loss.item())
        if i < len(MICRO_BATCHES) - 1:
            engine.step()  # DeepSpeed counts micro-batches in step(): only the last one updates
    grads = {n: safe_get_full_grad(named[n]) for n in CHECKED_GRADS}  # collective: every rank calls it
    n_with_grad = sum(safe_get_full_grad(p) is not None for p in trainable)
    engine.step()
    after = engine(make_batch(tiny, model_cfg, "llama", "reconstruction", rank_texts(tiny, rank)), "llama").loss
    # Parameters DeepSpeed gathers with ARCModel's every forward and backward, besides its own: after steps of both
    # decoders, none (the LM head of the decoder in use is gathered by the loss alone, while it runs).
    names = {id(p): n for n, p in model.named_parameters()}
    external = sorted(names.get(id(p), "?") for _, p in engine.module.ds_external_parameters())
    if rank == 0:
        torch.save({n: g.clone() for n, g in grads.items()}, out / "grads.pt")
    result = {
        "losses": losses,
        "after_step": after.item(),
        "partitioned": partitioned,
        "n_trainable": len(trainable),
        "n_with_grad": n_with_grad,
        "external": external,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_zero3_two_processes_match_a_single_process(tiny_models, tmp_path):
    torchrun_two_ranks(__file__, tiny_models, tmp_path, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["partitioned"] and r["n_with_grad"] == r["n_trainable"] for r in ranks)
    assert [r["external"] for r in ranks] == [[], []]  # no LM head stays gathered with the whole model

    # The same computation in one process, from the same initial weights.
    model_cfg, decoder_cfgs = configs(tiny_models)
    model = build_model(model_cfg, decoder_cfgs).train()
    missing, unexpected = model.load_state_dict(torch.load(tmp_path / "initial_trainable.pt"), strict=False)
    assert not unexpected and all(n.startswith(("encoder", "decoders")) for n in missing)
    for rank, result in enumerate(ranks):
        for (decoder, task), loss in zip(MICRO_BATCHES, result["losses"], strict=True):
            reference = model(make_batch(tiny_models, model_cfg, decoder, task, rank_texts(tiny_models, rank)), decoder)
            # DeepSpeed scales each micro-batch by 1/accumulation steps and averages ranks.
            (reference.loss / len(MICRO_BATCHES) / 2).backward()
            assert abs(reference.loss.item() - loss) < 1e-4 * max(1.0, loss), (rank, decoder, task)
        after = result["after_step"]
        assert torch.isfinite(torch.tensor(after)) and abs(after - result["losses"][0]) > 1e-4  # the step took effect
    grads = torch.load(tmp_path / "grads.pt")
    named = dict(model.named_parameters())
    for name in CHECKED_GRADS:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], named[name].grad, atol=1e-6, rtol=1e-3)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
