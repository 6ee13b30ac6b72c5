"""`arctrain config --list` and docs/config.md: every key of the config tree, with its docstring, in sync."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from arctrain.config.load import load_config
from arctrain.config.reference import config_keys, markdown

REPO = Path(__file__).resolve().parents[2]


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a config as plain data (list entries as N), computed from a loaded config."""
    keys = set()
    for name, value in tree.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            keys |= _leaf_keys(value[0], f"{prefix}{name}.N.")
        else:
            keys.add(prefix + name)
    return keys


def test_every_key_is_listed_with_its_docstring():
    cfg = load_config(REPO / "configs" / "llama_mistral_1node.yaml")
    listed = {key: doc for key, _, _, doc in config_keys()}
    assert set(listed) == _leaf_keys(dataclasses.asdict(cfg))
    assert sorted(key for key, doc in listed.items() if not doc) == []


def test_the_command_prints_every_key():
    cmd = [sys.executable, "-m", "arctrain", "config", "--list"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    printed = {line.split(":")[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert printed == {key for key, _, _, _ in config_keys()}
    assert "data.micro_batch_size: int = " in out


def test_docs_config_md_is_generated_from_the_dataclasses():
    """After a change to arctrain/config/schema.py: arctrain config --markdown docs/config.md"""
    assert (REPO / "docs" / "config.md").read_text() == markdown()
