"""`decoders.N.projector_init: aligned` in a run: arctrain/model/align.py's least-squares fit on the run's first
training micro-batches, before the optimizer exists (DeepSpeed's optimizer copies the parameters at `initialize`).

Under ZeRO-3 the parameters are partitions at that point and no engine hooks gather them: the encoder, each aligned
decoder's input embedding and its projector are gathered explicitly, on every rank alike. Each rank fits on its own
micro-batches; the sums are added over ranks (device tensors), so every rank solves the same system.
"""

import itertools

import torch
from transformers import AutoTokenizer

from arctrain.config.schema import Config
from arctrain.data import build_train_loader
from arctrain.model.align import fit_aligned_map, token_targets


def align_projectors(model, cfg: Config, rank: int, world_size: int, device: torch.device, say=print) -> None:
    """Start every `projector_init: aligned` decoder's projector at the fitted map (nothing to do without one)."""
    aligned = [d for d in cfg.decoders if d.projector_init == "aligned"]
    if not aligned:
        return
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    # A loader of its own: the run's loader starts at its first micro-batch whatever is read here.
    loader = build_train_loader(cfg, rank, world_size)
    encs = [batch.to(device).enc for _, batch in itertools.islice(iter(loader), cfg.train.align_batches)]
    enc_tok = AutoTokenizer.from_pretrained(cfg.model.encoder_path)
    was_training = model.training
    model.eval()
    for d in aligned:
        embeddings = model.all_decoders[d.name].get_input_embeddings()
        with deepspeed.zero.GatheredParameters(list(embeddings.parameters())):
            targets = token_targets(enc_tok, AutoTokenizer.from_pretrained(d.path), embeddings, device)
        with deepspeed.zero.GatheredParameters(list(model.encoder.parameters())):
            weight = fit_aligned_map(model.encoder, encs, targets.to(torch.float32), cfg.train.align_ridge)
        projector = model.projectors[d.name]
        with deepspeed.zero.GatheredParameters(list(projector.parameters()), modifier_rank=0):
            projector.init_map(weight)
        n = sum(enc.n_vectors for enc in encs)
        say(f"decoder {d.name}: projector aligned on {n:,} encoder vectors per rank x {world_size} ranks")
    model.train(was_training)
