"""Pooling rule and collate layout (arctrain/model/pooling.py, arctrain/model/batch.py): pure tensor tests."""

import pytest
import torch

from arctrain.model.batch import IGNORE, Example, Memory, Text, collate, drop_memory, pretraining_example
from arctrain.model.pooling import group_sizes, n_pooled, pooling_matrix


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
    assert b.enc_ids.shape == (3, 10) and b.enc_mask.sum(1).tolist() == [10, 3, 5]
    n_memory = 6  # specials come after the memory vectors: <Rec> = 6, <Cont> = 7
    assert b.dec_slot[0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 7, -1, -1, -1, -1]
    assert b.dec_ids[0].tolist() == [1, 10, 11, 2, 2, 2, 2, 2, 12, 13, 14, 15]
    assert b.labels[0].tolist() == [IGNORE] * 10 + [14, 15]
    assert b.dec_slot[1].tolist() == [-1, 4, 5, n_memory, -1, -1, -1, -1, -1, -1, -1, -1]
    assert b.labels[1].tolist() == [IGNORE] * 4 + [16, 17, 18] + [IGNORE] * 5
    assert b.attention_mask.sum(1).tolist() == [12, 7]
    assert b.position_ids[1, :7].tolist() == list(range(7))
    assert b.n_target_tokens() == 5


def test_collate_without_bos_and_fixed_vectors():
    b = _collate([Example([Memory([[5] * 9], "rec"), Text([3], loss=True)])], n_vectors=2, bos_id=None)
    assert b.dec_slot[0].tolist() == [0, 1, 2, -1]
    assert b.dec_ids[0, 3] == 3


def test_drop_memory_keeps_the_same_targets():
    ex = Example([Text([10]), Memory([[5] * 10], "cont"), Text([14, 15, 16], loss=True)])
    short = Example([Memory([[5] * 2], "rec"), Text([17], loss=True)])
    b = drop_memory(_collate([ex, short]))
    assert b.dec_ids[0].tolist() == [1, 10, 14, 15, 16]
    assert b.labels[0].tolist() == [IGNORE, IGNORE, 14, 15, 16]
    assert b.dec_ids[1, :2].tolist() == [1, 17] and b.attention_mask[1].tolist() == [1, 1, 0, 0, 0]
    assert (b.dec_slot == -1).all()
    assert b.n_target_tokens() == 4


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
    for name, value in vars(batch).items():
        got = getattr(received, name)
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
    assert len(pinned) == len(tensors) == 10
    assert type(out) is type(batch) and out.keys == batch.keys and torch.equal(out.dec_slot, batch.dec_slot)


def test_collate_carries_the_metadata_the_model_would_read_from_the_device():
    """Counts' maximum, real-vector and target indices, and the FLOP sizes, against a direct computation."""
    qa = Example([Text([10, 11]), Memory([[5] * 10, [6] * 3], "cont"), Text([12, 13]), Text([14, 15], loss=True)])
    rec = Example([Memory([[7] * 5], "rec"), Text([16, 17, 18], loss=True)])
    b = _collate([qa, rec])
    assert b.pooled_with == (4, 0) and b.max_vectors == int(b.n_vectors.max()) == 3
    valid = torch.arange(b.max_vectors) < b.n_vectors.unsqueeze(1)  # (S, M)
    assert b.vector_index.tolist() == valid.flatten().nonzero().squeeze(1).tolist()
    selected = (b.labels[:, 1:] != IGNORE).flatten()
    assert b.target_index.tolist() == selected.nonzero().squeeze(1).tolist()
    lengths, rows = b.enc_mask.sum(1), b.attention_mask.sum(1)
    s = b.stats
    assert (s.samples, s.enc_tokens, s.dec_tokens, s.targets) == (2, 18, int(rows.sum()), 5)
    assert s.enc_pairs == int((lengths**2).sum()) and s.pooled_pairs == int((lengths * b.n_vectors).sum())
    assert s.vectors == 6 + 2 and s.dec_pairs == int((rows * (rows + 1) // 2).sum())
    dropped = drop_memory(b)
    assert dropped.target_index is None and dropped.pooled_with == b.pooled_with
