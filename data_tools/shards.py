"""Writing one split's shards (tars a plain `webdataset.WebDataset` reads), reproducibly, with per-shard counts,
sha256 and index."""

import hashlib
from pathlib import Path

from data_tools.inputs import DataError
from data_tools.samples import Sample
from data_tools.shard_index import SUFFIX, index_bytes, index_name, make_index, member_spans
from data_tools.tar_writer import TarWriter

SPLITS = ("train", "val")
# Fixed tar metadata: the same samples give the same bytes on every run and machine.
TAR_META = {"mtime": 0, "user": "arc", "group": "arc", "mode": 0o444}


class SplitWriter:
    """The shards `<split>-%06d.tar` of one split, each with its index file; a shard is opened on the split's first
    sample (an empty split writes no file) and closed once it holds at least `max_bytes`, counting each member's
    512-byte header and padding. Members are written in sorted order, as webdataset's TarWriter writes them."""

    def __init__(self, out: Path, split: str, max_bytes: int, start_shard: int, token_names: list[str]):
        self.pattern = str(out / f"{split}-%06d.tar")
        self.max_bytes = max_bytes
        self.shard = start_shard  # the number of the next shard to open
        self.token_names = token_names
        self.tar: TarWriter | None = None
        self.entry: dict = {}  # the open shard's manifest entry
        self.shards: dict[str, dict] = {}  # file name -> manifest entry, in writing order
        self.rows: list[tuple[str, dict]] = []  # the open shard's index rows

    def write(self, sample: Sample) -> None:
        if self.tar is not None and self.tar.offset >= self.max_bytes:
            self._finish()
        if self.tar is None:
            self._open()
        assert self.tar is not None
        key = sample.members["__key__"]
        self.rows.append((key, member_spans(self.tar.offset, sample.members)))
        for suffix in sorted(k for k in sample.members if k != "__key__"):
            self.tar.add(f"{key}.{suffix}", sample.members[suffix])
        self.entry["samples"] += 1
        tokens = self.entry["tokens"]
        for name, n in zip(self.token_names, sample.tokens):
            tokens[name] += n

    def close(self) -> list[dict]:
        if self.tar is not None:
            self._finish()
        return list(self.shards.values())

    def _open(self) -> None:
        fname = self.pattern % self.shard
        self.shard += 1
        self.tar = TarWriter(fname, **TAR_META)
        self.entry = self.shards[fname] = _empty_entry(fname, self.token_names)
        self.rows = []

    def _finish(self) -> None:
        """Close the open shard and write its index."""
        assert self.tar is not None
        self.tar.close()
        self.entry["bytes"], self.entry["sha256"] = self.tar.offset, self.tar.sha256.hexdigest()
        fname = Path(self.tar.file.name)
        index = fname.with_name(index_name(fname.name))
        data = index_bytes(make_index(self.rows))
        index.write_bytes(data)
        self.entry["index"] = {"name": index.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.tar = None


def _empty_entry(fname: str, token_names: list[str]) -> dict:
    return {"name": Path(fname).name, "samples": 0, "tokens": dict.fromkeys(token_names, 0), "bytes": 0, "sha256": ""}


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def existing_outputs(out: Path) -> list[Path]:
    """What a build writes into `out`: shards of either split, their indexes and the manifest."""
    found = [sorted(p for split in SPLITS for p in out.glob(f"{split}-*{suffix}")) for suffix in (".tar", SUFFIX)]
    manifest = out / "manifest.json"
    return found[0] + found[1] + ([manifest] if manifest.exists() else [])


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse one that already holds shards or a manifest unless `overwrite` (then remove them)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = existing_outputs(out)
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise DataError(f"--out {out}: already holds {existing[0].name}{more}; use --overwrite to replace")
    for path in existing:
        path.unlink()
