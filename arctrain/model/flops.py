"""One FLOP model for training metrics (MFU), evaluation (prefill cost) and the benchmarks.

Per token, N being a component's linear-layer weights (embedding tables are lookups, norms elementwise; the
decoder's LM head is counted apart, only where it runs):
- encoder (trains): 6N (forward 2N, backward 4N: input and weight gradients); with mean-pooled queries, the last
  layer's q_proj, o_proj and MLP run on the pooled vectors, not the tokens (only its k_proj and v_proj see tokens);
- projector (trains): 6N per projected vector (memory vectors + the two special vectors);
- frozen decoder: 4N per decoder position (forward 2N, backward for the input gradient only 2N: no weight
  gradient); its LM head 4·V·D per *target* token only (the loss runs it nowhere else, arctrain/model/arc.py);
- attention, per layer: 4·d per (query, key) pair forward (QK^T and AV, d = heads x head_dim), 3x that to train
  (backward: dQ, dK, dV). Pairs: L^2 per encoder segment (bidirectional), m·L in the pooled-query layer, T(T+1)/2
  per decoder row (causal: the masked half is not counted).
Recomputation (activation checkpointing, the chunked loss's backward) is not counted: MFU counts the model's
FLOPs, as torchtitan and Megatron do. Prefill (generation) is the forward alone: 2N, 4·d per pair, the LM head once
per row.
"""

import torch
from torch import nn

from arctrain.data.batch import BatchStats

# Dense bf16 peak TFLOPs of one accelerator (no sparsity), by a substring of torch.cuda.get_device_name(); the first
# match wins, so the specific names come first. Sources: NVIDIA's datasheets.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def peak_tflops(device_name: str | None = None) -> float | None:
    """The dense bf16 peak of `device_name` (default: the current CUDA device), None where unknown or no GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition knows its full size


def matmul_params(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Weights that cost 2 FLOPs per token in a forward pass: those of the linear layers, but `exclude` (embedding
    tables are lookups, norms and biases elementwise)."""
    skip = {id(m) for m in exclude}
    return sum(numel(m.weight) for m in module.modules() if isinstance(m, nn.Linear) and id(m) not in skip)


def _attention_width(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


class FlopCounter:
    """FLOPs of a training step's micro-batch, or of a prefill, from the model's sizes and a batch's `BatchStats`."""

    def __init__(self, model: nn.Module):
        enc = model.encoder
        self.enc_layers, self.enc_width = len(enc.layers), _attention_width(enc.config)
        self.pooled_last = enc.pooling == "mean_pooled_queries"
        last = enc.layers[-1]
        per_vector = (last.self_attn.q_proj, last.self_attn.o_proj, last.mlp) if self.pooled_last else ()
        self.enc_vec = sum(matmul_params(m) for m in per_vector)  # run once per pooled vector
        self.enc = matmul_params(enc) - self.enc_vec  # run once per encoder token
        self.proj = {name: matmul_params(proj) for name, proj in model.projectors.items()}
        self.dec, self.head, self.dec_layers, self.dec_width = {}, {}, {}, {}
        for name, dec in getattr(model, "all_decoders", model.decoders).items():
            head = dec.get_output_embeddings()
            self.dec[name] = matmul_params(dec, (head,))
            self.head[name] = numel(head.weight)
            self.dec_layers[name] = dec.config.num_hidden_layers
            self.dec_width[name] = _attention_width(dec.config)

    def _encoder_linear(self, s: BatchStats) -> float:
        return self.enc * s.enc_tokens + self.enc_vec * (s.vectors - 2)  # per (token or vector) parameters, x1

    def _encoder_attention(self, s: BatchStats) -> float:
        full = self.enc_layers - 1 if self.pooled_last else self.enc_layers
        pairs = full * s.enc_pairs + (s.pooled_pairs if self.pooled_last else 0)
        return 4.0 * self.enc_width * pairs  # forward

    def _decoder_attention(self, name: str, s: BatchStats) -> float:
        return 4.0 * self.dec_width[name] * self.dec_layers[name] * s.dec_pairs  # forward

    def __call__(self, decoder: str, s: BatchStats) -> float:
        """Training FLOPs of one micro-batch with `decoder`."""
        encoder = 6.0 * self._encoder_linear(s) + 3 * self._encoder_attention(s)
        projector = 6.0 * self.proj[decoder] * s.vectors
        frozen = 4.0 * self.dec[decoder] * s.dec_tokens + 3 * self._decoder_attention(decoder, s)
        head = 4.0 * self.head[decoder] * s.targets
        return encoder + projector + frozen + head

    def prefill(self, decoder: str, s: BatchStats, compressed: bool = True) -> float:
        """Forward FLOPs up to the first generated token's logits (compression included when `compressed`)."""
        out = 2.0 * self.dec[decoder] * s.dec_tokens + self._decoder_attention(decoder, s)
        out += 2.0 * self.head[decoder] * s.samples  # the LM head at each row's last position
        if compressed and s.enc_tokens:
            out += 2.0 * self._encoder_linear(s) + self._encoder_attention(s) + 2.0 * self.proj[decoder] * s.vectors
        return out
