"""Chunked cross-entropy (arctrain/model/loss.py) against torch's unchunked one: same loss, same gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arctrain.model.loss import lm_head_loss


def _reference(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 100])
@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(chunk, head_trains):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).double()
    head.requires_grad_(head_trains)
    hidden = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    want = _reference(head, hidden, targets)
    (want_grad,) = torch.autograd.grad(2.5 * want, hidden, retain_graph=head_trains)
    got = lm_head_loss(head, hidden, targets, chunk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if head_trains:
        want_w = torch.autograd.grad(2.5 * want, head.weight)[0]
        got_grad, got_w = torch.autograd.grad(2.5 * got, (hidden, head.weight))
        torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)
    else:
        (got_grad,) = torch.autograd.grad(2.5 * got, hidden)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)


def test_fp32_and_bf16_heads_match_the_reference():
    torch.manual_seed(1)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        head = nn.Linear(32, 200, bias=False).to(dtype).requires_grad_(False)
        hidden = torch.randn(20, 32, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, 200, (20,))
        want = _reference(head, hidden, targets)
        (want_grad,) = torch.autograd.grad(want, hidden)
        got = lm_head_loss(head, hidden, targets, chunk=6)
        (got_grad,) = torch.autograd.grad(got, hidden)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=tol, atol=tol)


def test_no_targets_is_zero_with_a_zero_gradient():
    head = nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(0, 8, requires_grad=True)
    loss = lm_head_loss(head, hidden, torch.zeros(0, dtype=torch.long), chunk=4)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)
