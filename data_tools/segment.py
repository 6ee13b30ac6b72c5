"""Cut documents into segments of about `segment_tokens` encoder tokens at word boundaries.

A document is read in bounded chunks (never tokenized whole: a tokenizer's encoding costs ~100 bytes per token,
so a 5M-character document in one call would take hundreds of MB). Each chunk is encoded once with the encoder,
with offsets; a segment ends at the last word boundary (a token boundary just before whitespace) at or before
`segment_tokens` tokens, searched back to half that. The chunk's unfinished last segment is dropped and read
again as the start of the next chunk, so chunk edges never change where segments are cut.

The encoder ids of a segment are the slice of its chunk's encoding. That equals encoding the segment alone when
the tokenizer's pre-tokenization splits at whitespace without looking back (ByteLevel/regex and Metaspace do);
`slicing_is_exact` checks this on a probe text per tokenizer, and where it fails (e.g. a normalizer that prepends
"▁" to every input) or a segment had to be cut inside an overlong word, the segment is encoded on its own.
"""

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

PROBE = (
    "Hello, world!  Two  spaces.\n\nA paragraph\twith a tab; numbers 1234567 and émigré café, ünïcödé 😀 end.\n"
    "   indented (line) 'quoted' \"double\" x=3.14 -- dash\r\nwindows line ok"
)
SPACE = np.array([chr(i).isspace() for i in range(0x3001)] + [False])  # is_space's table: none above U+3000
CHUNK_SEGMENTS = 64  # a chunk holds about this many segments (64K characters for 256-token segments)
CHARS_PER_TOKEN = 4  # typical for text; a chunk that holds no whole segment is read again at twice the size
ROUND_CHUNKS = 1  # characters per encode_batch call, in chunks: bounds the memory of one call


@dataclass(slots=True)
class Segment:
    start: int  # character offsets into the document
    end: int
    enc_ids: np.ndarray | None  # the encoder ids sliced from the chunk; None: encode this segment on its own


def slicing_is_exact(tokenizer: Tokenizer) -> bool:
    """True when, at every word boundary of PROBE, the encoding of the whole equals the two halves encoded alone."""
    enc = tokenizer.encode(PROBE, add_special_tokens=False)
    for j in range(1, len(enc)):
        c = _word_boundary(enc, PROBE, 0, j)
        if c is None:
            continue
        left = tokenizer.encode(PROBE[:c], add_special_tokens=False).ids
        right = tokenizer.encode(PROBE[c:], add_special_tokens=False).ids
        if left != enc.ids[:j] or right != enc.ids[j:]:
            return False
    return True


def _word_boundary(enc: Encoding, text: str, base: int, j: int) -> int | None:
    """The chunk-relative character offset of token boundary j (between tokens j-1 and j) if it lies just before
    whitespace that follows a non-space, and no character is split between the two tokens; else None."""
    c = enc.token_to_chars(j - 1)[1]
    if c <= 0 or base + c >= len(text) or enc.token_to_chars(j)[0] < c:
        return None
    if text[base + c].isspace() and not text[base + c - 1].isspace():
        return c
    return None


def _word_boundaries(enc: Encoding, text: str, base: int) -> tuple[list[int], list[int]]:
    """The token boundaries j of a chunk's encoding that `_word_boundary` accepts, ascending, and their
    chunk-relative character offsets: all of them at once, with numpy."""
    offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)  # (n_tokens, 2)
    c = offsets[:-1, 1]  # the end of token j-1, for j = 1..n-1
    space = is_space(text[base : min(len(text), base + int(c.max(initial=0)) + 1)])
    inside = (c > 0) & (base + c < len(text))
    at = np.where(inside, c, 1)
    ok = inside & (offsets[1:, 0] >= c) & space[at] & ~space[at - 1]
    return (np.flatnonzero(ok) + 1).tolist(), c[ok].tolist()


def is_space(text: str) -> np.ndarray:
    """str.isspace of every character of `text`, as a bool array."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return SPACE[np.minimum(code_points, len(SPACE) - 1)]


class Segmenter:
    def __init__(self, encoder: Tokenizer, segment_tokens: int, dtype: str):
        self.encoder = encoder
        self.n = segment_tokens
        self.dtype = np.dtype(dtype)
        self.exact = slicing_is_exact(encoder)
        self.chunk_chars = segment_tokens * CHUNK_SEGMENTS * CHARS_PER_TOKEN

    def segment(self, texts: list[str]) -> list[list[Segment]]:
        """Segments of every text, in order, covering each text from its first to its last character."""
        out: list[list[Segment]] = [[] for _ in texts]
        # (doc, chunk start, chunk size, whether the chunk starts inside a word)
        queue = deque((i, 0, self.chunk_chars, False) for i in range(len(texts)))
        while queue:
            batch, n_chars = [], 0
            while queue and n_chars < ROUND_CHUNKS * self.chunk_chars:
                batch.append(queue.popleft())
                i, start, size, _ = batch[-1]
                n_chars += min(size, len(texts[i]) - start)
            chunks = [texts[i][start : start + size] for i, start, size, _ in batch]
            encodings = self.encoder.encode_batch(chunks, add_special_tokens=False)
            del chunks
            for (i, start, size, hard_start), enc in zip(batch, encodings):
                final = start + size >= len(texts[i])
                segments, resume, hard_resume = self._cut(enc, texts[i], start, final, hard_start)
                out[i].extend(segments)
                if not final:
                    # No segment finished inside the chunk: read a longer one (progress is guaranteed).
                    grow = 2 if resume == start else 1
                    queue.append((i, resume, size * grow, hard_resume))
        return out

    def _cut(self, enc: Encoding, text: str, base: int, final: bool, hard_start: bool):
        """Segments of one chunk starting at `base`; for a non-final chunk also where the next chunk starts."""
        n_tok = len(enc)
        ids = np.array(enc.ids, dtype=self.dtype)
        words, word_chars = _word_boundaries(enc, text, base) if n_tok > self.n else ([], [])
        starts, chars, hard = [0], [0], [hard_start]  # per segment: first token, first char, cut inside a word
        while n_tok - starts[-1] > self.n:
            a = starts[-1]
            k = bisect_right(words, a + self.n) - 1  # the last word boundary within n tokens, if it is far enough
            if k >= 0 and words[k] >= a + max(1, self.n // 2) and word_chars[k] > chars[-1]:
                j, c, is_hard = words[k], word_chars[k], False
            else:
                j, c, is_hard = self._next_cut(enc, text, base, a, chars[-1], n_tok)
            if j is None:
                break
            starts.append(j)
            chars.append(c)
            hard.append(is_hard)
        if final:
            starts.append(n_tok)
            chars.append(len(text) - base)
            hard.append(False)
        segments = []
        for k in range(len(starts) - 1):
            exact = self.exact and not hard[k] and not hard[k + 1]
            seg_ids = ids[starts[k] : starts[k + 1]] if exact else None
            segments.append(Segment(base + chars[k], base + chars[k + 1], seg_ids))
        return segments, base + chars[-1], hard[-1]

    def _next_cut(self, enc: Encoding, text: str, base: int, a: int, a_char: int, n_tok: int):
        """(token index, char offset, inside-a-word) of the cut ending the segment that starts at token a (the
        search `_cut` shortcuts with `_word_boundaries`)."""
        for j in range(a + self.n, a + max(1, self.n // 2) - 1, -1):
            c = _word_boundary(enc, text, base, j)
            if c is not None and c > a_char:
                return j, c, False
        # An overlong word: cut between tokens, at the first boundary that moves forward by whole characters.
        for j in range(a + self.n, n_tok):
            c = enc.token_to_chars(j - 1)[1]
            if c > a_char and enc.token_to_chars(j)[0] >= c:
                return j, c, True
        return None, None, None
