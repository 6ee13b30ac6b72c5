"""Every config key with its type, default and docstring, read from the dataclasses of arctrain/config/schema.py.

arctrain config --list                      # the keys, for a terminal
arctrain config --markdown docs/config.md   # the reference page, kept in sync by tests/config/test_config_reference.py
"""

import argparse
import ast
import dataclasses
import inspect
import typing

from arctrain.config.renamed import OLD_NAMES
from arctrain.config.schema import Config

HEADER = """# Config reference

Every key of the config tree, generated from the dataclasses of `arctrain/config/schema.py` (their attribute
docstrings) by `arctrain config --markdown docs/config.md`; `arctrain config --list` prints the same. Defaults <
the YAML file (`--config`) < `key=value` on the command line. `decoders.N.*` is one entry of the `decoders` list.
"""


def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated field of the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for field, after in zip(body, body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(after, ast.Expr):
            if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[field.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _type_name(tp: typing.Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "required"


def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, docstring) of every leaf key, in declaration order."""
    hints, docs, keys = typing.get_type_hints(cls), _docstrings(cls), []
    for field in dataclasses.fields(cls):
        tp, key = hints[field.name], prefix + field.name
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, key + ".")
        elif item is not None and dataclasses.is_dataclass(item):
            keys += config_keys(item, key + ".N.")
        else:
            keys.append((key, _type_name(tp), _default(field), docs.get(field.name, "")))
    return keys


def listing() -> str:
    return "\n".join(f"{key}: {tp} = {default}\n    {doc}" for key, tp, default, doc in config_keys()) + "\n"


def markdown() -> str:
    rows = [HEADER]
    section = None
    for key, tp, default, doc in config_keys():
        top = key.split(".")[0] if "." in key else "top level"
        if top != section:
            section = top
            rows.append(f"\n## {section}\n\n| key | type | default | what it does |\n|---|---|---|---|")
        cell = doc.replace("|", "\\|")
        rows.append(f"| `{key}` | `{tp.replace('|', '&#124;')}` | `{default.replace('|', '&#124;')}` | {cell} |")
    rows.append(
        "\n## Old key names\n\nThese still load, as the new key (in a YAML file or as `key=value`); the run "
        "says so in one line on stderr.\n\n| old key | new key |\n|---|---|"
    )
    rows += [f"| `{old}` | `{new}` |" for old, new in OLD_NAMES]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arctrain config", description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print every key with its type, default and docstring")
    parser.add_argument("--markdown", metavar="FILE", help="write the reference page (docs/config.md) to FILE")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown())
    if args.list or not args.markdown:
        print(listing(), end="")
