"""Product-quantized vector stores (faiss): `pq<M>` and `opq<M>` dtypes, codebooks trained on a sample of the input.

    arctrain compress --model EXPORT --input docs.jsonl --out store/ --dtype opq48 --train-vectors 100000

`pq<M>`: each vector is cut into M sub-vectors of width D / M and each is stored as the one-byte id of its nearest
of 256 centroids (faiss `PQ<M>x8`, Jégou et al. 2011): M bytes per vector. `opq<M>` first rotates the vectors by a
learned orthogonal matrix that balances the sub-vectors' variance (faiss `OPQ<M>,PQ<M>x8`, Ge et al. 2013): the same
M bytes, the rotation is undone at decode. The codec is faiss's standalone-codec interface (`sa_encode`/`sa_decode`)
of an index made by `faiss.index_factory`, trained on up to `--train-vectors` vectors drawn uniformly at random
(seeded) from all the vectors of the input, and written with `faiss.write_index` as DIR/codebook.faiss, its sha256
in the manifest; readers decode with it and refuse a codebook whose hash differs.
"""

import hashlib
import re
from pathlib import Path

import numpy as np

CODEBOOK = "codebook.faiss"
KINDS = {"pq": "PQ{m}x8", "opq": "OPQ{m},PQ{m}x8"}


def parse(dtype: str) -> tuple[str, int] | None:
    """'opq48' -> ('opq', 48); None for a dtype that is not product-quantized."""
    match = re.fullmatch(r"(o?pq)(\d+)", dtype)
    return (match[1], int(match[2])) if match else None


def check(dtype: str, dim: int) -> None:
    """Refuse a code size that does not divide the stored width (one line naming both)."""
    kind, m = parse(dtype)
    if m < 1 or dim % m:
        divisors = [d for d in (8, 12, 16, 24, 32, 48, 64, 96, 128) if dim % d == 0]
        raise ValueError(f"--dtype {dtype}: {m} sub-vectors must divide the stored width {dim} (e.g. {divisors})")


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


def train(dtype: str, sample: np.ndarray, out: Path, threads: int = 1) -> dict:
    """Train the codec on `sample` (N, D) float32, write it to out/codebook.faiss; its manifest entry."""
    # faiss only for product-quantized stores
    import faiss

    faiss.omp_set_num_threads(threads)
    kind, m = parse(dtype)
    dim = sample.shape[1]
    check(dtype, dim)
    index = faiss.index_factory(dim, KINDS[kind].format(m=m))
    # faiss warns on every k-means below 39 points per centroid (per sub-quantizer, per OPQ iteration); the summary
    # says instead when the codebook saw fewer than --train-vectors.
    faiss.downcast_index(index.index if kind == "opq" else index).pq.cp.min_points_per_centroid = 1
    if kind == "opq":
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        pq = faiss.ProductQuantizer(dim, m, 8)  # the one OPQ alternates with (held here: the matrix does not own it)
        pq.cp.min_points_per_centroid = 1
        rotation.pq = pq
    index.train(sample)
    path = out / CODEBOOK
    faiss.write_index(index, str(path))
    return {"kind": kind, "sub_vectors": m, "factory": KINDS[kind].format(m=m), "dim": dim, "file": CODEBOOK,
            "sha256": sha256_file(path), "bytes": path.stat().st_size, "code_bytes": index.sa_code_size(),
            "trained_on": len(sample)}  # fmt: skip


class Codec:
    """A store's trained codebook: (N, D) float32 <-> (N, M) uint8 codes."""

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

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))  # (N, M) uint8

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))  # (N, D) float32
