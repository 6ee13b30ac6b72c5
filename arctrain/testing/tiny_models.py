"""Tiny real models for tests: the real Hugging Face classes at toy sizes.

    arctrain make-tiny-models --out artifacts/tiny --pretrain-steps 600

writes `encoder/` (Llama architecture, like Llama 3.2), `llama/` (LlamaForCausalLM, stands in for Llama 3.1 8B),
`mistral/` (MistralForCausalLM with another hidden size, stands in for Mistral 7B), `gemma/` (Gemma3ForCausalLM:
token embeddings scaled by sqrt(hidden) inside the model, tied LM head, sliding-window attention in all but every
4th layer; stands in for Gemma 3) and `corpus.jsonl` (the embedded corpus). Each model has its own byte-level BPE
tokenizer with its own vocabulary size and special tokens, so the decoders tokenize the same text differently.
With `--pretrain-steps N` the decoders are trained as next-token language models on the corpus (held-out documents
excluded) for N steps, the encoder for N // 3 (`--encoder-pretrain-steps`), so they are small but real language
models. The models build in parallel processes, one thread each (`--workers`, default one per core). Same seed,
same files, for any worker count.

What they cannot do: copy from their context. At this size and budget no induction heads form (a held-out passage
is predicted no better after a verbatim copy of it than without), so compressed context helps them far less than
it helps a real LLM; `benchmarks/context_use.py` measures how much any compressed context could help them.
"""

import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from arctrain.testing.corpus import is_heldout, read_corpus, write_corpus


@dataclass(frozen=True)
class TinySpec:
    name: str
    arch: str  # "llama" | "mistral" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    bos: str
    eos: str
    pad: str


SPECS = (
    # The encoder keeps 4 layers after the usual truncation of 2.
    TinySpec("encoder", "llama", 2048, 96, 256, 6, "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"),
    TinySpec("llama", "llama", 3072, 128, 352, 4, "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"),
    TinySpec("mistral", "mistral", 4096, 160, 416, 4, "<s>", "</s>", "<pad>"),
    TinySpec("gemma", "gemma3", 3584, 144, 384, 4, "<bos>", "<eos>", "<pad>"),
)
GEMMA_SLIDING_WINDOW = 32  # shorter than a training row, so the local layers really see a window
SEQ_LEN = 128
BATCH = 16


def train_tokenizer(texts: list[str], spec: TinySpec) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained with the `tokenizers` library, wrapped for `AutoTokenizer`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[spec.pad, spec.bos, spec.eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, model_max_length=1_000_000
    )


def build_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    if spec.arch == "gemma3":
        head_dim = spec.hidden_size // common["num_attention_heads"]
        config = Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},  # tied, as in every Gemma 3
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=GEMMA_SLIDING_WINDOW,
            layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(spec.num_layers)],
        )
        return Gemma3ForCausalLM(config)
    return LlamaForCausalLM(LlamaConfig(**common))


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """All training documents as one stream of ids, each as BOS + text + EOS."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def training_batch(stream: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random windows of the stream, (B, T)."""
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=gen).tolist()
    return torch.stack([stream[s : s + SEQ_LEN] for s in starts])


def pretrain(model: torch.nn.Module, stream: torch.Tensor, steps: int, seed: int) -> list[float]:
    """Next-token training on windows of the stream: warm-up then cosine, AdamW."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    )
    model.train()
    losses = []
    for _ in range(steps):
        batch = training_batch(stream, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _build_one(spec: TinySpec, out: Path, train_texts: list[str], steps: int, seed: int) -> str:
    """Tokenizer, model, pretraining and save for one spec; returns the log line.

    Runs on one thread so the files do not depend on how many models are built at once or on the machine's
    core count (multi-threaded reductions can change the last bits of a float sum)."""
    start = time.time()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tokenizer = train_tokenizer(train_texts, spec)
    torch.manual_seed(seed * 1000 + SPECS.index(spec))
    model = build_model(spec, tokenizer)
    note = ""
    if steps > 0:
        losses = pretrain(model, token_stream(train_texts, tokenizer), steps, seed * 1000 + SPECS.index(spec))
        note = f", {steps} steps, LM loss {losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f}"
    path = out / spec.name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tiny_model.json").write_text(json.dumps({"seed": seed, "pretrain_steps": steps}) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"{spec.name}: {type(model).__name__}, {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}{note} "
        f"({time.time() - start:.0f}s) -> {path}"
    )


def make_tiny_models(
    out: Path,
    pretrain_steps: int = 0,
    seed: int = 0,
    log=print,
    encoder_pretrain_steps: int | None = None,
    workers: int | None = None,
) -> dict[str, Path]:
    """Write the corpus and the four tiny models under `out`; returns name -> model directory.

    The decoders get `pretrain_steps` steps, the encoder `encoder_pretrain_steps` (default a third: ARC training
    goes on to train every encoder weight anyway). Models build in parallel processes, `workers` at a time
    (default: one per core, at most 4); the files are the same for any number of workers.
    """
    out.mkdir(parents=True, exist_ok=True)
    corpus_path = out / "corpus.jsonl"
    n_docs = write_corpus(corpus_path)
    records = read_corpus(corpus_path)
    train_texts = [r["text"] for r in records if not is_heldout(r["id"])]
    log(f"corpus: {n_docs} documents ({len(train_texts)} for training) -> {corpus_path}")
    if encoder_pretrain_steps is None:
        encoder_pretrain_steps = pretrain_steps // 3
    steps = {spec.name: encoder_pretrain_steps if spec.name == "encoder" else pretrain_steps for spec in SPECS}
    # Longest jobs first (the decoders, the wider Mistral first), so the encoder fills in behind them.
    order = sorted(SPECS, key=lambda spec: (-steps[spec.name], -spec.hidden_size))
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(SPECS)))  # cores this process may use
    # Worker processes even for one worker: the caller's thread settings stay untouched. Spawned, not forked
    # (forking a process whose torch threads are running can deadlock).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = [pool.submit(_build_one, spec, out, train_texts, steps[spec.name], seed) for spec in order]
        for job in concurrent.futures.as_completed(jobs):
            log(job.result())
    return {spec.name: out / spec.name for spec in SPECS}
