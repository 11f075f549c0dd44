"""The ``bench`` subcommand runs the smallest benchmark end to end (tiny sizes, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchsde")
pytest.importorskip("matplotlib")

from diffeqbridge.cli import find_benchmarks_dir


def test_benchmarks_dir_found():
    d = find_benchmarks_dir()
    assert d is not None and (d / "run_all.py").is_file()


def test_bench_unknown_name_is_clear(capsys):
    from diffeqbridge.cli import main

    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def run_tiny_bench(name: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """``python -m diffeqbridge bench --only NAME`` in its tiny size (DEB_BENCH_TINY); must succeed."""
    env = {**os.environ, "DEB_BENCH_TINY": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffeqbridge", "bench", "--only", name, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.timeout(60)
def test_bench_tiny_writes_json_and_png(tmp_path: Path):
    proc = run_tiny_bench("sde_work_precision", tmp_path, timeout=60)
    doc = json.loads((tmp_path / "sde_work_precision.json").read_text())
    rows = doc["problems"]["gbm"]["methods"]
    assert rows["ours EM"][0]["err"] > 0
    # same Brownian path: our EM and torchsde's Euler agree to rounding
    assert abs(rows["ours EM"][0]["err"] - rows["torchsde euler"][0]["err"]) < 1e-9
    assert (tmp_path / "sde_work_precision.png").stat().st_size > 0
    assert "benchmark" in proc.stdout and "sde_work_precision" in proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["tiny"] is True


@pytest.mark.timeout(90)
def test_bench_tiny_regularization(tmp_path: Path):
    proc = run_tiny_bench("regularization", tmp_path, timeout=90)
    doc = json.loads((tmp_path / "regularization.json").read_text())
    for prob in ("neural_sde", "neural_ode"):
        res = doc["problems"][prob]["results"]
        assert set(res) == {"none", "error", "stiffness", "local_error", "local_stiffness"}
        assert res["none"]["nfe_ratio"] == 1.0 and all(r["nfe"] > 0 for r in res.values())
    res = doc["problems"]["neural_ode_classifier"]["results"]
    assert set(res) == {"none", "error", "local_error"}
    assert res["none"]["nfe_ratio"] == 1.0 and all(0 <= r["test_accuracy"] <= 1 and r["nfe"] > 0 for r in res.values())
    assert (tmp_path / "regularization.png").stat().st_size > 0
    assert "regularization" in proc.stdout


@pytest.mark.timeout(120)
def test_bench_tiny_stiff_work_precision(tmp_path: Path):
    pytest.importorskip("diffrax")
    pytest.importorskip("torchdiffeq")
    run_tiny_bench("stiff_work_precision", tmp_path, timeout=120)
    doc = json.loads((tmp_path / "stiff_work_precision.json").read_text())
    assert doc["ode"]["robertson"]["methods"]["ours Rodas4"][0]["err"] < 1e-3
    stable = doc["sde"]["largest_stable_dt"]
    assert stable["ours ImplicitEM"]["dt"] == 0.1 and stable["torchsde euler"]["dt"] == 0.001
    assert (tmp_path / "stiff_work_precision.png").stat().st_size > 0
