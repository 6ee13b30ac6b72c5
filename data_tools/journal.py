"""`arc-data build --resume`: the state of an unfinished build, written each time a shard is complete.

At that moment every sample before the one about to be written is on disk: in the complete shards, or in the
open shard of the other split up to a byte offset (flushed and synced first). The journal,
`<out>/build.journal.json` (replaced atomically), records those shards, each open shard's offset, sample and token
counts and index rows, and where the document stream stands: the ordinal of the document whose sample comes next,
how many of its samples are written already, the documents written and skipped for lack of tokens before it.

A resumed build checks that its options, inputs and tokenizers are the journal's, cuts each open shard back to its
recorded offset, reads the documents again from the start (reading is cheap; the duplicate check needs them all)
and tokenizes only from that document on: its shards are byte-identical to those of an uninterrupted build. The
journal is removed once the manifest is written.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_tools.inputs import DataError

NAME = "build.journal.json"


@dataclass
class Position:
    """Where the document stream stands at the sample being written."""

    doc: int = 0  # ordinal (after the duplicate check) of the document of the next sample
    skip: int = 0  # samples of that document written already
    written: int = 0  # documents before it with at least one sample
    no_tokens: int = 0  # documents before it without any
    enc_tokens: int = 0  # encoder tokens of every sample written
    identity: dict = field(default_factory=dict)  # options, inputs and tokenizers the build ran with


def write_journal(out: Path, position: Position, splits: dict[str, dict]) -> None:
    tmp = out / (NAME + ".tmp")
    tmp.write_text(json.dumps({"position": asdict(position), "splits": splits}) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / NAME)


def read_journal(out: Path, identity: dict) -> tuple[Position, dict[str, dict]] | None:
    """The journal of an unfinished build in `out` made with the same `identity`; None when there is none."""
    path = out / NAME
    if (out / "manifest.json").exists():
        raise DataError(f"--resume: {out} holds a finished build (manifest.json); use --overwrite to rebuild")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        position = Position(**data["position"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a readable build journal ({err}); rebuild with --overwrite") from None
    for key, value in json.loads(json.dumps(identity)).items():  # as JSON holds it: lists, not tuples
        if position.identity.get(key) != value:
            raise DataError(
                f"--resume: {path} was written with {key} {position.identity.get(key)!r}, this build has {value!r}; "
                f"resume with the same options and inputs, or rebuild with --overwrite"
            )
    return position, data["splits"]
