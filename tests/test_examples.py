"""The examples run end to end in their ``--quick`` mode, write their figure, and say what they should.

Each example runs in a subprocess (as a user would start it) with a fixed seed; the checks
are on the JSON it writes.  The full runs' figures are in docs/examples/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME.py --quick ARGS`` as a user would start it; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(REPO / "examples" / f"{name}.py"), "--quick", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_example(name: str, out: Path) -> dict:
    """Run an example that writes ``OUT/NAME.png`` and ``OUT/NAME.json``; returns the JSON."""
    run_script(name, "--out", str(out))
    png = out / f"{name}.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.timeout(300)
def test_option_pricing_quick(tmp_path: Path) -> None:
    doc = run_example("option_pricing", tmp_path)
    assert doc["success"]
    # the solver's discretisation error is far below the Monte Carlo error
    assert doc["strong_error_at_T"] < 1e-2 * doc["options"]["european"]["ci95"]
    for name, res in doc["options"].items():
        # fixed seed: the 95 % interval covers the closed form (it would fail 1 run in 20 with a random seed)
        assert abs(res["price"] - res["reference"]) <= res["ci95"], name
        widths = [r["ci95"] for r in res["by_paths"]]
        assert widths[-1] < widths[0] / 2, name  # the interval shrinks like 1/sqrt(N): 16x the paths
    assert doc["options"]["down_and_out"]["reference"] < doc["options"]["european"]["reference"]


@pytest.mark.timeout(300)
def test_stiff_chemistry_quick(tmp_path: Path) -> None:
    doc = run_example("stiff_chemistry", tmp_path)
    for problem, by_solver in doc["work_precision"].items():
        for label, rows in by_solver.items():
            for r in rows:
                assert r["success"], (problem, label)
                assert r["err"] < 1e-3, (problem, label, r)  # tol 1e-4 against the RADAU reference
    steps = list(doc["robertson_batch_steps_by_rate_factor"].values())
    assert len(set(steps)) > 1  # per-sample step counts in one batch


@pytest.mark.timeout(300)
def test_neural_sde_fit_quick(tmp_path: Path) -> None:
    doc = run_example("neural_sde_fit", tmp_path)
    ed = doc["test_energy_distance"]
    assert ed["after"] < 0.5 * ed["before"]  # 30 iterations already halve the held-out distance
    assert len(doc["train_loss"]) == doc["iterations"]


@pytest.mark.timeout(300)
def test_diffusion_2d_quick(tmp_path: Path) -> None:
    """The diffusion example (its own CLI: ``--out`` is the PNG) samples with every method."""
    png = tmp_path / "diffusion_2d.png"
    proc = run_script("diffusion_2d", "--out", str(png))
    assert png.read_bytes()[:8] == PNG_MAGIC
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["sde"], ["ode"], ["dpm_solver"], ["edm"])]
    assert len(rows) == 4, proc.stdout
    for row in rows:
        weights = [float(w) for w in row[2:5]]
        # the mixture's weights are 0.5 / 0.3 / 0.2; 300 training steps already get them within 0.1
        assert all(abs(w - ref) < 0.1 for w, ref in zip(weights, (0.5, 0.3, 0.2))), row
