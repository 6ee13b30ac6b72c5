"""Bad inputs and faults as a user meets them, through the real commands (`arc-data ...`, `arctrain ...` in a
subprocess): a non-zero exit and one line naming the file, key or value, never a traceback; or, where a good copy
is at hand (a checkpoint), one line saying which one is used instead."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"\d+/\d+ \[[0-9:<?]+")  # a progress bar's line (model loading)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    """`arc-data ARGS` / `arctrain ARGS` as the console scripts run them."""
    module = "data_tools.cli" if args[0] == "arc-data" else "arctrain"
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
    )


def error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The one error line of a failed command (warnings on skipped records aside), holding each of `expected`."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith("warning: ") and not PROGRESS.search(line)
    ]
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def tokenizer_args(models: Path) -> list[str]:
    return [
        "--encoder-tokenizer",
        str(models / "encoder"),
        "--decoder",
        f"llama={models / 'llama'}",
        "--segment-tokens",
        "48",
        "--no-progress",
    ]


def records(tiny_models: Path, n: int) -> list[dict]:
    lines = (tiny_models / "corpus.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def shards(tiny_models, tmp_path_factory) -> Path:
    """A small build: 40 documents, 48-token segments, small shards (several per split)."""
    root = tmp_path_factory.mktemp("bad_shards")
    src = write_jsonl(root / "docs.jsonl", records(tiny_models, 40))
    out = root / "shards"
    proc = run(
        "arc-data",
        "build",
        "--input",
        str(src),
        "--out",
        str(out),
        *tokenizer_args(tiny_models),
        "--val-fraction",
        "0.2",
        "--shard-size-mb",
        "0.05",
    )
    assert proc.returncode == 0, proc.stderr
    return out


# --- arc-data build: inputs ------------------------------------------------------------------------------------


def _no_usable_record(tmp: Path, models: Path) -> tuple[Path, list[str]]:
    return write_jsonl(tmp / "empty_texts.jsonl", [{"id": 1, "text": "  "}, {"id": 2, "text": ""}]), []


def _empty_file(tmp: Path, models: Path) -> tuple[Path, list[str]]:
    (tmp / "nothing.jsonl").write_text("")
    return tmp / "nothing.jsonl", []


def _corrupt_parquet(tmp: Path, models: Path) -> tuple[Path, list[str]]:
    path = tmp / "docs.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in records(models, 5)]}), path)
    path.write_bytes(path.read_bytes()[:-100])  # cut short: the footer is gone
    return path, []


def _mistyped_id_field(tmp: Path, models: Path) -> tuple[Path, list[str]]:
    return write_jsonl(tmp / "docs.jsonl", records(models, 5)), ["--id-field", "doc_id"]


def _parquet_without_the_id_column(tmp: Path, models: Path) -> tuple[Path, list[str]]:
    path = tmp / "docs.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in records(models, 5)]}), path)
    return path, ["--id-field", "url"]


@pytest.mark.parametrize(
    "make, expected",
    [
        (_no_usable_record, ["no document written (2 read, skipped: empty_text 2)"]),
        (_empty_file, ["no document written (0 read"]),
        (_corrupt_parquet, ["docs.parquet: not a readable parquet file"]),
        (
            _mistyped_id_field,
            ["--id-field 'doc_id': no record of", "docs.jsonl has it (record keys: id, source, text)"],
        ),
        (_parquet_without_the_id_column, ["--id-field 'url':", "docs.parquet has no such column (columns: text)"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_build_refuses_bad_inputs_in_one_line(tiny_models, tmp_path, make, expected):
    path, extra = make(tmp_path, tiny_models)
    out = tmp_path / "out"
    proc = run("arc-data", "build", "--input", str(path), "--out", str(out), *tokenizer_args(tiny_models), *extra)
    error_line(proc, "arc-data build: error:", *expected)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tar")) if out.exists() else True


def test_the_default_id_field_may_be_absent(tiny_models, tmp_path):
    """Records without "id" are named by their text's hash, as documented; only another field must exist."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": r["text"]} for r in records(tiny_models, 3)])
    proc = run("arc-data", "build", "--input", str(src), "--out", str(tmp_path / "out"), *tokenizer_args(tiny_models))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["docs"]["written"] == 3


# --- arc-data verify / inspect / merge ------------------------------------------------------------------------


def copy_of(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    return out


def edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _listed_twice(d: Path) -> str:
    def edit(m):
        m["splits"]["val"]["shards"].append(m["splits"]["train"]["shards"][0])
        m["splits"]["val"]["samples"] += m["splits"]["train"]["shards"][0]["samples"]

    edit_manifest(d, edit)
    return "train-000000.tar: listed under both train and val"


def _unlisted_shard(d: Path) -> str:
    shutil.copyfile(d / "train-000000.tar", d / "train-000999.tar")
    return "train-000999.tar: on disk but not in the manifest"


def _segment_tokens_edited(d: Path) -> str:
    edit_manifest(d, lambda m: m.update(segment_tokens=256))
    return "segment_tokens 256: only 0 of"


def _window_segments_edited(d: Path) -> str:
    edit_manifest(d, lambda m: m.update(window_segments=2))
    return "window_segments 2: sample"


@pytest.mark.parametrize("make", [_listed_twice, _unlisted_shard, _segment_tokens_edited, _window_segments_edited])
def test_verify_catches_what_the_hashes_do_not(shards, tmp_path, make):
    assert run("arc-data", "verify", str(shards)).returncode == 0
    directory = copy_of(shards, tmp_path)
    expected = make(directory)
    proc = run("arc-data", "verify", str(directory))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"arc-data verify: 1 problems in {directory}", proc.stderr


def test_inspect_of_a_truncated_shard_is_one_line(shards, tmp_path):
    directory = copy_of(shards, tmp_path)
    shard = directory / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    error_line(run("arc-data", "inspect", str(directory)), f"{shard}: not a readable tar")


def test_merge_refuses_a_part_changed_since_its_build(shards, tmp_path):
    part = copy_of(shards, tmp_path)
    shard = part / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    proc = run("arc-data", "merge", "--out", str(tmp_path / "merged"), str(part))
    error_line(proc, f"{shard}: sha256 differs from its manifest's")
    assert not (tmp_path / "merged" / "manifest.json").exists()


# --- arctrain: configs ----------------------------------------------------------------------------------------


def test_a_key_given_twice_in_a_config_is_refused(tmp_path):
    text = (REPO / "configs/tiny_cpu.yaml").read_text()
    assert text.count("\ntrain:\n") == 1
    path = tmp_path / "twice.yaml"
    path.write_text(text.replace("\ntrain:\n", "\ntrain:\n  steps: 5\n  steps: 7\n", 1))
    line = text[: text.index("\ntrain:\n")].count("\n") + 4  # the second "steps"
    error_line(run("arctrain", "train", "--config", str(path)), f"train.steps: duplicate key at {path}:{line}")


# --- checkpoints ----------------------------------------------------------------------------------------------


def fake_checkpoint(ckpts: Path, step: int) -> Path:
    """What a save leaves that `latest` checks: trainer_state.json and torch files (here a tiny one)."""
    import torch

    path = ckpts / f"step_{step:08d}"
    path.mkdir(parents=True)
    torch.save({"w": torch.ones(64)}, path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "next_sample": step * 16}))
    (ckpts / "latest").write_text(path.name + "\n")
    return path


def _missing(path: Path) -> str:
    shutil.rmtree(path)
    return f"{path} does not exist"


def _unfinished(path: Path) -> str:
    (path / "trainer_state.json").unlink()
    return f"{path} has no trainer_state.json"


def _truncated_state(path: Path) -> str:
    state = path / "trainer_state.json"
    state.write_text(state.read_text()[:9])
    return f"{state} is truncated or not JSON"


def _truncated_optimizer(path: Path) -> str:
    optim = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:300])
    return f"{optim} is truncated or not a torch file"


@pytest.mark.parametrize("damage", [_missing, _unfinished, _truncated_state, _truncated_optimizer])
def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys, damage):
    from arctrain.checkpoint.checkpointer import Checkpointer

    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts, 2)
    fake_checkpoint(ckpts, 4)
    why = damage(fake_checkpoint(ckpts, 6))
    checkpointer = Checkpointer(tmp_path, keep=3, rank=0)
    assert checkpointer.latest() == "step_00000004"
    assert checkpointer.trainer_state()["step"] == 4
    err = capsys.readouterr().err
    assert err.startswith(f"checkpoint: `latest` names step_00000006, but {why}") and err.count("\n") == 1, err
    assert err.endswith("; using step_00000004, the newest complete checkpoint\n"), err
    # with nothing complete left, one line naming what is wrong with the one `latest` names
    for step in (2, 4):
        _unfinished(ckpts / f"step_{step:08d}")
    with pytest.raises(ValueError, match=f"names step_00000006, but {why}.*; no other complete checkpoint"):
        Checkpointer(tmp_path, keep=3, rank=0).latest()


def test_export_of_a_damaged_checkpoint_names_the_file(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    optim = next((run_dir / "checkpoints" / "step_00000004").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])
    proc = run("arctrain", "export", "--run", str(run_dir), "--out", str(tmp_path / "exp"), "--step", "4")
    error_line(proc, f"{optim} is truncated or not a torch file")
    proc = run("arctrain", "export", "--run", str(run_dir), "--out", str(tmp_path / "exp"))
    assert proc.returncode == 0, proc.stderr
    assert f"but {optim} is truncated or not a torch file; using step_00000002" in proc.stderr


def resume_checkpointer(tmp_path: Path, *overrides: str):
    from arctrain.checkpoint.checkpointer import Checkpointer, resume_fingerprint
    from arctrain.config.load import load_config

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", list(overrides))
    path = fake_checkpoint(tmp_path / "checkpoints", 10)
    state = json.loads((path / "trainer_state.json").read_text())
    state.update(world_size=1, grad_accum=1, fingerprint=resume_fingerprint(cfg))
    (path / "trainer_state.json").write_text(json.dumps(state))
    return Checkpointer(tmp_path, keep=2, rank=0), path


@pytest.mark.parametrize(
    "override, key, old, new",
    [
        ("decoders.0.projector_hidden=64", "decoders.0.projector_hidden", 256, 64),
        ("model.n_truncated_layers=1", "model.n_truncated_layers", 2, 1),
        ("model.pooling_factor=8", "model.pooling_factor", 4, 8),
    ],
)
def test_resume_with_another_model_shape_is_refused_naming_the_key(tmp_path, override, key, old, new):
    from arctrain.checkpoint.checkpointer import resume_fingerprint
    from arctrain.config.load import load_config

    checkpointer, path = resume_checkpointer(tmp_path)
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", [override])
    assert resume_fingerprint(load_config(REPO / "configs/tiny_cpu.yaml"))[key] == old
    with pytest.raises(ValueError) as err:
        checkpointer.check_resumable(1, resume_fingerprint(cfg), 1, cfg.train.steps)
    assert str(err.value).startswith(f"{path} was written with {key}={old!r}, this run has {key}={new!r}: its weights")


def test_train_steps_below_the_checkpoint_step_is_an_error(tmp_path):
    from arctrain.checkpoint.checkpointer import resume_fingerprint
    from arctrain.config.load import load_config

    checkpointer, path = resume_checkpointer(tmp_path)
    cfg = load_config(REPO / "configs/tiny_cpu.yaml")
    assert checkpointer.check_resumable(1, resume_fingerprint(cfg), 1, 10) == 1  # at its step: nothing to do, no error
    with pytest.raises(ValueError, match=f"train.steps=9, but {path} is at step 10: nothing to train"):
        checkpointer.check_resumable(1, resume_fingerprint(cfg), 1, 9)


# --- arctrain import-arc --------------------------------------------------------------------------------------


def test_import_keeps_the_release_float32_under_a_bf16_backbone_config(tiny_models, tmp_path):
    """The Hub's Llama-3.2-3B config.json says bfloat16; the released ARC weights are float32 and stay so."""
    from helpers import backbone_dims, reference_weights, write_release
    from safetensors import safe_open

    backbone = tmp_path / "bf16_backbone"
    shutil.copytree(tiny_models / "encoder", backbone)
    config = json.loads((backbone / "config.json").read_text())
    (backbone / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    a = backbone_dims(backbone)
    emb, bridge = reference_weights(a, a["n_layers"] - 2, [128], 48)
    write_release(tmp_path / "src", a, emb, bridge, -8, 1, 48, 128)
    out = tmp_path / "out"
    proc = run("arctrain", "import-arc", str(tmp_path / "src"), "--out", str(out), "--backbone", str(backbone))
    assert proc.returncode == 0, proc.stderr
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        embedding = f.get_tensor(next(n for n in f.keys() if n.endswith("embed_tokens.weight")))
    assert dtypes == {"F32"}
    assert torch_equal(embedding, emb["tok_embeddings.weight"])  # the release's values, not rounded to bf16
    written = json.loads((out / "config.json").read_text())
    assert written["backbone"].get("dtype", "float32") == "float32", written["backbone"]
    assert written.get("dtype", "float32") == "float32"


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


# --- arctrain generate / eval ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_llama(tiny_models, tmp_path_factory) -> Path:
    """A decoder with the tiny Llama's tokenizer and another width (as Llama 3.2 3B and 3.1 8B share one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("wide") / "llama_wide"
    shutil.copytree(tiny_models / "llama", out)
    config = AutoConfig.from_pretrained(out)
    config.hidden_size += 32
    config.head_dim = config.hidden_size // config.num_attention_heads
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def context_files(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contexts")
    files = {"empty": root / "empty.txt", "latin1": root / "latin1.txt", "long": root / "long.txt"}
    files["empty"].write_text(" \n")
    files["latin1"].write_bytes("café au lait".encode("latin-1"))
    text = " ".join(r["text"] for r in records(tiny_models, 60))
    files["long"].write_text(text[:60_000])  # well over 4096 encoder tokens
    (root / "doc.txt").write_text(text[:400])
    files["doc"] = root / "doc.txt"
    return files


@pytest.mark.parametrize(
    "context, extra, expected",
    [
        ("empty", [], "--context-file {empty}: no text to compress"),
        ("latin1", [], "--context-file {latin1}: not UTF-8 text (byte 3)"),
        ("doc", ["--max-new-tokens", "5000"], "lower --max-new-tokens below 4096"),
        ("doc", ["--prompt", "word " * 4500], ": shorten the prompt or lower --max-new-tokens"),
        ("long", ["--context", "joint"], "longer than the encoder's window (max_position_embeddings=4096)"),
    ],
    ids=["empty", "not_utf8", "max_new_tokens", "long_prompt", "joint_context"],
)
def test_generate_refuses_bad_contexts_in_one_line(exported, tiny_models, context_files, context, extra, expected):
    args = [
        "--model",
        str(exported),
        "--decoder",
        str(tiny_models / "llama"),
        "--context-file",
        str(context_files[context]),
        "--prompt",
        "Q:",
        *extra,
    ]
    proc = run("arctrain", "generate", *args)
    error_line(proc, "arctrain: error:", expected.format(**context_files))


def test_a_decoder_of_another_width_is_refused(exported, tiny_models, wide_llama, context_files):
    config = json.loads((exported / "config.json").read_text())
    trained = next(d["hidden_size"] for d in config["decoders"] if d["name"] == "llama")  # the export records it
    assert trained == json.loads((tiny_models / "llama" / "config.json").read_text())["hidden_size"]
    proc = run(
        "arctrain",
        "generate",
        "--model",
        str(exported),
        "--decoder",
        str(wide_llama),
        "--context-file",
        str(context_files["doc"]),
        "--prompt",
        "Q:",
    )
    error_line(
        proc, f"--decoder {wide_llama}: hidden_size {trained + 32}", f"trained for a decoder of hidden_size {trained}"
    )


# --- arc-data build: interrupted, full disk, resumed ----------------------------------------------------------


@pytest.fixture(scope="module")
def big_input(tiny_models, tmp_path_factory) -> Path:
    """The whole corpus: a build of several seconds, in many small shards."""
    path = tmp_path_factory.mktemp("big") / "docs.jsonl"
    shutil.copyfile(tiny_models / "corpus.jsonl", path)
    return path


@pytest.fixture(scope="module")
def long_input(tiny_models, tmp_path_factory) -> Path:
    """The corpus six times over under distinct ids. On the whole corpus the first shard is journaled about 6 s into
    a 7.4 s build (worker start-up first), too close to the end for a signal sent after it on a loaded machine; here
    the shards after the first take several seconds more, so the interruption lands mid-build."""
    corpus = [json.loads(line) for line in (tiny_models / "corpus.jsonl").read_text().splitlines()]
    rows = [{**r, "id": f"{r['id']}#{k}"} for k in range(6) for r in corpus]
    return write_jsonl(tmp_path_factory.mktemp("long") / "docs.jsonl", rows)


@pytest.fixture(scope="module")
def long_reference(tiny_models, long_input, tmp_path_factory) -> Path:
    return built(tiny_models, long_input, tmp_path_factory.mktemp("long_reference") / "shards")


def build_args(models: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "arc-data",
        "build",
        "--input",
        str(src),
        "--out",
        str(out),
        *tokenizer_args(models),
        "--val-fraction",
        "0.1",
        "--shard-size-mb",
        "0.05",
        *extra,
    ]


def built(models: Path, src: Path, out: Path) -> Path:
    """`out`, built uninterrupted from `src`: the shards an interrupted and resumed build must equal."""
    proc = run(*build_args(models, src, out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def reference_build(tiny_models, big_input, tmp_path_factory) -> Path:
    return built(tiny_models, big_input, tmp_path_factory.mktemp("reference") / "shards")


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_an_interrupted_build_stops_in_one_line_and_resumes_to_identical_shards(
    tiny_models, long_input, long_reference, tmp_path, how
):
    import signal
    import time

    out = tmp_path / "shards"
    args = build_args(tiny_models, long_input, out, "--workers", "2")
    cmd = [sys.executable, "-m", "data_tools.cli", *args[1:]]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO, start_new_session=True
    )
    while not (out / "build.journal.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` or a scheduler sends it
    else:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr and "Error" not in stderr, stderr
    assert stderr.strip().splitlines() == [
        f"arc-data build: interrupted; rerun with --resume to continue from the last complete shard in {out}"
    ]
    assert not (out / "manifest.json").exists()
    assert run(*build_args(tiny_models, long_input, out)).returncode == 2  # not without --resume or --overwrite
    resumed = run(*build_args(tiny_models, long_input, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    same_files(out, long_reference)
    assert run("arc-data", "verify", str(out)).returncode == 0


def test_resume_refuses_other_options(tiny_models, big_input, reference_build, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(reference_build, out)
    (out / "manifest.json").unlink()
    from data_tools.journal import NAME, Position, write_journal

    write_journal(out, Position(identity={"options": {"segment_tokens": 16}}), {})
    error_line(run(*build_args(tiny_models, big_input, out, "--resume")), f"{out / NAME} was written with options")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only): a full disk for real."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_stops_a_build_in_one_line_and_resume_finishes_it(
    tiny_models, big_input, reference_build, small_disk
):
    out = small_disk / "shards"
    line = error_line(run(*build_args(tiny_models, big_input, out)), "No space left on device", "--resume")
    assert line.startswith(f"arc-data build: error: {out}/"), line
    assert not (out / "manifest.json").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    resumed = run(*build_args(tiny_models, big_input, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    same_files(out, reference_build)


def test_a_full_disk_stops_a_checkpoint_save_in_one_line(tiny_models, tiny_shards, small_disk):
    from helpers import tiny_paths

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    run_dir = small_disk / "run"
    config = str(REPO / "configs/tiny_cpu.yaml")
    proc = run(
        "arctrain",
        "train",
        "--config",
        config,
        *tiny_paths(tiny_models, tiny_shards),
        f"checkpoint.dir={run_dir}",
        "train.steps=1",
        "checkpoint.interval=1",
        "eval.interval=0",
        "logging.wandb_mode=disabled",
        "data.num_workers=0",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"arctrain train: error: {run_dir / 'checkpoints' / 'step_00000001'}: the checkpoint could not be written"
    ), proc.stderr
    assert "`latest` still names no checkpoint" in last
    assert (
        not (run_dir / "checkpoints" / "step_00000001").exists() and not (run_dir / "checkpoints" / "latest").exists()
    )


# --- arctrain train: shards checked at start-up and per sample -----------------------------------------------


def train_dry_run(tiny_models: Path, shard_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    from helpers import tiny_paths

    return run(
        "arctrain",
        "train",
        "--config",
        str(REPO / "configs/tiny_cpu.yaml"),
        "--dry-run",
        "--world-size",
        "1",
        *tiny_paths(tiny_models, shard_dir),
        *extra,
    )


def test_training_refuses_a_cut_short_shard_at_start_up(tiny_models, tiny_shards, tmp_path):
    shards = copy_of(tiny_shards, tmp_path)
    shard = shards / "train-000000.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    error_line(train_dry_run(tiny_models, shards), f"{shard}: {size // 2} bytes, manifest.json says {size}")


def flip_first_id(shard_dir: Path, to_vocab_offset: int) -> tuple[Path, str]:
    """Shard 0's first sample with its first llama id set to vocab_size + offset, in place (sizes unchanged)."""
    import numpy as np

    from data_tools.sample_format import unpack
    from data_tools.shard_index import load_index

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    row = load_index(shard_dir / entry["index"]["name"])[0]
    offset, size = (int(v) for v in row["mp"])
    shard = shard_dir / entry["name"]
    data = bytearray(shard.read_bytes())
    _, tokens = unpack(bytes(data[offset : offset + size]))
    ids = tokens["llama"][0]
    at = bytes(data[offset : offset + size]).index(ids.tobytes()) + offset
    bad = np.array([manifest["tokenizers"]["llama"]["vocab_size"] + to_vocab_offset], dtype=ids.dtype)
    data[at : at + ids.itemsize] = bad.tobytes()
    shard.write_bytes(bytes(data))
    return shard, row["key"].decode()


def test_an_id_outside_the_vocabulary_names_the_shard_and_sample(tiny_models, tiny_shards, tmp_path):
    from arctrain.data.shards import ShardReader, open_source, shard_table

    shards = copy_of(tiny_shards, tmp_path)
    shard, key = flip_first_id(shards, 3)
    reader = ShardReader(shard_table([open_source(shards, "train", {})]))  # as the training loader reads
    with pytest.raises(ValueError) as err:
        reader.read(str(shard), 0, ["encoder.ids.npy", "llama.ids.npy", "llama.offsets.npy"])
    vocab = json.loads((shards / "manifest.json").read_text())["tokenizers"]["llama"]["vocab_size"]
    assert str(err.value).startswith(f"{shard}: sample {key}: llama id {vocab + 3} outside the vocabulary ({vocab})")


def test_the_full_hash_check_catches_a_flip_inside_the_vocabulary(tiny_models, tiny_shards, tmp_path):
    shards = copy_of(tiny_shards, tmp_path)
    shard, _ = flip_first_id(shards, -5)  # a valid id: only the sha256 tells
    error_line(train_dry_run(tiny_models, shards, "data.verify_shards=true"), f"{shard}: sha256 differs")
