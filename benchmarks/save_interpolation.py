"""Saving many times: the solver's interpolant vs a step onto every save time (issue 15 item 9).

* ODE: y' = -k (1 + cos(t)/2) y, k = 0.5 ... 2 (B = 4), Tsit5 at atol = rtol = 1e-8 on
  [0, 10] with 10^4 save times: ``interpolated`` (the default) against ``forced``
  (``tstops=saveat``: a step lands on every save time, the behaviour before), steps per sample,
  wall time (interleaved repeats, median) and the largest error against the closed form.
* SDE: EM with dt = 1e-4 (geometric Brownian motion, B = 4): save times on the step grid
  within rounding (``linspace(0, T, n + 1)``: one step each, none added) and off the grid
  (``linspace(0, T, n)``: a step lands on each, the grid restarts there; about 2n steps).

Writes ``benchmarks/results/save_interpolation.json`` (``--out`` to change the folder).

    python benchmarks/save_interpolation.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import diffeqbridge as deb

RATES = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64).unsqueeze(1)


def decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -RATES * (1.0 + 0.5 * torch.cos(t)).unsqueeze(1) * y


def _timed(prob: Any, alg: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = deb.solve(prob, alg, **kwargs)
    return time.perf_counter() - start, out


def ode_rows(repeats: int) -> list[dict[str, Any]]:
    ts = torch.linspace(0.0, 10.0, 10_000, dtype=torch.float64)
    exact = torch.exp(-RATES.T * (ts + 0.5 * torch.sin(ts)).unsqueeze(1)).unsqueeze(2)
    prob = deb.ODEProblem(decay, torch.ones(4, 1, dtype=torch.float64), (0.0, 10.0))
    modes = {"interpolated": {}, "forced (tstops=saveat)": {"tstops": ts}}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    sols: dict[str, Any] = {}
    for _ in range(repeats):
        for mode, extra in modes.items():
            wall, sols[mode] = _timed(prob, deb.Tsit5(), atol=1e-8, rtol=1e-8, saveat=ts, **extra)
            walls[mode].append(wall)
    return [
        {
            "case": f"Tsit5 tol 1e-8, 10^4 saves, {mode}",
            "steps": int(sols[mode].stats.naccept.max()),
            "wall_s": statistics.median(walls[mode]),
            "max_error": float((sols[mode].ys - exact).abs().max()),
        }
        for mode in modes
    ]


def sde_rows(n: int) -> list[dict[str, Any]]:
    t1 = n * 1e-4
    prob = deb.SDEProblem(lambda t, y: 0.1 * y, lambda t, y: 0.2 * y, torch.ones(4, 1, dtype=torch.float64), (0.0, t1))
    rows = []
    for label, count in (("on the grid within rounding", n + 1), ("off the grid", n)):
        ts = torch.linspace(0.0, t1, count, dtype=torch.float64)
        wall, sol = _timed(prob, deb.EM(), dt=1e-4, saveat=ts)
        rows.append(
            {"case": f"EM dt 1e-4, linspace(0, {t1:g}, {count}): {label}", "steps": int(sol.stats.naccept.max()), "wall_s": wall}
        )
    return rows


def run(quick: bool, out: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = ode_rows(1 if quick else 3) + sde_rows(1_000 if quick else 10_000)
    for row in rows:
        print(row)
    doc = {"benchmark": "save_interpolation", "quick": quick, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "save_interpolation.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, a 10x shorter SDE span")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    run(args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
