"""QA fine-tuning data: QA records (arctrain/data/qa_records.py) -> batches with their passages compressed.

Each source (`data.qa.train` entries "path:weight:shots") is read whole in the main process (records are small next to
pretraining shards) and tokenized in the loader workers. Position p of the global stream (global micro-batch g,
`sampling.Layout`: local batch b of rank r, holds positions g * mbs ...; in fair mode the data batch of g) draws
its source from the weights (`SourceMixer`, as for shard sources) and takes that source's next position j: epoch
j // n is a permutation of its n records seeded by (seed, source, epoch). What else a record contributes in an
epoch is drawn from (seed, source, epoch, record): which answer (of a list), how many of its passages (the first
1..data.qa.max_passages), and its few-shot examples (`shots` other records of the same source, each with its drawn
answer and passages). All are pure functions of the position, so
a resumed run, any number of workers and ranks, sees the same samples in the same steps.

The prompt is arctrain/data/prompt.py's (the chat template of an instruct decoder, else the plain layout), the target
the answer and the decoder's EOS. Passages are compressed jointly (data.qa.context="joint", the reference's way:
one encoder sequence of the passages' tokens, cut at data.qa.context_tokens, pooled as usual) or in chunks of
data.chunk_tokens as `arc-data build` cuts documents into segments ("segments", arctrain/data/chunks.py: at most
data.max_chunks of them). What is cut is counted (`ContextCut`, Memory.dropped_tokens).
"""

import functools

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from transformers import AutoTokenizer

from arctrain.config.schema import QASource, parse_qa_source
from arctrain.data.batch import ARCBatch, Memory, Text
from arctrain.data.batching import budget_batch, collate_batch
from arctrain.data.chunks import Chunker, ContextCut
from arctrain.data.prompt import chat_template_of, qa_prompt, qa_turn
from arctrain.data.qa_records import read_qa
from arctrain.data.sampling import Layout, SourceMixer, rng
from data_tools.boundaries import PieceEncoder

QA = "qa"
QA_ORDER, QA_DRAW = 0x51A, 0x51B  # rng streams: record order; per-record draws (answer, passages, shots)
QA_VAL_SEED = 0
CONTEXTS = ("joint", "segments")


def qa_sources(entries: list[str], default_shots: int) -> list[QASource]:
    return [parse_qa_source(e, default_shots) for e in entries]


def draw(seed: int, source: int, epoch: int, i: int, record: dict, n: int, shots: int, max_passages: int):
    """(answer, passages, shot record indices) of record i of a source of n records in an epoch."""
    g = rng(seed, QA_DRAW, source, epoch, i)
    answer = record["answers"][int(g.integers(len(record["answers"])))]
    passages = record["passages"][: int(g.integers(1, min(max_passages, len(record["passages"])) + 1))]
    k = min(shots, n - 1)
    others = g.choice(n - 1, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
    return answer, passages, [int(j) + (j >= i) for j in others]  # never i itself


def record_order(seed: int, source: int, n: int, j: int) -> tuple[int, int]:
    """(epoch, record index) at position j of a source's endless stream: each epoch a permutation of its records."""
    epoch = j // n
    return epoch, int(_permutation(seed, source, n, epoch)[j % n])


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, source: int, n: int, epoch: int):
    return rng(seed, QA_ORDER, source, epoch).permutation(n)


class TextPieces:
    """Decoder text and compressed memory from strings: a context cut into chunks (arctrain/data/chunks.py) as
    `arc-data build` cuts documents into segments (context "segments": at most `max_chunks`), or its passages as one
    encoder sequence ("joint": at most `context_tokens` encoder tokens, 0: no limit). `cut` counts what was
    dropped."""

    def __init__(
        self,
        enc_tok,
        dec_tok,
        chunk_tokens: int,
        max_chunks: int = 0,
        context: str = "segments",
        context_tokens: int = 0,
    ):
        if context not in CONTEXTS:
            raise ValueError(f"context {context!r}: expected one of {', '.join(CONTEXTS)}")
        self.enc_tok, self.dec_tok, self.context, self.context_tokens = enc_tok, dec_tok, context, context_tokens
        self.enc_pieces, self.dec_pieces = (
            PieceEncoder(enc_tok.backend_tokenizer),
            PieceEncoder(dec_tok.backend_tokenizer),
        )
        self.chunker = Chunker(enc_tok, chunk_tokens, max_chunks)
        self.cut = ContextCut()

    def segments(self, text: str) -> list[list[int]]:
        """Encoder ids of each chunk of `text`, cut at word boundaries after about `chunk_tokens` tokens."""
        return self.chunker.segments(text)

    def memory(self, texts: str | list[str], special: str | None = "cont") -> Memory:
        """One or more passages compressed together, then one special vector: jointly, one encoder sequence of
        their tokens one after the other, or their chunks in order."""
        texts = [texts] if isinstance(texts, str) else texts
        if self.context == "joint":
            segments, cut = (
                [[t for text in texts for t in self.enc_pieces.ids(text.strip(), first=True)]],
                ContextCut(1),
            )
        else:
            segments, cut = self.chunker.cut(texts)
        segments = [seg for seg in segments if seg]
        segments = self._limit(segments, cut) if self.context == "joint" else segments
        self.cut.add(cut)
        if not segments:
            raise ValueError("a context has no text to compress")
        return Memory(segments, special, cut.dropped_tokens)

    def doc_memory(self, doc) -> Memory:
        """A prompt's document (arctrain/data/prompt.py `Doc`) compressed (or its Memory, when made already)."""
        return doc.memory if doc.memory is not None else self.memory(doc.passages)

    def _limit(self, segments: list[list[int]], cut: ContextCut) -> list[list[int]]:
        """The first `context_tokens` encoder tokens of a context's chunks; what is cut is added to `cut`."""
        total = sum(map(len, segments))
        if not self.context_tokens or total <= self.context_tokens:
            return segments
        out, room = [], self.context_tokens
        for seg in segments:
            if room > 0:
                out.append(seg[:room])
                room -= len(out[-1])
        cut.truncated, cut.dropped_tokens = 1, cut.dropped_tokens + total - self.context_tokens
        return out

    def text(self, text: str, first: bool = False) -> Text:
        """Decoder ids of a piece of the prompt: `first` (its start) as the tokenizer encodes a text, a later piece
        without a SentencePiece dummy prefix (data_tools/boundaries.py), as shard segments are."""
        return Text(self.dec_pieces.ids(text, first))


class QAMaker:
    """Per loader worker: tokenizers (loaded on first use) and collate settings for QA examples."""

    def __init__(self, cfg, vocab):
        self.cfg, self.vocab, self.pieces, self.enc_tok = cfg, vocab, {}, None

    def _pieces(self, decoder: str) -> TextPieces:
        if decoder not in self.pieces:
            data = self.cfg.data
            self.enc_tok = self.enc_tok or AutoTokenizer.from_pretrained(self.cfg.model.encoder_path)
            dec = AutoTokenizer.from_pretrained(next(d.path for d in self.cfg.decoders if d.name == decoder))
            self.pieces[decoder] = TextPieces(
                self.enc_tok, dec, data.chunk_tokens, data.max_chunks, data.qa.context, data.qa.context_tokens
            )
        return self.pieces[decoder]

    def example(self, decoder: str, records: list[dict], i: int, epoch: int, source: int, seed: int, shots: int):
        pieces = self._pieces(decoder)
        n, max_passages = len(records), self.cfg.data.qa.max_passages
        answer, passages, shot_ids = draw(seed, source, epoch, i, records[i], n, shots, max_passages)
        shot_turns = []
        for j in shot_ids:
            shot_answer, shot_passages, _ = draw(seed, source, epoch, j, records[j], n, 0, max_passages)
            shot_turns.append(qa_turn(records[j], shot_passages, shot_answer))
        chat = chat_template_of(pieces.dec_tok, self.cfg.data.qa.chat_template)
        turn = qa_turn(records[i], passages)
        return qa_prompt(pieces, chat, shot_turns, turn, "compressed", answer, pieces.dec_tok.eos_token_id)

    def collate(self, examples: list, decoder: str, keys: list[str]) -> ARCBatch:
        return collate_batch(self.cfg.model, self.vocab, examples, keys, decoder, QA)


class QABatches(IterableDataset):
    """Endless QA batches (b, ARCBatch) of one rank from index `start`, split across DataLoader workers."""

    def __init__(
        self,
        cfg,
        vocab,
        sources: list[QASource],
        records: list[list[dict]],
        schedule,
        rank: int,
        world_size: int,
        start: int = 0,
    ):
        super().__init__()
        self.cfg, self.vocab, self.sources, self.records, self.schedule = cfg, vocab, sources, records, schedule
        self.layout, self.start = Layout(rank, world_size, cfg.train.grad_accum), start
        self.seed = cfg.train.seed + cfg.data.seed_offset

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        maker, mixer = QAMaker(self.cfg, self.vocab), SourceMixer(self.seed, tuple(s.weight for s in self.sources))
        b = self.start + worker
        while True:
            yield b, self.batch(b, maker, mixer)
            b += n_workers

    def picks(self, d: int, mixer: SourceMixer) -> list[tuple[int, int, int]]:
        """(source, epoch, record index) of each sample of global data batch d."""
        mbs = self.cfg.data.micro_batch_size
        first = d * mbs
        out = []
        for p in range(first, first + mbs):
            source, j = mixer.locate(p)
            out.append((source, *record_order(self.seed, source, len(self.records[source]), j)))
        return out

    def batch(self, b: int, maker: QAMaker, mixer: SourceMixer) -> ARCBatch:
        g = self.layout.global_batch(b)
        decoder, _ = self.schedule.plan(self.seed, g)
        examples, keys = [], []
        for source, epoch, i in self.picks(self.schedule.data_batch(g), mixer):  # fair mode: shared by the decoders
            shots = self.sources[source].shots
            examples.append(maker.example(decoder, self.records[source], i, epoch, source, self.seed, shots))
            keys.append(f"qa-{source}-{i:08d}")
        return budget_batch(
            self.cfg.data.tokens_per_micro_batch, self.cfg.model, self.vocab, examples, keys, decoder, QA
        )


def build_qa_loader(cfg, vocab, schedule, rank: int, world_size: int) -> QABatches:
    sources = qa_sources(cfg.data.qa.train, cfg.data.qa.shots)
    return QABatches(cfg, vocab, sources, [read_qa(s.path) for s in sources], schedule, rank, world_size)


class QAValBatches:
    """The fixed QA validation batches (`data.qa.val`): the files are read and the tokenizers loaded once per run.
    Every record of every file once (epoch 0 of QA_VAL_SEED: answer, passages and shots fixed), in file order."""

    def __init__(self, cfg, vocab):
        self.cfg, self.maker = cfg, QAMaker(cfg, vocab)
        self.sources = qa_sources(cfg.data.qa.val, cfg.data.qa.shots)
        self.records = [read_qa(s.path) for s in self.sources]
        self.items = [(s, i) for s, recs in enumerate(self.records) for i in range(len(recs))]

    def batches(self, decoder: str, rank: int, world_size: int):
        """Val batch v holds items v * mbs ... (wrapping); rank r takes v = r, r + world_size, ...
        (ceil(eval.batches / world_size) of them), as for the shards."""
        mbs = self.cfg.data.micro_batch_size
        for k in range(-(-self.cfg.eval.batches // world_size)):
            v = k * world_size + rank
            items = [self.items[g % len(self.items)] for g in range(v * mbs, (v + 1) * mbs)]
            examples = [
                self.maker.example(decoder, self.records[s], i, 0, s, QA_VAL_SEED, self.sources[s].shots)
                for s, i in items
            ]
            yield self.maker.collate(examples, decoder, [f"qa-val-{s}-{i:08d}" for s, i in items])


def check_qa(cfg, say=print) -> None:
    """Read every QA file now (bad records: counted skips; no usable record: an error, before any process group)
    and say how many records' passages (all data.qa.max_passages of them, the longest draw) exceed
    data.qa.context_tokens encoder tokens and so are cut (joint contexts; chunks dropped by data.max_chunks are
    counted as training runs, in the context_tokens_dropped metric)."""
    enc = AutoTokenizer.from_pretrained(cfg.model.encoder_path).backend_tokenizer
    limit, max_passages = cfg.data.qa.context_tokens, cfg.data.qa.max_passages
    for key in ("train", "val"):
        for source in qa_sources(getattr(cfg.data.qa, key), cfg.data.qa.shots):
            records = read_qa(source.path)
            texts = [" ".join(r["passages"][:max_passages]) for r in records]
            long = sum(len(e.ids) > limit for e in enc.encode_batch(texts, add_special_tokens=False))
            if long and cfg.data.qa.context == "joint":
                say(
                    f"data.qa.{key} {source.path}: {long} of {len(records)} records have passages longer than "
                    f"data.qa.context_tokens={limit} encoder tokens: cut to it"
                )
