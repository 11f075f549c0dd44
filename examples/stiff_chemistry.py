"""Stiff chemical kinetics: Robertson (ROBER) and HIRES with Rodas4 and Kvaerno5 against references.

* **Robertson** (1966): three species, rate constants 0.04, 3·10⁷ and 10⁴ — nine orders of
  magnitude apart — on ``t ∈ [0, 40]``.
* **HIRES** (Schäfer 1975, "high irradiance response" of plant morphogenesis): eight species
  on ``t ∈ [0, 321.8122]``.

Both are problems of the Hairer–Wanner / Mazzia–Magherini test set; the reference values at
the final time below are the test set's (RADAU at tolerance ~1e-18).  The script solves each
with the Rosenbrock method ``Rodas4``, the ESDIRK method ``Kvaerno5`` and the automatic
switch ``AutoTsit5(Rodas4())`` over a range of tolerances (``rtol = tol``,
``atol = 1e-2 tol``), and reports the relative error at the final time against the reference
and the steps taken.  A batch of Robertson problems with different rate constants shows
per-sample steps: every sample of the batch gets the step sizes its own stiffness needs.

    python examples/stiff_chemistry.py [--quick] [--out DIR]

Full run: tolerances 1e-3 .. 1e-7 (a few CPU minutes); ``--quick``: 1e-4 only (seconds).
Writes ``stiff_chemistry.png`` (Robertson's species over log time, and error against steps
for both problems) and ``stiff_chemistry.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import diffeqbridge as deb
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import diffeqbridge as deb

# (final time, initial state, reference state at the final time)
REFERENCES = {
    "robertson": (40.0, [1.0, 0.0, 0.0], [0.7158270687193941, 9.185534764557338e-6, 0.2841637457458413]),
    "hires": (
        321.8122,
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057],
        [
            7.371312573325668e-4,
            1.442485726316185e-4,
            5.888729740967575e-5,
            1.175651343283149e-3,
            2.386356198831331e-3,
            6.238968252742796e-3,
            2.849998395185769e-3,
            2.850001604814231e-3,
        ],
    ),
}


def robertson(k: torch.Tensor | float = 1.0):
    """Robertson's kinetics with the fast rate ``3e7`` scaled by ``k`` (a float or a ``(B,)``
    tensor of per-sample factors); ``f(t, y)`` maps ``(B, 3) -> (B, 3)``."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y1, y2, y3 = y.unbind(-1)
        fast = 3e7 * k * y2 * y2
        return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - fast, fast], dim=-1)

    return f


def hires(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """HIRES, ``(B, 8) -> (B, 8)``."""
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    return torch.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            280.0 * y6 * y8 - 1.81 * y7,
            -280.0 * y6 * y8 + 1.81 * y7,
        ],
        dim=-1,
    )


SOLVERS = {
    "Rodas4": deb.Rodas4,
    "Kvaerno5": deb.Kvaerno5,
    "AutoTsit5(Rodas4)": lambda: deb.AutoTsit5(deb.Rodas4()),
}


def relative_error(y: torch.Tensor, ref: list[float]) -> float:
    """Max over components of ``|y − ref| / |ref|``."""
    r = torch.tensor(ref, dtype=torch.float64)
    return float(((y - r).abs() / r.abs()).max())


def work_precision(tols: list[float]) -> dict:
    fields = {"robertson": robertson(), "hires": hires}
    out: dict = {}
    for name, (t_end, y0, ref) in REFERENCES.items():
        prob = deb.ODEProblem(fields[name], torch.tensor([y0], dtype=torch.float64), (0.0, t_end))
        out[name] = {}
        for label, make in SOLVERS.items():
            rows = []
            for tol in tols:
                start = time.perf_counter()
                sol = deb.solve(prob, make(), rtol=tol, atol=1e-2 * tol)
                rows.append(
                    {
                        "tol": tol,
                        "err": relative_error(sol.ys[-1, 0], ref),
                        "steps": int(sol.stats.nsteps[0]),
                        "nf": int(sol.stats.nf[0]),
                        "success": sol.success,
                        "wall_s": time.perf_counter() - start,
                    }
                )
            out[name][label] = rows
    return out


def robertson_batch(n_times: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Robertson for fast-rate factors 10^-2 .. 10^2 in one batch, saved on a log-time grid."""
    k = torch.logspace(-2, 2, 5, dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64).expand(len(k), 3).contiguous()
    ts = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            torch.logspace(-5, torch.log10(torch.tensor(40.0)).item(), n_times, dtype=torch.float64),
        ]
    )
    sol = deb.solve(deb.ODEProblem(robertson(k), y0, (0.0, 40.0)), deb.Rodas4(), rtol=1e-6, atol=1e-8, saveat=ts)
    steps = {f"{float(kk):g}": int(n) for kk, n in zip(k, sol.stats.naccept)}
    return ts, sol.ys, steps


def run(quick: bool, out: Path) -> dict:
    torch.set_num_threads(1)
    tols = [1e-4] if quick else [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    start = time.perf_counter()
    doc: dict = {"tols": tols, "work_precision": work_precision(tols)}
    ts, ys, steps = robertson_batch(30 if quick else 60)
    doc["robertson_batch_steps_by_rate_factor"] = steps
    doc["wall_s"] = time.perf_counter() - start
    plot(doc, ts, ys, out / "stiff_chemistry.png")
    (out / "stiff_chemistry.json").write_text(json.dumps(doc, indent=2))
    return doc


def plot(doc: dict, ts: torch.Tensor, ys: torch.Tensor, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    axes = axes.flatten()
    steps = doc["robertson_batch_steps_by_rate_factor"]
    mid = list(steps).index("1")
    ax = axes[0]
    for i, (name, scale) in enumerate((("y1", 1.0), ("y2 × 10⁴", 1e4), ("y3", 1.0))):
        ax.plot(ts[1:], scale * ys[1:, mid, i], color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_title("Robertson, Rodas4")
    ax.legend(fontsize=8)
    ax = axes[1]
    for j, (factor, n) in enumerate(steps.items()):
        ax.loglog(ts[1:], ys[1:, j, 1], color=f"C{j}", label=f"fast rate × {factor}: {n} steps")
    ax.set_xlabel("t")
    ax.set_ylabel("y2")
    ax.set_title("one batch, per-sample steps", fontsize=10)
    ax.legend(fontsize=8)
    markers = {"Rodas4": "o-", "Kvaerno5": "s-", "AutoTsit5(Rodas4)": "^--"}
    for ax, (name, by_solver) in zip(axes[2:], doc["work_precision"].items()):
        for label, rows in by_solver.items():
            ax.loglog([r["steps"] for r in rows], [r["err"] for r in rows], markers[label], label=label)
        ax.set_xlabel("steps (accepted + rejected)")
        ax.set_ylabel("max relative error at T")
        ax.set_title(f"{name}: error vs steps, tol " + ", ".join(f"{t:g}" for t in doc["tols"]), fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one tolerance (1e-4) instead of five")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for stiff_chemistry.png/.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    doc = run(args.quick, args.out)
    for name, by_solver in doc["work_precision"].items():
        for label, rows in by_solver.items():
            for r in rows:
                print(
                    f"{name:>9} {label:<18} tol {r['tol']:.0e}: {r['steps']:5d} steps, {r['nf']:6d} f-evals, "
                    f"relative error {r['err']:.1e}{'' if r['success'] else ' (FAILED)'}"
                )
    print("Robertson batch, accepted steps per sample by fast-rate factor:", doc["robertson_batch_steps_by_rate_factor"])
    print(f"{doc['wall_s']:.1f} s; wrote {args.out / 'stiff_chemistry.png'} and stiff_chemistry.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
