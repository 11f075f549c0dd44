"""``python -m diffeqbridge diffusion-demo`` end to end (subprocess, small n)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_diffusion_demo_runs_and_plots(tmp_path):
    png = tmp_path / "demo.png"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "diffeqbridge", "diffusion-demo", "--method", "ode", "--n", "400", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("ode"))
    nfe, *rest = row.split()[1:]
    assert 20 < float(nfe) < 300
    weights = [float(v) for v in rest[:3]]
    stds = [float(v) for v in rest[3:6]]
    assert all(abs(w - e) < 0.08 for w, e in zip(weights, (0.5, 0.3, 0.2))), row
    assert all(abs(s - 0.5) < 0.08 for s in stds), row
    assert png.exists() and png.stat().st_size > 10_000
