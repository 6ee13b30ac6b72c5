"""The ARC model: encoder -> pooled vectors -> projector[decoder] -> frozen decoder -> loss on target tokens.

Every forward with context runs the same modules whatever the task: the encoder, the decoder's special vectors
(both <Rec> and <Cont>, appended to the flat vector list), its projector, the decoder and its LM head. Under
ZeRO-3 every rank must run the same modules in the same order, and the decoder is chosen globally per step.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from arctrain.model.batch import IGNORE, ARCBatch, drop_memory
from arctrain.model.encoder import ARCEncoder


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
        first, second = self
        if not first.in_features == second.out_features <= first.out_features:
            raise ValueError(
                f"projector {first.in_features} -> {first.out_features} -> {second.out_features}: the identity "
                "init needs equal encoder and decoder widths and a hidden width at least as large"
            )
        n = first.in_features
        first.weight.zero_().fill_diagonal_(1.0)  # (H, D): the first D hidden units copy the input
        second.weight.zero_()[:, :n].copy_(scale * torch.eye(n))


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
        self, encoder: ARCEncoder, projectors: nn.ModuleDict, specials: nn.ModuleDict, decoders: nn.ModuleDict
    ):
        super().__init__()
        if set(projectors) != set(decoders) or set(specials) != set(decoders):
            raise ValueError(
                f"projectors {sorted(projectors)} and specials {sorted(specials)} must match "
                f"decoders {sorted(decoders)}"
            )
        self.encoder = encoder
        self.projectors = projectors
        self.specials = specials
        self.decoders = decoders
        self.decoder_checkpointing = False
        for decoder in decoders.values():
            decoder.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "ARCModel":
        super().train(mode)
        for decoder in self.decoders.values():
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
        for decoder in self.decoders.values():
            decoder.activation_checkpointing_enable({"use_reentrant": False})
        self.decoder_checkpointing = True
        self.train(self.training)

    def compress(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor) -> list[torch.Tensor]:
        """Pooled vectors per segment, (m_s, D) each, in encoder space."""
        return self.encoder.compress(enc_ids, enc_mask)

    def forward(self, batch: ARCBatch, decoder: str, *, use_context: bool = True) -> ARCOutput:
        if decoder not in self.decoders:
            raise ValueError(f"unknown decoder {decoder!r}: this model has {', '.join(self.decoders)}")
        model = self.decoders[decoder]
        if not use_context:
            batch = drop_memory(batch)
            embeds = model.get_input_embeddings()(batch.dec_ids)  # (B, T, Dd)
        else:
            embeds = self.embed(batch, decoder)
        out = self.decoder_loss(model, embeds, batch)
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
        """Decoder input embeddings (B, T, Dd): token embeddings, memory and special slots replaced."""
        pooled, counts = self.encoder(batch.enc_ids, batch.enc_mask)  # (S, M, D), (S,)
        if not torch.equal(counts.cpu(), batch.n_vectors.cpu()):
            raise ValueError(
                f"the batch was collated for {batch.n_vectors.tolist()} vectors per segment but the "
                f"encoder pools to {counts.tolist()}: collate with the model's pooling settings"
            )
        valid = torch.arange(pooled.shape[1], device=pooled.device) < counts.unsqueeze(1)  # (S, M)
        vectors = torch.cat([pooled[valid], self.specials[decoder]().to(pooled.dtype)])  # (N + 2, D)
        projected = self.projectors[decoder](vectors)  # (N + 2, Dd)
        tokens = self.decoders[decoder].get_input_embeddings()(batch.dec_ids)  # (B, T, Dd)
        slot = batch.dec_slot.unsqueeze(-1)  # (B, T, 1)
        inserted = projected.to(tokens.dtype)[batch.dec_slot.clamp(min=0)]  # (B, T, Dd)
        return torch.where(slot >= 0, inserted, tokens)

    @staticmethod
    def decoder_loss(model: nn.Module, embeds: torch.Tensor, batch: ARCBatch) -> ARCOutput:
        """Cross-entropy on target tokens; the LM head runs only where there is a target (no (B, T, V) logits)."""
        out = model.base_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
        )
        hidden = out.last_hidden_state[:, :-1]  # (B, T-1, Dd) position t predicts token t+1
        targets = batch.labels[:, 1:]  # (B, T-1)
        selected = targets != IGNORE
        logits = model.get_output_embeddings()(hidden[selected])  # (N, V)
        loss_sum = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
        n_tokens = selected.sum()
        return ARCOutput(loss_sum / n_tokens.clamp(min=1), n_tokens)
