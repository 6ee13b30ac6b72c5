"""The exported Hugging Face model: two flat files that import nothing from arctrain (copied into every export)."""
