"""The encoder: a decoder-only backbone cut short, made bidirectional, that pools each segment to fewer vectors.

Only the backbone's own modules run (embed_tokens, rotary_emb, the kept decoder layers): no final norm, no LM
head. The segments of a batch come packed (arctrain/data/batch.py `PackedSegments`: one flat stream, positions
restarting at 0 per segment) and attention runs through the packed implementation (arctrain/model/attention.py):
bidirectional within a segment, nothing across segments, no padding. With `mean_pooled_queries` the last kept
layer's queries are the layer's attention norm applied to the group means of its input, RMSNorm(mean(h)), at
positions 0..m-1, while keys and values are the normed full segment (positions 0..L-1); the residual is the group
means, then the layer's MLP (docs/ARCHITECTURE.md compares every step with the reference implementation). With
`mean` every kept layer runs as usual and the final states are averaged per group. The group rule is in
`arctrain/data/pooling.py`.

Works for Llama, Mistral and Qwen2 backbones (any layer with input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp and rotary position embeddings). Sizes come from the config, never from weights, so
the module runs with ZeRO-3 partitioned parameters: each submodule called gathers its own weights.
"""

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from arctrain.data.batch import PackedSegments, pack_segments, unpad
from arctrain.data.pooling import POOLING_MODES
from arctrain.model.attention import PACKED, packed_kwargs, varlen_attention


class ARCEncoder(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        *,
        n_truncated_layers: int = 2,
        pooling: str = "mean_pooled_queries",
        factor: int = 4,
        n_vectors: int = 0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        base = backbone.base_model  # LlamaModel inside LlamaForCausalLM (or the model itself)
        config = base.config
        n_layers = config.num_hidden_layers
        if not 0 <= n_truncated_layers < n_layers:
            raise ValueError(f"model.n_truncated_layers={n_truncated_layers}: the backbone has {n_layers} layers")
        if pooling not in POOLING_MODES:
            raise ValueError(f"model.pooling={pooling!r}: expected one of {', '.join(POOLING_MODES)}")
        if factor < 1 or n_vectors < 0:
            raise ValueError(f"model.pooling_factor={factor}, model.n_vectors={n_vectors}: need factor >= 1, n >= 0")
        # The kept layers read their attention function from this config at every call: packed, whatever the
        # backbone was loaded with (the layers are the encoder's from here on).
        config._attn_implementation = PACKED
        self.config = copy.deepcopy(config)
        self.config.num_hidden_layers = n_layers - n_truncated_layers
        self.pooling, self.factor, self.n_vectors = pooling, factor, n_vectors
        self.gradient_checkpointing = gradient_checkpointing
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.layers = nn.ModuleList(base.layers[: n_layers - n_truncated_layers])
        for layer in self.layers:
            layer.self_attn.is_causal = False  # no implementation may add a causal mask on top of ours

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, enc: PackedSegments) -> torch.Tensor:
        """Pooled vectors (M, D) of the packed segments, segment after segment (M = enc.n_vectors)."""
        positions = enc.positions.unsqueeze(0)  # (1, N)
        hidden = self.embed_tokens(enc.ids.unsqueeze(0))  # (1, N, D)
        cos, sin = self.rotary_emb(hidden, positions)  # (1, N, head_dim) each
        pooled_last = self.pooling == "mean_pooled_queries"
        n_full = len(self.layers) - 1 if pooled_last else len(self.layers)
        for layer in self.layers[:n_full]:
            hidden = self._run(_full_layer, layer, hidden, positions, cos, sin, enc.cu_seqlens, enc.max_len)
        if pooled_last:
            q_cos, q_sin = self.rotary_emb(hidden, enc.pool_positions.unsqueeze(0))  # (1, M, head_dim): 0..m-1
            rope = (cos[0], sin[0], q_cos[0], q_sin[0])
            return self._run(pooled_query_layer, self.layers[-1], hidden[0], enc, *rope)  # (M, D)
        return group_means(hidden[0], enc)

    def compress(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor) -> list[torch.Tensor]:
        """The pooled vectors of each segment of a tokenizer's right-padded (S, L) output, (m_s, D) each, in encoder
        space. The real tokens are packed first (the encoder computes no padding)."""
        return self.compress_segments(unpad(enc_ids, enc_mask))

    def compress_segments(self, segments: list[list[int]]) -> list[torch.Tensor]:
        """The pooled vectors of each segment (token id lists), (m_s, D) each, in encoder space."""
        device = self.embed_tokens.weight.device
        enc = pack_segments(segments, self.factor, self.n_vectors)
        pooled = self(
            PackedSegments(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(enc).items()})
        )
        return list(pooled.split(enc.pool_cu_seqlens.diff().tolist()))

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def _full_layer(layer: nn.Module, hidden, positions, cos, sin, cu_seqlens, max_len) -> torch.Tensor:
    out = layer(hidden, position_ids=positions, position_embeddings=(cos, sin), **packed_kwargs(cu_seqlens, max_len))
    return out[0] if isinstance(out, tuple) else out  # older layer classes return a tuple


def group_means(hidden: torch.Tensor, enc: PackedSegments) -> torch.Tensor:
    """(N, D) -> (M, D): the mean of each pooling group's tokens (sizes known from the group index)."""
    sums = hidden.new_zeros(enc.n_vectors, hidden.shape[-1]).index_add_(0, enc.pool_group, hidden)  # (M, D)
    sizes = hidden.new_zeros(enc.n_vectors).index_add_(0, enc.pool_group, hidden.new_ones(hidden.shape[0]))
    return sums / sizes.clamp(min=1).unsqueeze(1)


def pooled_query_layer(
    layer: nn.Module, hidden: torch.Tensor, enc: PackedSegments, cos, sin, q_cos, q_sin
) -> torch.Tensor:
    """A decoder layer whose queries are group means: (N, D) -> (M, D), with the layer's own modules.

    Each segment's m queries attend to that segment's L tokens (different query and key boundaries). cos/sin
    (N, hd) are the keys' rotary tables, q_cos/q_sin (M, hd) the queries' (positions 0..m-1 per segment)."""
    attn = layer.self_attn
    means = group_means(hidden, enc)  # (M, D) group means of the residual stream: the residual of this layer
    queries = layer.input_layernorm(means)  # (M, D) RMSNorm(mean(h)), as the reference (not mean(RMSNorm(h)))
    normed = layer.input_layernorm(hidden)  # (N, D) keys and values: the normed full segment
    q = attn.q_proj(queries).view(means.shape[0], -1, attn.head_dim)  # (M, H, hd)
    k = attn.k_proj(normed).view(hidden.shape[0], -1, attn.head_dim)  # (N, Hkv, hd)
    v = attn.v_proj(normed).view(hidden.shape[0], -1, attn.head_dim)  # (N, Hkv, hd)
    q = apply_rope(q, q_cos, q_sin)  # pooled queries sit at positions 0..m-1
    k = apply_rope(k, cos, sin)
    out = varlen_attention(
        q, k, v, enc.pool_cu_seqlens, enc.cu_seqlens, enc.max_vectors, enc.max_len, causal=False, scale=attn.scaling
    )  # (M, H, hd)
    hidden = means + attn.o_proj(out.reshape(means.shape[0], -1))  # (M, D)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama, Mistral and Qwen2 apply it: x (N, H, hd), cos/sin (N, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
