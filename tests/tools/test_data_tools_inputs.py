"""arc-data on bad input: each case is a counted skip with a file:line warning, or a one-line error (exit 2)."""

import hashlib
import json
import subprocess
import sys

import msgpack
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools.build import is_val
from data_tools.cli import main
from data_tools.inputs import Fields, Tally, read_documents
from data_tools.verify import read_shard


def tok_args(models) -> list[str]:
    return ["--encoder-tokenizer", str(models / "encoder"), "--decoder", f"llama={models / 'llama'}"]


def build(models, out, *inputs, extra=()) -> int:
    args = ["build", *[a for i in inputs for a in ("--input", str(i))], "--out", str(out), *tok_args(models)]
    return main([*args, "--no-progress", *extra])


def docs() -> list[str]:
    return [json.dumps({"id": f"d{i}", "text": f"Document number {i} has a few words in it."}) for i in range(5)]


def manifest_docs(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["docs"]


def test_bad_records_are_counted_and_named(tiny_models, tmp_path, capsys):
    good = docs()
    lines = [
        good[0].encode(),
        b'{"id": "broken", "text": "no closing brace"',  # line 2: malformed JSON
        json.dumps({"id": "x", "body": "no text field"}).encode(),  # 3
        json.dumps({"id": "y", "text": "   \n\t "}).encode(),  # 4: whitespace only
        json.dumps({"id": "z", "text": ""}).encode(),  # 5: empty
        b'{"id": "bad-bytes", "text": "caf\xe9"}',  # 6: Latin-1, not UTF-8
        json.dumps({"id": "s", "text": "lone \ud800 surrogate"}).encode(),  # 7: valid JSON, not encodable
        json.dumps(["not", "an", "object"]).encode(),  # 8
        json.dumps({"id": "n", "text": 42}).encode(),  # 9
        good[1].encode(),
        good[1].encode(),  # 11: the same id again
        b"",  # a blank line is no document
        good[2].encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert build(tiny_models, tmp_path / "out", path) == 0
    captured = capsys.readouterr()
    expected = {
        "malformed_json": 1,
        "missing_text": 1,
        "empty_text": 2,
        "invalid_utf8": 2,
        "not_an_object": 1,
        "invalid_text": 1,
        "duplicate_id": 1,
    }
    assert manifest_docs(tmp_path / "out") == {"read": 12, "written": 3, "skipped": dict(sorted(expected.items()))}
    assert f"{path}:2: malformed_json" in captured.err and f"{path}:6: invalid_utf8" in captured.err
    assert "12 docs read, 3 written, 9 skipped" in captured.out  # the summary accounts for every document

    capsys.readouterr()
    assert build(tiny_models, tmp_path / "strict", path, extra=["--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:2: malformed_json" in err and "--strict" in err


def test_truncated_zst_keeps_complete_lines_and_counts_the_cut_record(tiny_models, tmp_path, capsys):
    # Poorly compressible lines, so the cut falls after several complete zstd blocks (128 KB each).
    words = [hashlib.sha256(str(i).encode()).hexdigest()[:8] for i in range(120_000)]
    lines = "".join(json.dumps({"id": i, "text": " ".join(words[i * 40 : i * 40 + 40])}) + "\n" for i in range(3000))
    lines = lines.encode()
    data = zstandard.ZstdCompressor().compress(lines)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    assert build(tiny_models, tmp_path / "out", path) == 0
    counted = manifest_docs(tmp_path / "out")
    assert counted["skipped"] == {"truncated_record": 1} and 1000 < counted["written"] < 2000
    assert counted["read"] == counted["written"] + 1
    assert f"{path}:{counted['written'] + 1}: truncated_record" in capsys.readouterr().err
    assert build(tiny_models, tmp_path / "strict", path, extra=["--strict"]) == 2


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_input", "no such file"),
        ("missing_glob", "no file matches"),
        ("parquet_without_column", "no column 'text' (columns: id, body)"),
        ("missing_tokenizer", "tokenizer directory not found"),
        ("bad_decoder_spec", "expected NAME=PATH"),
        ("bad_segment_tokens", "--segment-tokens 0: must be at least 1"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tiny_models, tmp_path, capsys, case, message):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(docs()) + "\n")
    out = tmp_path / "out"
    args = {
        "missing_input": ["--input", str(tmp_path / "nope.jsonl")],
        "missing_glob": ["--input", str(tmp_path / "nothing-*.jsonl")],
        "parquet_without_column": ["--input", str(tmp_path / "t.parquet")],
        "missing_tokenizer": ["--input", str(good), "--decoder", f"extra={tmp_path / 'no-such-tokenizer'}"],
        "bad_decoder_spec": ["--input", str(good), "--decoder", "llama"],
        "bad_segment_tokens": ["--input", str(good), "--segment-tokens", "0"],
    }[case]
    pq.write_table(pa.table({"id": ["a"], "body": ["text in the wrong column"]}), tmp_path / "t.parquet")
    capsys.readouterr()
    assert main(["build", "--out", str(out), *tok_args(tiny_models), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("arc-data build: error:") and message in err
    assert not (out / "manifest.json").exists()


def test_out_with_shards_is_refused_unless_overwrite(tiny_models, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(docs()) + "\n")
    assert build(tiny_models, tmp_path / "out", path) == 0
    before = (tmp_path / "out" / "train-000000.tar").read_bytes()
    (tmp_path / "out" / "train-000007.tar").write_bytes(b"stale")
    capsys.readouterr()
    assert build(tiny_models, tmp_path / "out", path) == 2
    assert "already holds train-000000.tar" in capsys.readouterr().err
    assert build(tiny_models, tmp_path / "out", path, extra=["--overwrite"]) == 0
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == before
    assert not (tmp_path / "out" / "train-000007.tar").exists()  # stale shards of the old build are gone


def test_documents_without_ids_are_keyed_by_content_and_split_stably(tmp_path):
    path = tmp_path / "noid.jsonl"
    texts = [f"text number {i}" for i in range(2000)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    found = list(read_documents([path], Fields(), Tally()))
    assert found[0].doc_id == "sha256:" + hashlib.sha256(texts[0].encode()).hexdigest()
    val = {d.doc_id for d in found if is_val(d.digest, 0.1)}
    assert 120 < len(val) < 280  # about 10%
    # More data later: the documents already there keep their split.
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [f"new {i}" for i in range(500)] + texts))
    again = {d.doc_id for d in read_documents([path], Fields(), Tally()) if is_val(d.digest, 0.1)}
    assert val <= again


RSS_SCRIPT = """
import resource, sys
from data_tools.cli import main
assert main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_five_million_character_document_in_bounded_memory(tiny_models, tmp_path):
    """Peak RSS of a build of one 5M-character document minus that of a one-line document. Encoding the document
    in one call would take ~800 MB for one tokenizer alone; chunked, the whole build stays within a few copies
    of the text (the JSON line, its decoded form and the parsed text exist together while it is parsed)."""
    corpus = [json.loads(line)["text"] for line in (tiny_models / "corpus.jsonl").read_text().splitlines()]
    text = ("\n\n".join(corpus) * 4)[:5_000_000]
    assert len(text) == 5_000_000 and not text.isascii()
    text_bytes = sys.getsizeof(text)  # 2 bytes per character here (UCS-2)
    (tmp_path / "big.jsonl").write_text(json.dumps({"id": "big", "text": text}) + "\n")
    (tmp_path / "small.jsonl").write_text(json.dumps({"id": "small", "text": corpus[0]}) + "\n")
    del text, corpus
    peaks = {}
    for name in ("small", "big"):
        args = ["build", "--input", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / name), "--no-progress"]
        args += tok_args(tiny_models)
        run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True, check=True)
        peaks[name] = int(run.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] > 1000
    assert peaks["big"] - peaks["small"] < 5 * text_bytes, (peaks, text_bytes)


def test_ids_are_scoped_by_file_so_per_file_ids_keep_every_document(tiny_models, tmp_path, capsys):
    """Two files with ids 0..N each: by default both files' documents are kept (also through an array job's
    parts and merge); with --id-scope global the second file's are counted duplicates, in summary and manifest."""
    files = []
    for f in range(2):
        files.append(tmp_path / f"part{f}.jsonl")
        lines = [json.dumps({"id": i, "text": f"File {f} document {i} says something."}) for i in range(40)]
        files[-1].write_text("\n".join(lines) + "\n")
    args = ["--val-fraction", "0.3"]
    assert build(tiny_models, tmp_path / "file", *files, extra=args) == 0
    assert manifest_docs(tmp_path / "file") == {"read": 80, "written": 80, "skipped": {}}
    assert build(tiny_models, tmp_path / "p0", files[0], extra=args) == 0
    assert build(tiny_models, tmp_path / "p1", files[1], extra=[*args, "--start-shard", "100"]) == 0
    assert main(["merge", "--out", str(tmp_path / "merged"), str(tmp_path / "p0"), str(tmp_path / "p1")]) == 0

    def val_docs(out) -> set[tuple[str, str]]:
        manifest = json.loads((out / "manifest.json").read_text())
        shards = manifest["splits"]["val"]["shards"]
        samples = [msgpack.unpackb(members["mp"]) for s in shards for _, members in read_shard(out / s["name"])]
        return {(m["source"], m["doc_id"]) for m in samples}

    # The split is a function of (file, id): the same documents are val in one build and in the merged parts.
    assert val_docs(tmp_path / "file") == val_docs(tmp_path / "merged")
    assert {source for source, _ in val_docs(tmp_path / "file")} == {"part0.jsonl", "part1.jsonl"}
    capsys.readouterr()
    assert build(tiny_models, tmp_path / "global", *files, extra=[*args, "--id-scope", "global"]) == 0
    out = capsys.readouterr()
    assert manifest_docs(tmp_path / "global") == {"read": 80, "written": 40, "skipped": {"duplicate_id": 40}}
    assert "40 skipped (duplicate_id 40)" in out.out and "skipped document '0': duplicate_id" in out.err
    assert json.loads((tmp_path / "global" / "manifest.json").read_text())["id_scope"] == "global"
