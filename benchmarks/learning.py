"""How fast does a real decoder learn to read compressed context? (Not a test: a curve, see docs/benchmarks.md.)

    arctrain fetch-model smollm2-135m --out artifacts/smollm2-135m
    OMP_NUM_THREADS=1 python benchmarks/learning.py --model artifacts/smollm2-135m --steps 400 --out learning.json

Encoder and decoder are both SmolLM2-135M: the encoder is its first `--enc-layers` layers (arctrain's
ARCEncoder: bidirectional, mean-pooled queries in the last kept layer, x`--factor`), the decoder the whole frozen
model. Only reconstruction is trained (segment of `--segment-tokens` tokens -> vectors -> <Rec> -> the segment),
in a plain-PyTorch loop over arctrain's own model code (build_model, collate, ARCModel), on the training documents
of the embedded corpus; every `--eval-every` steps the held-out documents give:

- ratio:    reconstruction loss with the compressed segment / loss of the same tokens with no context;
- accuracy: greedy token accuracy of the reconstruction (teacher forcing);

against steps and process CPU seconds. `--projector-init identity` starts the projector at the identity map
(the encoder is the decoder's own first layers: they share its residual space; `decoders.N.projector_init`).
"""

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoTokenizer

from arctrain.model import build_model, collate, pretraining_example
from arctrain.testing.corpus import is_heldout, read_corpus, write_corpus


def segments(corpus: Path, tok, length: int, heldout: bool) -> list[list[int]]:
    """Consecutive `length`-token pieces of every document of the (training or held-out) split."""
    out = []
    for record in read_corpus(corpus):
        if is_heldout(record["id"]) == heldout:
            ids = tok(record["text"], add_special_tokens=False).input_ids
            out += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return out


def batch_of(segs: list[list[int]], tok, factor: int):
    examples = [pretraining_example("reconstruction", [s], [s], 0) for s in segs]
    return collate(
        examples,
        pooling="mean_pooled_queries",
        factor=factor,
        n_vectors=0,
        enc_pad_id=tok.pad_token_id,
        dec_pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        task="reconstruction",
        decoder="smollm2",
    )


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Held-out reconstruction: loss with / without the compressed segment, and greedy token accuracy."""
    model.eval()
    loss, base, correct, total = 0.0, 0.0, 0, 0
    decoder = model.decoders["smollm2"]
    for batch in batches:
        hidden = model.decoder_hidden(decoder, model.embed(batch, "smollm2"), batch)[0]  # (N_dec, D) packed rows
        targets = batch.labels[0, batch.target_index + 1]  # (N_t,)
        logits = decoder.get_output_embeddings()(hidden[batch.target_index]).float()  # (N_t, V)
        n = len(targets)
        loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        base += model(batch, "smollm2", use_context=False).loss.item() * n
        total += n
    model.train()
    return {"loss": loss / total, "no_context": base / total, "ratio": loss / base, "accuracy": correct / total}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/smollm2-135m"), help="fetch-model output")
    parser.add_argument("--corpus", type=Path, help="JSON lines with id/text (default: the embedded corpus)")
    parser.add_argument("--enc-layers", type=int, default=4, help="the encoder is the first K decoder layers")
    parser.add_argument("--segment-tokens", type=int, default=16)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--encoder-lr", type=float, default=3e-4)
    parser.add_argument("--projector-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--decay", choices=["cosine", "constant"], default="constant")
    parser.add_argument("--train-embeddings", action="store_true", help="train the encoder's token embeddings too")
    parser.add_argument("--projector-init", choices=["random", "identity"], default="identity")
    parser.add_argument("--projector-hidden", type=int, default=576)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-segments", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the curve as JSON here")
    return parser.parse_args(argv)


def train_curve(args: argparse.Namespace) -> list[dict]:
    """Train the recipe `args` describes; the held-out evaluation at step 0 and every `eval_every` steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    corpus = args.corpus
    if corpus is None:
        corpus = Path(tempfile.mkdtemp()) / "corpus.jsonl"
        write_corpus(corpus)
    train = segments(corpus, tok, args.segment_tokens, heldout=False)
    held = segments(corpus, tok, args.segment_tokens, heldout=True)
    held = held[:: max(1, len(held) // args.val_segments)][: args.val_segments]  # spread over the documents
    val = [batch_of(held[i : i + 16], tok, args.factor) for i in range(0, len(held), 16)]

    n_layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    model_cfg = SimpleNamespace(
        encoder_path=str(args.model),
        n_truncated_layers=n_layers - args.enc_layers,
        pooling="mean_pooled_queries",
        pooling_factor=args.factor,
        n_vectors=0,
        attn_implementation="packed",
        freeze_encoder_embeddings=not args.train_embeddings,
    )
    dec_cfg = SimpleNamespace(
        name="smollm2",
        path=str(args.model),
        projector_hidden=args.projector_hidden,
        prefix="",
        projector_init=args.projector_init,
    )
    model = build_model(model_cfg, [dec_cfg]).train()
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    projector = [*model.projectors.parameters(), *model.specials.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": encoder, "lr": args.encoder_lr}, {"params": projector, "lr": args.projector_lr}],
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.decay == "constant":
            return 1.0
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    n_trainable = sum(p.numel() for p in encoder + projector)
    print(f"{len(train)} train / {len(held)} held-out {args.segment_tokens}-token segments; {n_trainable:,} trainable")
    rng = random.Random(args.seed)
    curve = [{"step": 0, "cpu_s": 0.0, **evaluate(model, val)}]
    print(json.dumps(curve[-1]), flush=True)
    cpu = 0.0
    for step in range(1, args.steps + 1):
        start = time.process_time()
        batch = batch_of(rng.sample(train, args.batch), tok, args.factor)
        model(batch, "smollm2").loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder + projector, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        cpu += time.process_time() - start
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "cpu_s": round(cpu, 1), **evaluate(model, val)})
            print(json.dumps(curve[-1]), flush=True)
    return curve


def main() -> None:
    args = parse_args()
    curve = train_curve(args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curve": curve}) + "\n")


if __name__ == "__main__":
    main()
