"""arc-data end to end on the tiny real tokenizers: build, the shard contract, verify, merge, inspect."""

import hashlib
import json
import re
import shutil

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zstandard
from helpers import metaspace_tokenizer
from transformers import AutoTokenizer

from data_tools.cli import main
from data_tools.sample_format import members_v2
from data_tools.samples import Sample
from data_tools.shard_index import index_from_tar
from data_tools.shards import SplitWriter
from data_tools.tokenizer_id import tokenizer_hash
from data_tools.verify import read_shard

TOKENIZERS = ("encoder", "llama", "mistral")
KEY = re.compile(r"[0-9a-f]{16}-\d{5}")


def tok_args(models) -> list[str]:
    return [
        "--encoder-tokenizer",
        str(models / "encoder"),
        "--decoder",
        f"llama={models / 'llama'}",
        "--decoder",
        f"mistral={models / 'mistral'}",
    ]


def build(models, inputs, out, *extra) -> int:
    args = ["build", *[a for i in inputs for a in ("--input", str(i))], "--out", str(out), *tok_args(models)]
    return main([*args, "--no-progress", *extra])


@pytest.fixture(scope="module")
def corpus(tiny_models) -> list[dict]:
    return [json.loads(line) for line in (tiny_models / "corpus.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("in") / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus[:120]))
    return path


@pytest.fixture(scope="module")
def built(tiny_models, small_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    args = ("--segment-tokens", "48", "--val-fraction", "0.2", "--shard-size-mb", "0.2")
    assert build(tiny_models, [small_jsonl], out, *args) == 0
    return out


def unpacked(members: dict) -> tuple[dict, dict]:
    """(meta, {tokenizer: (ids, offsets)}) of a format-3 sample, read with msgpack and numpy as its layout says."""
    assert set(members) == {"mp"}  # one tar member per sample
    sample = msgpack.unpackb(members["mp"])
    tokens = sample.pop("tokens")
    return sample, {
        name: (np.frombuffer(t["ids"], t["dtype"]), np.frombuffer(t["offsets"], t["offsets_dtype"]))
        for name, t in tokens.items()
    }


def samples_of(out) -> list[tuple[str, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s for e in manifest["splits"].values() for shard in e["shards"] for s in read_shard(out / shard["name"])]


def test_manifest_follows_the_contract(built, tiny_models, small_jsonl):
    m = json.loads((built / "manifest.json").read_text())
    assert list(m) == [
        "format",
        "format_version",
        "tool_version",
        "segment_tokens",
        "window_segments",
        "val_fraction",
        "id_scope",
        "tokenizers",
        "splits",
        "sources",
        "docs",
    ]
    assert (m["format"], m["format_version"], m["tool_version"]) == ("arc-shards", 3, "0.1.0")
    assert (m["segment_tokens"], m["window_segments"], m["val_fraction"], m["id_scope"]) == (48, 4, 0.2, "file")
    for name in TOKENIZERS:
        entry = m["tokenizers"][name]
        assert entry["hash"] == tokenizer_hash(tiny_models / name)
        assert entry["dtype"] == "uint16" and entry["vocab_size"] == len(
            json.loads((tiny_models / name / "tokenizer.json").read_text())["model"]["vocab"]
        )
    assert m["docs"] == {"read": 120, "written": 120, "skipped": {}}
    assert m["sources"] == [{"path": str(small_jsonl), "bytes": small_jsonl.stat().st_size}]
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert shards and [s["name"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert m["splits"][split]["samples"] == sum(s["samples"] for s in shards)
        for shard in shards:
            data = (built / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert len(data) < 0.2 * 2**20 + 64 * 1024  # --shard-size-mb, give or take one sample
            index = (built / shard["index"]["name"]).read_bytes()
            assert shard["index"]["name"] == shard["name"].replace(".tar", ".idx.npy")
            assert shard["index"]["bytes"] == len(index)
            assert shard["index"]["sha256"] == hashlib.sha256(index).hexdigest()


def test_the_index_gives_every_member_where_tarfile_finds_it(built):
    """The offsets written at build time equal the tar's own headers, and seeking there reads each member."""
    from arctrain.data.shards import ShardReader, open_source

    source = open_source(built, "train", {})
    reader = ShardReader(dict(zip(source.shards, zip(source.sizes, source.indexes))), max_indexes=2)
    suffixes = [f"{name}.{part}.npy" for name in TOKENIZERS for part in ("ids", "offsets")]
    for path, n in zip(source.shards, source.sizes):
        index = np.load(path.replace(".tar", ".idx.npy"))
        assert np.array_equal(index, index_from_tar(path)) and len(index) == n and index.dtype.names == ("key", "mp")
        for i, (key, members) in enumerate(read_shard(path)):
            got_key, arrays = reader.read(path, i, suffixes)
            assert got_key == key
            _, tokens = unpacked(members)
            for name in TOKENIZERS:
                assert np.array_equal(arrays[f"{name}.ids.npy"], tokens[name][0])
                assert np.array_equal(arrays[f"{name}.offsets.npy"], tokens[name][1])
        assert len(reader.indexes) <= 2  # a bounded cache, however many shards are read
    assert len(source.shards) > 2


def test_samples_hold_segments_of_every_tokenizer(built, tiny_models, corpus, small_jsonl):
    texts = {r["id"]: r["text"] for r in corpus}
    # As the trainer loads them: ids must match what the decoders were trained with.
    tokenizers = {name: AutoTokenizer.from_pretrained(tiny_models / name) for name in TOKENIZERS}
    spans_by_doc: dict[str, list] = {}
    encoder_lengths = []
    for key, members in samples_of(built):
        meta, tokens = unpacked(members)
        scoped = f"{str(small_jsonl).removesuffix('.jsonl')}\0{meta['doc_id']}"  # --id-scope file: id within its file
        assert KEY.fullmatch(key) and key.startswith(hashlib.sha256(scoped.encode()).hexdigest()[:16])
        assert key.endswith(f"-{meta['window']:05d}") and 1 <= meta["n_segments"] <= 5
        text = texts[meta["doc_id"]]
        spans_by_doc.setdefault(meta["doc_id"], []).append((meta["window"], meta["char_spans"]))
        for name, tok in tokenizers.items():
            ids, offsets = tokens[name]
            assert ids.dtype == np.uint16 and len(offsets) == meta["n_segments"] + 1
            assert offsets.dtype == np.min_scalar_type(len(ids))  # the smallest unsigned dtype that holds them
            for j, (start, end) in enumerate(meta["char_spans"]):
                # Each segment is that tokenizer's encoding of the segment's text alone, no special tokens.
                expected = tok(text[start:end], add_special_tokens=False)["input_ids"]
                assert ids[offsets[j] : offsets[j + 1]].tolist() == expected
                if name == "encoder":
                    encoder_lengths.append(len(expected))
    assert set(spans_by_doc) == {r["id"] for r in corpus[:120]}
    for doc_id, windows in spans_by_doc.items():
        spans = [span for _, s in sorted(windows) for span in s]
        # Segments tile the document, and cut at word boundaries (just before whitespace) where they cut.
        assert spans[0][0] == 0 and spans[-1][1] == len(texts[doc_id])
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert [w for w, _ in sorted(windows)] == list(range(len(windows)))
    lengths = np.array(encoder_lengths)
    assert lengths.max() <= 48 + 2 and np.median(lengths) >= 40  # "about --segment-tokens"


def test_shards_read_with_plain_webdataset(built):
    manifest = json.loads((built / "manifest.json").read_text())
    urls = [str(built / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == manifest["splits"]["train"]["samples"]
    ours = dict(samples_of(built))
    for sample in samples:  # webdataset's own decoding of `.mp` (msgpack), then numpy on the bytes
        assert set(sample) == {"__key__", "__url__", "__local_path__", "mp"}
        meta, tokens = unpacked(ours[sample["__key__"]])
        assert {k: v for k, v in sample["mp"].items() if k != "tokens"} == meta and meta["n_segments"] >= 1
        for name, t in sample["mp"]["tokens"].items():
            assert np.frombuffer(t["ids"], t["dtype"]).tolist() == tokens[name][0].tolist()


def test_workers_give_byte_identical_shards(tiny_models, small_jsonl, tmp_path):
    args = ("--segment-tokens", "48", "--val-fraction", "0.2", "--shard-size-mb", "0.2")
    assert build(tiny_models, [small_jsonl], tmp_path / "w1", *args, "--workers", "1") == 0
    assert build(tiny_models, [small_jsonl], tmp_path / "w2", *args, "--workers", "2") == 0
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir()) and len(names) > 3
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_jsonl_zst_and_parquet_give_identical_samples(tiny_models, corpus, tmp_path):
    # 5,000 documents: the corpus's paragraphs, each with its own id.
    docs = [
        {"id": f"{r['id']}/{k}", "text": para, "source": r["source"]}
        for r in corpus
        for k, para in enumerate(r["text"].split("\n\n"))
        if para.strip()
    ][:5000]
    assert len(docs) == 5000
    lines = "".join(json.dumps(d) + "\n" for d in docs).encode()
    half = len(lines) // 2
    # Two zstd frames, to read across a frame boundary as concatenated .zst files have.
    zst = tmp_path / "docs.jsonl.zst"
    zst.write_bytes(zstandard.compress(lines[:half]) + zstandard.compress(lines[half:]))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(docs), parquet, row_group_size=1000)
    assert pq.ParquetFile(parquet).num_row_groups == 5
    assert build(tiny_models, [zst], tmp_path / "a", "--segment-tokens", "64") == 0
    assert build(tiny_models, [parquet], tmp_path / "b", "--segment-tokens", "64") == 0
    a, b = samples_of(tmp_path / "a"), samples_of(tmp_path / "b")
    assert len(a) >= 5000 and a == b
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["docs"] == {"read": 5000, "written": 5000, "skipped": {}}


def test_verify_passes_then_names_a_changed_shard(built, tmp_path, capsys):
    assert main(["verify", str(built)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "sha256" in err and "train-000000.tar" not in err
    # An index that points elsewhere, with its manifest hash updated to match: caught against the tar headers.
    copy = tmp_path / "copy2"
    shutil.copytree(built, copy)
    index_path = copy / "train-000000.idx.npy"
    index = np.load(index_path)
    index["mp"][1, 0] += 512
    np.save(index_path, index)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]["index"]
    entry["bytes"], entry["sha256"] = index_path.stat().st_size, hashlib.sha256(index_path.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "train-000000.tar: index train-000000.idx.npy: keys or member offsets differ" in err


def rewrite_member(directory, shard_name: str, i: int, data: bytes) -> None:
    """Replace sample i's `.mp` member of a shard with `data` (same length), the manifest's sha256 updated: a
    corruption the file checksum does not see."""
    shard = directory / shard_name
    offset, size = np.load(shard.with_name(shard_name.replace(".tar", ".idx.npy")))["mp"][i]
    assert len(data) == size
    tar = bytearray(shard.read_bytes())
    tar[offset : offset + size] = data
    shard.write_bytes(bytes(tar))
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = next(s for e in manifest["splits"].values() for s in e["shards"] if s["name"] == shard_name)
    entry["sha256"] = hashlib.sha256(tar).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_verify_catches_a_corrupt_sample_member(built, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    samples = read_shard(copy / "train-000000.tar")
    (key, members), (key2, members2) = next(samples), next(samples)
    samples.close()
    # Sample 0: valid MessagePack whose llama offsets are reversed (same bytes, so the tar stays intact).
    sample = msgpack.unpackb(members["mp"])
    sample["tokens"]["llama"]["offsets"] = sample["tokens"]["llama"]["offsets"][::-1]
    rewrite_member(copy, "train-000000.tar", 0, msgpack.packb(sample))
    # Sample 1: not MessagePack at all.
    rewrite_member(copy, "train-000000.tar", 1, b"\xc1" * len(members2["mp"]))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"train-000000.tar: sample {key}: llama offsets" in err and "inconsistent with" in err
    assert f"train-000000.tar: sample {key2}: not a format-3 sample member" in err
    assert "train-000001.tar" not in err


def to_format2(src, dst) -> None:
    """The shards of `src` rewritten as a format-2 build writes them (json + .npy per tokenizer, index files)."""
    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir()
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            start = int(shard["name"].split("-")[1].removesuffix(".tar"))
            writer = SplitWriter(dst, split, 1 << 40, start, list(TOKENIZERS))
            for key, members in read_shard(src / shard["name"]):
                meta, tokens = unpacked(members)
                counts = tuple(len(tokens[name][0]) for name in TOKENIZERS)
                writer.write(Sample({"__key__": key, **members_v2(meta, tokens)}, counts))
            (new,) = writer.close()
            assert new["samples"] == shard["samples"] and new["tokens"] == shard["tokens"]
            shard.update(new)
    manifest["format_version"] = 2
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_format2_shards_still_read_verify_and_inspect(built, tmp_path, capsys):
    from arctrain.data.shards import ShardReader, open_source

    to_format2(built, tmp_path / "v2")
    names = {p.name for p in (tmp_path / "v2").iterdir()}
    assert names == {p.name for p in built.iterdir()}
    _, members = next(read_shard(tmp_path / "v2" / "train-000000.tar"))
    assert set(members) == {"json"} | {f"{n}.{p}.npy" for n in TOKENIZERS for p in ("ids", "offsets")}
    assert main(["verify", str(tmp_path / "v2")]) == 0
    assert main(["inspect", str(tmp_path / "v2")]) == 0
    assert "arc-shards v2" in capsys.readouterr().out
    suffixes = [f"{name}.{part}.npy" for name in TOKENIZERS for part in ("ids", "offsets")]
    new, old = (open_source(d, "train", {}) for d in (built, tmp_path / "v2"))
    new_reader, old_reader = (ShardReader(dict(zip(s.shards, zip(s.sizes, s.indexes)))) for s in (new, old))
    for new_path, old_path, n in zip(new.shards, old.shards, new.sizes, strict=True):
        for i in range(0, n, 7):
            a, b = new_reader.read(new_path, i, suffixes), old_reader.read(old_path, i, suffixes)
            assert a[0] == b[0] and all(np.array_equal(a[1][s], b[1][s]) for s in suffixes)
            assert b[1]["llama.offsets.npy"].dtype == np.int64
    # A corrupt .npy member behind a matching checksum is still caught.
    shard = tmp_path / "v2" / "train-000000.tar"
    offset, size = np.load(tmp_path / "v2" / "train-000000.idx.npy")["llama.ids.npy"][0]
    tar = bytearray(shard.read_bytes())
    tar[offset : offset + 6] = b"garbag"
    shard.write_bytes(bytes(tar))
    manifest = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(tar).hexdigest()
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "v2")]) == 1
    assert "train-000000.tar: sample" in capsys.readouterr().err
    # One dataset, one layout: merging a format-2 part with a format-3 part is refused.
    assert main(["merge", "--out", str(tmp_path / "m"), str(built), str(tmp_path / "v2")]) == 2
    err = capsys.readouterr().err
    assert "format_version 2" in err and "rebuild the older part" in err and not (tmp_path / "m").exists()


def test_verify_checks_samples_behind_a_matching_checksum(built, tmp_path, capsys):
    """A manifest whose counts disagree with the shard is caught even though the file's sha256 matches."""
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] += 1
    manifest["splits"]["val"]["shards"][0]["tokens"]["mistral"] -= 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "train-000000.tar").unlink()
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "val-000000.tar" in err and "samples, manifest says" in err and "token counts" in err
    assert "train-000000.tar: missing" in err and "train-000001.tar" not in err


def test_inspect_prints_counts_statistics_and_decoded_text(built, corpus, capsys):
    capsys.readouterr()
    assert main(["inspect", str(built)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((built / "manifest.json").read_text())
    assert f"train: {manifest['splits']['train']['samples']} samples" in out
    for name in TOKENIZERS:
        assert re.search(rf"{name}: mean [\d.]+ tokens, min \d+, max \d+", out)
    decoded = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(("  encoder: ", "  llama: "))]
    assert len(decoded) == 2 and decoded[0] == decoded[1]  # every tokenizer decodes back to the same text
    assert any(eval(decoded[0]) in r["text"] for r in corpus)


def test_merge_combines_partial_builds(tiny_models, small_jsonl, tmp_path, capsys):
    lines = small_jsonl.read_text().splitlines(keepends=True)
    (tmp_path / "p0.jsonl").write_text("".join(lines[:60]))
    (tmp_path / "p1.jsonl").write_text("".join(lines[60:]))
    args = ("--segment-tokens", "48", "--val-fraction", "0.2")
    assert build(tiny_models, [tmp_path / "p0.jsonl"], tmp_path / "parts/0", *args) == 0
    assert build(tiny_models, [tmp_path / "p1.jsonl"], tmp_path / "parts/1", *args, "--start-shard", "1000") == 0
    assert main(["merge", "--out", str(tmp_path / "all"), str(tmp_path / "parts/0"), str(tmp_path / "parts/1")]) == 0
    merged = json.loads((tmp_path / "all" / "manifest.json").read_text())
    names = [s["name"] for s in merged["splits"]["train"]["shards"]]
    assert names == ["train-000000.tar", "train-001000.tar"]
    assert merged["docs"] == {"read": 120, "written": 120, "skipped": {}}
    assert [s["path"] for s in merged["sources"]] == [str(tmp_path / "p0.jsonl"), str(tmp_path / "p1.jsonl")]
    assert main(["verify", str(tmp_path / "all")]) == 0

    # Refusals: clashing shard names, other segment settings.
    assert build(tiny_models, [tmp_path / "p1.jsonl"], tmp_path / "parts/2", *args) == 0
    capsys.readouterr()
    assert main(["merge", "--out", str(tmp_path / "x"), str(tmp_path / "parts/0"), str(tmp_path / "parts/2")]) == 2
    assert "train-000000.tar is in both" in capsys.readouterr().err
    assert build(tiny_models, [tmp_path / "p1.jsonl"], tmp_path / "parts/3", "--segment-tokens", "32") == 0
    assert main(["merge", "--out", str(tmp_path / "y"), str(tmp_path / "parts/0"), str(tmp_path / "parts/3")]) == 2
    assert "segment_tokens = 32" in capsys.readouterr().err
    # Overlapping inputs: documents 50-59 are in both parts, with one id space for all files.
    (tmp_path / "p4.jsonl").write_text("".join(lines[50:]))
    args = (*args, "--id-scope", "global")
    assert build(tiny_models, [tmp_path / "p0.jsonl"], tmp_path / "parts/0g", *args) == 0
    assert build(tiny_models, [tmp_path / "p4.jsonl"], tmp_path / "parts/4", *args, "--start-shard", "2000") == 0
    capsys.readouterr()
    assert main(["merge", "--out", str(tmp_path / "z"), str(tmp_path / "parts/0g"), str(tmp_path / "parts/4")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is in both" in err and "parts/4/" in err and "exactly one part" in err
    assert not (tmp_path / "z").exists()
    # The same parts without index files (as format 1 had none): their keys are read from the tar headers.
    for part in ("parts/0g", "parts/4"):
        manifest = json.loads((tmp_path / part / "manifest.json").read_text())
        manifest["format_version"] = 1
        for shard in (s for e in manifest["splits"].values() for s in e["shards"]):
            (tmp_path / part / shard.pop("index")["name"]).unlink()
        (tmp_path / part / "manifest.json").write_text(json.dumps(manifest))
    assert main(["merge", "--out", str(tmp_path / "z"), str(tmp_path / "parts/0g"), str(tmp_path / "parts/4")]) == 2
    assert "is in both" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_merge_refuses_other_tokenizers(tiny_models, small_jsonl, tmp_path, capsys):
    assert build(tiny_models, [small_jsonl], tmp_path / "a") == 0
    swapped = [
        "build",
        "--input",
        str(small_jsonl),
        "--out",
        str(tmp_path / "b"),
        "--start-shard",
        "10",
        "--no-progress",
        "--encoder-tokenizer",
        str(tiny_models / "encoder"),
        "--decoder",
        f"llama={tiny_models / 'mistral'}",
        "--decoder",
        f"mistral={tiny_models / 'llama'}",
    ]
    assert main(swapped) == 0
    capsys.readouterr()
    assert main(["merge", "--out", str(tmp_path / "c"), str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "tokenizers" in capsys.readouterr().err and not (tmp_path / "c" / "manifest.json").exists()


def test_metaspace_decoder_segments_have_no_dummy_prefix(tiny_models, corpus, tmp_path):
    """Segments after a document's first are tokenized as they are in running text: wherever the decoder's
    encoding of the whole document has token boundaries at a segment's ends, the segment is exactly that slice.
    Encoded alone by the tokenizer itself, a segment starting with a newline would begin with a lone '▁'."""
    texts = [r["text"] for r in corpus[:200]]
    tok = metaspace_tokenizer(tmp_path / "meta", texts)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus[:60]))
    args = [
        "build",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--encoder-tokenizer",
        str(tiny_models / "encoder"),
        "--decoder",
        f"meta={tmp_path / 'meta'}",
        "--segment-tokens",
        "24",
    ]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizers"]["meta"]["dummy_prefix_stripped"] is True
    assert manifest["tokenizers"]["encoder"]["dummy_prefix_stripped"] is False
    texts = {r["id"]: r["text"] for r in corpus[:60]}
    checked = newline_starts = 0
    for _, members in samples_of(tmp_path / "out"):
        meta, tokens = unpacked(members)
        text = texts[meta["doc_id"]]
        whole = tok.encode(text, add_special_tokens=False)
        starts = {a: j for j, (a, _) in enumerate(whole.offsets)}
        starts[len(text)] = len(whole)
        ids, offsets = tokens["meta"]
        for j, (start, end) in enumerate(meta["char_spans"]):
            if start in starts and end in starts and start > 0:
                segment = ids[offsets[j] : offsets[j + 1]].tolist()
                assert segment == whole.ids[starts[start] : starts[end]], (text[start:end][:40], segment[:5])
                checked += 1
                if text[start] == "\n":
                    newline_starts += 1
                    assert tok.encode(text[start:end], add_special_tokens=False).tokens[0] == "▁"  # the bug fixed
    assert checked > 50 and newline_starts > 3, (checked, newline_starts)
