"""Time to first token with a compressed vs a full context, encoder included, and from a vector store (not a test).

    python benchmarks/prefill.py                                   # lengths 512..8192, factors 4 and 8
    python benchmarks/prefill.py --lengths 512 2048 --repeats 3

Randomly initialised models whose shapes keep the paper's proportions: the encoder's kept layers hold about 3/8 of
the decoder's non-embedding parameters (Llama 3.2 3B minus 2 layers vs Llama 3.1 8B), here a ~90M-parameter
(non-embedding) Llama decoder and a ~33M encoder, small enough for a CPU. Random weights cost exactly what
trained ones do.

Full context: the decoder prefills BOS + n context tokens + a 32-token question and produces the first token's
logits. Compressed: the encoder (arctrain's ARCEncoder, mean-pooled queries) compresses the n tokens in segments
of 256, the projector maps the vectors, and the decoder prefills BOS + n/x vectors + <Cont> + the question. Both
timed end to end (best of --repeats rounds in which the modes take turns). FLOPs: arctrain/model/flops.py's
`FlopCounter.prefill`, the model that training MFU and `arctrain eval` use: 2N per token (N: linear weights, no
embeddings; the pooled-query layer's q/o/MLP per vector), attention (4 x width per query-key pair: causal prefill
T(T+1)/2 pairs, a bidirectional encoder segment L^2, the pooled layer m x L) and the LM head once.

From the store (`x4 store`): the same context compressed once beforehand by `arctrain compress`'s writer
(arctrain/inference/store.py, --store-dtype, bf16 by default) into a store on disk, opened once as a server would;
timed: reading the document's vectors back (seek, dequantize), the projector and the decoder's prefill. The encoder's
cost is gone.
"""

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arctrain.data.batch import BatchStats
from arctrain.inference.store import StoreWriter, VectorStore, bytes_per_vector, doc_record
from arctrain.model import ARCEncoder, Projector
from arctrain.model.flops import FlopCounter, matmul_params

SEGMENT = 256
QUESTION = 32
VOCAB = 32000


def llama(hidden: int, layers: int, ffn: int, heads: int, kv_heads: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=16384,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def interleaved_best(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Best time of each function over `repeats` rounds, the functions taking turns within a round, so that load
    from other processes on a shared machine hits every mode alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def full_prefill(decoder, n: int) -> None:
    ids = torch.randint(0, VOCAB, (1, 1 + n + QUESTION))
    decoder(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1)


@torch.no_grad()
def compressed_prefill(encoder, projector, decoder, n: int) -> None:
    ids = torch.randint(0, VOCAB, (1, n))
    segments = ids.view(-1, SEGMENT)  # (S, 256): n is a multiple of the segment length here
    vectors = torch.cat(encoder.compress(segments, torch.ones_like(segments)))  # (n / x, De)
    special = torch.ones(1, vectors.shape[1])
    memory = projector(torch.cat([vectors, special]))  # (n / x + 1, Dd)
    embed = decoder.get_input_embeddings()
    bos, question = embed(ids[:, :1]), embed(torch.randint(0, VOCAB, (1, QUESTION)))
    embeds = torch.cat([bos, memory.unsqueeze(0), question], dim=1)  # (1, 1 + n/x + 1 + 32, Dd)
    decoder(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits.argmax(-1)


@torch.no_grad()
def write_store(out: Path, encoder, n: int, dtype: str) -> VectorStore:
    """An n-token context compressed once into a store of one document, opened for reading."""
    ids = torch.randint(0, VOCAB, (n // SEGMENT, SEGMENT))
    out.mkdir(parents=True)
    vectors = encoder.compress(ids, torch.ones_like(ids))  # (m, De) per segment
    pooling = (SEGMENT // len(vectors[0]), 0)
    writer = StoreWriter(out, 1 << 30, pooling)
    writer.write(doc_record("doc", vectors, [SEGMENT] * len(ids), dtype))
    width = vectors[0].shape[1]
    meta = {"encoder": {"identity": "benchmark"}, "dtype": dtype, "stored_width": width}
    writer.close(
        meta | {"pooling_factor": pooling[0], "n_vectors": 0, "bytes_per_vector": bytes_per_vector(width, dtype)}
    )
    return VectorStore(out)


@torch.no_grad()
def stored_prefill(store: VectorStore, projector, decoder) -> None:
    vectors = torch.cat(store.get("doc").vectors)  # (n / x, De) read back from disk
    special = torch.ones(1, vectors.shape[1])
    memory = projector(torch.cat([vectors, special]))  # (n / x + 1, Dd)
    embed = decoder.get_input_embeddings()
    bos, question = embed(torch.randint(0, VOCAB, (1, 1))), embed(torch.randint(0, VOCAB, (1, QUESTION)))
    embeds = torch.cat([bos, memory.unsqueeze(0), question], dim=1)  # (1, 1 + n/x + 1 + 32, Dd)
    decoder(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits.argmax(-1)


def prompt_stats(n: int, factor: int | None) -> BatchStats:
    """The sizes FlopCounter.prefill reads, for one prompt of an n-token context (full when `factor` is None)."""
    if factor is None:
        t = 1 + n + QUESTION
        return BatchStats(1, 0, 0, 0, 0, t, t * (t + 1) // 2, 0)
    segments, m = n // SEGMENT, SEGMENT // factor
    t = 1 + n // factor + 1 + QUESTION
    # vectors: memory + the two special vectors, arctrain's convention (the prompt projects one: 1 vector of n/x)
    return BatchStats(1, n, segments * SEGMENT**2, segments * m * SEGMENT, n // factor + 2, t, t * (t + 1) // 2, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--store-dtype", default="bf16", choices=["fp32", "bf16", "fp16", "int8"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prefill_store_"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = llama(hidden=768, layers=12, ffn=2560, heads=12, kv_heads=4)
    backbone = llama(hidden=512, layers=12, ffn=1664, heads=8, kv_heads=4)
    encoders = {x: ARCEncoder(backbone, n_truncated_layers=2, factor=x).eval() for x in args.factors}
    projector = Projector(512, 2048, 768).eval()
    n_dec, n_enc = matmul_params(decoder.model), matmul_params(encoders[args.factors[0]])
    counters = {
        x: FlopCounter(SimpleNamespace(encoder=e, projectors={"d": projector}, decoders={"d": decoder}))
        for x, e in encoders.items()
    }
    print(
        f"decoder: {n_dec / 1e6:.1f}M non-embedding params ({sum(p.numel() for p in decoder.parameters()) / 1e6:.0f}M "
        f"total); encoder: {n_enc / 1e6:.1f}M ({n_enc / n_dec:.2f} of the decoder); projector "
        f"{matmul_params(projector) / 1e6:.1f}M; threads {torch.get_num_threads()}; best of {args.repeats}"
    )
    print(f"{'context':>7} {'mode':>8} {'dec pos':>7} {'GFLOP':>8} {'TTFT s':>7} {'FLOP ratio':>10} {'time ratio':>10}")
    full_prefill(decoder, 512)  # warm-up: first calls pay for allocator growth and kernel selection
    compressed_prefill(encoders[args.factors[0]], projector, decoder, 512)
    for n in args.lengths:
        fns = {"full": lambda n=n: full_prefill(decoder, n)}
        fns |= {x: lambda e=encoders[x], n=n: compressed_prefill(e, projector, decoder, n) for x in args.factors}
        stores = {x: write_store(root / f"{n}_x{x}", encoders[x], n, args.store_dtype) for x in args.factors}
        fns |= {f"{x}s": lambda st=stores[x]: stored_prefill(st, projector, decoder) for x in args.factors}
        times = interleaved_best(fns, args.repeats)
        full_f = counters[args.factors[0]].prefill("d", prompt_stats(n, None), compressed=False)
        full_t = times["full"]
        print(f"{n:>7} {'full':>8} {1 + n + QUESTION:>7} {full_f / 1e9:>8.1f} {full_t:>7.3f}")
        for x in args.factors:
            f, t = counters[x].prefill("d", prompt_stats(n, x)), times[x]
            print(
                f"{n:>7} {'x' + str(x):>8} {2 + n // x + QUESTION:>7} {f / 1e9:>8.1f} {t:>7.3f} "
                f"{full_f / f:>9.2f}x {full_t / t:>9.2f}x"
            )
            stats = prompt_stats(n, x)  # from the store: the decoder and the projector only
            f = counters[x].prefill("d", stats, compressed=False) + 2.0 * counters[x].proj["d"] * stats.vectors
            t = times[f"{x}s"]
            print(
                f"{n:>7} {f'x{x} store':>8} {2 + n // x + QUESTION:>7} {f / 1e9:>8.1f} {t:>7.3f} "
                f"{full_f / f:>9.2f}x {full_t / t:>9.2f}x"
            )


if __name__ == "__main__":
    main()
