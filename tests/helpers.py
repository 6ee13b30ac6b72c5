"""Plain helpers shared by several test modules (fixtures live in conftest.py): imported as `from helpers import ...`,
with tests/ on sys.path (pyproject's pytest `pythonpath`, or the sys.path line of a module that is also run as a
script)."""

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from arctrain.config.load import load_config
from arctrain.model import collate, pretraining_example
from arctrain.testing.corpus import is_heldout, read_corpus

REPO = Path(__file__).resolve().parents[1]


# --- 2-rank launches of `arctrain train` (torchrun's environment, one subprocess per rank) ----------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(models: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.encoder_path={models / 'encoder'}",
        f"decoders.0.path={models / 'llama'}",
        f"decoders.1.path={models / 'mistral'}",
        f"data.shards={shards}",
        f"checkpoint.dir={run_dir}",
        "logging.interval=1",
        "logging.wandb_mode=disabled",
        "logging.sample_keys=true",
        "eval.interval=0",
        "data.micro_batch_size=4",
        *extra,
    ]


def launch(args: list[str], nproc: int, log: Path, program: tuple[str, ...] = ("-m", "arctrain", "train")):
    """`nproc` ranks of `python PROGRAM --config configs/tiny_cpu.yaml ARGS`, as torchrun starts them."""
    port, procs = free_port(), []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, *program, "--config", str(REPO / "configs/tiny_cpu.yaml"), *args]
        out = open(f"{log}.rank{rank}", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def run(args: list[str], nproc: int, log: Path) -> list[int]:
    return wait(launch(args, nproc, log))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def sample_keys(run_dir: Path, rank: int) -> list[tuple[int, int, list[str]]]:
    lines = (run_dir / "logs" / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["batch"], r["keys"]) for r in map(json.loads, lines)]


def wait_for(predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def train_two_ranks(args: list[str], log_dir: Path) -> None:
    """`arctrain train --config configs/tiny_cpu.yaml ARGS` on 2 gloo ranks (ZeRO-3 partitions the trainable weights
    across both); fails the test with the end of rank 0's log unless both ranks exit 0."""

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


def torchrun_two_ranks(script: str, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a test file as its own 2-process gloo job under torchrun; fail with its output unless it exits 0."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    proc = subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def tiny_paths(tiny_models: Path, tiny_shards: Path) -> list[str]:
    """Overrides that point a llama + mistral config at the tiny models and the test shards."""
    return [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        f"data.shards={tiny_shards}",
    ]


# --- data: shards, QA files and configs built from the tiny models' embedded corpus -----------------------------------


def build_shards(out: Path, corpus: Path, encoder: Path, decoders: dict[str, Path]) -> Path:
    """Shards of `corpus` in 16-token segments for these tokenizers, built by the real `arc-data build`."""
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


def write_qa(corpus: Path, out: Path, heldout: bool, limit: int) -> Path:
    """QA records made from the embedded corpus: a 48-word passage; which word follows two words of it."""
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


def qa_config(tiny_models, train, *extra):
    overrides = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
        "data.shards=[]",
        f"data.qa.train={train}",
        "data.micro_batch_size=4",
        "eval.interval=0",
        *extra,
    ]
    return load_config("configs/tiny_cpu.yaml", overrides)


def metaspace_tokenizer(out, texts: list[str]):
    """A SentencePiece-style BPE (Metaspace pre-tokenizer, prepend_scheme "first", byte fallback: Mistral's and
    Llama 2's kind), trained with the tokenizers library and saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        out
    )
    return tok


# --- the ARC model on the tiny models, without DeepSpeed --------------------------------------------------------------


DECODERS = ("llama", "mistral")


def configs(tiny: Path, decoders=DECODERS, projector_hidden: int = 64, **model):
    """Plain objects with the fields of config.ModelConfig / config.DecoderConfig that build_model reads."""
    model_cfg = SimpleNamespace(
        encoder_path=str(tiny / "encoder"),
        n_truncated_layers=2,
        pooling="mean_pooled_queries",
        pooling_factor=4,
        n_vectors=0,
        attn_implementation="packed",
    )
    vars(model_cfg).update(model)
    decoder_cfgs = [
        SimpleNamespace(name=d, path=str(tiny / d), projector_hidden=projector_hidden, prefix="") for d in decoders
    ]
    return model_cfg, decoder_cfgs


@functools.lru_cache
def tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def corpus_texts(tiny: Path, *, heldout: bool, n_words: int = 20, limit: int = 64) -> list[str]:
    """Consecutive chunks of `n_words` words from the embedded corpus (training or held-out documents)."""
    texts = []
    for record in read_corpus(tiny / "corpus.jsonl"):
        if is_heldout(record["id"]) != heldout:
            continue
        words = record["text"].split()
        texts += [" ".join(words[i : i + n_words]) for i in range(0, len(words) - n_words + 1, n_words)]
        if len(texts) >= limit:
            return texts[:limit]
    return texts


def make_batch(tiny: Path, model_cfg, decoder: str, task: str, texts: list[str]):
    """Each text is compressed; reconstruction targets it, continuation targets the next text."""
    enc_tok, dec_tok = tokenizer(str(tiny / "encoder")), tokenizer(str(tiny / decoder))
    examples = []
    for i in range(len(texts) - (task == "continuation")):
        pair = texts[i : i + 2]
        enc = [enc_tok(t, add_special_tokens=False).input_ids for t in pair]
        dec = [dec_tok(t if j == 0 else " " + t, add_special_tokens=False).input_ids for j, t in enumerate(pair)]
        examples.append(pretraining_example(task, enc, dec, 0))
    return collate(
        examples,
        pooling=model_cfg.pooling,
        factor=model_cfg.pooling_factor,
        n_vectors=model_cfg.n_vectors,
        enc_pad_id=enc_tok.pad_token_id,
        dec_pad_id=dec_tok.pad_token_id,
        bos_id=dec_tok.bos_token_id,
        task=task,
        decoder=decoder,
    )


# --- a tiny reference ARC-Encoder checkpoint, in the reference's own names and Meta layout ----------------------------


def backbone_dims(backbone: Path) -> dict:
    c = json.loads((backbone / "config.json").read_text())
    return {
        "dim": c["hidden_size"],
        "n_layers": c["num_hidden_layers"],
        "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        "hidden_dim": c["intermediate_size"],
        "n_heads": c["num_attention_heads"],
        "n_kv_heads": c["num_key_value_heads"],
        "norm_eps": c["rms_norm_eps"],
        "vocab_size": c["vocab_size"],
        "rope_theta": c["rope_parameters"]["rope_theta"],
    }


def reference_weights(a: dict, n_kept: int, out_dims: list[int], hidden: int, seed: int = 0, old_names=False):
    """(embedder tensors, bridge tensors) as the reference names them: random, with non-trivial norms."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    d, hd, h, kv, f = a["dim"], a["head_dim"], a["n_heads"], a["n_kv_heads"], a["hidden_dim"]
    emb = {"tok_embeddings.weight": rand(a["vocab_size"], d, scale=1.0)}
    for i in range(n_kept):
        p = f"layers.{i}."
        emb |= {
            p + "attention.wq.weight": rand(h * hd, d),
            p + "attention.wk.weight": rand(kv * hd, d),
            p + "attention.wv.weight": rand(kv * hd, d),
            p + "attention.wo.weight": rand(d, h * hd),
            p + "attention_norm.weight": 1 + 0.3 * rand(d, scale=1.0),
            p + "ffn_norm.weight": 1 + 0.3 * rand(d, scale=1.0),
            p + "feed_forward.w1.weight": rand(f, d),
            p + "feed_forward.w2.weight": rand(d, f),
            p + "feed_forward.w3.weight": rand(f, d),
        }
    bridge = {}
    multi = len(out_dims) > 1
    for j, out in enumerate(out_dims):
        tag = f".{j}" if not old_names else ""
        emb[f"rec_tok{tag}.weight"] = rand(1, d, scale=1.0)
        emb[f"cont_tok{tag}.weight"] = rand(1, d, scale=1.0)
        prefix = f"{j}." if multi else ""
        bridge[prefix + "layer1.weight"] = rand(hidden, d)
        bridge[prefix + "layer2.weight"] = rand(out, hidden)
    return emb, bridge


def embedder_args(rate: int, **extra) -> dict:
    args = {
        "n_truncated_layers": 2,
        "pooling_module": {"pool_type": "mean_pooled_queries", "where": "before"},
        "memory_tokens": 0,
        "rec_tok": True,
        "cont_tok": True,
        "compress_rates": [rate],
        "trained_layers": 27,
        "causal_embedder": False,
        "train_embedding_mtx": True,
    }
    return args | extra


def write_release(path: Path, a: dict, emb, bridge, rate: int, n_dec: int, hidden: int, out_dim: int, **extra):
    """The Hugging Face release: config.json of EmbedAugModel's init arguments, one prefixed model.safetensors."""
    path.mkdir(parents=True)
    model_args = {**a, "norm_eps": str(a["norm_eps"]), "max_batch_size": 1}  # YAML left the release a string
    config = {
        "bridge_args": {
            "bridge_type": "multi_module" if n_dec > 1 else "mlp",
            "in_dim": a["dim"],
            "hidden_dim": hidden,
            "out_dim": out_dim,
        },
        "embedder_args": embedder_args(rate, **extra),
        "empty_init": n_dec,
        "model_args": model_args,
    }
    (path / "config.json").write_text(json.dumps(config))
    state = {f"embedder.{k}": v for k, v in emb.items()} | {f"bridge_module.{k}": v for k, v in bridge.items()}
    save_file(state, path / "model.safetensors")
