"""`arc-data build`: raw documents -> tokenized shards + manifest.json.

The main process reads documents in input order, batches them, and writes samples in that same order; the
tokenization runs in worker processes (`--workers N`, each single-threaded) whose results are taken in
submission order, so the shards are byte-identical for every N. At most 2 batches per worker are in flight,
which bounds memory however large the inputs.
"""

import itertools
import os
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_tools.inputs import (
    ID_SCOPES,
    DataError,
    Doc,
    Fields,
    Tally,
    check_inputs,
    expand_inputs,
    read_documents,
    source_entries,
)
from data_tools.journal import NAME as JOURNAL
from data_tools.journal import Position, read_journal, write_journal
from data_tools.manifest import make_manifest, write_manifest
from data_tools.pool import in_order
from data_tools.samples import SampleEncoder, encode_batch, init_worker
from data_tools.shards import SPLITS, SplitWriter, existing_outputs, prepare_out
from data_tools.tokenizer_set import TokenizerInfo, load_tokenizers

BATCH_CHARS = 1 << 20  # characters per unit of work sent to a worker
BATCH_DOCS = 4096


@dataclass
class BuildConfig:
    inputs: list[str]
    out: Path
    encoder_tokenizer: str
    decoders: list[tuple[str, str]]  # (name, path)
    text_field: str = "text"
    id_field: str = "id"
    id_scope: str = "file"  # "file" or "global": see inputs.scoped_id
    segment_tokens: int = 256
    window_segments: int = 4
    val_fraction: float = 0.01
    shard_size_mb: float = 256.0
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    start_shard: int = 0  # first shard number of both splits; partial builds use distinct ranges (see merge)
    resume: bool = False  # continue an unfinished build in `out` from its journal (data_tools/journal.py)
    progress: bool = True
    settings: dict = field(init=False)

    def __post_init__(self):
        for flag, value, low in (
            ("--segment-tokens", self.segment_tokens, 1),
            ("--window-segments", self.window_segments, 1),
            ("--workers", self.workers, 1),
            ("--start-shard", self.start_shard, 0),
        ):
            if value < low:
                raise DataError(f"{flag} {value}: must be at least {low}")
        if self.id_scope not in ID_SCOPES:
            raise DataError(f"--id-scope {self.id_scope}: expected one of {', '.join(ID_SCOPES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.shard_size_mb <= 0:
            raise DataError(f"--shard-size-mb {self.shard_size_mb}: must be positive")
        self.out = Path(self.out)
        self.settings = {
            "segment_tokens": self.segment_tokens,
            "window_segments": self.window_segments,
            "val_fraction": self.val_fraction,
            "id_scope": self.id_scope,
        }


def build(cfg: BuildConfig) -> dict:
    """Run a build; returns the manifest (also written to cfg.out/manifest.json). A write that fails (a full disk)
    is one DataError naming the file; the directory then holds no manifest, and --resume continues it."""
    start, cpu_start = time.time(), _cpu_seconds()
    files = expand_inputs(cfg.inputs)
    fields = Fields(cfg.text_field, cfg.id_field, cfg.id_scope)
    check_inputs(files, fields)
    tokenizers = load_tokenizers(cfg.encoder_tokenizer, cfg.decoders)
    tok_entries = {t.name: t.manifest_entry() for t in tokenizers}
    identity = {
        "options": {
            **cfg.settings,
            "shard_size_mb": cfg.shard_size_mb,
            "start_shard": cfg.start_shard,
            "text_field": cfg.text_field,
            "id_field": cfg.id_field,
        },
        "inputs": source_entries(files),
        "tokenizers": tok_entries,
    }
    journal = read_journal(cfg.out, identity) if cfg.resume and cfg.out.is_dir() else None
    prepare_out(cfg.out, cfg.overwrite or cfg.resume, keep=journal is not None)
    # One worker is one core: encode_batch's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    tally = Tally(strict=cfg.strict)
    names = [t.name for t in tokenizers]
    max_bytes = int(cfg.shard_size_mb * (1 << 20))
    writers = {split: SplitWriter(cfg.out, split, max_bytes, cfg.start_shard, names) for split in SPLITS}
    position = Position(identity=identity)
    if journal is not None:
        position, states = journal
        for split, writer in writers.items():
            writer.restore(states[split])
        _remove_unlisted(cfg.out, writers)
        tally.skipped["no_tokens"] += position.no_tokens
    for writer in writers.values():
        writer.on_finish = lambda: write_journal(cfg.out, position, {s: w.state() for s, w in writers.items()})
    docs = _unique(read_documents(files, fields, tally), tally)
    batches = _batches(itertools.islice(docs, position.doc, None))  # before position.doc: all written
    with tqdm(unit="doc", desc="arc-data build", disable=not cfg.progress, mininterval=1.0) as bar:
        try:
            _write(_encode_in_order(batches, tokenizers, cfg), writers, cfg.val_fraction, tally, bar, position)
            splits = {split: writer.close() for split, writer in writers.items()}
        except OSError as err:
            raise DataError(_write_error(err, writers, cfg.out)) from None
    written = position.written
    if not written:
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(tally.skipped.items()) if n)
        for path in existing_outputs(cfg.out):
            path.unlink()
        raise DataError(
            f"--input: no document written ({tally.read} read, skipped: {skipped or 'none'}); "
            f"no shards and no manifest in {cfg.out}"
        )
    docs = {"read": tally.read, "written": written, "skipped": {k: v for k, v in sorted(tally.skipped.items()) if v}}
    manifest = make_manifest(cfg.settings, tok_entries, splits, source_entries(files), docs)
    try:
        write_manifest(cfg.out, manifest)
    except OSError as err:
        raise DataError(
            f"{cfg.out / 'manifest.json'}: {err.strerror}; the shards are complete, rerun with --resume"
        ) from None
    (cfg.out / JOURNAL).unlink(missing_ok=True)
    cpu = [end - begin for begin, end in zip(cpu_start, _cpu_seconds())]
    print(_summary(manifest, position.enc_tokens, time.time() - start, cpu, cfg.out))
    return manifest


def _write_error(err: OSError, writers: dict[str, SplitWriter], out: Path) -> str:
    """One line for a write that failed (ENOSPC, EDQUOT, EIO): the file, the reason, and what is left."""
    open_tars = [w.tar.file.name for w in writers.values() if w.tar is not None]
    where = err.filename or (open_tars[0] if open_tars else out)
    done = sum(1 for w in writers.values() for e in w.shards.values() if e.get("index"))
    return (
        f"{where}: {err.strerror or err}; the build stopped with {done} complete shards in {out} and no manifest "
        f"(not a finished build): free space and rerun with --resume, or remove {out}"
    )


def _remove_unlisted(out: Path, writers: dict[str, SplitWriter]) -> None:
    """Shards a build wrote after its journal's last record: the resumed build writes them again."""
    keep = set().union(*(w.files() for w in writers.values()))
    for path in existing_outputs(out):
        if path.name not in keep and path.name != JOURNAL:
            path.unlink()


def _write(results, writers: dict[str, SplitWriter], val_fraction: float, tally: Tally, bar: tqdm, pos: Position):
    """Write every sample to its split in order, keeping `pos` (what the journal records) at the sample being
    written; samples of a resumed build's first document that are written already (pos.skip) are passed over."""
    first, skip = pos.doc, pos.skip
    for docs, samples in results:
        base, written, no_tokens = pos.doc, pos.written, pos.no_tokens  # before this batch
        has_samples = [False] * len(docs)
        n_with = 0  # documents of this batch so far that have samples
        for i, sample in samples:
            if not has_samples[i]:  # a document's first sample: the documents before it are settled
                pos.doc, pos.skip = base + i, 0
                pos.written, pos.no_tokens = written + n_with, no_tokens + i - n_with
                has_samples[i] = True
                n_with += 1
            if pos.doc == first and skip:
                skip -= 1
                pos.skip += 1
                continue
            writers["val" if is_val(docs[i][1], val_fraction) else "train"].write(sample)
            pos.skip += 1
            pos.enc_tokens += sample.tokens[0]
        for (doc_id, _), ok in zip(docs, has_samples):
            if not ok:
                tally.skip("no_tokens", f"document {doc_id!r}")
        pos.doc, pos.skip = base + len(docs), 0
        pos.written, pos.no_tokens = written + n_with, no_tokens + len(docs) - n_with
        bar.update(len(docs))
        bar.set_postfix_str(f"{pos.enc_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} enc tok/s", refresh=False)


def is_val(digest: bytes, val_fraction: float) -> bool:
    """The split depends only on the document id, so it is stable when more data is added."""
    return int.from_bytes(digest[8:16], "big") < val_fraction * 2**64


def _unique(docs: Iterable[Doc], tally: Tally) -> Iterator[Doc]:
    """Sample keys come from the (scoped) document id, so a repeated one (or, without ids, repeated text) is a
    counted skip."""
    seen: set[bytes] = set()
    for doc in docs:
        if doc.digest[:8] in seen:
            tally.skip("duplicate_id", f"document {doc.doc_id!r}")
            continue
        seen.add(doc.digest[:8])
        yield doc


def _batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    n_chars = 0
    for doc in docs:
        batch.append(doc)
        n_chars += len(doc.text)
        if n_chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, n_chars = [], 0
    if batch:
        yield batch


def _encode_in_order(batches: Iterable[list[Doc]], tokenizers: list[TokenizerInfo], cfg: BuildConfig):
    """Yields ([(doc_id, digest)], (doc index, sample) pairs) per batch, in batch order; the texts are not kept.
    In-process (one worker) the samples stream; from a worker they come as one list per batch."""
    if cfg.workers == 1:
        encoder = SampleEncoder(tokenizers, cfg.segment_tokens, cfg.window_segments)
        for batch in batches:
            yield [(d.doc_id, d.digest) for d in batch], encoder.encode(batch)
        return
    initargs = (tokenizers, cfg.segment_tokens, cfg.window_segments)
    ids = lambda batch: [(d.doc_id, d.digest) for d in batch]  # noqa: E731
    yield from in_order(batches, encode_batch, cfg.workers, init_worker, initargs, tag=ids)


def _cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its finished children (the worker processes, once the pool is closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _summary(manifest: dict, enc_tokens: int, seconds: float, cpu: list[float], out: Path) -> str:
    docs = manifest["docs"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in docs["skipped"].items())
    splits = manifest["splits"]
    samples = " + ".join(f"{s['samples']} {name}" for name, s in splits.items())
    n_shards = sum(len(s["shards"]) for s in splits.values())
    return (
        f"arc-data build: {docs['read']} docs read, {docs['written']} written, "
        f"{sum(docs['skipped'].values())} skipped{f' ({skipped})' if skipped else ''}; "
        f"{samples} samples in {n_shards} shards; {enc_tokens:,} encoder tokens in {seconds:.1f}s "
        f"({enc_tokens / max(seconds, 1e-9):,.0f}/s; CPU {cpu[0]:.1f}s main + {cpu[1]:.1f}s workers) -> {out}"
    )
