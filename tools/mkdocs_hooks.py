"""MkDocs hooks (mkdocs.yml ``hooks:``): pages that show files kept outside ``docs/``.

* ``<!-- include FILE -->`` (a line of its own) is replaced by the markdown of ``FILE``
  (relative to the repository root), with its repository-relative links rewritten for a
  page in ``docs/``: ``docs/x`` -> ``x``, ``BENCHMARKS.md`` -> ``benchmarks.md``,
  ``README.md`` -> ``index.md``.  ``docs/index.md`` shows README.md this way and
  ``docs/benchmarks.md`` shows BENCHMARKS.md, so each text lives in one file.  When the page
  has a ``# `` title above the marker, the included file's own title is dropped.
* The API pages render docstrings written with Sphinx roles (``:class:`X```) and ``::``
  literal-block markers; the roles are dropped (the name stays as code) and a lone ``::``
  paragraph is removed, in the rendered HTML.
* ``<!-- include-code FILE -->`` is replaced by ``FILE`` in a fenced python block (the
  examples' sources on their pages; not run by the doc-snippet test, which reads the
  markdown files themselves); an indented marker gives an indented block, e.g. inside a
  collapsible ``??? note`` admonition.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_INCLUDE = re.compile(r"^<!-- include (?P<path>\S+) -->[ \t]*$", re.M)
_INCLUDE_CODE = re.compile(r"^(?P<indent>[ \t]*)<!-- include-code (?P<path>\S+) -->[ \t]*$", re.M)
_LINK_REWRITES = (("](docs/", "]("), ("](BENCHMARKS.md", "](benchmarks.md"), ("](README.md", "](index.md"))


def rewrite_links(markdown: str, depth: int) -> str:
    """Links of a repository-root file, for a page ``depth`` folders below ``docs/``."""
    up = "../" * depth
    for old, new in _LINK_REWRITES:
        markdown = markdown.replace(old, new[:2] + up + new[2:])
    return markdown


def _read(path: str) -> str:
    file = (REPO / path).resolve()
    if REPO not in file.parents or not file.is_file():
        raise FileNotFoundError(f"mkdocs include: {path} is not a file of the repository")
    return file.read_text(encoding="utf-8")


def _drop_title(text: str) -> str:
    """``text`` without its first ``# `` heading (the including page has its own title)."""
    return re.sub(r"^# .*\n+", "", text, count=1, flags=re.M)


def _include(match: re.Match[str], markdown: str, depth: int) -> str:
    text = _read(match["path"])
    if re.search(r"^# ", markdown[: match.start()], re.M):
        text = _drop_title(text)
    return rewrite_links(text, depth)


def expand(markdown: str, src_uri: str) -> str:
    depth = src_uri.count("/")
    markdown = _INCLUDE.sub(lambda m: _include(m, markdown, depth), markdown)
    return _INCLUDE_CODE.sub(lambda m: _code_block(_read(m["path"]), m["indent"]), markdown)


def _code_block(source: str, indent: str) -> str:
    """``source`` as a fenced python block, every line indented by ``indent`` (e.g. inside an admonition)."""
    lines = ["```python", *source.rstrip().splitlines(), "```"]
    return "\n".join(indent + line if line else line for line in lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand(markdown, page.file.src_uri)


_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|math):(?=<code)")
_LONE_LITERAL_MARKER = re.compile(r"<p>::</p>\n?")


def clean_sphinx_markup(html: str) -> str:
    """Drop Sphinx roles before inline code and paragraphs holding only ``::``."""
    return _LONE_LITERAL_MARKER.sub("", _SPHINX_ROLE.sub("", html))


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return clean_sphinx_markup(html)
