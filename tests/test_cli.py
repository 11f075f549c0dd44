"""``python -m diffeqbridge info`` and ``demo`` end to end, in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "diffeqbridge", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def _engine_ready() -> bool:
    try:
        import diffeqbridge as deb
    except Exception:
        return False
    return all(hasattr(deb, n) for n in ("solve", "SDEProblem", "VirtualBrownianTree", "solvers"))


needs_engine = pytest.mark.skipif(not _engine_ready(), reason="the engine (deb.solve) has not landed yet")


def test_help():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "info" in proc.stdout


@needs_engine
def test_info():
    proc = _run("info", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"diffeqbridge \d+\.\d+", out)
    assert "torch " in out and "CUDA available" in out
    for peer in ("jax", "torchsde", "torchdiffeq", "diffrax"):
        assert peer in out
    assert "native" in out and "julia" in out
    from diffeqbridge.julia import julia_status

    ok, reason = julia_status()
    assert reason in out
    import diffeqbridge as deb

    for name in ("EM", "SOSRI", "SRA1", "Tsit5"):
        if hasattr(deb, name):
            assert re.search(rf"^{name}\s", out, re.M), f"{name} missing from the solver table"


@needs_engine
def test_demo_small_with_plot(tmp_path):
    png = tmp_path / "demo.png"
    proc = _run("demo", "--paths", "200", "--plot", str(png), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "algorithm chosen" in out
    m = re.search(r"strong error at T = 1\s*:\s*([0-9.e+-]+)", out)
    assert m, out
    err = float(m.group(1))
    assert 0.0 <= err < 0.05, out  # atol = rtol = 1e-3 on GBM with u0 = 0.5
    assert re.search(r"NFE per path \(nf \+ ng\)\s*:\s*[0-9.]+", out)
    assert re.search(r"NFE total\s*:\s*\d+", out)
    assert re.search(r"accepted [0-9.]+, rejected [0-9.]+", out)
    assert "Success: 200" in out
    assert "wall time" in out
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_engine
def test_demo_unknown_alg_is_a_clear_error():
    proc = _run("demo", "--paths", "4", "--alg", "NoSuchSolver", timeout=120)
    assert proc.returncode != 0
    assert "unknown algorithm" in proc.stderr
