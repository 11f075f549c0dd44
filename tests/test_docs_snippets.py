"""Every ```python block in README.md and docs/**/*.md runs, so the documentation cannot drift.

The blocks of one file run in order in one namespace (a page is one script), in a temporary
working directory.  A block preceded by the line ``<!-- skip-snippet: reason -->`` is not
run (for code that needs Julia, a GPU or a long run; say why).  Blocks fenced as anything
other than ``python`` (bash, text, ...) are not run.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^<!--\s*skip-snippet\b.*-->\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def parse_snippets(path: Path, text: str) -> list[Snippet]:
    """The fenced ``python`` blocks of a markdown text, in order (other languages are dropped)."""
    lines = text.splitlines()
    out: list[Snippet] = []
    i, previous = 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = (m["info"].split() or [""])[0].strip("{.}").lower()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if lang in ("python", "py"):
            out.append(Snippet(path, i + 1, "\n".join(body) + "\n", bool(SKIP.match(previous))))
        previous = ""
        i = j + 1
    return out


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _files_with_code() -> list[Path]:
    return [p for p in markdown_files() if any(not s.skipped for s in parse_snippets(p, p.read_text(encoding="utf-8")))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", _files_with_code(), ids=_id)
def test_markdown_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "src"))
    namespace: dict[str, object] = {"__name__": f"snippets_{path.stem}"}
    for snippet in parse_snippets(path, path.read_text(encoding="utf-8")):
        if snippet.skipped:
            continue
        where = f"{_id(path)}:{snippet.line}"
        try:
            exec(compile(snippet.code, where, "exec"), namespace)
        except Exception as exc:  # name the block that failed
            raise AssertionError(f"the python block at {where} failed: {type(exc).__name__}: {exc}") from exc


def test_parser_finds_blocks_and_honours_skip_markers() -> None:
    text = "\n".join(
        [
            "# t",
            "```python",
            "a = 1",
            "```",
            "",
            "<!-- skip-snippet: needs Julia -->",
            "",
            "```python",
            "julia()",
            "```",
            "```bash",
            "ls",
            "```",
            "  ```py",
            "  b = a + 1",
            "  ```",
            "````python",
            "s = '''",
            "```",
            "'''",
            "````",
        ]
    )
    got = parse_snippets(Path("x.md"), text)
    assert [(s.line, s.code, s.skipped) for s in got] == [
        (2, "a = 1\n", False),
        (8, "julia()\n", True),
        (14, "b = a + 1\n", False),
        (17, "s = '''\n```\n'''\n", False),
    ]


def test_readme_and_docs_have_runnable_blocks() -> None:
    """The test above really runs something: the README and getting started have code."""
    names = {p.name for p in _files_with_code()}
    assert {"README.md", "getting-started.md"} <= names


def test_docs_solver_tables_are_current() -> None:
    """docs/guides/choosing-a-solver.md's tables are generated: rerun `python tools/solver_table.py --write`."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import solver_table
    finally:
        sys.path.remove(str(REPO / "tools"))
    page = (REPO / solver_table.PAGE).read_text(encoding="utf-8")
    for name, table in solver_table.generated_blocks().items():
        start, end = solver_table.markers(name)
        assert f"{start}\n{table}\n{end}" in page, (
            f"{solver_table.PAGE}: the {name!r} table is stale: run `python tools/solver_table.py --write`"
        )


def test_mkdocs_include_hook_rewrites_repository_links() -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(REPO / "tools"))
    text = "see [a](docs/guides/x.md), [b](BENCHMARKS.md#y), [c](README.md) and ![p](docs/bench/p.png)"
    assert (
        mkdocs_hooks.rewrite_links(text, 0) == "see [a](guides/x.md), [b](benchmarks.md#y), [c](index.md) and ![p](bench/p.png)"
    )
    assert mkdocs_hooks.rewrite_links("[a](docs/x.md)", 1) == "[a](../x.md)"
    page = mkdocs_hooks.expand("# Home\n<!-- include README.md -->\n", "index.md")
    assert "diffeqbridge" in page and "](docs/" not in page


def test_mkdocs_include_code_keeps_the_marker_indent() -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(REPO / "tools"))
    page = mkdocs_hooks.expand("??? note\n    <!-- include-code tools/mkdocs_hooks.py -->\n", "examples/x.md")
    lines = page.splitlines()
    assert lines[1] == "    ```python" and lines[-1] == "    ```"
    assert all(not line or line.startswith("    ") for line in lines[1:])


def test_mkdocs_include_drops_the_included_title_under_a_page_title() -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(REPO / "tools"))
    titled = mkdocs_hooks.expand("# Benchmarks\n\nintro\n\n<!-- include BENCHMARKS.md -->\n", "benchmarks.md")
    assert titled.count("\n# ") == 0 and titled.startswith("# Benchmarks")
    bare = mkdocs_hooks.expand("<!-- include BENCHMARKS.md -->\n", "benchmarks.md")
    assert bare.startswith("# ")


def test_mkdocs_hook_drops_sphinx_roles_from_rendered_docstrings() -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(REPO / "tools"))
    html = '<p>::</p>\n<p>see :class:<code>Stats</code> and :func:<code class="x">solve</code>; a: b</p>'
    assert mkdocs_hooks.clean_sphinx_markup(html) == '<p>see <code>Stats</code> and <code class="x">solve</code>; a: b</p>'
