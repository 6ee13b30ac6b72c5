"""QA fine-tuning data: question / answers / passages records -> batches with the passages compressed.

    {"question": "...", "answers": ["...", ...], "passages": ["...", ...] or "..."}      one JSON object per line

The prompt is the one `arctrain eval` asks (`qa_example`): `--shots` earlier examples, each with its own passages
compressed, then

    Document: <compressed passages, <Cont>>\\nQuestion: q\\nAnswer: a\\n

with the loss on " a\\n" only (the first answer; the newline teaches where an answer ends). Records are small next
to pretraining shards, so the file is read whole in the main process and tokenized in the loader workers.
Global micro-batch g (`sampling.Layout`: local batch b of rank r) holds positions g * mbs ... of an endless stream
of epochs, each a permutation of the records seeded by (seed, epoch): a pure function of g, so a resumed run sees
the same records in the same steps, for any number of workers and ranks, as the shard loader
(arctrain/data/loader.py) does.
"""

import functools
import json
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info
from transformers import AutoTokenizer

from arctrain.data.chunks import Chunker, ContextCut
from arctrain.data.loader import collate_batch
from arctrain.data.sampling import Layout, rng
from arctrain.model.batch import ARCBatch, Example, Memory, Text

QA = "qa"
QA_ORDER = 0x51A  # rng stream of the record order
QA_VAL_SEED = 0


def read_jsonl(path: Path, required: dict[str, tuple[type, ...]]) -> list[dict]:
    """Records of a JSON-lines file; a bad line is a one-line error naming file:line and the key."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: a record must be a JSON object")
        for key, types in required.items():
            if key not in record:
                raise ValueError(f"{path}:{n}: record has no {key!r}")
            if not isinstance(record[key], types):
                raise ValueError(f"{path}:{n}: {key!r} must be {' or '.join(t.__name__ for t in types)}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def read_qa(path: Path) -> list[dict]:
    records = read_jsonl(path, {"question": (str,), "answers": (list,), "passages": (list, str)})
    for n, r in enumerate(records, 1):
        if not r["answers"] or not all(isinstance(a, str) for a in r["answers"]):
            raise ValueError(f"{path}: record {n}: 'answers' must be a non-empty list of strings")
        r["passages"] = [r["passages"]] if isinstance(r["passages"], str) else r["passages"]
        if not any(p.strip() for p in r["passages"]):
            raise ValueError(f"{path}: record {n}: 'passages' has no text to compress")
    return records


def shot_indices(i: int, n: int, shots: int) -> list[int]:
    """The few-shot examples of record i: the next `shots` records, cyclically, never i itself."""
    return [(i + 1 + j) % n for j in range(min(shots, n - 1))]


def qa_example(pieces, records: list[dict], i: int, shots: int, mode: str, train: bool = False) -> Example:
    """The few-shot prompt of record i in one mode; `pieces` makes decoder text (`.text`) and a record's compressed
    passages (`.passages_memory`: encoded, or read from a vector store by `arctrain eval --vectors`). `train`: the
    answer follows as the target (loss on it only)."""
    out = []
    for j in [*shot_indices(i, len(records), shots), i]:
        r = records[j]
        answer = "" if j == i else f" {r['answers'][0]}\n\n"
        qa = f"Question: {r['question']}\nAnswer:{answer}"
        first = not out  # the prompt's first piece is tokenized as a text start, later ones without a dummy prefix
        if mode == "compressed":
            out += [pieces.text("Document: ", first), pieces.passages_memory(r), pieces.text("\n" + qa)]
        elif mode == "open_book":
            out.append(pieces.text("Document: " + "\n".join(r["passages"]) + "\n" + qa, first))
        else:
            out.append(pieces.text(qa, first))
    if train:
        target = pieces.text(f" {records[i]['answers'][0]}\n")
        out.append(Text(target.ids, loss=True))
    return Example(out)


class TextPieces:
    """Decoder text and compressed memory from strings: contexts cut into chunks (arctrain/data/chunks.py) as
    `arc-data build` cuts documents into segments; `cut` counts what `max_chunks` dropped."""

    def __init__(self, enc_tok, dec_tok, chunk_tokens: int, max_chunks: int = 0):
        from data_tools.boundaries import PieceEncoder

        self.enc_tok, self.dec_tok = enc_tok, dec_tok
        self.dec_pieces = PieceEncoder(dec_tok.backend_tokenizer)
        self.chunker = Chunker(enc_tok, chunk_tokens, max_chunks)
        self.cut = ContextCut()

    def segments(self, text: str) -> list[list[int]]:
        """Encoder ids of each chunk of `text`, cut at word boundaries after about `chunk_tokens` tokens."""
        return self.chunker.segments(text)

    def memory(self, texts: str | list[str], special: str | None = "cont") -> Memory:
        """One or more passages compressed together: their chunks in order (at most max_chunks), one special."""
        segments, cut = self.chunker.cut([texts] if isinstance(texts, str) else texts)
        self.cut.add(cut)
        if not segments:
            raise ValueError("a context has no text to compress")
        return Memory(segments, special, cut.dropped_tokens)

    def passages_memory(self, record: dict) -> Memory:
        """A QA record's passages compressed together."""
        return self.memory(record["passages"])

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
            self.enc_tok = self.enc_tok or AutoTokenizer.from_pretrained(self.cfg.model.encoder_path)
            dec = AutoTokenizer.from_pretrained(next(d.path for d in self.cfg.decoders if d.name == decoder))
            data = self.cfg.data
            self.pieces[decoder] = TextPieces(self.enc_tok, dec, data.chunk_tokens, data.max_chunks)
        return self.pieces[decoder]

    def batch(self, records: list[dict], picks: list[int], decoder: str, keys: list[str]) -> ARCBatch:
        pieces = self._pieces(decoder)
        shots = self.cfg.data.qa_shots
        examples = [qa_example(pieces, records, i, shots, "compressed", train=True) for i in picks]
        return collate_batch(self.cfg.model, self.vocab, examples, keys, decoder, QA)


def record_order(seed: int, n: int, k: int) -> int:
    """Record index at position k of the endless stream: epoch k // n is a permutation seeded by (seed, epoch)."""
    return int(_permutation(seed, n, k // n)[k % n])


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, n: int, epoch: int):
    return rng(seed, QA_ORDER, epoch).permutation(n)


class QABatches(IterableDataset):
    """Endless QA batches (b, ARCBatch) of one rank from index `start`, split across DataLoader workers."""

    def __init__(self, cfg, vocab, records: list[dict], schedule, rank: int, world_size: int, start: int = 0):
        super().__init__()
        self.cfg, self.vocab, self.records, self.schedule = cfg, vocab, records, schedule
        self.layout, self.start = Layout(rank, world_size, cfg.train.grad_accum), start
        self.seed = cfg.train.seed + cfg.data.seed_offset

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        maker = QAMaker(self.cfg, self.vocab)
        b = self.start + worker
        while True:
            yield b, self.batch(b, maker)
            b += n_workers

    def batch(self, b: int, maker: QAMaker) -> ARCBatch:
        g = self.layout.global_batch(b)
        decoder, _ = self.schedule.plan(self.seed, g)
        mbs, n = self.cfg.data.micro_batch_size, len(self.records)
        first = self.schedule.data_batch(g) * mbs  # fair mode: the global batch shared by the decoders
        picks = [record_order(self.seed, n, k) for k in range(first, first + mbs)]
        return maker.batch(self.records, picks, decoder, [f"qa-{i:08d}" for i in picks])


class QAValBatches:
    """The fixed QA validation batches (`data.qa_val`): the file is read and the tokenizers loaded once per run."""

    def __init__(self, cfg, vocab):
        self.cfg, self.records, self.maker = cfg, read_qa(Path(cfg.data.qa_val)), QAMaker(cfg, vocab)

    def batches(self, decoder: str, rank: int, world_size: int):
        """Val batch v holds records v * mbs ... (wrapping); rank r takes v = r, r + world_size, ...
        (ceil(eval.batches / world_size) of them), as for the shards."""
        mbs = self.cfg.data.micro_batch_size
        for k in range(-(-self.cfg.eval.batches // world_size)):
            v = k * world_size + rank
            picks = [g % len(self.records) for g in range(v * mbs, (v + 1) * mbs)]
            yield self.maker.batch(self.records, picks, decoder, [f"qa-val-{i:08d}" for i in picks])
