"""The per-shard index `<split>-%06d.idx.npy`: where each sample's members lie in its tar (docs/ARCHITECTURE.md §2).

One structured numpy array per shard, one row per sample in tar order: the sample key (bytes) and, per member
suffix (format 3: `mp` alone), `(data offset, size)` in bytes (offset -1 where a sample lacks that member).
`arc-data build` writes it beside the shard and lists it in the manifest; the loader reads samples by seeking to
those offsets, so it never parses the tar. For shards without one (format 1), `index_from_tar` builds the same
array from the tar headers.
"""

import io
import tarfile
from pathlib import Path

import numpy as np

HEADER = 512  # a USTAR header: member names are short ASCII (no long-name or PAX extension records)
SUFFIX = ".idx.npy"


def index_name(shard_name: str) -> str:
    """`train-000000.tar` -> `train-000000.idx.npy`."""
    return shard_name.removesuffix(".tar") + SUFFIX


def index_dtype(suffixes: list[str], key_bytes: int) -> np.dtype:
    return np.dtype([("key", f"S{max(key_bytes, 1)}")] + [(s, "<i8", (2,)) for s in suffixes])


def member_spans(start: int, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    """(data offset, size) of each member of a sample whose first header is at byte `start` of the tar, written
    the way data_tools.tar_writer (and webdataset's TarWriter) writes it: members in sorted order, each a header
    plus its data padded to 512."""
    spans, pos = {}, start
    for suffix in sorted(k for k in members if k != "__key__"):
        size = len(members[suffix])
        spans[suffix] = (pos + HEADER, size)
        pos += HEADER + -(-size // 512) * 512
    return spans


def make_index(rows: list[tuple[str, dict[str, tuple[int, int]]]]) -> np.ndarray:
    """The index array of (key, {suffix: (offset, size)}) rows, in sample order."""
    suffixes = sorted({s for _, spans in rows for s in spans})
    keys = [key.encode() for key, _ in rows]
    index = np.zeros(len(rows), dtype=index_dtype(suffixes, max(map(len, keys), default=1)))
    index["key"] = keys
    for suffix in suffixes:
        index[suffix] = [spans.get(suffix, (-1, 0)) for _, spans in rows]
    return index


def index_from_tar(path: str | Path) -> np.ndarray:
    """The index of a shard read from its tar headers (shards built without an index file)."""
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():  # "K.<tok>.ids.npy" -> key K, member "<tok>.ids.npy"
                key, _, suffix = member.name.rsplit("/", 1)[-1].partition(".")
                rows.setdefault(key, {})[suffix] = (member.offset_data, member.size)
            tar.members.clear()  # tarfile keeps every TarInfo otherwise (~1 KB each)
    return make_index(list(rows.items()))


def index_bytes(index: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, index, allow_pickle=False)
    return buffer.getvalue()


def load_index(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)
