"""Shards -> batches (docs/ARCHITECTURE.md §3): a pure function of (seed, rank, world_size, batch index)."""

from arctrain.data.batching import Vocab, tokenizer_paths
from arctrain.data.loader import TrainLoader, build_train_loader, schedule, val_batches
from arctrain.data.sampling import CONTINUATION, RECONSTRUCTION, Schedule
from arctrain.data.shards import check_tokenizers, open_source, read_manifest
from arctrain.data.val import ValSet

__all__ = [
    "CONTINUATION",
    "RECONSTRUCTION",
    "Schedule",
    "TrainLoader",
    "ValSet",
    "Vocab",
    "build_train_loader",
    "check_tokenizers",
    "open_source",
    "read_manifest",
    "schedule",
    "tokenizer_paths",
    "val_batches",
]
