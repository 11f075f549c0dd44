"""Render the benchmark tables and plots from the committed results in ``benchmarks/results/``.

    python tools/bench_report.py --write   # rewrite the generated tables and docs/bench/<name>.png
    python tools/bench_report.py --check   # exit 1 if a generated table differs from its JSON

Every ``benchmarks/results/<name>.json`` (written by ``python benchmarks/<name>.py --quick``) is
read back and handed to the benchmark module's ``tables(doc) -> {key: markdown}`` and
``plot(doc) -> Figure``.  A generated table sits in ``BENCHMARKS.md`` (or a page under ``docs/``)
between

    <!-- bench-table: <name>:<key> -->
    ...
    <!-- /bench-table -->

and everything outside such blocks stays hand-written.  Plots are written to ``docs/bench/``;
``--check`` compares tables only (PNG bytes differ between matplotlib builds), and checks that
every benchmark with a result has its plot.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "docs" / "bench"
PAGES = ("BENCHMARKS.md", "docs")  # files, or folders searched for *.md

BLOCK = re.compile(r"(<!-- bench-table: (?P<name>[\w.-]+):(?P<key>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /bench-table -->)", re.S)


def _modules() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def load_results(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """``{benchmark name: JSON document}`` for every ``<name>.json`` under ``results``."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def benchmark_module(name: str) -> Any:
    """The module ``benchmarks.<name>`` (which exposes ``tables`` and/or ``plot``)."""
    _modules()
    return importlib.import_module(f"benchmarks.{name}")


def _load(meta: Mapping[str, Any]) -> str:
    a, b = meta.get("loadavg_start"), meta.get("loadavg_end")
    return "—" if a is None or b is None else f"{a[0]:.1f} → {b[0]:.1f}"


def runs_table(docs: Mapping[str, Mapping[str, Any]]) -> str:
    """Where each committed result comes from: date, mode and threads, load average, commit."""
    rows = []
    for name, doc in docs.items():
        m = doc.get("meta", {})
        git = m.get("git") or {}
        commit = (git.get("commit") or "—")[:7] + (" (dirty)" if git.get("dirty") else "")
        mode = {True: "quick", False: "full"}.get(m.get("quick"), "—")
        threads = m.get("torch_threads")
        mode += "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"
        rows.append((f"`{name}`", (m.get("date") or "—")[:16].replace("T", " "), mode, _load(m), commit))
    header = ["benchmark", "run (UTC)", "mode", "load avg. start → end", "commit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def render_tables(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{"<name>:<key>": markdown}`` for every table the benchmarks render from their documents,
    plus ``results:runs`` (:func:`runs_table`)."""
    out: dict[str, str] = {"results:runs": runs_table(docs)}
    for name, doc in docs.items():
        mod = benchmark_module(name)
        if hasattr(mod, "tables"):
            for key, text in mod.tables(doc).items():
                out[f"{name}:{key}"] = text.rstrip("\n")
    return out


def fill_blocks(text: str, tables: Mapping[str, str], where: str = "") -> tuple[str, list[str]]:
    """``text`` with every bench-table block replaced by its rendering; also the unknown block names."""
    unknown: list[str] = []

    def repl(m: re.Match[str]) -> str:
        ident = f"{m['name']}:{m['key']}"
        if ident not in tables:
            unknown.append(f"{where}: {ident}")
            return m.group(0)
        return f"{m.group(1)}{tables[ident]}\n{m.group(5)}"

    return BLOCK.sub(repl, text), unknown


def pages(root: Path = ROOT) -> list[Path]:
    """The markdown files that may hold bench-table blocks."""
    found: list[Path] = []
    for entry in PAGES:
        p = root / entry
        found += sorted(p.rglob("*.md")) if p.is_dir() else [p]
    return found


def render_plots(docs: Mapping[str, Mapping[str, Any]], out: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Write ``out/<name>.png`` for every benchmark (of ``names``) whose module has ``plot``."""
    _modules()
    from benchmarks import _harness as H

    written = []
    for name, doc in docs.items():
        if names is not None and name not in names:
            continue
        mod = benchmark_module(name)
        if hasattr(mod, "plot") and not doc.get("skipped"):
            written.append(H.write_plot(mod.plot, doc, out / f"{name}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated tables and the plots")
    mode.add_argument("--check", action="store_true", help="exit 1 if a generated table is stale")
    parser.add_argument("--only", default=None, help="comma-separated benchmarks whose plots to write (default: all)")
    parser.add_argument("--no-plots", action="store_true", help="with --write: tables only")
    args = parser.parse_args(argv)
    docs = load_results()
    tables = render_tables(docs)
    stale, unknown, used = [], [], set()
    for page in pages():
        text = page.read_text()
        new, missing = fill_blocks(text, tables, str(page.relative_to(ROOT)))
        unknown += missing
        used.update(f"{m['name']}:{m['key']}" for m in BLOCK.finditer(text))
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if args.write:
                page.write_text(new)
    for u in unknown:
        print(f"unknown bench-table block {u} (known: {', '.join(sorted(tables))})", file=sys.stderr)
    if args.write:
        if not args.no_plots:
            only = set(args.only.split(",")) if args.only else None
            for p in render_plots(docs, PLOTS, only):
                print(f"wrote {p.relative_to(ROOT)}")
        for s in stale:
            print(f"updated tables in {s}")
        return 1 if unknown else 0
    missing_plots = [
        n
        for n, d in docs.items()
        if hasattr(benchmark_module(n), "plot") and not d.get("skipped") and not (PLOTS / f"{n}.png").exists()
    ]
    for s in stale:
        print(f"stale: {s} (run python tools/bench_report.py --write)", file=sys.stderr)
    for n in missing_plots:
        print(f"missing plot: docs/bench/{n}.png (run python tools/bench_report.py --write)", file=sys.stderr)
    return 1 if stale or unknown or missing_plots else 0


if __name__ == "__main__":
    sys.exit(main())
