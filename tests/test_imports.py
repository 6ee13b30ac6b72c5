"""The import structure of arctrain/ and data_tools/, read with `ast` (nothing is imported): no circles, no import
from a lower layer up to a higher one, data_tools independent of arctrain, and imports inside functions only with a
comment on (or right above) the line saying why (deepspeed after DS_ACCELERATOR is set, heavy optional extras, ...)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("arctrain", "data_tools")

# Lowest first: a module imports from its own layer and the layers before it, never from a later one. A module's
# layer is that of the longest path listed that its file starts with.
LAYERS = [
    ["data_tools/"],  # raw text -> shards; knows nothing of the trainer
    # the version, process groups, named fault points (checkpoint and train call them), the config tree
    ["arctrain/__init__.py", "arctrain/distributed.py", "arctrain/faults.py", "arctrain/config/"],
    ["arctrain/data/"],  # shards -> batches
    ["arctrain/model/"],  # batches -> losses
    ["arctrain/export/hf/", "arctrain/export/load.py"],  # reading an export: the shipped model code, its weights
    ["arctrain/checkpoint/"],  # resumable checkpoints, init_from (which reads exports)
    ["arctrain/train/"],  # the loop and what it calls
    ["arctrain/export/"],  # checkpoint -> export, reference checkpoints -> export
    ["arctrain/inference/"],  # using an export: generate, eval, stores, vLLM, reports
    ["arctrain/testing/"],  # tiny models, the embedded corpus, fetched models
    ["arctrain/cli.py", "arctrain/__main__.py"],  # the command: dispatches to all of the above
]
# Byte for byte the tiny-model cache key (tests/conftest.py): an edit rebuilds every engineer's cached models.
KEYED_SOURCES = {"arctrain/testing/corpus.py", "arctrain/testing/tiny_models.py"}
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for file in sorted((REPO / package).rglob("*.py")):
            parts = file.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


MODULES = _modules()


def _layer(module: str) -> int:
    path = MODULES[module].relative_to(REPO).as_posix()
    matches = [prefix for prefix in RANK if path.startswith(prefix)]
    assert matches, f"{path} is in no layer of tests/test_imports.py's LAYERS: add it"
    return RANK[max(matches, key=len)]


def _imports(module: str) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, statement, inside a function) for each import of our own modules by `module`."""
    tree = ast.parse(MODULES[module].read_text())
    inner = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from arctrain.inference import store_codec` imports a module, not a name of arctrain.inference
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [name if name in MODULES else node.module for name in names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                found.append((target, node, id(node) in inner))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_data_tools_imports_nothing_from_arctrain():
    wrong = [
        f"{m} imports {t}"
        for m in MODULES
        if m.startswith("data_tools")
        for t, _, _ in _imports(m)
        if t.split(".")[0] == "arctrain"
    ]
    assert wrong == []


def test_no_import_goes_up_a_layer():
    wrong = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert wrong == []


def test_no_import_circle():
    graph, circles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_imports_inside_functions_say_why():
    """An import inside a function hides a dependency from the reader of the module's head; the few that must wait
    (deepspeed after DS_ACCELERATOR is set, heavy optional extras) carry their reason as a comment on the line."""
    unexplained = set()
    for file in MODULES.values():
        if file.relative_to(REPO).as_posix() in KEYED_SOURCES:
            continue
        lines = file.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    span = range(node.lineno, node.end_lineno + 1)
                    comments = [lines[i - 1].partition("#")[2] for i in span]
                    if lines[node.lineno - 2].lstrip().startswith("#"):  # or a comment line right above it
                        comments.append(lines[node.lineno - 2])
                    reason = re.sub(r"noqa(:\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*)?", "", " ".join(comments))
                    if not re.search(r"[a-z]{3}", reason):
                        unexplained.add(f"{file.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert sorted(unexplained) == []


def test_architecture_map_names_every_module():
    """docs/ARCHITECTURE.md's module map names each module under its folder (folders by indentation)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## Module map", 1)[1].split("```")[1]
    named, folders = set(), []  # folders: (indent, path) of the enclosing folders
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, words = len(line) - len(line.lstrip()), [w.strip("`,;:()") for w in line.split()]
        folders = [(i, f) for i, f in folders if i < indent]
        if words[0].endswith("/"):
            folders.append((indent, (folders[-1][1] if folders else "") + words[0]))
        where = folders[-1][1] if folders else ""
        named |= {where + w for w in words if re.fullmatch(r"[a-z_]+\.py", w)}
    modules = {f.relative_to(REPO).as_posix() for f in MODULES.values() if f.name != "__init__.py"}
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []
