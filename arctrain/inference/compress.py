"""Compress documents once into a vector store (inference/store.py) that `generate --vectors` and `eval --vectors` read.

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

`--dtype pq<M>`, `opq<M>`, `rq<M>`, `pca<d>-...` (arctrain/inference/store_codec.py): the documents are compressed once
into a staging store of fp32 vectors inside --out (4 x width bytes per vector on disk while it runs, removed at the
end), while a uniform sample of up to --train-vectors of their vectors is drawn (seeded); the codebook is trained on
that sample, then every document is read back from the staging store in order and written as codes. With fewer vectors
than asked the codebook is trained on all of them, and the summary says so.

`--weighting std|fisher|fisher-full` (arctrain/inference/store_weighting.py) maps the vectors before the codec and back
after it, so that its L2 error counts what the decoders feel: fisher weighs each dimension by the --decoder(s)'
sensitivity (the gradient of their reconstruction loss, measured on --weighting-segments segments of documents
drawn from the input), std standardises each dimension; the map is stored beside the codebook.

`--bottleneck DECODER` stores W1 x instead of each vector x, W1 (H, D) being that decoder's projector first layer, when
H < D: H / D of the bytes in fp32/bf16/fp16/int8 (pq codes the H-wide vectors), readable by that decoder only
(arctrain/inference/store.py). It pays for a store that one decoder reads; a store for several decoders keeps encoder
space.
"""

import argparse
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm
from transformers import AutoTokenizer

from arctrain.data.qa import TextPieces
from arctrain.data.shards import check_tokenizers, read_manifest
from arctrain.export.load import load_export
from arctrain.inference import store_codec, store_weighting
from arctrain.inference.store import (
    DTYPES,
    PQ_DTYPES,
    SPLIT,
    DocRecord,
    StoreWriter,
    VectorStore,
    bytes_per_vector,
    check_dtype,
    doc_key,
    doc_record,
    encoder_identity,
    projector_first_layer,
    tensor_sha256,
)
from data_tools.inputs import DataError, Doc, Fields, Tally, check_inputs, expand_inputs, read_documents, source_entries
from data_tools.pool import in_order
from data_tools.sample_format import decode

GROUP_DOCS = 32  # documents per task sent to a worker (and per write)
BATCH_SEGMENTS = 32  # segments compressed in one encoder forward (right-padded to the longest)
STAGING = ".staging"  # the fp32 store a product-quantized store is coded from, inside --out while it is made


class Compressor:
    """An export's encoder and tokenizer: documents -> pooled vectors per segment (the worker's state)."""

    def __init__(self, model_dir: str | Path, dtype: str, device: str, threads: int, bottleneck: str | None = None):
        torch.set_num_threads(threads)
        self.encoder, _, _, config = load_export(model_dir, torch.float32)
        self.device = torch.device(device)
        self.encoder.to(self.device)
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.pieces = TextPieces(tok, tok, config.segment_tokens)  # the cut `arctrain generate` makes
        self.tok = tok
        self.dtype = dtype
        self.first = projector_first_layer(model_dir, bottleneck).to(self.device) if bottleneck else None  # (H, D)

    @torch.no_grad()
    def compress(self, docs: list[tuple[str, str | list[list[int]]]]) -> list[tuple[DocRecord | None, int]]:
        """(id, text or its encoder segments) pairs -> each document's record (None: no encoder tokens) and
        its bytes of UTF-8 text (of shard segments: their tokens decoded)."""
        segments = [self.pieces.segments(text) if isinstance(text, str) else text for _, text in docs]
        flat = [seg for segs in segments for seg in segs]
        vectors = []
        for start in range(0, len(flat), BATCH_SEGMENTS):
            packed = self.encoder.compress_segments(flat[start : start + BATCH_SEGMENTS])  # no padding computed
            vectors += [(v if self.first is None else v @ self.first.T).cpu() for v in packed]  # (m_s, D or H)
        out, k = [], 0
        for (doc_id, text), segs in zip(docs, segments, strict=True):
            doc_vectors, k = vectors[k : k + len(segs)], k + len(segs)
            members = doc_record(doc_id, doc_vectors, [len(s) for s in segs], self.dtype) if segs else None
            if members is not None and not all(torch.isfinite(v).all() for v in doc_vectors):
                raise ValueError(f"document {doc_id!r}: the encoder gave non-finite vectors; nothing is stored")
            raw = text if isinstance(text, str) else "".join(self.tok.decode(s) for s in segs)
            out.append((members, len(raw.encode("utf-8"))))
        return out


_WORKER: Compressor | None = None


def _init_worker(*args) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Compressor(*args)


def _compress_group(docs: list[tuple[str, str]]) -> list[tuple[DocRecord | None, int]]:
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
    dtype = "fp32" if store_codec.parse(args.dtype) else args.dtype
    init = (args.model, dtype, args.device, args.threads, args.bottleneck)
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
    pq = store_codec.parse(args.dtype) is not None
    dim = config["backbone"]["hidden_size"]
    neck = bottleneck_entry(args.model, args.bottleneck, dim) if args.bottleneck else None
    dim = neck["hidden"] if neck else dim
    if pq:
        store_codec.check(args.dtype, dim)
    staging = args.out / STAGING if pq else args.out
    staging.mkdir(exist_ok=True)
    pooling = (config["pooling_factor"], config["n_vectors"])
    writer = StoreWriter(staging, int(args.shard_size_mb * (1 << 20)), pooling)
    reservoir = store_codec.Reservoir(args.train_vectors) if pq else None
    weighed = store_weighting.DocSample(args.weighting_segments)  # documents whose segments measure --weighting fisher
    order = []  # (doc id, text bytes) as written: a pq store is coded from the staging store in this order
    with tqdm(unit="doc", desc="arctrain compress", disable=args.no_progress, mininterval=1.0) as bar:
        for group, samples in _in_order(_groups(documents, tally), args):
            for (doc_id, text), (members, text_bytes) in zip(group, samples, strict=True):
                if members is None:
                    tally.skip("no_tokens", f"document {doc_id!r}")
                    continue
                writer.write(members, text_bytes)
                if pq:
                    reservoir.add(members.arrays["vectors"])
                    order.append((doc_id, text_bytes))
                    if args.weighting in store_weighting.NEEDS_DECODER:
                        weighed.add((doc_id, text))
            bar.update(len(group))
    meta = {
        "encoder": {"identity": identity, "model": str(args.model), "hidden_size": config["backbone"]["hidden_size"]},
        **({"bottleneck": neck} if neck else {}),
        "stored_width": dim,
        **{k: config[k] for k in ("pooling", "pooling_factor", "n_vectors", "segment_tokens")},
        "dtype": args.dtype,
        "bytes_per_vector": bytes_per_vector(dim, args.dtype),
        "docs": {"read": tally.read, "written": writer.docs, "skipped": dict(sorted(tally.skipped.items()))},
        "sources": source_entries(files) + [{"path": p, "arc_shards": True} for p in args.input if p not in raw],
    }
    if not pq:
        manifest = writer.close(meta)
    else:
        writer.close(meta | {"dtype": "fp32"})
        if reservoir.seen < 256:  # 256 centroids per sub-quantizer
            raise DataError(f"--dtype {args.dtype}: {reservoir.seen} vectors, at least 256 are needed to train it")
        weighting = store_weighting.from_args(args, staging, weighed.docs, reservoir.sample())
        meta["codec"] = store_codec.train(args.dtype, reservoir.sample(), args.out, args.threads, weighting)
        meta["codec"]["train_vectors"] = args.train_vectors  # asked for; `trained_on`: drawn (all when fewer)
        manifest = code_store(staging, args.out, order, args, meta)
        shutil.rmtree(staging)
    print(_summary(manifest, time.time() - start, args.out))
    return manifest


def bottleneck_entry(model_dir: Path, decoder: str, width: int) -> dict:
    """The manifest entry of a bottleneck store, once W1 is checked to pay (H < D) and to be invertible on the right."""
    first = projector_first_layer(model_dir, decoder)  # (H, D)
    hidden = first.shape[0]
    if hidden >= width:
        raise ValueError(
            f"--bottleneck {decoder}: its projector's hidden width {hidden} is not smaller than the encoder's {width}; "
            "storing it would not save bytes"
        )
    error = float((first.double() @ torch.linalg.pinv(first.double()) - torch.eye(hidden).double()).abs().max())
    if error > 1e-4:
        raise ValueError(
            f"--bottleneck {decoder}: its projector's first layer is rank-deficient (|W1 W1+ - I| {error:.1e})"
        )
    return {"decoder": decoder, "hidden": hidden, "sha256": tensor_sha256(first)}


def code_store(staging: Path, out: Path, order: list[tuple[str, int]], args: argparse.Namespace, meta: dict) -> dict:
    """The fp32 staging store's documents, in order, coded with the trained codebook into `out`'s shards."""
    source = VectorStore(staging)
    codec = store_codec.Codec(out, meta["codec"])
    writer = StoreWriter(out, int(args.shard_size_mb * (1 << 20)), (meta["pooling_factor"], meta["n_vectors"]))
    for doc_id, text_bytes in order:
        doc = source.get(doc_id)
        writer.write(doc_record(doc_id, doc.vectors, doc.tokens, args.dtype, codec), text_bytes)
    source.close()
    return writer.close(meta)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse one that already holds a store unless `overwrite` (then remove its files)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = ["manifest.json", store_codec.CODEBOOK, store_codec.WEIGHTING]
    existing = sorted(out.glob(f"{SPLIT}-*")) + [out / n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise DataError(f"--out {out}: already holds {existing[0].name}; use --overwrite to replace the store")
    for path in existing:
        path.unlink()
    if (out / STAGING).exists():  # left by an interrupted pq compression
        shutil.rmtree(out / STAGING)


def _summary(manifest: dict, seconds: float, out: Path) -> str:
    docs = manifest["docs"]
    codec = manifest.get("codec")
    trained = ""
    if codec:
        n = codec["trained_on"]
        sample = f"all {n:,} vectors (fewer than --train-vectors)" if n < codec["train_vectors"] else f"{n:,} sampled"
        trained = f"; codebook {codec['factory']} trained on {sample}"
        if weighting := codec.get("weighting"):
            trained += f", {weighting['kind']} weighting" + (
                f" from {weighting['segments']} segments" if "segments" in weighting else ""
            )
    skipped = ", ".join(f"{reason} {n}" for reason, n in docs["skipped"].items())
    return (
        f"arctrain compress: {docs['read']} docs read, {docs['written']} stored, "
        f"{sum(docs['skipped'].values())} skipped{f' ({skipped})' if skipped else ''}; "
        f"{manifest['encoder_tokens']:,} encoder tokens -> {manifest['vectors']:,} {manifest['dtype']} vectors in "
        f"{len(manifest['shards'])} shards, {manifest['bytes_per_token']:.1f} bytes per token, "
        f"{manifest['bytes_per_text_byte']:.2f} per byte of text{trained}, {seconds:.1f}s -> {out}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arctrain compress", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="exported model directory (arctrain export)")
    p.add_argument("--input", action="append", required=True, help="a .jsonl, .jsonl.zst or .parquet file or glob")
    p.add_argument("--out", required=True, type=Path, help="the store's directory")
    p.add_argument(
        "--dtype",
        default="bf16",
        help=f"stored vectors: {', '.join(DTYPES)} (int8: per-vector scale), "
        f"{PQ_DTYPES} (M one-byte codes per vector, faiss)",
    )
    p.add_argument(
        "--bottleneck", metavar="DECODER", help="store after this decoder's projector first layer (only it reads it)"
    )
    p.add_argument("--train-vectors", type=int, default=100_000, help="codec dtypes: codebook training sample size")
    p.add_argument(
        "--weighting",
        default="none",
        help=f"codec dtypes: a map applied before the codec, {', '.join(store_weighting.WEIGHTINGS)} "
        "(fisher: each dimension scaled by the decoders' sensitivity to it; needs --decoder)",
    )
    p.add_argument(
        "--decoder", action="append", type=Path, default=[], help="--weighting fisher: a decoder's directory (repeat)"
    )
    p.add_argument("--weighting-segments", type=int, default=256, help="segments the fisher weighting is measured on")
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
    if args.workers < 1 or args.threads < 1 or args.shard_size_mb <= 0 or args.train_vectors < 256:
        raise ValueError("--workers and --threads must be >= 1, --shard-size-mb > 0, --train-vectors >= 256")
    check_dtype(args.dtype)
    store_weighting.check_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    compress(parse_args(argv or []))
