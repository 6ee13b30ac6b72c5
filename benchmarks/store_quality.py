"""What a vector store costs on disk and in quality, per dtype, product quantization included (not a test).

    python benchmarks/store_quality.py --model EXPORT --decoder DECODER_DIR --input heldout.jsonl \\
        --train-input train.jsonl --segments 256 --dtypes fp16 int8 pq144 pq96 pq48 pq24 opq96 opq48 opq24

The documents of --input are compressed once by the real `arctrain compress` (fp32); every other store is written from
those vectors by the store's own writer (arctrain/inference/store.py: the bytes `arctrain compress --dtype X` writes,
without running the encoder again). The pq/opq codebooks are trained (arctrain/inference/store_codec.py, faiss) on up to
--train-vectors vectors drawn from the documents of --train-input (compressed the same way; default: --input itself,
as `arctrain compress` does). Bytes are what each store holds on disk: shards and indexes per byte of UTF-8 text,
the codebook (a fixed cost, ~0.6-2 MB) beside it.

Quality: the decoder reconstructs each of the first --segments segments from its vectors read back from each store
(<Rec>, teacher forcing, as `arctrain eval --heldout` does from the encoder); "gain lost" is the loss increase over
fp32 as a share of what the context is worth (no-context loss - fp32 loss). Speed: the codecs' encode and decode
rate on --speed-vectors vectors (the held-out vectors tiled), and the time to read one document's vectors from a
store in the page cache (VectorStore.get: seek, read, decode, finite check), median over every document.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from arctrain.cli import main as arctrain
from arctrain.inference import store_codec
from arctrain.inference.eval import score_targets
from arctrain.inference.generate import ARCGenerator
from arctrain.inference.store import (
    FORMAT,
    StoreWriter,
    VectorStore,
    bytes_per_vector,
    dequantize,
    doc_record,
    quantize,
)
from arctrain.model import Example, Memory, Text


@torch.no_grad()
def reconstruction(
    arc: ARCGenerator, items: list[tuple[torch.Tensor, list[int]]], without: bool = False
) -> tuple[float, float, float]:
    """(token loss, token accuracy, no-context token loss if `without`) of reconstructing each segment's decoder
    tokens from its vectors (m, D), as `arctrain eval --heldout` scores them from the encoder."""
    loss_sum = no_context = 0.0
    correct = total = 0
    for start in range(0, len(items), 16):
        prefix = [arc.text(arc.prefix, first=True)] if arc.prefix else []
        examples = [
            Example(prefix + [Memory([], "rec", vectors=[v]), Text(t, loss=True)]) for v, t in items[start : start + 16]
        ]
        batch = arc.batch(examples).to(arc.device)
        batch_loss, batch_correct, n = score_targets(arc, batch)
        loss_sum += batch_loss
        correct += batch_correct
        total += n
        if without:
            no_context += float(arc.model(batch, arc.name, use_context=False).loss) * n
    return loss_sum / total, correct / total, no_context / total


def recode(source: VectorStore, ids: list[str], out: Path, dtype: str, codec, text_bytes: dict) -> dict:
    """`source`'s documents written as a `dtype` store into `out` (the writer `arctrain compress` uses)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(source.manifest)
    for key in ("shards", "bytes", "bytes_per_token", "bytes_per_text_byte", "text_bytes", "codec", "format"):
        meta.pop(key, None)
    meta |= {"dtype": dtype, "bytes_per_vector": bytes_per_vector(meta["stored_width"], dtype)}
    if codec is not None:
        meta["codec"] = codec[1]
    writer = StoreWriter(out, 256 << 20, (meta["pooling_factor"], meta["n_vectors"]))
    for doc_id in ids:
        doc = source.get(doc_id)
        writer.write(doc_record(doc_id, doc.vectors, doc.tokens, dtype, codec and codec[0]), text_bytes[doc_id])
    return writer.close(meta)


def read_docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fp32_store(model: Path, docs: Path, out: Path) -> VectorStore:
    if (out / "manifest.json").is_file():  # --work kept from an earlier run: the same documents, already compressed
        return VectorStore(out)
    arctrain(
        ["compress", "--model", str(model), "--input", str(docs), "--out", str(out), "--dtype", "fp32", "--no-progress"]
    )
    return VectorStore(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--decoder", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path, help="held-out documents (jsonl with id and text)")
    parser.add_argument("--train-input", type=Path, default=None, help="documents the codebooks are trained on")
    parser.add_argument("--train-vectors", type=int, default=100_000)
    parser.add_argument("--segments", type=int, default=256, help="segments reconstructed per store")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "int8", "pq96", "pq48", "opq48"])
    parser.add_argument("--speed-vectors", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="the stores' directory (its fp32 stores are reused)")
    parser.add_argument("--speed-only", action="store_true", help="only the rates, of the --dtypes stores in --work")
    args = parser.parse_args()
    if args.speed_only:
        stores = {d: VectorStore(args.work / d) for d in ["fp32", *args.dtypes]}
        sample = torch.cat([v for d in read_docs(args.input) for v in stores["fp32"].get(d["id"]).vectors]).numpy()
        speed(args, stores, {d: (s.codec, None) for d, s in stores.items() if s.codec}, sample)
        return
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    root = args.work or Path(tempfile.mkdtemp(prefix="store_quality_"))
    for old in root.glob("*"):
        if old.name not in ("fp32", "train") and old.is_dir():
            shutil.rmtree(old)
    docs = read_docs(args.input)
    ids, text_bytes = [d["id"] for d in docs], {d["id"]: len(d["text"].encode()) for d in docs}
    exact = fp32_store(args.model, args.input, root / "fp32")
    train_store = fp32_store(args.model, args.train_input, root / "train") if args.train_input else exact
    reservoir = store_codec.Reservoir(args.train_vectors)
    for doc_id in [d["id"] for d in read_docs(args.train_input)] if args.train_input else ids:
        reservoir.add(torch.cat(train_store.get(doc_id).vectors).numpy())
    arc = ARCGenerator(args.model, args.decoder, dtype=torch.float32)
    targets = []  # (doc id, segment index, decoder tokens of that segment)
    for doc in docs:
        for i, seg in enumerate(arc.segments(doc["text"])):
            targets.append((doc["id"], i, arc.dec_tok.encode(arc.enc_tok.decode(seg), add_special_tokens=False)))
    targets = targets[: args.segments]
    texts = sum(text_bytes.values())
    tokens = exact.manifest["encoder_tokens"]
    print(
        f"{len(docs)} held-out docs, {texts:,} bytes of text, {tokens:,} encoder tokens ({texts / tokens:.2f} "
        f"bytes/token), {exact.manifest['vectors']:,} vectors (x{arc.config.pooling_factor}); codebooks trained on "
        f"{reservoir.sample().shape[0]:,} vectors; {len(targets)} segments reconstructed"
    )
    base, acc, no_context = reconstruction(arc, [(exact.get(d).vectors[i], t) for d, i, t in targets], True)
    gain = no_context - base
    print(f"(no context: loss {no_context:.4f}; the context is worth {gain:.4f} nats)")
    header = ("store", "B/vector", "B/text B", "codes B/B", "rec loss", "vs fp32", "gain lost", "tok acc", "codebook")
    print("{:>12} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>7} {:>9}".format(*header))
    stores, codecs = {"fp32": exact}, {}
    for dtype in ["fp32", *args.dtypes]:
        codec, trained = None, ""
        if store_codec.parse(dtype):
            (root / dtype).mkdir()
            start = time.perf_counter()
            entry = store_codec.train(dtype, reservoir.sample(), root / dtype, args.threads)
            trained = f"{entry['bytes']:,} B, trained in {time.perf_counter() - start:.0f}s"
            codecs[dtype] = codec = (store_codec.Codec(root / dtype, entry), entry)
        if dtype == "fp32" and exact.manifest["format"] != FORMAT:  # kept from an older format: its bytes in this
            recode(exact, ids, root / "fp32.now", dtype, None, text_bytes)
            stores[dtype] = VectorStore(root / "fp32.now")
        elif dtype != "fp32":
            recode(exact, ids, root / dtype, dtype, codec, text_bytes)
            stores[dtype] = VectorStore(root / dtype)
        store = stores[dtype]
        loss, acc = (
            (base, acc)
            if dtype == "fp32"
            else reconstruction(arc, [(store.get(d).vectors[i], t) for d, i, t in targets])[:2]
        )
        m = store.manifest
        shards = sum(s["bytes"] + s["index"]["bytes"] for s in m["shards"])  # on disk, the codebook aside
        codes = m["bytes_per_vector"] * m["vectors"] / texts  # the vectors alone: long documents, at scale
        print(
            f"{dtype:>12} {m['bytes_per_vector']:>8} {shards / texts:>8.3f} {codes:>9.3f} {loss:>9.4f} "
            f"{loss - base:>+8.4f} {(loss - base) / gain:>9.1%} {acc:>7.3f} {trained}",
            flush=True,
        )
    speed(args, stores, codecs, reservoir.sample())


def speed(args: argparse.Namespace, stores: dict, codecs: dict, sample: np.ndarray) -> None:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    n, chunk = args.speed_vectors, min(args.speed_vectors, 100_000)
    block = np.ascontiguousarray(np.resize(sample, (chunk, sample.shape[1])))  # (chunk, D) float32, tiled
    start = time.perf_counter()
    for _ in range(n // chunk):  # the baseline: int8 with a per-vector scale (arctrain/inference/store.py)
        dequantize(quantize(torch.from_numpy(block), "int8"), "int8")
    seconds = time.perf_counter() - start
    print(f"int8: {n // chunk * chunk:,} vectors encoded and decoded in {seconds:.1f}s, {args.threads} threads")
    for dtype, (codec, _) in codecs.items():
        encode = decode = 0.0
        for _ in range(n // chunk):  # in blocks: a million 3072-wide float32 vectors would be 12 GB
            start = time.perf_counter()
            codes = codec.encode(block)
            encode += time.perf_counter() - start
            start = time.perf_counter()
            codec.decode(codes)
            decode += time.perf_counter() - start
        n = n // chunk * chunk
        print(
            f"{dtype}: {n:,} vectors encoded in {encode:.1f}s ({n / encode:,.0f}/s), decoded in {decode:.2f}s "
            f"({n / decode:,.0f}/s), {args.threads} threads; "
            f"{(encode + decode) / seconds:.1f}x int8's time"
        )
    for dtype, store in stores.items():
        doc_ids = [json.loads(line)["id"] for line in args.input.read_text().splitlines() if line.strip()]
        for d in doc_ids:
            store.get(d)  # into the page cache
        times = []
        for d in doc_ids:
            start = time.perf_counter()
            store.get(d)
            times.append(time.perf_counter() - start)
        vectors_per_doc = store.manifest["vectors"] / len(doc_ids)
        print(
            f"{dtype}: one document's vectors read in {statistics.median(times) * 1e3:.3f} ms median, "
            f"{max(times) * 1e3:.3f} ms max ({vectors_per_doc:.0f} vectors per document on average)"
        )


if __name__ == "__main__":
    main()
