"""arc-data: raw text (jsonl, jsonl.zst, parquet) -> tokenized WebDataset shards + manifest.json."""

__version__ = "0.1.0"  # of the distribution that ships data_tools and arctrain (manifest.json's tool_version)
