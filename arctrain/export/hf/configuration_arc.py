"""Configuration of an exported ARC encoder (standalone: imports nothing from arctrain).

config = AutoConfig.from_pretrained("exported/tiny", trust_remote_code=True)
config.decoders[0]["name"], config.pooling, config.pooling_factor, config.segment_tokens, config.qa_context
"""

from transformers import PretrainedConfig


class ARCEncoderConfig(PretrainedConfig):
    model_type = "arc_encoder"

    def __init__(
        self,
        backbone: dict | None = None,
        n_truncated_layers: int = 2,
        pooling: str = "mean_pooled_queries",
        pooling_factor: int = 4,
        n_vectors: int = 0,
        segment_tokens: int = 256,
        decoders: list[dict] | None = None,
        encoder_tokenizer_hash: str = "",
        rope: str = "checkpoint",
        source: str = "",
        qa_context: dict | None = None,
        **kwargs,
    ):
        self.backbone = dict(backbone or {})
        """The truncated backbone's own config (model_type "llama", "mistral" or "qwen2"; num_hidden_layers kept)."""
        self.n_truncated_layers = n_truncated_layers
        """How many last layers of the original backbone were removed (already subtracted in `backbone`)."""
        self.pooling = pooling
        """"mean_pooled_queries" (queries of the last layer are group means) or "mean" (mean of the final states)."""
        self.pooling_factor = pooling_factor
        self.n_vectors = n_vectors
        """When > 0, every segment becomes min(n_vectors, length) vectors instead of ceil(length / factor)."""
        self.segment_tokens = segment_tokens
        """Encoder tokens per segment in training: longer contexts are compressed segment by segment."""
        self.decoders = list(decoders or [])
        """Per decoder: name, architecture, hidden_size, projector_hidden, tokenizer_hash, prefix, rope."""
        self.encoder_tokenizer_hash = encoder_tokenizer_hash
        self.rope = rope
        """The encoder's RoPE: "checkpoint" (the scaling in `backbone`, e.g. Llama-3's) or "plain" (unscaled, with
        rope_theta, as the reference ARC-Encoder). Each decoder entry has its own "rope" for whoever loads it."""
        self.source = source
        """Where the weights came from: an arctrain checkpoint, or a reference checkpoint (`arctrain import-arc`)."""
        self.qa_context = dict(qa_context) if qa_context else None
        """How QA fine-tuning compressed its passages and rendered its prompts, for generation and evaluation to do
        the same: {"context": "joint" or "segments", "chunk_tokens", "max_chunks", "context_tokens", "chat_template"
        (data.qa.chat_template)}; None when the model was not fine-tuned on QA (pretraining: contexts were segments
        of segment_tokens) or the export is older than this field."""
        super().__init__(**kwargs)
