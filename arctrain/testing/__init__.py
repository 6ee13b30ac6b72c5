"""Tiny real models, the embedded corpus and model fetching, for tests and demos."""
