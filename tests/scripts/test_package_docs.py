"""scripts/package_docs.py: the demo's other real text, installed distributions' READMEs cut at paragraphs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("package_docs", REPO / "scripts/package_docs.py")
package_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package_docs)


def test_documents_are_whole_paragraphs_and_lose_no_text():
    paragraphs = [f"paragraph {k} " + "word " * (k * 7 % 40) for k in range(30)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    docs = package_docs.paragraphs_in_documents(text, 300)
    assert "\n\n".join(docs) == text  # cut only between paragraphs, nothing dropped or reordered
    assert len(docs) > 3 and all(len(d) >= 300 for d in docs[:-1])
    assert all(len(d) < 300 + 250 for d in docs)  # a document ends at the paragraph that reaches the size


def test_the_command_writes_jsonl_with_unique_ids(tmp_path):
    out = tmp_path / "docs.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/package_docs.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids) > 20 and all(r["text"].strip() for r in records)
    assert any(i.startswith("torch#") for i in ids)  # this environment's own distributions
    assert result.stdout.startswith(f"{len(records)} documents")
