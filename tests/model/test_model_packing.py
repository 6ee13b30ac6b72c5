"""Packed micro-batches equal each example computed alone (arctrain/data/batch.py, attention.py, encoder.py, arc.py).

The reference for one example runs nothing packed: every encoder segment alone and the example's one decoder row
alone through transformers' own sdpa attention (a batch of one needs no mask), its decoder inputs assembled
position by position, its loss by F.cross_entropy over full logits. A packed batch's summed loss and its gradients
must equal the sums over its examples: losses within 1e-5, gradients within 1e-5 relative (fp32).
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import configs, corpus_texts, tokenizer

from arctrain.data.batch import IGNORE, pack_segments
from arctrain.model import Example, Memory, Text, build_model, collate, pretraining_example
from arctrain.model.attention import PACKED, packed_kwargs

TOL = 1e-5


@contextlib.contextmanager
def stock_attention(model, decoder: str):
    """transformers' sdpa in the encoder's layers and in the decoder, for the reference computations."""
    enc_config = model.encoder.layers[0].self_attn.config
    dec = model.all_decoders[decoder]
    enc_config._attn_implementation = "sdpa"
    dec.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        enc_config._attn_implementation = PACKED
        dec.set_attn_implementation(PACKED)


def settings(model, tiny_or_path, decoder: str) -> dict:
    tok = tokenizer(str(tiny_or_path / decoder))
    return dict(
        pooling=model.encoder.pooling,
        factor=model.encoder.factor,
        n_vectors=model.encoder.n_vectors,
        dec_pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        bos_id=tok.bos_token_id,
        decoder=decoder,
    )


def segment_alone(model, segment: list[int]) -> torch.Tensor:
    """(m, D): one segment through the encoder, nothing else in its pack, stock attention in its layers."""
    return model.encoder(pack_segments([segment], model.encoder.factor, model.encoder.n_vectors))


def reference_loss_sum(model, example: Example, decoder: str, kw: dict, use_context: bool = True):
    """Summed target cross-entropy and target count of one example, computed alone (module docstring)."""
    one = collate([example], **kw)  # the row's layout (tested in test_model_batch); computed below without it
    dec = model.all_decoders[decoder]
    table = dec.get_input_embeddings()
    ids, slots, labels = one.dec_ids[0], one.dec_slot[0], one.labels[0]
    with stock_attention(model, decoder):
        if use_context:
            special = model.specials[decoder]()
            parts = [segment_alone(model, seg) for seg in one.segments()]
            parts += [one.stored] if one.stored is not None else []
            projected = model.projectors[decoder](torch.cat([*parts, special]))  # (n_vectors + 2, Dd)
            row = torch.stack([projected[s] if s >= 0 else table.weight[t] for t, s in zip(ids, slots, strict=True)])
        else:
            keep = slots == -1
            ids, labels = ids[keep], labels[keep]
            row = table(ids)
        logits = dec(inputs_embeds=row[None]).logits[0]  # (n, V), no mask: a batch of one
    targets = labels[1:]
    n = int((targets != IGNORE).sum())
    return F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="sum"), n


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_packed_equals_alone(model, examples: list[Example], decoder: str, kw: dict, use_context: bool = True):
    model.train()
    model.zero_grad(set_to_none=True)
    batch = collate(examples, **kw)
    out = model(batch, decoder, use_context=use_context)
    if use_context:  # without context no trainable parameter is on the loss's path (frozen decoder): loss only
        (out.loss * out.n_tokens).backward()
    packed = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for ex in examples:
        loss_sum, n = reference_loss_sum(model, ex, decoder, kw, use_context)
        total, count = total + loss_sum, count + n
    if use_context:
        total.backward()
    alone = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    assert int(out.n_tokens) == count > 0
    torch.testing.assert_close(out.loss.detach(), (total / count).detach(), atol=TOL, rtol=TOL)
    moved = 0
    for name in packed.keys() | alone.keys():  # a parameter with no gradient on one side: zero there
        want = alone.get(name, torch.zeros(()))
        error = float((packed.get(name, torch.zeros(())) - want).norm())
        assert error <= TOL * float(want.norm()) or error == float(want.norm()) == 0.0, (name, error)
        moved += float(want.norm()) > 0
    assert moved > 0 or not use_context  # the comparison covered real gradients
    return batch


@pytest.fixture(scope="module")
def tiny_built(tiny_models):
    model_cfg, decoder_cfgs = configs(tiny_models)
    torch.manual_seed(0)
    return build_model(model_cfg, decoder_cfgs)


def pretraining_examples(tiny, decoder: str, task: str, interleave: int = 0) -> list[Example]:
    """Windows of 2-3 segments of different lengths, one example per segment (the last continuation is dropped)."""
    enc_tok, dec_tok = tokenizer(str(tiny / "encoder")), tokenizer(str(tiny / decoder))
    texts = corpus_texts(tiny, heldout=False, n_words=7, limit=12)
    examples = []
    for w, start in enumerate(range(0, 9, 3)):
        window = [" ".join(texts[start + j].split()[: 3 + 2 * j + w]) for j in range(3)]
        enc = [enc_tok(t, add_special_tokens=False).input_ids for t in window]
        dec = [dec_tok(" " + t, add_special_tokens=False).input_ids for t in window]
        last = len(window) - (task == "continuation")
        examples += [pretraining_example(task, enc, dec, i, interleave_tokens=interleave) for i in range(last)]
    return examples


@pytest.mark.parametrize("decoder", ["llama", "mistral"])
@pytest.mark.parametrize("task,interleave", [("reconstruction", 0), ("continuation", 0), ("continuation", 5)])
def test_pretraining_batches_equal_examples_alone(tiny_built, tiny_models, decoder, task, interleave):
    examples = pretraining_examples(tiny_models, decoder, task, interleave)
    batch = assert_packed_equals_alone(tiny_built, examples, decoder, settings(tiny_built, tiny_models, decoder))
    lengths = batch.enc.cu_seqlens.diff().tolist()
    assert len(set(lengths)) > 1 and len(set(batch.row_lengths)) > 1  # uneven: padding would have existed


@pytest.mark.parametrize("decoder", ["llama", "mistral"])
def test_validation_without_context_equals_examples_alone(tiny_built, tiny_models, decoder):
    """drop_memory on the packed layout (validation's no-context baseline)."""
    examples = pretraining_examples(tiny_models, decoder, "continuation", interleave=4)
    kw = settings(tiny_built, tiny_models, decoder)
    assert_packed_equals_alone(tiny_built, examples, decoder, kw, use_context=False)


@pytest.mark.parametrize("context", ["joint", "segments"])
def test_qa_with_shots_equals_examples_alone(tiny_built, tiny_models, tiny_qa, context):
    from helpers import qa_config

    from arctrain.data import Vocab
    from arctrain.data.qa import QAMaker
    from arctrain.data.qa_records import read_qa

    cfg = qa_config(tiny_models, tiny_qa[0], "data.chunk_tokens=24", f"data.qa_context={context}")
    records = read_qa(tiny_qa[0])
    maker = QAMaker(cfg, Vocab.from_config(cfg))
    for decoder in ("llama", "mistral"):
        examples = [maker.example(decoder, records, i, 0, 0, 0, shots=2) for i in (0, 3, 7)]
        n_segments = [len(p.segments) for ex in examples for p in ex.pieces if isinstance(p, Memory)]
        assert len(n_segments) == 9 and (context == "joint") == (max(n_segments) == 1)
        kw = settings(tiny_built, tiny_models, decoder)
        assert_packed_equals_alone(tiny_built, examples, decoder, kw)
        assert_packed_equals_alone(tiny_built, examples, decoder, kw, use_context=False)


def test_stored_vectors_mixed_with_encoded_segments_equal_examples_alone(tiny_built, tiny_models):
    """Memories read from a vector store (Memory.vectors) beside memories the encoder compresses."""
    torch.manual_seed(1)
    examples = pretraining_examples(tiny_models, "llama", "reconstruction")
    dim = tiny_built.encoder.hidden_size
    for ex in examples[::2]:
        memory = next(p for p in ex.pieces if isinstance(p, Memory))
        memory.vectors, memory.segments = [torch.randn(-(-len(memory.segments[0]) // 4), dim)], []
    batch = assert_packed_equals_alone(tiny_built, examples, "llama", settings(tiny_built, tiny_models, "llama"))
    assert batch.stored is not None and batch.enc.n_vectors > 0


def test_compress_and_generation_inputs_equal_segments_alone(tiny_built, tiny_models):
    """`compress` (arctrain compress, the vector store) and the decoder inputs of generate/eval, packed vs alone."""
    model = tiny_built.eval()
    examples = pretraining_examples(tiny_models, "mistral", "continuation", interleave=3)
    kw = settings(model, tiny_models, "mistral")
    batch = collate(examples, **kw)
    segments = batch.segments()
    with torch.no_grad():
        packed = model.encoder.compress_segments(segments)
        with stock_attention(model, "mistral"):
            alone = [segment_alone(model, s) for s in segments]
        for got, want in zip(packed, alone, strict=True):
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        rows = batch.rows(model.embed(batch, "mistral"))
        for ex, row in zip(examples, rows, strict=True):
            torch.testing.assert_close(row, model.embed(collate([ex], **kw), "mistral")[0], atol=TOL, rtol=TOL)


def test_sliding_window_stays_inside_each_row():
    """A Mistral decoder with a window shorter than the rows: packed rows equal rows alone (transformers' sdpa)."""
    from transformers import MistralConfig, MistralForCausalLM

    from arctrain.data.batch import _cu

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=3,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    lengths = [2, 9, 5, 12]
    ids = torch.randint(0, 64, (1, sum(lengths)))
    positions = torch.tensor([[p for n in lengths for p in range(n)]])
    model.set_attn_implementation(PACKED)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, **packed_kwargs(_cu(lengths), max(lengths))).logits
        model.set_attn_implementation("sdpa")
        alone = torch.cat([model(input_ids=row).logits for row in ids.split(lengths, dim=1)], dim=1)
        full_window = MistralForCausalLM(MistralConfig(**{**config.to_dict(), "sliding_window": None})).eval()
        full_window.load_state_dict(model.state_dict())
        unwindowed = torch.cat([full_window(input_ids=row).logits for row in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=TOL, rtol=TOL)
    assert not torch.allclose(alone, unwindowed, atol=1e-3)  # the window did cut the longer rows


def test_smollm2_packed_equals_examples_alone(smollm2):
    """SmolLM2-135M as encoder (4 layers kept) and decoder: pretraining both tasks and the no-context path.

    Losses in fp32 within 1e-5. Gradients in fp64: in fp32 even a batch of one differs from its reference by up
    to ~4e-4 relative on the encoder's first attention projections (small gradients that are sums of large
    cancelling terms through SmolLM2's peaked attention), so fp32 cannot separate a layout error from rounding
    there; in fp64 the same comparison holds to 1e-5."""
    model_cfg, decoder_cfgs = configs(smollm2.parent, decoders=("smollm2",), projector_hidden=64)
    model_cfg.encoder_path, model_cfg.n_truncated_layers = str(smollm2), 26
    decoder_cfgs[0].path = str(smollm2)
    torch.manual_seed(0)
    model = build_model(model_cfg, decoder_cfgs)
    tok = tokenizer(str(smollm2))
    texts = ["The river runs past the old mill", "and the town", "where the bakers sell their bread every morning"]
    enc = [tok(t, add_special_tokens=False).input_ids for t in texts]
    dec = [tok(" " + t, add_special_tokens=False).input_ids for t in texts]
    kw = dict(pooling=model.encoder.pooling, factor=4, n_vectors=0, dec_pad_id=tok.pad_token_id, bos_id=None)
    rec = [pretraining_example("reconstruction", enc, dec, i) for i in range(3)]
    cont = [pretraining_example("continuation", enc, dec, i, prefix_ids=dec[0][:2]) for i in range(2)]
    assert_packed_equals_alone(model, [Example([Text(dec[0])] + e.pieces) for e in cont], "smollm2", kw, False)
    with torch.no_grad():
        packed = model(collate(rec + cont, **kw), "smollm2")
        alone = [reference_loss_sum(model, ex, "smollm2", kw) for ex in rec + cont]
    total, count = sum(loss for loss, _ in alone), sum(n for _, n in alone)
    torch.testing.assert_close(packed.loss, total / count, atol=TOL, rtol=TOL)  # fp32
    assert_packed_equals_alone(model.double(), rec + cont, "smollm2", kw)


def test_padding_metrics_count_computed_positions():
    """padding/encoder and padding/decoder: the fraction of computed positions that are padding, per window."""
    from arctrain.data.batch import BatchStats
    from arctrain.train.metrics import Window

    window = Window(lambda decoder, stats: 0.0)
    packed = collate(
        [Example([Memory([[5] * 9, [6] * 3], "cont"), Text([7, 8], loss=True)])],
        pooling="mean",
        factor=4,
        n_vectors=0,
        dec_pad_id=0,
        bos_id=1,
    )
    window.count("llama", packed.stats)
    window.time = 1.0
    rates = window.rates(1, None)
    assert rates["padding/encoder"] == 0.0 and rates["padding/decoder"] == 0.0
    padded = BatchStats(2, 12, 0, 0, 0, 6, 0, 1, enc_computed=18, dec_computed=8)  # what right-padding would run
    window.count("llama", padded)
    rates = window.rates(1, None)
    assert rates["padding/encoder"] == pytest.approx(1 - 24 / 30)
    assert rates["padding/decoder"] == pytest.approx(1 - (packed.stats.dec_tokens + 6) / (packed.stats.dec_tokens + 8))


def test_bf16_packed_equals_examples_alone_within_bf16_rounding(tiny_built, tiny_models):
    """In bf16, packed and alone both differ from the exact (fp32) value by bf16's rounding, not by the same amount
    (other summation orders and shapes). So the bound is relative to what bf16 itself costs: the packed bf16 error
    against the fp32 value of the examples alone may be at most twice the alone bf16 computation's own error, plus
    bf16's epsilon (2^-7) times the value (the rounding of the result itself). Encoder vectors: the same, in norm.
    That the bound discriminates: the same bf16 batch with its rows attending across each other falls outside it."""
    decoder, eps = "llama", torch.finfo(torch.bfloat16).eps
    kw = settings(tiny_built, tiny_models, decoder)
    examples = pretraining_examples(tiny_models, decoder, "continuation")
    segments = collate(examples, **kw).segments()  # lengths differ

    @torch.no_grad()
    def computed(model, leak: bool = False):
        batch = collate(examples, **kw)
        if leak:  # every row in one sequence: causal attention across the rows
            n = batch.dec_ids.shape[1]
            batch.dec_cu_seqlens, batch.dec_max_len = torch.tensor([0, n], dtype=torch.int32), n
        packed = float(model(batch, decoder).loss)
        sums = [reference_loss_sum(model, ex, decoder, kw) for ex in examples]
        alone = float(sum(s.float() for s, _ in sums)) / sum(n for _, n in sums)
        vectors = torch.cat(model.encoder.compress_segments(segments)).float()  # (M, D) packed
        with stock_attention(model, decoder):
            vectors_alone = torch.cat([segment_alone(model, s) for s in segments]).float()
        return packed, alone, vectors, vectors_alone

    model = tiny_built.eval()
    p32, a32, v32, w32 = computed(model)
    assert abs(p32 - a32) <= TOL and float((v32 - w32).abs().max()) <= TOL  # fp32: equal (module docstring)
    bf16 = copy.deepcopy(tiny_built).to(torch.bfloat16).eval()
    p16, a16, v16, w16 = computed(bf16)
    assert abs(a16 - a32) > 0  # bf16 rounds: the bound below is not fp32's
    assert abs(p16 - a32) <= 2 * abs(a16 - a32) + eps * abs(a32), (p16, a16, a32)
    assert float((v16 - w32).norm()) <= 2 * float((w16 - w32).norm()) + eps * float(w32.norm())
    leaked = computed(bf16, leak=True)[0]
    assert abs(leaked - a32) > 2 * abs(a16 - a32) + eps * abs(a32), (leaked, a32)
