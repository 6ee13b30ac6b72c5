"""QA with compressed, full-text and no context, side by side; reconstruction quality; prefill cost.

    arctrain eval --model exported/tiny --decoder artifacts/tiny/llama --data qa.jsonl --shots 5 --out results.json
    arctrain eval ... --heldout heldout.jsonl        # also: token accuracy / loss of reconstructing held-out text
    arctrain eval ... --vectors store/               # compressed passages read from a vector store by "doc_ids"

`qa.jsonl` holds one record per line: {"question": str, "answers": [str, ...], "passages": [str, ...] or str}.
Each record is asked in three modes, greedy, the answer being the first non-blank line generated:

    compressed   Document: <compressed passages>\\nQuestion: q\\nAnswer:     (few-shot documents compressed too)
    open_book    Document: <passages as text>\\nQuestion: q\\nAnswer:
    closed_book  Question: q\\nAnswer:

preceded by `--shots` examples from the same file (the records after it, cyclically, never itself). Exact match
and F1 use SQuAD's normalisation (lower case, no punctuation, no articles, single spaces), best over the answers.
Prefill cost per mode, per question: decoder positions, FLOPs (arctrain/flops.py: 2N per token for the decoder, its
causal attention and the LM head at the last position, plus the encoder and projector for compressed contexts; N
excludes embedding tables) and measured time to the first token (compression included) of each batch, divided by
the batch's questions.

With `--vectors DIR` (a store made by `arctrain compress` with this export's encoder) each record also names its
documents, "doc_ids": [str, ...] or str, and the compressed mode reads their vectors from the store instead of
running the encoder (its time to first token then excludes the encoder and the store read); the other modes still
read "passages".
"""

import argparse
import json
import re
import string
from collections import Counter
from pathlib import Path

import torch

from arctrain.data.qa import qa_example, read_jsonl, read_qa
from arctrain.model import Example, Text

MODES = ("compressed", "open_book", "closed_book")


# --- SQuAD metrics ----------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers)


def _f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return float(pred == gold)  # both empty: 1; one empty: 0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


# --- data ---------------------------------------------------------------------------------------------------


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


def answer_line(generated: str) -> str:
    """The answer in a generation: its first non-blank line."""
    return generated.strip().split("\n")[0].strip()


# Prompts (qa_example) and QA records (read_qa) live in arctrain/data/qa.py: QA fine-tuning builds the same ones.


# --- cost ---------------------------------------------------------------------------------------------------


# FLOPs: arctrain/flops.py (FlopCounter.prefill), the model the training metrics use too.


# --- evaluation ---------------------------------------------------------------------------------------------


def evaluate_qa(arc, records: list[dict], shots: int, max_new_tokens: int, batch_size: int) -> dict:
    predictions = {mode: [] for mode in MODES}
    cost = {
        mode: {"decoder_tokens": 0, "encoder_tokens": 0, "flops": 0.0, "seconds_to_first_token": 0.0} for mode in MODES
    }
    for mode in MODES:
        for start in range(0, len(records), batch_size):
            idx = range(start, min(start + batch_size, len(records)))
            examples = [qa_example(arc, records, i, shots, mode) for i in idx]
            out = arc.generate(examples, max_new_tokens=max_new_tokens, stop_at_newline=True)
            predictions[mode] += [answer_line(t) for t in out.texts]
            c = cost[mode]
            c["decoder_tokens"] += sum(out.prompt_tokens)
            c["encoder_tokens"] += out.encoder_tokens
            c["flops"] += arc.flops.prefill(arc.name, out.stats)
            c["seconds_to_first_token"] += out.seconds_to_first_token
    n = len(records)
    summary = {}
    for mode in MODES:
        em = [exact_match(p, r["answers"]) for p, r in zip(predictions[mode], records, strict=True)]
        f1 = [f1_score(p, r["answers"]) for p, r in zip(predictions[mode], records, strict=True)]
        prefill = {k: v / n for k, v in cost[mode].items()}  # per question
        summary[mode] = {"exact_match": 100 * sum(em) / n, "f1": 100 * sum(f1) / n, "prefill": prefill}
    rows = [
        {"question": r["question"], "answers": r["answers"], "predictions": {m: predictions[m][i] for m in MODES}}
        for i, r in enumerate(records)
    ]
    return {"modes": summary, "records": rows}


@torch.no_grad()
def reconstruction(arc, texts: list[str], batch_size: int, max_segments: int) -> dict:
    """Token accuracy and loss of the decoder reproducing each compressed segment (<Rec>, teacher forcing)."""
    from arctrain.model import Memory

    examples = []
    for text in texts:
        for ids in arc.segments(text)[: max_segments - len(examples)]:
            target = arc.dec_tok.encode(arc.enc_tok.decode(ids), add_special_tokens=False)
            prefix = [arc.text(arc.prefix, first=True)] if arc.prefix else []
            examples.append(Example(prefix + [Memory([ids], "rec"), Text(target, loss=True)]))
    loss_sum, correct, total = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = arc.batch(examples[start : start + batch_size]).to(arc.device)
        embeds = arc.model.embed(batch, arc.name)  # (B, T, Dd)
        hidden = arc.decoder.base_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state[:, :-1]  # (B, T-1, Dd) position t predicts token t+1
        targets = batch.labels[:, 1:]  # (B, T-1)
        selected = targets != -100
        logits = arc.decoder.get_output_embeddings()(hidden[selected]).float()  # (N, V)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, targets[selected], reduction="sum"))
        correct += int((logits.argmax(-1) == targets[selected]).sum())
        total += batch.stats.targets
    return {
        "segments": len(examples),
        "tokens": total,
        "token_accuracy": correct / max(total, 1),
        "loss": loss_sum / max(total, 1),
    }


def table(result: dict) -> str:
    lines = [f"{'mode':<12} {'EM':>6} {'F1':>6} {'dec tok':>8} {'GFLOPs':>8} {'TTFT s':>8}"]
    for mode, m in result["modes"].items():
        p = m["prefill"]
        lines.append(
            f"{mode:<12} {m['exact_match']:6.1f} {m['f1']:6.1f} {p['decoder_tokens']:8.1f} "
            f"{p['flops'] / 1e9:8.3f} {p['seconds_to_first_token']:8.3f}"
        )
    if "reconstruction" in result:
        r = result["reconstruction"]
        lines.append(
            f"reconstruction: token accuracy {r['token_accuracy']:.3f}, loss {r['loss']:.3f} ({r['tokens']} tokens)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from arctrain.infer import add_context_args, add_runtime_args

    parser = argparse.ArgumentParser(prog="arctrain eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="exported model directory")
    parser.add_argument("--decoder", required=True, type=Path, help="the decoder's Hugging Face directory")
    parser.add_argument("--decoder-name", default=None)
    parser.add_argument("--data", required=True, type=Path, help="QA records, JSON lines")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    add_runtime_args(parser)  # --device, --dtype (default bf16: Llama 3.1 8B is 16 GB, on a GPU or a CPU)
    add_context_args(parser)  # --chunk-tokens, --max-chunks (long contexts)
    parser.add_argument("--heldout", type=Path, default=None, help="text records ({'text': ...}) for reconstruction")
    parser.add_argument("--heldout-segments", type=int, default=64, help="at most this many segments reconstructed")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--vectors", type=Path, default=None, help="a vector store: compressed passages by doc_ids")
    args = parser.parse_args(argv)
    if args.shots < 0 or args.max_new_tokens < 1 or args.batch_size < 1 or args.heldout_segments < 1:
        raise ValueError("--shots must be >= 0, --max-new-tokens, --batch-size and --heldout-segments >= 1")
    from arctrain.infer import check_context_args

    check_context_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    from arctrain.infer import ARCGenerator, context_note, runtime

    args = parse_args(argv or [])
    device, dtype = runtime(args)
    records = read_qa(args.data)
    heldout = [r["text"] for r in read_jsonl(args.heldout, {"text": (str,)})] if args.heldout else None
    store = None
    if args.vectors is not None:
        from arctrain.store import VectorStore

        store = VectorStore(args.vectors)
        check_doc_ids(records, store, args.data)
    chunking = dict(chunk_tokens=args.chunk_tokens, max_chunks=args.max_chunks)
    arc = ARCGenerator(args.model, args.decoder, args.decoder_name, dtype, device, vectors=store, **chunking)
    result = {"model": str(args.model), "decoder": arc.name, "data": str(args.data), "n": len(records)}
    result |= {"vectors": str(args.vectors)} if args.vectors else {}
    result |= {"shots": args.shots, "max_new_tokens": args.max_new_tokens}
    result |= evaluate_qa(arc, records, args.shots, args.max_new_tokens, args.batch_size)
    if heldout is not None:
        result["reconstruction"] = reconstruction(arc, heldout, args.batch_size, args.heldout_segments)
    result["context_cut"] = vars(arc.pieces.cut) | {"chunk_tokens": arc.pieces.chunker.chunk_tokens,
                                                    "max_chunks": arc.pieces.chunker.max_chunks}  # fmt: skip
    print(table(result))
    if (note := context_note(arc)) is not None:
        print(note)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
