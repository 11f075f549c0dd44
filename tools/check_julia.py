#!/usr/bin/env python3
"""Static syntax check of the Julia sources with tree-sitter-julia.

Parses every ``*.jl`` file under the given paths (default: ``julia/``) and fails on any
ERROR or MISSING node, printing file:line:column for each.  Julia itself is not needed.

Usage: python tools/check_julia.py [PATH ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import tree_sitter_julia
from tree_sitter import Language, Parser


def _problems(node, out: list) -> None:
    """Collect the innermost ERROR and every MISSING node below ``node``."""
    if node.is_missing:
        out.append(node)
        return
    if not (node.has_error or node.is_error):
        return
    before = len(out)
    for child in node.children:
        _problems(child, out)
    if node.is_error and len(out) == before:
        out.append(node)


def check_file(parser: Parser, path: Path) -> list[str]:
    source = path.read_bytes()
    tree = parser.parse(source)
    nodes: list = []
    _problems(tree.root_node, nodes)
    msgs = []
    for node in nodes:
        line, col = node.start_point
        kind = "MISSING " + node.type if node.is_missing else "syntax error"
        snippet = source[node.start_byte : node.end_byte].decode("utf-8", "replace")
        snippet = snippet.splitlines()[0][:60] if snippet else ""
        msgs.append(f"{path}:{line + 1}:{col + 1}: {kind}: {snippet!r}")
    return msgs


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("julia")]
    files = sorted({f for r in roots for f in ([r] if r.is_file() else r.rglob("*.jl"))})
    if not files:
        print(f"check_julia: no .jl files under {', '.join(map(str, roots))}", file=sys.stderr)
        return 1
    parser = Parser(Language(tree_sitter_julia.language()))
    failures = []
    for f in files:
        failures += check_file(parser, f)
    for msg in failures:
        print(msg)
    print(f"check_julia: {len(files)} file(s) parsed, {len(failures)} syntax problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
