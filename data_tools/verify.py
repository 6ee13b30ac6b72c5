"""`arc-data verify` and `arc-data inspect`: check shards against their manifest, and look inside them."""

import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_tools.inputs import DataError
from data_tools.layout import Layout
from data_tools.manifest import FORMAT_VERSION, load_manifest
from data_tools.sample_format import MEMBER, decode
from data_tools.shard_index import index_from_tar, load_index
from data_tools.shards import existing_outputs, file_digest


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member suffix: bytes}) per sample, grouped the way webdataset groups them (key = name up to the
    first dot), in file order."""
    key, members = None, {}
    with tarfile.open(path, "r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            this_key, _, suffix = name.partition(".")
            if this_key != key and key is not None:
                yield key, members
                members = {}
            key = this_key
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def expected_members(tokenizers: dict, version: int) -> set[str]:
    """The member suffixes of every sample of a shard of format `version`."""
    if version >= 3:
        return {MEMBER}
    return {"json"} | {f"{name}.{part}.npy" for name in tokenizers for part in ("ids", "offsets")}


def check_sample(
    key: str, members: dict[str, bytes], tokenizers: dict, version: int = FORMAT_VERSION
) -> tuple[dict[str, int], list[str]]:
    """(tokens per tokenizer, problems) of one sample: members present, arrays decodable with the manifest's dtype,
    offsets consistent with the ids and with the number of segments."""
    expected = expected_members(tokenizers, version)
    if set(members) != expected:
        missing, extra = sorted(expected - set(members)), sorted(set(members) - expected)
        return {}, [f"sample {key}: members missing {missing}, unexpected {extra}"]
    try:
        meta, arrays = decode(members)
        n_segments = meta["n_segments"]
        if len(meta["char_spans"]) != n_segments:
            return {}, [f"sample {key}: {len(meta['char_spans'])} char_spans for {n_segments} segments"]
    except (ValueError, KeyError, TypeError) as err:
        return {}, [f"sample {key}: {err}"]
    if set(arrays) != set(tokenizers):
        return {}, [f"sample {key}: tokenizers {sorted(arrays)}, the manifest has {sorted(tokenizers)}"]
    problems, tokens = [], {}
    for name, info in tokenizers.items():
        ids, offsets = arrays[name]
        if ids.dtype != np.dtype(info["dtype"]) or offsets.dtype.kind not in "iu" or ids.ndim != 1 or offsets.ndim != 1:
            problems.append(f"sample {key}: {name} arrays are {ids.dtype}/{offsets.dtype}, expected {info['dtype']}")
        elif (
            len(offsets) != n_segments + 1 or offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0)
        ):
            problems.append(f"sample {key}: {name} offsets {offsets.tolist()[:8]} inconsistent with {len(ids)} ids")
        elif len(ids) and int(ids.max()) >= info["vocab_size"]:
            problems.append(f"sample {key}: {name} id {int(ids.max())} outside the vocabulary ({info['vocab_size']})")
        tokens[name] = len(ids)
    return tokens, problems


def verify(directory: Path) -> list[str]:
    """All mismatches between the shards in `directory` and its manifest, one line each naming the shard: the
    shards' bytes, samples and counts, no shard listed twice or present unlisted, and samples laid out as the
    manifest's segment_tokens and window_segments say (data_tools/layout.py)."""
    manifest = load_manifest(directory)
    problems, listed = [], {}
    layout = Layout(manifest["segment_tokens"], manifest["window_segments"])
    for split, entry in manifest["splits"].items():
        if entry["samples"] != sum(s["samples"] for s in entry["shards"]):
            problems.append(f"split {split}: {entry['samples']} samples, but its shards list a different total")
        for shard in entry["shards"]:
            if shard["name"] in listed:
                problems.append(f"{shard['name']}: listed under both {listed[shard['name']]} and {split}")
                continue
            listed[shard["name"]] = split
            problems += [
                f"{shard['name']}: {p}" for p in verify_shard(directory / shard["name"], shard, manifest, layout)
            ]
    known = {"manifest.json"} | {n for s in manifest["splits"].values() for x in s["shards"] for n in _files(x)}
    problems += [
        f"{p.name}: on disk but not in the manifest" for p in existing_outputs(directory) if p.name not in known
    ]
    return problems + layout.problems()


def _files(shard: dict) -> list[str]:
    return [shard["name"]] + ([shard["index"]["name"]] if "index" in shard else [])


def verify_shard(path: Path, shard: dict, manifest: dict, layout: Layout | None = None) -> list[str]:
    if not path.is_file():
        return ["missing"]
    size, sha = file_digest(path)
    if size != shard["bytes"] or sha != shard["sha256"]:
        return [f"size/sha256 {size}/{sha[:12]}… differ from the manifest's {shard['bytes']}/{shard['sha256'][:12]}…"]
    problems, n_samples, keys = [], 0, set()
    tokens, version = dict.fromkeys(manifest["tokenizers"], 0), manifest["format_version"]
    encoder = next(iter(manifest["tokenizers"]))
    try:
        for key, members in read_shard(path):
            n_samples += 1
            if key in keys:
                problems.append(f"sample {key} appears twice")
            keys.add(key)
            sample_tokens, sample_problems = check_sample(key, members, manifest["tokenizers"], version)
            problems += sample_problems
            for name, n in sample_tokens.items():
                tokens[name] += n
            if layout is not None and not sample_problems:
                meta, arrays = decode(members)
                layout.add(key, meta["n_segments"], arrays[encoder][1])
    except tarfile.TarError as err:
        return [f"not a readable tar: {err}"]
    if n_samples != shard["samples"]:
        problems.append(f"{n_samples} samples, manifest says {shard['samples']}")
    if tokens != shard["tokens"]:
        problems.append(f"token counts {tokens}, manifest says {shard['tokens']}")
    if "index" in shard:
        problems += verify_index(path.with_name(shard["index"]["name"]), shard["index"], path)
    return problems


def verify_index(path: Path, entry: dict, shard: Path) -> list[str]:
    """The index file matches its manifest entry and the tar's own headers, row for row."""
    if not path.is_file():
        return [f"index {path.name} missing"]
    size, sha = file_digest(path)
    if size != entry["bytes"] or sha != entry["sha256"]:
        return [f"index {path.name}: size/sha256 {size}/{sha[:12]}… differ from the manifest's"]
    try:
        index = load_index(path)
    except (ValueError, OSError) as err:
        return [f"index {path.name}: not a readable .npy: {err}"]
    actual = index_from_tar(shard)
    if index.dtype != actual.dtype or not np.array_equal(index, actual):
        return [f"index {path.name}: keys or member offsets differ from the tar's headers"]
    return []


def inspect(directory: Path, max_samples: int = 1000) -> str:
    """Counts, token statistics per tokenizer (from the first `max_samples` samples), one decoded sample each."""
    manifest = load_manifest(directory)
    docs = manifest["docs"]
    lines = [
        f"{directory}: {manifest['format']} v{manifest['format_version']}, tool {manifest['tool_version']}, "
        f"segment_tokens {manifest['segment_tokens']}, window_segments {manifest['window_segments']}",
        f"docs: {docs['read']} read, {docs['written']} written, skipped {docs['skipped'] or 'none'}",
    ]
    for split, entry in manifest["splits"].items():
        totals = {name: sum(s["tokens"][name] for s in entry["shards"]) for name in manifest["tokenizers"]}
        lines.append(f"{split}: {entry['samples']} samples in {len(entry['shards'])} shards, tokens {totals}")
    samples = list(_first_samples(directory, manifest, max_samples))
    if not samples:
        return "\n".join(lines + ["no samples"])
    decoded = [_decoded(path, key, members) for path, key, members in samples]
    lines.append(f"per segment, over the first {len(samples)} samples:")
    for name, info in manifest["tokenizers"].items():
        lengths = np.concatenate([np.diff(arrays[name][1].astype(np.int64)) for _, arrays in decoded])
        lines.append(
            f"  {name:>10}: mean {lengths.mean():.1f} tokens, min {lengths.min()}, max {lengths.max()} "
            f"(vocab {info['vocab_size']}, {info['dtype']}, hash {info['hash'][:12]}…)"
        )
    key, (_, arrays) = samples[0][1], decoded[0]
    lines.append(f"sample {key}, first segment, decoded by each tokenizer:")
    for name, info in manifest["tokenizers"].items():
        ids, offsets = arrays[name]
        lines.append(f"  {name}: {_decode(info['path'], ids[offsets[0] : offsets[1]].tolist())!r}")
    return "\n".join(lines)


def _first_samples(directory: Path, manifest: dict, limit: int) -> Iterator[tuple[Path, str, dict[str, bytes]]]:
    """(shard, key, members) of the first `limit` samples; a shard that is not a readable tar is a DataError
    naming it."""
    n = 0
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            path = directory / shard["name"]
            try:
                for key, members in read_shard(path):
                    yield path, key, members
                    n += 1
                    if n >= limit:
                        return
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"{path}: not a readable tar ({err}); arc-data verify checks every shard") from None


def _decoded(path: Path, key: str, members: dict[str, bytes]) -> tuple[dict, dict]:
    try:
        return decode(members)
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: sample {key}: {err}; arc-data verify checks every shard") from None


def _decode(path: str, ids: list[int]) -> str:
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).decode(ids)
    except (OSError, ValueError) as err:
        return f"<cannot load tokenizer at {path}: {err}>"
