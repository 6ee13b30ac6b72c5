"""arc-data: raw text (jsonl, jsonl.zst, parquet) -> tokenized WebDataset shards + manifest.json."""
