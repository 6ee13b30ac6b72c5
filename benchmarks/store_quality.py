"""What a vector store costs on disk and in quality, per dtype, product quantization included (not a test).

    python benchmarks/store_quality.py --model EXPORT --decoder DECODER_DIR [DECODER_DIR ...] --input heldout.jsonl \\
        --train-input train.jsonl --segments 256 --dtypes fp16 int8 pq48 rq32 rq32/fisher rq32/std

The documents of --input are compressed once by the real `arctrain compress` (fp32); every other store is written from
those vectors by the store's own writer (arctrain/inference/store.py: the bytes `arctrain compress --dtype X` writes,
without running the encoder again). The pq/opq codebooks are trained (arctrain/inference/store_codec.py, faiss) on up to
--train-vectors vectors drawn from the documents of --train-input (compressed the same way; default: --input itself,
as `arctrain compress` does). Bytes are what each store holds on disk: shards and indexes per byte of UTF-8 text,
the codebook (a fixed cost, ~0.6-2 MB) beside it.

Quality: the decoder reconstructs each of the first --segments segments from its vectors read back from each store
(<Rec>, teacher forcing, as `arctrain eval --heldout` does from the encoder); "gain lost" is the loss increase over
fp32 as a share of what the context is worth (no-context loss - fp32 loss), per --decoder. A dtype `X/W` is codec X
after the weighting W (`arctrain compress --dtype X --weighting W`, arctrain/inference/store_weighting.py); fisher
weightings are measured on --weighting-segments segments of the training documents with every --decoder, as
`compress --decoder ...` does. Speed: the codecs' encode and decode
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
from arctrain.data.qa_records import read_qa
from arctrain.inference import store_codec, store_weighting
from arctrain.inference.eval import evaluate_qa, score_targets
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
from arctrain.inference.store_weighting import DocSample
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
    parser.add_argument("--decoder", required=True, type=Path, nargs="+", help="decoders scored (and weighed for)")
    parser.add_argument("--weighting-segments", type=int, default=256)
    parser.add_argument("--input", required=True, type=Path, help="held-out documents (jsonl with id and text)")
    parser.add_argument("--train-input", type=Path, default=None, help="documents the codebooks are trained on")
    parser.add_argument("--train-vectors", type=int, default=100_000)
    parser.add_argument("--segments", type=int, default=256, help="segments reconstructed per store")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "int8", "pq96", "pq48", "opq48"])
    parser.add_argument("--speed-vectors", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="the stores' directory (its fp32 stores are reused)")
    parser.add_argument("--qa", type=Path, default=None, help="QA records (scripts/make_qa.py): F1 from each store")
    parser.add_argument("--qa-shots", type=int, default=5)
    parser.add_argument("--qa-max-new-tokens", type=int, default=16)
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
    weightings = {d.split("/")[1] for d in args.dtypes if "/" in d}
    fisher = None
    if weightings & set(store_weighting.NEEDS_DECODER):
        sample = DocSample(args.weighting_segments)
        for doc in read_docs(args.train_input or args.input):
            sample.add((doc["id"], doc["text"]))
        start = time.perf_counter()
        fisher, used = store_weighting.decoder_fisher(
            args.model, args.decoder, sample.docs, train_store, args.weighting_segments, "cpu"
        )
        seconds = time.perf_counter() - start
        print(f"decoder sensitivity measured on {used} training segments per decoder in {seconds:.0f}s")
    massive(np.concatenate([torch.cat(exact.get(i).vectors).numpy() for i in ids]), fisher)
    arcs = [ARCGenerator(args.model, decoder, dtype=torch.float32) for decoder in args.decoder]
    targets = {}  # per decoder: (doc id, segment index, decoder tokens of that segment)
    for arc in arcs:
        targets[arc.name] = []
        for doc in docs:
            for i, seg in enumerate(arc.segments(doc["text"])):
                tokens = arc.dec_tok.encode(arc.enc_tok.decode(seg), add_special_tokens=False)
                targets[arc.name].append((doc["id"], i, tokens))
        targets[arc.name] = targets[arc.name][: args.segments]
    texts = sum(text_bytes.values())
    tokens = exact.manifest["encoder_tokens"]
    print(
        f"{len(docs)} held-out docs, {texts:,} bytes of text, {tokens:,} encoder tokens ({texts / tokens:.2f} "
        f"bytes/token), {exact.manifest['vectors']:,} vectors (x{arc.config.pooling_factor}); codebooks trained on "
        f"{reservoir.sample().shape[0]:,} vectors; {args.segments} segments reconstructed per decoder"
    )
    base, gain, base_acc = {}, {}, {}
    for arc in arcs:
        exact_items = [(exact.get(d).vectors[i], t) for d, i, t in targets[arc.name]]
        base[arc.name], base_acc[arc.name], no_context = reconstruction(arc, exact_items, True)
        gain[arc.name] = no_context - base[arc.name]
        print(f"{arc.name}: no context: loss {no_context:.4f}; the context is worth {gain[arc.name]:.4f} nats")
    header = ("store", "decoder", "B/vector", "B/text B", "codes B/B", "rec loss", "vs fp32", "gain lost", "tok acc")
    print("{:>16} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>7} codebook".format(*header))
    stores, codecs = {"fp32": exact}, {}
    for name in ["fp32", *args.dtypes]:
        dtype, _, kind = name.partition("/")
        folder = root / name.replace("/", "_")
        codec, trained = None, ""
        if store_codec.parse(dtype):
            folder.mkdir()
            weighting = None
            if kind:
                weighting = ({"kind": kind}, store_weighting.transform(kind, reservoir.sample(), fisher))
            start = time.perf_counter()
            entry = store_codec.train(dtype, reservoir.sample(), folder, args.threads, weighting)
            trained = f"{entry['bytes']:,} B, trained in {time.perf_counter() - start:.0f}s"
            codecs[name] = codec = (store_codec.Codec(folder, entry), entry)
        if dtype == "fp32" and exact.manifest["format"] != FORMAT:  # kept from an older format: its bytes in this
            recode(exact, ids, root / "fp32.now", dtype, None, text_bytes)
            stores[dtype] = VectorStore(root / "fp32.now")
        elif dtype != "fp32":
            recode(exact, ids, folder, dtype, codec, text_bytes)
            stores[name] = VectorStore(folder)
        store = stores[name]
        m = store.manifest
        shards = sum(s["bytes"] + s["index"]["bytes"] for s in m["shards"])  # on disk, the codebook aside
        codes = m["bytes_per_vector"] * m["vectors"] / texts  # the vectors alone: long documents, at scale
        for arc in arcs:
            loss, acc = (
                (base[arc.name], base_acc[arc.name])
                if dtype == "fp32"
                else reconstruction(arc, [(store.get(d).vectors[i], t) for d, i, t in targets[arc.name]])[:2]
            )
            lost = loss - base[arc.name]
            print(
                f"{name:>16} {arc.name:>10} {m['bytes_per_vector']:>8} {shards / texts:>8.3f} {codes:>9.3f} "
                f"{loss:>9.4f} {lost:>+8.4f} {lost / gain[arc.name]:>9.1%} {acc:>7.3f} {trained}",
                flush=True,
            )
    if args.qa:
        qa(args, root, arcs[0], stores, codecs)
    if args.speed_vectors:
        speed(args, stores, codecs, reservoir.sample())


def qa(args: argparse.Namespace, root: Path, arc: ARCGenerator, stores: dict, codecs: dict) -> None:
    """QA F1 with the passages read from each store (`arctrain eval --vectors`): the passages compressed once (fp32,
    the real command), written as each store with its codec; closed and open book once, beside them."""
    records = read_qa(args.qa)
    passages = root / "qa_passages.jsonl"
    ids = [f"qa-{i}" for i in range(len(records))]
    passages.write_text("".join(json.dumps({"id": i, "text": r["passages"][0]}) + "\n" for i, r in zip(ids, records)))
    for record, doc_id in zip(records, ids, strict=True):
        record["doc_ids"] = [doc_id]
    exact = fp32_store(args.model, passages, root / "qa_fp32")
    text_bytes = {i: len(r["passages"][0].encode()) for i, r in zip(ids, records, strict=True)}
    plain = {"shots": args.qa_shots, "max_new_tokens": args.qa_max_new_tokens, "batch_size": 4}
    result = evaluate_qa(arc, records, modes=("open_book", "closed_book"), **plain)
    has = result["context_has_answer"]
    print(f"QA ({arc.name}): {result['n']} questions, {args.qa_shots} shots; answer in the passage {has:.1f}%")
    for mode, m in result["modes"].items():
        print(f"  {mode:>16} EM {m['exact_match']:5.1f} F1 {m['f1']:5.1f}", flush=True)
    for name in stores:
        dtype = name.partition("/")[0]
        store = exact
        if dtype != "fp32":
            folder = root / f"qa_{name.replace('/', '_')}"
            folder.mkdir(exist_ok=True)
            if name in codecs:  # the store's codebook (and weighting) beside its shards, as compress writes them
                entry = codecs[name][1]
                for file in [entry["file"], *([entry["weighting"]["file"]] if "weighting" in entry else [])]:
                    shutil.copy(root / name.replace("/", "_") / file, folder / file)
            recode(exact, ids, folder, dtype, codecs.get(name), text_bytes)
            store = VectorStore(folder)
        arc.store = store
        m = evaluate_qa(arc, records, modes=("compressed",), **plain)["modes"]["compressed"]
        print(
            f"  {name:>16} EM {m['exact_match']:5.1f} F1 {m['f1']:5.1f} (compressed, read from the store)", flush=True
        )


def massive(vectors: np.ndarray, fisher: np.ndarray | None) -> None:
    """How the variance of the held-out vectors (N, D) spreads over dimensions, and the decoders' sensitivity there."""
    std = vectors.std(axis=0)
    top = np.argsort(-std)[:10]
    share = float((std[top] ** 2).sum() / (std**2).sum())
    line = ", ".join(f"{d}: {std[d]:.1f}" for d in top[:5])
    print(f"per-dimension std: top {line}; median {np.median(std):.2f}; the top 10 dimensions hold {share:.0%}")
    if fisher is not None:
        sens = np.sqrt(np.diag(fisher))
        line = ", ".join(f"{d}: {sens[d] / np.median(sens):.2f}" for d in top[:5])
        print(
            f"decoder sensitivity sqrt(E[g_d^2]) / its median at those dimensions: {line}; "
            f"max {sens.max() / np.median(sens):.1f} (dim {int(sens.argmax())}), min {sens.min() / np.median(sens):.2f}"
        )
        error = std**2 * sens**2  # per-dimension loss weight of an error of one std
        print(f"std x sensitivity: the top 10 dimensions by std hold {error[top].sum() / error.sum():.0%} of it")


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
