"""An exported ARC encoder: text segments -> a few continuous vectors per segment -> a decoder's embedding space.

Standalone (imports nothing from arctrain), loaded with only transformers installed:

    model = AutoModel.from_pretrained("exported/tiny", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("exported/tiny", trust_remote_code=True)
    enc = tok(["a segment of text"], return_tensors="pt", padding=True, add_special_tokens=False)
    vectors = model.compress(enc.input_ids, enc.attention_mask)            # [(m, D)] per segment, encoder space
    embeds = model.project(torch.cat([vectors[0], model.special("llama", "cont")[None]]), "llama")  # (m + 1, Dd)

`embeds` go into the decoder's `inputs_embeds` in place of token embeddings (the decoder is not part of the export).

The backbone is a decoder-only LM cut short (no final norm, no LM head) with bidirectional attention. With
"mean_pooled_queries" the last kept layer's queries are its attention norm applied to the means of consecutive
groups of about `pooling_factor` hidden states, RMSNorm(mean(h)), at positions 0..m-1, while keys and values are
the normed whole segment; its residual is the group means. With "mean" the final states are averaged per group.
Groups: m = ceil(n / factor) (or min(n_vectors, n)), the first n % m groups hold n // m + 1 tokens, the others
n // m. `rope: "plain"` in the config means unscaled RoPE with the backbone's rope_theta (the reference's choice).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init

from .configuration_arc import ARCEncoderConfig


def n_pooled(length: int, factor: int, n_vectors: int = 0) -> int:
    """Number of vectors for a segment of `length` tokens (`n_vectors > 0` overrides the factor)."""
    return min(n_vectors, length) if n_vectors > 0 else -(-length // factor)


def pooling_matrix(lengths: torch.Tensor, counts: torch.Tensor, max_len: int) -> torch.Tensor:
    """(S, M, L) averaging weights: row g of segment s is 1/|group g| on the tokens of group g, else 0."""
    n_max = int(counts.max()) if lengths.shape[0] else 1
    q = (lengths // counts).unsqueeze(1)  # (S, 1) size of the small groups
    r = (lengths % counts).unsqueeze(1)  # (S, 1) how many groups get one more token
    t = torch.arange(max_len, device=lengths.device).unsqueeze(0)  # (1, L)
    big = r * (q + 1)  # tokens covered by the larger groups
    group = torch.where(t < big, t // (q + 1), r + (t - big) // q)  # (S, L)
    group = torch.where(t < lengths.unsqueeze(1), group, -1)  # padding belongs to no group
    member = group.unsqueeze(1) == torch.arange(n_max, device=lengths.device).view(1, -1, 1)  # (S, M, L)
    return member.float() / member.sum(-1, keepdim=True).clamp(min=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama, Mistral and Qwen2 apply it: x (S, H, T, hd), cos/sin (1, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def pooled_query_layer(layer: nn.Module, hidden, pool, bias, cos, sin) -> torch.Tensor:
    """A decoder layer whose queries are group means: (S, L, D) -> (S, M, D), with the layer's own weights."""
    attn = layer.self_attn
    n_segments, seq_len, _ = hidden.shape
    n_out = pool.shape[1]
    means = pool @ hidden  # (S, M, D) group means of the residual stream: the residual of this layer
    normed = layer.input_layernorm(hidden)  # (S, L, D) keys and values: the normed full segment
    q = (
        attn.q_proj(layer.input_layernorm(means)).view(n_segments, n_out, -1, attn.head_dim).transpose(1, 2)
    )  # (S, H, M, hd)
    k = attn.k_proj(normed).view(n_segments, seq_len, -1, attn.head_dim).transpose(1, 2)  # (S, Hkv, L, hd)
    v = attn.v_proj(normed).view(n_segments, seq_len, -1, attn.head_dim).transpose(1, 2)  # (S, Hkv, L, hd)
    q = apply_rope(q, cos[:, :n_out], sin[:, :n_out])  # pooled queries sit at positions 0..M-1
    k = apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1]
    )  # (S, H, M, hd)
    hidden = means + attn.o_proj(out.transpose(1, 2).reshape(n_segments, n_out, -1))  # (S, M, D)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class ARCBackbone(nn.Module):
    """The kept parts of the backbone: token embeddings, rotary embedding, layers (no final norm, no LM head)."""

    def __init__(self, backbone: dict, rope: str = "checkpoint"):
        super().__init__()
        backbone = dict(backbone)
        config = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
        if rope == "plain":  # unscaled RoPE with the backbone's rope_theta, as the reference ARC-Encoder
            params = dict(config.rope_parameters or {})
            config.rope_parameters = {"rope_type": "default", "rope_theta": params.get("rope_theta")}
        base = AutoModel.from_config(config)
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.layers = base.layers
        for layer in self.layers:
            layer.self_attn.is_causal = False  # bidirectional; no mask at all (no padding is computed)


class ARCSpecials(nn.Module):
    """A decoder's learned <Rec> and <Cont> vectors in encoder space."""

    def __init__(self, dim: int):
        super().__init__()
        self.rec = nn.Parameter(torch.ones(dim))
        self.cont = nn.Parameter(torch.ones(dim))


class ARCEncoderModel(PreTrainedModel):
    config_class = ARCEncoderConfig
    base_model_prefix = "arc"
    _no_split_modules = ["ARCBackbone"]

    def __init__(self, config: ARCEncoderConfig):
        super().__init__(config)
        self.encoder = ARCBackbone(config.backbone, getattr(config, "rope", "checkpoint"))
        dim = config.backbone["hidden_size"]
        self.projectors = nn.ModuleDict(
            {
                d["name"]: nn.Sequential(
                    nn.Linear(dim, d["projector_hidden"], bias=False),
                    nn.Linear(d["projector_hidden"], d["hidden_size"], bias=False),
                )
                for d in config.decoders
            }
        )
        self.specials = nn.ModuleDict({d["name"]: ARCSpecials(dim) for d in config.decoders})
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The base class covers linears, embeddings, norms and the rotary embedding's inv_freq, which is not saved
        # (a non-persistent buffer) and must be recomputed from the config after loading.
        super()._init_weights(module)
        if isinstance(module, ARCSpecials):
            init.ones_(module.rec)  # transformers' init functions skip weights that were loaded
            init.ones_(module.cont)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vectors (S, M, D) and their count per segment (S,); rows past a segment's count are zero.

        Each row of `input_ids` (S, L) is one segment, padded; `attention_mask` (S, L) is 1 for real tokens. No
        padding position is computed: the segments of each length run together, their real tokens only, with no
        mask (bidirectional attention inside each segment).
        """
        cfg = self.config
        lengths = attention_mask.sum(1).tolist()
        counts = [n_pooled(n, cfg.pooling_factor, cfg.n_vectors) if n else 0 for n in lengths]
        weight = self.encoder.embed_tokens.weight
        pooled = weight.new_zeros(len(lengths), max(counts, default=0), weight.shape[1])  # (S, M, D)
        for n in sorted(set(lengths) - {0}):
            rows = [s for s, length in enumerate(lengths) if length == n]
            ids = input_ids[rows][attention_mask[rows].bool()].view(len(rows), n)  # (G, n) real tokens
            pooled[rows, : counts[rows[0]]] = self._pool(ids, counts[rows[0]])
        return pooled, torch.tensor(counts, dtype=torch.long, device=input_ids.device)

    def _pool(self, ids: torch.Tensor, m: int) -> torch.Tensor:
        """Segments of one length n, (G, n) token ids -> their m vectors each, (G, m, D)."""
        n_segments, n = ids.shape
        hidden = self.encoder.embed_tokens(ids)  # (G, n, D)
        positions = torch.arange(n, device=ids.device).unsqueeze(0)  # (1, n)
        cos, sin = self.encoder.rotary_emb(hidden, positions)  # (1, n, hd) each
        size = torch.full((n_segments,), n, device=ids.device)
        pool = pooling_matrix(size, torch.full_like(size, m), n).to(hidden.dtype)  # (G, m, n)
        pooled_last = self.config.pooling == "mean_pooled_queries"
        layers = self.encoder.layers
        for layer in layers[: len(layers) - 1] if pooled_last else layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
            hidden = out[0] if isinstance(out, tuple) else out
        return pooled_query_layer(layers[-1], hidden, pool, None, cos, sin) if pooled_last else pool @ hidden

    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The vectors of each segment, (m_s, D) each, in encoder space."""
        pooled, counts = self(input_ids, attention_mask)
        return [p[:m] for p, m in zip(pooled, counts.tolist(), strict=True)]

    def special(self, decoder: str, kind: str) -> torch.Tensor:
        """A decoder's <Rec> ("rec") or <Cont> ("cont") vector, (D,) in encoder space."""
        return getattr(self.specials[decoder], kind)

    def project(self, vectors: torch.Tensor, decoder: str) -> torch.Tensor:
        """Encoder space (..., D) -> the decoder's embedding space (..., Dd)."""
        return self.projectors[decoder](vectors)
