"""QA fine-tuning data (arctrain/data/qa.py, qa_records.py): both record formats in every file type, per-epoch
draws, joint passages, EOS targets, few-shot per source, source mixing, exact resume; about 10 s."""

import json

import numpy as np
import pytest
from helpers import qa_config
from transformers import AutoTokenizer

from arctrain.config.schema import ConfigError, QASource, parse_qa_source
from arctrain.data import Vocab, build_train_loader
from arctrain.data.batch import IGNORE, Memory
from arctrain.data.qa import QAMaker, TextPieces, draw, record_order
from arctrain.data.qa_records import read_qa
from arctrain.data.sampling import SourceMixer


def keys(loader, n):
    it = iter(loader)
    return [(b, batch.decoder, batch.keys) for b, batch in (next(it) for _ in range(n))]


def test_targets_are_the_answer_and_eos(tiny_models, tiny_qa):
    cfg = qa_config(tiny_models, tiny_qa[0])
    records = read_qa(tiny_qa[0])
    maker = QAMaker(cfg, Vocab.from_config(cfg))
    examples = [maker.example("mistral", records, i, 0, 0, 0, shots=1) for i in (0, 5)]
    batch = maker.collate(examples, "mistral", ["a", "b"])
    tok = AutoTokenizer.from_pretrained(tiny_models / "mistral")
    for row, i in enumerate([0, 5]):
        ids, slots, labels = (batch.rows(x)[row] for x in (batch.dec_ids, batch.dec_slot, batch.labels))
        target = labels[labels != IGNORE].tolist()
        assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == f" {records[i]['answers'][0]}"
        text = (slots < 0) & (labels == IGNORE)
        prompt = tok.decode(ids[text].tolist(), skip_special_tokens=True)
        assert prompt.count("Document: ") == 2 and prompt.endswith(f"Question: {records[i]['question']}\nAnswer:")
    assert batch.task == "qa" and (batch.dec_slot >= 0).any()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_a_function_of_the_index(tiny_models, tiny_qa, workers):
    """Any worker count, and a loader started at batch 3, give the batches of a loader started at 0."""
    cfg = qa_config(tiny_models, tiny_qa[0], "data.num_workers=0")
    reference = keys(build_train_loader(cfg, 0, 2), 8)
    cfg.data.num_workers = workers
    assert keys(build_train_loader(cfg, 0, 2), 8) == reference
    resumed = build_train_loader(cfg, 0, 2)
    resumed.load_state_dict({"next_batch": 3})
    assert keys(resumed, 5) == reference[3:]


def test_an_epoch_covers_every_record_once_over_ranks(tiny_models, tiny_qa):
    cfg = qa_config(tiny_models, tiny_qa[0], "data.num_workers=0")
    n = len(read_qa(tiny_qa[0]))  # 64 records, 4 per batch, 2 ranks: 8 batches per rank per epoch
    seen = [k for rank in (0, 1) for _, _, ks in keys(build_train_loader(cfg, rank, 2), 8) for k in ks]
    assert sorted(seen) == [f"qa-0-{i:08d}" for i in range(n)]


RELEASED = [
    {"question": "Who?", "answer": ["Ada", "Ada Lovelace"], "passages": ["Ada wrote it.", "Later notes.", "More."]},
    {"answer": "a summary", "passage": "A long text to summarise.", "instruction": "Summarise the document."},
    {"question": "When?", "answers": ["1843"], "passages": "In 1843 she published.", "metric": "rougeL"},
]


def _write(path, records) -> None:
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        def column_types(r: dict) -> dict:  # a parquet column has one type: answers and passages as lists
            r = dict(r)
            for key in ("answer", "passage"):
                if key + "s" in r:
                    r[key] = r.pop(key + "s")
            return {k: [v] if k in ("answer", "passage") and isinstance(v, str) else v for k, v in r.items()}

        rows = [column_types(r) for r in records]
        names = sorted({k for r in rows for k in r})  # from_pylist takes the first row's keys only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows]), path)
        return
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.name.endswith(".zst"):
        import zstandard

        text = zstandard.ZstdCompressor().compress(text)
    path.write_bytes(text)


@pytest.mark.parametrize("name", ["qa.jsonl", "qa.jsonl.zst", "qa.parquet"])
def test_released_and_arctrain_records_read_alike_from_every_file_type(tmp_path, name):
    _write(tmp_path / name, RELEASED)
    records = read_qa(tmp_path / name)
    assert [r["answers"] for r in records] == [["Ada", "Ada Lovelace"], ["a summary"], ["1843"]]
    assert [r["passages"] for r in records] == [
        ["Ada wrote it.", "Later notes.", "More."],
        ["A long text to summarise."],
        ["In 1843 she published."],
    ]
    assert [r["question"] for r in records] == ["Who?", "", "When?"]
    assert [r["instruction"] for r in records] == [None, "Summarise the document.", None]
    assert [r["metric"] for r in records] == ["em", "em", "rougeL"]


def test_bad_qa_records_are_counted_skips_and_an_empty_file_an_error(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    good = {"question": "q", "answer": "a", "passage": "p"}
    bad = [
        {"question": "q", "answers": [], "passages": "p"},
        {"question": "q", "answer": "a", "passages": ["  "]},
        {"question": 3, "answer": "a", "passage": "p"},
        {"question": "q", "answer": "a", "passage": "p", "metric": "meteor"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]) + "{not json\n")
    assert len(read_qa(path)) == 1
    err = capsys.readouterr().err
    assert f"warning: skipped {path}:2: invalid_answer" in err and f"{path}:3: no_passage" in err
    assert f"{path}:6: malformed_json" in err
    assert err.strip().endswith(
        f"{path}: 1 QA records read, skipped invalid_answer=1, invalid_metric=1, invalid_question=1, "
        "malformed_json=1, no_passage=1"
    )
    path.write_text(json.dumps(bad[0]) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}: no usable QA records \(invalid_answer=1\)$"):
        read_qa(path)
    with pytest.raises(ValueError, match=r"qa.jsonl:1: invalid_answer: 'answer\(s\)' must be .* \(--strict\)"):
        read_qa(path, strict=True)


def test_sources_are_path_weight_shots():
    assert parse_qa_source("a/nq.jsonl") == QASource("a/nq.jsonl", 1.0, 0)
    assert parse_qa_source("a/nq.jsonl:8", 3) == QASource("a/nq.jsonl", 8.0, 3)
    assert parse_qa_source("msmarco.jsonl:9.0:5") == QASource("msmarco.jsonl", 9.0, 5)
    assert parse_qa_source("c:/x:y.jsonl:2") == QASource("c:/x:y.jsonl", 2.0, 0)
    assert QASource("d/nq_val.jsonl.zst").name == "nq_val"
    with pytest.raises(ValueError, match="the weight must be > 0"):
        parse_qa_source("a.jsonl:0:5")


def test_a_bad_source_entry_names_the_key(tiny_models, tiny_qa):
    with pytest.raises(ConfigError, match=r"^data\.qa\.train: 'x.jsonl:1:2.5' shots must be a whole number"):
        qa_config(tiny_models, "x.jsonl:1:2.5")


def test_per_epoch_draws_are_seeded_and_cover_the_choices():
    record = {"answers": ["a", "b", "c"], "passages": ["p1", "p2", "p3", "p4", "p5"]}
    runs = [[draw(7, 0, epoch, 3, record, 10, 4, 4) for epoch in range(60)] for _ in range(2)]
    assert runs[0] == runs[1]  # the same seed: the same draws (what makes resume exact)
    assert runs[0] != [draw(8, 0, e, 3, record, 10, 4, 4) for e in range(60)]
    answers = {a for a, _, _ in runs[0]}
    counts = {len(p) for _, p, _ in runs[0]}
    assert answers == {"a", "b", "c"} and counts == {1, 2, 3, 4}  # 60 epochs: every answer, 1..max_passages
    assert all(p == record["passages"][: len(p)] for _, p, _ in runs[0])  # the first n passages, as the reference
    for _, _, shots in runs[0]:
        assert len(shots) == 4 == len(set(shots)) and 3 not in shots and all(0 <= j < 10 for j in shots)
    assert draw(7, 0, 0, 0, record, 1, 5, 4)[2] == []  # a one-record source has no other record to show


def test_sources_mix_by_weight_and_each_epoch_covers_a_source(tiny_models, tmp_path):
    """Positions draw their source as the shard loader's SourceMixer does; each source's records come once per
    epoch; shots come from the same source."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, [{"question": f"qa{i}", "answer": "x", "passage": f"passage a {i}"} for i in range(6)])
    _write(b, [{"question": f"qb{i}", "answer": "y", "passage": f"passage b {i}"} for i in range(10)])
    cfg = qa_config(tiny_models, f"{a}:1:2,{b}:3", "data.num_workers=0", "data.micro_batch_size=2")
    loader = build_train_loader(cfg, 0, 1)
    got = [k for _, _, ks in keys(loader, 40) for k in ks]  # 80 positions
    mixer = SourceMixer(cfg.train.seed, (1.0, 3.0))
    assert [int(k.split("-")[1]) for k in got] == [mixer.locate(p)[0] for p in range(80)]
    for s, n in ((0, 6), (1, 10)):
        mine = [int(k.split("-")[2]) for k in got if k.split("-")[1] == str(s)]
        for e in range(len(mine) // n):
            assert sorted(mine[e * n : (e + 1) * n]) == list(range(n))
    share = sum(k.startswith("qa-1-") for k in got) / len(got)
    assert 0.6 < share < 0.9  # weight 3 of 4; 80 draws: sd 0.05
    assert record_order(cfg.train.seed, 1, 10, 13) == (
        1,
        int(np.random.default_rng([0, 0x51A, 1, 1]).permutation(10)[3]),
    )


def test_joint_passages_are_one_encoder_sequence_cut_at_context_tokens(tiny_models):
    enc = AutoTokenizer.from_pretrained(tiny_models / "encoder")
    dec = AutoTokenizer.from_pretrained(tiny_models / "llama")
    passages = ["The first passage has some words.", "A second one follows it."]
    expected = [t for p in passages for t in enc.encode(p, add_special_tokens=False)]
    joint = TextPieces(enc, dec, 4, context="joint", context_tokens=1000).memory(passages)
    assert joint.segments == [expected] and joint.special == "cont" and joint.dropped_tokens == 0
    cut = TextPieces(enc, dec, 4, context="joint", context_tokens=5)
    memory = cut.memory(passages)
    assert memory.segments == [expected[:5]] and memory.dropped_tokens == len(expected) - 5
    assert (cut.cut.contexts, cut.cut.truncated, cut.cut.dropped_tokens) == (1, 1, len(expected) - 5)
    segments = TextPieces(enc, dec, 4, max_chunks=2, context="segments")  # chunks: at most max_chunks, no token cap
    kept = segments.memory(passages).segments
    assert len(kept) == 2 and all(len(c) <= 6 for c in kept) and segments.cut.truncated == 1


def test_memory_holds_the_passages_segments(tiny_models, tiny_qa):
    cfg = qa_config(tiny_models, tiny_qa[0], "data.chunk_tokens=16", "data.qa.context=segments")
    records = read_qa(tiny_qa[0])
    maker = QAMaker(cfg, Vocab.from_config(cfg))
    pieces = maker._pieces("llama")
    memory = pieces.memory(records[0]["passages"])
    assert isinstance(memory, Memory) and len(memory.segments) >= 3 and memory.special == "cont"
    enc = AutoTokenizer.from_pretrained(tiny_models / "encoder")
    assert enc.decode([t for seg in memory.segments for t in seg]) == records[0]["passages"][0]


def test_a_step_holds_the_same_records_on_one_rank_or_two(tiny_models, tiny_qa):
    """2 ranks x 1 micro-batch and 1 rank x 2 micro-batches: each step is the same records and decoder."""
    two = qa_config(tiny_models, tiny_qa[0], "data.num_workers=0")
    one = qa_config(tiny_models, tiny_qa[0], "data.num_workers=0", "train.grad_accum=2")
    per_rank = [keys(build_train_loader(two, rank, 2), 6) for rank in (0, 1)]
    straight = [{(d, tuple(ks)) for _, d, ks in (per_rank[0][s], per_rank[1][s])} for s in range(6)]
    alone = keys(build_train_loader(one, 0, 1), 12)
    assert [{(d, tuple(ks)) for _, d, ks in alone[2 * s : 2 * s + 2]} for s in range(6)] == straight
    assert len({d for step in straight for d, _ in step}) == 2  # both decoders, one per step


def test_long_contexts_are_counted_before_training(tiny_models, tmp_path):
    from arctrain.data.qa import check_qa

    path = tmp_path / "qa.jsonl"
    _write(
        path,
        [
            {"question": "q", "answer": "a", "passages": ["word " * 50, "more " * 50]},
            {"question": "q", "answer": "a", "passage": "short"},
        ],
    )
    said = []
    check_qa(qa_config(tiny_models, path, "data.qa.context_tokens=40"), said.append)
    assert said == [
        f"data.qa.train {path}: 1 of 2 records have passages longer than data.qa.context_tokens=40 encoder "
        "tokens: cut to it"
    ]
    said.clear()
    check_qa(qa_config(tiny_models, path, "data.qa.context_tokens=400"), said.append)
    assert said == []
