"""Product-quantized stores (faiss) and store integrity: `arctrain compress --dtype pq<M>/opq<M>`, `verify-store`."""

import hashlib
import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from arctrain.cli import main as arctrain
from arctrain.inference.generate import ARCGenerator
from arctrain.inference.store import VectorStore, doc_key
from arctrain.model import Memory
from arctrain.testing.corpus import read_corpus


@pytest.fixture(scope="module")
def docs(tiny_models) -> list[dict]:
    """40 documents of the corpus, cut to 1200 characters: more than 256 vectors (one codebook's centroids)."""
    return [{"id": r["id"], "text": r["text"][:1200]} for r in read_corpus(tiny_models / "corpus.jsonl")][:40]


@pytest.fixture(scope="module")
def inputs(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("pq_inputs") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def compress(exported, inputs, out, *args):
    arctrain(["compress", "--model", str(exported), "--input", str(inputs), "--out", str(out), "--no-progress", *args])
    return out


@pytest.fixture(scope="module")
def stores(exported, inputs, tmp_path_factory) -> dict:
    root, small = tmp_path_factory.mktemp("pq_stores"), ["--shard-size-mb", "0.01"]
    dtypes = ("fp32", "pq8", "opq8", "rq8", "pca48-pq8", "pca48-rq6")
    out = {d: compress(exported, inputs, root / d, "--dtype", d, *small) for d in dtypes}
    out["pq8_sampled"] = compress(exported, inputs, root / "pq8_sampled", "--dtype", "pq8", "--train-vectors", "300")
    return out


def stored_record(store_dir, doc_id) -> tuple:
    """(shard, start, end, index row) of a document's record, found with numpy in the index files (not the store's
    reader): the record is bytes start:end of the shard."""
    key = bytes.fromhex(doc_key(doc_id))
    for index_path in sorted(store_dir.glob("vectors-*.idx.npy")):
        index = np.load(index_path, allow_pickle=False)
        rows = [i for i, k in enumerate(index["key"]) if bytes(k) == key]
        if rows:
            shard = index_path.with_name(index_path.name.replace(".idx.npy", ".bin"))
            i = rows[0]
            end = int(index["offset"][i + 1]) if i + 1 < len(index) else shard.stat().st_size
            return shard, int(index["offset"][i]), end, index[i]
    raise KeyError(doc_id)


def stored_codes(store_dir, doc_id) -> np.ndarray:
    """A document's stored vectors array (codes for a codec's store), (N, W): the record's bytes after its tokens
    per segment (<u2), for an fp32 or a codec's store."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    shard, start, end, row = stored_record(store_dir, doc_id)
    element = "u1" if "codec" in manifest else "<f4"
    raw = shard.read_bytes()[start + 2 * int(row["segments"]) : end]
    return np.frombuffer(raw, element).reshape(int(row["vectors"]), -1)


@pytest.mark.parametrize(
    ("dtype", "factory"),
    [
        ("pq8", "PQ8x8"),
        ("opq8", "OPQ8,PQ8x8"),
        ("rq8", "RQ8x8"),
        ("pca48-pq8", "PCA48,PQ8x8"),
        ("pca48-rq6", "PCA48,RQ6x8"),
    ],
)
def test_pq_store_holds_the_faiss_codes_of_the_vectors_and_decodes_as_faiss_does(docs, stores, dtype, factory):
    manifest = json.loads((stores[dtype] / "manifest.json").read_text())
    codebook = stores[dtype] / manifest["codec"]["file"]
    assert manifest["codec"]["sha256"] == hashlib.sha256(codebook.read_bytes()).hexdigest()
    exact, store = VectorStore(stores["fp32"]), VectorStore(stores[dtype])
    assert manifest["codec"]["trained_on"] == manifest["vectors"] == exact.manifest["vectors"] > 256  # all: < 100k
    index = faiss.read_index(str(codebook))
    assert manifest["codec"]["factory"] == factory
    assert manifest["bytes_per_vector"] == index.sa_code_size() == int(factory.split("Q")[-1].split("x")[0])
    texts = sum(len(d["text"].encode()) for d in docs)
    assert manifest["text_bytes"] == texts and manifest["bytes_per_text_byte"] == manifest["bytes"] / texts
    for doc in docs[::7]:
        codes = stored_codes(stores[dtype], doc["id"])  # (N, 8) uint8
        fp32 = torch.cat(exact.get(doc["id"]).vectors).numpy()  # the encoder's vectors, (N, D)
        assert codes.dtype == np.uint8 and np.array_equal(codes, index.sa_encode(fp32))
        decoded = torch.cat(store.get(doc["id"]).vectors)
        assert torch.equal(decoded, torch.from_numpy(index.sa_decode(codes)))
        assert 0 < float((decoded - torch.from_numpy(fp32)).norm()) < float(torch.from_numpy(fp32).norm())


def test_the_codebook_is_trained_on_a_sample_of_the_size_asked(stores):
    manifest = json.loads((stores["pq8_sampled"] / "manifest.json").read_text())
    assert manifest["codec"]["trained_on"] == manifest["codec"]["train_vectors"] == 300 < manifest["vectors"]
    assert not (stores["pq8_sampled"] / ".staging").exists()


def test_compress_says_when_the_codebook_saw_every_vector(exported, inputs, tmp_path, capsys):
    compress(exported, inputs, tmp_path / "s", "--dtype", "pq4")
    assert "trained on all" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compress(exported, inputs, tmp_path / "t", "--dtype", "pq7")  # 7 does not divide the width
    assert "--dtype pq7: 7 sub-vectors must divide the coded width 96" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compress(exported, inputs, tmp_path / "u", "--dtype", "pca96-rq8")  # a PCA that keeps every dimension
    assert "--dtype pca96-rq8: pca96 must keep fewer dimensions than the stored width 96" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compress(exported, inputs, tmp_path / "v", "--dtype", "rq")
    assert "--dtype 'rq': not a store dtype" in capsys.readouterr().err


def test_generate_eval_and_vllm_prompts_read_a_pq_store(exported, tiny_models, docs, stores, tmp_path, capsys):
    """compress -> generate: the text of greedy decoding from faiss's decode of the stored codes."""
    index = faiss.read_index(str(stores["opq8"] / "codebook.faiss"))
    ids = [d["id"] for d in docs[:2]]
    gen = ["--model", str(exported), "--decoder", str(tiny_models / "llama"), "--prompt", "\nThe", "--dtype", "fp32"]
    capsys.readouterr()
    arctrain(["generate", *gen, "--max-new-tokens", "10", "--vectors", str(stores["opq8"]), "--doc-id", *ids])
    printed = capsys.readouterr().out
    arc = ARCGenerator(exported, tiny_models / "llama")
    counts = [VectorStore(stores["fp32"]).get(d).tokens for d in ids]  # segments per document
    for doc_id, tokens in zip(ids, counts, strict=True):
        vectors = torch.from_numpy(index.sa_decode(stored_codes(stores["opq8"], doc_id)))
        sizes = [len(v) for v in VectorStore(stores["fp32"]).get(doc_id).vectors]
        memory = Memory([], "cont", vectors=list(torch.split(vectors, sizes)))
        expected = arc.complete([memory], ["\nThe"], max_new_tokens=10).texts[0]
        assert f"==> {doc_id} <==\n{expected}\n" in printed and expected.strip() and tokens
    out = tmp_path / "prompts.pt"
    arctrain(["vllm-prompts", *gen, "--vectors", str(stores["opq8"]), "--doc-id", ids[0], "--out", str(out)])
    arc.store = VectorStore(stores["opq8"])
    embeds, mask, _ = arc.embed([arc.context_example(arc.stored_memory(ids[0]), "\nThe")])
    assert torch.equal(torch.load(out)[0]["prompt_embeds"], embeds[0, embeds.shape[1] - int(mask.sum()) :])


def run_error(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        arctrain(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("arctrain: error:")]  # also on stderr: transformers' progress
    assert exit_info.value.code != 0 and len(errors) == 1 and errors[0] == err[-1], err
    return errors[0]


def test_verify_store_names_a_changed_file(stores, tmp_path, capsys):
    arctrain(["verify-store", str(stores["pq8"])])
    assert "match manifest.json" in capsys.readouterr().out
    bad = shutil.copytree(stores["pq8"], tmp_path / "bad")
    shard = sorted(bad.glob("vectors-*.bin"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only the hash sees it
    shard.write_bytes(bytes(data))
    err = run_error(["verify-store", str(bad)], capsys)
    assert f"{shard}: sha256 differs from manifest.json" in err
    shard.write_bytes(bytes(data[:-5]))  # truncated: opening the store refuses it (sizes are checked)
    with pytest.raises(ValueError, match=f"{shard.name}: {len(data) - 5} bytes, manifest.json says {len(data)}"):
        VectorStore(bad)
    shutil.copy(stores["pq8"] / shard.name, shard)
    codebook = bad / "codebook.faiss"
    codebook.write_bytes(codebook.read_bytes()[:-1] + bytes([codebook.read_bytes()[-1] ^ 1]))
    with pytest.raises(ValueError, match="codebook.faiss: sha256 differs"):
        VectorStore(bad)


def test_generate_refuses_a_stored_nan_naming_the_document(exported, tiny_models, docs, stores, tmp_path, capsys):
    bad = shutil.copytree(stores["fp32"], tmp_path / "nan")
    doc_id = docs[3]["id"]
    shard, start, _, row = stored_record(bad, doc_id)
    data = bytearray(shard.read_bytes())
    start += 2 * int(row["segments"])  # the float32 rows, after the tokens per segment
    data[start : start + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    shard.write_bytes(bytes(data))
    gen = ["generate", "--model", str(exported), "--decoder", str(tiny_models / "llama"), "--prompt", "x"]
    err = run_error([*gen, "--vectors", str(bad), "--doc-id", doc_id], capsys)
    assert f"document {doc_id!r}" in err and "not finite" in err and shard.name in err


@pytest.fixture(scope="module")
def narrow_export(exported, tmp_path_factory):
    """The export with the llama projector cut to a 48-wide bottleneck (first 48 hidden units): H < D = 96."""
    from safetensors.torch import load_file, save_file

    out = shutil.copytree(exported, tmp_path_factory.mktemp("narrow") / "export")
    weights = load_file(out / "model.safetensors")
    weights["projectors.llama.0.weight"] = weights["projectors.llama.0.weight"][:48].contiguous()  # (48, D)
    weights["projectors.llama.1.weight"] = weights["projectors.llama.1.weight"][:, :48].contiguous()  # (Dd, 48)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    next(d for d in config["decoders"] if d["name"] == "llama")["projector_hidden"] = 48
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_bottleneck_store_feeds_its_decoder_what_the_full_vectors_do(
    narrow_export, tiny_models, docs, inputs, tmp_path, capsys
):
    """Stored after W1 (48 of 96 values), the decoder's input embeddings equal those from the encoder-space store:
    W2 h = W2 W1 x. Another decoder is refused."""
    full = compress(narrow_export, inputs, tmp_path / "full", "--dtype", "fp32")
    neck = compress(narrow_export, inputs, tmp_path / "neck", "--dtype", "fp32", "--bottleneck", "llama")
    manifest = json.loads((neck / "manifest.json").read_text())
    assert manifest["stored_width"] == 48 and manifest["bytes_per_vector"] == 48 * 4
    assert stored_codes(neck, docs[0]["id"]).shape[1] == 48  # the shard holds (N, H)
    rows = {}
    for name, store in (("full", full), ("neck", neck)):
        arc = ARCGenerator(narrow_export, tiny_models / "llama", vectors=store)
        embeds, mask, _ = arc.embed([arc.context_example(arc.stored_memory(d["id"]), "\nThe") for d in docs[:3]])
        rows[name] = embeds  # (B, T, Dd)
    torch.testing.assert_close(rows["neck"], rows["full"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="holds the projector bottleneck of decoder 'llama'"):
        ARCGenerator(narrow_export, tiny_models / "mistral", vectors=neck)
    err = run_error(
        [
            "compress",
            "--model",
            str(narrow_export),
            "--input",
            str(inputs),
            "--out",
            str(tmp_path / "m"),
            "--bottleneck",
            "mistral",
        ],
        capsys,
    )
    assert "--bottleneck mistral: its projector's hidden width" in err


def test_a_store_on_disk_is_its_records_and_32_bytes_of_index_per_document(docs, stores):
    """Format 3: per document, its tokens per segment (2 bytes each) and its codes, back to back; per shard an index
    of 32-byte rows (np.save's header aside); nothing else but the codebook."""
    manifest = json.loads((stores["rq8"] / "manifest.json").read_text())
    fp32 = VectorStore(stores["fp32"])
    records = sum(2 * len(fp32.get(d["id"]).tokens) + 8 * sum(map(len, fp32.get(d["id"]).vectors)) for d in docs)
    shards = sorted(stores["rq8"].glob("vectors-*.bin"))
    assert len(shards) == len(manifest["shards"]) > 1 and sum(p.stat().st_size for p in shards) == records
    for shard in manifest["shards"]:
        index = stores["rq8"] / shard["index"]["name"]
        header = len(index.read_bytes()) - 32 * shard["samples"]
        assert index.stat().st_size == shard["index"]["bytes"] and header in (64, 128, 192, 256)  # np.save's header
    assert manifest["vector_bytes"] == 8 * manifest["vectors"]
    codebook = (stores["rq8"] / "codebook.faiss").stat().st_size
    assert manifest["bytes"] == records + sum(s["index"]["bytes"] for s in manifest["shards"]) + codebook


def test_a_format_2_store_is_still_read(docs, stores, tmp_path):
    """A store written as format 2 wrote it (tar shards, one MessagePack member per document) reads the same."""
    import msgpack

    from data_tools.samples import Sample
    from data_tools.shards import SplitWriter

    fp32 = VectorStore(stores["fp32"])
    writer = SplitWriter(tmp_path, "vectors", 1 << 20, 0, ["encoder"])
    for doc in docs:
        stored = fp32.get(doc["id"])
        arrays = {
            "vectors": torch.cat(stored.vectors).numpy(),
            "counts": np.array([len(v) for v in stored.vectors]),
            "tokens": np.array(stored.tokens, dtype=np.int32),
        }
        packed = {k: {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()} for k, a in arrays.items()}
        member = msgpack.packb({"id": doc["id"], **packed})
        writer.write(Sample({"__key__": doc_key(doc["id"]), "doc.mp": member}, (sum(stored.tokens),)))
    shards = writer.close()
    for shard in shards:
        shard["tokens"] = shard["tokens"]["encoder"]
    manifest = {k: v for k, v in fp32.manifest.items() if k != "shards"} | {"format": "arctrain-vectors/2"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest | {"shards": shards}))
    old = VectorStore(tmp_path)
    assert {p.suffix for p in tmp_path.glob("vectors-*")} == {".npy", ".tar"}  # tar shards and their indexes
    for doc in docs[::5]:
        new, read = fp32.get(doc["id"]), old.get(doc["id"])
        assert read.tokens == new.tokens and all(
            torch.equal(a, b) for a, b in zip(read.vectors, new.vectors, strict=True)
        )
