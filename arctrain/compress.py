"""Compress documents once into a vector store (arctrain/store.py) that `generate --vectors` and `eval --vectors` read.

    arctrain compress --model exported/arc4 --input 'wiki/*.jsonl.zst' --out store/ --dtype int8 --workers 16
    arctrain compress --model exported/arc4 --input docs.parquet --text-field body --id-field url --out store/

An --input may also be an `arc-data build` directory: its documents (both splits) are compressed from the encoder
segments the shards hold, once the manifest's encoder tokenizer and segment length are checked to be the export's.
Raw inputs are read as `arc-data build` reads them (data_tools/inputs.py: .jsonl, .jsonl.zst, .parquet, --text-field,
--id-field, --strict; a record without an id is named "sha256:<hex of its text>"). Each document is cut into segments
exactly as `arctrain generate` cuts a context (the export's segment length, at word boundaries) and each segment is
compressed on its own. Unusable records and repeated ids are counted skips, listed in the summary and the manifest.

`--workers N` runs N processes of `--threads` torch threads each (default 1). Documents go to the workers in fixed
groups, each group compressed in the same batches whoever computes it, and the shards are written in input order
by this process: the store is the same bytes for any N (at the same --threads and --device).
"""

import argparse
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from arctrain.store import DTYPES, SPLIT, StoreWriter, bytes_per_vector, doc_key, encoder_identity, sample_members
from data_tools.inputs import DataError, Doc, Fields, Tally, check_inputs, expand_inputs, read_documents, source_entries
from data_tools.pool import in_order

GROUP_DOCS = 32  # documents per task sent to a worker (and per write)
BATCH_SEGMENTS = 32  # segments compressed in one encoder forward (right-padded to the longest)


class Compressor:
    """An export's encoder and tokenizer: documents -> pooled vectors per segment (the worker's state)."""

    def __init__(self, model_dir: str | Path, dtype: str, device: str, threads: int):
        from transformers import AutoTokenizer

        from arctrain.data.qa import TextPieces
        from arctrain.export import load_export

        torch.set_num_threads(threads)
        self.encoder, _, _, config = load_export(model_dir, torch.float32)
        self.device = torch.device(device)
        self.encoder.to(self.device)
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.pieces = TextPieces(tok, tok, config.segment_tokens)  # the cut `arctrain generate` makes
        self.dtype = dtype

    @torch.no_grad()
    def compress(self, docs: list[tuple[str, str | list[list[int]]]]) -> list[dict[str, bytes] | None]:
        """(id, text or its encoder segments) pairs -> each document's sample members (None: no encoder tokens)."""
        segments = [self.pieces.segments(text) if isinstance(text, str) else text for _, text in docs]
        flat = [seg for segs in segments for seg in segs]
        vectors = []
        for start in range(0, len(flat), BATCH_SEGMENTS):
            packed = self.encoder.compress_segments(flat[start : start + BATCH_SEGMENTS])  # no padding computed
            vectors += [v.cpu() for v in packed]
        out, k = [], 0
        for (doc_id, _), segs in zip(docs, segments, strict=True):
            doc_vectors, k = vectors[k : k + len(segs)], k + len(segs)
            out.append(sample_members(doc_id, doc_vectors, [len(s) for s in segs], self.dtype) if segs else None)
        return out


_WORKER: Compressor | None = None


def _init_worker(*args) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Compressor(*args)


def _compress_group(docs: list[tuple[str, str]]) -> list[dict[str, bytes] | None]:
    return _WORKER.compress(docs)


def _groups(docs: Iterable, tally: Tally) -> Iterator[list[tuple]]:
    """(id, text or segments) groups of GROUP_DOCS documents in input order; a repeated id is a counted skip."""
    seen: set[str] = set()
    group = []
    for doc in docs:
        doc_id, text = (doc.doc_id, doc.text) if isinstance(doc, Doc) else doc  # raw text, or shard segments
        key = doc_key(doc_id)
        if key in seen:
            tally.skip("duplicate_id", f"document {doc_id!r}")
            continue
        seen.add(key)
        group.append((doc_id, text))
        if len(group) == GROUP_DOCS:
            yield group
            group = []
    if group:
        yield group


def read_inputs(patterns: list[str], fields: Fields, tally: Tally, model_dir: Path, segment_tokens: int):
    """Documents of every --input in order: Docs from raw files, (id, segments) from arc-data shard directories."""
    raw: list[str] = []
    for pattern in [*patterns, None]:  # consecutive raw files are read together, as arc-data build reads them
        if pattern is not None and not Path(pattern, "manifest.json").is_file():
            raw.append(pattern)
            continue
        if raw:
            files = expand_inputs(raw)
            check_inputs(files, fields)
            yield from read_documents(files, fields, tally)
            raw = []
        if pattern is not None:
            yield from shard_documents(Path(pattern), model_dir, segment_tokens, tally)


def shard_documents(shard_dir: Path, model_dir: Path, segment_tokens: int, tally: Tally) -> Iterator[tuple]:
    """The documents of an `arc-data build` directory as the encoder segments its samples hold (windows of one
    document are consecutive), checked to be cut by the export's encoder tokenizer at its segment length."""
    import webdataset as wds

    from arctrain.data.shards import check_tokenizers, read_manifest
    from data_tools.sample_format import decode

    manifest = read_manifest(shard_dir)
    check_tokenizers(shard_dir, manifest, {"encoder": str(model_dir)})
    if manifest["segment_tokens"] != segment_tokens:
        raise DataError(
            f"--input {shard_dir}: shards cut at {manifest['segment_tokens']} tokens, the export's encoder reads "
            f"{segment_tokens}-token segments; compress the raw text instead"
        )
    paths = [
        str(shard_dir / e["name"]) for split in manifest["splits"].values() for e in split["shards"] if e["samples"]
    ]
    doc_id, segments = None, []
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        meta, tokens = decode(sample)  # any shard format (data_tools/sample_format.py)
        if meta["doc_id"] != doc_id:
            if doc_id is not None:
                yield doc_id, segments
            doc_id, segments = meta["doc_id"], []
            tally.read += 1
        ids, offsets = tokens["encoder"]
        offsets = offsets.tolist()
        segments += [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if doc_id is not None:
        yield doc_id, segments


def _in_order(groups: Iterator[list], args: argparse.Namespace) -> Iterator[tuple[list, list]]:
    """(group, its samples) in input order, computed here (one worker) or by a pool of spawned processes."""
    init = (args.model, args.dtype, args.device, args.threads)
    if args.workers == 1:
        _init_worker(*init)
        for group in groups:
            yield group, _compress_group(group)
        return
    yield from in_order(groups, _compress_group, args.workers, _init_worker, init)


def compress(args: argparse.Namespace) -> dict:
    """Run a compression; returns the manifest (also written to args.out/manifest.json)."""
    start = time.time()
    raw = [p for p in args.input if not Path(p, "manifest.json").is_file()]
    files = expand_inputs(raw) if raw else []
    fields = Fields(args.text_field, args.id_field, "global")
    check_inputs(files, fields)
    identity = encoder_identity(args.model)  # also checks that --model is an export
    config = json.loads((args.model / "config.json").read_text())
    prepare_out(args.out, args.overwrite)
    tally = Tally(strict=args.strict)
    documents = read_inputs(args.input, fields, tally, args.model, config["segment_tokens"])
    writer = StoreWriter(args.out, int(args.shard_size_mb * (1 << 20)))
    with tqdm(unit="doc", desc="arctrain compress", disable=args.no_progress, mininterval=1.0) as bar:
        for group, samples in _in_order(_groups(documents, tally), args):
            for (doc_id, _), members in zip(group, samples, strict=True):
                if members is None:
                    tally.skip("no_tokens", f"document {doc_id!r}")
                    continue
                writer.write(members)
            bar.update(len(group))
    dim = config["backbone"]["hidden_size"]
    manifest = writer.close(
        {
            "encoder": {"identity": identity, "model": str(args.model), "hidden_size": dim},
            **{k: config[k] for k in ("pooling", "pooling_factor", "n_vectors", "segment_tokens")},
            "dtype": args.dtype,
            "bytes_per_vector": bytes_per_vector(dim, args.dtype),
            "docs": {"read": tally.read, "written": writer.docs, "skipped": dict(sorted(tally.skipped.items()))},
            "sources": source_entries(files) + [{"path": p, "arc_shards": True} for p in args.input if p not in raw],
        }
    )
    print(_summary(manifest, time.time() - start, args.out))
    return manifest


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse one that already holds a store unless `overwrite` (then remove its files)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{SPLIT}-*")) + [p for p in [out / "manifest.json"] if p.exists()]
    if existing and not overwrite:
        raise DataError(f"--out {out}: already holds {existing[0].name}; use --overwrite to replace the store")
    for path in existing:
        path.unlink()


def _summary(manifest: dict, seconds: float, out: Path) -> str:
    docs = manifest["docs"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in docs["skipped"].items())
    return (
        f"arctrain compress: {docs['read']} docs read, {docs['written']} stored, "
        f"{sum(docs['skipped'].values())} skipped{f' ({skipped})' if skipped else ''}; "
        f"{manifest['encoder_tokens']:,} encoder tokens -> {manifest['vectors']:,} {manifest['dtype']} vectors in "
        f"{len(manifest['shards'])} shards, {manifest['bytes_per_token']:.1f} bytes per token, {seconds:.1f}s -> {out}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arctrain compress", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="exported model directory (arctrain export)")
    p.add_argument("--input", action="append", required=True, help="a .jsonl, .jsonl.zst or .parquet file or glob")
    p.add_argument("--out", required=True, type=Path, help="the store's directory")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="stored vectors (int8: per-vector scale)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id", help="the document id (unique across inputs); default: text sha256")
    p.add_argument("--workers", type=int, default=1, help="compressing processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (one device for all workers)")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="shard file size (MiB) to start a new shard at")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable record instead of skipping")
    p.add_argument("--overwrite", action="store_true", help="replace a store already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is printed)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.threads < 1 or args.shard_size_mb <= 0:
        raise ValueError("--workers and --threads must be >= 1, --shard-size-mb > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    compress(parse_args(argv or []))
