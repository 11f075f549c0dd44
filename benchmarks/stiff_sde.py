"""The stiff SDE of issue 12 with ``alg=None`` and its candidate implicit partners.

``dX = -1e4 (X - cos t) dt + 0.1 dW`` (additive) and ``+ 0.1 X dW`` (diagonal, Itô) on
``[0, 1]``, ``X(0) = 1``, default tolerances (``atol = rtol = 1e-2``), float64, one Brownian
tree (seed 1) for every method.  Per method: accepted/rejected steps and drift evaluations
per path (``Stats.nf``), drift calls on the batch (a counting drift), and the strong error
at ``t = 1`` against the exact pathwise reference of :mod:`benchmarks._stiff_sde` (mean and
max over the paths).  The reference's fluctuation ``X(1) - E X(1)`` has std ~ 8e-4 (additive)
and ~ 5e-4 (diagonal): a method stepping with ``dt |λ| >> 1`` damps it, so errors of that
size are the floor at these tolerances.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    from . import _harness as H
    from . import _stiff_sde as S
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks import _stiff_sde as S  # type: ignore[no-redef]

import diffeqbridge as deb

NAME = "stiff_sde"


def _methods(noise: str, size: str) -> list[tuple[str, Any]]:
    smooth = deb.ImplicitRKMil(smooth_est=True)
    if noise == "additive":
        methods = [
            ("alg=None: AutoSwitch(ShARK, ImplicitRKMil(smooth_est))", None),
            ("before: AutoSwitch(ShARK, ImplicitRKMil)", deb.AutoSwitch(deb.ShARK(), deb.ImplicitRKMil())),
            ("AutoSwitch(ShARK, SKenCarp)", deb.AutoSwitch(deb.ShARK(), deb.SKenCarp())),
            ("SKenCarp (embedded)", deb.SKenCarp()),
            ("ImplicitRKMil(smooth_est)", smooth),
            ("ImplicitRKMil", deb.ImplicitRKMil()),
            ("ShARK", deb.ShARK()),
        ]
        if size == "full":  # ~27,000 steps per path
            methods.append(("SKenCarp (sciml_noode)", deb.SKenCarp(error_estimate="sciml_noode")))
        return methods
    return [
        ("alg=None: AutoSOSRI (nonstifftol 0.1, ImplicitRKMil(smooth_est))", None),
        ("before: SOSRI", deb.SOSRI()),
        ("AutoSOSRI(ImplicitRKMil(smooth_est), nonstifftol 0.9)", deb.AutoSOSRI(smooth, nonstifftol=0.9)),
        ("ImplicitRKMil(smooth_est)", smooth),
        ("ImplicitRKMil", deb.ImplicitRKMil()),
    ]


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return S.drift(t, y)


def _one(noise: str, batch: int, name: str, alg: Any, bm: deb.VirtualBrownianTree, ref: torch.Tensor) -> dict:
    counter = _Counting()
    prob = S.problem(batch, noise, drift_fn=counter)
    start = time.perf_counter()
    sol = deb.solve(prob, alg, brownian=bm)
    wall = time.perf_counter() - start
    err = (sol.ys[-1] - ref).abs().flatten()
    extra = sol.stats.extra
    return {
        "noise": noise,
        "method": name,
        "alg": repr(sol.alg),
        "success": bool(sol.success),
        "accepted": float(sol.stats.naccept.double().mean()),
        "rejected": float(sol.stats.nreject.double().mean()),
        "nf_per_path": float(sol.stats.nf.double().mean()),
        "drift_calls": counter.calls,
        "switched": float((extra["nswitch"] >= 1).double().mean()) if "nswitch" in extra else None,
        "err_mean": float(err.mean()),
        "err_max": float(err.max()),
        "wall_s": wall,
    }


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    size = size or ("quick" if quick else "full")
    threading = H.set_threads(threads)
    batch = {"tiny": 2, "quick": 8, "full": 32}[size]
    rows, fluct = [], {}
    for noise in ("additive", "diagonal"):
        bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=1, dtype=torch.float64, tol=2.0**-24)
        ref = S.reference(bm, noise)
        fluct[noise] = float((ref - ref.mean()).std())
        for name, alg in _methods(noise, size):
            rows.append(_one(noise, batch, name, alg, bm, ref))
            r = rows[-1]
            print(f"{noise:8s} {name:60s} nf/path {r['nf_per_path']:9.1f} err {r['err_mean']:.2e}", flush=True)
    payload = {
        "config": {"B": batch, "size": size, "tol": 1e-2, "lambda": S.LAM, "sigma": S.SIGMA, "threads": threading},
        "reference_fluctuation_std": fluct,
        "rows": rows,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def plot(doc: dict) -> Any:
    """Strong error against drift evaluations per path, one panel per noise type."""
    fig, axes = H.figure(ncols=2, size=(5.5, 4.2))
    for ax, noise in zip(axes, ("additive", "diagonal")):
        for i, r in enumerate(x for x in doc["rows"] if x["noise"] == noise):
            ax.loglog([r["nf_per_path"]], [r["err_mean"]], "o", color=f"C{i}", label=r["method"])
        ax.set_xlabel("drift evaluations per path")
        ax.set_ylabel("mean |X(1) - reference|")
        ax.set_title(f"{noise} noise, tol 1e-2")
        ax.legend(fontsize=5)
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``methods``: steps, evaluations and strong error per method."""
    header = ["noise", "method", "steps (rej.)", "drift evals / path", "drift calls", "strong error mean (max)"]
    body = [
        (
            r["noise"],
            r["method"],
            f"{r['accepted']:.1f} ({r['rejected']:.1f})",
            f"{r['nf_per_path']:,.0f}",
            f"{r['drift_calls']:,}",
            f"{H.sci(r['err_mean'])} ({H.sci(r['err_max'])})",
        )
        for r in doc["rows"]
    ]
    return {"methods": H.markdown_table(header, body)}


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
