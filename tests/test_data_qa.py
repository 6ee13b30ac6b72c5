"""QA fine-tuning batches (arctrain/data/qa.py): the prompt, targets on answers only, exact resume, epochs."""

import json

import pytest
from transformers import AutoTokenizer

from arctrain.config import load_config
from arctrain.data import Vocab, build_train_loader
from arctrain.data.qa import QAMaker, read_qa
from arctrain.model.batch import IGNORE, Memory


def qa_config(tiny_models, train, *extra):
    overrides = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        "data.shards=[]",
        f"data.qa={train}",
        "data.micro_batch_size=4",
        "eval.interval=0",
        *extra,
    ]
    return load_config("configs/tiny_cpu.yaml", overrides)


def keys(loader, n):
    it = iter(loader)
    return [(b, batch.decoder, batch.keys) for b, batch in (next(it) for _ in range(n))]


def test_targets_are_the_answer_only(tiny_models, tiny_qa):
    cfg = qa_config(tiny_models, tiny_qa[0], "data.qa_shots=1")
    records = read_qa(tiny_qa[0])
    maker = QAMaker(cfg, Vocab.from_config(cfg))
    batch = maker.batch(records, [0, 5], "mistral", ["a", "b"])
    tok = AutoTokenizer.from_pretrained(tiny_models / "mistral")
    for row, i in enumerate([0, 5]):
        target = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert tok.decode(target) == f" {records[i]['answers'][0]}\n"
        prompt = tok.decode(batch.dec_ids[row][batch.dec_slot[row] < 0].tolist())
        assert prompt.count("Document: ") == 2 and f"Question: {records[i]['question']}\nAnswer:" in prompt
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
    assert sorted(seen) == [f"qa-{i:08d}" for i in range(n)]


def test_bad_qa_records_are_one_line_errors(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": [], "passages": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl: record 1: 'answers' must be a non-empty list of strings"):
        read_qa(path)
    path.write_text(json.dumps({"question": "q", "answers": ["a"], "passages": ["  "]}) + "\n")
    with pytest.raises(ValueError, match=r"record 1: 'passages' has no text to compress"):
        read_qa(path)


def test_memory_holds_the_passages_segments(tiny_models, tiny_qa):
    cfg = qa_config(tiny_models, tiny_qa[0], "data.chunk_tokens=16")
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
