"""One encoder, two real decoders of different families: what sharing costs, and adding a decoder later.

    arctrain fetch-model smollm2-135m --out artifacts/smollm2-135m
    arctrain fetch-model gemma3-270m --out artifacts/gemma3-270m
    python benchmarks/multi_decoder.py --run alone-smollm2 --steps 200 --save-encoder enc.pt --out alone-smollm2.json
    python benchmarks/multi_decoder.py --run alone-gemma --steps 200 --gemma-init aligned --out alone-gemma.json
    python benchmarks/multi_decoder.py --run shared --steps 200 --gemma-init aligned --out shared.json
    python benchmarks/multi_decoder.py --run frozen-gemma --steps 200 --init-encoder enc.pt --gemma-init aligned \
        --out frozen-gemma.json
    python benchmarks/multi_decoder.py --table alone-smollm2.json alone-gemma.json shared.json frozen-gemma.json

The encoder is SmolLM2-135M's first `--enc-layers` layers (bidirectional, mean-pooled queries, x4; its token
embeddings frozen), as in `make demo`; the decoders are SmolLM2-135M-Instruct (projector started at the identity:
the encoder is its own first layers) and Gemma 3 270M (projector at random, or with `--gemma-init aligned` at the
least-squares map into its scaled embedding space of arctrain/model/align.py, as `projector_init: aligned`). Only
reconstruction is trained, in a plain-PyTorch loop over arctrain's own model code (build_model, collate, ARCModel):
16-SmolLM2-token segments of the embedded corpus's training documents, each decoder reading the same text in its
own tokens. `--steps` counts steps per decoder:

- alone-smollm2 / alone-gemma: an encoder trained for one decoder only, `--steps` steps;
- shared: one encoder trained on both, the decoders alternating, 2 x `--steps` steps (the same steps per decoder);
- frozen-gemma: the encoder of an alone-smollm2 run (`--init-encoder`), frozen (`optim.encoder_lr=0`), and Gemma 3
  added: only its projector and special vectors train, `--steps` steps.

Every `--eval-every` steps per decoder the held-out documents give, per decoder, the reconstruction loss with the
compressed segment / the loss of the same tokens with no context (the ratio; lower is better, 1 = no use).
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoTokenizer

from arctrain.model import build_model, collate, pretraining_example
from arctrain.model.align import fit_aligned_map, token_targets
from arctrain.testing.corpus import is_heldout, read_corpus, write_corpus

RUNS = {
    "alone-smollm2": ("smollm2",),
    "alone-gemma": ("gemma",),
    "shared": ("smollm2", "gemma"),
    "frozen-gemma": ("gemma",),
}


def segment_pairs(corpus: Path, enc_tok, dec_toks: dict, length: int, heldout: bool) -> list[dict]:
    """Consecutive `length`-encoder-token pieces of every document of the split: the encoder ids and, per decoder,
    the same text in that decoder's tokens (the encoder's piece decoded, then tokenized by the decoder)."""
    out = []
    for record in read_corpus(corpus):
        if is_heldout(record["id"]) != heldout:
            continue
        ids = enc_tok(record["text"], add_special_tokens=False).input_ids
        for i in range(0, len(ids) - length + 1, length):
            text = enc_tok.decode(ids[i : i + length])
            pair = {"enc": ids[i : i + length]}
            for name, tok in dec_toks.items():
                pair[name] = tok(text, add_special_tokens=False).input_ids
            out.append(pair)
    return out


def batch_of(pairs: list[dict], decoder: str, enc_tok, dec_tok, factor: int):
    examples = [pretraining_example("reconstruction", [p["enc"]], [p[decoder]], 0) for p in pairs]
    return collate(
        examples,
        pooling="mean_pooled_queries",
        factor=factor,
        n_vectors=0,
        enc_pad_id=enc_tok.pad_token_id,
        dec_pad_id=dec_tok.pad_token_id,
        bos_id=dec_tok.bos_token_id,
        task="reconstruction",
        decoder=decoder,
    )


@torch.no_grad()
def mean_loss(model, batches: list, decoder: str, use_context: bool) -> float:
    total = n = 0.0
    for batch in batches:
        out = model(batch, decoder, use_context=use_context)
        total, n = total + out.loss.item() * out.n_tokens.item(), n + out.n_tokens.item()
    return total / n


def evaluate(model, val: dict[str, list], no_context: dict[str, float]) -> dict:
    """Per decoder: held-out reconstruction loss with the compressed segment, without (the frozen decoder alone:
    computed once), and their ratio."""
    model.eval()
    out = {}
    for name, batches in val.items():
        loss = mean_loss(model, batches, name, use_context=True)
        out[name] = {
            "loss": round(loss, 4),
            "no_context": round(no_context[name], 4),
            "ratio": round(loss / no_context[name], 4),
        }
    model.train()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", choices=sorted(RUNS))
    parser.add_argument("--smollm2", type=Path, default=Path("artifacts/smollm2-135m"), help="fetch-model output")
    parser.add_argument("--gemma", type=Path, default=Path("artifacts/gemma3-270m"), help="fetch-model output")
    parser.add_argument("--corpus", type=Path, help="JSON lines with id/text (default: the embedded corpus)")
    parser.add_argument("--enc-layers", type=int, default=4)
    parser.add_argument("--segment-tokens", type=int, default=16)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="steps per decoder")
    parser.add_argument("--encoder-lr", type=float, default=3e-4)
    parser.add_argument("--projector-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50, help="steps per decoder")
    parser.add_argument("--val-segments", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gemma-init",
        choices=("random", "aligned"),
        default="random",
        help="Gemma 3's projector: random, or the least-squares map fitted on --align-segments training segments",
    )
    parser.add_argument("--align-segments", type=int, default=512)
    parser.add_argument("--init-encoder", type=Path, help="frozen-gemma: the encoder of an alone-smollm2 run")
    parser.add_argument("--save-encoder", type=Path, help="save the trained encoder's state here")
    parser.add_argument("--out", type=Path, help="write the curve as JSON here")
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of these results and exit")
    parser.add_argument("--columns", type=int, nargs="+", help="with --table: only these step counts")
    args = parser.parse_args(argv)
    if not args.table and not args.run:
        parser.error("--run or --table is needed")
    if args.run == "frozen-gemma" and not args.init_encoder:
        parser.error("--run frozen-gemma needs --init-encoder (the encoder of an alone-smollm2 run)")
    return args


def build(args: argparse.Namespace, decoders: tuple[str, ...]):
    n_layers = AutoConfig.from_pretrained(args.smollm2).num_hidden_layers
    model_cfg = SimpleNamespace(
        encoder_path=str(args.smollm2),
        n_truncated_layers=n_layers - args.enc_layers,
        pooling="mean_pooled_queries",
        pooling_factor=args.factor,
        n_vectors=0,
        attn_implementation="packed",
        freeze_encoder_embeddings=True,
    )
    paths = {"smollm2": (args.smollm2, "identity"), "gemma": (args.gemma, "random")}
    dec_cfgs = [
        SimpleNamespace(name=name, path=str(paths[name][0]), projector_hidden=576, projector_init=paths[name][1])
        for name in decoders
    ]
    return build_model(model_cfg, dec_cfgs).train()


def init_aligned(model, train: list[dict], enc_tok, gemma_tok, args: argparse.Namespace) -> None:
    """Gemma 3's projector started at the least-squares map fitted on training segments (arctrain/model/align.py)."""
    sample = random.Random(args.seed + 1).sample(train, args.align_segments)  # not the training draws' generator
    chunks = [sample[i : i + 32] for i in range(0, len(sample), 32)]
    encs = [batch_of(chunk, "gemma", enc_tok, gemma_tok, args.factor).enc for chunk in chunks]
    targets = token_targets(enc_tok, gemma_tok, model.all_decoders["gemma"].get_input_embeddings())
    model.eval()
    model.projectors["gemma"].init_map(fit_aligned_map(model.encoder, encs, targets))
    model.train()


def train_curve(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    decoders = RUNS[args.run]
    enc_tok = AutoTokenizer.from_pretrained(args.smollm2)
    toks = {"smollm2": enc_tok, "gemma": AutoTokenizer.from_pretrained(args.gemma)}
    toks = {name: toks[name] for name in decoders}
    corpus = args.corpus
    if corpus is None:
        corpus = Path(tempfile.mkdtemp()) / "corpus.jsonl"
        write_corpus(corpus)
    train = segment_pairs(corpus, enc_tok, toks, args.segment_tokens, heldout=False)
    held = segment_pairs(corpus, enc_tok, toks, args.segment_tokens, heldout=True)
    held = held[:: max(1, len(held) // args.val_segments)][: args.val_segments]  # spread over the documents
    val = {
        name: [batch_of(held[i : i + 16], name, enc_tok, tok, args.factor) for i in range(0, len(held), 16)]
        for name, tok in toks.items()
    }
    model = build(args, decoders)
    frozen = args.run == "frozen-gemma"
    if frozen:
        model.encoder.load_state_dict(torch.load(args.init_encoder, weights_only=True))
        model.encoder.requires_grad_(False)  # encoder_lr=0: no encoder gradient is needed at all
    if "gemma" in decoders and args.gemma_init == "aligned":
        init_aligned(model, train, enc_tok, toks["gemma"], args)
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    projector = [*model.projectors.parameters(), *model.specials.parameters()]
    groups = [{"params": projector, "lr": args.projector_lr}]
    groups += [{"params": encoder, "lr": args.encoder_lr}] if encoder else []
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    total = args.steps * len(decoders)  # the warm-up counts steps per decoder, as --steps does
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup * len(decoders))))
    rng = random.Random(args.seed)
    no_context = {name: mean_loss(model, batches, name, use_context=False) for name, batches in val.items()}
    curve = [{"step": 0, "cpu_s": 0.0, **evaluate(model, val, no_context)}]
    print(json.dumps(curve[-1]), flush=True)
    cpu = 0.0
    for step in range(1, total + 1):
        start = time.process_time()
        name = decoders[(step - 1) % len(decoders)]  # alternating: every decoder gets --steps steps
        batch = batch_of(rng.sample(train, args.batch), name, enc_tok, toks[name], args.factor)
        model(batch, name).loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder + projector, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        cpu += time.process_time() - start
        per_decoder = step // len(decoders)
        if step % len(decoders) == 0 and (per_decoder % args.eval_every == 0 or step == total):
            curve.append({"step": per_decoder, "cpu_s": round(cpu, 1), **evaluate(model, val, no_context)})
            print(json.dumps(curve[-1]), flush=True)
    if args.save_encoder:
        torch.save(model.encoder.state_dict(), args.save_encoder)
    return curve


def table(paths: list[Path], columns: list[int] | None = None) -> str:
    """Ratio per decoder at every evaluated step count (or at `columns`), one row per (run, decoder); a run whose
    Gemma 3 projector started aligned is marked so."""
    results = [json.loads(p.read_text()) for p in paths]
    steps = columns or sorted({point["step"] for r in results for point in r["curve"]})
    lines = [
        "| run | decoder | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for r in results:
        by_step = {point["step"]: point for point in r["curve"]}
        for name in RUNS[r["args"]["run"]]:
            cells = [f"{by_step[s][name]['ratio']:.3f}" if s in by_step else "" for s in steps]
            run = r["args"]["run"] + (", aligned" if r["args"].get("gemma_init") == "aligned" else "")
            lines.append(f"| {run} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.table:
        print(table(args.table, args.columns))
        return
    curve = train_curve(args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curve": curve}) + "\n")


if __name__ == "__main__":
    main()
