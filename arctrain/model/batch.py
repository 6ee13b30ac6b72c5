"""Examples and batches: what the loader hands the model (see docs/ARCHITECTURE.md §4).

An `Example` is a list of pieces: decoder text (`Text`) and compressed memory (`Memory`: encoder segments, each
compressed on its own, then one special vector). `collate` lays the pieces of many examples out as tensors:

    dec_ids   (B, T)  decoder token ids; memory positions hold the pad id
    dec_slot  (B, T)  -1 for a text position, else an index into the flat vector list
                      [vectors of segment 0, vectors of segment 1, ..., stored vectors ..., <Rec>, <Cont>]
    labels    (B, T)  -100 except target tokens, aligned with dec_ids (the model shifts, as in Hugging Face)

so the model only compresses `enc_ids`, projects the flat list and scatters it by `dec_slot`. A `Memory` may carry
vectors compressed earlier (`vectors`, read from a vector store: arctrain/store.py) instead of encoder segments:
they travel as `stored` (N_s, D) and take the slots after the encoder's, so the encoder never sees them. `collate`
runs in loader workers and never tokenizes. It also computes, on the CPU, what the model would otherwise read back
from the device (a host-device sync per micro-batch): the pooling the counts were made with, the largest count, the
flat indices of the real vectors and of the target positions, and the sizes the FLOP counter needs (`BatchStats`).
"""

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from arctrain.model.pooling import POOLING_MODES, n_pooled

IGNORE = -100
SPECIALS = ("rec", "cont")  # their order after the memory vectors in the flat list


@dataclass
class Text:
    """Decoder tokens."""

    ids: list[int]
    loss: bool = False  # True: these tokens are targets


@dataclass
class Memory:
    """Compressed segments, then one special vector."""

    segments: list[list[int]]  # encoder token ids, one list per segment or chunk (each compressed on its own)
    special: str | None = None  # "rec", "cont" or None
    dropped_tokens: int = 0  # encoder tokens of this context left out (data.max_chunks), counted in BatchStats
    vectors: list[torch.Tensor] | None = None  # instead of segments: their pooled vectors, (m_s, D) each (a store)


@dataclass
class Example:
    pieces: list[Text | Memory]  # e.g. [Text(prefix), Memory([seg], "cont"), Text(target, loss=True)]


@dataclass
class ARCBatch:
    enc_ids: torch.Tensor  # (S, L) encoder ids of every segment, right-padded
    enc_mask: torch.Tensor  # (S, L) 1 for real tokens
    n_vectors: torch.Tensor  # (S,) pooled vectors per segment
    dec_ids: torch.Tensor  # (B, T)
    dec_slot: torch.Tensor  # (B, T) -1 text, else index into [memory vectors..., <Rec>, <Cont>]
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) -100 except targets
    task: str = ""
    decoder: str = ""
    keys: list[str] = field(default_factory=list)
    pooled_with: tuple[int, int] = (0, 0)  # (factor, n_vectors) that n_vectors was computed with
    max_vectors: int = 0  # n_vectors.max(): the M of the encoder's (S, M, D) output
    vector_index: torch.Tensor | None = None  # (N,) flat indices into (S * M) of the real vectors, in slot order
    target_index: torch.Tensor | None = None  # (N_t,) flat indices into (B * (T - 1)) of positions predicting a target
    stats: "BatchStats | None" = None
    stored: torch.Tensor | None = None  # (N_s, D) vectors of stored memories, in slot order after the encoder's

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ARCBatch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return ARCBatch(**moved)

    def pin_memory(self) -> "ARCBatch":
        """Called by DataLoader(pin_memory=True): pinned tensors make the `to(device, non_blocking=True)` async."""
        return ARCBatch(**{name: _map_tensor(value, torch.Tensor.pin_memory) for name, value in vars(self).items()})

    def __getstate__(self) -> dict:
        """Across processes (loader worker -> trainer) CPU tensors travel as numpy arrays, i.e. as bytes in the pipe.

        torch's default is a shared-memory segment per tensor, and receiving each one costs a socket connection to
        the sending process: ~0.4 ms per tensor, ~3 ms per batch of 8 tensors, more than these small batches take
        to copy (benchmarks/loader.py, docs/benchmarks.md "Data loader")."""
        return {name: _map_tensor(value, _to_numpy) for name, value in vars(self).items()}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, torch.from_numpy(value) if isinstance(value, np.ndarray) else value)

    def n_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


@dataclass(frozen=True)
class BatchStats:
    """Sizes of a collated batch, plain ints computed on the CPU (throughput and FLOP counting read them)."""

    samples: int
    enc_tokens: int  # real encoder tokens
    enc_pairs: int  # sum over segments of L^2: bidirectional attention (query, key) pairs per encoder layer
    pooled_pairs: int  # sum over segments of m * L: the pooled-query layer's pairs
    vectors: int  # projected vectors: memory vectors + the two special vectors
    dec_tokens: int  # real decoder positions
    dec_pairs: int  # sum over rows of T (T + 1) / 2: causal attention pairs per decoder layer
    targets: int  # target tokens (LM head positions)
    dropped_tokens: int = 0  # context tokens left out by data.max_chunks (arctrain/data/chunks.py)
    skipped_rows: int = 0  # examples left out because they have no target token (arctrain/data/loader.py)


def has_target(example: Example) -> bool:
    """Whether the example has a token to score (a continuation of a sample's last segment has none)."""
    return any(isinstance(piece, Text) and piece.loss and piece.ids for piece in example.pieces)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into (B * (T - 1)) of the positions whose next token is a target (position t predicts t + 1)."""
    return (labels[:, 1:] != IGNORE).flatten().nonzero().squeeze(1)


def _map_tensor(value, fn):
    return fn(value) if isinstance(value, torch.Tensor) else value


def _to_numpy(tensor: torch.Tensor):
    plain = tensor.device.type == "cpu" and not tensor.requires_grad and tensor.dtype != torch.bfloat16
    return tensor.numpy() if plain else tensor


def pretraining_example(
    task: str,
    enc_segments: list[list[int]],
    dec_segments: list[list[int]],
    i: int,
    prefix_ids: list[int] | None = None,
    interleave_tokens: int = 0,
) -> Example:
    """Segment i of a window as a pretraining example.

    Reconstruction compresses segment i and targets its decoder tokens; continuation compresses segment i and
    targets segment i + 1 (empty for the last segment: no target tokens, no loss). `interleave_tokens`
    (continuation only): the last that many decoder tokens of the segments before i come first, as text without
    loss (interleaved continuation: [text before, vectors, <Cont>, text after]).
    """
    if task not in ("reconstruction", "continuation"):
        raise ValueError(f"unknown task {task!r}: expected 'reconstruction' or 'continuation'")
    before = []
    if task == "reconstruction":
        memory, target = Memory([enc_segments[i]], "rec"), dec_segments[i]
    else:
        memory, target = Memory([enc_segments[i]], "cont"), dec_segments[i + 1] if i + 1 < len(dec_segments) else []
        if interleave_tokens:
            before = [t for seg in dec_segments[:i] for t in seg][-interleave_tokens:]
    pieces = [Text(before)] if before else []
    pieces += [Text(list(prefix_ids))] if prefix_ids else []
    return Example(pieces + [memory, Text(list(target), loss=True)])


def collate(
    examples: list[Example],
    *,
    pooling: str,
    factor: int,
    n_vectors: int,
    enc_pad_id: int,
    dec_pad_id: int,
    bos_id: int | None = None,
    task: str = "",
    decoder: str = "",
    keys: list[str] | None = None,
) -> ARCBatch:
    """Lay examples out as right-padded tensors. `bos_id` (the decoder's BOS, if it has one) starts every row."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLING_MODES)}")
    memories = [piece for ex in examples for piece in ex.pieces if isinstance(piece, Memory)]
    segments = [seg for piece in memories if piece.vectors is None for seg in piece.segments]
    stored = [v for piece in memories if piece.vectors is not None for v in piece.vectors]
    if any(len(seg) == 0 for seg in segments) or any(len(v) == 0 for v in stored):
        raise ValueError("a Memory segment is empty: every compressed segment needs at least one encoder token")
    counts = [n_pooled(len(seg), factor, n_vectors) for seg in segments]
    n_encoded = sum(counts)
    n_memory = n_encoded + sum(len(v) for v in stored)
    first_slot = iter([sum(counts[:j]) for j in range(len(counts))])
    stored_slot = iter([n_encoded + sum(len(v) for v in stored[:j]) for j in range(len(stored))])
    rows = []
    for ex in examples:
        row = _Row()
        if bos_id is not None:
            row.add([bos_id])
        for piece in ex.pieces:
            if isinstance(piece, Text):
                row.add(piece.ids, loss=piece.loss)
                continue
            if piece.vectors is not None:
                for v in piece.vectors:
                    start = next(stored_slot)
                    row.add([dec_pad_id] * len(v), slots=list(range(start, start + len(v))))
            else:
                for seg in piece.segments:
                    start, m = next(first_slot), n_pooled(len(seg), factor, n_vectors)
                    row.add([dec_pad_id] * m, slots=list(range(start, start + m)))
            if piece.special is not None:
                if piece.special not in SPECIALS:
                    raise ValueError(f"unknown special vector {piece.special!r}: expected one of {SPECIALS}")
                row.add([dec_pad_id], slots=[n_memory + SPECIALS.index(piece.special)])
        rows.append(row)
    enc_ids, enc_mask = _pad(segments, enc_pad_id)
    dec_ids, attention_mask = _pad([r.ids for r in rows], dec_pad_id)
    dec_slot, _ = _pad([r.slots for r in rows], -1)
    labels, _ = _pad([r.labels for r in rows], IGNORE)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # contiguous from 0; padding is masked anyway
    max_vectors = max(counts, default=0)
    vector_index = [s * max_vectors + j for s, m in enumerate(counts) for j in range(m)]
    target_index = target_positions(labels)
    row_lengths = [len(r.ids) for r in rows]
    stats = BatchStats(
        samples=len(rows),
        enc_tokens=sum(len(seg) for seg in segments),
        enc_pairs=sum(len(seg) ** 2 for seg in segments),
        pooled_pairs=sum(m * len(seg) for m, seg in zip(counts, segments, strict=True)),
        vectors=n_memory + len(SPECIALS),
        dec_tokens=sum(row_lengths),
        dec_pairs=sum(t * (t + 1) // 2 for t in row_lengths),
        targets=len(target_index),
        dropped_tokens=sum(p.dropped_tokens for ex in examples for p in ex.pieces if isinstance(p, Memory)),
    )
    return ARCBatch(
        enc_ids,
        enc_mask,
        torch.tensor(counts, dtype=torch.long),
        dec_ids,
        dec_slot,
        attention_mask,
        position_ids,
        labels,
        task,
        decoder,
        list(keys or []),
        pooled_with=(factor, n_vectors),
        max_vectors=max_vectors,
        vector_index=torch.tensor(vector_index, dtype=torch.long),
        target_index=target_index,
        stats=stats,
        stored=torch.cat(stored) if stored else None,
    )


class _Row:
    """One decoder sequence under construction."""

    def __init__(self):
        self.ids: list[int] = []
        self.slots: list[int] = []
        self.labels: list[int] = []

    def add(self, ids: list[int], *, loss: bool = False, slots: list[int] | None = None) -> None:
        self.ids += ids
        self.slots += slots if slots is not None else [-1] * len(ids)
        self.labels += ids if loss else [IGNORE] * len(ids)


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row (at least 1 column); returns (values, mask), both (N, max_len)."""
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return out, mask


def drop_memory(batch: ARCBatch) -> ARCBatch:
    """The same batch without its memory and special positions (the no-context baseline).

    Text positions keep their order and are packed to the left; targets stay the same tokens. A target that
    followed memory directly is then predicted from the text before it (a BOS or a prefix), so the same targets
    are scored as long as every row starts with some text.
    """
    keep = (batch.dec_slot == -1) & (batch.attention_mask == 1)  # (B, T)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept positions first, in order
    width = max(int(keep.sum(1).max()), 1)
    order = order[:, :width]
    mask = torch.gather(keep, 1, order).long()  # (B, T')

    def take(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(mask == 1, torch.gather(x, 1, order), fill)

    return ARCBatch(
        batch.enc_ids,
        batch.enc_mask,
        batch.n_vectors,
        take(batch.dec_ids, 0),
        torch.full_like(mask, -1),
        mask,
        (mask.cumsum(1) - 1).clamp(min=0),
        take(batch.labels, IGNORE),
        batch.task,
        batch.decoder,
        batch.keys,
        pooled_with=batch.pooled_with,
        max_vectors=batch.max_vectors,
        vector_index=batch.vector_index,
        target_index=None,  # recomputed from the labels by the model (evaluation only)
    )
