"""arctrain: train ARC-style context compressors (one encoder, several frozen decoders) with DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
