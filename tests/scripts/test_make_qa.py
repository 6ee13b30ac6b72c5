"""scripts/make_qa.py: QA records from held-out passages whose answers are spans of the passage, the same every run."""

import subprocess
import sys
from pathlib import Path

from arctrain.data.qa import read_qa

REPO = Path(__file__).resolve().parents[2]


def test_answers_are_the_words_after_the_quote_and_the_file_is_deterministic(tiny_models, tmp_path):
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        cmd = [
            sys.executable,
            str(REPO / "scripts/make_qa.py"),
            "--input",
            str(tiny_models / "corpus.jsonl"),
            "--out",
            str(tmp_path / name),
            "--limit",
            "12",
        ]
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    records = read_qa(tmp_path / "a.jsonl")
    assert len(records) == 12
    for r in records:
        quote = r["question"].removeprefix('Continue the quote from the document: "')
        assert len(quote.split()) == 5
        words = r["passages"][0].split()
        assert len(words) == 32
        starts = [i for i in range(len(words) - 4) if " ".join(words[i : i + 5]) == quote]
        assert any(" ".join(words[i + 5 : i + 8]) == r["answers"][0] for i in starts), r


def test_training_split_records_in_the_released_format_share_no_document_with_the_heldout_ones(tiny_models, tmp_path):
    def make(name, *extra):
        cmd = [
            sys.executable,
            str(REPO / "scripts/make_qa.py"),
            "--input",
            str(tiny_models / "corpus.jsonl"),
            "--out",
            str(tmp_path / name),
            *extra,
        ]
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        return tmp_path / name

    train = make("train.jsonl", "--split", "train", "--format", "released", "--limit", "30")
    heldout = make("val.jsonl", "--per-doc", "3", "--limit", "12")
    assert '"answer": "' in train.read_text() and '"answers"' not in train.read_text()
    train_passages = {r["passages"][0] for r in read_qa(train)}
    val = read_qa(heldout)
    assert len(train_passages) == 30 and not train_passages & {r["passages"][0] for r in val}
    assert len({r["question"] for r in val}) == 12 and len({r["passages"][0] for r in val}) < 12  # several per doc
