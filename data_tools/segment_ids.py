"""The ids of segments for one tokenizer, as `PieceEncoder` gives them for each segment's text alone.

Short segments (16 tokens) encoded one string each cost a tokenizer ~1.45x its time on the running text, so each
run of consecutive segments of a document is encoded once, with offsets, and a segment's ids are sliced out
of that encoding wherever that is exact: the tokenizer passes `boundaries.slices_exactly`, both ends of the segment
are word boundaries (not cuts inside an overlong word) and the run's encoding has a token boundary at each
(`boundaries.token_cut`). Every other segment is encoded on its own.
"""

from itertools import chain

import numpy as np
from tokenizers import Encoding

from data_tools.boundaries import PieceEncoder, is_word_cut, token_cut
from data_tools.inputs import Doc
from data_tools.segment import Segment

GROUP_CHARS = 1 << 16  # characters per encode_batch call of segments encoded alone: bounds the memory of one call


def segment_ids(pieces: PieceEncoder, flat: list[tuple[Doc, Segment]], dtype: np.dtype, sliced: bool) -> list:
    """ids (arrays of `dtype`) of every segment in `flat`, in order; `sliced`: whether the tokenizer slices exactly.
    A run is a maximal sequence of segments of one document, each starting where the last ended."""
    out: list[np.ndarray | None] = [None] * len(flat)
    if sliced:
        runs = _runs(flat)
        spans = [(flat[a][0].text, flat[a][1].start, flat[b - 1][1].end) for a, b in runs]
        for (a, b), enc in zip(runs, _encode(pieces, spans)):
            out[a:b] = _slices(enc, flat[a][0].text, [s for _, s in flat[a:b]], dtype)
    alone = [k for k, ids in enumerate(out) if ids is None]
    for k, ids in zip(alone, encode_alone(pieces, [flat[k] for k in alone], dtype)):
        out[k] = ids
    return out


def _runs(flat: list[tuple[Doc, Segment]]) -> list[tuple[int, int]]:
    """[a, b) ranges of `flat` that are runs of consecutive segments of one document."""
    starts = [
        k
        for k in range(len(flat))
        if k == 0 or flat[k][0] is not flat[k - 1][0] or flat[k][1].start != flat[k - 1][1].end
    ]
    return list(zip(starts, starts[1:] + [len(flat)]))


def _slices(enc: Encoding, text: str, segments: list[Segment], dtype: np.dtype) -> list[np.ndarray | None]:
    """Per segment of a run, its ids sliced out of the run's encoding `enc`, or None where that is not exact."""
    base = segments[0].start
    # per segment edge (its start; the run's end last): the token index there, None where not exact
    cuts = [0] + [token_cut(enc, s.start - base) if is_word_cut(text, s.start) else None for s in segments[1:]]
    cuts.append(len(enc) if is_word_cut(text, segments[-1].end) else None)
    if not is_word_cut(text, base):
        cuts[0] = None
    ids = np.array(enc.ids, dtype=dtype)
    return [ids[a:b] if a is not None and b is not None else None for a, b in zip(cuts, cuts[1:])]


def encode_alone(pieces: PieceEncoder, flat: list[tuple[Doc, Segment]], dtype: np.dtype) -> list[np.ndarray]:
    """Ids per segment, each encoded on its own, in groups of bounded size; each group's ids live in one array (views
    per segment). A document's first segment is encoded as the tokenizer encodes a text, later ones as later pieces."""
    out: list[np.ndarray] = []
    start = 0
    while start < len(flat):
        end, n_chars = start, 0
        while end < len(flat) and (end == start or n_chars < GROUP_CHARS):
            n_chars += flat[end][1].end - flat[end][1].start
            end += 1
        encodings = _encode(pieces, [(d.text, seg.start, seg.end) for d, seg in flat[start:end]])
        lengths = [len(e) for e in encodings]
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=dtype, count=sum(lengths))
        bounds = np.cumsum([0, *lengths]).tolist()
        out.extend(ids[bounds[i] : bounds[i + 1]] for i in range(len(lengths)))
        start = end
    return out


def _encode(pieces: PieceEncoder, spans: list[tuple[str, int, int]]) -> list[Encoding]:
    """The encoding of text[a:b] for every (text, a, b), in order, in one encode_batch call per kind: a span at a
    document's start (a == 0) as the tokenizer encodes a text, the others as later pieces (no dummy prefix)."""
    out: list = [None] * len(spans)
    for first in (True, False):
        picked = [k for k, (_, a, _) in enumerate(spans) if (a == 0) == first]
        if picked:
            texts = [spans[k][0][spans[k][1] : spans[k][2]] for k in picked]
            for k, enc in zip(picked, pieces.encode_batch(texts, first)):
                out[k] = enc
    return out
