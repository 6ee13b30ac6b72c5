"""Decoder text tokenized a piece at a time, without the pieces' SentencePiece dummy prefix.

SentencePiece-style tokenizers (a `Metaspace` pre-tokenizer as Mistral's, or Llama 2's `Prepend("▁")`
normalizer) put a `▁` before every input they are given, as if it started after a space. A segment cut out of a
document (`"\\n\\nNext ..."`), or a prompt piece after compressed vectors (`"\\nQuestion: ..."`), then begins with
tokens the decoder never sees at that point of running text. `without_dummy_prefix` is the same tokenizer with
the prefix turned off (Metaspace `prepend_scheme` "never", the Prepend normalizer dropped): pieces after the first
are encoded with it, the first piece of a document or prompt with the tokenizer itself. `cut_exactness` measures,
on a probe text, how often pieces encoded that way concatenate to the whole text's encoding.
"""

import json

from tokenizers import Tokenizer

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

    def encode_batch(self, texts: list[str], first: bool) -> list:
        return (self.tokenizer if first else self.rest).encode_batch(texts, add_special_tokens=False)

    def ids(self, text: str, first: bool) -> list[int]:
        return (self.tokenizer if first else self.rest).encode(text, add_special_tokens=False).ids


def cut_exactness(pieces: PieceEncoder, text: str = PROBE) -> tuple[int, int]:
    """(exact, all) over the word boundaries of `text` (just before whitespace after a non-space): a cut is exact
    when the first part encoded as a first piece and the rest as a later piece concatenate to the whole's ids."""
    whole = pieces.ids(text, first=True)
    cuts = [c for c in range(1, len(text)) if text[c].isspace() and not text[c - 1].isspace()]
    exact = sum(pieces.ids(text[:c], first=True) + pieces.ids(text[c:], first=False) == whole for c in cuts)
    return exact, len(cuts)
