"""arctrain/train/memory.py against the real thing: parameter counts of transformers' models built from the same shapes,
the bytes autograd saves in a LlamaDecoderLayer (saved-tensor hooks), frozen and trainable, and the loss's logits:
at target positions only, one chunk at a time when chunked."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from arctrain.model.loss import lm_head_loss
from arctrain.train.memory import (
    GB,
    LOGIT_BYTES,
    PUBLISHED,
    Setup,
    Shape,
    causal_lm_params,
    encoder_params,
    estimate,
    layer_saved_bytes,
)


def _hf_config(cls, s: Shape):
    return cls(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        vocab_size=s.vocab,
        tie_word_embeddings=s.tied,
        attn_implementation="sdpa",  # plain HF modules: what the formulas count
    )


@pytest.mark.parametrize(
    ("name", "model_cls", "config_cls"),
    [
        ("Llama-3.2-3B", LlamaForCausalLM, LlamaConfig),
        ("Llama-3.1-8B", LlamaForCausalLM, LlamaConfig),
        ("Mistral-7B-v0.3", MistralForCausalLM, MistralConfig),
    ],
)
def test_parameter_counts_match_transformers(name, model_cls, config_cls):
    shape = PUBLISHED[name]
    with torch.device("meta"):  # the real module tree, no memory
        model = model_cls(_hf_config(config_cls, shape))
    assert causal_lm_params(shape) == sum(p.numel() for p in model.parameters())
    if name == "Llama-3.2-3B":  # the encoder: without its last 2 layers and final norm (the LM head is tied)
        dropped = ("norm.", "layers.26.", "layers.27.")
        kept = sum(p.numel() for n, p in model.model.named_parameters() if not n.startswith(dropped))
        assert encoder_params(shape, truncated=2) == kept


def _saved_bytes_per_token(s: Shape, trainable: bool, batch: int = 2, seq: int = 64) -> float:
    model = LlamaForCausalLM(_hf_config(LlamaConfig, s)).to(torch.bfloat16)
    layer = model.model.layers[0]
    layer.requires_grad_(trainable)
    x = torch.randn(batch, seq, s.hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq)[None].expand(batch, seq)
    rotary = model.model.rotary_emb(x, positions)
    # Weights, the layer input (kept by checkpointing anyway) and the shared rotary tables are not activations.
    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *rotary, x]}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    return sum(saved.values()) / (batch * seq)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("shape", [Shape(256, 704, 1, 4, 2, 64, tied=False), Shape(192, 512, 1, 6, 6, 64, tied=False)])
def test_saved_activations_match_the_formula(shape, trainable):
    measured = _saved_bytes_per_token(shape, trainable)
    # Within 1%: the formula leaves out per-token scalars (RMSNorm's rsqrt, attention's logsumexp per head).
    assert measured == pytest.approx(layer_saved_bytes(shape, 1, trainable), rel=0.01)


def _saved_bytes(fn) -> int:
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_logits_are_counted_at_target_positions_and_chunking_saves_none():
    """Unchunked, cross-entropy saves the fp32 log-softmax of the targets' logits (4 of the 10 bytes per entry the
    estimate counts); chunked, the loss saves only its inputs. The estimate counts targets, not decoder positions."""
    n, dim, vocab = 64, 32, 1000
    head = nn.Linear(dim, vocab, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(n, dim, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    whole = _saved_bytes(lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum"))
    assert whole >= 4 * n * vocab
    chunked = _saved_bytes(lambda: lm_head_loss(head, hidden, targets, chunk=16))
    assert chunked <= hidden.nbytes + targets.nbytes
    shape = PUBLISHED["Llama-3.1-8B"]
    setup = Setup(micro_batch=16, segment_tokens=256, loss_chunk_tokens=0)
    lines = estimate(PUBLISHED["Llama-3.2-3B"], {"llama": shape}, setup, world_size=8).per_gpu["llama"]
    assert lines["decoder llama logits + loss (target positions)"] == LOGIT_BYTES * 16 * 256 * shape.vocab / GB


def test_chunks_and_interleaved_text_add_encoder_and_decoder_tokens():
    """k chunks per sample cost the encoder what k times the samples cost; interleaved text and the k chunks' vectors
    lengthen the decoder sequence, computed here from activation_bytes on its own."""
    from arctrain.train.memory import activation_bytes

    enc, dec = PUBLISHED["Llama-3.2-3B"], PUBLISHED["Llama-3.1-8B"]
    long = estimate(enc, {"llama": dec}, Setup(micro_batch=4, segment_tokens=1024, chunks=5, text_tokens=64), 8)
    wide = estimate(enc, {"llama": dec}, Setup(micro_batch=20, segment_tokens=1024), 8)
    line = "encoder activations (checkpointed)"
    assert long.per_gpu["llama"][line] == wide.per_gpu["llama"][line]
    dec_tokens = 4 * (1 + 64 + 5 * 256 + 1 + 1024)
    expected = activation_bytes(dec, dec.layers, dec_tokens, trainable=False) / GB
    assert long.per_gpu["llama"]["decoder llama activations (checkpointed)"] == expected


@pytest.mark.parametrize("trainable", [False, True])
def test_activations_without_checkpointing_are_every_layer_at_once(trainable):
    """A stack of 3 layers run without checkpointing saves what activation_bytes(checkpointed=False) counts: what
    every layer saves, at once; with checkpointing the estimate is every layer's input and one layer's."""
    from arctrain.train.memory import activation_bytes

    s, batch, seq, layers = Shape(256, 704, 3, 4, 2, 64, tied=False), 2, 64, 3
    model = LlamaForCausalLM(_hf_config(LlamaConfig, s)).to(torch.bfloat16).requires_grad_(trainable)
    x = torch.randn(batch, seq, s.hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq)[None].expand(batch, seq)
    rotary = model.model.rotary_emb(x, positions)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *rotary]}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for layer in model.model.layers:
            h = layer(h, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    tokens = batch * seq
    assert sum(saved.values()) == pytest.approx(activation_bytes(s, layers, tokens, trainable, False), rel=0.01)
    checkpointed = activation_bytes(s, layers, tokens, trainable, True)
    assert checkpointed == layers * 2 * s.hidden * tokens + layer_saved_bytes(s, tokens, trainable)
