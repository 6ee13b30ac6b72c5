"""arctrain.data: exact resume for any workers and world size, mixing, no hangs, tokenizer refusal, examples.

Shards are written here exactly as docs/ARCHITECTURE.md §2 specifies (webdataset.ShardWriter, manifest.json),
tokenized with the tiny models' real tokenizers.
"""

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from transformers import AutoTokenizer

from arctrain.config.load import load_config
from arctrain.data import ValSet, Vocab, build_train_loader, schedule
from arctrain.data.batch import IGNORE, collate, example_tokens, pretraining_example, within_budget
from arctrain.data.sampling import Layout, SourceMixer, SourceStream
from arctrain.data.val import spread
from data_tools.tokenizer_id import tokenizer_hash

TOKENIZERS = ("encoder", "llama", "mistral")


def write_shards(
    out: Path, models: Path, docs: list[dict], *, per_shard: int, val_docs: int = 2, words: int = 12, window: int = 3
) -> dict[str, dict]:
    """Shards of `docs` in `out` (segments of `words` words, windows of `window` segments); returns key -> meta."""
    toks = {name: AutoTokenizer.from_pretrained(models / name) for name in TOKENIZERS}
    splits = {"val": docs[:val_docs], "train": docs[val_docs:]}
    manifest_splits, metas = {}, {}
    out.mkdir(parents=True)
    for split, split_docs in splits.items():
        samples = [s for doc in split_docs for s in _windows(doc, toks, words, window)]
        shards = []
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for sample in samples:
                sink.write(sample)
                metas[sample["__key__"]] = {**sample["json"], "split": split}
        for i, name in enumerate(sorted(p.name for p in out.glob(f"{split}-*.tar"))):
            count = len(samples[i * per_shard : (i + 1) * per_shard])
            data = (out / name).read_bytes()
            shards.append(
                {"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        manifest_splits[split] = {"samples": len(samples), "shards": shards}
    tokenizers = {
        n: {"path": str(models / n), "hash": tokenizer_hash(models / n), "vocab_size": len(t), "dtype": "uint16"}
        for n, t in toks.items()
    }
    manifest = {
        "format": "arc-shards",
        "format_version": 1,
        "tool_version": "test",
        "segment_tokens": words,
        "window_segments": window,
        "tokenizers": tokenizers,
        "splits": manifest_splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return metas


def _windows(doc: dict, toks: dict, words: int, window: int) -> list[dict]:
    text = doc["text"]
    starts = [i for i in range(len(text)) if not text[i].isspace() and (i == 0 or text[i - 1].isspace())]
    cuts = starts[::words][1:]
    spans = list(zip([0, *cuts], [*cuts, len(text)]))
    groups = [spans[i : i + window] for i in range(0, len(spans), window)]
    if len(groups) > 1 and len(groups[-1]) == 1:  # a trailing single segment joins the previous window
        groups[-2:] = [groups[-2] + groups[-1]]
    samples = []
    for w, group in enumerate(groups):
        key = f"{hashlib.sha256(doc['id'].encode()).hexdigest()[:16]}-{w:05d}"
        meta = {"doc_id": doc["id"], "source": "test", "window": w, "n_segments": len(group), "char_spans": group}
        sample = {"__key__": key, "json": meta}
        for name, tok in toks.items():
            segs = [tok.encode(text[a:b], add_special_tokens=False) for a, b in group]
            sample[f"{name}.ids.npy"] = np.asarray([t for s in segs for t in s], dtype=np.uint16)
            sample[f"{name}.offsets.npy"] = np.cumsum([0] + [len(s) for s in segs]).astype(np.int64)
        samples.append(sample)
    return samples


@pytest.fixture(scope="module")
def corpus(tiny_models) -> list[dict]:
    docs = [json.loads(line) for line in (tiny_models / "corpus.jsonl").read_text().splitlines()]
    return [d for d in docs if len(d["text"].split()) >= 30][:40]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_models, corpus) -> dict:
    """Two shard directories (disjoint documents) and every sample's metadata, with the docs by id."""
    root = tmp_path_factory.mktemp("shards")
    metas = write_shards(root / "a", tiny_models, corpus[:20], per_shard=7)
    metas |= write_shards(root / "b", tiny_models, corpus[20:], per_shard=5)
    return {"root": root, "metas": metas, "docs": {d["id"]: d["text"] for d in corpus}}


def make_config(models: Path, shard_dirs: str, *overrides: str):
    return load_config(
        None,
        [
            f"model.encoder_path={models / 'encoder'}",
            "decoders.0.name=llama",
            f"decoders.0.path={models / 'llama'}",
            "decoders.1.name=mistral",
            f"decoders.1.path={models / 'mistral'}",
            f"data.shards={shard_dirs}",
            "data.micro_batch_size=3",
            "data.shuffle_buffer=8",
            "train.precision=fp32",
            "deepspeed=ds_configs/zero3_cpu.json",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def vocab(tiny_models, shards) -> Vocab:
    return Vocab.from_config(make_config(tiny_models, str(shards["root"] / "a")))


def take(loader, n: int) -> list[tuple[int, list[str], str, str, list]]:
    out = []
    for b, batch in loader:
        out.append((b, batch.keys, batch.decoder, batch.task, batch.dec_ids.tolist()))
        if len(out) == n:
            return out


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_is_exact_for_any_workers_and_world_size(tiny_models, shards, vocab, workers, world_size):
    root = shards["root"]
    cfg = make_config(tiny_models, f"{root / 'a'}:1,{root / 'b'}:2", f"data.num_workers={workers}")
    for rank in range(world_size):
        full = take(build_train_loader(cfg, rank, world_size, vocab), 20)
        first = build_train_loader(cfg, rank, world_size, vocab)
        head = take(first, 10)
        resumed = build_train_loader(cfg, rank, world_size, vocab)
        resumed.load_state_dict(first.state_dict())
        assert first.state_dict() == {"next_batch": 10}
        assert [b for b, *_ in full] == list(range(20))
        assert head + take(resumed, 10) == full
        odd = build_train_loader(cfg, rank, world_size, vocab)  # a start that is not a multiple of the workers
        odd.load_state_dict({"next_batch": 7})
        assert take(odd, 13) == full[7:]
        assert len({d for _, _, d, _, _ in full}) == 2  # both decoders, whole batches of one
    if world_size == 2:  # the ranks read different samples
        keys = [{k for _, ks, *_ in take(build_train_loader(cfg, r, 2, vocab), 3) for k in ks} for r in (0, 1)]
        assert not keys[0] & keys[1]


def test_an_epoch_visits_every_sample_once_across_ranks(tiny_models, shards, vocab):
    cfg = make_config(tiny_models, str(shards["root"] / "a"), "data.micro_batch_size=1", "data.num_workers=0")
    train_keys = _keys_of(shards, "a")
    n = len(train_keys)  # rank 0 takes the extra sample when n is odd
    per_rank = [take(build_train_loader(cfg, r, 2, vocab), (n + 1 - r) // 2) for r in (0, 1)]
    first_epoch = [k for rank in per_rank for _, ks, *_ in rank for k in ks]
    assert sorted(first_epoch) == sorted(train_keys)
    # The next epoch is another order of the same samples.
    two_epochs = [k for _, ks, *_ in take(build_train_loader(cfg, 0, 1, vocab), 2 * n) for k in ks]
    assert sorted(two_epochs[n:]) == sorted(two_epochs[:n]) and two_epochs[n:] != two_epochs[:n]


def _keys_of(shards: dict, name: str) -> set[str]:
    manifest = json.loads((shards["root"] / name / "manifest.json").read_text())
    keys = set()
    for entry in manifest["splits"]["train"]["shards"]:
        with tarfile.open(shards["root"] / name / entry["name"]) as tar:
            keys |= {m.name.split(".")[0] for m in tar}
    return keys


def test_mixing_follows_the_weights(tiny_models, shards, vocab):
    root = shards["root"]
    cfg = make_config(tiny_models, f"{root / 'a'}:1,{root / 'b'}:3", "data.micro_batch_size=1", "data.num_workers=0")
    in_b = _keys_of(shards, "b")
    keys = [ks[0] for _, ks, *_ in take(build_train_loader(cfg, 0, 1, vocab), 400)]
    share_b = sum(k in in_b for k in keys) / len(keys)
    assert 0.68 < share_b < 0.82, share_b
    mixer = SourceMixer(seed=3, weights=(1.0, 3.0))
    counts = Counter(mixer.locate(b)[0] for b in range(20000))
    assert 0.73 < counts[1] / 20000 < 0.77
    # Each source's batches take consecutive positions of that source's stream.
    located = [mixer.locate(b) for b in range(10000)]
    for source in (0, 1):
        assert [j for s, j in located if s == source] == list(range(counts_in(located, source)))
    assert SourceMixer(3, (1.0, 3.0)).locate(9999) == located[9999]  # a fresh mixer agrees: resume anywhere


def test_a_batch_mixes_sources_and_distant_shards(tiny_models, shards, vocab):
    root = shards["root"]
    cfg = make_config(tiny_models, f"{root / 'a'}:1,{root / 'b'}:2", "data.micro_batch_size=6", "data.num_workers=0")
    in_b = _keys_of(shards, "b")
    batches = [keys for _, keys, *_ in take(build_train_loader(cfg, 0, 1, vocab), 40)]
    mixed = sum(0 < sum(k in in_b for k in keys) < len(keys) for keys in batches)
    assert mixed >= 30, mixed  # one batch of 6 is all of one source with probability (1/3)^6 + (2/3)^6 = 0.09
    # Lanes: neighbouring positions come from `lanes` different shards; each lane reads its range in order.
    stream = SourceStream(0, 0, (10,) * 8, shuffle_buffer=1, lanes=4)
    located = [stream.locate(j) for j in range(80)]
    assert len({shard for shard, _ in located[:4]}) == 4
    assert located[4] == (located[0][0], located[0][1] + 1)
    assert sorted(located) == sorted((s, i) for s in range(8) for i in range(10))  # still every sample once


def counts_in(located: list[tuple[int, int]], source: int) -> int:
    return sum(s == source for s, _ in located)


def test_plan_fixes_the_decoder_per_step_and_follows_weights(tiny_models, shards):
    cfg = make_config(tiny_models, str(shards["root"] / "a"), "train.grad_accum=4", "decoders.1.weight=3")
    plan = schedule(cfg)
    plans = [plan.plan(7, b) for b in range(16000)]
    steps = [{d for d, _ in plans[s * 4 : s * 4 + 4]} for s in range(4000)]
    assert all(len(s) == 1 for s in steps)
    assert 0.72 < sum(s == {"mistral"} for s in steps) / 4000 < 0.78
    assert 0.18 < sum(t == "reconstruction" for _, t in plans) / 16000 < 0.22
    assert [plan.plan(7, b) for b in range(100)] == plans[:100] and plan.plan(8, 5) is not None
    robin = schedule(make_config(tiny_models, str(shards["root"] / "a"), "train.decoder_schedule=round_robin"))
    assert [robin.plan(0, b)[0] for b in range(4)] == ["llama", "mistral", "llama", "mistral"]


def test_a_tiny_source_repeats_for_every_rank():
    """A source of 3 samples read by 4 ranks (one sample each per micro-batch): every epoch is all 3, in a new
    order, and no position is ever out of range."""
    stream = SourceStream(0, 0, (3,), shuffle_buffer=2)
    seen = [stream.locate(j) for j in range(12)]
    assert all(shard == 0 and 0 <= i < 3 for shard, i in seen)
    assert all(sorted(seen[e * 3 : e * 3 + 3]) == [(0, 0), (0, 1), (0, 2)] for e in range(4))


def test_a_step_holds_the_same_micro_batches_at_any_world_size(tiny_models, shards, vocab):
    """world_size x grad_accum = 6 micro-batches per step, split 6x1, 3x2, 2x3 or 1x6 (workers 0 and 2): every step
    is the same 6 micro-batches (keys, decoder, task, decoder tokens), each at the same global index."""
    root = shards["root"]

    def steps(world_size: int, workers: int) -> list[dict[int, tuple]]:
        accum = 6 // world_size
        cfg = make_config(
            tiny_models, f"{root / 'a'}:1,{root / 'b'}:2", f"train.grad_accum={accum}", f"data.num_workers={workers}"
        )
        out = [{} for _ in range(4)]
        for rank in range(world_size):
            loader = build_train_loader(cfg, rank, world_size, vocab)
            for b, keys, decoder, task, ids in take(loader, 4 * accum):
                out[b // accum][loader.global_batch(b)] = (keys, decoder, task, ids)
        return out

    reference = steps(6, 0)
    assert [sorted(step) for step in reference] == [list(range(s * 6, s * 6 + 6)) for s in range(4)]
    assert all(len({d for _, d, _, _ in step.values()}) == 1 for step in reference)  # one decoder per step
    for world_size, workers in ((1, 2), (2, 0), (3, 2)):
        assert steps(world_size, workers) == reference, world_size


def test_layout_deals_each_step_to_ranks_and_accumulation_slots():
    slots = {(r, b): Layout(r, 2, 3).global_batch(b) for r in (0, 1) for b in range(6)}
    assert sorted(slots.values()) == list(range(12))
    assert [slots[(0, b)] for b in range(3)] == [0, 2, 4] and [slots[(1, b)] for b in range(3)] == [1, 3, 5]
    assert Layout(0, 1, 1).global_batch(17) == 17  # one rank, no accumulation: the local index itself


def test_fewer_shards_than_ranks_times_workers_does_not_hang(tmp_path, tiny_models, corpus, vocab):
    write_shards(tmp_path / "one", tiny_models, corpus[:3], per_shard=100, val_docs=1)  # 1 train shard
    cfg = make_config(tiny_models, str(tmp_path / "one"), "data.num_workers=2", "data.micro_batch_size=4")
    for rank in (0, 1):
        got = take(build_train_loader(cfg, rank, 2, vocab), 6)
        assert [b for b, *_ in got] == list(range(6)) and all(len(keys) == 4 for _, keys, *_ in got)


def test_examples_compress_segment_i_and_target_i_or_the_next(tiny_models, shards, vocab):
    cfg = make_config(tiny_models, str(shards["root"] / "a"), "data.num_workers=0", "decoders.1.prefix=Document: ")
    toks = {n: AutoTokenizer.from_pretrained(tiny_models / n) for n in TOKENIZERS}
    vocab = Vocab.from_config(cfg)
    seen = set()
    for _, batch in take_batches(build_train_loader(cfg, 0, 1, vocab), 12):
        seen.add(batch.task)
        dec = toks[batch.decoder]
        for row, key in enumerate(batch.keys):
            meta = shards["metas"][key]
            text, spans = shards["docs"][meta["doc_id"]], meta["char_spans"]
            memory = toks["encoder"].decode(batch.segments()[row])
            i = next(j for j, (a, b) in enumerate(spans) if text[a:b] == memory)
            ids, slots, labels = (batch.rows(x)[row] for x in (batch.dec_ids, batch.dec_slot, batch.labels))
            target = dec.decode(labels[labels != IGNORE].tolist())
            j = i if batch.task == "reconstruction" else i + 1
            assert target == (text[spans[j][0] : spans[j][1]] if j < len(spans) else "")
            assert ids[0] == dec.bos_token_id
            text_ids = ids[(slots == -1) & (labels == IGNORE)][1:].tolist()
            prefix = dec.encode("Document: ", add_special_tokens=False) if batch.decoder == "mistral" else []
            assert text_ids[: len(prefix)] == prefix
    assert seen == {"reconstruction", "continuation"}


def take_batches(loader, n: int):
    for count, item in enumerate(loader, 1):
        yield item
        if count == n:
            return


def test_the_val_set_is_fixed_spread_over_every_source_and_shard_for_any_world_size(tiny_models, shards, vocab):
    root = shards["root"]
    cfg = make_config(tiny_models, f"{root / 'a'},{root / 'b'}", "eval.batches=11", "data.micro_batch_size=4")
    val_keys = {k for k, m in shards["metas"].items() if m["split"] == "val"}
    per_world = {}
    for world_size in (1, 2, 3, 5):
        sets = [ValSet(cfg, vocab, r, world_size) for r in range(world_size)]
        runs = [v.batches("llama", "continuation") for v in sets]
        assert sets[0].batches("llama", "continuation") is runs[0]  # collated once per run
        # Every rank runs the same number of batches, source by source (ZeRO-3).
        assert len({tuple(source for source, _ in run) for run in runs}) == 1
        rows = sorted(
            (source, key, ids.tolist(), labels[labels != IGNORE])
            for run in runs
            for source, b in run
            for key, ids, labels in zip(b.keys, b.rows(b.dec_ids), b.rows(b.labels), strict=True)
            if key != "pad"
        )
        rows = [(*r[:3], r[3].tolist()) for r in rows]
        per_world[world_size] = rows
        padding = [b for run in runs for _, b in run for key in b.keys if key == "pad"]
        assert all((b.labels == IGNORE).all() for b in padding)  # padding counts no tokens
    # The same samples, segments and targets whatever the world size: 11 x 4 picks, half per source (all of a's
    # 13 val samples, 22 of b's 41).
    assert all(rows == per_world[1] for rows in per_world.values())
    assert len({key for _, key, *_ in per_world[1]}) == 35 and {key for _, key, *_ in per_world[1]} <= val_keys
    assert [s for s, *_ in per_world[1]] == ["a"] * 13 + ["b"] * 22
    shard_of = {
        m.name.split(".")[0]: (d, p.name)
        for d in ("a", "b")
        for p in (root / d).glob("val-*.tar")
        for m in tarfile.open(p)
    }
    val_shards = {(d, p.name) for d in ("a", "b") for p in (root / d).glob("val-*.tar")}
    assert {shard_of[key] for _, key, *_ in per_world[1]} == val_shards  # every val shard of every source
    assert spread(10, 3) == [1, 5, 8] and spread(2, 5) == [0, 1]
    other_seed = make_config(
        tiny_models, f"{root / 'a'},{root / 'b'}", "eval.batches=11", "data.micro_batch_size=4", "train.seed=9"
    )
    assert [b.keys for _, b in ValSet(other_seed, vocab, 0, 1).batches("llama", "continuation")] == [
        b.keys for _, b in ValSet(cfg, vocab, 0, 1).batches("llama", "continuation")
    ]


def test_tokenizer_mismatch_is_refused_in_one_line(tmp_path, tiny_models, corpus, vocab):
    write_shards(tmp_path / "s", tiny_models, corpus[:3], per_shard=10, val_docs=1)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["tokenizers"]["mistral"]["hash"] = "0" * 64
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_config(tiny_models, str(tmp_path / "s"))
    with pytest.raises(ValueError) as err:
        build_train_loader(cfg, 0, 1, vocab)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "s") in message and "'mistral'" in message
    assert "0" * 64 in message and tokenizer_hash(tiny_models / "mistral") in message
    del manifest["tokenizers"]["mistral"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json has no tokenizer 'mistral'"):
        build_train_loader(cfg, 0, 1, vocab)


def test_manifest_and_tar_must_agree(tmp_path, tiny_models, corpus, vocab):
    write_shards(tmp_path / "s", tiny_models, corpus[:4], per_shard=100, val_docs=1)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] += 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_config(tiny_models, str(tmp_path / "s"), "data.num_workers=0")
    with pytest.raises(ValueError, match="train-000000.tar: holds \\d+ samples, manifest.json says"):
        take(build_train_loader(cfg, 0, 1, vocab), 50)


def test_fair_mode_sends_each_steps_batches_to_every_decoder_in_turn(tiny_models, shards, vocab):
    """train.decoder_schedule=fair: steps 2k and 2k+1 (two decoders) hold the same samples, the same task and the same
    encoder ids (decoder tokens of each decoder's own tokenizer), and the data steps are those of a plain run."""
    root = f"{shards['root'] / 'a'}:1,{shards['root'] / 'b'}:2"
    fair = make_config(tiny_models, root, "train.decoder_schedule=fair", "train.grad_accum=2", "data.num_workers=0")
    got = [batch for _, batch in take_batches(build_train_loader(fair, 0, 1, vocab), 16)]  # 8 steps of 2
    assert [got[2 * s].decoder for s in range(8)] == ["llama", "mistral"] * 4
    for s in range(0, 8, 2):
        for k in (0, 1):
            a, b = got[2 * s + k], got[2 * s + 2 + k]
            assert a.keys == b.keys and a.task == b.task and torch.equal(a.enc.ids, b.enc.ids)
            assert a.dec_ids.tolist() != b.dec_ids.tolist()  # each decoder's own tokens
    plain = make_config(tiny_models, root, "train.grad_accum=2", "data.num_workers=0")
    data = [batch for _, batch in take_batches(build_train_loader(plain, 0, 1, vocab), 8)]
    assert [got[4 * j + k].keys for j in range(4) for k in (0, 1)] == [d.keys for d in data]
    assert [got[4 * j + k].task for j in range(4) for k in (0, 1)] == [d.task for d in data]


@pytest.mark.parametrize(
    "override, key",
    [("train.decoder_hold=2", "train.decoder_hold"), ("decoders.1.weight=3", "decoders.1.weight")],
)
def test_fair_mode_refuses_settings_it_would_ignore(tiny_models, shards, override, key):
    from arctrain.config.tree import ConfigError

    with pytest.raises(ConfigError, match=f"^{key}: .*decoder_schedule=fair"):
        make_config(tiny_models, str(shards["root"] / "a"), "train.decoder_schedule=fair", override)


def test_interleaved_continuation_puts_the_text_before_the_compressed_segment(tiny_models, shards, vocab):
    """data.interleave_tokens=N: [BOS, the last N decoder tokens before segment i, vectors of i, <Cont>, segment i+1];
    with windows of 3 segments, i = 1 (the one segment that has text before it and a next one)."""
    n = 5
    cfg = make_config(
        tiny_models, str(shards["root"] / "a"), f"data.interleave_tokens={n}", "data.task_ratio=0", "data.num_workers=0"
    )
    toks = {name: AutoTokenizer.from_pretrained(tiny_models / name) for name in TOKENIZERS}
    rows = 0
    for _, batch in take_batches(build_train_loader(cfg, 0, 1, vocab), 6):
        dec = toks[batch.decoder]
        for row, key in enumerate(batch.keys):
            meta = shards["metas"][key]
            text, spans = shards["docs"][meta["doc_id"]], meta["char_spans"]
            memory = toks["encoder"].decode(batch.segments()[row])
            assert memory == text[spans[1][0] : spans[1][1]]
            ids, labels = batch.rows(batch.dec_ids)[row], batch.rows(batch.labels)[row]
            slots = batch.rows(batch.dec_slot)[row].tolist()
            before = ids[1 : slots.index(next(s for s in slots if s >= 0))].tolist()  # after BOS
            assert len(before) == n and text[spans[0][0] : spans[0][1]].endswith(dec.decode(before))
            assert (labels[: len(before) + 1] == IGNORE).all()  # no loss on the text before
            target = dec.decode(labels[labels != IGNORE].tolist())
            assert target == text[spans[2][0] : spans[2][1]]
            rows += 1
    assert rows == 18


def test_fair_and_interleaved_batches_resume_exactly_mid_pair(tiny_models, shards, vocab):
    root = f"{shards['root'] / 'a'}:1,{shards['root'] / 'b'}:2"
    cfg = make_config(
        tiny_models, root, "train.decoder_schedule=fair", "data.interleave_tokens=6", "data.num_workers=2"
    )
    full = take(build_train_loader(cfg, 1, 2, vocab), 10)
    resumed = build_train_loader(cfg, 1, 2, vocab)
    resumed.load_state_dict({"next_batch": 5})  # step 5: the second decoder of a fair pair
    assert take(resumed, 5) == full[5:]


def test_examples_without_a_target_are_left_out_and_counted(tmp_path, tiny_models, corpus, vocab):
    # Documents of 5-11 words are one-segment samples (12-word segments): drawn for continuation they have no target.
    # Documents of 36 words are one three-segment sample.
    short = [{"id": f"short{j}", "text": " ".join(d["text"].split()[: 5 + j % 7])} for j, d in enumerate(corpus)]
    long = [{"id": f"long{j}", "text": " ".join(d["text"].split()[:36])} for j, d in enumerate(corpus)]
    metas = write_shards(tmp_path / "mixed", tiny_models, long[:13] + short[:12], per_shard=100, val_docs=1)
    cfg = make_config(tiny_models, str(tmp_path / "mixed"), "data.num_workers=0", "data.micro_batch_size=4")
    skipped = {"reconstruction": 0, "continuation": 0}
    for _, batch in take_batches(build_train_loader(cfg, 0, 1, vocab), 40):
        kept = batch.stats.samples
        assert kept == len(batch.keys) and kept + batch.stats.skipped_rows == 4
        if batch.stats.skipped_rows:
            assert all(metas[key]["n_segments"] > 1 for key in batch.keys)
            assert all((row != IGNORE).any() for row in batch.rows(batch.labels))  # every computed row has a target
        skipped[batch.task] += batch.stats.skipped_rows
    assert skipped["reconstruction"] == 0 and skipped["continuation"] > 0

    # A batch of one-segment samples only is kept whole, without targets: every rank must still run the model.
    write_shards(tmp_path / "short", tiny_models, short[:12], per_shard=100, val_docs=1)
    cfg = make_config(tiny_models, str(tmp_path / "short"), "data.num_workers=0", "data.micro_batch_size=4")
    for _, batch in take_batches(build_train_loader(cfg, 0, 1, vocab), 10):
        assert len(batch.keys) == 4 and batch.stats.skipped_rows == 0
        assert (batch.stats.targets == 0) == (batch.task == "continuation")


def test_within_budget_takes_the_windows_first_examples_that_fit():
    assert within_budget([3, 4, 2, 1], 10) == ([0, 1, 2, 3], 0, 0)
    assert within_budget([3, 4, 5, 1], 10) == ([0, 1], 0, 2)  # 5 no longer fits: it and the rest are left
    assert within_budget([12, 4, 11, 6, 1], 10) == ([1, 3], 2, 1)  # 12 and 11 alone exceed it: skipped
    assert within_budget([11], 10) == ([], 1, 0)


def _sizes(batch) -> list[int]:
    """Encoder tokens + decoder positions of each example of a pretraining batch (one segment per row)."""
    return [e + d for e, d in zip(batch.enc.cu_seqlens.diff().tolist(), batch.row_lengths, strict=True)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_token_budget_micro_batches_fit_and_resume_exactly(tiny_models, shards, vocab, world_size):
    """data.tokens_per_micro_batch: every micro-batch holds the first examples of its window of micro_batch_size
    samples (those with a target) whose encoder + decoder tokens fit; the rest is counted. The window is that of
    the run without a budget, so resume is exact and a global micro-batch is the same at any world size (2 micro-batches
    per step: 1 rank x 2 or 2 ranks x 1)."""
    root = shards["root"]
    sources = f"{root / 'a'}:1,{root / 'b'}:2"
    plain_cfg = make_config(tiny_models, sources, "data.micro_batch_size=6", "train.grad_accum=2")
    plain = [b for _, b in take_batches(build_train_loader(plain_cfg, 0, 1, vocab), 16)]  # global micro-batches 0-15
    budget = sorted(sum(_sizes(b)) for b in plain)[len(plain) // 2] * 2 // 3  # binds on most windows
    cfg = make_config(
        tiny_models,
        sources,
        "data.micro_batch_size=6",
        f"data.tokens_per_micro_batch={budget}",
        "data.num_workers=1",
        f"train.grad_accum={2 // world_size}",
    )
    left = 0
    for rank in range(world_size):
        loader = build_train_loader(cfg, rank, world_size, vocab)
        got = [(b, batch) for b, batch in take_batches(loader, 16 // world_size)]
        for b, batch in got:
            reference = plain[loader.global_batch(b)]  # the same global micro-batch without a budget
            total, expected = 0, []
            for key, n in zip(reference.keys, _sizes(reference), strict=True):
                if total + n > budget:
                    break
                total += n
                expected.append(key)
            assert batch.keys == expected and batch.decoder == reference.decoder and batch.task == reference.task
            assert batch.stats.enc_tokens + batch.stats.dec_tokens == total <= budget
            s = batch.stats
            assert s.samples + s.skipped_rows + s.budget_full + s.over_budget == 6
            left += s.budget_full
        first = build_train_loader(cfg, rank, world_size, vocab)
        head = take(first, 5)
        resumed = build_train_loader(cfg, rank, world_size, vocab)
        resumed.load_state_dict(first.state_dict())
        assert head + take(resumed, 16 // world_size - 5) == take(
            build_train_loader(cfg, rank, world_size, vocab), 16 // world_size
        )
    assert left > 0  # the budget bound
    val = [[b.keys for _, b in ValSet(c, vocab, 0, 1).batches("llama", "continuation")] for c in (cfg, plain_cfg)]
    assert val[0] and val[0] == val[1]  # validation batches take all their samples, whatever the budget


def test_a_budget_below_every_sample_is_refused_in_one_line(tiny_models, shards, vocab):
    cfg = make_config(tiny_models, str(shards["root"] / "a"), "data.tokens_per_micro_batch=5", "data.num_workers=0")
    with pytest.raises(
        ValueError,
        match=r"^data.tokens_per_micro_batch=5: every sample of a micro-batch is larger "
        r"on its own \(sample [0-9a-f]{16}-\d{5}: \d+ encoder \+ decoder tokens\)",
    ):
        take(build_train_loader(cfg, 0, 1, vocab), 1)


def test_example_tokens_count_what_collate_lays_out(tiny_models, shards, vocab):
    cfg = make_config(tiny_models, str(shards["root"] / "a"))
    for _, batch in take_batches(build_train_loader(cfg, 0, 1, vocab), 4):
        assert sum(_sizes(batch)) == batch.stats.enc_tokens + batch.stats.dec_tokens
        examples = [pretraining_example("continuation", [[1] * 9, [2] * 5], [[3] * 4, [4] * 6], 0, [7, 8])]
        one = collate(examples, pooling="mean", factor=4, n_vectors=0, dec_pad_id=0, bos_id=1)
        assert (
            example_tokens(examples[0], 4, 0, bos=True) == one.stats.enc_tokens + one.stats.dec_tokens == 9 + 13
        )  # BOS, 2 prefix, 3 vectors, <Cont>, 6 targets
