"""QA with compressed, full-text and no context, side by side, per dataset; reconstruction quality; prefill cost.

    arctrain eval --model exported/tiny --decoder artifacts/tiny/llama --data nq.jsonl tqa.jsonl --shots 5 \
        --out results.json
    arctrain eval ... --heldout heldout.jsonl        # also: token accuracy / loss of reconstructing held-out text
    arctrain eval ... --vectors store/               # compressed passages read from a vector store by "doc_ids"

Each `--data` file is a dataset (its name: the file name without suffix) of QA records in arctrain's or the
released format (arctrain/data/qa_records.py; .jsonl, .jsonl.zst or .parquet). Its first `--shots` records are
the fixed in-context examples of every question (their documents compressed too in the compressed mode), the
rest are asked in three modes, greedy, with the prompt of QA training (arctrain/data/prompt.py: the decoder's chat
template when it has one, else the plain layout):

    compressed   Document: <compressed passages>\nQuestion: q\nAnswer:
    open_book    Document: <passages as text>\nQuestion: q\nAnswer:
    closed_book  Question: q\nAnswer:

Generation stops at the decoder's EOS and at "\\n\\n"; the answer is the output cut at "\\n\\n", stripped (the
reference's `truncate_line`). Scores per dataset and mode (arctrain/inference/qa_metrics.py): exact match and F1 (SQuAD
normalisation), approximate match, answer in output, and ROUGE-L / BLEU over the records that ask for them, beside
the share of contexts that contain an answer. Prefill cost per question: decoder positions, FLOPs
(arctrain/model/flops.py) and measured time to the first token (compression included).

Joint contexts are cut at `--context-tokens`; in segments, a context is cut into chunks of `--chunk-tokens` and at
most `--max-chunks` are kept (long contexts); what is cut is reported (JSON `context_cut`) and a note printed.
Unset, `--context`, `--context-tokens`, `--chunk-tokens` and `--max-chunks` are what the model's QA fine-tuning used
(the export's `qa_context`); for other exports: joint, 2048 tokens.

With `--vectors DIR` (a store made by `arctrain compress` with this export's encoder) each record also names its
documents, "doc_ids": [str, ...] or str, one per passage, and the compressed mode reads their vectors from the
store instead of running the encoder (its time to first token then excludes the encoder and the store read); the
other modes still read "passages".
"""

import argparse
import json
from pathlib import Path

import torch

from arctrain.config.schema import QASource
from arctrain.data.prompt import MODES, qa_prompt, qa_turn
from arctrain.data.qa_records import read_qa
from arctrain.inference.generate import (
    ARCGenerator,
    add_context_args,
    add_runtime_args,
    check_context_args,
    context_flags,
    context_note,
    runtime,
)
from arctrain.inference.qa_metrics import (
    answer_in,
    approx_match,
    bleu,
    exact_match,
    f1_score,
    normalize_answer,
    rouge_l,
)
from arctrain.inference.store import VectorStore
from arctrain.model import Example, Memory, Text
from data_tools.inputs import Fields, Tally, expand_inputs, read_documents

__all__ = ["MODES", "answer_text", "evaluate_qa", "exact_match", "f1_score", "normalize_answer"]
STOP = "\n\n"
# How a context is cut when neither a flag nor the export (a QA fine-tuning run's `qa_context`) says: jointly, as QA
# fine-tuning does by default (arctrain.inference.generate.context_options).
EVAL_CONTEXT = {"context": "joint", "max_chunks": 0, "context_tokens": 2048}


def answer_text(generated: str) -> str:
    """The answer in a generation: the text before its first blank line, stripped (the reference's cut)."""
    return generated.split(STOP)[0].strip()


def check_doc_ids(records: list[dict], store, path: Path) -> None:
    """With a vector store every record names its documents ("doc_ids"), and each one is in the store."""
    for n, r in enumerate(records, 1):
        ids = r.get("doc_ids")
        ids = [ids] if isinstance(ids, str) else ids
        if not ids or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: record {n}: 'doc_ids' (a string or a list of strings) is needed with --vectors")
        missing = [i for i in ids if i not in store]
        if missing:
            raise ValueError(f"{path}: record {n}: document {missing[0]!r} is not in the --vectors store {store.root}")
        r["doc_ids"] = ids


def shots_and_questions(records: list[dict], shots: int, max_passages: int) -> tuple[list, list[dict]]:
    """The first `shots` records as fixed in-context turns (first answer, first passages); the rest are asked."""
    if len(records) <= shots:
        raise ValueError(f"{len(records)} records: --shots {shots} leaves none to ask")
    turns = [qa_turn(r, r["passages"][:max_passages], r["answers"][0]) for r in records[:shots]]
    return turns, records[shots:]


def evaluate_qa(
    arc,
    records: list[dict],
    shots: int,
    max_new_tokens: int,
    batch_size: int,
    max_passages: int = 1,
    modes: tuple[str, ...] = MODES,
) -> dict:
    shot_turns, asked = shots_and_questions(records, shots, max_passages)
    predictions = {mode: [] for mode in modes}
    cost = {
        mode: {"decoder_tokens": 0, "encoder_tokens": 0, "flops": 0.0, "seconds_to_first_token": 0.0} for mode in modes
    }
    for mode in modes:
        for start in range(0, len(asked), batch_size):
            batch = asked[start : start + batch_size]
            examples = [
                qa_prompt(arc, arc.chat, shot_turns, qa_turn(r, r["passages"][:max_passages]), mode) for r in batch
            ]
            out = arc.generate(examples, max_new_tokens=max_new_tokens, stop_text=STOP)
            predictions[mode] += [answer_text(t) for t in out.texts]
            c = cost[mode]
            c["decoder_tokens"] += sum(out.prompt_tokens)
            c["encoder_tokens"] += out.encoder_tokens
            c["flops"] += arc.flops.prefill(arc.name, out.stats)
            c["seconds_to_first_token"] += out.seconds_to_first_token
    n = len(asked)
    summary = {
        mode: {**scores(predictions[mode], asked), "prefill": {k: v / n for k, v in cost[mode].items()}}
        for mode in modes
    }
    rows = [
        {"question": r["question"], "answers": r["answers"], "predictions": {m: predictions[m][i] for m in modes}}
        for i, r in enumerate(asked)
    ]
    context = 100 * sum(answer_in(" ".join(r["passages"][:max_passages]), r["answers"]) for r in asked) / n
    return {"n": n, "shots": shots, "context_has_answer": context, "modes": summary, "records": rows}


def scores(predictions: list[str], records: list[dict]) -> dict:
    """Percentages over the records: EM, F1, approx match, answer in output over the "em" records; ROUGE-L and
    BLEU over those that ask for them (absent when none does)."""
    out = {}
    by_metric = {
        m: [(p, r["answers"]) for p, r in zip(predictions, records, strict=True) if r["metric"] == m]
        for m in ("em", "rougeL", "bleu")
    }
    if qa := by_metric["em"]:
        for name, fn in [
            ("exact_match", exact_match),
            ("f1", f1_score),
            ("approx_match", approx_match),
            ("answer_in_output", answer_in),
        ]:
            out[name] = 100 * sum(fn(p, a) for p, a in qa) / len(qa)
    if rouge := by_metric["rougeL"]:
        out["rougeL"] = 100 * sum(rouge_l(p, a) for p, a in rouge) / len(rouge)
    if pairs := by_metric["bleu"]:
        out["bleu"] = bleu([p for p, _ in pairs], [a for _, a in pairs])
    return out


@torch.no_grad()
def reconstruction(arc, texts: list[str], batch_size: int, max_segments: int) -> dict:
    """Token accuracy and loss of the decoder reproducing each compressed segment (<Rec>, teacher forcing)."""

    examples = []
    for text in texts:
        for ids in arc.segments(text)[: max_segments - len(examples)]:
            target = arc.dec_tok.encode(arc.enc_tok.decode(ids), add_special_tokens=False)
            prefix = [arc.text(arc.prefix, first=True)] if arc.prefix else []
            examples.append(Example(prefix + [Memory([ids], "rec"), Text(target, loss=True)]))
    loss_sum, correct, total = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch_loss, batch_correct, n = score_targets(arc, arc.batch(examples[start : start + batch_size]))
        loss_sum += batch_loss
        correct += batch_correct
        total += n
    return {
        "segments": len(examples),
        "tokens": total,
        "token_accuracy": correct / max(total, 1),
        "loss": loss_sum / max(total, 1),
    }


@torch.no_grad()
def score_targets(arc, batch) -> tuple[float, int, int]:
    """(summed cross-entropy, greedy hits, count) over the target tokens of a collated batch, with its memory."""
    batch = batch.to(arc.device)
    embeds = arc.model.embed(batch, arc.name)  # (1, N_dec, Dd) packed rows
    hidden = arc.model.decoder_hidden(arc.decoder, embeds, batch)[0]  # (N_dec, Dd) position p predicts p + 1
    targets = batch.labels[0, batch.target_index + 1]  # (N_t,)
    logits = arc.decoder.get_output_embeddings()(hidden[batch.target_index]).float()  # (N_t, V)
    loss = float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    return loss, int((logits.argmax(-1) == targets).sum()), len(targets)


def table(result: dict) -> str:
    lines = []
    for name, ds in result["datasets"].items():
        context = ds["context_has_answer"]
        lines.append(f"{name}: {ds['n']} questions, {ds['shots']} shots, answer in the context {context:.1f}%")
        lines.append(
            f"  {'mode':<12} {'EM':>6} {'F1':>6} {'approx':>6} {'in out':>6} {'ROUGE-L':>7} {'BLEU':>6} "
            f"{'dec tok':>8} {'GFLOPs':>8} {'TTFT s':>8}"
        )
        for mode, m in ds["modes"].items():
            p = m["prefill"]
            cells = [
                f"{m[k]:{w}.1f}" if k in m else " " * (w - 1) + "-"
                for k, w in [
                    ("exact_match", 6),
                    ("f1", 6),
                    ("approx_match", 6),
                    ("answer_in_output", 6),
                    ("rougeL", 7),
                    ("bleu", 6),
                ]
            ]
            lines.append(
                f"  {mode:<12} {' '.join(cells)} {p['decoder_tokens']:8.1f} {p['flops'] / 1e9:8.3f} "
                f"{p['seconds_to_first_token']:8.3f}"
            )
    if "reconstruction" in result:
        r = result["reconstruction"]
        lines.append(
            f"reconstruction: token accuracy {r['token_accuracy']:.3f}, loss {r['loss']:.3f} ({r['tokens']} tokens)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arctrain eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="exported model directory")
    parser.add_argument("--decoder", required=True, type=Path, help="the decoder's Hugging Face directory")
    parser.add_argument("--decoder-name", default=None)
    parser.add_argument("--data", required=True, type=Path, nargs="+", help="QA files, one dataset each")
    parser.add_argument("--shots", type=int, default=5, help="each dataset's first N records: the fixed examples")
    parser.add_argument("--max-passages", type=int, default=1, help="compress a record's first N passages")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    add_runtime_args(parser)  # --device, --dtype (default bf16: Llama 3.1 8B is 16 GB, on a GPU or a CPU)
    add_context_args(parser, EVAL_CONTEXT)  # --context, --context-tokens, --chunk-tokens, --max-chunks, --plain-prompt
    parser.add_argument("--heldout", type=Path, default=None, help="text records ({'text': ...}) for reconstruction")
    parser.add_argument("--heldout-segments", type=int, default=64, help="at most this many segments reconstructed")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--vectors", type=Path, default=None, help="a vector store: compressed passages by doc_ids")
    args = parser.parse_args(argv)
    if args.shots < 0 or min(args.max_new_tokens, args.batch_size, args.heldout_segments, args.max_passages) < 1:
        raise ValueError(
            "--shots must be >= 0; --max-new-tokens, --batch-size, --heldout-segments, --max-passages >= 1"
        )

    check_context_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv or [])
    device, dtype = runtime(args)
    datasets = {QASource(str(path)).name: read_qa(path) for path in args.data}
    heldout = None
    if args.heldout is not None:  # jsonl, jsonl.zst or parquet with a "text" field, as `arc-data build` reads them
        heldout = [d.text for d in read_documents(expand_inputs([str(args.heldout)]), Fields(), Tally())]
    store = None
    if args.vectors is not None:
        store = VectorStore(args.vectors)
        for path, records in zip(args.data, datasets.values(), strict=True):
            check_doc_ids(records, store, path)
    arc = ARCGenerator(
        args.model,
        args.decoder,
        args.decoder_name,
        dtype,
        device,
        vectors=store,
        fallback=EVAL_CONTEXT,
        **context_flags(args),
    )
    result = {"model": str(args.model), "decoder": arc.name, "chat_template": arc.chat is not None}
    result |= {"vectors": str(args.vectors)} if args.vectors else {}
    result |= {"shots": args.shots, "max_new_tokens": args.max_new_tokens, "context": arc.pieces.context}
    result["datasets"] = {}
    for name, records in datasets.items():
        result["datasets"][name] = evaluate_qa(
            arc, records, args.shots, args.max_new_tokens, args.batch_size, args.max_passages
        )
    if heldout is not None:
        result["reconstruction"] = reconstruction(arc, heldout, args.batch_size, args.heldout_segments)
    pieces = arc.pieces
    result["context_cut"] = vars(pieces.cut) | {
        "chunk_tokens": pieces.chunker.chunk_tokens,
        "max_chunks": pieces.chunker.max_chunks,
        "context_tokens": pieces.context_tokens,
    }
    print(table(result))
    if (note := context_note(arc)) is not None:
        print(note)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
