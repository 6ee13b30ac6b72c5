"""Using a trained encoder: generate, eval, vector stores, vLLM prompts, reports."""
