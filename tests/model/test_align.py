"""`projector_init: aligned`: the least-squares map from the encoder's vectors to the decoder's embeddings of the same
text (arctrain/model/align.py), checked against independent computations, in one process and in a 2-rank run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_shards, configs, corpus_texts, make_batch, tokenizer, train_two_ranks
from safetensors.torch import load_file

from arctrain.cli import main as arctrain
from arctrain.config.load import load_config
from arctrain.data import build_train_loader
from arctrain.data.pooling import group_sizes
from arctrain.model import Projector, build_model
from arctrain.model.align import fit_aligned_map, token_targets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gemma_model(tiny_models):
    model_cfg, decoder_cfgs = configs(tiny_models, ("gemma",))
    torch.manual_seed(0)
    return model_cfg, build_model(model_cfg, decoder_cfgs).eval()


def test_token_targets_are_the_decoders_mean_scaled_embedding_of_each_encoder_token(gemma_model, tiny_models):
    _, model = gemma_model
    enc_tok, dec_tok = tokenizer(str(tiny_models / "encoder")), tokenizer(str(tiny_models / "gemma"))
    embeddings = model.decoders["gemma"].get_input_embeddings()
    targets = token_targets(enc_tok, dec_tok, embeddings)
    assert targets.shape == (len(enc_tok), embeddings.weight.shape[1])
    scale = model.decoders["gemma"].config.hidden_size ** 0.5  # Gemma scales its table inside the embedding
    checked = 0
    for i in range(0, len(enc_tok), 97):
        ids = dec_tok(enc_tok.decode([i]), add_special_tokens=False).input_ids
        expected = embeddings.weight[ids].mean(0) * scale if ids else torch.zeros(targets.shape[1])
        torch.testing.assert_close(targets[i], expected, atol=1e-5, rtol=1e-5)
        checked += bool(ids)
    assert checked > 10


def test_the_fitted_map_is_ridge_least_squares_from_pooled_vectors_to_their_tokens_targets(gemma_model, tiny_models):
    model_cfg, model = gemma_model
    texts = corpus_texts(tiny_models, heldout=False, limit=48)
    encs = [make_batch(tiny_models, model_cfg, "gemma", "reconstruction", texts[i : i + 16]).enc for i in (0, 16, 32)]
    enc_tok = tokenizer(str(tiny_models / "encoder"))
    embeddings = model.decoders["gemma"].get_input_embeddings()
    targets = token_targets(enc_tok, tokenizer(str(tiny_models / "gemma")), embeddings)
    weight = fit_aligned_map(model.encoder, encs, targets, ridge=1e-2)

    # Independently: every segment's groups by the pooling rule, the mean target of each group's tokens, numpy's solve.
    xs, ys = [], []
    with torch.no_grad():
        for enc in encs:
            xs.append(model.encoder(enc).double().numpy())
            bounds = enc.cu_seqlens.tolist()
            for a, b in zip(bounds, bounds[1:]):
                tokens = enc.ids[a:b].tolist()
                sizes = group_sizes(len(tokens), -(-len(tokens) // model_cfg.pooling_factor))
                starts = np.cumsum([0, *sizes])
                ys += [targets[tokens[s:e]].double().mean(0).numpy() for s, e in zip(starts, starts[1:])]
    x, y = np.concatenate(xs), np.stack(ys)
    gram = x.T @ x
    lam = 1e-2 * np.trace(gram) / gram.shape[0]
    expected = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y).T
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_init_map_makes_the_projector_that_map_and_checks_its_widths():
    weight = torch.randn(5, 6)
    projector = Projector(6, 8, 5)
    projector.init_map(weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(projector(x), x @ weight.T)
    with pytest.raises(ValueError, match=r"projector 6 -> 4 -> 5: the aligned init needs a hidden width"):
        Projector(6, 4, 5).init_map(weight)


def test_aligned_init_needs_a_hidden_width_of_at_least_the_encoders(tiny_models):
    model_cfg, decoder_cfgs = configs(tiny_models, ("gemma",), projector_hidden=4)
    decoder_cfgs[0].projector_init = "aligned"
    with pytest.raises(ValueError, match="decoder gemma: projector_init aligned needs projector_hidden >= the"):
        build_model(model_cfg, decoder_cfgs)


def test_a_two_rank_zero3_run_starts_from_the_map_fitted_on_both_ranks_first_batches(tiny_models, tmp_path):
    """With every learning rate 0 the exported projector is the initial one: it must equal the map fitted in this
    process on rank 0's and rank 1's first micro-batches together, each rank's up to its half of train.align_vectors
    (ZeRO-3 partitions, the gathered encoder and embedding, the all-reduced sums and the write to the partitions)."""
    shards = build_shards(
        tmp_path / "shards",
        tiny_models / "corpus.jsonl",
        tiny_models / "encoder",
        {name: tiny_models / name for name in ("llama", "gemma")},
    )
    run_dir = tmp_path / "run"
    args = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        "decoders.1.name=gemma",
        f"decoders.1.path={tiny_models / 'gemma'}",
        "decoders.1.projector_init=aligned",
        "train.align_vectors=300",
        "optim.encoder_lr=0",
        "optim.projector_lr=0",
        "optim.warmup_steps=0",
        f"data.shards={shards}",
        f"checkpoint.dir={run_dir}",
        "train.steps=2",
        "train.precision=fp32",
        "checkpoint.interval=2",
        "logging.wandb_mode=disabled",
        "eval.interval=0",
    ]
    train_two_ranks(args, tmp_path)
    log = (tmp_path / "train.rank0.log").read_text()
    assert "decoder gemma: projector aligned on" in log and "encoder vectors of 2 ranks" in log, log[-2000:]
    arctrain(["export", "--run", str(run_dir), "--out", str(tmp_path / "export")])
    exported = {}
    for file in sorted((tmp_path / "export").glob("*.safetensors")):
        exported.update(load_file(file))
    second = exported["projectors.gemma.1.weight"]  # (Dd, H): the fitted map in its first D columns

    cfg = load_config(str(REPO / "configs/tiny_cpu.yaml"), args)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.decoders).eval()
    encs = []
    for rank in (0, 1):
        held = 0
        for _, batch in build_train_loader(cfg, rank, 2):  # micro-batches until the rank holds 150 vectors
            encs.append(batch.enc)
            held += batch.enc.n_vectors
            if held >= 150:
                break
    assert len(encs) > 2, "one micro-batch per rank: the test would not see the ranks read several"
    enc_tok = tokenizer(cfg.model.encoder_path)
    targets = token_targets(enc_tok, tokenizer(cfg.decoders[1].path), model.decoders["gemma"].get_input_embeddings())
    expected = fit_aligned_map(model.encoder, encs, targets, cfg.train.align_ridge)
    width = expected.shape[1]
    torch.testing.assert_close(second[:, :width], expected, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(second[:, width:]) == 0
