"""Saving many times: the solver's interpolant vs a step onto every save time (issue 15 item 9).

* ODE: y' = -k (1 + cos(t)/2) y, k = 0.5 ... 2 (B = 4), Tsit5 and alg=None
  (``AutoTsit5(Rodas4())``, per-sample interpolant) at atol = rtol = 1e-8 on [0, 10] with
  10^4 save times: ``interpolated`` (the default) against ``forced``
  (``tstops=saveat``: a step lands on every save time, the behaviour before), steps per sample,
  wall time (interleaved repeats, median) and the largest error against the closed form.
* SDE: EM with dt = 1e-4 (geometric Brownian motion, B = 4): save times on the step grid
  within rounding (``linspace(0, T, n + 1)``: one step each, none added) and off the grid
  (``linspace(0, T, n)``: a step lands on each, the grid restarts there; about 2n steps).

Writes ``benchmarks/results/save_interpolation.json``; the table in BENCHMARKS.md is
rendered from it (``python tools/bench_report.py --write``).

    python benchmarks/save_interpolation.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import diffeqbridge as deb

try:
    from . import _harness as H
except ImportError:  # run as a script: python benchmarks/save_interpolation.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _harness as H  # type: ignore[no-redef]

NAME = "save_interpolation"

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
    algs = {"Tsit5": deb.Tsit5(), "alg=None": None}
    cases = [(name, mode) for name in algs for mode in modes]
    walls: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    sols: dict[tuple[str, str], Any] = {}
    for _ in range(repeats):
        for name, mode in cases:
            wall, sols[name, mode] = _timed(prob, algs[name], atol=1e-8, rtol=1e-8, saveat=ts, **modes[mode])
            walls[name, mode].append(wall)
    return [
        {
            "case": f"{name} tol 1e-8, 10^4 saves, {mode}",
            "steps": int(sols[name, mode].stats.naccept.max()),
            "wall_s": statistics.median(walls[name, mode]),
            "max_error": float((sols[name, mode].ys - exact).abs().max()),
        }
        for name, mode in cases
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


def run(quick: bool, out: Path, threads: int = 1) -> dict[str, Any]:
    H.set_threads(threads)
    rows = ode_rows(1 if quick else 3) + sde_rows(1_000 if quick else 10_000)
    for row in rows:
        print(row)
    return H.write_json(out / f"{NAME}.json", NAME, {"rows": rows}, quick=quick)


def tables(doc: dict[str, Any]) -> dict[str, str]:
    """``rows``: steps, wall time and (ODE) the largest error against the closed form per case."""
    lines = ["| case | steps | wall (s) | largest error |", "| --- | --- | --- | --- |"]
    for row in doc["rows"]:
        error = f"{row['max_error']:.1e}" if "max_error" in row else ""
        lines.append(f"| {row['case']} | {row['steps']:,} | {row['wall_s']:.3g} | {error} |")
    return {"rows": "\n".join(lines)}


def main(argv: list[str] | None = None) -> int:
    args = H.make_parser(__doc__.splitlines()[0]).parse_args(argv)
    run(args.quick, args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
