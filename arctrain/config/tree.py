"""Plain nested data (YAML, `a.b=c` overrides) -> a tree of typed dataclasses, with one-line errors.

`build(cls, raw)` checks every key against the dataclass fields (unknown and missing keys fail), coerces strings
(the command line, or YAML's unquoted 1e-5) to the field's type, and lets each dataclass's `__post_init__`
check its values; the errors carry the full dotted key. arctrain/config/schema.py holds the tree itself.
"""

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config value; `key` is the dotted key, relative to the section that raised it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`; strings (the command line, or YAML's unquoted 1e-5) are parsed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if isinstance(value, str):  # command line: "a,b,c" (brackets optional)
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"{value!r} is not a list")
        return [_coerce(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: type, key: str) -> Any:
    bools = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if tp is bool and isinstance(value, str) and value.lower() in bools:
        return bools[value.lower()]
    if tp in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not a number") from None
        value = int(number) if tp is int and number.is_integer() and "." not in value else number
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not tp:
        raise ConfigError(key, f"{value!r} is not of type {tp.__name__}")
    return value


def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"{raw!r} is not a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in names:
            raise ConfigError(join(prefix, str(name)), f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], join(prefix, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(join(prefix, f.name), "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # the section knows its own keys; give them their full dotted name
        raise ConfigError(join(prefix, err.key), err.message) from None


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def yaml_key_lines(node: yaml.Node | None, prefix: str, out: dict[str, int], source: str = "") -> dict[str, int]:
    """Dotted key -> line number of every key in a composed YAML document (for error messages). A key given twice
    in one mapping is an error (PyYAML would keep the last one silently); `source` names the file in it."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = join(prefix, str(key_node.value)), key_node.start_mark.line + 1
            if key in seen:
                where = f"{source}:{line}" if source else f"line {line}"
                raise ConfigError(key, f"duplicate key at {where} (first at line {seen[key]}); keep one")
            seen[key] = out[key] = line
            yaml_key_lines(value_node, key, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[join(prefix, str(i))] = item.start_mark.line + 1
            yaml_key_lines(item, join(prefix, str(i)), out, source)
    return out


def set_dotted(raw: dict, key: str, value: str) -> None:
    """Set dotted `key` in nested data; integer parts index lists (`decoders.1.path`), one past the end appends."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(".".join(parts[: i + 1]), f"no such list item (the list has {len(node)})")
            if int(part) == len(node):
                node.append({})
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(".".join(parts[:i]), f"{node!r} has no key {part!r}")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = [] if parts[i + 1].isdigit() else {}  # "decoders.0.name" starts a list
            node = node[part]
