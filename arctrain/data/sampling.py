"""What global micro-batch `g` holds, as a pure function of (seed, g) (docs/ARCHITECTURE.md §3).

The data order is defined on global indices, independent of the world size: optimizer step s is the global
micro-batches s * per_step ... (s + 1) * per_step - 1 (per_step = world_size x grad_accum, fixed for a run), and
global micro-batch g holds the global sample positions g * micro_batch_size + k. `Layout` says which g a rank's
a-th micro-batch of a step is, so a run resumed at another world size (grad_accum adapted) sees the same
micro-batches in every step. Every random choice draws from its own numpy Generator seeded by (seed, purpose tag,
indices...), so any batch can be recomputed from its index alone: this is what makes resume exact for any number
of workers and ranks.
"""

from dataclasses import dataclass, field

import numpy as np

# Purpose tags keep the random streams of different choices independent.
DECODER, TASK, SOURCE, SHARDS, BLOCK, SEGMENT = range(6)
RECONSTRUCTION, CONTINUATION = "reconstruction", "continuation"
SOURCE_CHUNK = 4096  # positions whose source choices are drawn together


def rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(list(entropy))


@dataclass(frozen=True)
class Layout:
    """Where a rank's micro-batches sit in the global order: rank r's local batch b (b = step * grad_accum + a)
    is global micro-batch step * per_step + a * world_size + r, per_step = world_size * grad_accum."""

    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1

    @property
    def per_step(self) -> int:
        return self.world_size * self.grad_accum

    def global_batch(self, b: int) -> int:
        step, a = divmod(b, self.grad_accum)
        return step * self.per_step + a * self.world_size + self.rank


@dataclass(frozen=True)
class Schedule:
    """Which decoder and task batch `b` uses: the same on every rank, so every rank runs the same modules."""

    decoders: tuple[str, ...]
    weights: tuple[float, ...]
    grad_accum: int  # global micro-batches per optimizer step (Layout.per_step): b below is a global index
    round_robin: bool
    task_ratio: float
    hold: int = 1  # optimizer steps per decoder choice (train.decoder_hold)
    fair: bool = False  # train.decoder_schedule=fair: the decoders in turn, each on the same batches

    def plan(self, seed: int, b: int) -> tuple[str, str]:
        """(decoder name, task) of batch `b`; the decoder is fixed for the optimizer step b // grad_accum, and
        for the block of `hold` consecutive steps that step belongs to. The task is that of `data_batch(b)`."""
        block = b // self.grad_accum // self.hold
        if self.fair:
            decoder = self.decoders[b // self.grad_accum % len(self.decoders)]
        elif self.round_robin:
            decoder = self.decoders[block % len(self.decoders)]
        else:
            p = np.asarray(self.weights) / sum(self.weights)
            decoder = self.decoders[rng(seed, DECODER, block).choice(len(self.decoders), p=p)]
        task = RECONSTRUCTION if rng(seed, TASK, self.data_batch(b)).random() < self.task_ratio else CONTINUATION
        return decoder, task

    def data_batch(self, b: int) -> int:
        """The batch index whose samples batch `b` holds: `b`, except in fair mode, where optimizer steps
        n*k ... n*k + n-1 (n decoders) all read the batches of data step k."""
        if not self.fair:
            return b
        step, micro = divmod(b, self.grad_accum)
        return step // len(self.decoders) * self.grad_accum + micro


@dataclass
class SourceMixer:
    """Source of global sample position `b` (weighted, from (seed, b)) and how many positions before `b` drew the
    same source. The loader draws one per sample (position = global batch * micro_batch_size + k), so batches mix
    sources."""

    seed: int
    weights: tuple[float, ...]
    _choices: dict[int, np.ndarray] = field(default_factory=dict)
    _before: list[np.ndarray] = field(default_factory=list)  # _before[k][s]: batches < k * CHUNK with source s

    def _chunk(self, k: int) -> np.ndarray:
        if k not in self._choices:
            p = np.asarray(self.weights) / sum(self.weights)
            self._choices = {k: rng(self.seed, SOURCE, k).choice(len(p), size=SOURCE_CHUNK, p=p)}
        return self._choices[k]

    def locate(self, b: int) -> tuple[int, int]:
        """(source index, number of earlier batches from that source)."""
        if len(self.weights) == 1:
            return 0, b
        k, r = divmod(b, SOURCE_CHUNK)
        if not self._before:
            self._before.append(np.zeros(len(self.weights), dtype=np.int64))
        while len(self._before) <= k:  # one pass over earlier chunks, cached: cheap even at b = 10^7
            n = len(self._before) - 1
            self._before.append(self._before[n] + np.bincount(self._chunk(n), minlength=len(self.weights)))
        chunk = self._chunk(k)
        source = int(chunk[r])
        return source, int(self._before[k][source] + np.count_nonzero(chunk[:r] == source))


@dataclass
class SourceStream:
    """The global stream of one source: position j -> (shard index, sample index within the shard).

    epoch = j // N, i = j % N. Position i is first permuted within its block of `shuffle_buffer`, then dealt to one
    of `lanes` interleaved streams (`interleave`): lane i % lanes reads, at its own position i // lanes, one of
    `lanes` equal, distant ranges of the epoch's samples, whose order is the shards permuted by (seed, epoch).
    Neighbouring positions, and so one global batch, come from `lanes` different shards (and input files), while
    each lane still reads its shards in order. No rank or world size: ranks read the positions their global
    micro-batches draw (SourceMixer over global sample positions).
    """

    seed: int
    source: int
    sizes: tuple[int, ...]
    shuffle_buffer: int
    lanes: int = 1
    _epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, cumulative sizes)
    _blocks: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = rng(self.seed, SHARDS, self.source, epoch).permutation(len(self.sizes))
            self._epoch = (epoch, order, np.cumsum(np.asarray(self.sizes)[order]))
            self._blocks.clear()
        return self._epoch[1], self._epoch[2]

    def _shuffle(self, epoch: int, i: int, n: int) -> int:
        block, offset = divmod(i, self.shuffle_buffer)
        if (epoch, block) not in self._blocks:
            if len(self._blocks) >= 8:  # positions only move forward: a few recent blocks is all we reuse
                self._blocks.clear()
            length = min(self.shuffle_buffer, n - block * self.shuffle_buffer)
            self._blocks[(epoch, block)] = rng(self.seed, BLOCK, self.source, epoch, block).permutation(length)
        return block * self.shuffle_buffer + int(self._blocks[(epoch, block)][offset])

    def locate(self, j: int) -> tuple[int, int]:
        n = int(sum(self.sizes))
        epoch, i = divmod(j, n)
        order, ends = self._order(epoch)
        pos = interleave(self._shuffle(epoch, i, n), n, self.lanes)
        slot = int(np.searchsorted(ends, pos, side="right"))
        start = int(ends[slot - 1]) if slot else 0
        return int(order[slot]), pos - start


def interleave(i: int, n: int, lanes: int) -> int:
    """A bijection of [0, n): position i -> offset i // lanes of range i % lanes, the ranges being `lanes` contiguous
    near-equal parts of [0, n) (the first n % lanes one longer); the positions past lanes * (n // lanes) take
    those longer ranges' last elements."""
    lanes = min(lanes, n)
    q, extra = divmod(n, lanes)
    if i < q * lanes:
        lane, offset = i % lanes, i // lanes
    else:
        lane, offset = i - q * lanes, q
    return lane * q + min(lane, extra) + offset
