"""`arc-data build`: raw documents -> tokenized shards + manifest.json.

The main process reads documents in input order, batches them, and writes samples in that same order; the
tokenization runs in worker processes (`--workers N`, each single-threaded) whose results are taken in
submission order, so the shards are byte-identical for every N. At most 2 batches per worker are in flight,
which bounds memory however large the inputs.
"""

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
from data_tools.manifest import make_manifest, write_manifest
from data_tools.pool import in_order
from data_tools.samples import SampleEncoder, encode_batch, init_worker
from data_tools.shards import SPLITS, SplitWriter, prepare_out
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
    """Run a build; returns the manifest (also written to cfg.out/manifest.json)."""
    start, cpu_start = time.time(), _cpu_seconds()
    files = expand_inputs(cfg.inputs)
    fields = Fields(cfg.text_field, cfg.id_field, cfg.id_scope)
    check_inputs(files, fields)
    tokenizers = load_tokenizers(cfg.encoder_tokenizer, cfg.decoders)
    prepare_out(cfg.out, cfg.overwrite)
    # One worker is one core: encode_batch's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    tally = Tally(strict=cfg.strict)
    names = [t.name for t in tokenizers]
    max_bytes = int(cfg.shard_size_mb * (1 << 20))
    writers = {split: SplitWriter(cfg.out, split, max_bytes, cfg.start_shard, names) for split in SPLITS}
    batches = _batches(_unique(read_documents(files, fields, tally), tally))
    with tqdm(unit="doc", desc="arc-data build", disable=not cfg.progress, mininterval=1.0) as bar:
        written, enc_tokens = _write(_encode_in_order(batches, tokenizers, cfg), writers, cfg.val_fraction, tally, bar)

    splits = {split: writer.close() for split, writer in writers.items()}
    if not written:
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(tally.skipped.items()) if n)
        raise DataError(f"--input: no document written ({tally.read} read, skipped: {skipped or 'none'}); "
                        f"no shards and no manifest in {cfg.out}")  # fmt: skip
    docs = {"read": tally.read, "written": written, "skipped": {k: v for k, v in sorted(tally.skipped.items()) if v}}
    tok_entries = {t.name: t.manifest_entry() for t in tokenizers}
    manifest = make_manifest(cfg.settings, tok_entries, splits, source_entries(files), docs)
    write_manifest(cfg.out, manifest)
    cpu = [end - begin for begin, end in zip(cpu_start, _cpu_seconds())]
    print(_summary(manifest, enc_tokens, time.time() - start, cpu, cfg.out))
    return manifest


def _write(results, writers: dict[str, SplitWriter], val_fraction: float, tally: Tally, bar: tqdm) -> tuple[int, int]:
    """Write every sample to its split in order; returns (documents written, encoder tokens)."""
    written = enc_tokens = 0
    for docs, samples in results:
        has_samples = [False] * len(docs)
        for i, sample in samples:
            has_samples[i] = True
            writers["val" if is_val(docs[i][1], val_fraction) else "train"].write(sample)
            enc_tokens += sample.tokens[0]
        for (doc_id, _), ok in zip(docs, has_samples):
            written += ok
            if not ok:
                tally.skip("no_tokens", f"document {doc_id!r}")
        bar.update(len(docs))
        bar.set_postfix_str(f"{enc_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} enc tok/s", refresh=False)
    return written, enc_tokens


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
