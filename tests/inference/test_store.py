"""The vector store (arctrain/inference/store.py): `arctrain compress`, then `generate/eval --vectors` read it."""

import json
import shutil

import pytest
import torch

from arctrain.cli import main as arctrain
from arctrain.inference.generate import ARCGenerator
from arctrain.inference.store import VectorStore
from arctrain.testing.corpus import read_corpus


@pytest.fixture(scope="module")
def docs(tiny_models) -> list[dict]:
    """12 documents of the corpus, cut to 200-900 characters (several segments each)."""
    records = [r for r in read_corpus(tiny_models / "corpus.jsonl") if len(r["text"]) > 900][:12]
    return [{"id": r["id"], "text": r["text"][: 200 + 60 * i]} for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def inputs(docs, tmp_path_factory):
    """The documents as jsonl, with three unusable records: an empty text, a malformed line, a repeated id."""
    path = tmp_path_factory.mktemp("store_inputs") / "docs.jsonl"
    lines = [json.dumps(d) for d in docs[:6]] + ['{"id": "blank", "text": "  "}', "{not json"]
    lines += [json.dumps(d) for d in docs[6:]] + [json.dumps(docs[0])]
    path.write_text("\n".join(lines) + "\n")
    return path


def compress(exported, inputs, out, *args):
    arctrain(["compress", "--model", str(exported), "--input", str(inputs), "--out", str(out), "--no-progress", *args])
    return out


@pytest.fixture(scope="module")
def stores(exported, inputs, tmp_path_factory) -> dict:
    root, small = tmp_path_factory.mktemp("stores"), ["--shard-size-mb", "0.01"]  # several shards
    return {d: compress(exported, inputs, root / d, "--dtype", d, *small) for d in ("fp32", "bf16", "int8")}


@pytest.fixture(scope="module")
def arc(exported, tiny_models, stores) -> ARCGenerator:
    return ARCGenerator(exported, tiny_models / "llama", vectors=stores["fp32"])


def test_compress_is_the_same_bytes_for_any_workers_and_counts_skips(arc, exported, docs, inputs, stores, tmp_path):
    two = compress(exported, inputs, tmp_path / "two", "--dtype", "fp32", "--workers", "2", "--shard-size-mb", "0.01")
    one = json.loads((stores["fp32"] / "manifest.json").read_text())
    assert one == json.loads((two / "manifest.json").read_text())  # shard names, bytes, sha256 of shards and indexes
    skipped = {"duplicate_id": 1, "empty_text": 1, "malformed_json": 1}
    assert one["docs"] == {"read": 15, "written": 12, "skipped": skipped}
    assert len(one["shards"]) > 1 and sum(s["samples"] for s in one["shards"]) == 12
    assert one["encoder_tokens"] == sum(len(s) for d in docs for s in arc.segments(d["text"]))
    with pytest.raises(SystemExit):  # an existing store is not overwritten without --overwrite
        compress(exported, inputs, two)


def test_compress_reads_arc_data_shards_as_their_raw_text(arc, exported, tiny_models, docs, inputs, tmp_path, capsys):
    """An `arc-data build` directory in: the same segments, so the same vectors as from the raw text."""
    from helpers import build_shards

    shards = build_shards(tmp_path / "shards", inputs, tiny_models / "encoder", {"llama": tiny_models / "llama"})
    store = VectorStore(compress(exported, shards, tmp_path / "from_shards", "--dtype", "fp32"))
    assert len(store) == 12
    for doc in docs:
        ours, theirs = store.get(doc["id"]), arc.store.get(doc["id"])
        assert ours.tokens == theirs.tokens
        assert all(torch.equal(a, b) for a, b in zip(ours.vectors, theirs.vectors, strict=True))
    other = tmp_path / "other"  # the same shards, as if cut by another encoder tokenizer
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizers"]["encoder"]["hash"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit):
        compress(exported, other, tmp_path / "refused")
    assert "tokenizer 'encoder' differs" in capsys.readouterr().err


def test_stored_vectors_are_the_encoders_of_each_segment(arc, docs, stores):
    encoder = arc.model.encoder
    for doc in docs[:4]:
        stored = arc.store.get(doc["id"])
        segments = arc.segments(doc["text"])  # the cut generate makes
        assert stored.tokens == [len(s) for s in segments]
        for seg, vectors in zip(segments, stored.vectors, strict=True):
            alone = encoder.compress(torch.tensor([seg]), torch.ones(1, len(seg), dtype=torch.long))[0]
            torch.testing.assert_close(vectors, alone, atol=1e-5, rtol=1e-5)  # batched (packed) vs alone
    exact = torch.cat(arc.store.get(docs[5]["id"]).vectors)
    bf16 = torch.cat(VectorStore(stores["bf16"]).get(docs[5]["id"]).vectors)
    assert torch.equal(bf16, exact.to(torch.bfloat16).float())  # bf16 is the rounding of the fp32 vectors
    int8_store = VectorStore(stores["int8"])
    int8 = torch.cat(int8_store.get(docs[5]["id"]).vectors)
    scale = exact.abs().amax(1, keepdim=True) / 127  # (N, 1) the per-vector scale
    assert ((int8 - exact).abs() <= scale / 2 * (1 + 1e-5)).all()  # rounding to the nearest step, no more
    sizes = {d: json.loads((stores[d] / "manifest.json").read_text())["bytes_per_vector"] for d in stores}
    assert sizes == {"fp32": 4 * 96, "bf16": 2 * 96, "int8": 96 + 4}


def test_generate_from_the_store_prints_what_the_encoder_gives(exported, tiny_models, docs, stores, tmp_path, capsys):
    """fp32 greedy: the same text from stored vectors as from compressing the context files."""
    files = []
    for i, doc in enumerate(docs[:3]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(doc["text"])
    argv = [
        "generate",
        "--model",
        str(exported),
        "--decoder",
        str(tiny_models / "llama"),
        "--prompt",
        "\nThe",
        "--max-new-tokens",
        "12",
        "--dtype",
        "fp32",
    ]
    arctrain([*argv, "--context-file", *map(str, files)])
    from_text = capsys.readouterr().out.split("\n==> ")
    arctrain([*argv, "--vectors", str(stores["fp32"]), "--doc-id", *[d["id"] for d in docs[:3]]])
    from_store = capsys.readouterr().out.split("\n==> ")
    strip = [t.split(" <==\n", 1)[1] for t in from_text]
    assert [t.split(" <==\n", 1)[1] for t in from_store] == strip and all(t.strip() for t in strip)
    arctrain([*argv, "--vectors", str(stores["fp32"]), "--join", "--doc-id", docs[0]["id"], docs[1]["id"]])
    joined = capsys.readouterr().out
    arc = ARCGenerator(exported, tiny_models / "llama")
    assert joined == arc.complete([[docs[0]["text"], docs[1]["text"]]], ["\nThe"], max_new_tokens=12).texts[0] + "\n"


def test_eval_reads_the_passages_from_the_store(arc, exported, tiny_models, docs, stores, tmp_path):
    from arctrain.inference.eval import check_doc_ids, evaluate_qa

    records = [
        {
            "question": f"What is {d['id']}?",
            "answers": [d["text"].split()[0]],
            "passages": [d["text"]],
            "doc_ids": [d["id"]],
            "metric": "em",
        }
        for d in docs[:4]
    ]
    check_doc_ids(records, arc.store, tmp_path / "qa.jsonl")
    from_store = evaluate_qa(arc, records, shots=1, max_new_tokens=6, batch_size=2)
    plain = ARCGenerator(exported, tiny_models / "llama")
    encoded = evaluate_qa(plain, records, shots=1, max_new_tokens=6, batch_size=2)
    assert [r["predictions"] for r in from_store["records"]] == [r["predictions"] for r in encoded["records"]]
    assert from_store["modes"]["compressed"]["prefill"]["encoder_tokens"] == 0  # no encoder ran
    assert encoded["modes"]["compressed"]["prefill"]["encoder_tokens"] > 0


def test_store_errors_are_one_line(exported, tiny_models, docs, stores, inputs, tmp_path, capsys):
    other = tmp_path / "other_encoder"
    shutil.copytree(exported, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if k.startswith("projectors."))
    weights[name] = weights[name] * 2  # another projector: the vectors (encoder space) still fit
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    ARCGenerator(other, tiny_models / "llama", vectors=stores["int8"])
    name = next(k for k in weights if k.startswith("encoder.") and k.endswith("weight"))
    weights[name] = weights[name] + 1e-3  # another encoder
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "answers": ["a"], "passages": "p"}) + "\n")
    gen = ["generate", "--model", str(exported), "--decoder", str(tiny_models / "llama"), "--prompt", "x"]
    int8, doc = str(stores["int8"]), docs[0]["id"]
    cases = [
        ([*gen[:2], str(other), *gen[3:], "--vectors", int8, "--doc-id", doc], "made by another encoder"),
        ([*gen, "--vectors", str(stores["int8"]), "--doc-id", "nope"], "--doc-id 'nope': not in the --vectors store"),
        ([*gen, "--doc-id", "a"], "--doc-id and --vectors go together"),
        ([*gen, "--vectors", str(tmp_path), "--doc-id", "a"], "not a vector store (no manifest.json)"),
        (["eval", *gen[1:5], "--data", str(qa), "--vectors", str(stores["int8"])], "record 1: 'doc_ids'"),
        (
            ["compress", "--model", str(tiny_models / "llama"), "--input", str(inputs), "--out", str(tmp_path / "x")],
            "not an arctrain export",
        ),
    ]
    capsys.readouterr()
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            arctrain(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_vllm_prompts_are_the_decoder_inputs_generate_feeds(arc, exported, tiny_models, docs, stores, tmp_path):
    """`arctrain vllm-prompts` from the store: each prompt's embeddings are the rows `generate` feeds the decoder for
    the same stored document and prompt; --mixed marks the vector positions; the request body round-trips them."""
    import base64
    import io

    out, request = tmp_path / "prompts.pt", tmp_path / "request.json"
    ids = [d["id"] for d in docs[:2]]
    arctrain(
        [
            "vllm-prompts",
            "--model",
            str(exported),
            "--decoder",
            str(tiny_models / "llama"),
            "--prompt",
            "\nThe",
            "--vectors",
            str(stores["fp32"]),
            "--doc-id",
            *ids,
            "--mixed",
            "--out",
            str(out),
            "--request",
            str(request),
            "--served-model",
            "llama",
            "--dtype",
            "fp32",
        ]
    )
    prompts = torch.load(out)
    for doc_id, prompt in zip(ids, prompts, strict=True):
        embeds, mask, batch = arc.embed([arc.context_example(arc.stored_memory(doc_id), "\nThe")])
        assert torch.equal(prompt["prompt_embeds"], embeds[0, embeds.shape[1] - int(mask.sum()) :])
        is_text = prompt["prompt_is_token_ids"]
        assert len(is_text) == len(prompt["prompt_token_ids"]) == len(prompt["prompt_embeds"])
        assert is_text.count(False) == int((batch.dec_slot[0] >= 0).sum()) > 0  # the vectors' positions
    body = json.loads(request.read_text())
    assert body["model"] == "llama" and body["temperature"] == 0.0
    decoded = [torch.load(io.BytesIO(base64.b64decode(e))) for e in body["prompt_embeds"]]
    assert all(torch.equal(d, p["prompt_embeds"]) for d, p in zip(decoded, prompts, strict=True))
