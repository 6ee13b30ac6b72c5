"""manifest.json (docs/ARCHITECTURE.md §2): writing, reading, and merging the manifests of partial builds."""

import json
import os
import shutil
import tarfile
from pathlib import Path

from data_tools import __version__
from data_tools.inputs import DataError
from data_tools.shard_index import load_index
from data_tools.shards import file_digest, prepare_out

FORMAT = "arc-shards"
# 2: a sample index per shard (`index` in each shard entry); 3: one `.mp` member per sample
# (data_tools/sample_format.py). Shards of versions 1 and 2 still load, verify and merge.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# Settings that must agree for shards to belong to one dataset.
SHARED = ("segment_tokens", "window_segments", "val_fraction", "id_scope")
DEFAULTS = {"id_scope": "global"}  # what format-1 manifests, which lack the key, did


def make_manifest(
    settings: dict,
    tokenizers: dict,
    splits: dict[str, list[dict]],
    sources: list[dict],
    docs: dict,
    version: int = FORMAT_VERSION,
) -> dict:
    assert docs["read"] == docs["written"] + sum(docs["skipped"].values()), docs
    return {
        "format": FORMAT,
        "format_version": version,
        "tool_version": __version__,
        **{key: settings.get(key, DEFAULTS.get(key)) for key in SHARED},
        "tokenizers": tokenizers,
        "splits": {
            split: {"samples": sum(s["samples"] for s in shards), "shards": shards} for split, shards in splits.items()
        },
        "sources": sources,
        "docs": docs,
    }


def write_manifest(out: Path, manifest: dict) -> Path:
    """Written last and atomically: a directory with a manifest holds a finished build."""
    path = out / "manifest.json"
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no manifest (not a finished arc-data build)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        expected = " or ".join(map(str, READABLE_VERSIONS))
        raise DataError(f"{path}: format_version {manifest.get('format_version')}, expected {expected}")
    return manifest


def merge_builds(out: Path, part_dirs: list[Path], overwrite: bool) -> dict:
    """Combine partial builds into `out`: shards are hard-linked (copied across file systems) under their own
    names, then one manifest is written. Nothing is touched before every part has been checked."""
    parts = [(d / "manifest.json", load_manifest(d)) for d in part_dirs]
    if out.resolve() in {d.resolve() for d in part_dirs}:
        raise DataError(f"--out {out}: is one of the parts; merge into a new directory")
    merged = merge_manifests(parts)
    shards = [
        (d / s["name"], s) for d, (_, m) in zip(part_dirs, parts) for e in m["splits"].values() for s in e["shards"]
    ]
    files = [(path, shard) for path, shard in shards] + [
        (path.with_name(shard["index"]["name"]), shard["index"]) for path, shard in shards if "index" in shard
    ]
    for path, entry in files:  # every byte is read: a part corrupted since its build must not be merged
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise DataError(f"{path}: missing or not {entry['bytes']} bytes as its manifest says")
        if file_digest(path)[1] != entry["sha256"]:
            raise DataError(
                f"{path}: sha256 differs from its manifest's (changed since it was built); rebuild that part"
            )
    _check_no_shared_documents(shards)
    prepare_out(out, overwrite)
    for path, entry in files:
        try:
            os.link(path, out / entry["name"])
        except OSError:
            shutil.copyfile(path, out / entry["name"])
    write_manifest(out, merged)
    return merged


def _check_no_shared_documents(shards: list[tuple[Path, dict]]) -> None:
    """A document in two parts would be trained on twice and give two samples one key. Keys are
    `<document digest>-<window>`, and a build writes all windows of a document into its own part, so a digest seen
    in shards of two parts is such a document. Reads the shard indexes (format 2) or the tar headers."""
    owner: dict[str, Path] = {}
    for path, shard in shards:
        for key in _sample_keys(path, shard):
            doc = key.split("-", 1)[0]
            first = owner.setdefault(doc, path)
            if first.parent != path.parent:
                raise DataError(
                    f"sample key {key}: document {doc} is in both {first} and {path}; "
                    "every document must be in exactly one part"
                )


def _sample_keys(path: Path, shard: dict) -> list[str]:
    if "index" in shard:
        return [k.decode() for k in load_index(path.with_name(shard["index"]["name"]))["key"]]
    with tarfile.open(path) as tar:
        return sorted({name.rsplit("/", 1)[-1].split(".", 1)[0] for name in tar.getnames()})


def merge_manifests(parts: list[tuple[Path, dict]]) -> dict:
    """One manifest for the shards of several partial builds; they must share tokenizers and segment settings,
    and their shard names must not clash (partial builds number their shards from distinct --start-shard)."""
    first_path, first = parts[0]
    seen: dict[str, Path] = {}
    for path, manifest in parts:
        if manifest["format_version"] != first["format_version"]:
            raise DataError(
                f"{path}: format_version {manifest['format_version']}, but {first_path} has "
                f"{first['format_version']}; rebuild the older part"
            )
        for key in SHARED:
            ours, theirs = manifest.get(key, DEFAULTS.get(key)), first.get(key, DEFAULTS.get(key))
            if ours != theirs:
                raise DataError(f"{path}: {key} = {ours}, but {first_path} has {theirs}")
        if _identities(manifest) != _identities(first):
            raise DataError(f"{path}: tokenizers {_identities(manifest)} differ from {first_path}'s")
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["name"] in seen:
                    raise DataError(f"shard name {shard['name']} is in both {seen[shard['name']]} and {path}")
                seen[shard["name"]] = path
    manifests = [m for _, m in parts]
    splits = {
        split: sorted((s for m in manifests for s in m["splits"].get(split, {}).get("shards", [])), key=_by_name)
        for split in ("train", "val")
    }
    skipped: dict[str, int] = {}
    for m in manifests:
        for reason, n in m["docs"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    docs = {key: sum(m["docs"][key] for m in manifests) for key in ("read", "written")}
    sources = [s for m in manifests for s in m["sources"]]
    docs = {**docs, "skipped": skipped}
    return make_manifest(first, first["tokenizers"], splits, sources, docs, first["format_version"])


def _identities(manifest: dict) -> dict:
    """What decides the ids: name, hash, dtype (paths may differ between machines)."""
    return {name: (t["hash"], t["dtype"]) for name, t in manifest["tokenizers"].items()}


def _by_name(shard: dict) -> str:
    return shard["name"]
