"""`decoders.N.projector_init: aligned` in a run: arctrain/model/align.py's least-squares fit on the run's first
training micro-batches, before the optimizer exists (DeepSpeed's optimizer copies the parameters at `initialize`).

Under ZeRO-3 the parameters are partitions at that point and no engine hooks gather them: the encoder, each aligned
decoder's input embedding and its projector are gathered explicitly, on every rank alike. Each rank reads its own
micro-batches until it has its share of `train.align_vectors`; the sums are added over ranks (device tensors, one
all-reduce each), so every rank solves the same system.
"""

import math

import torch
from transformers import AutoTokenizer

from arctrain.config.schema import Config
from arctrain.data import build_train_loader
from arctrain.model.align import AlignmentFit, token_targets


def align_projectors(model, cfg: Config, rank: int, world_size: int, device: torch.device, say=print) -> None:
    """Start every `projector_init: aligned` decoder's projector at the fitted map (nothing to do without one)."""
    aligned = [d for d in cfg.decoders if d.projector_init == "aligned"]
    if not aligned:
        return
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    enc_tok = AutoTokenizer.from_pretrained(cfg.model.encoder_path)
    fits = {}
    for d in aligned:
        embeddings = model.all_decoders[d.name].get_input_embeddings()
        with deepspeed.zero.GatheredParameters(list(embeddings.parameters())):
            targets = token_targets(enc_tok, AutoTokenizer.from_pretrained(d.path), embeddings, device)
        fits[d.name] = AlignmentFit(targets, model.encoder.hidden_size)
    share = math.ceil(cfg.train.align_vectors / world_size)
    n = 0
    was_training = model.training
    model.eval()
    with deepspeed.zero.GatheredParameters(list(model.encoder.parameters())), torch.no_grad():
        # A loader of its own, read in this process (a few micro-batches: no worker to start); the run's loader
        # starts at its first micro-batch whatever is read here.
        loader = build_train_loader(cfg, rank, world_size)
        loader.num_workers = 0
        for _, batch in loader:
            enc = batch.to(device).enc
            vectors = model.encoder(enc)  # (M, D)
            for fit in fits.values():
                fit.add(vectors, enc)
            n += enc.n_vectors
            if n >= share:
                break
    model.train(was_training)
    for d in aligned:
        fits[d.name].all_reduce()
        weight = fits[d.name].solve(cfg.train.align_ridge)
        with deepspeed.zero.GatheredParameters(list(model.projectors[d.name].parameters()), modifier_rank=0):
            model.projectors[d.name].init_map(weight)
        n_all = int(fits[d.name].n.item())
        say(f"decoder {d.name}: projector aligned on {n_all:,} encoder vectors of {world_size} ranks")
