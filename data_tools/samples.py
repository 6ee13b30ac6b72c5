"""Documents -> WebDataset samples (docs/ARCHITECTURE.md §2): windows of segments, token ids per tokenizer.

This is the work done in worker processes; it is a pure function of the documents and the tokenizers, so the
shards are the same for any number of workers.
"""

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from data_tools.boundaries import PieceEncoder, slices_exactly
from data_tools.inputs import Doc
from data_tools.sample_format import MEMBER, offsets_dtype, pack
from data_tools.segment import Segment, Segmenter
from data_tools.segment_ids import GROUP_CHARS, segment_ids
from data_tools.tokenizer_set import TokenizerInfo


@dataclass(frozen=True)
class Sample:
    members: dict[str, bytes]  # "__key__" (str) and the member payloads
    tokens: tuple[int, ...]  # token count per tokenizer, in tokenizer order


class SampleEncoder:
    def __init__(self, tokenizers: list[TokenizerInfo], segment_tokens: int, window_segments: int):
        self.names = [t.name for t in tokenizers]
        self.dtypes = [np.dtype(t.dtype) for t in tokenizers]
        self.backends = [t.backend() for t in tokenizers]
        self.pieces = [PieceEncoder(b) for b in self.backends]  # segments after a document's first: no dummy prefix
        self.sliced = [slices_exactly(p) for p in self.pieces]  # segment ids sliced from one encoding of a run
        self.segmenter = Segmenter(self.backends[0], segment_tokens, tokenizers[0].dtype)
        self.window_segments = window_segments

    def encode(self, docs: list[Doc]) -> Iterator[tuple[int, Sample]]:
        """(document index, sample) for every window of every document, in order, produced a group of windows at a
        time so a huge document's samples never all sit in memory. A document without encoder tokens (possible
        only with a normalizer that deletes everything) yields nothing."""
        segments = self.segmenter.segment([d.text for d in docs])
        units = [
            (i, w, a, b)
            for i, doc_segments in enumerate(segments)
            if not all(s.enc_ids is not None and len(s.enc_ids) == 0 for s in doc_segments)
            for w, (a, b) in enumerate(windows(len(doc_segments), self.window_segments))
        ]
        for group in _groups(units, lambda u: segments[u[0]][u[3] - 1].end - segments[u[0]][u[2]].start):
            flat = [(docs[i], s) for i, _, a, b in group for s in segments[i][a:b]]
            # ids[t][k]: ids of flat segment k for tokenizer t
            ids = [self._encoder_ids(flat)] + [
                segment_ids(pieces, flat, dtype, sliced)
                for pieces, dtype, sliced in zip(self.pieces[1:], self.dtypes[1:], self.sliced[1:])
            ]
            k = 0
            for i, w, a, b in group:
                yield i, self._sample(docs[i], w, segments[i][a:b], [per_tok[k : k + b - a] for per_tok in ids])
                k += b - a

    def _encoder_ids(self, flat: list[tuple[Doc, Segment]]) -> list[np.ndarray]:
        """Slices from the segmenter's chunks where exact; the rest from `segment_ids` (e.g. a SentencePiece-style
        encoder: sliced from one encoding per run without the dummy prefix)."""
        alone = [(d, s) for d, s in flat if s.enc_ids is None]
        encoded = iter(segment_ids(self.pieces[0], alone, self.dtypes[0], self.sliced[0]))
        return [next(encoded) if s.enc_ids is None else s.enc_ids for _, s in flat]

    def _sample(self, doc: Doc, w: int, segments: list[Segment], seg_ids: list[list[np.ndarray]]) -> Sample:
        meta = {
            "doc_id": doc.doc_id,
            "source": doc.source,
            "window": w,
            "n_segments": len(segments),
            "char_spans": [[s.start, s.end] for s in segments],
        }
        tokens = {}
        for name, dtype, parts in zip(self.names, self.dtypes, seg_ids):
            bounds = [0, *accumulate(map(len, parts))]
            offsets = np.array(bounds, offsets_dtype(bounds[-1]))
            tokens[name] = (np.concatenate(parts).astype(dtype, copy=False), offsets)
        members = {"__key__": f"{doc.digest[:8].hex()}-{w:05d}", MEMBER: pack(meta, tokens)}
        return Sample(members, tuple(len(ids) for ids, _ in tokens.values()))


def _groups(units: list, n_chars) -> Iterator[list]:
    """Consecutive units in groups of about GROUP_CHARS characters (at least one unit each)."""
    group, size = [], 0
    for unit in units:
        group.append(unit)
        size += n_chars(unit)
        if size >= GROUP_CHARS:
            yield group
            group, size = [], 0
    if group:
        yield group


# Worker processes (arc-data build --workers N): this module imports neither webdataset (which imports torch)
# nor pyarrow nor transformers, so a worker starts in a fraction of a second.
_WORKER_ENCODER: SampleEncoder | None = None


def init_worker(tokenizers: list[TokenizerInfo], segment_tokens: int, window_segments: int) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker, one core
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process stops the pool
    _WORKER_ENCODER = SampleEncoder(tokenizers, segment_tokens, window_segments)


def encode_batch(batch: list[Doc]) -> list[tuple[int, Sample]]:
    assert _WORKER_ENCODER is not None
    return list(_WORKER_ENCODER.encode(batch))


def windows(n_segments: int, window_segments: int) -> list[tuple[int, int]]:
    """[start, end) segment ranges; a trailing single segment joins the previous window (unless windows are
    single segments anyway)."""
    starts = list(range(0, n_segments, window_segments))
    if len(starts) > 1 and n_segments - starts[-1] == 1 and window_segments > 1:
        starts.pop()
    return [(a, starts[i + 1] if i + 1 < len(starts) else n_segments) for i, a in enumerate(starts)]
