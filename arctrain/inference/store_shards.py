"""The files of a format-3 vector store: documents' records back to back, one fixed-size index row per document.

    DIR/vectors-000000.bin        the records of the shard's documents, concatenated, nothing between them
    DIR/vectors-000000.idx.npy    one row per document (np.load, allow_pickle=False): `key` (V16: the first 16
                                  bytes of sha256 of its id), `offset` (<u8: where its record starts in the .bin),
                                  `segments` and `vectors` (<u4: what its record holds)

A record is raw little-endian arrays with no header: what they are (dtype, width, code size) is the store's, said once
in the manifest (arctrain/inference/store.py packs and unpacks them). Per document that is 32 bytes of index and nothing
else: format 2's tar member cost ~1 kB per document (a 512-byte header, padding to 512 bytes, a MessagePack map with the
arrays' dtypes and shapes, a 32-character hex key), as much as the vectors of a short document.

Reading a document is one `os.pread` of its record from a file kept open; the indexes are read once, at open.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

INDEX_DTYPE = np.dtype([("key", "V16"), ("offset", "<u8"), ("segments", "<u4"), ("vectors", "<u4")])
DATA_SUFFIX, INDEX_SUFFIX = ".bin", ".idx.npy"


class ShardWriter:
    """The shards `<split>-%06d.bin` and their indexes; a shard is closed once it holds at least `max_bytes`."""

    def __init__(self, out: Path, split: str, max_bytes: int):
        self.out, self.split, self.max_bytes = out, split, max_bytes
        self.shards: list[dict] = []  # manifest entries, in writing order
        self.file = None
        self.rows: list[tuple] = []  # the open shard's index rows

    def write(self, key: bytes, record: bytes, segments: int, vectors: int, tokens: int) -> None:
        assert len(key) == 16, key
        if self.file is not None and self.offset >= self.max_bytes:
            self._finish()
        if self.file is None:
            name = f"{self.split}-{len(self.shards):06d}{DATA_SUFFIX}"
            self.file, self.digest, self.offset = open(self.out / name, "wb"), hashlib.sha256(), 0
            self.shards.append({"name": name, "samples": 0, "tokens": 0})
        self.rows.append((key, self.offset, segments, vectors))
        self.file.write(record)
        self.digest.update(record)
        self.offset += len(record)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["tokens"] += tokens

    def _finish(self) -> None:
        self.file.close()
        entry = self.shards[-1]
        entry |= {"bytes": self.offset, "sha256": self.digest.hexdigest()}
        index = self.out / entry["name"].replace(DATA_SUFFIX, INDEX_SUFFIX)
        with open(index, "wb") as f:
            np.save(f, np.array(self.rows, dtype=INDEX_DTYPE), allow_pickle=False)
        data = index.read_bytes()
        entry["index"] = {"name": index.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.file, self.rows = None, []

    def close(self) -> list[dict]:
        if self.file is not None:
            self._finish()
        return self.shards


class ShardSet:
    """Every shard of a store, for lookups by key: (shard, row) per key from the indexes, records by pread."""

    def __init__(self, root: Path, entries: list[dict]):
        self.paths = [root / e["name"] for e in entries]
        self.sizes = [e["bytes"] for e in entries]
        self.indexes = [np.load(root / e["index"]["name"], allow_pickle=False) for e in entries]
        for path, index in zip(self.paths, self.indexes, strict=True):
            if index.dtype != INDEX_DTYPE:
                raise ValueError(
                    f"{path.with_suffix('').with_suffix(INDEX_SUFFIX)}: not a format-3 index ({index.dtype})"
                )
        self.where = {bytes(k): (s, i) for s, index in enumerate(self.indexes) for i, k in enumerate(index["key"])}
        self.fds: dict[int, int] = {}

    def read(self, key: bytes) -> tuple[bytes, int, int, Path]:
        """(record, segments, vectors, shard path) of the document with this key (in the store: check `where`)."""
        s, i = self.where[key]
        index = self.indexes[s]
        start = int(index["offset"][i])
        end = int(index["offset"][i + 1]) if i + 1 < len(index) else self.sizes[s]
        if s not in self.fds:
            self.fds[s] = os.open(self.paths[s], os.O_RDONLY)
        record = os.pread(self.fds[s], end - start, start)
        if len(record) != end - start:
            raise ValueError(
                f"{self.paths[s].name}: record {i} ends past the file ({len(record)} of {end - start} bytes)"
            )
        return record, int(index["segments"][i]), int(index["vectors"][i]), self.paths[s]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
