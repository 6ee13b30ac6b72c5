"""The embedded corpus: text that needs no download, harvested at run time from this Python installation.

Documents are the docstrings of the standard library (one document per module: its docstring, then each
class's and function's, in source order) and the help topics of `pydoc_data.topics`. Both are covered by the
Python Software Foundation License. Sources are parsed with `ast`, never imported, so harvesting has no side
effects. Identical docstrings (e.g. `decimal` and `_pydecimal`) are kept once.
"""

import ast
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_DOC_CHARS = 200


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str) -> Iterator[tuple[str, str]]:
    """(title, docstring) for the module, then every class and function, in source order."""
    tree = ast.parse(source)
    nodes = [tree] + sorted(
        (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            title = "" if isinstance(node, ast.Module) else node.name
            yield title, doc.strip()


def harvest() -> Iterator[dict]:
    """Yield corpus records {"id", "text", "source"} in a fixed order."""
    seen: set[str] = set()

    def fresh(text: str) -> bool:
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if digest in seen:
            return False
        seen.add(digest)
        return True

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            parts = [f"{title}\n{doc}" if title else doc for title, doc in _docstrings(source) if fresh(doc)]
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (e.g. lib2to3 test data)
        text = "\n\n".join(parts)
        if len(text) >= MIN_DOC_CHARS:
            module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            yield {"id": f"stdlib/{module}", "text": text, "source": "python-stdlib-docstrings"}

    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= MIN_DOC_CHARS and fresh(text):
            yield {"id": f"pydoc/{name}", "text": text, "source": "pydoc_data.topics"}


def is_heldout(doc_id: str, fraction: float = 0.05) -> bool:
    """A stable held-out set: the tiny models never train on these documents."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) < fraction * 2**32


def write_corpus(path: Path) -> int:
    """Write the corpus as JSON lines; returns the number of documents."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in harvest():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_corpus(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    print(f"{write_corpus(Path(sys.argv[1]))} documents")
