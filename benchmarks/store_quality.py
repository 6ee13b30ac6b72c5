"""What a vector store costs on disk and in quality, per dtype (not a test).

    python benchmarks/store_quality.py --model EXPORT --decoder DECODER_DIR --input heldout.jsonl --segments 256

Every document of --input is compressed by the real `arctrain compress` into one store per dtype (fp32, bf16, fp16,
int8 with a per-vector scale); bytes per text token come from each store's manifest (shards and indexes on disk,
divided by the encoder tokens compressed). Quality: the decoder reconstructs each of the first --segments segments
from its vectors read back from each store (<Rec>, teacher forcing, as `arctrain eval --heldout` does from the
encoder), and the table gives the token loss, its change from fp32, token accuracy, and the no-context loss.

Product quantization (the paper's §4.5), `--pq M`: each vector cut into M sub-vectors, each coded by the nearest of
256 centroids (one byte) learned by k-means on the vectors of the other half of the documents; M bytes per vector
plus nothing else. Measured beside int8 to see whether it pays.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from arctrain.cli import main as arctrain
from arctrain.infer import ARCGenerator
from arctrain.model import Example, Memory, Text
from arctrain.store import VectorStore

DTYPES = ("fp32", "bf16", "fp16", "int8")


@torch.no_grad()
def reconstruction(arc: ARCGenerator, items: list[tuple[torch.Tensor, list[int]]]) -> tuple[float, float, float]:
    """(token loss, token accuracy, no-context token loss) of reconstructing each segment's decoder tokens from its
    vectors (m, D), as `arctrain eval --heldout` scores them from the encoder."""
    loss_sum = no_context = 0.0
    correct = total = 0
    for start in range(0, len(items), 16):
        prefix = [arc.text(arc.prefix, first=True)] if arc.prefix else []
        examples = [
            Example(prefix + [Memory([], "rec", vectors=[v]), Text(t, loss=True)]) for v, t in items[start : start + 16]
        ]
        batch = arc.batch(examples).to(arc.device)
        embeds = arc.model.embed(batch, arc.name)  # (1, N_dec, Dd) packed rows
        hidden = arc.model.decoder_hidden(arc.decoder, embeds, batch)[0]  # (N_dec, Dd) position p predicts p + 1
        targets = batch.labels[0, batch.target_index + 1]  # (N_t,)
        logits = arc.decoder.get_output_embeddings()(hidden[batch.target_index]).float()  # (N_t, V)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        n = len(targets)
        total += n
        no_context += float(arc.model(batch, arc.name, use_context=False).loss) * n
    return loss_sum / total, correct / total, no_context / total


def product_quantizer(train: torch.Tensor, m: int, iters: int = 20, k: int = 256, seed: int = 0) -> torch.Tensor:
    """k-means codebooks (M, k, D/M) for M sub-vectors (torch, Lloyd's iterations from random training points)."""
    n, dim = train.shape
    sub = train.view(n, m, dim // m).transpose(0, 1)  # (M, N, d)
    gen = torch.Generator().manual_seed(seed)
    books = sub[:, torch.randperm(n, generator=gen)[:k]].clone()  # (M, k, d)
    for _ in range(iters):
        assign = torch.cdist(sub, books).argmin(-1)  # (M, N)
        for j in range(m):
            sums = torch.zeros_like(books[j]).index_add_(0, assign[j], sub[j])
            counts = torch.bincount(assign[j], minlength=books.shape[1]).clamp(min=1)[:, None]
            books[j] = torch.where(counts > 0, sums / counts, books[j])
    return books


def pq_roundtrip(vectors: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    m, _, d = books.shape
    sub = vectors.view(len(vectors), m, d).transpose(0, 1)  # (M, N, d)
    codes = torch.cdist(sub, books).argmin(-1)  # (M, N): one byte each
    return torch.stack([books[j][codes[j]] for j in range(m)], 1).reshape(len(vectors), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--decoder", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path, help="documents (jsonl with id and text)")
    parser.add_argument("--segments", type=int, default=256, help="segments reconstructed per dtype")
    parser.add_argument("--generate", type=int, default=8, help="documents generated from, per store")
    parser.add_argument("--pq", type=int, nargs="*", default=[], help="product quantization with M bytes per vector")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="store_quality_"))
    manifests = {}
    for dtype in DTYPES:
        arctrain(["compress", "--model", str(args.model), "--input", str(args.input), "--out", str(root / dtype),
                  "--dtype", dtype, "--no-progress"])  # fmt: skip
        manifests[dtype] = json.loads((root / dtype / "manifest.json").read_text())
    arc = ARCGenerator(args.model, args.decoder, dtype=torch.float32)
    docs = [json.loads(line) for line in args.input.read_text().splitlines() if line.strip()]
    texts = {d["id"]: d["text"] for d in docs}
    ids = [d["id"] for d in docs]
    test_ids, train_ids = ids[::2], ids[1::2]
    targets = []  # (doc id, segment index, decoder tokens of that segment)
    for doc_id in test_ids:
        for i, seg in enumerate(arc.segments(texts[doc_id])):
            target = arc.dec_tok.encode(arc.enc_tok.decode(seg), add_special_tokens=False)
            targets.append((doc_id, i, target))
    targets = targets[: args.segments]
    rows = {}
    for dtype in DTYPES:
        store = VectorStore(root / dtype)
        items = [(store.get(d).vectors[i], t) for d, i, t in targets]
        loss, acc, no_context = reconstruction(arc, items)
        rows[dtype] = (loss, acc, manifests[dtype]["bytes_per_token"])
    exact = VectorStore(root / "fp32")
    for m in args.pq:
        train = torch.cat([v for d in train_ids for v in exact.get(d).vectors])
        books = product_quantizer(train, m)
        items = [(pq_roundtrip(exact.get(d).vectors[i], books), t) for d, i, t in targets]
        factor = arc.config.pooling_factor
        rows[f"pq{m}"] = (*reconstruction(arc, items)[:2], m / factor)  # codes only: the codebooks are shared
    n_tokens = sum(len(t) for _, _, t in targets)
    print(f"{len(targets)} segments ({n_tokens} decoder tokens) of {len(test_ids)} docs; x{arc.config.pooling_factor}")
    print(f"{'store':>6} {'bytes/token':>11} {'rec loss':>9} {'vs fp32':>8} {'token acc':>9}")
    base = rows["fp32"][0]
    for name, (loss, acc, bpt) in rows.items():
        print(f"{name:>6} {bpt:>11.1f} {loss:>9.4f} {loss - base:>+8.4f} {acc:>9.3f}")
    print(f"(without the context: loss {no_context:.4f})")
    # Greedy generation from each store against compressing the text on the fly (fp32 model).
    docs_gen = test_ids[: args.generate]
    fresh = arc.complete([texts[d] for d in docs_gen], ["\n"] * len(docs_gen), max_new_tokens=32).texts
    for dtype in DTYPES:
        arc.store = VectorStore(root / dtype)
        stored = arc.complete([arc.stored_memory(d) for d in docs_gen], ["\n"] * len(docs_gen), max_new_tokens=32)
        same = sum(a == b for a, b in zip(stored.texts, fresh, strict=True))
        print(f"{dtype:>6}: greedy 32 tokens identical to on-the-fly compression for {same} of {len(docs_gen)} docs")


if __name__ == "__main__":
    main()
