"""A Config from defaults < a YAML file < key=value overrides; saved back as YAML."""

import dataclasses
import os
import sys
from pathlib import Path

import yaml

from arctrain.config import renamed
from arctrain.config.deepspeed import _check_deepspeed
from arctrain.config.schema import Config
from arctrain.config.tree import ConfigError, build, set_dotted, yaml_key_lines


def config_from_dict(raw: dict) -> Config:
    """A Config from nested plain data (what a YAML file holds)."""
    return build(Config, raw, "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults < the YAML file at `path` < `overrides` ("a.b=c"); checked, including the DeepSpeed file. Old key
    names (arctrain/config/renamed.py) are read as the new ones, with one line on stderr (rank 0's) saying so."""
    raw, where, moved = {}, {}, []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"{str(path)!r} is not a file")
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(str(path), f"invalid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(str(path), "the top level must be a mapping")
        where = {k: f"{path}:{line}" for k, line in yaml_key_lines(yaml.compose(text), "", {}, str(path)).items()}
        try:
            moved = renamed.upgrade(raw)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} ({where.get(err.key, path)})") from None
        for old, new in moved:  # errors name the new key and the old key's line
            where |= {new + k[len(old) :]: where[k] for k in list(where) if k == old or k.startswith(old + ".")}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override must look like key=value (e.g. train.steps=100)")
        if new := renamed.new_key(key):
            moved.append((key, new))
            key = new
        where[key] = f"command line {item!r}"
        try:
            set_dotted(raw, key, value)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} ({where[key]})") from None
    try:
        cfg = config_from_dict(raw)
        _check_deepspeed(cfg)
    except ConfigError as err:
        parts = err.key.split(".")
        origin = next((where[k] for n in range(len(parts), 0, -1) if (k := ".".join(parts[:n])) in where), None)
        origin = origin or (str(path) if path is not None else "config")
        raise ConfigError(err.key, f"{err.message} ({origin})") from None
    if moved and os.environ.get("RANK", "0") == "0":  # one line per run, not one per rank
        print(renamed.note(moved), file=sys.stderr)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML; `load_config(path)` gives back an equal Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True))
