"""How much can a frozen decoder gain from its context at all? (Not a test: a ceiling for ARC's reconstruction.)

    python benchmarks/context_use.py --models artifacts/tiny
    python benchmarks/context_use.py --models artifacts/tiny --words 8 --texts 32 --steps 300
    python benchmarks/context_use.py --models artifacts/tiny --decoders llama mistral smollm2=artifacts/smollm2-135m

On held-out chunks of the embedded corpus (`--words` words each), for every decoder under `--models`, the
token-averaged loss of the chunk:

- no context:  BOS + chunk (what ARC's `loss_no_context` measures);
- verbatim:    BOS + chunk + chunk, loss on the second copy: the text itself in context, uncompressed. A decoder
               that can copy from its context (induction heads) gets this far below "no context";
- free x4/x1:  BOS + m free vectors + <Rec> slot + chunk, the m input vectors optimised directly for these very
               chunks (Adam, `--steps`), m = ceil(encoder tokens / x). No encoder could do better on these chunks
               than vectors fitted to them one by one: the ceiling of ARC reconstruction for this decoder.

The layout is arctrain.model's own (collate + ARCModel.decoder_loss), so the numbers are comparable to the
trainer's `val/<decoder>/reconstruction/loss` and `loss_no_context`.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from arctrain.data.batch import Example, Memory, Text
from arctrain.model import ARCModel, collate, load_causal_lm
from arctrain.testing.corpus import is_heldout, read_corpus


def held_out_chunks(corpus: Path, words: int, limit: int) -> list[str]:
    chunks = []
    for record in read_corpus(corpus):
        if is_heldout(record["id"]):
            split = record["text"].split()
            chunks += [" ".join(split[i : i + words]) for i in range(0, len(split) - words + 1, words)]
    step = max(1, len(chunks) // limit)  # spread over the held-out documents
    return chunks[::step][:limit]


def batch_of(examples: list[Example], tok, factor: int = 1, enc_pad: int = 0):
    return collate(
        examples,
        pooling="mean",
        factor=factor,
        n_vectors=0,
        enc_pad_id=enc_pad,
        dec_pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
    )


def loss_of(decoder, batch) -> float:
    with torch.no_grad():
        embeds = decoder.get_input_embeddings()(batch.dec_ids)
        return ARCModel.decoder_loss(decoder, embeds, batch).loss.item()


def free_vector_loss(decoder, tok, enc_ids: list[list[int]], ids: list[list[int]], factor: int, steps: int) -> float:
    """Reconstruction loss with the memory and <Rec> vectors fitted to these chunks directly."""
    batch = batch_of([Example([Memory([e], "rec"), Text(t, loss=True)]) for e, t in zip(enc_ids, ids)], tok, factor)
    tokens = decoder.get_input_embeddings()(batch.dec_ids).detach()
    slot = (batch.dec_slot >= 0).unsqueeze(-1)
    scale = tokens.norm(dim=-1).mean() / tokens.shape[-1] ** 0.5  # start at the size of a token embedding
    free = torch.nn.Parameter(torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0)) * scale)
    optimizer = torch.optim.Adam([free], lr=0.03)
    for _ in range(steps):
        loss = ARCModel.decoder_loss(decoder, torch.where(slot, free, tokens), batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return ARCModel.decoder_loss(decoder, torch.where(slot, free, tokens), batch).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("artifacts/tiny"), help="make-tiny-models output")
    parser.add_argument("--decoders", nargs="+", default=["llama", "mistral"], help="names under --models, or NAME=DIR")
    parser.add_argument("--factors", nargs="+", type=int, default=[4, 1], help="free-vector compression factors")
    parser.add_argument("--words", type=int, default=8, help="words per chunk (the demo's 16-token segments)")
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps of the free vectors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chunks = held_out_chunks(args.models / "corpus.jsonl", args.words, args.texts)
    enc_tok = AutoTokenizer.from_pretrained(args.models / "encoder")
    enc_ids = [enc_tok(c, add_special_tokens=False).input_ids for c in chunks]
    print(f"{len(chunks)} held-out chunks of {args.words} words, {args.models}")
    free = [f"free_x{f}" for f in args.factors]
    print(f"{'decoder':8} {'no context':>10} {'verbatim':>15}" + "".join(f"{k.replace('_', ' '):>16}" for k in free))
    results = {}
    for entry in args.decoders:
        name, _, path = entry.partition("=")
        path = Path(path) if path else args.models / name
        tok = AutoTokenizer.from_pretrained(path)
        decoder = load_causal_lm(path, torch.float32).eval().requires_grad_(False)  # packed attention
        ids = [tok(c, add_special_tokens=False).input_ids for c in chunks]
        row = {
            "no_context": loss_of(decoder, batch_of([Example([Text(t, loss=True)]) for t in ids], tok)),
            "verbatim": loss_of(decoder, batch_of([Example([Text(t), Text(t, loss=True)]) for t in ids], tok)),
            **{f"free_x{f}": free_vector_loss(decoder, tok, enc_ids, ids, f, args.steps) for f in args.factors},
        }
        base = row["no_context"]
        cells = [f"{row[k]:.3f} ({row[k] / base:.2f}x)" for k in ("verbatim", *free)]
        print(f"{name:8} {base:>10.3f} {cells[0]:>15}" + "".join(f" {c:>15}" for c in cells[1:]), flush=True)
        results[name] = row
    print(json.dumps(results))


if __name__ == "__main__":
    main()
