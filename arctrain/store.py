"""A vector store: documents compressed once by an exported encoder, read back in place of running it.

    DIR/manifest.json             what made the vectors (encoder identity, pooling, factor, segment tokens, dtype),
                                  counts, and every shard with its sha256 and index
    DIR/vectors-000000.tar        WebDataset shards, one sample per document, written by data_tools' SplitWriter
    DIR/vectors-000000.idx.npy    member offsets of every sample (data_tools/shard_index.py): lookups seek

A sample holds one document: `id.txt` (its id), `counts.npy` (S,) vectors per segment and `tokens.npy` (S,) encoder
tokens per segment, `vectors.npy` (sum counts, D) in encoder space, in the store's dtype (bf16 as its raw uint16
bits: numpy has no bfloat16), and for int8 `scales.npy` (sum counts,) float32, one scale per vector. Segment i
of a document is rows counts[:i].sum() ... of its vectors. The vectors are the encoder's pooled output, before
any projector, so one store serves every decoder the encoder was trained with, and a decoder added later with the
encoder frozen too.

The encoder identity is a sha256 over the encoder's weights (names, dtypes, shapes, bytes), its backbone config,
pooling settings, segment length and tokenizer: a store made by another encoder is refused in one line.
"""

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arctrain.data.shards import ShardReader

FORMAT = "arctrain-vectors/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
SPLIT = "vectors"
MEMBERS = ["counts.npy", "tokens.npy", "vectors.npy"]  # read by seeking (id.txt is for other readers)


def encoder_identity(model_dir: str | Path) -> str:
    """sha256 of what decides an export's encoder vectors: its encoder weights, backbone, pooling, segment length
    and tokenizer. Projectors and special vectors are left out: they map the vectors for each decoder."""
    from safetensors import safe_open

    from arctrain.export import export_weight_files
    from arctrain.tokenizer_id import tokenizer_hash

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("backbone", "pooling", "pooling_factor", "n_vectors", "segment_tokens", "rope")
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    digest.update(tokenizer_hash(model_dir).encode())
    for path in export_weight_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in sorted(k for k in f.keys() if k.startswith("encoder.")):  # noqa: SIM118 (not a dict)
                t = f.get_tensor(name).contiguous()
                digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --- quantization -----------------------------------------------------------------------------------------------


def quantize(vectors: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """(N, D) float vectors -> the arrays stored for them: `vectors` (and `scales` for int8).

    int8: symmetric, one float32 scale per vector, max |v| / 127; v is stored as round(v / scale), so every
    element comes back within scale / 2 of its value."""
    v = vectors.detach().float().cpu()
    if dtype == "int8":
        scales = (v.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
        q = torch.round(v / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return {"vectors": q.numpy(), "scales": scales.numpy()}
    t = v.to(DTYPES[dtype])
    return {"vectors": t.view(torch.uint16).numpy() if dtype == "bf16" else t.numpy()}


def dequantize(arrays: dict[str, np.ndarray], dtype: str) -> torch.Tensor:
    """The stored arrays -> (N, D) float32 vectors."""
    v = torch.from_numpy(np.ascontiguousarray(arrays["vectors"]))
    if dtype == "int8":
        return v.float() * torch.from_numpy(arrays["scales"]).float()[:, None]
    if dtype == "bf16":
        v = v.view(torch.bfloat16)
    return v.float()


def bytes_per_vector(dim: int, dtype: str) -> int:
    return dim * torch.empty((), dtype=DTYPES[dtype]).element_size() + (4 if dtype == "int8" else 0)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def doc_key(doc_id: str) -> str:
    """The sample key of a document id: ids are any string, keys must be short and filename-safe."""
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:32]


def sample_members(doc_id: str, segments: list[torch.Tensor], tokens: list[int], dtype: str) -> dict[str, bytes]:
    """The WebDataset members of one document: its segments' vectors, (m_s, D) each, stored in `dtype`."""
    arrays = quantize(torch.cat(segments), dtype)
    members = {"__key__": doc_key(doc_id), "id.txt": doc_id.encode("utf-8")}
    members["counts.npy"] = npy(np.array([len(s) for s in segments], dtype=np.int32))
    members["tokens.npy"] = npy(np.array(tokens, dtype=np.int32))
    members |= {f"{name}.npy": npy(a) for name, a in arrays.items()}
    return members


class StoreWriter:
    """The shards of a store (data_tools' SplitWriter: sha256 and index per shard), then the manifest, last."""

    def __init__(self, out: Path, shard_bytes: int):
        from data_tools.shards import SplitWriter

        self.out = out
        self.writer = SplitWriter(out, SPLIT, shard_bytes, 0, ["encoder"])
        self.docs = self.tokens = self.vectors = 0

    def write(self, members: dict[str, bytes]) -> None:
        from data_tools.samples import Sample

        tokens = int(np.load(io.BytesIO(members["tokens.npy"])).sum())
        self.writer.write(Sample(members, (tokens,)))
        self.docs, self.tokens = self.docs + 1, self.tokens + tokens
        self.vectors += int(np.load(io.BytesIO(members["counts.npy"])).sum())

    def close(self, meta: dict) -> dict:
        """Write manifest.json: `meta` (encoder, pooling, dtype, docs, sources), counts and the shards."""
        shards = self.writer.close()
        for shard in shards:
            shard["tokens"] = shard["tokens"]["encoder"]
        stored = sum(s["bytes"] + s["index"]["bytes"] for s in shards)
        manifest = {"format": FORMAT, **meta, "encoder_tokens": self.tokens, "vectors": self.vectors}
        manifest |= {"bytes": stored, "bytes_per_token": stored / max(self.tokens, 1), "shards": shards}
        (self.out / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(self.out / "manifest.json.tmp", self.out / "manifest.json")  # last: a finished store
        return manifest


# --- reading ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredDoc:
    doc_id: str
    vectors: list[torch.Tensor]  # (m_s, D) float32 per segment, in encoder space
    tokens: list[int]  # encoder tokens per segment


class VectorStore:
    """A store directory, opened for lookups by document id (every shard's index is read once, at open)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"--vectors {self.root}: not a vector store (no manifest.json)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path}: not valid JSON ({err.msg})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: not a vector store manifest (format {FORMAT!r})")
        self.dtype = self.manifest["dtype"]
        shards = {}
        for entry in self.manifest["shards"]:
            path, index = self.root / entry["name"], self.root / entry["index"]["name"]
            for p in (path, index):
                if not p.is_file():
                    raise ValueError(f"{self.root}: {p.name} is listed in manifest.json but missing")
            shards[str(path)] = (entry["samples"], str(index))
        self.reader = ShardReader(shards, max_indexes=len(shards) or 1)
        self.where = {}  # sample key -> (shard path, sample index)
        for path in shards:
            for i, key in enumerate(self.reader._index(path)["key"]):
                self.where[key.decode()] = (path, i)

    def check_encoder(self, identity: str, model_dir: str | Path) -> None:
        """Refuse vectors made by another encoder than the export's."""
        made_by = self.manifest["encoder"]["identity"]
        if made_by != identity:
            raise ValueError(
                f"--vectors {self.root}: made by another encoder (identity {made_by[:12]}..., from "
                f"{self.manifest['encoder']['model']}) than --model {model_dir} ({identity[:12]}...); "
                f"compress the documents again with arctrain compress --model {model_dir}"
            )

    def __contains__(self, doc_id: str) -> bool:
        return doc_key(doc_id) in self.where

    def __len__(self) -> int:
        return len(self.where)

    def get(self, doc_id: str) -> StoredDoc:
        if doc_id not in self:
            raise ValueError(f"--vectors {self.root}: no document {doc_id!r} ({len(self)} documents stored)")
        path, i = self.where[doc_key(doc_id)]
        suffixes = MEMBERS + (["scales.npy"] if self.dtype == "int8" else [])
        _, arrays = self.reader.read(path, i, suffixes)
        vectors = dequantize({k.removesuffix(".npy"): v for k, v in arrays.items()}, self.dtype)
        counts = arrays["counts.npy"].tolist()
        return StoredDoc(doc_id, list(torch.split(vectors, counts)), arrays["tokens.npy"].tolist())
