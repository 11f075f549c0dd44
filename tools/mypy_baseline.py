#!/usr/bin/env python3
"""Run mypy on ``src/diffeqbridge`` and compare its error count with a baseline that only shrinks.

    python tools/mypy_baseline.py            # exit 1 when there are more errors than the baseline
    python tools/mypy_baseline.py --update   # rewrite tools/mypy_baseline.txt from this run

The baseline (``tools/mypy_baseline.txt``) holds one ``path count`` line per file with errors.
The check fails when the total grows; it names the files whose count grew, and says when
the total shrank (then run ``--update`` so the gain is kept).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "tools" / "mypy_baseline.txt"
TARGET = "src/diffeqbridge"
_ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+(?::\d+)?: error: ")


def count_errors(mypy_output: str) -> Counter[str]:
    """Errors per file from mypy's text output (notes are not errors)."""
    return Counter(m["path"] for line in mypy_output.splitlines() if (m := _ERROR.match(line)))


def read_baseline(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, n = line.rsplit(maxsplit=1)
                counts[name] = int(n)
    return counts


def write_baseline(path: Path, counts: Counter[str]) -> None:
    lines = ["# mypy errors per file (tools/mypy_baseline.py --update); the total may only shrink"]
    lines += [f"{name} {n}" for name, n in sorted(counts.items())]
    path.write_text("\n".join(lines) + "\n")


def compare(current: Counter[str], baseline: Counter[str]) -> tuple[bool, list[str]]:
    """``(ok, messages)``: ok when the total did not grow."""
    total, base_total = sum(current.values()), sum(baseline.values())
    grown = [f"  {name}: {baseline[name]} -> {current[name]}" for name in sorted(current) if current[name] > baseline[name]]
    msgs = [f"mypy: {total} errors (baseline {base_total})"]
    if total > base_total:
        msgs += ["mypy: the error count grew; files with more errors than in the baseline:", *grown]
    elif total < base_total:
        msgs.append(f"mypy: {base_total - total} fewer errors than the baseline: run `python tools/mypy_baseline.py --update`")
    return total <= base_total, msgs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="rewrite the baseline from this run")
    args = parser.parse_args(argv)
    proc = subprocess.run([sys.executable, "-m", "mypy", TARGET], cwd=REPO, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or "error: " in proc.stderr:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        print("mypy did not run cleanly", file=sys.stderr)
        return 2
    current = count_errors(proc.stdout)
    if args.update:
        write_baseline(BASELINE, current)
        print(f"{BASELINE.relative_to(REPO)}: {sum(current.values())} errors in {len(current)} files")
        return 0
    ok, msgs = compare(current, read_baseline(BASELINE))
    if not ok:
        print(proc.stdout)
    print("\n".join(msgs))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
