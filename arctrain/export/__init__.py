"""Hugging Face exports: writing, loading, importing the reference checkpoints; hf/ ships inside."""
