"""arctrain/model/flops.py against torch's own FLOP counter (FlopCounterMode, sdpa's math backend so that attention is
counted as the matmuls it is) on a training step of the tiny ARC model, and the peak table."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arctrain.model import Example, Memory, Text, build_model, collate
from arctrain.model.flops import FlopCounter, peak_tflops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import configs  # noqa: E402


def test_training_flops_equal_torch_count_of_the_step(tiny_models):
    """Torch counts what runs; the model's convention differs in four known terms, each added here by hand:
    the causal decoder's masked half (math sdpa computes it, the model does not count it), the chunked loss's
    recomputed logits in backward, the encoder's pooling matmuls, and the idle decoders' zero-gradient anchor."""
    torch.manual_seed(0)
    model = build_model(*configs(tiny_models, loss_chunk_tokens=4)).train()
    n_rows, seg_len, target_len = 3, 13, 9  # no padding: torch's count then covers only real tokens
    examples = [
        Example([Memory([list(range(5 + b, 5 + b + seg_len))], "cont"), Text(list(range(20, 20 + target_len)), True)])
        for b in range(n_rows)
    ]
    batch = collate(
        examples, pooling="mean_pooled_queries", factor=4, n_vectors=0, enc_pad_id=0, dec_pad_id=0, bos_id=1
    )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counted:
        model(batch, "llama").loss.backward()

    s, dec = batch.stats, model.decoders["llama"]
    cfg, width = dec.config, dec.config.num_attention_heads * dec.config.head_dim
    t = batch.dec_max_len  # every row: causal attention per row computes its full t x t square
    masked_half = 3 * 4 * width * cfg.num_hidden_layers * (n_rows * t * t - s.dec_pairs)
    recomputed_logits = 2 * dec.lm_head.weight.numel() * s.targets
    anchor = 6 * sum(p.numel() for p in model.projectors["mistral"].parameters()) * 2  # on <Rec>, <Cont>
    # (group means are an index_add over the packed tokens: no matmul, nothing for torch to count)
    expected = FlopCounter(model)("llama", s) + masked_half + recomputed_logits + anchor
    assert counted.get_total_flops() == expected


def test_prefill_flops_equal_torch_count_of_the_forward(tiny_models):
    torch.manual_seed(0)
    model = build_model(*configs(tiny_models, pooling="mean")).eval()
    examples = [Example([Memory([list(range(5, 21))], "cont"), Text([30, 31, 32])]) for _ in range(2)]
    batch = collate(examples, pooling="mean", factor=4, n_vectors=0, enc_pad_id=0, dec_pad_id=0, bos_id=1)
    dec = model.decoders["mistral"]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counted:
        hidden = model.decoder_hidden(dec, model.embed(batch, "mistral"), batch)[0]  # (N, Dd) packed rows
        dec.lm_head(hidden[batch.dec_cu_seqlens[1:].long() - 1])  # each row's last position
    s, cfg = batch.stats, dec.config
    t = batch.dec_max_len
    masked_half = 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * (2 * t * t - s.dec_pairs)
    # mean pooling is an index_add over the packed tokens: no matmul to count
    assert counted.get_total_flops() == FlopCounter(model).prefill("mistral", s) + masked_half


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table_tells_the_cards_apart(name, tflops):
    assert peak_tflops(name) == tflops
