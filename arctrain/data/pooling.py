"""How a segment of n encoder tokens becomes m vectors: the group rule, shared by `collate` and the encoder.

Rule: with a factor x, m = ceil(n / x); with a fixed number of vectors k, m = min(k, n). A segment shorter than x
gives one vector. The n tokens are cut into m consecutive groups of near-equal size: the first n % m groups hold
n // m + 1 tokens, the others n // m (length 10, x = 4: m = 3, groups of 4, 3, 3).
"""

import torch

POOLING_MODES = ("mean_pooled_queries", "mean")


def n_pooled(length: int, factor: int, n_vectors: int = 0) -> int:
    """Number of vectors for a segment of `length` tokens (`n_vectors > 0` overrides the factor)."""
    assert length > 0, "an empty segment has nothing to compress"
    if n_vectors > 0:
        return min(n_vectors, length)
    return -(-length // factor)


def pooled_counts(lengths: torch.Tensor, factor: int, n_vectors: int = 0) -> torch.Tensor:
    """`n_pooled` for every segment at once, as tensor ops (no host-device sync): lengths (S,) -> counts (S,)."""
    if n_vectors > 0:
        return lengths.clamp(max=n_vectors)
    return (lengths + factor - 1) // factor


def group_sizes(length: int, m: int) -> list[int]:
    """Sizes of the m consecutive groups of a segment of `length` tokens (larger groups first)."""
    q, r = divmod(length, m)
    return [q + 1] * r + [q] * (m - r)


def pooling_matrix(lengths: torch.Tensor, counts: torch.Tensor, max_len: int, n_max: int | None = None) -> torch.Tensor:
    """(S, M, L) averaging weights: row g of segment s is 1/|group g| on the tokens of group g, else 0.

    `lengths` (S,) are the real token counts, `counts` (S,) the number of vectors per segment, M = `n_max` (the
    largest count; read from `counts`, a host-device sync, when not given). Rows past a segment's count, and padding
    columns, are zero.
    """
    n_segments = lengths.shape[0]
    if n_max is None:
        n_max = int(counts.max()) if n_segments else 1
    q = (lengths // counts).unsqueeze(1)  # (S, 1) size of the small groups
    r = (lengths % counts).unsqueeze(1)  # (S, 1) how many groups get one more token
    t = torch.arange(max_len, device=lengths.device).unsqueeze(0)  # (1, L)
    big = r * (q + 1)  # tokens covered by the larger groups
    group = torch.where(t < big, t // (q + 1), r + (t - big) // q)  # (S, L)
    group = torch.where(t < lengths.unsqueeze(1), group, -1)  # padding belongs to no group
    g = torch.arange(n_max, device=lengths.device).view(1, -1, 1)  # (1, M, 1)
    member = group.unsqueeze(1) == g  # (S, M, L)
    size = member.sum(-1, keepdim=True).clamp(min=1)  # (S, M, 1)
    return member.float() / size
