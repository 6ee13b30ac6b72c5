"""A decoder's projector started where the encoder's vectors already mean something to that decoder.

`projector_init: identity` works when the encoder is cut from the decoder itself (its pooled states live in the
decoder's residual space). A decoder of another family has an unrelated embedding space, and a random projector
leaves it reading noise for its first hundred steps. `projector_init: aligned` starts it at the least-squares map
from the encoder's pooled vectors to what the decoder would have read for the same text:

    target of a pooled vector = mean over its group's encoder tokens of T[token]
    T[token] = mean of the decoder's input embeddings (scaled, as the decoder scales them) of the decoder's own
               tokens for that encoder token's text

    W = argmin_W  sum ||W x - y||^2 + ridge * tr(X^T X) / D * ||W||^2        x: pooled vector, y: its target

The fit needs only sums (X^T X, X^T Y), so ranks add theirs with one all-reduce and every rank solves the same
system. The projector becomes identity then W (`Projector.init_map`).
"""

import torch
from torch import nn

from arctrain.data.batch import PackedSegments
from arctrain.distributed import all_reduce


@torch.no_grad()
def token_targets(enc_tokenizer, dec_tokenizer, dec_embeddings: nn.Module, device=None) -> torch.Tensor:
    """(V_enc, Dd): for every encoder vocabulary entry, the mean of the decoder's input embeddings of the decoder's
    tokens for the same text (zero where the decoder's tokenizer gives none, e.g. special tokens)."""
    strings = [enc_tokenizer.decode([i]) for i in range(len(enc_tokenizer))]
    dec_ids = dec_tokenizer(strings, add_special_tokens=False).input_ids
    lengths = torch.tensor([len(ids) for ids in dec_ids], device=device)
    flat = torch.tensor([t for ids in dec_ids for t in ids], dtype=torch.long, device=device)
    embeds = dec_embeddings(flat[None])[0].float()  # (sum of lengths, Dd), scaled as the decoder scales them
    owner = torch.repeat_interleave(torch.arange(len(dec_ids), device=device), lengths)
    sums = torch.zeros(len(dec_ids), embeds.shape[-1], device=device).index_add_(0, owner, embeds)
    return sums / lengths.clamp(min=1).unsqueeze(1)


class AlignmentFit:
    """Running sums of one decoder's least-squares fit, pooled vector -> target (module docstring)."""

    def __init__(self, targets: torch.Tensor, enc_dim: int):
        self.targets = targets  # (V_enc, Dd)
        dec_dim = targets.shape[1]
        self.xtx = torch.zeros(enc_dim, enc_dim, dtype=torch.float64, device=targets.device)
        self.xty = torch.zeros(enc_dim, dec_dim, dtype=torch.float64, device=targets.device)
        self.n = torch.zeros((), dtype=torch.float64, device=targets.device)

    @torch.no_grad()
    def add(self, vectors: torch.Tensor, enc: PackedSegments) -> None:
        """vectors (N, D): the encoder's output for `enc`, in slot order (`ARCEncoder.forward`)."""
        ids = enc.ids.to(self.targets.device)
        group = enc.pool_group.to(self.targets.device)  # (T,) the vector each token is pooled into
        sums = torch.zeros(vectors.shape[0], self.targets.shape[1], device=self.targets.device)
        sums.index_add_(0, group, self.targets[ids])
        sizes = torch.bincount(group, minlength=vectors.shape[0]).clamp(min=1).unsqueeze(1)
        x = vectors.detach().to(self.targets.device, torch.float64)
        y = (sums / sizes).double()  # (N, Dd)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.n += x.shape[0]

    def all_reduce(self) -> None:
        """Sum every rank's statistics (device tensors, one collective each); nothing to do without a group."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = self.xtx.device
            self.xtx, self.xty, self.n = (all_reduce(t, device) for t in (self.xtx, self.xty, self.n))

    def solve(self, ridge: float = 1e-3) -> torch.Tensor:
        """W (Dd, D) with ridge `ridge` relative to the mean eigenvalue of X^T X."""
        if self.n.item() == 0:
            raise ValueError("projector_init aligned: no encoder vectors to fit the projector on")
        d = self.xtx.shape[0]
        lam = ridge * torch.trace(self.xtx) / d
        eye = torch.eye(d, dtype=self.xtx.dtype, device=self.xtx.device)
        return torch.linalg.solve(self.xtx + lam * eye, self.xty).T.float()  # (Dd, D)


@torch.no_grad()
def fit_aligned_map(encoder: nn.Module, batches, targets: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W (Dd, D) fitted on the encoder's vectors for `batches` (PackedSegments, on the encoder's device), summed over
    ranks when a process group is up (every rank must pass the same number of batches: one collective each)."""
    fit = AlignmentFit(targets, encoder.hidden_size)
    for enc in batches:
        fit.add(encoder(enc), enc)
    fit.all_reduce()
    return fit.solve(ridge)
