"""The tiny models are real Hugging Face models: they load offline, tokenize differently, and are reproducible."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_models_load_with_auto_classes(tiny_models):
    hidden = {}
    for name, cls in [
        ("encoder", "LlamaForCausalLM"),
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("gemma", "Gemma3ForCausalLM"),
    ]:
        model = AutoModelForCausalLM.from_pretrained(tiny_models / name)
        tok = AutoTokenizer.from_pretrained(tiny_models / name)
        assert type(model).__name__ == cls
        assert tok.pad_token_id is not None and tok.bos_token_id is not None and tok.eos_token_id is not None
        assert model.config.vocab_size == len(tok)
        hidden[name] = model.config.hidden_size
    assert len({hidden["llama"], hidden["mistral"], hidden["gemma"]}) == 3


def test_tokenizers_differ(tiny_models):
    """Different vocabulary sizes: the decoders cut the same text into different tokens."""
    text = json.loads(open(tiny_models / "corpus.jsonl").readline())["text"][:2000]
    toks = {n: AutoTokenizer.from_pretrained(tiny_models / n) for n in ("encoder", "llama", "mistral", "gemma")}
    ids = {n: t(text, add_special_tokens=False)["input_ids"] for n, t in toks.items()}
    assert len({len(t) for t in toks.values()}) == 4
    assert len(ids["llama"]) != len(ids["mistral"])
    for n, t in toks.items():  # byte-level BPE round-trips any text
        assert t.decode(ids[n]) == text


def test_pretrained_decoders_are_language_models(tiny_models):
    """Held-out text is far more likely under the pretrained decoder than under uniform guessing."""
    records = [json.loads(line) for line in open(tiny_models / "corpus.jsonl")]
    from arctrain.testing.corpus import is_heldout

    heldout = [r["text"] for r in records if is_heldout(r["id"])][:8]
    assert heldout, "the corpus has held-out documents"
    for name in ("llama", "mistral", "gemma"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models / name)
        tok = AutoTokenizer.from_pretrained(tiny_models / name)
        batch = tok([t[:400] for t in heldout], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.no_grad():
            loss = model(**batch, labels=labels).loss.item()
        uniform = torch.log(torch.tensor(float(len(tok)))).item()
        assert loss < 0.8 * uniform, (name, loss, uniform)


def test_same_seed_same_files_for_any_worker_count(tmp_path):
    cmd = [sys.executable, "-m", "arctrain", "make-tiny-models", "--pretrain-steps", "3", "--seed", "3"]
    subprocess.run([*cmd, "--workers", "1", "--out", str(tmp_path / "a")], check=True, capture_output=True)
    subprocess.run([*cmd, "--workers", "3", "--out", str(tmp_path / "b")], check=True, capture_output=True)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert "llama/model.safetensors" in a and "mistral/tokenizer.json" in a and "gemma/model.safetensors" in a
    assert a == b
