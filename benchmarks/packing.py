"""Packing benchmark: how much of what the model computes is real, and CPU time per training step, padded vs packed.

    python benchmarks/packing.py --models artifacts/tiny [--batches 150] [--steps 12] [--baseline 2f0e87a]

On the batch shapes of the shipped GPU configs (configs/llama_mistral_1node.yaml: pretraining, 256-token segments,
micro-batch 16; configs/llama_mistral_finetune.yaml: QA with up to 4 passages compressed jointly into at most 1024
tokens and 5 shots, micro-batch 8), with the tiny models' tokenizers and the embedded corpus (shards cut into
256-token segments; QA records whose passages are runs of its documents), as rank 0 of 8 sees them:

- real fraction: real positions / computed positions, encoder and decoder, over `--batches` micro-batches.
  "padded" is what right-padding the same batches computes (segments x longest segment, rows x longest row: the
  layout before packing); "packed" is what the packed layout computes (BatchStats.enc_computed / dec_computed).
- CPU time per training step (forward + backward of one micro-batch, fp32, the tiny models) on the same batches,
  before and after, in one run: "before" is the code of `--baseline` (the last padded commit), extracted with
  `git archive` into a temporary directory and run in a subprocess with that tree first on PYTHONPATH; "after" is
  this tree, also in a subprocess. Process CPU time, so that other load on the machine weighs less; the two
  alternate `--repeats` times and each keeps its fastest repeat. Reported as the ratio after / before.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"pretraining": "configs/llama_mistral_1node.yaml", "qa": "configs/llama_mistral_finetune.yaml"}


def make_data(models: Path, out: Path, n_records: int = 400) -> dict[str, Path]:
    """Shards of the embedded corpus in 256-token segments (`arc-data build`) and QA records from its documents."""
    decoders = [f"--decoder={name}={models / name}" for name in ("llama", "mistral")]
    cmd = [
        sys.executable,
        "-m",
        "data_tools.cli",
        "build",
        "--input",
        str(models / "corpus.jsonl"),
        "--out",
        str(out / "shards"),
        "--encoder-tokenizer",
        str(models / "encoder"),
        *decoders,
        "--segment-tokens",
        "256",
        "--val-fraction",
        "0.05",
        "--shard-size-mb",
        "4",
        "--overwrite",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    from arctrain.testing.corpus import read_corpus

    words = [w for record in read_corpus(models / "corpus.jsonl") for w in record["text"].split()]
    lines = []
    for i in range(n_records):  # 1-4 passages of 60-300 words, from consecutive runs of the corpus
        start = (i * 997) % (len(words) - 2000)
        sizes = [60 + (i * 37 + 53 * j) % 241 for j in range(1 + i % 4)]
        passages, at = [], start
        for size in sizes:
            passages.append(" ".join(words[at : at + size]))
            at += size
        question = f"Which word follows {words[start + 10]!r} {words[start + 11]!r}?"
        lines.append(json.dumps({"question": question, "answers": [words[start + 12]], "passages": passages}))
    (out / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return {"shards": out / "shards", "qa": out / "qa.jsonl"}


def overrides(task: str, models: Path, data: dict[str, Path], padded: bool) -> list[str]:
    out = [
        f"model.encoder_path={models / 'encoder'}",
        f"decoders.0.path={models / 'llama'}",
        f"decoders.1.path={models / 'mistral'}",
        "data.num_workers=0",
        "train.precision=fp32",
        "deepspeed=ds_configs/zero3_cpu.json",
        "train.activation_checkpointing=false",
    ]
    if padded:  # the baseline's configs ask for flash-attention 2, which a CPU does not have
        out += ["decoders.0.attn_implementation=sdpa", "decoders.1.attn_implementation=sdpa"]
    if task == "qa":
        qa = [f"data.qa.train={data['qa']}:1:5", f"data.qa.val={data['qa']}", "data.qa.chat_template=false"]
        if padded:  # the baseline predates the data.qa section: its flat key names
            qa = [f"data.qa={data['qa']}:1:5", f"data.qa_val={data['qa']}", "data.qa_chat_template=false"]
        return out + qa + ["train.init_from="]
    return out + [f"data.shards={data['shards']}"]


def load_config(config: Path, over: list[str]):
    """The config, with whichever arctrain is on the path: the baseline tree predates the arctrain/config/ package."""
    try:
        from arctrain.config.load import load_config as load
    except ModuleNotFoundError:  # the baseline: one flat arctrain/config.py
        from arctrain.config import load_config as load
    return load(config, over)


def batches(task: str, config: Path, over: list[str], n: int, rank: int = 0, world: int = 8) -> list:
    from arctrain.data import Vocab, build_train_loader

    cfg = load_config(config, over)
    out = []
    for _, batch in build_train_loader(cfg, rank, world, Vocab.from_config(cfg)):
        out.append(batch)
        if len(out) == n:
            return out
    return out


def real_fractions(batch_list: list) -> dict[str, float]:
    """Real / computed positions, padded (from the batches' lengths) and packed (what the packed layout computes)."""
    enc_real = enc_padded = dec_real = dec_padded = enc_computed = dec_computed = 0
    for b in batch_list:
        segments = b.enc.cu_seqlens.diff().tolist()
        enc_real += sum(segments)
        enc_padded += len(segments) * max(segments, default=0)
        dec_real += sum(b.row_lengths)
        dec_padded += len(b.row_lengths) * max(b.row_lengths)
        enc_computed += b.stats.enc_computed
        dec_computed += b.stats.dec_computed
    return {
        "encoder_padded": enc_real / enc_padded,
        "encoder_packed": enc_real / enc_computed,
        "decoder_padded": dec_real / dec_padded,
        "decoder_packed": dec_real / dec_computed,
    }


def time_steps(task: str, config: Path, over: list[str], n_batches: int) -> float:
    """Mean process CPU seconds per training step (forward + backward) over the batches after the first two."""
    import torch

    from arctrain.model import build_model

    torch.manual_seed(0)
    cfg = load_config(config, over)
    model = build_model(cfg.model, cfg.decoders).train()
    times = []
    for batch in batches(task, config, over, n_batches):
        start = time.process_time()
        out = model(batch, batch.decoder)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    return sum(times[2:]) / max(len(times) - 2, 1)


def run_timing(tree: Path, task: str, args, data: dict[str, Path], padded: bool) -> float:
    """`time_steps` in a subprocess that imports arctrain from `tree`."""
    request = {
        "task": task,
        "config": str(tree / CONFIGS[task]),
        "models": str(args.models),
        "data": {k: str(v) for k, v in data.items()},
        "padded": padded,
        "steps": args.steps,
    }
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": str(args.threads),
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--time-request", json.dumps(request)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree)
    return float(out.stdout.strip().splitlines()[-1])


def baseline_tree(commit: str, into: Path) -> Path:
    """The code of `commit` (a padded version of arctrain), extracted with git archive."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("artifacts/tiny"), help="make-tiny-models output")
    parser.add_argument("--batches", type=int, default=150, help="micro-batches for the real fractions")
    parser.add_argument("--steps", type=int, default=12, help="micro-batches timed per run (the first 2 warm up)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating before/after runs; each keeps its best")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the timed runs")
    parser.add_argument("--baseline", default="2f0e87a", help="the padded commit to time against ('' skips timing)")
    parser.add_argument("--tasks", default="pretraining,qa")
    parser.add_argument("--time-request", default=None, help=argparse.SUPPRESS)  # the timed subprocess
    args = parser.parse_args(argv)
    if args.time_request:
        r = json.loads(args.time_request)
        over = overrides(r["task"], Path(r["models"]), {k: Path(v) for k, v in r["data"].items()}, r["padded"])
        print(time_steps(r["task"], Path(r["config"]), over, r["steps"]))
        return {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(args.models, Path(tmp))
        before = baseline_tree(args.baseline, Path(tmp) / "baseline") if args.baseline else None
        for task in args.tasks.split(","):
            got = real_fractions(
                batches(task, REPO / CONFIGS[task], overrides(task, args.models, data, False), args.batches)
            )
            if before is not None:
                runs = {"before": [], "after": []}
                for _ in range(args.repeats):
                    runs["before"].append(run_timing(before, task, args, data, padded=True))
                    runs["after"].append(run_timing(REPO, task, args, data, padded=False))
                got["step_before_s"], got["step_after_s"] = min(runs["before"]), min(runs["after"])
                got["step_ratio"] = got["step_after_s"] / got["step_before_s"]
            results[task] = got
    print(
        f"rank 0 of 8, {args.batches} micro-batches per config; step time: {args.steps - 2} steps, "
        f"best of {args.repeats}, {args.threads} thread(s), before = {args.baseline or '-'}"
    )
    print("config        encoder real (padded -> packed)  decoder real (padded -> packed)  step time after/before")
    for task, r in results.items():
        ratio = f"{r['step_ratio']:.2f}x" if "step_ratio" in r else "-"
        print(
            f"{task:12s}  {r['encoder_padded']:.3f} -> {r['encoder_packed']:.3f}"
            f"{'':18s}{r['decoder_padded']:.3f} -> {r['decoder_packed']:.3f}{'':18s}{ratio}"
        )
    return results


if __name__ == "__main__":
    main()
