"""Examples and batches: what the loader hands the model (see docs/ARCHITECTURE.md §4).

An `Example` is a list of pieces: decoder text (`Text`) and compressed memory (`Memory`: encoder segments, each
compressed on its own, then one special vector). `collate` lays the pieces of many examples end to end, with no
padding anywhere (packed sequences, as varlen attention kernels read them):

    enc_ids        (N_enc,)  every segment's encoder tokens, one after the other
    enc_positions  (N_enc,)  0..len-1 within each segment
    enc_cu_seqlens (S + 1,)  segment boundaries (int32), enc_max_len the longest segment (a plain int)
    pool_group     (N_enc,)  each token's pooled vector: an index into the flat vector list below
    pool_positions (N_vec,)  0..m-1 within each segment (the pooled queries' positions)
    pool_cu_seqlens (S + 1,) boundaries of each segment's vectors, max_vectors the largest count
    dec_ids        (1, N_dec) every decoder row, one after the other; memory positions hold the pad id
    dec_slot       (1, N_dec) -1 for a text position, else an index into the flat vector list
                              [vectors of segment 0, vectors of segment 1, ..., stored vectors ..., <Rec>, <Cont>]
    position_ids   (1, N_dec) 0..len-1 within each row; dec_cu_seqlens (B + 1,), dec_max_len (a plain int)
    labels         (1, N_dec) -100 except target tokens, aligned with dec_ids (position p predicts p + 1)
    target_index   (N_t,)     positions p whose next token, in the same row, is a target

so the model compresses `enc_ids`, projects the flat vector list and scatters it by `dec_slot`. A `Memory` may carry
vectors compressed earlier (`vectors`, from a vector store: arctrain/inference/store.py) instead of encoder segments:
they travel as `stored` (N_s, D) and take the slots after the encoder's, so the encoder never sees them. `collate`
runs in loader workers and never tokenizes; everything a kernel needs as a size (boundaries, maxima, counts) is
computed here on the CPU, so no forward reads a size back from the device. `row_lengths`, `text_index` and
`label_index` are host lists (never moved) that `rows` and `drop_memory` use.
"""

from dataclasses import dataclass, field, fields
from itertools import accumulate

import numpy as np
import torch

from arctrain.data.pooling import POOLING_MODES, group_sizes, n_pooled

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
class PackedSegments:
    """Encoder segments laid end to end: the encoder's input (arctrain/model/encoder.py)."""

    ids: torch.Tensor  # (N,) encoder token ids
    positions: torch.Tensor  # (N,) 0..len-1 within each segment
    cu_seqlens: torch.Tensor  # (S + 1,) int32 segment boundaries
    max_len: int  # longest segment
    pool_group: torch.Tensor  # (N,) index of each token's vector in the flat (sum m, D) output
    pool_positions: torch.Tensor  # (M,) 0..m-1 within each segment
    pool_cu_seqlens: torch.Tensor  # (S + 1,) int32 boundaries of each segment's vectors
    max_vectors: int  # largest count
    n_vectors: int  # M = sum of counts (the output's length)


def pack_segments(segments: list[list[int]], factor: int, n_vectors: int) -> PackedSegments:
    """Segments (token id lists, none empty) -> the packed encoder input, on the CPU."""
    if any(len(seg) == 0 for seg in segments):
        raise ValueError("a Memory segment is empty: every compressed segment needs at least one encoder token")
    lengths = [len(seg) for seg in segments]
    counts = [n_pooled(n, factor, n_vectors) for n in lengths]
    groups, first = [], 0
    for n, m in zip(lengths, counts, strict=True):
        groups += [first + g for g, size in enumerate(group_sizes(n, m)) for _ in range(size)]
        first += m
    return PackedSegments(
        ids=torch.tensor([t for seg in segments for t in seg], dtype=torch.long),
        positions=torch.tensor([p for n in lengths for p in range(n)], dtype=torch.long),
        cu_seqlens=_cu(lengths),
        max_len=max(lengths, default=0),
        pool_group=torch.tensor(groups, dtype=torch.long),
        pool_positions=torch.tensor([p for m in counts for p in range(m)], dtype=torch.long),
        pool_cu_seqlens=_cu(counts),
        max_vectors=max(counts, default=0),
        n_vectors=first,
    )


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """A tokenizer's right-padded (S, L) ids and mask -> one id list per segment (the real tokens)."""
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)


@dataclass
class ARCBatch:
    enc: PackedSegments  # the encoder segments, packed (no segment: S = 0)
    n_vectors: torch.Tensor  # (S,) pooled vectors per segment
    dec_ids: torch.Tensor  # (1, N_dec)
    dec_slot: torch.Tensor  # (1, N_dec) -1 text, else index into [memory vectors..., <Rec>, <Cont>]
    position_ids: torch.Tensor  # (1, N_dec) restarting at 0 in every row
    dec_cu_seqlens: torch.Tensor  # (B + 1,) int32 row boundaries
    dec_max_len: int  # longest row
    labels: torch.Tensor  # (1, N_dec) -100 except targets
    target_index: torch.Tensor  # (N_t,) positions whose next token (same row) is a target
    row_lengths: list[int]  # host copy of the row lengths
    text_index: list[int]  # host: positions of text tokens (what drop_memory keeps)
    label_index: list[int]  # host: positions of target tokens
    task: str = ""
    decoder: str = ""
    keys: list[str] = field(default_factory=list)
    pooled_with: tuple[int, int] = (0, 0)  # (factor, n_vectors) that n_vectors was computed with
    stats: "BatchStats | None" = None
    stored: torch.Tensor | None = None  # (N_s, D) vectors of stored memories, in slot order after the encoder's

    @property
    def max_vectors(self) -> int:
        return self.enc.max_vectors

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ARCBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ARCBatch":
        """Called by DataLoader(pin_memory=True): pinned tensors make the `to(device, non_blocking=True)` async."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "ARCBatch":
        return ARCBatch(**{f.name: _map_tensor(getattr(self, f.name), fn) for f in fields(self)})

    def __getstate__(self) -> dict:
        """Across processes (loader worker -> trainer) CPU tensors travel as numpy arrays, i.e. as bytes in the pipe.

        torch's default is a shared-memory segment per tensor, and receiving each one costs a socket connection to
        the sending process: ~0.4 ms per tensor, ~3 ms per batch of 8 tensors, more than these small batches take
        to copy (benchmarks/loader.py, docs/benchmarks.md "Data loader")."""
        return {name: _map_tensor(value, _to_numpy) for name, value in vars(self).items()}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, _map_tensor(value, _from_numpy))

    def n_target_tokens(self) -> int:
        return int(self.target_index.shape[0])

    def rows(self, values: torch.Tensor) -> list[torch.Tensor]:
        """A per-position decoder tensor, (1, N_dec, ...) or (N_dec, ...), split into its rows (inspection,
        generation)."""
        n = sum(self.row_lengths)
        flat = values[0] if values.dim() > 1 and values.shape[0] == 1 and values.shape[1] == n else values
        return list(flat.split(self.row_lengths))

    def segments(self) -> list[list[int]]:
        """The encoder segments' token ids."""
        lengths = self.enc.cu_seqlens.diff().tolist()
        return [s.tolist() for s in self.enc.ids.cpu().split(lengths)]


@dataclass(frozen=True)
class BatchStats:
    """Sizes of a collated batch, plain ints computed on the CPU (throughput and FLOP counting read them).

    `*_computed` are the positions the kernels run: equal to the real ones in the packed layout (the padding
    metrics, arctrain/train/metrics.py, report the difference)."""

    samples: int
    enc_tokens: int  # real encoder tokens
    enc_pairs: int  # sum over segments of L^2: bidirectional attention (query, key) pairs per encoder layer
    pooled_pairs: int  # sum over segments of m * L: the pooled-query layer's pairs
    vectors: int  # projected vectors: memory vectors + the two special vectors
    dec_tokens: int  # real decoder positions
    dec_pairs: int  # sum over rows of T (T + 1) / 2: causal attention pairs per decoder layer
    targets: int  # target tokens (LM head positions)
    dropped_tokens: int = 0  # context tokens left out by data.max_chunks (arctrain/data/chunks.py)
    enc_computed: int = -1  # encoder positions computed (-1: enc_tokens)
    dec_computed: int = -1  # decoder positions computed (-1: dec_tokens)
    skipped_rows: int = 0  # examples left out because they have no target token (arctrain/data/loader.py)
    over_budget: int = 0  # samples larger than data.tokens_per_micro_batch on their own, skipped
    budget_full: int = 0  # samples of the window not taken because the token budget was full


def has_target(example: Example) -> bool:
    """Whether the example has a token to score (a continuation of a sample's last segment has none)."""
    return any(isinstance(piece, Text) and piece.loss and piece.ids for piece in example.pieces)


def example_tokens(example: Example, factor: int, n_vectors: int, bos: bool) -> int:
    """Encoder tokens plus decoder positions of one example, as `collate` lays it out (the token budget's measure:
    data.tokens_per_micro_batch)."""
    enc, dec = 0, int(bos)
    for piece in example.pieces:
        if isinstance(piece, Text):
            dec += len(piece.ids)
            continue
        if piece.vectors is not None:
            dec += sum(len(v) for v in piece.vectors)
        else:
            enc += sum(len(seg) for seg in piece.segments)
            dec += sum(n_pooled(len(seg), factor, n_vectors) for seg in piece.segments if seg)
        dec += piece.special is not None
    return enc + dec


def within_budget(sizes: list[int], budget: int) -> tuple[list[int], int, int]:
    """The examples a micro-batch of at most `budget` tokens takes from its window of examples (sizes in window
    order): (indices taken, examples over the budget on their own (skipped), examples left because it was full).

    The window's first examples are taken in order while their sum fits; an example that alone exceeds the budget is
    skipped; the first one that no longer fits ends the micro-batch (it and the rest of the window are left). The
    choice depends on the window alone, so a micro-batch stays a pure function of its global index (exact resume,
    any world size)."""
    taken, total, over = [], 0, 0
    for j, n in enumerate(sizes):
        if n > budget:
            over += 1
            continue
        if total + n > budget:
            return taken, over, len(sizes) - j
        taken.append(j)
        total += n
    return taken, over, 0


def _map_tensor(value, fn):
    if isinstance(value, torch.Tensor | np.ndarray):
        return fn(value)
    if isinstance(value, PackedSegments):
        return PackedSegments(**{f.name: _map_tensor(getattr(value, f.name), fn) for f in fields(value)})
    return value


def _to_numpy(tensor):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    plain = tensor.device.type == "cpu" and not tensor.requires_grad and tensor.dtype != torch.bfloat16
    return tensor.numpy() if plain else tensor


def _from_numpy(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


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
    dec_pad_id: int,
    enc_pad_id: int | None = None,
    bos_id: int | None = None,
    task: str = "",
    decoder: str = "",
    keys: list[str] | None = None,
) -> ARCBatch:
    """Lay examples out packed, end to end (module docstring). `bos_id` (the decoder's BOS, if any) starts every
    row. `enc_pad_id` is accepted for callers' symmetry and unused: nothing is padded."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLING_MODES)}")
    memories = [piece for ex in examples for piece in ex.pieces if isinstance(piece, Memory)]
    segments = [seg for piece in memories if piece.vectors is None for seg in piece.segments]
    stored = [v for piece in memories if piece.vectors is not None for v in piece.vectors]
    if any(len(v) == 0 for v in stored):
        raise ValueError("a Memory segment is empty: every compressed segment needs at least one encoder token")
    enc = pack_segments(segments, factor, n_vectors)
    counts = enc.pool_cu_seqlens.diff().tolist()
    n_memory = enc.n_vectors + sum(len(v) for v in stored)
    first_slot = iter(enc.pool_cu_seqlens.tolist())
    stored_slot = iter([enc.n_vectors + sum(len(v) for v in stored[:j]) for j in range(len(stored))])
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
    dec_ids = [t for r in rows for t in r.ids]
    slots = [s for r in rows for s in r.slots]
    labels = [t for r in rows for t in r.labels]
    row_lengths = [len(r.ids) for r in rows]
    label_index = [p for p, t in enumerate(labels) if t != IGNORE]
    target_index = _targets(label_index, row_lengths)
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
        enc_computed=int(enc.ids.shape[0]),
        dec_computed=len(dec_ids),
    )
    return ARCBatch(
        enc=enc,
        n_vectors=torch.tensor(counts, dtype=torch.long),
        dec_ids=torch.tensor([dec_ids], dtype=torch.long).view(1, -1),
        dec_slot=torch.tensor([slots], dtype=torch.long).view(1, -1),
        position_ids=torch.tensor([[p for n in row_lengths for p in range(n)]], dtype=torch.long).view(1, -1),
        dec_cu_seqlens=_cu(row_lengths),
        dec_max_len=max(row_lengths, default=0),
        labels=torch.tensor([labels], dtype=torch.long).view(1, -1),
        target_index=torch.tensor(target_index, dtype=torch.long),
        row_lengths=row_lengths,
        text_index=[p for p, s in enumerate(slots) if s == -1],
        label_index=label_index,
        task=task,
        decoder=decoder,
        keys=list(keys or []),
        pooled_with=(factor, n_vectors),
        stats=stats,
        stored=torch.cat(stored) if stored else None,
    )


def _targets(label_index: list[int], row_lengths: list[int]) -> list[int]:
    """Positions p whose next token p + 1 is a target in the same row (a row's first token has no predictor)."""
    starts = set(accumulate([0, *row_lengths]))
    return [p - 1 for p in label_index if p not in starts]


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


def drop_memory(batch: ARCBatch) -> ARCBatch:
    """The same batch without its memory and special positions (the no-context baseline), still packed.

    Text positions keep their order; targets stay the same tokens. A target that followed memory directly is then
    predicted from the text before it (a BOS or a prefix), so the same targets are scored as long as every row
    starts with some text. Built from the batch's host lists: the gathers run where the batch is, nothing is read
    back from the device.
    """
    keep, starts = batch.text_index, list(accumulate([0, *batch.row_lengths]))
    row_of = np.searchsorted(np.asarray(starts[1:]), np.asarray(keep, dtype=np.int64), side="right")
    lengths = np.bincount(row_of, minlength=len(batch.row_lengths)).tolist() if keep else [0] * len(batch.row_lengths)
    labelled = set(batch.label_index)
    label_index = [j for j, p in enumerate(keep) if p in labelled]
    target_index = _targets(label_index, lengths)
    device = batch.dec_ids.device
    index = torch.tensor(keep, dtype=torch.long).to(device)
    dec_ids = batch.dec_ids[:, index]  # (1, N_text)
    return ARCBatch(
        enc=pack_segments([], *batch.pooled_with),
        n_vectors=torch.zeros(0, dtype=torch.long, device=device),
        dec_ids=dec_ids,
        dec_slot=torch.full_like(dec_ids, -1),
        position_ids=torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long).view(1, -1).to(device),
        dec_cu_seqlens=_cu(lengths).to(device),
        dec_max_len=max(lengths, default=0),
        labels=batch.labels[:, index],
        target_index=torch.tensor(target_index, dtype=torch.long).to(device),
        row_lengths=lengths,
        text_index=list(range(len(keep))),
        label_index=label_index,
        task=batch.task,
        decoder=batch.decoder,
        keys=batch.keys,
        pooled_with=batch.pooled_with,
    )
