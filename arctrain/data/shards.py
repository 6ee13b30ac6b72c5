"""Shard directories on disk: the manifest, the tokenizer check, and random access into the tars.

A shard is a plain tar written by `webdataset.ShardWriter` (docs/ARCHITECTURE.md §2); we index its member
offsets once per shard per worker with `tarfile` and then read a sample's `.npy` members by seeking.
"""

import io
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arctrain.tokenizer_id import tokenizer_hash
from data_tools.manifest import load_manifest


@dataclass(frozen=True)
class Source:
    """One split of one shard directory: shard paths and their sample counts, in manifest order."""

    dir: str
    split: str
    shards: tuple[str, ...]
    sizes: tuple[int, ...]

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


def open_source(shard_dir: str | Path, split: str, tokenizer_paths: dict[str, str]) -> Source:
    """A checked Source: manifest present, tokenizers matching, every listed shard on disk."""
    manifest = read_manifest(shard_dir)
    check_tokenizers(shard_dir, manifest, tokenizer_paths)
    entries = manifest.get("splits", {}).get(split, {}).get("shards", [])
    entries = [e for e in entries if e["samples"] > 0]
    if not entries:
        raise ValueError(f"{shard_dir}: the {split!r} split has no samples")
    paths = tuple(str(Path(shard_dir) / e["name"]) for e in entries)
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{shard_dir}: shard {path} is listed in manifest.json but missing")
    return Source(str(shard_dir), split, paths, tuple(int(e["samples"]) for e in entries))


class ShardReader:
    """Random access to samples by (shard path, index); indexes each shard on first use, keeps a few files open."""

    def __init__(self, sizes: dict[str, int], max_open: int = 8):
        self.sizes = sizes  # shard path -> sample count promised by the manifest
        self.index: dict[str, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        self.files: OrderedDict[str, io.BufferedReader] = OrderedDict()
        self.max_open = max_open

    def _index(self, path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        if path not in self.index:
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():  # "K.<tok>.ids.npy" -> key K, member "<tok>.ids.npy"
                        key, _, suffix = member.name.partition(".")
                        samples.setdefault(key, {})[suffix] = (member.offset_data, member.size)
            if len(samples) != self.sizes[path]:
                raise ValueError(f"{path}: holds {len(samples)} samples, manifest.json says {self.sizes[path]}")
            self.index[path] = list(samples.items())
        return self.index[path]

    def _file(self, path: str) -> io.BufferedReader:
        if path in self.files:
            self.files.move_to_end(path)
        else:
            if len(self.files) >= self.max_open:
                self.files.popitem(last=False)[1].close()
            self.files[path] = open(path, "rb")  # noqa: SIM115 (kept open across reads, closed on eviction)
        return self.files[path]

    def read(self, path: str, i: int, suffixes: list[str]) -> tuple[str, dict[str, np.ndarray]]:
        """Sample `i` of shard `path`: its key and the `.npy` members named by `suffixes` as arrays."""
        key, members = self._index(path)[i]
        arrays = {}
        for suffix in suffixes:
            if suffix not in members:
                raise ValueError(f"{path}: sample {key} has no member {key}.{suffix}")
            offset, size = members[suffix]
            file = self._file(path)
            file.seek(offset)
            arrays[suffix] = np.load(io.BytesIO(file.read(size)), allow_pickle=False)
        return key, arrays

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()
