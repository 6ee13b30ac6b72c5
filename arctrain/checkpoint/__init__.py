"""Resumable DeepSpeed checkpoints, elastic resume, init_from weights."""
