"""The identity of a tokenizer: one hash that shards and trainer compare (docs/ARCHITECTURE.md §1)."""

import hashlib
from pathlib import Path

# The files that decide how text becomes ids; configs that only carry display settings are left out.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_hash(path: str | Path) -> str:
    """sha256 over the tokenization files of a Hugging Face tokenizer directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory not found: {path}")
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            found = True
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    if not found:
        raise ValueError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {path}")
    return digest.hexdigest()
