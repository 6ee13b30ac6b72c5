"""A weighting before a store's codec (`arctrain compress --weighting std|fisher|fisher-full --decoder DIR`)."""

import hashlib
import json

import faiss
import numpy as np
import pytest
import torch
from test_store_pq import run_error, stored_codes

from arctrain.cli import main as arctrain
from arctrain.inference import store_codec, store_weighting
from arctrain.inference.eval import evaluate_qa, score_targets
from arctrain.inference.generate import ARCGenerator
from arctrain.inference.store import StoreWriter, VectorStore, doc_record
from arctrain.model import Example, Memory, Text
from arctrain.testing.corpus import read_corpus


@pytest.fixture(scope="module")
def docs(tiny_models) -> list[dict]:
    """40 documents of the corpus, cut to 1200 characters: more than 256 vectors (one codebook's centroids)."""
    return [{"id": r["id"], "text": r["text"][:1200]} for r in read_corpus(tiny_models / "corpus.jsonl")][:40]


@pytest.fixture(scope="module")
def inputs(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("weighting_inputs") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def compress(exported, inputs, out, *args):
    arctrain(["compress", "--model", str(exported), "--input", str(inputs), "--out", str(out), "--no-progress", *args])
    return out


@pytest.fixture(scope="module")
def stores(exported, tiny_models, inputs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("weighting_stores")
    llama, mistral = ["--decoder", str(tiny_models / "llama")], ["--decoder", str(tiny_models / "mistral")]
    segments = ["--weighting-segments", "24"]
    return {
        "fp32": compress(exported, inputs, root / "fp32", "--dtype", "fp32"),
        "std": compress(exported, inputs, root / "std", "--dtype", "rq4", "--weighting", "std"),
        "fisher": compress(
            exported, inputs, root / "fisher", "--dtype", "rq4", "--weighting", "fisher", *llama, *segments
        ),
        "full": compress(
            exported, inputs, root / "full", "--dtype", "pq8", "--weighting", "fisher-full", *llama, *mistral, *segments
        ),
    }


@pytest.mark.parametrize("name", ["std", "fisher", "full"])
def test_a_weighted_store_holds_faiss_codes_of_the_mapped_vectors_and_decodes_through_the_inverse(stores, docs, name):
    manifest = json.loads((stores[name] / "manifest.json").read_text())
    entry = manifest["codec"]["weighting"]
    path = stores[name] / entry["file"]
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    weights = np.load(path).astype(np.float64)  # (2, D): diagonal and inverse; (2, D, D): A and A^-1
    matrix = np.diag(weights[0]) if weights.ndim == 2 else weights[0]  # (D, D)
    inverse = np.diag(weights[1]) if weights.ndim == 2 else weights[1]
    assert np.allclose(matrix @ inverse, np.eye(len(matrix)), atol=1e-4)
    shards = sum(s["bytes"] + s["index"]["bytes"] for s in manifest["shards"])
    assert manifest["bytes"] == shards + manifest["codec"]["bytes"] + path.stat().st_size
    index = faiss.read_index(str(stores[name] / manifest["codec"]["file"]))
    exact, store = VectorStore(stores["fp32"]), VectorStore(stores[name])
    for doc in docs[::9]:
        x = torch.cat(exact.get(doc["id"]).vectors).numpy().astype(np.float64)  # (N, D)
        codes = stored_codes(stores[name], doc["id"])
        assert np.array_equal(codes, index.sa_encode((x @ matrix.T).astype(np.float32)))
        decoded = torch.cat(store.get(doc["id"]).vectors).numpy()
        assert np.allclose(decoded, index.sa_decode(codes).astype(np.float64) @ inverse.T, rtol=1e-4, atol=1e-5)
    if name == "std":  # each dimension standardised on the sample (all vectors here): rms 1 after the scale
        sample = np.concatenate([torch.cat(exact.get(d["id"]).vectors).numpy() for d in docs]).astype(np.float64)
        w = 1 / sample.std(axis=0)
        assert np.allclose(weights[0], w / np.sqrt(np.mean(w**2)), rtol=1e-4)


def test_fisher_weights_are_the_decoders_loss_gradients_checked_by_finite_differences(
    exported, tiny_models, docs, stores
):
    """The gradient segment_gradients gives for a vector equals (L(x + h e_d) - L(x - h e_d)) / 2h of the loss
    `arctrain eval --heldout` scores (score_targets), and the fisher weighting is sqrt of their mean square."""
    arc = ARCGenerator(exported, tiny_models / "llama")
    seg = arc.segments(docs[0]["text"])[0]
    vectors = VectorStore(stores["fp32"]).get(docs[0]["id"]).vectors[0]  # (m, D) of that segment
    tokens = arc.dec_tok.encode(arc.enc_tok.decode(seg), add_special_tokens=False)
    grads = store_weighting.segment_gradients(arc, [(vectors, tokens)])  # (m, D)
    prefix = [arc.text(arc.prefix, first=True)] if arc.prefix else []

    def loss(v: torch.Tensor) -> float:
        with torch.no_grad():
            example = Example(prefix + [Memory([], "rec", vectors=[v]), Text(tokens, loss=True)])
            return score_targets(arc, arc.batch([example]))[0]

    h = 1e-2
    for row, d in [(0, int(grads[0].abs().argmax())), (len(vectors) - 1, int(grads[-1].abs().argmax()))]:
        step = torch.zeros_like(vectors)
        step[row, d] = h
        numeric = (loss(vectors + step) - loss(vectors - step)) / (2 * h)
        assert numeric == pytest.approx(float(grads[row, d]), rel=0.05, abs=1e-3)
    weights = store_weighting.transform("fisher", vectors.numpy(), store_weighting.sensitivity([grads]))
    rms = np.sqrt((grads.numpy() ** 2).mean(axis=0))  # (D,)
    assert np.allclose(weights[0], rms / np.sqrt(np.mean(rms**2)), rtol=1e-4)


def test_generate_and_eval_read_a_weighted_store(exported, tiny_models, docs, stores, tmp_path, capsys):
    """generate --vectors: greedy decoding from the codes decoded through the weighting's inverse; eval --vectors
    answers as from an fp32 store of those decoded vectors."""
    manifest = json.loads((stores["fisher"] / "manifest.json").read_text())
    index = faiss.read_index(str(stores["fisher"] / "codebook.faiss"))
    inverse = np.load(stores["fisher"] / manifest["codec"]["weighting"]["file"])[1]  # (D,)
    exact = VectorStore(stores["fp32"])
    decoded = {}  # doc id -> its vectors per segment, decoded here with faiss and the inverse weights
    for doc in docs[:3]:
        vectors = torch.from_numpy(index.sa_decode(stored_codes(stores["fisher"], doc["id"])) * inverse)  # (N, D)
        decoded[doc["id"]] = list(torch.split(vectors, [len(v) for v in exact.get(doc["id"]).vectors]))
    ids = [d["id"] for d in docs[:2]]
    gen = ["--model", str(exported), "--decoder", str(tiny_models / "llama"), "--prompt", "\nThe", "--dtype", "fp32"]
    capsys.readouterr()
    arctrain(["generate", *gen, "--max-new-tokens", "10", "--vectors", str(stores["fisher"]), "--doc-id", *ids])
    printed = capsys.readouterr().out
    arc = ARCGenerator(exported, tiny_models / "llama")
    for doc_id in ids:
        expected = arc.complete([Memory([], "cont", vectors=decoded[doc_id])], ["\nThe"], max_new_tokens=10).texts[0]
        assert f"==> {doc_id} <==\n{expected}\n" in printed and expected.strip()
    plain = tmp_path / "decoded"  # the decoded vectors as an fp32 store: read exactly (tests/inference/test_store.py)
    plain.mkdir()
    meta = exact.manifest
    writer = StoreWriter(plain, 1 << 20, (meta["pooling_factor"], meta["n_vectors"]))
    for doc in docs[:3]:
        writer.write(doc_record(doc["id"], decoded[doc["id"]], exact.get(doc["id"]).tokens, "fp32"), 1)
    keep = ("encoder", "stored_width", "pooling", "pooling_factor", "n_vectors", "segment_tokens", "docs", "sources")
    writer.close({k: meta[k] for k in keep} | {"dtype": "fp32", "bytes_per_vector": meta["bytes_per_vector"]})
    records = [
        {"question": f"What is {d['id']}?", "answers": [d["text"].split()[0]], "passages": [d["text"]]}
        | {"doc_ids": [d["id"]], "metric": "em"}
        for d in docs[:3]
    ]
    arcs = [ARCGenerator(exported, tiny_models / "llama", vectors=s) for s in (stores["fisher"], plain)]
    results = [evaluate_qa(a, records, shots=1, max_new_tokens=6, batch_size=2) for a in arcs]
    assert [r["predictions"] for r in results[0]["records"]] == [r["predictions"] for r in results[1]["records"]]
    assert results[0]["modes"]["compressed"]["prefill"]["encoder_tokens"] == 0  # read from the store, no encoder


def test_verify_store_checks_the_weighting_file(stores, tmp_path, capsys):
    import shutil

    bad = shutil.copytree(stores["std"], tmp_path / "bad")
    arctrain(["verify-store", str(bad)])
    assert "match manifest.json" in capsys.readouterr().out
    path = bad / store_codec.WEIGHTING
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert f"{path}: sha256 differs" in run_error(["verify-store", str(bad)], capsys)
    with pytest.raises(ValueError, match="weighting.npy: sha256 differs from manifest.json"):
        VectorStore(bad)


def test_weighting_flags_are_refused_in_one_line(exported, tiny_models, inputs, tmp_path, capsys):
    base = ["compress", "--model", str(exported), "--input", str(inputs), "--out", str(tmp_path / "s")]
    llama = ["--decoder", str(tiny_models / "llama")]
    cases = [
        (["--dtype", "rq4", "--weighting", "fishr"], "--weighting 'fishr': not one of none, std, fisher, fisher-full"),
        (["--dtype", "int8", "--weighting", "std"], "--weighting std: only for codec dtypes"),
        (["--dtype", "rq4", "--weighting", "fisher"], "--weighting fisher: needs the decoders it weighs for"),
        (["--dtype", "rq4", "--weighting", "std", *llama], "only read by --weighting fisher/fisher-full, not std"),
        (["--dtype", "rq4", "--weighting", "fisher", "--decoder", str(tmp_path)], f"--decoder {tmp_path}: not a"),
        (["--dtype", "rq4", "--weighting", "fisher", *llama, "--weighting-segments", "0"], "--weighting-segments 0"),
    ]
    for args, message in cases:
        assert message in run_error([*base, *args], capsys)
    assert not (tmp_path / "s").exists()


def test_sensitivity_averages_each_decoders_trace_normalised_fisher_and_fisher_full_is_its_square_root():
    rng = np.random.default_rng(0)
    small, large = torch.from_numpy(rng.normal(size=(50, 6))), torch.from_numpy(rng.normal(size=(40, 6)) * 100)
    fisher = store_weighting.sensitivity([small, large])
    expected = 0
    for g in (small.numpy(), large.numpy()):  # the decoder with 100x larger gradients counts the same
        m = sum(np.outer(row, row) for row in g) / len(g)
        expected = expected + m / np.trace(m) / 2
    assert np.allclose(fisher, expected)
    a, inverse = store_weighting.transform("fisher-full", rng.normal(size=(10, 6)), fisher).astype(np.float64)
    shrunk = (1 - store_weighting.SHRINK) * fisher + store_weighting.SHRINK * np.trace(fisher) / 6 * np.eye(6)
    scale = 6 / np.trace(shrunk)
    assert np.allclose(a.T @ a, shrunk * scale, atol=1e-5)  # A^T A = G_s up to the mean-eigenvalue-1 scale
    assert np.allclose(a @ inverse, np.eye(6), atol=1e-5)
    with pytest.raises(ValueError, match="--weighting 'pca': not one of"):
        store_weighting.transform("pca", rng.normal(size=(10, 6)), fisher)
