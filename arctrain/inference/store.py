"""A vector store: documents compressed once by an exported encoder, read back in place of running it.

    DIR/manifest.json             what made the vectors (encoder identity, pooling, factor, segment tokens, dtype),
                                  counts, and every shard with its sha256 and index
    DIR/vectors-000000.bin        the documents' records, back to back (arctrain/inference/store_shards.py)
    DIR/vectors-000000.idx.npy    one 32-byte row per document: its key, where its record starts, its counts

A document's record holds its encoder tokens per segment, (S,) <u2, then its vectors, (N, W) in the store's dtype
(bf16 as its raw uint16 bits: numpy has no bfloat16), then for int8 its scales, (N,) <f4, one per vector; raw
little-endian arrays, what they are said once in the manifest. Segment i has n_pooled(tokens[i]) vectors (the
pooling rule, arctrain/data/pooling.py), so the counts are not stored. The vectors are the encoder's pooled
output (W = D), before any projector, so one store serves every decoder the encoder was trained with, and a decoder
added later with the encoder frozen too. Stores of format 2 (tar shards, one MessagePack member `doc.mp` per
document) and format 1 (one .npy member per array) are still read.

Quantized stores (`pq<M>`, `opq<M>`, `rq<M>`: arctrain/inference/store_codec.py) hold (N, M) uint8 codes per document
and DIR/codebook.faiss, the faiss codec they decode with (its sha256 in the manifest).

A bottleneck store (`compress --bottleneck DECODER`) holds, instead of each vector x, h = W1 x: the output of that
decoder's projector first layer (W1: (H, D), H < D; the projector is two bias-free linears W2 W1, no activation), H
values per vector instead of D. A reader of that decoder turns h back into the encoder-space vector pinv(W1) h,
which the projector maps to W2 W1 pinv(W1) h = W2 h (W1 has full row rank, checked when the store is made): exactly
the second layer applied to the stored h. Only that decoder (with those projector weights, hashed in the manifest)
can read it; any other decoder is refused.

Integrity: opening a store checks that every file the manifest lists is there with its size (a stat per file) and
the codebook's sha256; `arctrain verify-store DIR` hashes every file against the manifest; a document whose decoded
vectors are not all finite is refused, naming it.

The encoder identity is a sha256 over the encoder's weights (names, dtypes, shapes, bytes), its backbone config,
pooling settings, segment length and tokenizer: a store made by another encoder is refused in one line.
"""

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import torch
from safetensors import safe_open

from arctrain.data.pooling import n_pooled
from arctrain.data.shards import ShardReader
from arctrain.export.load import export_weight_files
from arctrain.inference import store_codec
from arctrain.inference.store_shards import ShardSet, ShardWriter
from data_tools.tokenizer_id import tokenizer_hash

FORMAT = "arctrain-vectors/3"
FORMATS = ("arctrain-vectors/1", "arctrain-vectors/2", FORMAT)  # read
MEMBER = "doc.mp"  # format 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
# Quantized by a trained codec (store_codec.py): M one-byte codes per vector.
PQ_DTYPES = store_codec.DTYPES
RECORD_DTYPES = {"fp32": "<f4", "bf16": "<u2", "fp16": "<f2", "int8": "i1"}  # a record's vectors (codes: u1)
SPLIT = "vectors"
MEMBERS = ["counts.npy", "tokens.npy", "vectors.npy"]  # format 1, read by seeking (id.txt is for other readers)


def encoder_identity(model_dir: str | Path) -> str:
    """sha256 of what decides an export's encoder vectors: its encoder weights, backbone, pooling, segment length
    and tokenizer. Projectors and special vectors are left out: they map the vectors for each decoder."""
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


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES and store_codec.parse(dtype) is None:
        raise ValueError(f"--dtype {dtype!r}: not a store dtype ({', '.join(DTYPES)}, {PQ_DTYPES})")
    return dtype


def quantize(vectors: torch.Tensor, dtype: str, codec: "store_codec.Codec | None" = None) -> dict[str, np.ndarray]:
    """(N, D) float vectors -> the arrays stored for them: `vectors` (and `scales` for int8; codes for pq).

    int8: symmetric, one float32 scale per vector, max |v| / 127; v is stored as round(v / scale), so every
    element comes back within scale / 2 of its value."""
    v = vectors.detach().float().cpu()
    if codec is not None:
        return {"vectors": codec.encode(v.numpy())}  # (N, M) uint8
    if dtype == "int8":
        scales = (v.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
        q = torch.round(v / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return {"vectors": q.numpy(), "scales": scales.numpy()}
    t = v.to(DTYPES[dtype])
    return {"vectors": t.view(torch.uint16).numpy() if dtype == "bf16" else t.numpy()}


def dequantize(arrays: dict[str, np.ndarray], dtype: str, codec: "store_codec.Codec | None" = None) -> torch.Tensor:
    """The stored arrays -> (N, D) float32 vectors."""
    if codec is not None:
        return torch.from_numpy(codec.decode(arrays["vectors"]))
    v = torch.from_numpy(np.array(arrays["vectors"]))  # a writable copy
    if dtype == "int8":
        return v.float() * torch.from_numpy(np.array(arrays["scales"])).float()[:, None]
    if dtype == "bf16":
        v = v.view(torch.bfloat16)
    return v.float()


def bytes_per_vector(dim: int, dtype: str) -> int:
    if (pq := store_codec.parse(dtype)) is not None:
        return pq[1]
    return dim * torch.empty((), dtype=DTYPES[dtype]).element_size() + (4 if dtype == "int8" else 0)


def doc_key(doc_id: str) -> str:
    """The sample key of a document id: ids are any string, keys must be short and filename-safe."""
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class DocRecord:
    """What a store keeps of one document: its key, encoder tokens and vectors per segment, the stored arrays."""

    key: str
    tokens: list[int]  # (S,) encoder tokens per segment
    counts: list[int]  # (S,) vectors per segment
    arrays: dict[str, np.ndarray]  # vectors (N, W) in the stored dtype (pq: (N, M) codes), int8 scales (N,)


def doc_record(
    doc_id: str, segments: list[torch.Tensor], tokens: list[int], dtype: str, codec: "store_codec.Codec | None" = None
) -> DocRecord:
    """One document's segments' vectors, (m_s, D) each, stored in `dtype`."""
    arrays = quantize(torch.cat(segments), dtype, codec)
    return DocRecord(doc_key(doc_id), list(tokens), [len(s) for s in segments], arrays)


def pack_record(record: DocRecord) -> bytes:
    """A record's bytes: tokens per segment <u2, the vectors, int8 scales <f4 (little-endian, no header)."""
    if max(record.tokens) >= 1 << 16:
        raise ValueError(f"a segment of {max(record.tokens)} encoder tokens: a store keeps at most 65535 per segment")
    vectors = record.arrays["vectors"]
    parts = [np.asarray(record.tokens, "<u2"), vectors.astype(vectors.dtype.newbyteorder("<"), copy=False)]
    if "scales" in record.arrays:
        parts.append(record.arrays["scales"].astype("<f4", copy=False))
    return b"".join(p.tobytes() for p in parts)


def unpack_record(data: bytes, segments: int, vectors: int, dtype: str, width: int) -> tuple[np.ndarray, dict]:
    """A record's bytes -> (tokens (S,), arrays) for a store of `dtype` whose vectors are `width` elements (pq: the
    code bytes); a ValueError when its length is not what the index row says."""
    element = "u1" if store_codec.parse(dtype) else RECORD_DTYPES[dtype]
    size = 2 * segments + vectors * width * np.dtype(element).itemsize + (4 * vectors if dtype == "int8" else 0)
    if len(data) != size:
        raise ValueError(f"a record of {len(data)} bytes, its index row says {segments} segments, {vectors} vectors")
    tokens = np.frombuffer(data, "<u2", segments)
    arrays = {"vectors": np.frombuffer(data, element, vectors * width, 2 * segments).reshape(vectors, width)}
    if dtype == "int8":
        arrays["scales"] = np.frombuffer(data, "<f4", vectors, 2 * segments + vectors * width)
    return tokens, arrays


def unpack_member(data: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """A format-2 `doc.mp` member -> (document id, its arrays); a ValueError says what is wrong."""
    try:
        sample = msgpack.unpackb(data)
        doc_id = sample.pop("id")
        arrays = {k: np.frombuffer(a["data"], np.dtype(a["dtype"])).reshape(a["shape"]) for k, a in sample.items()}
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as err:
        raise ValueError(f"{MEMBER} does not decode ({type(err).__name__}: {err})") from None
    return doc_id, arrays


class StoreWriter:
    """The shards of a store (store_shards.ShardWriter: sha256 and index per shard), then the manifest, last.
    `pooling` = (factor, n_vectors): the rule a record's counts are checked against (they are not stored)."""

    def __init__(self, out: Path, shard_bytes: int, pooling: tuple[int, int]):
        self.out, self.pooling = out, pooling
        self.writer = ShardWriter(out, SPLIT, shard_bytes)
        self.docs = self.tokens = self.vectors = self.text_bytes = 0

    def write(self, record: DocRecord, text_bytes: int = 0) -> None:
        expected = [n_pooled(t, *self.pooling) for t in record.tokens]
        assert record.counts == expected, f"vectors per segment {record.counts}, the pooling rule gives {expected}"
        tokens, vectors = sum(record.tokens), len(record.arrays["vectors"])
        self.writer.write(bytes.fromhex(record.key), pack_record(record), len(record.tokens), vectors, tokens)
        self.docs, self.tokens, self.text_bytes = self.docs + 1, self.tokens + tokens, self.text_bytes + text_bytes
        self.vectors += vectors

    def close(self, meta: dict) -> dict:
        """Write manifest.json: `meta` (encoder, pooling, dtype, codec, docs, sources), counts and the shards. `bytes`
        is everything on disk (shards, indexes, codebook); per token and per byte of (UTF-8) text; `vector_bytes`
        the vectors alone (codes, int8 scales)."""
        shards = self.writer.close()
        codec = meta.get("codec", {})
        stored = sum(s["bytes"] + s["index"]["bytes"] for s in shards) + codec.get("bytes", 0)
        stored += codec.get("weighting", {}).get("bytes", 0)
        vector_bytes = self.vectors * meta["bytes_per_vector"]
        manifest = {"format": FORMAT, **meta, "encoder_tokens": self.tokens, "vectors": self.vectors}
        text = max(self.text_bytes, 1)
        manifest |= {
            "text_bytes": self.text_bytes,
            "bytes": stored,
            "bytes_per_token": stored / max(self.tokens, 1),
            "bytes_per_text_byte": stored / text,
            "vector_bytes": vector_bytes,
            "vector_bytes_per_text_byte": vector_bytes / text,
            "shards": shards,
        }
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
        self.manifest = self.read_manifest(self.root)
        self.dtype = self.manifest["dtype"]
        self.lift = None  # (D, H) for a bottleneck store, set by check_encoder
        shards = {}
        for entry in self.manifest["shards"]:
            path, index = self.root / entry["name"], self.root / entry["index"]["name"]
            for p, size in ((path, entry["bytes"]), (index, entry["index"]["bytes"])):
                check_size(self.root, p, size)  # a stat each: truncated or grown files, before any read
            shards[str(path)] = (entry["samples"], str(index))
        codec = self.manifest.get("codec")
        self.codec = store_codec.Codec(self.root, codec) if codec else None  # checks the codebook's sha256
        if self.manifest["format"] == FORMAT:
            self.shards = ShardSet(self.root, self.manifest["shards"])
            self.where = {key.hex(): where for key, where in self.shards.where.items()}
            return
        self.reader = ShardReader(shards, max_indexes=len(shards) or 1)
        self.where = {}  # sample key -> (shard path, sample index)
        for path in shards:
            for i, key in enumerate(self.reader._index(path)["key"]):
                self.where[key.decode()] = (path, i)

    @staticmethod
    def read_manifest(root: Path) -> dict:
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"--vectors {root}: not a vector store (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path}: not valid JSON ({err.msg})") from None
        if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
            raise ValueError(f"{manifest_path}: not a vector store manifest (format {FORMAT!r})")
        return manifest

    def check_encoder(self, identity: str, model_dir: str | Path, decoder: str | None = None) -> None:
        """Refuse vectors made by another encoder than the export's; a bottleneck store also for another decoder
        (or other projector weights) than the one it was made for."""
        made_by = self.manifest["encoder"]["identity"]
        if made_by != identity:
            raise ValueError(
                f"--vectors {self.root}: made by another encoder (identity {made_by[:12]}..., from "
                f"{self.manifest['encoder']['model']}) than --model {model_dir} ({identity[:12]}...); "
                f"compress the documents again with arctrain compress --model {model_dir}"
            )
        if (neck := self.manifest.get("bottleneck")) is None:
            return
        first = projector_first_layer(model_dir, neck["decoder"])
        if decoder != neck["decoder"] or tensor_sha256(first) != neck["sha256"]:
            raise ValueError(
                f"--vectors {self.root}: holds the projector bottleneck of decoder {neck['decoder']!r} "
                f"({neck['hidden']} values per vector); only that decoder, with its projector then, reads it"
                + (f", not {decoder!r}" if decoder != neck["decoder"] else " (this export's projector differs)")
            )
        self.lift = torch.linalg.pinv(first.double()).float()  # (D, H): W1 @ lift = I_H

    def __contains__(self, doc_id: str) -> bool:
        return doc_key(doc_id) in self.where

    def __len__(self) -> int:
        return len(self.where)

    def get(self, doc_id: str) -> StoredDoc:
        if doc_id not in self:
            raise ValueError(f"--vectors {self.root}: no document {doc_id!r} ({len(self)} documents stored)")
        path, i = self.where[doc_key(doc_id)]
        if self.manifest["format"] == FORMAT:
            path = self.shards.paths[path]
        where = f"--vectors {self.root}: document {doc_id!r} ({Path(path).name})"
        try:
            arrays = self._arrays(doc_id) if self.manifest["format"] == FORMAT else self._arrays_v2(path, i)
            vectors = dequantize(arrays, self.dtype, self.codec)
        except (ValueError, OSError, RuntimeError) as err:  # a damaged member: header, shape, dtype
            raise ValueError(f"{where}: unreadable ({err}); run arctrain verify-store {self.root}") from None
        counts = arrays["counts"].tolist()
        if sum(counts) != len(vectors) or len(counts) != len(arrays["tokens"]):
            raise ValueError(f"{where}: {len(vectors)} vectors, counts sum to {sum(counts)}; the store is corrupt")
        bad = (~torch.isfinite(vectors)).any(dim=1).nonzero()  # (n_bad, 1)
        if len(bad):
            raise ValueError(
                f"{where}: {len(bad)} of its {len(vectors)} vectors are not finite (first: row {int(bad[0])}); the "
                f"store is corrupt: run arctrain verify-store {self.root}"
            )
        if "bottleneck" in self.manifest:
            if self.lift is None:
                raise ValueError(f"--vectors {self.root}: a bottleneck store is read with its export (check_encoder)")
            vectors = vectors @ self.lift.T  # (N, H) -> (N, D), the projector's first layer maps it back to h
        return StoredDoc(doc_id, list(torch.split(vectors, counts)), arrays["tokens"].tolist())

    def close(self) -> None:
        (self.shards if self.manifest["format"] == FORMAT else self.reader).close()

    def _arrays(self, doc_id: str) -> dict[str, np.ndarray]:
        """A document's record (one pread), its counts from its tokens by the pooling rule."""
        record, segments, vectors, _ = self.shards.read(bytes.fromhex(doc_key(doc_id)))
        width = self.codec.code_bytes if self.codec else self.manifest["stored_width"]
        tokens, arrays = unpack_record(record, segments, vectors, self.dtype, width)
        pooling = (self.manifest["pooling_factor"], self.manifest["n_vectors"])
        return arrays | {"tokens": tokens, "counts": np.array([n_pooled(int(t), *pooling) for t in tokens])}

    def _arrays_v2(self, path: str, i: int) -> dict[str, np.ndarray]:
        """Sample `i` of shard `path`: one seek and read of its `doc.mp` (format 1: of each .npy member)."""
        if self.manifest["format"] == "arctrain-vectors/2":
            row = self.reader._index(path)[i]
            return unpack_member(self.reader._member(path, row["key"].decode(), row, MEMBER))[1]
        suffixes = MEMBERS + (["scales.npy"] if self.dtype == "int8" else [])
        _, arrays = self.reader.read(path, i, suffixes)
        return {k.removesuffix(".npy"): v for k, v in arrays.items()}


def projector_first_layer(model_dir: str | Path, decoder: str) -> torch.Tensor:
    """W1, (H, D) float32: the first linear of `decoder`'s projector in an export."""
    name = f"projectors.{decoder}.0.weight"
    for path in export_weight_files(Path(model_dir)):
        with safe_open(path, framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 (not a dict)
                return f.get_tensor(name).float()
    raise ValueError(f"--bottleneck {decoder}: the export {model_dir} has no decoder of that name ({name})")


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def check_size(root: Path, path: Path, size: int) -> None:
    if not path.is_file():
        raise ValueError(f"{root}: {path.name} is listed in manifest.json but missing")
    if path.stat().st_size != size:
        raise ValueError(
            f"{path}: {path.stat().st_size} bytes, manifest.json says {size}: the store is damaged "
            f"(arctrain verify-store {root})"
        )


def store_files(manifest: dict) -> list[tuple[str, int, str]]:
    """(name, bytes, sha256) of every file the manifest lists: shards, their indexes, the codebook (and weighting)."""
    files = [(s["name"], s["bytes"], s["sha256"]) for s in manifest["shards"]]
    files += [(s["index"]["name"], s["index"]["bytes"], s["index"]["sha256"]) for s in manifest["shards"]]
    if codec := manifest.get("codec"):
        files.append((codec["file"], codec["bytes"], codec["sha256"]))
        if weighting := codec.get("weighting"):
            files.append((weighting["file"], weighting["bytes"], weighting["sha256"]))
    return files


def verify_store(root: str | Path) -> list[str]:
    """Every file the manifest lists, hashed and compared; files of the store's names that it does not list. The
    problems found, one line each (empty: the store is intact)."""
    root = Path(root)
    manifest = VectorStore.read_manifest(root)
    problems = []
    listed = set()
    for name, size, sha in store_files(manifest):
        listed.add(name)
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing (listed in manifest.json)")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest.json says {size}")
        elif store_codec.sha256_file(path) != sha:
            problems.append(f"{path}: sha256 differs from manifest.json (the file's content changed)")
    for path in sorted(root.glob(f"{SPLIT}-*")):
        if path.name not in listed:
            problems.append(f"{path}: not listed in manifest.json")
    return problems


def verify_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="arctrain verify-store", description="hash every file of a vector store")
    p.add_argument("store", type=Path, help="the store's directory (arctrain compress --out)")
    args = p.parse_args(argv or [])
    problems = verify_store(args.store)
    if problems:
        raise ValueError(f"{problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    manifest = VectorStore.read_manifest(args.store)
    files = store_files(manifest)
    size = sum(f[1] for f in files)
    print(
        f"arctrain verify-store: {args.store}: {len(files)} files ({size:,} bytes) match manifest.json; "
        f"{manifest['docs']['written']} documents, {manifest['vectors']:,} {manifest['dtype']} vectors"
    )
