"""The encoder: a decoder-only backbone cut short, made bidirectional, that pools each segment to fewer vectors.

Only the backbone's own modules run (embed_tokens, rotary_emb, the kept decoder layers): no final norm, no LM
head. Attention is bidirectional within a segment (padding masked). With `mean_pooled_queries` the last kept
layer's queries are the layer's attention norm applied to the group means of its input, RMSNorm(mean(h)), at
positions 0..m-1, while keys and values are the normed full segment (positions 0..L-1); the residual is the group
means, then the layer's MLP (docs/ARCHITECTURE.md compares every step with the reference implementation). With
`mean` every kept layer runs as usual and the final states are averaged per group. The group rule is in
`arctrain/model/pooling.py`.

Works for Llama, Mistral and Qwen2 backbones (any layer with input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp and rotary position embeddings). Sizes come from the config, never from weights, so
the module runs with ZeRO-3 partitioned parameters: each submodule called gathers its own weights.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from arctrain.model.pooling import POOLING_MODES, pooled_counts, pooling_matrix

# The encoder passes its own 4-D padding mask into the layers: attention implementations that take one.
MASKED_ATTENTION = ("sdpa", "eager")


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
        if config._attn_implementation not in MASKED_ATTENTION:
            raise ValueError(
                f"model.attn_implementation={config._attn_implementation!r}: the encoder needs one of "
                f"{', '.join(MASKED_ATTENTION)} (it passes a bidirectional 4-D mask)"
            )
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

    def forward(
        self, enc_ids: torch.Tensor, enc_mask: torch.Tensor, max_count: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vectors (S, M, D) and their count per segment (S,); rows past a segment's count are zero.

        `max_count`: the largest count (M), known on the CPU from `collate`; without it M is read from the device.
        """
        n_segments, seq_len = enc_ids.shape
        lengths = enc_mask.sum(1)  # (S,)
        counts = pooled_counts(lengths, self.factor, self.n_vectors)  # (S,) on the device, no sync
        hidden = self.embed_tokens(enc_ids)  # (S, L, D)
        pool = pooling_matrix(lengths, counts, seq_len, max_count).to(hidden.dtype)  # (S, M, L)
        positions = torch.arange(seq_len, device=enc_ids.device).unsqueeze(0)  # (1, L)
        cos, sin = self.rotary_emb(hidden, positions)  # (1, L, head_dim) each
        # Additive key-padding mask, broadcast over heads and queries: every query sees every real token.
        bias = (1.0 - enc_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # (S, 1, 1, L)
        full_mask = bias.expand(n_segments, 1, seq_len, seq_len)
        pooled_last = self.pooling == "mean_pooled_queries"
        n_full = len(self.layers) - 1 if pooled_last else len(self.layers)
        for layer in self.layers[:n_full]:
            hidden = self._run(_full_layer, layer, hidden, full_mask, positions, cos, sin)
        if pooled_last:
            pooled = self._run(pooled_query_layer, self.layers[-1], hidden, pool, bias, cos, sin)  # (S, M, D)
        else:
            pooled = pool @ hidden  # (S, M, D)
        valid = torch.arange(pool.shape[1], device=counts.device) < counts.unsqueeze(1)  # (S, M)
        return pooled * valid.unsqueeze(-1).to(pooled.dtype), counts

    def compress(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor) -> list[torch.Tensor]:
        """The pooled vectors of each segment, (m_s, D) each, in encoder space."""
        pooled, counts = self(enc_ids, enc_mask)
        return [p[:m] for p, m in zip(pooled, counts.tolist(), strict=True)]

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def _full_layer(layer: nn.Module, hidden, mask, positions, cos, sin) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out  # older layer classes return a tuple


def pooled_query_layer(
    layer: nn.Module, hidden: torch.Tensor, pool: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """A decoder layer whose queries are group means: (S, L, D) -> (S, M, D), with the layer's own modules."""
    attn = layer.self_attn
    n_segments, seq_len, _ = hidden.shape
    n_out = pool.shape[1]
    means = pool @ hidden  # (S, M, D) group means of the residual stream: the residual of this layer
    queries = layer.input_layernorm(means)  # (S, M, D) RMSNorm(mean(h)), as the reference (not mean(RMSNorm(h)))
    normed = layer.input_layernorm(hidden)  # (S, L, D) keys and values: the normed full segment
    q = attn.q_proj(queries).view(n_segments, n_out, -1, attn.head_dim).transpose(1, 2)  # (S, H, M, hd)
    k = attn.k_proj(normed).view(n_segments, seq_len, -1, attn.head_dim).transpose(1, 2)  # (S, Hkv, L, hd)
    v = attn.v_proj(normed).view(n_segments, seq_len, -1, attn.head_dim).transpose(1, 2)  # (S, Hkv, L, hd)
    q = apply_rope(q, cos[:, :n_out], sin[:, :n_out])  # pooled queries sit at positions 0..M-1
    k = apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1]
    )  # (S, H, M, hd)
    out = attn.o_proj(out.transpose(1, 2).reshape(n_segments, n_out, -1))  # (S, M, D)
    hidden = means + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama, Mistral and Qwen2 apply it: x (S, H, T, hd), cos/sin (1 or S, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
