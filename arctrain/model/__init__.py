"""Batches -> losses: encoder (truncated bidirectional backbone + pooling), projectors, frozen decoders."""

from arctrain.data.batch import ARCBatch, Example, Memory, Text, collate, drop_memory, pretraining_example
from arctrain.data.pooling import group_sizes, n_pooled
from arctrain.model.arc import ARCModel, ARCOutput, Projector, SpecialVectors
from arctrain.model.build import build_encoder, build_model, load_causal_lm
from arctrain.model.encoder import ARCEncoder

__all__ = [
    "ARCBatch",
    "ARCEncoder",
    "ARCModel",
    "ARCOutput",
    "Example",
    "Memory",
    "Projector",
    "SpecialVectors",
    "Text",
    "build_encoder",
    "build_model",
    "collate",
    "drop_memory",
    "group_sizes",
    "load_causal_lm",
    "n_pooled",
    "pretraining_example",
]
