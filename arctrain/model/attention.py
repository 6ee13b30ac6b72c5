"""Packed (variable-length) attention for the encoder and the decoders, through transformers' AttentionInterface.

Every model here runs under the attention implementation `arc_packed` (`PACKED`): the encoder's backbone and the
stock Hugging Face decoder classes alike. A forward passes the boundaries of the packed sequences as keyword
arguments, which transformers hands down unchanged to every attention call:

    model.base_model(inputs_embeds=x, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                     max_length_q=n, max_length_k=n)            # x (1, N, D), pos restarting at 0 per sequence

Sequence i is positions cu[i]:cu[i + 1]. A layer attends causally inside each sequence (`module.is_causal`; the
encoder sets it False: bidirectional inside each segment), never across sequences, with the layer's sliding window
(Mistral, Qwen2, Gemma 3 pass `sliding_window`) counted inside the sequence. Queries and keys may have different
boundaries (the encoder's pooled-query layer: each segment's m queries against its L keys).

`arc_packed` has no entry in transformers' mask interface on purpose: mask creation then returns None at once
(no (N, N) mask, no scan of the position ids, no host-device sync), and the boundaries are all the kernels need.

Kernels: on CUDA flash-attn's `flash_attn_varlen_func` when the package imports, else PyTorch's own
`torch.nn.attention.varlen.varlen_attn`; on the CPU (every test) exact `scaled_dot_product_attention` calls, one per
group of sequences of equal lengths (a batched call, no padding), reading the boundaries as host ints (they live on
the CPU there). docs/ARCHITECTURE.md says why.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface

PACKED = "arc_packed"
CONFIG_VALUE = "packed"  # model.attn_implementation / decoders.N.attn_implementation


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, Nq, hd), key/value (B, Hkv, Nk, hd) -> (B, Nq, H, hd).

    Without `cu_seq_lens_q` every batch row is one whole sequence (a plain unpadded call); a padding mask is
    refused, since this implementation builds none (generation switches to sdpa: arctrain/inference/generate.py)."""
    if softcap is not None:
        raise ValueError(f"{PACKED} attention: attention logit soft-capping ({softcap}) is not supported")
    if attention_mask is not None:
        raise ValueError(f"{PACKED} attention takes packed sequences (cu_seq_lens_q/k), not an attention mask")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = sliding_window if sliding_window else None
    if "cu_seq_lens_q" not in kwargs:
        out = torch.cat(
            [_sdpa(q[None], k[None], v[None], causal, window, scaling) for q, k, v in zip(query, key, value)]
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(f"{PACKED} attention: packed sequences come as one batch row, got {query.shape[0]}")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    out = varlen_attention(
        query[0].transpose(0, 1),  # (N, H, hd)
        key[0].transpose(0, 1),  # (N, H, hd)
        value[0].transpose(0, 1),  # (N, H, hd)
        cu_q,
        cu_k,
        kwargs["max_length_q"],
        kwargs["max_length_k"],
        causal=causal,
        window=window,
        scale=scaling,
    )
    return out.unsqueeze(0), None  # (1, Nq, H, hd)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (Nq, H, hd), k/v (Nk, Hkv, hd), boundaries (n + 1,) int32 -> (Nq, H, hd); sequence i of the queries attends
    to sequence i of the keys only. `window` w: a query sees the w keys ending at itself (transformers' rule)."""
    if q.device.type != "cpu":  # CUDA; and the meta device, where varlen_attn infers shapes
        return _device_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()  # CPU tensors: no device read
    len_q = [b - a for a, b in zip(bounds_q, bounds_q[1:])]
    len_k = [b - a for a, b in zip(bounds_k, bounds_k[1:])]
    # Split, not slice: a slice's backward writes a zero tensor of the whole stream per sequence, a split's one cat.
    qs, ks, vs = q.split(len_q), k.split(len_k), v.split(len_k)
    outs: list[torch.Tensor | None] = [None] * len(len_q)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(zip(len_q, len_k)):
        groups.setdefault(shape, []).append(i)
    for (n, _), members in groups.items():
        if n == 0:
            for i in members:
                outs[i] = q.new_zeros(0, q.shape[1], v.shape[2])
            continue
        # Sequences of equal lengths attend in one batched call: exact, and one call instead of many.
        batch = [_gather(t, members).transpose(1, 2) for t in (qs, ks, vs)]  # (G, H, n, hd), (G, Hkv, n_k, hd) x2
        seq = _sdpa(*batch, causal, window, scale).transpose(1, 2)  # (G, n, H, hd)
        for i, out in zip(members, seq.unbind(0)):
            outs[i] = out
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _gather(pieces: tuple[torch.Tensor, ...], members: list[int]) -> torch.Tensor:
    """The pieces of equal shape (n, H, hd) at `members`, as (G, n, H, hd) (a view when there is one)."""
    return pieces[members[0]][None] if len(members) == 1 else torch.stack([pieces[i] for i in members])


def _sdpa(q, k, v, causal: bool, window: int | None, scale: float | None) -> torch.Tensor:
    """Sequences of equal lengths: q (G, H, n, hd), k/v (G, Hkv, n_k, hd) -> (G, H, n, hd)."""
    gqa = q.shape[1] != k.shape[1]
    n, n_k = q.shape[2], k.shape[2]
    if causal and window is not None and window < n_k:
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n_k, device=q.device)[None, :]
        mask = (j <= i) & (i - j < window)  # (n, n_k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and n > 1, scale=scale, enable_gqa=gqa)


def _device_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale) -> torch.Tensor:
    left = window - 1 if window is not None else -1
    right = 0 if causal else -1
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    flash = _flash_attn() if q.device.type == "cuda" else None
    if flash is not None:
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, window_size=(left, right))

    return varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(left, right), enable_gqa=q.shape[1] != k.shape[1]
    )


def _flash_attn():
    try:
        # optional extra, on GPU machines only
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def packed_kwargs(cu_q: torch.Tensor, max_q: int, cu_k: torch.Tensor | None = None, max_k: int | None = None) -> dict:
    """The keyword arguments a packed forward passes down to `packed_attention`."""
    return {
        "cu_seq_lens_q": cu_q,
        "cu_seq_lens_k": cu_q if cu_k is None else cu_k,
        "max_length_q": max_q,
        "max_length_k": max_q if max_k is None else max_k,
    }


def kernel_name(device: torch.device | str) -> str:
    """The kernel `packed_attention` uses on `device` (for logs and scripts/gpu_check.sh)."""
    if torch.device(device).type != "cuda":
        return "per-sequence scaled_dot_product_attention (CPU)"
    return "flash_attn_varlen_func" if _flash_attn() is not None else "torch.nn.attention.varlen.varlen_attn"


def check_implementation(value: str, key: str) -> str:
    """The transformers name for a config's attn_implementation value; refuses any other value in one line."""
    if value != CONFIG_VALUE:
        raise ValueError(f"{key}={value!r}: the only attention implementation is {CONFIG_VALUE!r} (packed varlen)")
    return PACKED


AttentionInterface.register(PACKED, packed_attention)
