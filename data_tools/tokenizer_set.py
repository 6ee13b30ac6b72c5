"""The encoder tokenizer and the decoder tokenizers of one build, with their identities for the manifest."""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_tools.boundaries import PieceEncoder, cut_exactness
from data_tools.inputs import DataError
from data_tools.tokenizer_id import tokenizer_hash

NAME = re.compile(r"[a-z0-9_]{1,32}")  # part of tar member names, which USTAR limits to 100 bytes


@dataclass(frozen=True)
class TokenizerInfo:
    name: str  # "encoder" or a decoder name
    path: str
    hash: str
    vocab_size: int
    dtype: str  # "uint16" when every id fits, else "uint32"
    serialized: str  # the backend tokenizer as JSON: worker processes rebuild it without importing transformers
    dummy_prefix_stripped: bool = False  # segments after a document's first are encoded without the "▁" prefix
    exact_cuts: tuple[int, int] = (0, 0)  # (exact, all) probe cuts: pieces concatenate to the whole's ids

    def manifest_entry(self) -> dict:
        return {
            "path": self.path,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype,
            "dummy_prefix_stripped": self.dummy_prefix_stripped,
            "exact_cuts": list(self.exact_cuts),
        }

    def backend(self) -> Tokenizer:
        return Tokenizer.from_str(self.serialized)


def parse_decoder(spec: str) -> tuple[str, str]:
    """`NAME=PATH` from --decoder; NAME becomes part of member names, so it is restricted to [a-z0-9_]{1,32}."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise DataError(f"--decoder {spec!r}: expected NAME=PATH")
    if not NAME.fullmatch(name) or name == "encoder":
        raise DataError(f"--decoder {spec!r}: NAME must match [a-z0-9_]{{1,32}} and not be 'encoder'")
    return name, path


def load_tokenizers(encoder_path: str, decoders: list[tuple[str, str]]) -> list[TokenizerInfo]:
    """Encoder first, then decoders in command-line order; each loaded the way the trainer loads it."""
    names = [name for name, _ in decoders]
    if len(set(names)) != len(names):
        raise DataError(f"--decoder: duplicate names in {', '.join(names)}")
    flags = [("--encoder-tokenizer", "encoder", encoder_path)] + [("--decoder", n, p) for n, p in decoders]
    return [_load(flag, name, path) for flag, name, path in flags]


def _load(flag: str, name: str, path: str) -> TokenizerInfo:
    if not Path(path).is_dir():
        raise DataError(f"{flag} {name}={path}: tokenizer directory not found")
    try:
        digest = tokenizer_hash(path)
    except ValueError as err:
        raise DataError(f"{flag} {name}={path}: {err}") from err
    from transformers import AutoTokenizer  # slow import, only where tokenizers are loaded

    try:
        backend = AutoTokenizer.from_pretrained(path).backend_tokenizer
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{flag} {name}={path}: cannot load a fast tokenizer: {err}") from err
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    pieces = PieceEncoder(backend)
    exact = cut_exactness(pieces)
    if exact[0] < exact[1]:
        print(
            f"warning: {flag} {name}={path}: {exact[1] - exact[0]} of {exact[1]} word-boundary cuts of a probe text "
            "tokenize differently as two pieces than as one (merges across the cut)",
            file=sys.stderr,
        )
    return TokenizerInfo(name, str(path), digest, vocab_size, dtype, backend.to_str(), pieces.strips_prefix, exact)
