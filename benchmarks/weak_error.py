"""Weak error of the first and second moments of GBM at T = 1 vs wall time, large ensembles.

GBM du = 1.01 u dt + 0.87 u dW, u0 = 1/2 (Itô): E u(1) = u0 e^1.01 = 1.3728005,
E u(1)^2 = u0^2 e^(2.02 + 0.87^2) = 4.0172823.  N = 10^5 paths (quick 10^4), float64.
Ours and torchsde use the same paths (our tree), diffrax its own; the Monte Carlo standard
errors of both moments are reported with the results: weak errors below them are noise.
Wall time: one warm solve of all N paths per point (diffrax compiled before).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
    from . import _peers as Pe
    from ._sde_problems import problems
    from .sde_work_precision import setup_jax
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks import _peers as Pe  # type: ignore[no-redef]
    from benchmarks._sde_problems import problems  # type: ignore[no-redef]
    from benchmarks.sde_work_precision import setup_jax  # type: ignore[no-redef]

NAME = "weak_error"
M1 = 0.5 * math.exp(1.01)
M2 = 0.25 * math.exp(2.02 + 0.87**2)


def cases(size: str) -> list[tuple[str, str, bool, list[float]]]:
    fixed = [2.0**-k for k in ((2, 3) if size == "tiny" else (2, 3, 4, 5) if size == "quick" else (2, 3, 4, 5, 6))]
    tols = [10**-1] if size == "tiny" else [10**-1, 10**-1.5, 10**-2]
    out = [
        ("ours", "EM", False, fixed),
        ("ours", "SRIW1", True, tols),
        ("ours", "SOSRI", True, tols),
        ("torchsde", "euler", False, fixed),
        ("torchsde", "srk", False, fixed[:3]),
        ("diffrax", "Euler", False, fixed),
        ("diffrax", "SPaRK", True, tols),
    ]
    if size == "tiny":
        out = out[:2] + out[3:4]
    return out


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    import numpy as np

    size = size or ("quick" if quick else "full")
    threading = setup_jax(threads)
    N = {"tiny": 256, "quick": 10_000, "full": 100_000}[size]
    P = problems()["gbm"]
    makers = {"ours": Pe.make_ours, "torchsde": Pe.make_torchsde, "diffrax": Pe.make_diffrax}
    rows: dict[str, list[dict]] = {}
    mc = {}
    for lib, method, adaptive, lv in cases(size):
        key = f"{lib} {method}{' (adaptive)' if adaptive else ''}"
        runner = makers[lib](P, N, method, adaptive)
        if lib == "diffrax":
            runner(lv[0])  # compile
        rows[key] = []
        for level in lv:
            t = time.perf_counter()
            res = runner(level)
            wall = time.perf_counter() - t
            y = np.asarray(res["y"], dtype=np.float64).reshape(-1)
            m1, m2 = float(y.mean()), float((y * y).mean())
            mc.setdefault(lib, {"se_m1": float(y.std() / math.sqrt(N)), "se_m2": float((y * y).std() / math.sqrt(N))})
            rows[key].append(
                {
                    "level": level,
                    "wall_s": wall,
                    "nfe": res["nfe"],
                    "m1": m1,
                    "m2": m2,
                    "err_m1": abs(m1 - M1),
                    "err_m2": abs(m2 - M2),
                    "failed": res["failed"],
                }
            )
        if progress:
            progress(key)
    payload = {
        "config": {"N": N, "size": size, "exact": {"E u(1)": M1, "E u(1)^2": M2}, "threads": threading, "dtype": "float64"},
        "monte_carlo_standard_error": mc,
        "notes": [
            "ours and torchsde share paths (our tree); diffrax uses its own paths.",
            "weak errors at or below the Monte Carlo standard error are sampling noise, not bias.",
        ],
        "methods": rows,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    print(tables(doc)["methods"])
    print(f"MC standard errors: {mc}")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows, mc, N = doc["methods"], doc["monte_carlo_standard_error"], doc["config"]["N"]
    fig, axes = H.figure(ncols=2, size=(5.5, 4.0))
    colors = {"ours": "C0", "torchsde": "C2", "diffrax": "C1"}
    for ax, moment, se_key in ((axes[0], "err_m1", "se_m1"), (axes[1], "err_m2", "se_m2")):
        series = {k: ([r["wall_s"] for r in v], [max(r[moment], 1e-12) for r in v]) for k, v in rows.items()}
        styles = {
            k: {"color": colors[k.split()[0]], "linestyle": "--" if "adaptive" in k else "-", "markersize": 4} for k in rows
        }
        H.plot_series(
            ax,
            series,
            xlabel=f"wall time, {N} paths [s]",
            ylabel=f"|{'E u(1)' if moment == 'err_m1' else 'E u(1)^2'} error|",
            title=f"GBM weak error ({'first' if moment == 'err_m1' else 'second'} moment)",
            styles=styles,
        )
        se = mc.get("ours", {}).get(se_key)
        if se:
            ax.axhline(se, color="k", linewidth=0.8, linestyle=":", label="MC std. error")
        ax.legend(fontsize=6)
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``methods``: NFE, wall time and both moments' errors per method and step/tolerance."""
    rows = [
        (k, f"{r['level']:.3g}", f"{r['nfe']:.0f}", H.format_seconds(r["wall_s"]), f"{r['err_m1']:.2e}", f"{r['err_m2']:.2e}")
        for k, v in doc["methods"].items()
        for r in v
    ]
    return {"methods": H.markdown_table(["method", "dt / tol", "NFE", "wall", "abs. error E u(1)", "abs. error E u(1)^2"], rows)}


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
