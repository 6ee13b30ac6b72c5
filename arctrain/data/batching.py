"""Tokenized examples -> the batches the model takes: tokenizers (Vocab), BatchMaker, collate."""

import zlib
from dataclasses import dataclass, replace

from transformers import AutoTokenizer

from arctrain.config.schema import Config
from arctrain.data.batch import (
    ARCBatch,
    Example,
    collate,
    example_tokens,
    has_target,
    pretraining_example,
    within_budget,
)
from arctrain.data.sampling import SEGMENT, rng
from arctrain.data.shards import ShardReader, Source, shard_table


@dataclass(frozen=True)
class Vocab:
    """What examples need from the tokenizers, computed once in the main process (workers never tokenize)."""

    enc_pad_id: int
    bos_id: dict[str, int | None]  # per decoder
    pad_id: dict[str, int]
    prefix_ids: dict[str, list[int]]

    @classmethod
    def from_config(cls, cfg: Config) -> "Vocab":
        enc = AutoTokenizer.from_pretrained(cfg.model.encoder_path)
        bos, pad, prefix = {}, {}, {}
        for d in cfg.decoders:
            tok = AutoTokenizer.from_pretrained(d.path)
            bos[d.name] = tok.bos_token_id
            pad[d.name] = _pad_id(tok)
            prefix[d.name] = tok.encode(d.prefix, add_special_tokens=False) if d.prefix else []
        return cls(_pad_id(enc), bos, pad, prefix)


def _pad_id(tok) -> int:
    # Padding is masked out everywhere; a tokenizer without a pad token can pad with EOS (or 0).
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return candidate


def tokenizer_paths(cfg: Config) -> dict[str, str]:
    """The tokenizers shards must have been built with, by manifest name."""
    return {"encoder": cfg.model.encoder_path, **{d.name: d.path for d in cfg.decoders}}


class BatchMaker:
    """Reads samples and turns them into one decoder's examples and a collated batch."""

    def __init__(self, cfg: Config, vocab: Vocab, sources: list[Source], budget: int = 0):
        self.model, self.vocab, self.interleave = cfg.model, vocab, cfg.data.interleave_tokens
        self.budget = budget  # data.tokens_per_micro_batch for training batches; validation's keep every sample
        # Every source's streams are read at once: keep each stream's shard (and the next) open and indexed.
        cache = max(8, len(sources) * (2 * cfg.data.shard_streams + 2))
        self.reader = ShardReader(shard_table(sources), max_open=cache, max_indexes=cache)

    def example(self, path: str, i: int, decoder: str, task: str, seed: int, b: int) -> tuple[str, Example]:
        suffixes = ["encoder.ids.npy", "encoder.offsets.npy", f"{decoder}.ids.npy", f"{decoder}.offsets.npy"]
        key, arrays = self.reader.read(path, i, suffixes)
        enc = _segments(arrays["encoder.ids.npy"], arrays["encoder.offsets.npy"])
        dec = _segments(arrays[f"{decoder}.ids.npy"], arrays[f"{decoder}.offsets.npy"])
        if len(enc) != len(dec) or not enc:
            raise ValueError(f"{path}: sample {key} has {len(enc)} encoder but {len(dec)} {decoder} segments")
        # Continuation needs a next segment when there is one; a one-segment sample gives an empty target (left out
        # by `collate`).
        # Interleaved continuation also wants text before the segment: it starts at segment 1 when that leaves a next.
        first = 1 if task == "continuation" and self.interleave and len(enc) >= 3 else 0
        choices = len(enc) if task == "reconstruction" else max(len(enc) - 1, 1)
        seg = first + int(rng(seed, SEGMENT, b, zlib.crc32(key.encode())).integers(choices - first))
        return key, pretraining_example(task, enc, dec, seg, self.vocab.prefix_ids[decoder], self.interleave)

    def collate(self, examples: list[Example], keys: list[str], decoder: str, task: str) -> ARCBatch:
        """The batch without the examples that have no target token (a continuation drawn from a one-segment
        sample): they would cost an encoder pass and a decoder row for a loss of nothing. Leaving them out changes
        no loss or gradient (the loss is averaged over target tokens); the count goes to `BatchStats.skipped_rows`.
        A batch with no target at all is kept whole: under ZeRO-3 every rank runs the model every step. Then the
        token budget (data.tokens_per_micro_batch) picks what the micro-batch takes (`budget_batch`)."""
        kept = [j for j, example in enumerate(examples) if has_target(example)] or list(range(len(examples)))
        batch = budget_batch(
            self.budget, self.model, self.vocab, [examples[j] for j in kept], [keys[j] for j in kept], decoder, task
        )
        batch.stats = replace(batch.stats, skipped_rows=len(examples) - len(kept))
        return batch


def budget_batch(
    budget: int, model, vocab: Vocab, examples: list[Example], keys: list[str], decoder: str, task: str
) -> ARCBatch:
    """`collate_batch` of the examples a micro-batch of `budget` tokens takes (batch.within_budget; 0: all of them),
    the skipped and left ones counted in `BatchStats`. A window with no example within the budget is a config error."""
    if not budget:
        return collate_batch(model, vocab, examples, keys, decoder, task)
    bos = vocab.bos_id[decoder] is not None
    sizes = [example_tokens(e, model.pooling_factor, model.n_vectors, bos) for e in examples]
    taken, over, left = within_budget(sizes, budget)
    if not taken:
        raise ValueError(
            f"data.tokens_per_micro_batch={budget}: every sample of a micro-batch is larger on its own "
            f"(sample {keys[0]}: {sizes[0]} encoder + decoder tokens); raise the budget"
        )
    batch = collate_batch(model, vocab, [examples[j] for j in taken], [keys[j] for j in taken], decoder, task)
    batch.stats = replace(batch.stats, over_budget=over, budget_full=left)
    return batch


def collate_batch(model, vocab: Vocab, examples: list[Example], keys: list[str], decoder: str, task: str) -> ARCBatch:
    """`collate` with the run's pooling settings (config.ModelConfig) and `decoder`'s special token ids."""
    return collate(
        examples,
        pooling=model.pooling,
        factor=model.pooling_factor,
        n_vectors=model.n_vectors,
        enc_pad_id=vocab.enc_pad_id,
        dec_pad_id=vocab.pad_id[decoder],
        bos_id=vocab.bos_id[decoder],
        task=task,
        decoder=decoder,
        keys=keys,
    )


def _segments(ids, offsets) -> list[list[int]]:
    ids = ids.tolist()
    return [ids[offsets[j] : offsets[j + 1]] for j in range(len(offsets) - 1)]
