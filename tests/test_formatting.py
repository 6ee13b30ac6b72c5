"""One formatter: no `# fmt: skip` / `# fmt: off` / `# fmt: on` comment in the folders listed, so `ruff format` lays out
every statement there. No exceptions, not even with a reason beside them: the statements that used to be held behind
these markers were hand-packed multi-assignments and calls, and each read as well or better in ruff's layout. A
statement that truly needs a hand layout (a matrix literal, say) is better written so ruff keeps it (a trailing comma,
one row per line) than hidden from the formatter. Comments are found with `tokenize`, so the words in a string (like
this docstring) do not count."""

import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("arctrain", "data_tools", "benchmarks", "scripts", "tests")
KEPT_AS_WRITTEN = REPO / "tests/fixtures"  # files as earlier arctrain versions wrote them; ruff excludes them too
MARKER = re.compile(r"#.*\bfmt:\s*(skip|off|on)\b")


def markers(source: str) -> list[int]:
    """Line numbers of the comments in `source` that switch ruff format off for a statement or a region."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.COMMENT and MARKER.match(t.string)]


def test_markers_finds_comments_not_strings():
    source = 'a, b = 1, 2  # fmt: skip\ntext = "# fmt: skip"\n# fmt: off\nx = [1,2]\n# fmt: on\ny = 1  # fmt:skip\n'
    assert markers(source) == [1, 3, 5, 6]


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_formatter_markers(folder):
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted((REPO / folder).rglob("*.py"))
        if not path.is_relative_to(KEPT_AS_WRITTEN)
        for line in markers(path.read_text())
    ]
    assert not found, f"ruff format is switched off here (write the statement so ruff can lay it out): {found}"
