"""The encoder (arctrain/model/encoder.py): shapes, bidirectionality, packing, and the pooling math checked against
a straightforward per-token implementation written here from the layer weights, on tiny Llama, Mistral and Qwen2
backbones (grouped-query attention: 4 heads, 2 key/value heads)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from arctrain.data.batch import pack_segments
from arctrain.model.encoder import ARCEncoder

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_backbone(family: str, n_layers: int = 3, seed: int = 0):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def make_encoder(family="llama", pooling="mean_pooled_queries", factor=4, n_vectors=0, n_layers=3, trunc=1):
    return ARCEncoder(
        tiny_backbone(family, n_layers), n_truncated_layers=trunc, pooling=pooling, factor=factor, n_vectors=n_vectors
    ).eval()


def batch_of(segments: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, segments))
    ids = torch.zeros(len(segments), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seg in enumerate(segments):
        ids[i, : len(seg)], mask[i, : len(seg)] = torch.tensor(seg), 1
    return ids, mask


# --- the reference: one segment, no padding, explicit loops and formulas -------------------------------------


def ref_rms(x, norm):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def ref_rope(x, pos, config):
    """x (n, hd) at integer positions pos: rotate pairs (i, i + hd/2) by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    theta = config.rope_parameters["rope_theta"]
    out = x.clone()
    for row, p in enumerate(pos):
        for i in range(hd // 2):
            angle = p * theta ** (-2 * i / hd)
            a, b = x[row, i], x[row, i + hd // 2]
            out[row, i] = a * math.cos(angle) - b * math.sin(angle)
            out[row, i + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def ref_attention(attn, config, q_in, q_pos, kv_in):
    """Full (bidirectional) attention of queries q_in (m, D) at q_pos over kv_in (n, D) at 0..n-1."""
    n_heads, n_kv, hd = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    q = F.linear(q_in, attn.q_proj.weight, attn.q_proj.bias)
    k = F.linear(kv_in, attn.k_proj.weight, attn.k_proj.bias)
    v = F.linear(kv_in, attn.v_proj.weight, attn.v_proj.bias)
    heads = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv)  # the key/value head this query head shares
        qh = ref_rope(q[:, h * hd : (h + 1) * hd], q_pos, config)
        kh = ref_rope(k[:, g * hd : (g + 1) * hd], range(kv_in.shape[0]), config)
        weights = torch.softmax(qh @ kh.T / math.sqrt(hd), dim=-1)
        heads.append(weights @ v[:, g * hd : (g + 1) * hd])
    return F.linear(torch.cat(heads, -1), attn.o_proj.weight, attn.o_proj.bias)


def ref_mlp(mlp, x):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def ref_layer(layer, config, x):
    x = x + ref_attention(
        layer.self_attn, config, ref_rms(x, layer.input_layernorm), range(x.shape[0]), ref_rms(x, layer.input_layernorm)
    )
    return x + ref_mlp(layer.mlp, ref_rms(x, layer.post_attention_layernorm))


def ref_groups(n: int, factor: int, n_vectors: int = 0) -> list[tuple[int, int]]:
    """(start, end) of each group, the reference's rule (PoolingModule / split_integer, kyutai-labs/ARC-Encoder):
    a factor x gives x-token groups when x divides n, else n // x + 1 near-equal groups, larger first, and one
    group when n < x; a fixed count k gives k near-equal groups, or n groups of one when n < k."""
    if n_vectors:
        m = n if n < n_vectors else n_vectors
    elif n < factor:
        m = 1
    else:
        m = n // factor if n % factor == 0 else n // factor + 1
    sizes = [n // m + (1 if g < n % m else 0) for g in range(m)]
    starts = [sum(sizes[:g]) for g in range(m)]
    return [(a, a + size) for a, size in zip(starts, sizes, strict=True)]


def ref_encode(enc: ARCEncoder, ids: list[int]) -> torch.Tensor:
    config = enc.config
    groups = ref_groups(len(ids), enc.factor, enc.n_vectors)
    x = enc.embed_tokens.weight[ids]  # (n, D)
    pooled_last = enc.pooling == "mean_pooled_queries"
    for layer in enc.layers[: len(enc.layers) - pooled_last]:
        x = ref_layer(layer, config, x)
    if not pooled_last:
        return torch.stack([x[a:b].mean(0) for a, b in groups])
    # The reference calls its last layer with x = the group means and other_kv = the full stream; the block norms
    # both with its attention norm: queries RMSNorm(mean(h)), keys/values RMSNorm(h), residual the means.
    last = enc.layers[-1]
    means = torch.stack([x[a:b].mean(0) for a, b in groups])  # (m, D)
    queries = ref_rms(means, last.input_layernorm)
    x = means + ref_attention(last.self_attn, config, queries, range(len(groups)), ref_rms(x, last.input_layernorm))
    return x + ref_mlp(last.mlp, ref_rms(x, last.post_attention_layernorm))


# --- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("pooling", ["mean_pooled_queries", "mean"])
def test_matches_reference(family, pooling):
    enc = make_encoder(family, pooling)
    segments = [list(range(3, 13)), [5, 6, 7], list(range(20, 27))]  # 10, 3 and 7 tokens in one padded batch
    with torch.no_grad():
        got = enc.compress(*batch_of(segments))
        for seg, vectors in zip(segments, got, strict=True):
            torch.testing.assert_close(vectors, ref_encode(enc, seg), atol=1e-5, rtol=1e-4)


def test_matches_reference_on_a_one_layer_backbone():
    enc = make_encoder(n_layers=2, trunc=1)
    assert len(enc.layers) == 1 and enc.config.num_hidden_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(
            enc.compress(*batch_of([list(range(40, 49))]))[0],
            ref_encode(enc, list(range(40, 49))),
            atol=1e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("pooling", ["mean_pooled_queries", "mean"])
@pytest.mark.parametrize("factor", [4, 8])
def test_shapes_for_many_lengths(pooling, factor):
    enc = make_encoder(pooling=pooling, factor=factor)
    lengths = [1, 3, 4, 5, 7, 8, 9, 10, 16, 17, 31, 64]
    segments = [[7] * n for n in lengths]
    packed = pack_segments(segments, factor, 0)
    with torch.no_grad():
        pooled = enc(packed)  # (M, D): every segment's vectors, one after the other
    expected = [max(1, math.ceil(n / factor)) for n in lengths]
    assert packed.pool_cu_seqlens.diff().tolist() == expected and packed.max_vectors == max(expected)
    assert pooled.shape == (sum(expected), enc.hidden_size) and pooled.abs().sum(-1).gt(0).all()
    assert [v.shape[0] for v in enc.compress_segments(segments)] == expected


def test_fixed_number_of_vectors():
    enc = make_encoder(n_vectors=3)
    with torch.no_grad():
        vectors = enc.compress(*batch_of([[7] * 20, [8] * 2, [9] * 5]))
    assert [v.shape[0] for v in vectors] == [3, 2, 3]


@pytest.mark.parametrize("pooling", ["mean_pooled_queries", "mean"])
def test_bidirectional(pooling):
    """Changing the last token changes the first vector: the first group sees the end of the segment."""
    enc = make_encoder(pooling=pooling)
    seg = list(range(10, 22))
    with torch.no_grad():
        first = enc.compress(*batch_of([seg]))[0][0]
        changed = enc.compress(*batch_of([seg[:-1] + [90]]))[0][0]
    assert not torch.allclose(first, changed, atol=1e-4)


def test_segments_do_not_leak():
    """A segment pools to the same vectors alone and packed next to a longer one (a tokenizer's padded output)."""
    enc = make_encoder()
    seg = [11, 12, 13, 14, 15]
    with torch.no_grad():
        alone = enc.compress(*batch_of([seg]))[0]
        padded = enc.compress(*batch_of([seg, list(range(30, 60))]))[0]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_checkpointing_gives_the_same_gradients():
    enc = make_encoder().train()
    packed = pack_segments([list(range(3, 13)), [4, 5, 6]], enc.factor, enc.n_vectors)
    grads = []
    for flag in (False, True):
        enc.gradient_checkpointing = flag
        enc.zero_grad()
        enc(packed).square().sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_truncated_layers": 3}, "n_truncated_layers"),
        ({"pooling": "max"}, "pooling"),
        ({"factor": 0}, "pooling_factor"),
    ],
)
def test_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ARCEncoder(tiny_backbone("llama"), **kwargs)
