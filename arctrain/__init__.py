"""arctrain: train ARC-style context compressors (one encoder, several frozen decoders) with DeepSpeed ZeRO-3."""

from data_tools import __version__  # one version for the distribution; data_tools imports nothing from arctrain

__all__ = ["__version__"]
