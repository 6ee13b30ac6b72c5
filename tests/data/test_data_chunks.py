"""Contexts cut into chunks (arctrain/data/chunks.py): the cut arc-data makes, data.max_chunks, counted drops."""

import pytest
from transformers import AutoTokenizer

from arctrain.config.load import load_config
from arctrain.data import Vocab
from arctrain.data.chunks import Chunker
from arctrain.data.qa import QAMaker, read_qa


@pytest.fixture(scope="module")
def enc(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models / "encoder")


def test_chunks_cover_the_text_and_max_chunks_keeps_the_first(enc, tiny_models):
    text = " ".join(f"word{i} and some more text" for i in range(60))
    every = Chunker(enc, 16).segments(text)
    assert len(every) > 5 and all(0 < len(c) <= 16 for c in every)
    assert enc.decode([t for c in every for t in c]) == text
    kept, cut = Chunker(enc, 16, max_chunks=3).cut([text, "a second passage"])
    assert kept == every[:3]
    extra = Chunker(enc, 16).segments("a second passage")
    assert vars(cut) == {
        "contexts": 1,
        "truncated": 1,
        "dropped_chunks": len(every) - 3 + len(extra),
        "dropped_tokens": sum(map(len, every[3:] + extra)),
    }
    kept, cut = Chunker(enc, 16).cut([text])
    assert kept == every and cut.truncated == cut.dropped_tokens == 0
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1 and max_chunks >= 0"):
        Chunker(enc, 0)


def test_qa_passages_are_compressed_in_at_most_max_chunks_and_the_rest_is_counted(enc, tiny_models, tiny_qa):
    overrides = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        "data.shards=[]",
        f"data.qa={tiny_qa[0]}",
        "data.chunk_tokens=16",
        "data.max_chunks=2",
        "data.qa_context=segments",
        "data.qa_max_passages=1",
    ]
    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    records = read_qa(tiny_qa[0])
    maker = QAMaker(cfg, Vocab.from_config(cfg))
    examples = [maker.example("llama", records, i, 0, 0, 0, 0) for i in (0, 3)]
    batch = maker.collate(examples, "llama", ["a", "b"])
    chunks = [Chunker(enc, 16).cut(records[i]["passages"][:1])[0] for i in (0, 3)]  # every chunk of each context
    assert all(len(c) > 2 for c in chunks)  # 48 words are more than 2 chunks of 16 tokens
    rows = batch.segments()
    assert rows == chunks[0][:2] + chunks[1][:2]
    assert batch.stats.dropped_tokens == sum(len(c) for context in chunks for c in context[2:])


@pytest.mark.parametrize(
    "data, message",
    [
        (["data.max_chunks=2"], "data.max_chunks: 2 applies to QA contexts"),
        (
            ["data.max_chunks=2", "data.shards=[]", "data.qa=qa.jsonl"],
            "data.max_chunks: 2 applies to QA contexts in chunks",
        ),
        (["data.shards=[]", "data.qa=qa.jsonl", "data.interleave_tokens=8"], "data.interleave_tokens: 8 applies to"),
        (["data.max_chunks=-1", "data.shards=[]", "data.qa=qa.jsonl"], "data.max_chunks: -1 must be >= 0"),
    ],
)
def test_chunk_and_interleave_settings_are_refused_where_they_would_do_nothing(data, message):
    from arctrain.config.tree import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny_cpu.yaml", data)


def test_a_qa_document_several_windows_long_trains_in_chunks_that_fit_the_window(enc, tiny_models, tmp_path):
    """A passage more than 4.5x the tiny decoders' window (4096) in encoder tokens, chunk_tokens=1024, max_chunks=3: the
    training row holds 3 chunks' vectors and fits the window; the rest is counted."""
    import json

    from arctrain.testing.corpus import read_corpus

    window = json.loads((tiny_models / "llama" / "config.json").read_text())["max_position_embeddings"]
    parts, tokens = [], 0
    for record in read_corpus(tiny_models / "corpus.jsonl"):
        parts.append(record["text"])
        tokens += len(enc.encode(record["text"], add_special_tokens=False))
        if tokens > 4.5 * window:
            break
    document = "\n\n".join(parts)
    qa = tmp_path / "long.jsonl"
    qa.write_text(json.dumps({"question": "What is it about?", "answers": ["code"], "passages": document}) + "\n")
    overrides = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        "data.shards=[]",
        f"data.qa={qa}",
        "data.chunk_tokens=1024",
        "data.max_chunks=3",
        "data.qa_context=segments",
    ]
    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    maker = QAMaker(cfg, Vocab.from_config(cfg))
    batch = maker.collate([maker.example("llama", read_qa(qa), 0, 0, 0, 0, 0)], "llama", ["long"])
    chunks = Chunker(enc, 1024).segments(document)
    assert sum(map(len, chunks)) > 4 * window
    assert batch.enc.cu_seqlens.diff().tolist() == [len(c) for c in chunks[:3]]
    assert batch.n_vectors.tolist() == [-(-len(c) // 4) for c in chunks[:3]]
    assert batch.dec_max_len < window and batch.stats.dropped_tokens == sum(map(len, chunks[3:]))
