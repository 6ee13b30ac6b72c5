"""Contexts -> chunks: the encoder sequences a context is compressed as (docs/ARCHITECTURE.md §10).

A chunk is one encoder sequence, compressed on its own: positions 0..L-1, attention within the chunk, pooled into
about L / pooling_factor vectors. The chunks of a context follow one another in the decoder, then one <Cont>.

    chunker = Chunker(enc_tok, chunk_tokens=1024, max_chunks=8)
    chunks, dropped = chunker.cut(["a long document ...", "another passage"])   # ids per chunk, ContextCut

Shard segments are the chunks `arc-data build --segment-tokens` cut at build time; a context given as text (QA
passages in training, `arctrain generate`/`eval` contexts) is cut here by the same cutter (data_tools/segment.py:
word boundaries, about `chunk_tokens` encoder tokens each), so one rule makes both. `max_chunks` keeps the first
chunks of a context (the paper's long-context setting: 1024-token chunks) and counts what it drops.
"""

from dataclasses import dataclass

from data_tools.boundaries import PieceEncoder
from data_tools.segment import Segmenter


@dataclass
class ContextCut:
    """What cutting contexts dropped, summed over calls (a counted skip: reported, never silent)."""

    contexts: int = 0  # contexts cut
    truncated: int = 0  # contexts that had more than max_chunks chunks
    dropped_chunks: int = 0
    dropped_tokens: int = 0  # encoder tokens in the dropped chunks

    def add(self, other: "ContextCut") -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Chunker:
    """Cuts texts into chunks of about `chunk_tokens` encoder tokens; keeps at most `max_chunks` (0: all)."""

    def __init__(self, enc_tok, chunk_tokens: int, max_chunks: int = 0):
        if chunk_tokens < 1 or max_chunks < 0:
            raise ValueError(f"chunk_tokens must be >= 1 and max_chunks >= 0, not {chunk_tokens} and {max_chunks}")
        self.chunk_tokens, self.max_chunks = chunk_tokens, max_chunks
        self.pieces = PieceEncoder(enc_tok.backend_tokenizer)
        self.segmenter = Segmenter(enc_tok.backend_tokenizer, chunk_tokens, "uint32")

    def segments(self, text: str) -> list[list[int]]:
        """Encoder ids of every chunk of one text, in order (no limit), cut exactly as `arc-data build` cuts."""
        out = []
        for seg in self.segmenter.segment([text])[0]:
            if seg.enc_ids is not None:
                ids = seg.enc_ids.tolist()
            else:
                ids = self.pieces.ids(text[seg.start : seg.end], first=seg.start == 0)  # as arc-data build
            if ids:
                out.append(ids)
        return out

    def cut(self, texts: list[str]) -> tuple[list[list[int]], ContextCut]:
        """The chunks of one context made of `texts` (passages, in order), the first `max_chunks` of them."""
        chunks = [ids for text in texts for ids in self.segments(text)]
        keep = chunks[: self.max_chunks] if self.max_chunks else chunks
        dropped = chunks[len(keep) :]
        return keep, ContextCut(1, int(bool(dropped)), len(dropped), sum(len(c) for c in dropped))
