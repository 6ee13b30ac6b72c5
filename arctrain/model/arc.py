"""The ARC model: encoder -> pooled vectors -> projector[decoder] -> frozen decoder -> loss on target tokens.

Every forward with context runs the same modules whatever the task: the encoder, the decoder's special vectors
(both <Rec> and <Cont>, appended to the flat vector list), its projector, the decoder and its LM head. Under
ZeRO-3 every rank must run the same modules in the same order, and the decoder is chosen globally per step.
"""

from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from arctrain.data.batch import ARCBatch, drop_memory
from arctrain.model.attention import PACKED, packed_kwargs
from arctrain.model.encoder import ARCEncoder
from arctrain.model.loss import lm_head_loss


class ARCOutput(NamedTuple):  # a NamedTuple: DeepSpeed's ZeRO-3 hooks find the tensors in it
    loss: torch.Tensor  # token-averaged cross-entropy over the batch's target tokens (0 if there are none)
    n_tokens: torch.Tensor  # number of target tokens


class Projector(nn.Sequential):
    """Encoder space -> decoder embedding space: two bias-free linears, no activation (as in ARC)."""

    def __init__(self, enc_dim: int, hidden: int, dec_dim: int):
        super().__init__(nn.Linear(enc_dim, hidden, bias=False), nn.Linear(hidden, dec_dim, bias=False))

    @torch.no_grad()
    def init_identity(self, scale: float = 1.0) -> None:
        """Start as `scale` times the identity map (an encoder cut from the decoder itself shares its space)."""
        self.init_map(scale * torch.eye(self[0].in_features), "identity")

    @torch.no_grad()
    def init_map(self, weight: torch.Tensor, name: str = "aligned") -> None:
        """Start as the linear map `weight` (dec_dim, enc_dim): the first layer copies its input into the first
        enc_dim hidden units, the second applies `weight` (arctrain/model/align.py fits one)."""
        first, second = self
        if first.out_features < first.in_features or weight.shape != (second.out_features, first.in_features):
            raise ValueError(
                f"projector {first.in_features} -> {first.out_features} -> {second.out_features}: the {name} init "
                f"needs a hidden width at least the encoder's and a ({second.out_features}, {first.in_features}) map"
            )
        n = first.in_features
        first.weight.zero_().fill_diagonal_(1.0)  # (H, D): the first D hidden units copy the input
        second.weight.zero_()[:, :n].copy_(weight.to(second.weight))


class SpecialVectors(nn.Module):
    """A decoder's learned <Rec> and <Cont> vectors in encoder space, initialised to ones."""

    def __init__(self, dim: int):
        super().__init__()
        self.rec = nn.Parameter(torch.ones(dim))
        self.cont = nn.Parameter(torch.ones(dim))

    def forward(self) -> torch.Tensor:
        # Read inside forward so that ZeRO-3's hooks gather the partitioned parameters first.
        return torch.stack([self.rec, self.cont])  # (2, D) in the order of batch.SPECIALS


class ARCModel(nn.Module):
    def __init__(
        self,
        encoder: ARCEncoder,
        projectors: nn.ModuleDict,
        specials: nn.ModuleDict,
        decoders: nn.ModuleDict,
        loss_chunk_tokens: int = 0,
        replicated: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        names = set(decoders) | set(replicated or {})
        if set(projectors) != names or set(specials) != names:
            raise ValueError(
                f"projectors {sorted(projectors)} and specials {sorted(specials)} must match decoders {sorted(names)}"
            )
        self.encoder = encoder
        self.projectors = projectors
        self.specials = specials
        self.decoders = decoders
        # Replicated frozen decoders are a plain dict, not submodules: DeepSpeed's ZeRO-3 engine converts (partitions)
        # every parameter of its module, trainable or not, so these must not be part of it. They are not in
        # state_dict() or parameters(), and stay where build_model put them (the device, in the run's dtype).
        self.replicated = dict(replicated or {})
        self.decoder_checkpointing = False
        self.loss_chunk_tokens = loss_chunk_tokens  # 0: the cross-entropy in one piece
        for decoder in self.all_decoders.values():
            decoder.requires_grad_(False)
            decoder.set_attn_implementation(PACKED)  # packed rows (arctrain/model/attention.py), the stock class
        self.train(False)

    @property
    def all_decoders(self) -> dict[str, nn.Module]:
        """Partitioned (submodules) and replicated decoders, by name."""
        return {**self.decoders, **self.replicated}

    def train(self, mode: bool = True) -> "ARCModel":
        super().train(mode)
        for decoder in self.all_decoders.values():
            decoder.eval()  # frozen: no dropout, whatever the trainer's mode
            if self.decoder_checkpointing:
                # HF checkpoints a layer only when that layer is in training mode: flag the layers alone, so their
                # submodules (attention dropout) stay in eval mode.
                for module in decoder.modules():
                    if isinstance(module, GradientCheckpointingLayer):
                        module.training = mode
        return self

    def enable_decoder_checkpointing(self) -> None:
        """Activation checkpointing in every decoder layer (transformers' own, non-reentrant)."""
        for decoder in self.all_decoders.values():
            decoder.activation_checkpointing_enable({"use_reentrant": False})
        self.decoder_checkpointing = True
        self.train(self.training)

    def compress(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor) -> list[torch.Tensor]:
        """Pooled vectors per segment of a tokenizer's right-padded (S, L) output, (m_s, D) each, in encoder space."""
        return self.encoder.compress(enc_ids, enc_mask)

    def forward(self, batch: ARCBatch, decoder: str, *, use_context: bool = True) -> ARCOutput:
        decoders = self.all_decoders
        if decoder not in decoders:
            raise ValueError(f"unknown decoder {decoder!r}: this model has {', '.join(decoders)}")
        model = decoders[decoder]
        if not use_context:
            batch = drop_memory(batch)
            embeds = model.get_input_embeddings()(batch.dec_ids)  # (1, N, Dd)
        else:
            embeds = self.embed(batch, decoder)
        out = self.decoder_loss(model, embeds, batch, self.loss_chunk_tokens)
        if self.training and torch.is_grad_enabled():
            out = ARCOutput(out.loss + self._idle_anchor(decoder), out.n_tokens)
        return out

    def _idle_anchor(self, decoder: str) -> torch.Tensor:
        """Zero, with a zero gradient for the other decoders' projectors and special vectors.

        ZeRO-3 steps every parameter partition of the optimizer, used or not, and a partition whose parameters got
        no gradient this step keeps the gradient of the step that last used it. A gradient of exactly zero makes
        an idle decoder's step the same in a straight run and in a resumed one (the trainer also gives idle
        decoders' groups a learning rate of 0, so their weights do not move).
        """
        terms = [self.projectors[name](self.specials[name]()).sum() for name in self.projectors if name != decoder]
        return 0.0 * torch.stack(terms).sum() if terms else torch.zeros(())

    def embed(self, batch: ARCBatch, decoder: str) -> torch.Tensor:
        """Decoder input embeddings (1, N_dec, Dd), packed: token embeddings, memory and special slots replaced.

        Every size comes from `collate` (CPU): nothing here waits for the device."""
        enc = self.encoder
        if batch.pooled_with != (enc.factor, enc.n_vectors):
            raise ValueError(
                f"the batch was collated for (pooling_factor, n_vectors) = {batch.pooled_with} but the encoder pools "
                f"with {(enc.factor, enc.n_vectors)}: collate with the model's pooling settings"
            )
        special = self.specials[decoder]()  # (2, D)
        parts = []
        if batch.enc.n_vectors > 0:  # segments to compress (none when every memory comes from a store)
            parts.append(enc(batch.enc))  # (N, D) in slot order
        if batch.stored is not None:
            parts.append(batch.stored.to(special.dtype))  # (N_s, D) compressed earlier, dequantized by the store
        vectors = torch.cat([*parts, special.to(parts[0].dtype if parts else special.dtype)])  # (N + N_s + 2, D)
        projected = self.projectors[decoder](vectors)  # (N + N_s + 2, Dd)
        tokens = self.all_decoders[decoder].get_input_embeddings()(batch.dec_ids)  # (1, N_dec, Dd)
        slot = batch.dec_slot.unsqueeze(-1)  # (1, N_dec, 1)
        inserted = projected.to(tokens.dtype)[batch.dec_slot.clamp(min=0)]  # (1, N_dec, Dd)
        return torch.where(slot >= 0, inserted, tokens)

    @staticmethod
    def decoder_hidden(model: nn.Module, embeds: torch.Tensor, batch: ARCBatch) -> torch.Tensor:
        """The decoder's last hidden states (1, N_dec, Dd) of packed rows (causal inside each row)."""
        if model.config._attn_implementation != PACKED:  # any other would attend across the packed rows
            raise ValueError(
                f"decoder attention {model.config._attn_implementation!r}: packed rows need {PACKED!r} "
                f"(load_causal_lm, or decoder.set_attn_implementation({PACKED!r}))"
            )
        kwargs = packed_kwargs(batch.dec_cu_seqlens, batch.dec_max_len)
        out = model.base_model(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state

    @classmethod
    def decoder_loss(cls, model: nn.Module, embeds: torch.Tensor, batch: ARCBatch, chunk: int = 0) -> ARCOutput:
        """Cross-entropy on target tokens; the LM head runs only where there is a target (no (N, V) logits), in
        chunks of `chunk` target tokens (0: one piece; arctrain/model/loss.py)."""
        hidden = cls.decoder_hidden(model, embeds, batch)[0]  # (N_dec, Dd) position p predicts token p + 1
        index = batch.target_index  # (N_t,) never a row's last position: its next token is in the same row
        targets = batch.labels[0, index + 1]  # (N_t,)
        loss_sum = lm_head_loss(model.get_output_embeddings(), hidden[index], targets, chunk)
        n = index.shape[0]  # known on the host: the index's shape
        n_tokens = torch.full((), n, dtype=torch.long, device=hidden.device)
        return ARCOutput(loss_sum / max(n, 1), n_tokens)
