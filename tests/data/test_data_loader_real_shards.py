"""arctrain.data on real `arc-data build` output (the session's `tiny_shards`): content and resume."""

import json
import tarfile

import msgpack
from transformers import AutoTokenizer

from arctrain.config.load import load_config
from arctrain.data import Vocab, build_train_loader, val_batches
from arctrain.data.batch import IGNORE


def config(models, shards, *overrides):
    return load_config(
        None,
        [
            f"model.encoder_path={models / 'encoder'}",
            "decoders.0.name=llama",
            f"decoders.0.path={models / 'llama'}",
            "decoders.1.name=mistral",
            f"decoders.1.path={models / 'mistral'}",
            f"data.shards={shards}",
            "data.micro_batch_size=4",
            "train.precision=fp32",
            "deepspeed=ds_configs/zero3_cpu.json",
            *overrides,
        ],
    )


def sample_meta(shards) -> dict[str, dict]:
    """Key -> the sample's metadata (its K.mp member without the token arrays), from every tar."""
    metas = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".mp"):
                    metas[member.name[: -len(".mp")]] = msgpack.unpackb(tar.extractfile(member).read())
    return metas


def test_batches_hold_the_segments_the_manifest_describes(tiny_models, tiny_shards):
    cfg = config(tiny_models, tiny_shards, "data.num_workers=2", "decoders.0.prefix=Document: ")
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(tiny_models / "corpus.jsonl")}
    toks = {n: AutoTokenizer.from_pretrained(tiny_models / n) for n in ("encoder", "llama", "mistral")}
    metas, vocab = sample_meta(tiny_shards), Vocab.from_config(cfg)
    checked = {"reconstruction": 0, "continuation": 0}
    loader = build_train_loader(cfg, rank=1, world_size=2, vocab=vocab)
    for b, batch in loader:
        for row, key in enumerate(batch.keys):
            meta = metas[key]
            text, spans = docs[meta["doc_id"]], meta["char_spans"]
            segs = [text[s:e] for s, e in spans]
            memory = toks["encoder"].decode(batch.segments()[row])
            i = segs.index(memory)  # the compressed segment is one of the window's segments, exactly
            labels = batch.rows(batch.labels)[row]
            target = toks[batch.decoder].decode(labels[labels != IGNORE].tolist())
            j = i if batch.task == "reconstruction" else i + 1
            assert target == (segs[j] if j < len(segs) else "")
            checked[batch.task] += 1
        if b == 11:
            break
    assert checked["reconstruction"] > 0 and checked["continuation"] > 0
    assert loader.state_dict() == {"next_batch": 12}
    resumed = build_train_loader(cfg, rank=1, world_size=2, vocab=vocab)
    resumed.load_state_dict({"next_batch": 9})
    again = build_train_loader(cfg, rank=1, world_size=2, vocab=vocab)
    first = [batch.keys for _, (_, batch) in zip(range(12), again)]
    assert [batch.keys for _, (_, batch) in zip(range(3), resumed)] == first[9:12]


def test_val_batches_come_from_the_val_split(tiny_models, tiny_shards):
    cfg = config(tiny_models, tiny_shards, "eval.batches=2")
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    val_keys = set()
    for entry in manifest["splits"]["val"]["shards"]:
        with tarfile.open(tiny_shards / entry["name"]) as tar:
            val_keys |= {m.name.split(".")[0] for m in tar}
    batches = list(val_batches(cfg, "mistral", "continuation", 0, 1))
    assert len(batches) == 2 and all(len(b.keys) == 4 for b in batches) and len(val_keys) > 8
    assert {k for b in batches for k in b.keys} <= val_keys
    assert [b.keys for b in val_batches(cfg, "mistral", "continuation", 0, 1)] == [b.keys for b in batches]
