"""Static checks of the Julia sources in the test suite (no Julia needed).

Every ``julia/**/*.jl`` must parse with tree-sitter-julia without ERROR/MISSING nodes
(``tools/check_julia.py``) and ``fatou lint`` must report no errors; both checks are also
shown to fail on a broken file, so they can fail.  Skipped when the ``lint`` extra
(tree-sitter, tree-sitter-julia, fatou) is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JULIA = REPO / "julia"
BROKEN = "function f(x)\n    return x +\nend\n"


def _fatou() -> str:
    exe = shutil.which("fatou") or str(Path(sys.executable).parent / "fatou")
    if not os.path.isfile(exe):
        pytest.skip("fatou is not installed (pip install 'diffeqbridge[lint]')")
    return exe


def _check_julia(*paths: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("tree_sitter_julia")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_julia.py"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_tree_sitter_parses_every_julia_file():
    proc = _check_julia(JULIA)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(list(JULIA.rglob("*.jl")))
    assert f"{n} file(s) parsed, 0 syntax problem(s)" in proc.stdout


def test_tree_sitter_check_fails_on_broken_source(tmp_path):
    (tmp_path / "bad.jl").write_text(BROKEN)
    proc = _check_julia(tmp_path)
    assert proc.returncode == 1 and "bad.jl:" in proc.stdout


def test_fatou_lint_clean():
    proc = subprocess.run(
        [_fatou(), "lint", "--color", "never", str(JULIA)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fatou_lint_fails_on_broken_source(tmp_path):
    (tmp_path / "bad.jl").write_text(BROKEN)
    proc = subprocess.run(
        [_fatou(), "lint", "--color", "never", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0 and "bad.jl" in proc.stdout + proc.stderr
