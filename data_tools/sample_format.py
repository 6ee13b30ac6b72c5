"""What a sample's tar members hold (docs/ARCHITECTURE.md §2), for every format a reader accepts.

Format 3 (written since): one member per sample, `<key>.mp`, a MessagePack map (webdataset's `.decode()` unpacks
`.mp` members with msgpack):

    {"doc_id": str, "source": str, "window": int, "n_segments": int, "char_spans": [[start, end], ...],
     "tokens": {<tokenizer name>: {"ids": bytes, "dtype": "<u2", "offsets": bytes, "offsets_dtype": "|u1"}, ...}}

`ids` is every token id of the window for that tokenizer, concatenated (uint16 where the vocabulary fits, else
uint32, little-endian: `np.frombuffer(ids, dtype)`); `offsets` the `n_segments + 1` offsets into them (segment j is
`ids[off[j]:off[j + 1]]`) in the smallest unsigned dtype that holds the ids' count. Formats 1 and 2: seven members,
`<key>.json` (the map above without `tokens`) and per tokenizer `<key>.<name>.ids.npy` / `<key>.<name>.offsets.npy`
(int64); each tar member costs a 512-byte header plus padding to 512 bytes, which is why format 3 packs them.
"""

import io
import json

import msgpack
import numpy as np

MEMBER = "mp"  # the format-3 member suffix
META = ("doc_id", "source", "window", "n_segments", "char_spans")
OFFSET_DTYPES = tuple(np.dtype(d) for d in ("|u1", "<u2", "<u4"))


def offsets_dtype(n_ids: int) -> np.dtype:
    """The smallest unsigned dtype that holds offsets up to `n_ids`."""
    return OFFSET_DTYPES[0] if n_ids < 1 << 8 else OFFSET_DTYPES[1] if n_ids < 1 << 16 else OFFSET_DTYPES[2]


def pack(meta: dict, tokens: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The `.mp` member of a sample: `meta` (the META keys) and per tokenizer (ids, offsets)."""
    packed = {}
    for name, (ids, offsets) in tokens.items():
        off = offsets.astype(offsets_dtype(len(ids)), copy=False)
        if ids.dtype.str[0] == ">":  # little-endian on disk
            ids = ids.astype(ids.dtype.newbyteorder("<"))
        packed[name] = {
            "ids": ids.tobytes(),
            "dtype": ids.dtype.str,
            "offsets": off.tobytes(),
            "offsets_dtype": off.dtype.str,
        }
    return msgpack.packb({**{k: meta[k] for k in META}, "tokens": packed})


def unpack(data: bytes) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(meta, {tokenizer: (ids, offsets)}) of a `.mp` member (read-only arrays); a ValueError says what is wrong."""
    try:
        sample = msgpack.unpackb(data)
        tokens = {
            name: (np.frombuffer(t["ids"], t["dtype"]), np.frombuffer(t["offsets"], t["offsets_dtype"]))
            for name, t in sample.pop("tokens").items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # msgpack's errors are ValueErrors
        raise ValueError(f"not a format-3 sample member: {type(err).__name__}: {err}") from None
    return sample, tokens


def unpack_v2(members: dict[str, bytes]) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(meta, {tokenizer: (ids, offsets)}) of a format-1/2 sample's members (json + .npy per tokenizer)."""
    names = sorted({s.split(".", 1)[0] for s in members if s.endswith(".ids.npy")})
    try:
        meta = json.loads(members["json"])
        tokens = {name: tuple(_npy(members[f"{name}.{part}.npy"]) for part in ("ids", "offsets")) for name in names}
    except (ValueError, KeyError, EOFError, OSError) as err:
        raise ValueError(f"not a format-2 sample: {type(err).__name__}: {err}") from None
    return meta, tokens


def members_v2(meta: dict, tokens: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, bytes]:
    """The members a format-2 build wrote for a sample (for tests and benchmarks that make old shards)."""
    members = {"json": json.dumps({k: meta[k] for k in META}).encode()}
    for name, (ids, offsets) in tokens.items():
        members[f"{name}.ids.npy"] = _npy_bytes(ids)
        members[f"{name}.offsets.npy"] = _npy_bytes(offsets.astype(np.int64))
    return members


def decode(members: dict[str, bytes]) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A sample's members, of any format, as (meta, {tokenizer: (ids, offsets)})."""
    return unpack(members[MEMBER]) if MEMBER in members else unpack_v2(members)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
