"""Vector stores quantized by a trained faiss codec: `pq<M>`, `opq<M>`, `rq<M>`, each optionally after a PCA
(`pca<d>-...`), codebooks trained on a sample of the input.

    arctrain compress --model EXPORT --input docs.jsonl --out store/ --dtype pca192-rq24 --train-vectors 100000

Every dtype stores M one-byte codes per vector (each the id of one of 256 centroids):
- `pq<M>`: the vector cut into M sub-vectors of width D / M, each coded on its own (faiss `PQ<M>x8`, Jégou et al.
  2011): "larger sub-quantizers at a fixed number of centroids" as M falls.
- `opq<M>`: the same after a learned rotation that balances the sub-vectors' variance (faiss `OPQ<M>,PQ<M>x8`,
  Ge et al. 2013); undone at decode.
- `rq<M>`: residual quantization (faiss `RQ<M>x8`): M codebooks over the whole vector, each coding what the ones
  before it left (beam search at encode), slower to encode than PQ and much more accurate at the same bytes.
- `pca<d>-<kind><M>`: the vectors first projected on their d principal directions (faiss `PCA<d>`; for opq,
  `OPQ<M>_<d>`: the rotation learned to d dimensions), mapped back at decode: the store-side counterpart of a
  smaller projector bottleneck, readable by every decoder.
The codec is faiss's standalone-codec interface (`sa_encode`/`sa_decode`) of an index made by `faiss.index_factory`,
trained on up to `--train-vectors` vectors drawn uniformly at random (seeded) from all the vectors of the input, and
written with `faiss.write_index` as DIR/codebook.faiss, its sha256 in the manifest; readers decode with it and refuse
a codebook whose hash differs.
"""

import hashlib
import re
from pathlib import Path

import numpy as np

CODEBOOK = "codebook.faiss"
WEIGHTING = "weighting.npy"  # `compress --weighting` (store_weighting.py): A and A^-1, applied around the codec
DTYPES = "pq<M>, opq<M>, rq<M>, pca<d>-pq<M> (-opq, -rq)"  # for help texts and errors


def parse(dtype: str) -> tuple[str, int, int] | None:
    """'opq48' -> ('opq', 48, 0), 'pca192-rq24' -> ('rq', 24, 192); None for a dtype no codec stores."""
    match = re.fullmatch(r"(?:pca(\d+)-)?(o?pq|rq)(\d+)", dtype)
    return (match[2], int(match[3]), int(match[1] or 0)) if match else None


def factory(dtype: str) -> str:
    """The faiss index_factory string of a dtype."""
    kind, m, pca = parse(dtype)
    if kind == "opq":
        return f"OPQ{m}_{pca},PQ{m}x8" if pca else f"OPQ{m},PQ{m}x8"
    return (f"PCA{pca}," if pca else "") + (f"PQ{m}x8" if kind == "pq" else f"RQ{m}x8")


def check(dtype: str, dim: int) -> None:
    """Refuse a PCA that does not reduce the stored width, a code size that does not divide the width it codes."""
    kind, m, pca = parse(dtype)
    if pca and not 0 < pca < dim:
        raise ValueError(f"--dtype {dtype}: pca{pca} must keep fewer dimensions than the stored width {dim}")
    width = pca or dim
    if m < 1 or (kind != "rq" and width % m):
        divisors = [d for d in (8, 12, 16, 24, 32, 48, 64, 96, 128) if width % d == 0]
        raise ValueError(f"--dtype {dtype}: {m} sub-vectors must divide the coded width {width} (e.g. {divisors})")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Reservoir:
    """A uniform random sample of up to `size` rows of a stream of (n, D) float32 blocks (Algorithm R, seeded): the
    same rows for the same stream whatever the block sizes."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen, self.rows = size, 0, None
        self.rng = np.random.default_rng(seed)

    def add(self, block: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.empty((self.size, block.shape[1]), dtype=np.float32)  # (size, D)
        for row in block:  # one draw per row past the first `size`: independent of how the stream is blocked
            j = self.seen if self.seen < self.size else int(self.rng.integers(0, self.seen + 1))
            if j < self.size:
                self.rows[j] = row
            self.seen += 1

    def sample(self) -> np.ndarray:
        return self.rows[: min(self.size, self.seen)]  # (min(size, seen), D)


def train(
    dtype: str, sample: np.ndarray, out: Path, threads: int = 1, weighting: tuple[dict, np.ndarray] | None = None
) -> dict:
    """Train the codec on `sample` (N, D) float32, write it to out/codebook.faiss; its manifest entry. `weighting`:
    (its manifest entry, its array; store_weighting.py), written to out/weighting.npy and applied before the codec."""
    # faiss only for product-quantized stores
    import faiss

    if weighting is not None:
        save_weighting(weighting[1], out / WEIGHTING)
        sample = np.ascontiguousarray(weigh(weighting[1], sample), dtype=np.float32)

    faiss.omp_set_num_threads(threads)
    kind, m, pca = parse(dtype)
    dim = sample.shape[1]
    check(dtype, dim)
    index = faiss.index_factory(dim, factory(dtype))
    # faiss warns on every k-means below 39 points per centroid (per sub-quantizer, per stage, per OPQ iteration);
    # the summary says instead when the codebook saw fewer than --train-vectors.
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    (inner.rq if kind == "rq" else inner.pq).cp.min_points_per_centroid = 1
    if kind == "opq":
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        pq = faiss.ProductQuantizer(pca or dim, m, 8)  # the one OPQ alternates with (held here: it is not owned)
        pq.cp.min_points_per_centroid = 1
        rotation.pq = pq
    index.train(sample)
    path = out / CODEBOOK
    faiss.write_index(index, str(path))
    entry = {
        "kind": kind,
        "sub_vectors": m,
        "pca": pca,
        "factory": factory(dtype),
        "dim": dim,
        "file": CODEBOOK,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "code_bytes": index.sa_code_size(),
        "trained_on": len(sample),
    }
    if weighting is not None:
        weights = out / WEIGHTING
        entry["weighting"] = weighting[0] | {
            "file": WEIGHTING,
            "sha256": sha256_file(weights),
            "bytes": weights.stat().st_size,
        }
    return entry


def weigh(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x (N, D) -> z = x A^T (`weights`: (2, D) a diagonal and its inverse, or (2, D, D) A and A^-1)."""
    return x * weights[0] if weights.ndim == 2 else x @ weights[0].T


def unweigh(weights: np.ndarray, z: np.ndarray) -> np.ndarray:
    """z (N, D) -> x = z A^-T."""
    return z * weights[1] if weights.ndim == 2 else z @ weights[1].T


def save_weighting(weights: np.ndarray, path: Path) -> None:
    np.save(path, weights)  # .npy: the same bytes for the same array (its sha256 goes to the manifest)


class Codec:
    """A store's trained codec: (N, D) float32 <-> (N, M) uint8 codes."""

    def __init__(self, root: Path, entry: dict):
        # faiss only for product-quantized stores
        import faiss

        path = root / entry["file"]
        if not path.is_file():
            raise ValueError(f"{root}: {entry['file']} is listed in manifest.json but missing")
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from manifest.json: the codebook is corrupt or replaced")
        self.index = faiss.read_index(str(path))
        self.code_bytes = self.index.sa_code_size()
        self.weights = None  # (2, D) or (2, D, D): the weighting applied before the codec, and its inverse
        if weighting := entry.get("weighting"):
            path = root / weighting["file"]
            if not path.is_file():
                raise ValueError(f"{root}: {weighting['file']} is listed in manifest.json but missing")
            if sha256_file(path) != weighting["sha256"]:
                raise ValueError(f"{path}: sha256 differs from manifest.json: the weighting is corrupt or replaced")
            self.weights = np.load(path)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        if self.weights is not None:
            vectors = weigh(self.weights, vectors)
        return self.index.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))  # (N, M) uint8

    def decode(self, codes: np.ndarray) -> np.ndarray:
        vectors = self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))  # (N, D) float32
        if self.weights is not None:
            vectors = np.ascontiguousarray(unweigh(self.weights, vectors), dtype=np.float32)
        return vectors
