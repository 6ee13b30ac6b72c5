"""Raw documents from .jsonl, .jsonl.zst and .parquet files, with every unusable record counted by reason.

Files are streamed: .zst through a zstd decompression object in small blocks (never decompressed whole, and a
truncated stream is detected, which zstandard's stream_reader would hide as a clean EOF), parquet one row group
at a time. Each bad record becomes a counted skip with a warning naming file:line, or, with `strict`, an error.
"""

import glob
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")
ZST_BLOCK = 1 << 17  # compressed bytes per read: bounds the decompressed output of one step
WARNINGS_PER_REASON = 10


class DataError(ValueError):
    """A user error in the inputs or options: the CLI prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class Doc:
    doc_id: str  # the record's id, or "sha256:<hex>" of the text when it has none
    digest: bytes  # sha256 of the scoped id (`scoped_id`): the sample key prefix and the validation split
    source: str  # the record's "source" field when it is a string, else the input file's name
    text: str


ID_SCOPES = ("file", "global")


@dataclass
class Fields:
    text: str = "text"
    id: str = "id"
    id_scope: str = "file"  # "file": a record id names a document within its input file; "global": across all


def scoped_id(doc_id: str, path: Path, id_scope: str) -> str:
    """What identifies a document: its id within its input file (the path as given, without its format suffix: an
    array job's parts and one whole build agree, and the same file as .jsonl.zst or .parquet keeps its keys), or
    the id alone with `--id-scope global`. Ids made from the text are content identities and stay global: the
    same text twice is one document."""
    if id_scope == "global" or doc_id.startswith("sha256:"):
        return doc_id
    name = str(path)
    stem = next((name[: -len(s)] for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), name)
    return f"{stem}\0{doc_id}"


@dataclass
class Tally:
    """Documents read and skipped by reason; `warn` prints the first few of each reason."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    strict: bool = False
    quiet: bool = False  # count only: a look ahead (`check_id_field`) that the real read reports again

    def skip(self, reason: str, where: str, detail: str = "", count: bool = True) -> None:
        """Count one unusable record (or, with count=False, only warn) unless --strict makes it an error."""
        message = f"{where}: {reason}{': ' + detail if detail else ''}"
        if self.quiet:
            self.skipped[reason] += count
            return
        if self.strict:
            raise DataError(f"{message} (--strict)")
        self.skipped[reason] += count
        n = self.skipped[reason]
        if n <= WARNINGS_PER_REASON:
            more = " (further ones not shown)" if n == WARNINGS_PER_REASON else ""
            print(f"warning: skipped {message}{more}", file=sys.stderr)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Paths and globs -> files, each glob in sorted order; missing files and unknown suffixes are errors."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"--input {pattern}: no file matches")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise DataError(f"--input {match}: no such file")
            if not path.name.endswith(SUFFIXES):
                raise DataError(f"--input {match}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(path)
    return files


DEFAULT_ID_FIELD = "id"  # may be absent (ids are then text hashes); any other --id-field must be in the records
ID_PEEK = 1000  # records of a JSON-lines file looked at for --id-field


def check_inputs(files: list[Path], fields: Fields) -> None:
    """Fail before any work on what can be known up front: a parquet file without the text column, or an --id-field
    other than the default that a file does not have (`check_id_field`)."""
    for path in files:
        if path.name.endswith(".parquet"):
            names = _parquet_file(path).schema_arrow.names
            if fields.text not in names:
                raise DataError(f"{path}: no column {fields.text!r} (columns: {', '.join(names)})")
    check_id_field(files, fields)


def check_id_field(files: list[Path], fields: Fields) -> None:
    """A mistyped --id-field would silently name every document by its text hash, and lookups by id would find
    nothing: a field other than the default must be a parquet file's column, or be in at least one of the first
    ID_PEEK records of a JSON-lines file."""
    if fields.id == DEFAULT_ID_FIELD:
        return
    for path in files:
        if path.name.endswith(".parquet"):
            names = _parquet_file(path).schema_arrow.names
            if fields.id not in names:
                raise DataError(f"--id-field {fields.id!r}: {path} has no such column (columns: {', '.join(names)})")
            continue
        found, n, keys = False, 0, set()
        for _, record in read_records(path, Tally(quiet=True)):
            n += 1
            if isinstance(record, dict):
                if fields.id in record:
                    found = True
                    break
                keys.update(map(str, record))
            if n >= ID_PEEK:
                break
        if n and not found:
            which = f"none of the first {n} records" if n >= ID_PEEK else "no record"
            shown = ", ".join(sorted(keys)[:12]) or "none"
            raise DataError(f"--id-field {fields.id!r}: {which} of {path} has it (record keys: {shown})")


def read_documents(files: list[Path], fields: Fields, tally: Tally) -> Iterator[Doc]:
    """All documents of all files in order; unusable records are counted in `tally` and not yielded."""
    for path in files:
        for where, record in read_records(path, tally, fields):
            doc = _to_doc(record, where, path, fields, tally)
            if doc is not None:
                yield doc


def read_records(path: Path, tally: Tally, fields: Fields | None = None) -> Iterator[tuple[str, object]]:
    """(where, record) of every record of one .jsonl, .jsonl.zst or .parquet file (a parquet row: a dict of the
    `fields` columns, or of all its columns with `fields` None, as record formats other than documents read them:
    arctrain/data/qa_records.py); lines that are not JSON are counted in `tally` and not yielded."""
    if path.name.endswith(".parquet"):
        records = _parquet_records(path, fields)
    else:
        lines = _zst_lines(path, tally) if path.name.endswith(".zst") else _plain_lines(path)
        records = _json_records(path, lines, tally)
    for where, record in records:
        tally.read += 1
        yield where, record


def _plain_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from fh


def _zst_lines(path: Path, tally: Tally) -> Iterator[bytes]:
    """Lines of a (possibly multi-frame) zstd file; a stream cut short is reported, not mistaken for EOF."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = bytearray()
    n_lines = 0
    with open(path, "rb") as fh:
        while block := fh.read(ZST_BLOCK):
            try:
                out = dobj.decompress(block)
                while dobj.eof and dobj.unused_data:  # a new frame starts inside this block
                    rest, dobj = dobj.unused_data, dctx.decompressobj()
                    out += dobj.decompress(rest)
            except zstandard.ZstdError as err:
                raise DataError(f"{path}: corrupt zstd data after line {n_lines}: {err}") from err
            start = 0
            while (nl := out.find(b"\n", start)) >= 0:
                pending += out[start : nl + 1]
                yield bytes(pending)
                pending.clear()
                n_lines += 1
                start = nl + 1
            pending += out[start:]
    if not dobj.eof:
        # Records after the cut are lost without a trace; the cut-off one is read and counted.
        partial = bool(pending.strip())
        tally.read += partial
        detail = f"zstd stream ends mid-frame, {n_lines} complete lines kept"
        tally.skip("truncated_record", f"{path}:{n_lines + 1}", detail, count=partial)
    elif pending:
        yield bytes(pending)


def _json_records(path: Path, lines: Iterator[bytes], tally: Tally) -> Iterator[tuple[str, object]]:
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines hold no document
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            tally.read += 1
            tally.skip("invalid_utf8", where, f"byte {err.start}")
            continue
        del raw  # a multi-megabyte document should not linger in three forms
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            tally.read += 1
            tally.skip("malformed_json", where, f"{err.msg} at column {err.colno}")
            continue
        del line
        yield where, record


def _parquet_records(path: Path, fields: Fields | None) -> Iterator[tuple[str, object]]:
    """One row group in memory at a time; rows become {text, id, source} dicts like JSON records (`fields` None:
    every column)."""
    # optional: only .parquet inputs need pyarrow
    import pyarrow as pa

    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    columns = names if fields is None else [c for c in (fields.text, fields.id, "source") if c in set(names)]
    row = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: row group {group} (after row {row}) is not readable: {err}") from err
        values = {c: table.column(c).to_pylist() for c in columns}
        del table
        for i in range(_table_rows(values)):
            row += 1
            yield f"{path}:row {row}", {c: values[c][i] for c in columns}


def _parquet_file(path: Path):
    """The opened parquet file; a corrupt or truncated one is a DataError naming it."""
    # optional: only .parquet inputs need pyarrow
    import pyarrow as pa

    # optional: only .parquet inputs need pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file: {err}") from err


def _table_rows(values: dict[str, list]) -> int:
    return len(next(iter(values.values()))) if values else 0


def _to_doc(record: object, where: str, path: Path, fields: Fields, tally: Tally) -> Doc | None:
    if not isinstance(record, dict):
        tally.skip("not_an_object", where, type(record).__name__)
        return None
    text = record.get(fields.text)
    if text is None:
        tally.skip("missing_text", where, f"no {fields.text!r}")
        return None
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            tally.skip("invalid_utf8", where, f"byte {err.start}")
            return None
    if not isinstance(text, str):
        tally.skip("invalid_text", where, f"{fields.text!r} is {type(text).__name__}")
        return None
    if not text.isascii() and not _encodable(text):
        tally.skip("invalid_utf8", where, "lone surrogate escape")
        return None
    if not text.strip():
        tally.skip("empty_text", where)
        return None
    doc_id = record.get(fields.id)
    if doc_id is None or doc_id == "":
        doc_id = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    elif isinstance(doc_id, str) or (isinstance(doc_id, int) and not isinstance(doc_id, bool)):
        doc_id = str(doc_id)
    else:
        tally.skip("invalid_id", where, f"{fields.id!r} is {type(doc_id).__name__}")
        return None
    source = record.get("source")
    source = source if isinstance(source, str) else path.name
    digest = hashlib.sha256(scoped_id(doc_id, path, fields.id_scope).encode("utf-8")).digest()
    return Doc(doc_id, digest, source, text)


def _encodable(text: str) -> bool:
    """JSON escapes like \\ud800 decode to lone surrogates, which no tokenizer (Rust str) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def source_entries(files: list[Path]) -> list[dict]:
    return [{"path": str(path), "bytes": os.path.getsize(path)} for path in files]
