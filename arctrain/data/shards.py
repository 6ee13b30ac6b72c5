"""Shard directories on disk: the manifest, the tokenizer check, and random access into the tars.

A shard is a plain tar, as `webdataset.ShardWriter` writes it (docs/ARCHITECTURE.md §2), with, since format 2, a
compact index of its member offsets beside it (`data_tools/shard_index.py`); a sample's member (format 3: one `.mp`
per sample, `data_tools/sample_format.py`; formats 1-2: `.npy` per tokenizer) is read by seeking. A shard without
an index file is indexed from its tar headers on first use. Either way a worker keeps only the indexes of its most
recently used shards: memory does not grow with the number of samples read.
"""

import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.manifest import load_manifest
from data_tools.sample_format import MEMBER, unpack
from data_tools.shard_index import index_from_tar, load_index
from data_tools.shards import file_digest
from data_tools.tokenizer_id import tokenizer_hash

PARTS = {"ids": 0, "offsets": 1}  # `<tokenizer>.<part>.npy` -> its array in a format-3 sample
INDEX_CACHE = 16  # shard indexes kept per reader (~38 bytes per sample each in format 3, ~134 in format 2)


@dataclass(frozen=True)
class Source:
    """One split of one shard directory: shard paths and their sample counts, in manifest order."""

    dir: str
    split: str
    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    indexes: tuple[str | None, ...] = ()  # per shard its index file, None for a shard without one (format 1)
    vocab: tuple[tuple[str, int], ...] = ()  # (tokenizer, vocab_size) from the manifest: every id must be below

    @property
    def samples(self) -> int:
        return sum(self.sizes)


def read_manifest(shard_dir: str | Path) -> dict:
    """The shard directory's manifest, checked by the tool that wrote it (a ValueError names the file)."""
    return load_manifest(Path(shard_dir))


def check_tokenizers(shard_dir: str | Path, manifest: dict, tokenizer_paths: dict[str, str]) -> None:
    """Refuse shards tokenized with other tokenizers than the models' (`tokenizer_paths`: name -> model dir)."""
    recorded = manifest.get("tokenizers", {})
    for name, model_dir in tokenizer_paths.items():
        if name not in recorded:
            raise ValueError(
                f"{shard_dir}: manifest.json has no tokenizer {name!r} (it has {', '.join(sorted(recorded))}); "
                f"rebuild the shards with this decoder"
            )
        ours, theirs = tokenizer_hash(model_dir), recorded[name].get("hash")
        if ours != theirs:
            raise ValueError(
                f"{shard_dir}: tokenizer {name!r} differs: shards were built with hash {theirs}, "
                f"{model_dir} has hash {ours}"
            )


def open_source(shard_dir: str | Path, split: str, tokenizer_paths: dict[str, str], verify: bool = False) -> Source:
    """A checked Source: manifest present, tokenizers matching, every listed shard and index on disk with the size
    the manifest gives (a stat each: cheap), and with `verify` their sha256 too (reads every byte: see README)."""
    manifest = read_manifest(shard_dir)
    check_tokenizers(shard_dir, manifest, tokenizer_paths)
    entries = manifest.get("splits", {}).get(split, {}).get("shards", [])
    entries = [e for e in entries if e["samples"] > 0]
    if not entries:
        raise ValueError(f"{shard_dir}: the {split!r} split has no samples")
    for entry in entries:
        for file in [entry] + ([entry["index"]] if "index" in entry else []):
            _check_file(Path(shard_dir), file, verify)
    paths = tuple(str(Path(shard_dir) / e["name"]) for e in entries)
    indexes = tuple(str(Path(shard_dir) / e["index"]["name"]) if "index" in e else None for e in entries)
    vocab = tuple((name, int(t["vocab_size"])) for name, t in manifest["tokenizers"].items() if "vocab_size" in t)
    return Source(str(shard_dir), split, paths, tuple(int(e["samples"]) for e in entries), indexes, vocab)


def _check_file(shard_dir: Path, entry: dict, verify: bool) -> None:
    """A shard or index file is there with its manifest size (and sha256 with `verify`)."""

    path = shard_dir / entry["name"]
    if not path.is_file():
        raise ValueError(f"{shard_dir}: {path.name} is listed in manifest.json but missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(
            f"{path}: {size} bytes, manifest.json says {entry['bytes']} (cut short or changed since the build; "
            f"arc-data verify {shard_dir} checks every shard)"
        )
    if verify and file_digest(path)[1] != entry["sha256"]:
        raise ValueError(f"{path}: sha256 differs from manifest.json's (changed since the build; data.verify_shards)")


def shard_table(sources: list[Source]) -> dict[str, tuple[int, str | None, dict[str, int]]]:
    """shard path -> (sample count, index path or None, vocab sizes), over several sources."""
    return {
        path: (n, index, dict(s.vocab))
        for s in sources
        for path, n, index in zip(s.shards, s.sizes, s.indexes or (None,) * len(s.shards), strict=True)
    }


class ShardReader:
    """Random access to samples by (shard path, index): a bounded LRU of shard indexes and of open files."""

    def __init__(self, shards: dict[str, tuple], max_open: int = 8, max_indexes: int = INDEX_CACHE):
        # shard path -> (sample count promised by the manifest, index file or None[, {tokenizer: vocab_size}]):
        # with vocab sizes, every sample's ids are checked against them as it is read
        self.shards = shards
        self.indexes: OrderedDict[str, np.ndarray] = OrderedDict()
        self.files: OrderedDict[str, io.BufferedReader] = OrderedDict()
        self.max_open, self.max_indexes = max_open, max_indexes

    def _index(self, path: str) -> np.ndarray:
        if path in self.indexes:
            self.indexes.move_to_end(path)
            return self.indexes[path]
        n, index_path = self.shards[path][:2]
        index = load_index(index_path) if index_path else index_from_tar(path)
        if len(index) != n:
            raise ValueError(f"{path}: holds {len(index)} samples, manifest.json says {n}")
        if len(self.indexes) >= self.max_indexes:
            self.indexes.popitem(last=False)
        self.indexes[path] = index
        return index

    def _file(self, path: str) -> io.BufferedReader:
        if path in self.files:
            self.files.move_to_end(path)
        else:
            if len(self.files) >= self.max_open:
                self.files.popitem(last=False)[1].close()
            self.files[path] = open(path, "rb")  # noqa: SIM115 (kept open across reads, closed on eviction)
        return self.files[path]

    def read(self, path: str, i: int, suffixes: list[str]) -> tuple[str, dict[str, np.ndarray]]:
        """Sample `i` of shard `path`: its key and the arrays named by `suffixes` (`<tokenizer>.ids.npy`,
        `<tokenizer>.offsets.npy`, the member names of formats 1-2), read from the sample's one `.mp` member in
        format-3 shards (read-only arrays there)."""
        row = self._index(path)[i]
        key = row["key"].decode()
        try:
            if MEMBER in row.dtype.names:
                _, tokens = unpack(self._member(path, key, row, MEMBER))
                arrays = {}
                for suffix in suffixes:
                    name, _, part = suffix.removesuffix(".npy").rpartition(".")
                    if name not in tokens or part not in PARTS:
                        raise ValueError(f"has no {suffix} (tokenizers: {', '.join(tokens)})")
                    arrays[suffix] = tokens[name][PARTS[part]]
            else:
                arrays = {s: np.load(io.BytesIO(self._member(path, key, row, s)), allow_pickle=False) for s in suffixes}
        except (ValueError, KeyError, TypeError, EOFError) as err:  # msgpack's and numpy's errors on bad bytes
            raise ValueError(f"{path}: sample {key}: {err} (arc-data verify checks every shard)") from None
        self._check_ids(path, key, arrays)
        return key, arrays

    def _check_ids(self, path: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        vocab = self.shards[path][2] if len(self.shards[path]) > 2 else {}
        for suffix, ids in arrays.items():
            name = suffix.removesuffix(".ids.npy")
            if name in vocab and len(ids) and (int(ids.max()) >= vocab[name] or int(ids.min()) < 0):
                raise ValueError(
                    f"{path}: sample {key}: {name} id {int(ids.max())} outside the vocabulary ({vocab[name]}); the "
                    f"shard is corrupt (arc-data verify checks every shard)"
                )

    def _member(self, path: str, key: str, row: np.void, suffix: str) -> bytes:
        offset, size = row[suffix] if suffix in row.dtype.names else (-1, 0)
        if offset < 0:
            raise ValueError(f"has no member {key}.{suffix}")
        file = self._file(path)
        file.seek(int(offset))
        data = file.read(int(size))
        if len(data) != size:
            raise ValueError(f"{suffix} member ends at byte {int(offset) + len(data)}: the shard is cut short")
        return data

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()
