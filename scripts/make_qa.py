"""A small QA file from held-out passages, built deterministically: the answers are spans of the passage.

    python scripts/make_qa.py --input artifacts/tiny/corpus.jsonl --out artifacts/qa_heldout.jsonl
    python scripts/make_qa.py --input artifacts/tiny/corpus.jsonl --split train --format released --limit 400 \
        --out artifacts/qa_train.jsonl                            # fine-tuning records from the training documents
    arctrain eval --model runs/smollm2_cpu/export --decoder artifacts/smollm2-135m --data artifacts/qa_heldout.jsonl

Documents are those `arc-data build --val-fraction` puts in the val split (the demo never trains on them), read the
way it reads them, or with `--split train` those of the training split (QA fine-tuning data that shares no
document with the held-out file). `--format released` writes the released fine-tuning set's fields
({"question", "answer", "passage"}) instead of arctrain's ({"question", "answers", "passages"}). Each document
gives `--per-doc` records (default 1): the passage is its first `--passage-words` words; the question quotes five
consecutive words of it and asks for the `--answer-words` words that follow, which no model knows without the
passage (closed book) and any reader of the passage can copy (open book); where they start comes from a hash of
the passage (and k for its k-th record), so the file is the same on every machine.
"""

import argparse
import hashlib
import json
from pathlib import Path

from arctrain.inference.report import split_texts

QUOTE = 5  # words quoted in the question


def qa_record(text: str, passage_words: int, answer_words: int, released: bool = False, k: int = 0) -> dict | None:
    words = text.split()
    if len(words) < passage_words:
        return None
    passage = words[:passage_words]
    last = passage_words - QUOTE - answer_words  # the quote's first word: the answer still fits in the passage
    key = " ".join(passage) + (f"#{k}" if k else "")  # the k-th question of a document (k = 0: the first form)
    start = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (last + 1)
    quote = " ".join(passage[start : start + QUOTE])
    answer = " ".join(passage[start + QUOTE : start + QUOTE + answer_words])
    question = f'Continue the quote from the document: "{quote}'
    if released:
        return {"question": question, "answer": answer, "passage": " ".join(passage)}
    return {"question": question, "answers": [answer], "passages": " ".join(passage)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", action="append", required=True, help="jsonl, jsonl.zst or parquet with 'text'")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="the shards' --val-fraction")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--passage-words", type=int, default=32)
    parser.add_argument("--answer-words", type=int, default=3)
    parser.add_argument("--split", choices=["val", "train"], default="val", help="documents of this split")
    parser.add_argument("--format", choices=["arctrain", "released"], default="arctrain")
    parser.add_argument("--per-doc", type=int, default=1, help="questions per document (quotes from other places)")
    args = parser.parse_args()
    records = []
    for text in split_texts(args.input, args.val_fraction, limit=10 * args.limit, split=args.split):
        for k in range(args.per_doc):
            record = qa_record(text, args.passage_words, args.answer_words, args.format == "released", k)
            if record is not None and len(records) < args.limit and record not in records:
                records.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{len(records)} QA records -> {args.out}")


if __name__ == "__main__":
    main()
