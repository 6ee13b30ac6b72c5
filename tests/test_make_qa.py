"""scripts/make_qa.py: QA records from held-out passages whose answers are spans of the passage, the same every run."""

import subprocess
import sys
from pathlib import Path

from arctrain.data.qa import read_qa

REPO = Path(__file__).resolve().parents[1]


def test_answers_are_the_words_after_the_quote_and_the_file_is_deterministic(tiny_models, tmp_path):
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        cmd = [sys.executable, str(REPO / "scripts/make_qa.py"), "--input", str(tiny_models / "corpus.jsonl"),
               "--out", str(tmp_path / name), "--limit", "12"]  # fmt: skip
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
