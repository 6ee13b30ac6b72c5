"""A linear map applied to the vectors before a store's codec (`arctrain compress --weighting`), undone at decode, so
that the codec's L2 error counts what the decoders feel rather than raw variance.

    arctrain compress --model EXPORT --input docs.jsonl --out store/ --dtype rq32 --weighting fisher \\
        --decoder artifacts/smollm2-135m --decoder artifacts/gemma3-270m

Why: the encoder's pooled vectors carry a few massive-activation dimensions (in the demo export one dimension holds
most of the variance); an L2 quantizer (PQ, RQ) spends its bits on them, while the decoders, reading the vectors
through a projector into an RMSNorm'd stream, may barely notice errors there. The loss increase of a small error e on
a vector x is, to second order, e^T H e with H ~ G = E[g g^T], g = dL/dx the gradient of the decoder's reconstruction
loss (the empirical Fisher). Coding z = A x with A^T A = G makes L2 error in z that increase:
- `fisher`: A = diag(sqrt(diag G)), the per-dimension sensitivity;
- `fisher-full`: A = G_s^(1/2), G shrunk towards a multiple of the identity (G_s = (1 - s) G + s tr(G) / D I, s =
  SHRINK), with few gradients per dimension G alone is poorly conditioned;
- `std`: A = diag(1 / std), each dimension standardised on the codebook's training sample (no decoder needed).
G is measured on the reconstruction (<Rec>, teacher forcing) of up to --weighting-segments segments of the input
(the documents drawn uniformly, seeded), per decoder, each decoder's G divided by its trace, then averaged.

faiss's LinearTransform decodes only orthonormal maps, so A is stored beside the codebook: DIR/weighting.npy holds
(2, D) (diagonal: A's diagonal and its inverse) or (2, D, D) (A and A^-1), its sha256 in the manifest's codec entry;
the codec encodes sa_encode(x A^T) and decodes sa_decode(codes) A^-T (arctrain/inference/store_codec.py, which
applies it).
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from arctrain.data.qa import TextPieces
from arctrain.inference import store_codec
from arctrain.inference.generate import ARCGenerator
from arctrain.inference.store import PQ_DTYPES, VectorStore
from arctrain.model import Example, Memory, Text

WEIGHTINGS = ("none", "std", "fisher", "fisher-full")
NEEDS_DECODER = ("fisher", "fisher-full")
SHRINK = 0.1  # fisher-full's shrinkage towards tr(G) / D I
BATCH = 16  # segments per decoder forward


def segment_gradients(arc, items: list[tuple[torch.Tensor, list[int]]]) -> torch.Tensor:
    """(N, D) float64: d(summed token loss of its segment)/d(vector) for every vector of `items` ((m, D) vectors,
    decoder tokens) reconstructed by `arc` (an ARCGenerator) as `arctrain eval --heldout` scores them."""
    for p in arc.model.parameters():
        p.requires_grad_(False)
    grads = []
    for start in range(0, len(items), BATCH):
        prefix = [arc.text(arc.prefix, first=True)] if arc.prefix else []
        examples = [
            Example(prefix + [Memory([], "rec", vectors=[v]), Text(t, loss=True)])
            for v, t in items[start : start + BATCH]
        ]
        batch = arc.batch(examples).to(arc.device)
        batch.stored = batch.stored.float().clone().requires_grad_(True)  # (N_s, D) the stored vectors, in order
        embeds = arc.model.embed(batch, arc.name)  # (1, N_dec, Dd)
        hidden = arc.model.decoder_hidden(arc.decoder, embeds, batch)[0]  # (N_dec, Dd) position p predicts p + 1
        targets = batch.labels[0, batch.target_index + 1]  # (N_t,)
        logits = arc.decoder.get_output_embeddings()(hidden[batch.target_index]).float()  # (N_t, V)
        # summed over the batch: each vector reaches only its own segment's tokens (packed rows, block attention)
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
        grads.append(batch.stored.grad.detach().double().cpu())
    return torch.cat(grads)  # (N, D)


def decoder_fisher(
    model_dir: Path, decoders: list[Path], docs: list[tuple[str, str | list[list[int]]]], store, segments: int, device
) -> tuple[np.ndarray, int]:
    """(sensitivity over `decoders`, segments used): the first `segments` segments of `docs` ((id, text or encoder
    segments), their vectors read from `store`, an fp32 VectorStore of them) reconstructed by each decoder."""
    grads = []
    for decoder in decoders:
        arc = ARCGenerator(model_dir, decoder, dtype=torch.float32, device=device)
        pieces = TextPieces(arc.enc_tok, arc.enc_tok, arc.config.segment_tokens)  # the cut `arctrain compress` makes
        items = []
        for doc_id, text in docs:
            cut = pieces.segments(text) if isinstance(text, str) else text
            for seg, vectors in zip(cut, store.get(doc_id).vectors, strict=True):
                items.append((vectors, arc.dec_tok.encode(arc.enc_tok.decode(seg), add_special_tokens=False)))
        items = items[:segments]
        grads.append(segment_gradients(arc, items))
        del arc
    return sensitivity(grads), len(items)


def sensitivity(grads: list[torch.Tensor]) -> np.ndarray:
    """(D, D) float64: the mean over decoders of each one's E[g g^T] divided by its trace."""
    total = 0
    for g in grads:  # (N, D) per decoder
        fisher = (g.T @ g / len(g)).numpy()
        total = total + fisher / np.trace(fisher)
    return total / len(grads)


def transform(kind: str, sample: np.ndarray, fisher: np.ndarray | None = None) -> np.ndarray:
    """The stored array of a weighting: (2, D) [diagonal, its inverse] or (2, D, D) [A, A^-1], float32."""
    if kind == "std":
        std = sample.astype(np.float64).std(axis=0)
        diag = 1 / np.maximum(std, 1e-6 * std.max())
    elif kind == "fisher":
        diag = np.sqrt(np.diag(fisher))
        diag = np.maximum(diag, 1e-6 * diag.max())  # a dimension no gradient reached still codes, coarsely
    elif kind == "fisher-full":
        dim = len(fisher)
        shrunk = (1 - SHRINK) * fisher + SHRINK * np.trace(fisher) / dim * np.eye(dim)
        values, vectors = np.linalg.eigh(shrunk)
        root = (vectors * np.sqrt(values)) @ vectors.T  # symmetric G_s^(1/2)
        inverse = (vectors / np.sqrt(values)) @ vectors.T
        scale = np.sqrt(dim / np.trace(shrunk))  # mean eigenvalue 1: the codec's sizes keep their meaning
        return np.stack([root * scale, inverse / scale]).astype(np.float32)  # (2, D, D)
    else:
        raise ValueError(f"--weighting {kind!r}: not one of {', '.join(WEIGHTINGS)}")
    diag = diag / np.sqrt(np.mean(diag**2))  # rms 1
    return np.stack([diag, 1 / diag]).astype(np.float32)  # (2, D)


class DocSample:
    """A uniform random sample of up to `size` documents of a stream (Algorithm R, seeded)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen, self.docs = size, 0, []
        self.rng = np.random.default_rng(seed)

    def add(self, doc: tuple) -> None:
        j = self.seen if self.seen < self.size else int(self.rng.integers(0, self.seen + 1))
        if j < len(self.docs):
            self.docs[j] = doc
        elif j < self.size:
            self.docs.append(doc)
        self.seen += 1


def from_args(args: argparse.Namespace, staging: Path, docs: list, sample: np.ndarray) -> tuple | None:
    """--weighting's (manifest entry, array) (arctrain/inference/py); None for `none`."""
    if args.weighting == "none":
        return None
    entry, fisher = {"kind": args.weighting}, None
    if args.weighting in NEEDS_DECODER:
        source = VectorStore(staging)
        fisher, used = decoder_fisher(args.model, args.decoder, docs, source, args.weighting_segments, args.device)
        source.close()
        entry |= {"decoders": [str(d) for d in args.decoder], "segments": used}
    return entry, transform(args.weighting, sample, fisher)


def check_args(args: argparse.Namespace) -> None:
    """--weighting, --decoder and --weighting-segments go together with a codec dtype; each refused in one line."""
    kind = args.weighting
    if kind not in WEIGHTINGS:
        raise ValueError(f"--weighting {kind!r}: not one of {', '.join(WEIGHTINGS)}")
    if kind != "none" and store_codec.parse(args.dtype) is None:
        raise ValueError(f"--weighting {kind}: only for codec dtypes ({PQ_DTYPES}), not --dtype {args.dtype}")
    needs = kind in NEEDS_DECODER
    if needs and not args.decoder:
        raise ValueError(f"--weighting {kind}: needs the decoders it weighs for (--decoder DIR, once per decoder)")
    if args.decoder and not needs:
        raise ValueError(f"--decoder {args.decoder[0]}: only read by --weighting fisher/fisher-full, not {kind}")
    if needs and args.bottleneck:
        raise ValueError(f"--weighting {kind}: measured in encoder space, not with --bottleneck")
    for decoder in args.decoder:
        if not (decoder / "config.json").is_file():
            raise ValueError(f"--decoder {decoder}: not a Hugging Face model directory (no config.json)")
    if args.weighting_segments < 1:
        raise ValueError(f"--weighting-segments {args.weighting_segments}: must be >= 1")
