"""QA records: arctrain's format and the released one (kyutai's ARC fine-tuning set), read into one shape.

    {"question": str, "answers": [str, ...], "passages": [str, ...] or str}                 arctrain (the eval format)
    {"question": str, "answer": str or [str, ...], "passage" or "passages": str or [str, ...],
     "instruction": str (optional)}                                                         the released files

`question` may be empty or missing (the released summarisation and paraphrase sets have none). An optional
`metric` ("em", the default: exact match and F1; "rougeL"; "bleu") says how `arctrain eval` scores a record.
Files are .jsonl, .jsonl.zst or .parquet (data_tools/inputs.py reads all three). A record that cannot be used
is a counted skip, warned about with its file:line; a file without any usable record is an error.

A source is "path", "path:weight" or "path:weight:shots" (the reference's `train_data` entries): several QA
sources are mixed by weight exactly as shard sources are (arctrain/data/sampling.py `SourceMixer`), and each
takes its few-shot examples from its own other records.
"""

import sys
from pathlib import Path

from data_tools.inputs import SUFFIXES, Tally, read_records

METRICS = ("em", "rougeL", "bleu")


def read_qa(path: str | Path, strict: bool = False) -> list[dict]:
    """The usable records of one file as {"question", "answers", "passages", "instruction", "metric"} (answers and
    passages always lists); bad records are counted skips (`strict`: the first one is an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.name.endswith(SUFFIXES):
        raise ValueError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    tally = Tally(strict=strict)
    records = []
    for where, raw in read_records(path, tally):
        record = qa_record(raw, where, tally)
        if record is not None:
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no usable QA records ({_skips(tally) or 'the file is empty'})")
    if tally.skipped:
        print(f"{path}: {len(records)} QA records read, skipped {_skips(tally)}", file=sys.stderr)
    return records


def _skips(tally: Tally) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(tally.skipped.items()))


def qa_record(raw: object, where: str, tally: Tally) -> dict | None:
    """One record in the common shape, or None after counting why it cannot be used."""
    if not isinstance(raw, dict):
        return tally.skip("not_an_object", where, type(raw).__name__)
    answers = raw["answers"] if raw.get("answers") is not None else raw.get("answer")  # a parquet row has both
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return tally.skip("invalid_answer", where, "'answer(s)' must be a string or a non-empty list of strings")
    key = "passages" if raw.get("passages") is not None else "passage"
    passages = raw.get(key)
    passages = [passages] if isinstance(passages, str) else passages
    if passages is None:
        return tally.skip("no_passage", where, "no 'passage' or 'passages'")
    if not isinstance(passages, list) or not all(isinstance(p, str) for p in passages):
        return tally.skip("invalid_passage", where, f"{key!r} must be a string or a list of strings")
    passages = [p for p in passages if p.strip()]
    if not passages:
        return tally.skip("no_passage", where, "no 'passage' or 'passages' text to compress")
    question = raw.get("question") or ""
    instruction = raw.get("instruction")
    metric = raw.get("metric") or "em"
    if not isinstance(question, str):
        return tally.skip("invalid_question", where, "'question' must be a string")
    if instruction is not None and not isinstance(instruction, str):
        return tally.skip("invalid_instruction", where, "'instruction' must be a string")
    if metric not in METRICS:
        return tally.skip("invalid_metric", where, f"'metric' {metric!r} is not one of {', '.join(METRICS)}")
    record = {
        "question": question.strip(),
        "answers": answers,
        "passages": passages,
        "instruction": instruction,
        "metric": metric,
    }
    doc_ids = raw.get("doc_ids")  # the passages' ids in a vector store (`arctrain eval --vectors`), one each
    if doc_ids is not None:
        doc_ids = [doc_ids] if isinstance(doc_ids, str) else doc_ids
        if not isinstance(doc_ids, list) or not all(isinstance(i, str) for i in doc_ids):
            return tally.skip("invalid_doc_ids", where, "'doc_ids' must be a string or a list of strings")
        record["doc_ids"] = doc_ids
    return record
