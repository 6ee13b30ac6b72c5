"""Decoder text tokenized a piece at a time, without the pieces' SentencePiece dummy prefix.

SentencePiece-style tokenizers (a `Metaspace` pre-tokenizer as Mistral's, or Llama 2's `Prepend("▁")`
normalizer) put a `▁` before every input they are given, as if it started after a space. A segment cut out of a
document (`"\\n\\nNext ..."`), or a prompt piece after compressed vectors (`"\\nQuestion: ..."`), then begins with
tokens the decoder never sees at that point of running text. `without_dummy_prefix` is the same tokenizer with
the prefix turned off (Metaspace `prepend_scheme` "never", the Prepend normalizer dropped): pieces after the first
are encoded with it, the first piece of a document or prompt with the tokenizer itself. `cut_exactness` measures,
on a probe text, how often pieces encoded that way concatenate to the whole text's encoding; `slices_exactly`
whether the ids of a piece can be sliced out of an encoding of a longer text holding it.
"""

import json

from tokenizers import Encoding, Tokenizer

from data_tools.segment import PROBE

DUMMY = "▁"


def without_dummy_prefix(tokenizer: Tokenizer) -> Tokenizer | None:
    """The tokenizer without a SentencePiece dummy prefix, or None when it adds none."""
    spec = json.loads(tokenizer.to_str())
    changed = False

    def visit(node: dict | None, kind: str) -> dict | None:
        nonlocal changed
        if node is None:
            return None
        if node.get("type") == "Sequence":
            key = "pretokenizers" if kind == "pre_tokenizer" else "normalizers"
            node[key] = [n for n in (visit(n, kind) for n in node[key]) if n is not None]
            return node
        if kind == "pre_tokenizer" and node.get("type") == "Metaspace":
            if node.get("prepend_scheme", "always") != "never" or node.get("add_prefix_space"):
                changed = True
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
        if kind == "normalizer" and node.get("type") == "Prepend" and node.get("prepend") == DUMMY:
            changed = True
            return None
        return node

    spec["pre_tokenizer"] = visit(spec.get("pre_tokenizer"), "pre_tokenizer")
    spec["normalizer"] = visit(spec.get("normalizer"), "normalizer")
    return Tokenizer.from_str(json.dumps(spec)) if changed else None


class PieceEncoder:
    """ids of a text piece: `first` (the start of a document or prompt) as the tokenizer encodes it, later pieces
    without the dummy prefix where the tokenizer has one."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.rest = without_dummy_prefix(tokenizer) or tokenizer

    @property
    def strips_prefix(self) -> bool:
        return self.rest is not self.tokenizer

    def encode_batch(self, texts: list[str], first: bool) -> list[Encoding]:
        return (self.tokenizer if first else self.rest).encode_batch(texts, add_special_tokens=False)

    def encode(self, text: str, first: bool) -> Encoding:
        return (self.tokenizer if first else self.rest).encode(text, add_special_tokens=False)

    def ids(self, text: str, first: bool) -> list[int]:
        return (self.tokenizer if first else self.rest).encode(text, add_special_tokens=False).ids


def cut_exactness(pieces: PieceEncoder, text: str = PROBE) -> tuple[int, int]:
    """(exact, all) over the word boundaries of `text` (just before whitespace after a non-space): a cut is exact
    when the first part encoded as a first piece and the rest as a later piece concatenate to the whole's ids."""
    whole = pieces.ids(text, first=True)
    cuts = word_cuts(text)
    exact = sum(pieces.ids(text[:c], first=True) + pieces.ids(text[c:], first=False) == whole for c in cuts)
    return exact, len(cuts)


def word_cuts(text: str) -> list[int]:
    """The word boundaries of `text`: offsets just before whitespace that follows a non-space."""
    return [c for c in range(1, len(text)) if is_word_cut(text, c)]


def is_word_cut(text: str, c: int) -> bool:
    """Whether offset `c` is a word boundary of `text` or one of its ends."""
    return c == 0 or c == len(text) or (text[c].isspace() and not text[c - 1].isspace())


def token_cut(enc: Encoding, c: int) -> int | None:
    """The index j of a token boundary of `enc` exactly at character offset c (0 < c < the text's length), or None:
    token j starts at c and token j-1, not a zero-width one, ends there (no token straddles the offset)."""
    j = enc.char_to_token(c)  # the first token holding character c
    if not j or enc.token_to_chars(j)[0] != c:
        return None
    start, end = enc.token_to_chars(j - 1)
    return j if end == c and start < c else None


def slices_exactly(pieces: PieceEncoder, text: str = PROBE) -> bool:
    """True when, at every word boundary of `text` where its encoding (as a first piece, and as a later one) has a
    token boundary (`token_cut`), the ids on either side are those of the two parts encoded alone: the left part
    as the whole was, the right one as a later piece. Then a segment's ids can be sliced out of an encoding of a
    longer text that holds it, wherever that encoding has token boundaries at the segment's ends."""
    for first in (True, False):
        whole = pieces.encode(text, first)
        for c, j in ((c, token_cut(whole, c)) for c in word_cuts(text)):
            if j is not None and (
                pieces.ids(text[:c], first) != whole.ids[:j] or pieces.ids(text[c:], False) != whole.ids[j:]
            ):
                return False
    return True
