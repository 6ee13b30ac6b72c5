"""A small QA file from held-out passages, built deterministically: the answers are spans of the passage.

    python scripts/make_qa.py --input artifacts/tiny/corpus.jsonl --out artifacts/qa_heldout.jsonl
    arctrain eval --model runs/smollm2_cpu/export --decoder artifacts/smollm2-135m --data artifacts/qa_heldout.jsonl

Documents are those `arc-data build --val-fraction` puts in the val split (the demo never trains on them), read the
way it reads them. Each gives one record: the passage is its first `--passage-words` words; the question quotes
five consecutive words of it and asks for the `--answer-words` words that follow, which no model knows without
the passage (closed book) and any reader of the passage can copy (open book); where they start comes from a hash of
the document id, so the file is the same on every machine.
"""

import argparse
import hashlib
import json
from pathlib import Path

from arctrain.report import heldout_texts

QUOTE = 5  # words quoted in the question


def qa_record(text: str, passage_words: int, answer_words: int) -> dict | None:
    words = text.split()
    if len(words) < passage_words:
        return None
    passage = words[:passage_words]
    last = passage_words - QUOTE - answer_words  # the quote's first word: the answer still fits in the passage
    start = int(hashlib.sha256(" ".join(passage).encode()).hexdigest()[:8], 16) % (last + 1)
    quote = " ".join(passage[start : start + QUOTE])
    answer = " ".join(passage[start + QUOTE : start + QUOTE + answer_words])
    question = f'Continue the quote from the document: "{quote}'
    return {"question": question, "answers": [answer], "passages": " ".join(passage)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", action="append", required=True, help="jsonl, jsonl.zst or parquet with 'text'")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="the shards' --val-fraction")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--passage-words", type=int, default=32)
    parser.add_argument("--answer-words", type=int, default=3)
    args = parser.parse_args()
    records = []
    for text in heldout_texts(args.input, args.val_fraction, limit=10 * args.limit):
        record = qa_record(text, args.passage_words, args.answer_words)
        if record is not None and len(records) < args.limit:
            records.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{len(records)} QA records -> {args.out}")


if __name__ == "__main__":
    main()
