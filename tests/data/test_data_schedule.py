"""The decoder schedule (arctrain/data/sampling.py `Schedule`): train.decoder_hold keeps a decoder for K steps."""

import pytest

from arctrain.data.sampling import Schedule


@pytest.mark.parametrize("round_robin", [False, True])
def test_a_decoder_is_held_for_k_steps_and_is_a_function_of_the_batch_index(round_robin):
    held = Schedule(("a", "b", "c"), (1.0, 1.0, 1.0), grad_accum=2, round_robin=round_robin, task_ratio=0.5, hold=3)
    per_step = [held.plan(5, 2 * s)[0] for s in range(3000)]
    assert all(held.plan(5, 2 * s + 1)[0] == per_step[s] for s in range(3000))  # fixed within a step
    blocks = [per_step[k : k + 3] for k in range(0, 3000, 3)]
    assert all(len(set(block)) == 1 for block in blocks)  # fixed for 3 consecutive steps
    assert len({block[0] for block in blocks}) == 3
    # held = every third step of the unheld schedule, stretched: the same draws, the same weights
    plain = Schedule(("a", "b", "c"), (1.0, 1.0, 1.0), grad_accum=2, round_robin=round_robin, task_ratio=0.5)
    assert [b[0] for b in blocks] == [plain.plan(5, 2 * k)[0] for k in range(1000)]
    switches = sum(x != y for x, y in zip(per_step, per_step[1:]))
    assert switches <= 1000 and (round_robin or switches > 500)
    if round_robin:
        assert [b[0] for b in blocks[:4]] == ["a", "b", "c", "a"]
