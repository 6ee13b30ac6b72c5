"""Cross-entropy over a large vocabulary, chunked over the target tokens, with the LM head weight gathered once.

    loss_sum = lm_head_loss(decoder.get_output_embeddings(), hidden, targets, chunk=4096)   # hidden (N, D)

The unchunked loss materialises (N, V) logits in bf16, their fp32 copy and log-softmax (saved for backward) and the
fp32 gradient: ~10 bytes per (target, vocabulary entry), 6 GiB for 16 x 256 targets and Llama 3's 128k entries.
Here each chunk's logits live only inside the loop, in forward and again (recomputed) in backward, so the peak is
one chunk's. Under ZeRO-3 the head weight is gathered once for the whole forward loop and once for the backward
loop (`deepspeed.zero.GatheredParameters`; every rank runs both loops, whatever its number of targets, so the
collectives match), where calling the head module per chunk would gather it per chunk. The weight is taken from
the module without `head.weight`: that attribute read, inside the engine's forward, would make DeepSpeed register
the head as an external parameter of the running module (ARCModel), and keep every head it has seen gathered for
every forward and backward after; here only the active decoder's head is whole, and only while its loss runs.
"""

import contextlib

import torch
from torch import nn


def lm_head_loss(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (N, V) against `targets` (N,), fp32 (fp64 inputs: fp64); chunk 0: one."""
    if head.bias is not None:
        raise ValueError("lm_head_loss: an LM head with a bias is not supported")
    weight = dict(head.named_parameters(recurse=False))["weight"]  # not head.weight: see the module docstring
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)


def _gathered(weight: torch.Tensor):
    """The full weight inside the context, whether ZeRO-3 partitions it or not. A weight something else holds
    gathered already (a module running around this loss) is left to it: freeing it here would be an error."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    import deepspeed

    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([weight])


def _chunks(n: int, chunk: int):
    step = chunk if chunk > 0 else max(n, 1)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # logits in fp32 at least, as `.float()` would
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with _gathered(weight):
            for start, end in _chunks(hidden.shape[0], chunk):
                logits = (hidden[start:end] @ weight.t()).to(acc)  # (n, V), as F.linear then .float()
                picked = logits.gather(1, targets[start:end, None]).squeeze(1)  # (n,)
                total += (torch.logsumexp(logits, dim=-1) - picked).sum()
        ctx.save_for_backward(hidden, targets)
        # The weight by reference, not saved: ZeRO-3 swaps a partitioned parameter's .data between forward and backward.
        ctx.weight, ctx.chunk, ctx.acc = weight, chunk, acc
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, targets = ctx.saved_tensors
        weight = ctx.weight
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_weight and hasattr(weight, "ds_id"):
            raise NotImplementedError("lm_head_loss: a trainable LM head partitioned by ZeRO-3 is not supported")
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = None
        with _gathered(weight):
            if need_weight:
                grad_weight = torch.zeros(weight.shape, dtype=ctx.acc, device=weight.device)
            for start, end in _chunks(hidden.shape[0], ctx.chunk):
                h = hidden[start:end]
                logits = (h @ weight.t()).to(ctx.acc)  # recomputed: (n, V)
                grad_logits = torch.softmax(logits, dim=-1)
                rows = torch.arange(end - start, device=h.device)
                grad_logits[rows, targets[start:end]] -= 1.0
                grad_logits = (grad_logits * grad_total).to(weight.dtype)  # d loss / d logits, in the head's dtype
                if need_hidden:
                    grad_hidden[start:end] = grad_logits @ weight
                if need_weight:
                    grad_weight += (grad_logits.t() @ h).to(ctx.acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None
