"""Pooling rule and collate layout (arctrain/data/pooling.py, arctrain/data/batch.py): pure tensor tests."""

import pytest
import torch

from arctrain.data.batch import IGNORE, Example, Memory, Text, collate, drop_memory, pretraining_example
from arctrain.data.pooling import group_sizes, n_pooled, pooling_matrix


def _collate(examples, factor=4, n_vectors=0, bos_id=1):
    return collate(
        examples,
        pooling="mean_pooled_queries",
        factor=factor,
        n_vectors=n_vectors,
        enc_pad_id=0,
        dec_pad_id=2,
        bos_id=bos_id,
    )


@pytest.mark.parametrize(
    "length,factor,n_vectors,sizes",
    [
        (10, 4, 0, [4, 3, 3]),
        (8, 4, 0, [4, 4]),
        (3, 4, 0, [3]),
        (1, 8, 0, [1]),
        (17, 8, 0, [6, 6, 5]),
        (9, 4, 2, [5, 4]),
        (3, 4, 5, [1, 1, 1]),
    ],
)
def test_group_rule(length, factor, n_vectors, sizes):
    m = n_pooled(length, factor, n_vectors)
    assert group_sizes(length, m) == sizes


def test_pooling_matrix_by_hand():
    lengths, counts = torch.tensor([10, 3]), torch.tensor([3, 1])
    pool = pooling_matrix(lengths, counts, max_len=10)  # (2, 3, 10)
    expected = torch.zeros(2, 3, 10)
    expected[0, 0, 0:4] = 1 / 4
    expected[0, 1, 4:7] = 1 / 3
    expected[0, 2, 7:10] = 1 / 3
    expected[1, 0, 0:3] = 1 / 3
    torch.testing.assert_close(pool, expected)


def test_collate_layout_with_several_segments_between_text():
    # Document: <c1><c2><Cont> Question: ... Answer: <target>, and a reconstruction row.
    qa = Example([Text([10, 11]), Memory([[5] * 10, [6] * 3], "cont"), Text([12, 13]), Text([14, 15], loss=True)])
    rec = Example([Memory([[7] * 5], "rec"), Text([16, 17, 18], loss=True)])
    b = _collate([qa, rec])
    assert b.n_vectors.tolist() == [3, 1, 2]  # 10 tokens -> 3, 3 -> 1, 5 -> 2
    # Encoder: 18 tokens end to end, no padding; positions restart per segment; each token's pooled vector.
    assert b.enc.ids.tolist() == [5] * 10 + [6] * 3 + [7] * 5 and b.segments() == [[5] * 10, [6] * 3, [7] * 5]
    assert b.enc.cu_seqlens.tolist() == [0, 10, 13, 18] and b.enc.cu_seqlens.dtype == torch.int32
    assert b.enc.max_len == 10 and b.enc.max_vectors == 3 and b.enc.n_vectors == 6
    assert b.enc.positions.tolist() == list(range(10)) + [0, 1, 2] + [0, 1, 2, 3, 4]
    assert b.enc.pool_group.tolist() == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3 + [5] * 2
    assert b.enc.pool_cu_seqlens.tolist() == [0, 3, 4, 6] and b.enc.pool_positions.tolist() == [0, 1, 2, 0, 0, 1]
    # Decoder: rows of 12 and 7 positions end to end as one (1, 19) sequence.
    n_memory = 6  # specials come after the memory vectors: <Rec> = 6, <Cont> = 7
    assert b.dec_ids.shape == (1, 19) and b.row_lengths == [12, 7] and b.dec_max_len == 12
    assert b.dec_cu_seqlens.tolist() == [0, 12, 19]
    slots, ids, labels = b.rows(b.dec_slot), b.rows(b.dec_ids), b.rows(b.labels)
    assert slots[0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 7, -1, -1, -1, -1]
    assert ids[0].tolist() == [1, 10, 11, 2, 2, 2, 2, 2, 12, 13, 14, 15]
    assert labels[0].tolist() == [IGNORE] * 10 + [14, 15]
    assert slots[1].tolist() == [-1, 4, 5, n_memory, -1, -1, -1]
    assert labels[1].tolist() == [IGNORE] * 4 + [16, 17, 18]
    assert b.position_ids[0].tolist() == list(range(12)) + list(range(7))
    assert b.target_index.tolist() == [9, 10, 12 + 3, 12 + 4, 12 + 5]  # p predicts p + 1, same row
    assert b.n_target_tokens() == 5


def test_collate_without_bos_and_fixed_vectors():
    b = _collate([Example([Memory([[5] * 9], "rec"), Text([3], loss=True)])], n_vectors=2, bos_id=None)
    assert b.dec_slot[0].tolist() == [0, 1, 2, -1]
    assert b.dec_ids[0, 3] == 3 and b.target_index.tolist() == [2]


def test_a_target_starting_a_row_has_no_predictor():
    """Without BOS a row may start with a target: nothing predicts it, and it never borrows the previous row."""
    b = _collate([Example([Text([3, 4], loss=True)]), Example([Text([5, 6], loss=True)])], bos_id=None)
    assert b.target_index.tolist() == [0, 2] and b.labels[0, b.target_index + 1].tolist() == [4, 6]


def test_drop_memory_keeps_the_same_targets():
    ex = Example([Text([10]), Memory([[5] * 10], "cont"), Text([14, 15, 16], loss=True)])
    short = Example([Memory([[5] * 2], "rec"), Text([17], loss=True)])
    b = drop_memory(_collate([ex, short]))
    assert b.row_lengths == [5, 2] and b.dec_cu_seqlens.tolist() == [0, 5, 7] and b.dec_max_len == 5
    assert b.rows(b.dec_ids)[0].tolist() == [1, 10, 14, 15, 16]
    assert b.rows(b.labels)[0].tolist() == [IGNORE, IGNORE, 14, 15, 16]
    assert b.rows(b.dec_ids)[1].tolist() == [1, 17] and b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert (b.dec_slot == -1).all() and b.enc.ids.numel() == 0
    assert b.n_target_tokens() == 4 and b.labels[0, b.target_index + 1].tolist() == [14, 15, 16, 17]


def test_pretraining_examples():
    enc, dec = [[1, 2], [3, 4, 5]], [[11], [12, 13]]
    rec = pretraining_example("reconstruction", enc, dec, 1, prefix_ids=[9])
    assert rec.pieces == [Text([9]), Memory([[3, 4, 5]], "rec"), Text([12, 13], loss=True)]
    cont = pretraining_example("continuation", enc, dec, 0)
    assert cont.pieces == [Memory([[1, 2]], "cont"), Text([12, 13], loss=True)]
    last = pretraining_example("continuation", enc, dec, 1)
    assert last.pieces[-1] == Text([], loss=True)


@pytest.mark.parametrize(
    "examples,message",
    [([Example([Memory([[]], "rec")])], "empty"), ([Example([Memory([[1]], "summary")])], "special")],
)
def test_collate_rejects_bad_input(examples, message):
    with pytest.raises(ValueError, match=message):
        _collate(examples)


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, item):
        self.item = item

    def __iter__(self):
        yield self.item


def _example_batch():
    examples = [
        pretraining_example("continuation", [[5, 6, 7, 8, 9], [10, 11]], [[20, 21], [22, 23, 24]], 0),
        pretraining_example("reconstruction", [[5, 6, 7]], [[20, 21, 25]], 0),
    ]
    batch = _collate(examples)
    batch.task, batch.decoder, batch.keys = "mixed", "llama", ["a", "b"]
    return batch


def test_batch_crosses_a_worker_process_intact():
    """From a DataLoader worker (where tensors travel as numpy bytes, not shared memory) the batch is unchanged."""
    batch = _example_batch()
    (received,) = list(torch.utils.data.DataLoader(_Repeat(batch), batch_size=None, num_workers=1))
    assert type(received) is type(batch)
    fields = [(vars(batch), vars(received))] + [(vars(batch.enc), vars(received.enc))]
    for name, value, got in [(n, v, got[n]) for sent, got in fields for n, v in sent.items() if n != "enc"]:
        if isinstance(value, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.dtype == value.dtype and torch.equal(got, value), name
            got.add_(0)  # writable, like any tensor
        else:
            assert got == value, name


def test_data_loader_pins_every_tensor_of_the_batch(monkeypatch):
    """DataLoader(pin_memory=True) calls ARCBatch.pin_memory (no CUDA here: pinning is replaced by a marker)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    batch = _example_batch()
    out = pin_memory(batch)
    tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in vars(batch.enc).values() if isinstance(v, torch.Tensor)]
    assert len(pinned) == len(tensors) == 13
    assert type(out) is type(batch) and out.keys == batch.keys and torch.equal(out.dec_slot, batch.dec_slot)


def test_collate_carries_the_metadata_the_model_would_read_from_the_device():
    """Maxima, target indices and the FLOP sizes, against a direct computation; nothing computed is padding."""
    qa = Example([Text([10, 11]), Memory([[5] * 10, [6] * 3], "cont"), Text([12, 13]), Text([14, 15], loss=True)])
    rec = Example([Memory([[7] * 5], "rec"), Text([16, 17, 18], loss=True)])
    b = _collate([qa, rec])
    assert b.pooled_with == (4, 0) and b.max_vectors == int(b.n_vectors.max()) == 3
    lengths, rows = b.enc.cu_seqlens.diff(), torch.tensor(b.row_lengths)
    assert b.enc.max_len == int(lengths.max()) and b.dec_max_len == int(rows.max())
    starts = set(b.dec_cu_seqlens.tolist())
    selected = [p - 1 for p in range(b.labels.shape[1]) if b.labels[0, p] != IGNORE and p not in starts]
    assert b.target_index.tolist() == selected
    s = b.stats
    assert (s.samples, s.enc_tokens, s.dec_tokens, s.targets) == (2, 18, int(rows.sum()), 5)
    assert (s.enc_computed, s.dec_computed) == (s.enc_tokens, s.dec_tokens)  # no padding
    assert s.enc_pairs == int((lengths**2).sum()) and s.pooled_pairs == int((lengths * b.n_vectors).sum())
    assert s.vectors == 6 + 2 and s.dec_pairs == int((rows * (rows + 1) // 2).sum())
    dropped = drop_memory(b)
    assert dropped.pooled_with == b.pooled_with and dropped.stats is None
