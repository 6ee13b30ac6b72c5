"""Writing one split's shards with webdataset.ShardWriter, reproducibly, with per-shard counts and sha256."""

import hashlib
import tarfile
from pathlib import Path

import webdataset as wds

from data_tools.inputs import DataError
from data_tools.samples import Sample
from data_tools.shard_index import SUFFIX, index_bytes, index_name, make_index, member_spans

SPLITS = ("train", "val")
# Fixed tar metadata: the same samples give the same bytes on every run and machine.
TAR_META = {"mtime": 0, "user": "arc", "group": "arc", "mode": 0o444}


class SplitWriter:
    """The shards `<split>-%06d.tar` of one split.

    The ShardWriter is opened on the first sample, because it creates its first (here: otherwise empty) file when
    constructed. Shards are rotated here rather than by ShardWriter's maxsize, which counts payload bytes only:
    with tar's 512-byte header and padding per member, small samples would make files several times larger.
    """

    def __init__(self, out: Path, split: str, max_bytes: int, start_shard: int, token_names: list[str]):
        self.pattern = str(out / f"{split}-%06d.tar")
        self.max_bytes = max_bytes
        self.start_shard = start_shard
        self.token_names = token_names
        self.writer: wds.ShardWriter | None = None
        self.tar_bytes = 0  # of the current shard
        self.shards: dict[str, dict] = {}  # file name -> manifest entry, in writing order
        self.rows: list[tuple[str, dict]] = []  # the current shard's index rows

    def write(self, sample: Sample) -> None:
        if self.writer is None:
            unlimited = 1 << 62
            self.writer = wds.ShardWriter(
                self.pattern, maxcount=unlimited, maxsize=unlimited, start_shard=self.start_shard, verbose=0,
                post=self._finished, encoder=False, **TAR_META,
            )  # fmt: skip
            self._opened()
        elif self.tar_bytes >= self.max_bytes:
            self.writer.next_stream()
            self._opened()
        self.rows.append((sample.members["__key__"], member_spans(self.tar_bytes, sample.members)))
        self.writer.write(sample.members)
        # tarfile keeps a TarInfo per member for an index that a streamed write never uses: ~2.5 KB per sample,
        # hundreds of MB over a large shard.
        self.writer.tarstream.tarstream.members.clear()
        self.tar_bytes += tar_size(sample.members)
        entry = self.shards.setdefault(self.writer.fname, _empty_entry(self.writer.fname, self.token_names))
        entry["samples"] += 1
        for name, n in zip(self.token_names, sample.tokens):
            entry["tokens"][name] += n

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
        return list(self.shards.values())

    def _opened(self) -> None:
        # webdataset 1.0.2's TarWriter ignores its `format` argument and gets tarfile's default, PAX. Our member
        # names are short ASCII and mtimes integers, so USTAR writes the same bytes, 1.5x faster.
        assert self.writer is not None and self.writer.tarstream is not None
        self.writer.tarstream.tarstream.format = tarfile.USTAR_FORMAT
        self.tar_bytes = 0
        self.rows = []

    def _finished(self, fname: str) -> None:
        """Called by ShardWriter after each shard is closed: the file is complete and still in the page cache."""
        entry = self.shards[fname]
        entry["bytes"], entry["sha256"] = file_digest(Path(fname))
        index = Path(fname).with_name(index_name(Path(fname).name))
        data = index_bytes(make_index(self.rows))
        index.write_bytes(data)
        entry["index"] = {"name": index.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def tar_size(members: dict) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member plus its payload padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in members.items() if k != "__key__")


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
