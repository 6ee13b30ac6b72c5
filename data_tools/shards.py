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
        self.out = out
        self.on_finish = None  # called after a shard is complete, before the next sample (the build's journal)
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
            if self.on_finish is not None:
                self.on_finish()
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

    def state(self) -> dict:
        """The journal's record of this split (data_tools/journal.py): complete shards, the open one synced."""
        open_entry = self.entry if self.tar is not None else None
        done = [e for e in self.shards.values() if e is not open_entry]
        state: dict = {"shard": self.shard, "done": done, "open": None}
        if self.tar is not None:
            state["open"] = {**self.entry, "offset": self.tar.sync(), "rows": self.rows}
        return state

    def restore(self, state: dict) -> None:
        """Continue from a journal's record: its complete shards checked on disk, the open one cut back."""
        self.shard = state["shard"]
        for entry in state["done"]:
            for file in [entry, entry["index"]]:
                path = self.out / file["name"]
                if not path.is_file() or path.stat().st_size != file["bytes"]:
                    raise DataError(
                        f"--resume: {path} is missing or not {file['bytes']} bytes; rebuild with --overwrite"
                    )
            self.shards[str(self.out / entry["name"])] = entry
        if state["open"] is not None:
            entry = dict(state["open"])
            offset, rows = entry.pop("offset"), entry.pop("rows")
            path = self.out / entry["name"]
            if not path.is_file() or path.stat().st_size < offset:
                raise DataError(f"--resume: {path} is missing or shorter than {offset} bytes; rebuild with --overwrite")
            self.tar = TarWriter.reopen(path, offset, **TAR_META)
            self.entry = self.shards[str(path)] = entry
            self.rows = [(key, {s: tuple(span) for s, span in spans.items()}) for key, spans in rows]

    def files(self) -> set[str]:
        """Names of the shards and indexes this writer has (complete or open)."""
        return {n for e in self.shards.values() for n in (e["name"], e.get("index", {}).get("name")) if n}

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
    others = [out / name for name in ("manifest.json", "build.journal.json") if (out / name).exists()]
    return found[0] + found[1] + others


def prepare_out(out: Path, overwrite: bool, keep: bool = False) -> None:
    """Create `out`; refuse one that already holds shards or a manifest unless `overwrite` (then remove them), or
    `keep` them (a resumed build)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if keep:
        return
    existing = existing_outputs(out)
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise DataError(
            f"--out {out}: already holds {existing[0].name}{more}; use --overwrite to replace (--resume to continue "
            f"an unfinished build)"
        )
    for path in existing:
        path.unlink()
