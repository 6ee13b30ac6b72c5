"""Compress contexts with an exported encoder and generate with a frozen decoder.

    arctrain generate --model exported/tiny --decoder artifacts/tiny/llama --context-file doc.txt \
        --prompt "Question: what does it return?" --max-new-tokens 32
    arctrain generate ... --sample --temperature 0.8 --top-p 0.9 --seed 1
    arctrain generate ... --context-file a.txt b.txt c.txt --batch-size 8 --device cuda --dtype bf16
    arctrain generate ... --vectors store/ --doc-id doc-17 doc-42 --prompt "Summary:"   # compressed earlier
    arctrain generate ... --vectors store/ --doc-id doc-17 doc-42 --join --prompt "Question: ..."  # one context

`--dtype auto` (the default) is bf16, on a GPU and on a CPU alike (Llama 3.1 8B: 16 GB, not fp32's 32 GB); pass
`--dtype fp32` for fp32. `--device auto` is cuda when there is one, else cpu. Generation stops at the decoder's
end-of-sequence ids (its tokenizer's and its generation_config's, e.g. Llama 3.1's <|eot_id|> too) and at any
`--stop-token-id`.

In Python:

    arc = ARCGenerator("exported/tiny", "artifacts/tiny/llama")
    out = arc.complete(["a long document ..."], ["\\nSummary:"], max_new_tokens=32)
    out.texts[0]

A context is cut into chunks of about `--chunk-tokens` encoder tokens at word boundaries, exactly as `arc-data build`
cut the training data (arctrain/data/chunks.py); each chunk is compressed on its own and their vectors follow one
another, then the decoder's <Cont> vector. `--max-chunks K` keeps the first K chunks (long contexts: the stderr line
says what was dropped); `--context joint` compresses it as one encoder sequence instead, its first `--context-tokens`.
Unset, these are what the model's QA fine-tuning used (`qa_context` in the export's config: `data.qa.context`,
`data.chunk_tokens`, `data.max_chunks`, `data.qa.context_tokens`); for other exports, chunks of the training segment
length (`segment_tokens`), all of them. A prompt longer than the decoder's window (max_position_embeddings) is refused
in one line. Batched prompts are left-padded.

Where the vectors come from is one seam: `memory(texts)` runs the encoder, `stored_memory(doc_ids)` reads a vector
store (`arctrain compress`, arctrain/inference/store.py; `vectors=` / `--vectors`), refused unless made by this export's
encoder. Both give a `Memory`, which `context_example` and the QA prompts place alike.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from arctrain.data.batch import SPECIALS, BatchStats
from arctrain.data.prompt import Doc, Turn, chat_template_of, render
from arctrain.data.qa import TextPieces
from arctrain.export.load import load_export
from arctrain.inference.store import VectorStore, encoder_identity
from arctrain.model import ARCBatch, ARCModel, Example, Memory, Text, collate, load_causal_lm
from arctrain.model.attention import PACKED
from arctrain.model.flops import FlopCounter
from data_tools.tokenizer_id import tokenizer_hash


@dataclass
class Generation:
    texts: list[str]  # the new text of each prompt (special tokens dropped)
    prompt_tokens: list[int]  # decoder positions of each prompt (text tokens + memory and special vectors)
    encoder_tokens: int  # encoder tokens compressed for the whole batch
    memory_vectors: int  # vectors they became (projected, with the special vectors, into the decoder)
    seconds_to_first_token: float  # compression + decoder prefill of the batch, up to the first token's logits
    seconds: float  # the whole call
    stats: BatchStats | None = None  # the collated prompts' sizes (FlopCounter.prefill)


class _FirstLogits(LogitsProcessor):
    """Records when the first logits arrive: the end of the prefill."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class _TextDone(StoppingCriteria):
    """A row is done once its new text holds `stop` (e.g. "\\n\\n", where a QA answer ends) after some text."""

    def __init__(self, tokenizer, stop: str):
        self.tokenizer, self.stop = tokenizer, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)  # only new tokens (inputs_embeds)
        return torch.tensor([self.stop in t.lstrip() for t in texts], device=input_ids.device)


# How `arctrain generate` cuts a context that neither a flag nor the export (`qa_context`, recorded by a QA
# fine-tuning run) says how to cut: chunks of the training segment length, every one of them (a pretraining export).
GENERATE_CONTEXT = {"context": "segments", "max_chunks": 0, "context_tokens": 0}


def context_options(config, given: dict, fallback: dict) -> dict:
    """The context cut and prompt rendering of generation and evaluation: each of context, chunk_tokens, max_chunks,
    context_tokens and chat_template as `given` when not None, else as the model's QA fine-tuning did (the export's
    `qa_context`), else `fallback` (chunk_tokens: the training segment length; chat_template: the decoder's
    template). A trained max_chunks applies to contexts in segments only; one given for a joint context is refused."""
    trained = dict(getattr(config, "qa_context", None) or {})
    fallback = {"chunk_tokens": config.segment_tokens, "chat_template": True, **fallback}
    out = {k: given[k] if given.get(k) is not None else trained.get(k, fallback[k]) for k in fallback}
    if out["context"] == "joint" and out["max_chunks"]:
        if given.get("max_chunks") is not None:
            raise ValueError(
                f"--max-chunks {given['max_chunks']} applies with --context segments (a joint context is cut at "
                f"--context-tokens, {out['context_tokens'] or 'no limit'})"
            )
        out["max_chunks"] = 0  # fine-tuned in chunks, asked for one joint sequence
    return out


def pick_decoder(config, decoder_dir: str | Path, name: str | None) -> str:
    """The export's decoder entry for `decoder_dir`: by `name`, else by tokenizer hash; checked against the hash."""
    by_name = {d["name"]: d for d in config.decoders}
    found = tokenizer_hash(decoder_dir)
    if name is None:
        matches = [d["name"] for d in config.decoders if d["tokenizer_hash"] == found]
        if len(matches) != 1:
            raise ValueError(
                f"--decoder {decoder_dir}: its tokenizer matches {len(matches)} of this model's decoders "
                f"({', '.join(by_name)}); pass --decoder-name"
            )
        return matches[0]
    if name not in by_name:
        raise ValueError(f"--decoder-name {name!r}: this model has decoders {', '.join(by_name)}")
    if by_name[name]["tokenizer_hash"] not in ("", found):  # "" : not recorded (an imported reference checkpoint)
        raise ValueError(f"--decoder {decoder_dir}: its tokenizer is not the one decoder {name!r} was trained with")
    return name


def check_decoder_width(config, decoder_dir: str | Path, name: str) -> None:
    """Decoders sharing one tokenizer (Llama 3.2 3B and 3.1 8B) can differ in width; the projector of `name` writes
    vectors of the width it was trained for (the export's hidden_size), so another is refused before loading."""

    trained = next(d for d in config.decoders if d["name"] == name).get("hidden_size")
    width = getattr(AutoConfig.from_pretrained(decoder_dir), "hidden_size", None)
    if trained and width and width != trained:
        raise ValueError(
            f"--decoder {decoder_dir}: hidden_size {width}, but this model's projector for {name!r} was trained for "
            f"a decoder of hidden_size {trained}; use that decoder (same tokenizer is not enough)"
        )


class ARCGenerator:
    """An exported encoder + its projector for one decoder + that decoder, ready to compress and generate."""

    def __init__(
        self,
        model_dir: str | Path,
        decoder_dir: str | Path,
        decoder_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        stop_token_ids: list[int] = (),
        chunk_tokens: int | None = None,
        max_chunks: int | None = None,
        vectors: "str | Path | VectorStore | None" = None,
        context: str | None = None,
        context_tokens: int | None = None,
        chat_template: bool | None = None,
        fallback: dict | None = None,
    ):
        encoder, projectors, specials, config = load_export(model_dir, dtype)
        self.store = None
        self.name = pick_decoder(config, decoder_dir, decoder_name)
        if vectors is not None:
            self.store = vectors if isinstance(vectors, VectorStore) else VectorStore(vectors)
            self.store.check_encoder(encoder_identity(model_dir), model_dir, self.name)
        check_decoder_width(config, decoder_dir, self.name)
        # How contexts are cut and prompts rendered (see `pieces` below): each option as given, else as the model was
        # fine-tuned, else `fallback`; refused here, before the decoder loads, if they do not go together.
        given = dict(
            context=context,
            chunk_tokens=chunk_tokens,
            max_chunks=max_chunks,
            context_tokens=context_tokens,
            chat_template=chat_template,
        )
        cut = context_options(config, given, fallback or GENERATE_CONTEXT)
        self.config = config
        self.device = torch.device(device)
        entry = next(d for d in config.decoders if d["name"] == self.name)
        decoder = load_causal_lm(  # as it was trained, straight onto the device
            decoder_dir, dtype, rope=entry.get("rope", "checkpoint"), device=self.device
        )
        one = nn.ModuleDict
        self.model = ARCModel(
            encoder,
            one({self.name: projectors[self.name]}),
            one({self.name: specials[self.name]}),
            one({self.name: decoder}),
        )
        self.model.to(self.device)
        self.decoder = decoder
        self.flops = FlopCounter(self.model)
        self.enc_tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.dec_tok = AutoTokenizer.from_pretrained(decoder_dir)
        # The same pieces and prompt rendering as QA training: context "joint" or "segments" (chunks of
        # chunk_tokens, at most max_chunks), the chat template of an instruct decoder (chat_template=False: the plain
        # layout).
        self.pieces = TextPieces(
            self.enc_tok, self.dec_tok, cut["chunk_tokens"], cut["max_chunks"], cut["context"], cut["context_tokens"]
        )
        self.chat = chat_template_of(self.dec_tok, cut["chat_template"])
        self.prefix = next(d["prefix"] for d in config.decoders if d["name"] == self.name)
        self.stop_ids = stop_ids(decoder, self.dec_tok) + [
            i for i in stop_token_ids if i not in stop_ids(decoder, self.dec_tok)
        ]

    # --- pieces ---------------------------------------------------------------------------------------------

    def segments(self, text: str) -> list[list[int]]:
        return self.pieces.segments(text)

    def memory(self, texts: str | list[str], special: str | None = "cont") -> Memory:
        return self.pieces.memory(texts, special)

    def stored_memory(self, doc_ids: str | list[str], special: str | None = "cont") -> Memory:
        """Documents' vectors from the store (`vectors=`), in order, then one special vector: what `memory` makes
        of their texts, without running the encoder."""
        if self.store is None:
            raise ValueError("no vector store: pass --vectors DIR (ARCGenerator(..., vectors=DIR))")
        doc_ids = [doc_ids] if isinstance(doc_ids, str) else doc_ids
        return Memory([], special, vectors=[v for d in doc_ids for v in self.store.get(d).vectors])

    def doc_memory(self, doc: Doc) -> Memory:
        """A prompt's document (arctrain/data/prompt.py) compressed: its Memory when made already, its vectors from the
        store by its `doc_ids` when there is a store, else its passages encoded."""
        if doc.memory is not None:
            return doc.memory
        if self.store is not None and doc.doc_ids:
            return self.stored_memory(doc.doc_ids)
        return self.memory(doc.passages)

    def text(self, text: str, first: bool = False) -> Text:
        return self.pieces.text(text, first)

    def context_example(self, context: str | list[str] | Memory, prompt: str) -> Example:
        """[decoder prefix] + compressed context + <Cont> + prompt: the pretraining layout with a prompt after it;
        for a decoder with a chat template, one user message of the context and the prompt (arctrain/data/prompt.py).
        `context`: texts to compress, or a Memory already made (`stored_memory`)."""
        if isinstance(context, Memory):
            doc = Doc([], memory=context)
        else:
            doc = Doc([context] if isinstance(context, str) else context)
        if self.chat is not None:
            return Example(render(self, self.chat, [Turn([doc, "\n" + prompt.strip()])], answer_cue=""))
        pieces = [self.text(self.prefix, first=True)] if self.prefix else []
        return Example(pieces + [self.doc_memory(doc), self.text(prompt)])

    # --- running --------------------------------------------------------------------------------------------

    def batch(self, examples: list[Example]) -> ARCBatch:
        """The examples collated for this decoder (BOS first, packed), as in training."""
        tok = self.dec_tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        enc_pad = self.enc_tok.pad_token_id if self.enc_tok.pad_token_id is not None else 0
        cfg = self.config
        return collate(
            examples,
            pooling=cfg.pooling,
            factor=cfg.pooling_factor,
            n_vectors=cfg.n_vectors,
            enc_pad_id=enc_pad,
            dec_pad_id=pad,
            bos_id=tok.bos_token_id,
            decoder=self.name,
        )

    @torch.no_grad()
    def embed(self, examples: list[Example], new_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, ARCBatch]:
        """Left-padded decoder inputs (B, T, Dd), their attention mask (B, T), and the collated batch; refused first
        if a prompt and `new_tokens` do not fit the decoder's window."""
        batch = self.batch(examples)
        self.check_encoder_window(batch.enc.max_len)
        longest = max(range(len(batch.row_lengths)), key=batch.row_lengths.__getitem__)
        vectors = int((batch.rows(batch.dec_slot)[longest] >= 0).sum())  # compressed positions of the longest row
        self.check_window(batch.dec_max_len, new_tokens, vectors)
        stats, batch = batch.stats, batch.to(self.device)
        if stats.vectors > len(SPECIALS):  # compressed or stored memory somewhere in the batch
            embeds = self.model.embed(batch, self.name)  # (1, N, Dd) packed
        else:  # no compressed piece anywhere (closed book): plain token embeddings
            embeds = self.decoder.get_input_embeddings()(batch.dec_ids)
        return *left_pad(batch.rows(embeds)), batch

    @torch.no_grad()
    def generate(
        self,
        examples: list[Example],
        *,
        max_new_tokens: int = 64,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_text: str | None = None,
    ) -> Generation:
        """Generate after each example (greedy unless `sample`) with the decoder's own `generate` and KV cache.

        A row stops at the decoder's EOS ids and, with `stop_text` (QA: "\\n\\n"), once its new text holds it.
        """
        start = time.perf_counter()
        first = _FirstLogits()
        embeds, mask, batch = self.embed(examples, max_new_tokens)
        options = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
        if sample:
            torch.manual_seed(seed)
        tok, stop = self.dec_tok, self.stop_ids
        criteria = StoppingCriteriaList([_TextDone(tok, stop_text)] if stop_text else [])
        # Generation appends to left-padded rows with a KV cache: transformers' own sdpa (with its padding mask)
        # runs it; the packed implementation (no mask) stays for scoring and training.
        self.decoder.set_attn_implementation("sdpa")
        try:
            out = self.decoder.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([first]),
                stopping_criteria=criteria,
                eos_token_id=stop or None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
                top_k=None,
                **options,
            )
        finally:
            self.decoder.set_attn_implementation(PACKED)
        texts = tok.batch_decode(out, skip_special_tokens=True)  # with inputs_embeds only new tokens come back
        end = time.perf_counter()
        n_enc, n_vec = batch.stats.enc_tokens, batch.stats.vectors - 2
        return Generation(
            texts, mask.sum(1).tolist(), n_enc, n_vec, (first.at or end) - start, end - start, batch.stats
        )

    def check_window(self, prompt_positions: int, max_new_tokens: int, vectors: int = 0) -> None:
        """Refuse a prompt whose positions, with the new tokens, pass the decoder's window (max_position_embeddings);
        the hint names what to cut: the new tokens, the prompt text, or the compressed context (`vectors` of the
        positions, in the longest row at most)."""
        window = getattr(self.decoder.config, "max_position_embeddings", None)
        if not window or prompt_positions + max_new_tokens <= window:
            return
        if max_new_tokens >= window:
            hint = f"lower --max-new-tokens below {window}"
        elif prompt_positions - vectors + max_new_tokens > window:  # no context at all would fit either
            hint = "shorten the prompt or lower --max-new-tokens"
        elif self.pieces.context == "joint":
            hint = "compress less context (--context-tokens) or lower --max-new-tokens"
        else:
            hint = "keep fewer chunks (--max-chunks) or lower --max-new-tokens"
        raise ValueError(
            f"a prompt takes {prompt_positions} decoder positions ({vectors} of them compressed context) + "
            f"{max_new_tokens} new tokens, more than the window of decoder {self.name!r} "
            f"(max_position_embeddings={window}): {hint}"
        )

    def check_encoder_window(self, tokens: int) -> None:
        """Refuse an encoder sequence (a joint context, or a chunk) longer than the encoder's positions."""
        window = (getattr(self.config, "backbone", None) or {}).get("max_position_embeddings")
        if window and tokens > window:
            hint = (
                f"pass --context-tokens {window} or --context segments"
                if self.pieces.context == "joint"
                else f"lower --chunk-tokens to {window} or less"
            )
            raise ValueError(
                f"a context of {tokens} encoder tokens in one sequence is longer than the encoder's window "
                f"(max_position_embeddings={window}): {hint}"
            )

    def complete(self, contexts: list[str | list[str] | Memory], prompts: list[str], **options) -> Generation:
        """Compress each context (or take its Memory as it is) and generate after its prompt."""
        return self.generate([self.context_example(c, p) for c, p in zip(contexts, prompts, strict=True)], **options)


def stop_ids(decoder: nn.Module, tok) -> list[int]:
    """End-of-sequence ids of a decoder: its tokenizer's and its generation config's (an int or a list)."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    configured = getattr(decoder.generation_config, "eos_token_id", None)
    for i in configured if isinstance(configured, list) else [configured]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, shared by `arctrain generate` and `arctrain eval`."""
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 (GPU and CPU)")


def runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r}: not a torch device (cuda, cuda:N, cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    return device, DTYPES["bf16" if args.dtype == "auto" else args.dtype]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n_i, D) -> left-padded (B, T, D) and mask (B, T): generation appends after each row's last token."""
    width = max(len(r) for r in rows)
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return out, mask


def add_context_args(parser: argparse.ArgumentParser, fallback: dict) -> None:
    """--context, --context-tokens, --chunk-tokens, --max-chunks and --plain-prompt, shared by `arctrain generate`
    and `arctrain eval` (arctrain/data/qa.py TextPieces, arctrain/data/chunks.py, arctrain/data/prompt.py). Unset,
    each is what the model's QA fine-tuning used (the export's `qa_context`), else the command's `fallback`
    (context_options)."""
    trained = "default: as the model was fine-tuned on QA, else"
    parser.add_argument(
        "--context",
        default=None,
        choices=["joint", "segments"],
        help=f"passages compressed as one encoder sequence or in chunks ({trained} {fallback['context']})",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        help=f"a joint context's first N encoder tokens ({trained} {fallback['context_tokens'] or 'all'})",
    )
    parser.add_argument("--chunk-tokens", type=int, default=None, help=f"{trained} the export's segment_tokens")
    parser.add_argument(
        "--max-chunks", type=int, default=None, help=f"compress at most this many chunks ({trained} all)"
    )
    parser.add_argument(
        "--plain-prompt",
        action="store_true",
        help=f"no chat template, even if the decoder has one ({trained} its template)",
    )


def context_note(arc: "ARCGenerator") -> str | None:
    """One line on what --max-chunks (a joint context: --context-tokens) dropped, or None."""
    pieces, cut = arc.pieces, arc.pieces.cut
    if not cut.truncated:
        return None
    if pieces.context == "joint":
        return (
            f"--context-tokens {pieces.context_tokens}: {cut.truncated} of {cut.contexts} contexts cut short, "
            f"{cut.dropped_tokens} encoder tokens left out"
        )
    return (
        f"--max-chunks {pieces.chunker.max_chunks}: {cut.truncated} of {cut.contexts} contexts cut short, "
        f"{cut.dropped_chunks} chunks ({cut.dropped_tokens} encoder tokens) left out"
    )


def add_input_args(parser: argparse.ArgumentParser) -> None:
    """The model, the decoder and the contexts (texts, or documents of a vector store) and the prompt after them:
    what `arctrain generate` and `arctrain vllm-prompts` (arctrain/inference/serve.py) take alike."""
    parser.add_argument("--model", required=True, type=Path, help="exported model directory (arctrain export)")
    parser.add_argument("--decoder", required=True, type=Path, help="the decoder's Hugging Face directory")
    parser.add_argument("--decoder-name", default=None, help="which of the model's decoders (default: by tokenizer)")
    context = parser.add_mutually_exclusive_group(required=True)
    context.add_argument("--context-file", type=Path, nargs="+", help="UTF-8 texts, one per prompt")
    context.add_argument("--doc-id", nargs="+", help="documents in the --vectors store, one per prompt")
    parser.add_argument("--vectors", type=Path, default=None, help="a vector store (arctrain compress) for --doc-id")
    parser.add_argument("--join", action="store_true", help="all --doc-id documents in one context, one prompt")
    parser.add_argument("--prompt", required=True, help="decoder text after each compressed context")


def check_input_args(args: argparse.Namespace) -> None:
    if (args.doc_id is None) != (args.vectors is None):
        raise ValueError("--doc-id and --vectors go together (documents read from a vector store)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arctrain generate", description=__doc__.split("\n")[0])
    add_input_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="contexts generated together (left-padded)")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop at this id too")
    add_runtime_args(parser)
    add_context_args(parser, GENERATE_CONTEXT)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1, --temperature > 0 and --top-p in (0, 1]")
    check_context_args(args)
    check_input_args(args)
    return args


def check_context_args(args: argparse.Namespace) -> None:
    if any(v is not None and v < 1 for v in (args.chunk_tokens, args.context_tokens)) or (args.max_chunks or 0) < 0:
        raise ValueError("--chunk-tokens and --context-tokens must be >= 1 and --max-chunks >= 0 (0: every chunk)")


def context_flags(args: argparse.Namespace) -> dict:
    """The context and prompt options given on the command line (None: not given), as ARCGenerator takes them."""
    return dict(
        context=args.context,
        chunk_tokens=args.chunk_tokens,
        max_chunks=args.max_chunks,
        context_tokens=args.context_tokens,
        chat_template=False if args.plain_prompt else None,
    )


def open_inputs(args: argparse.Namespace) -> VectorStore | None:
    """Check the --context-file paths and the --doc-id ids (one line naming the bad one); the --vectors store."""
    for path in args.context_file or []:
        if not path.is_file():
            raise FileNotFoundError(f"--context-file {path}: no such file")
        read_context_file(path)  # before any model loads
    store = VectorStore(args.vectors) if args.vectors else None
    for doc_id in args.doc_id or []:
        if doc_id not in store:
            raise ValueError(f"--doc-id {doc_id!r}: not in the --vectors store {store.root} ({len(store)} documents)")
    return store


def read_contexts(arc: ARCGenerator, args: argparse.Namespace) -> tuple[list, list]:
    """(names, contexts): the --doc-id documents' stored Memory (one joined with --join; the names are the ids), or
    the --context-file texts."""
    if args.doc_id is not None:
        names = ["+".join(args.doc_id)] if args.join else args.doc_id
        contexts = [arc.stored_memory(args.doc_id)] if args.join else [arc.stored_memory(d) for d in args.doc_id]
        return names, contexts
    return args.context_file, [read_context_file(path) for path in args.context_file]


def read_context_file(path: Path) -> str:
    """A --context-file's text; one that is not UTF-8 or holds no text is refused naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--context-file {path}: not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise ValueError(f"--context-file {path}: no text to compress (the file is empty)")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv or [])
    store = open_inputs(args)
    device, dtype = runtime(args)
    arc = ARCGenerator(
        args.model,
        args.decoder,
        args.decoder_name,
        dtype,
        device,
        args.stop_token_id,
        vectors=store,
        **context_flags(args),
    )
    names, contexts = read_contexts(arc, args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    texts = []
    for start in range(0, len(contexts), args.batch_size):
        chunk = contexts[start : start + args.batch_size]
        texts += arc.complete(chunk, [args.prompt] * len(chunk), **options).texts
    if (note := context_note(arc)) is not None:
        print(note, file=sys.stderr)
    if len(texts) == 1:
        print(texts[0])
        return
    for name, text in zip(names, texts, strict=True):
        print(f"==> {name} <==\n{text}")
