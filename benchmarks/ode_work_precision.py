"""ODE work-precision: Lotka–Volterra and a small neural ODE, ours vs torchdiffeq vs diffrax.

* Lotka–Volterra x' = 1.5x - xy, y' = -3y + xy on [0, 10], a batch of B initial
  conditions spread over [0.5, 1.5]^2.
* Neural ODE: y' = MLP(y), 2 -> 64 -> 64 -> 2 tanh, fixed random weights (seed 0), on [0, 1],
  B initial conditions in [-1, 1]^2; diffrax runs the same weights in JAX.

Ours: Tsit5, Dopri5 (per-sample step sizes); torchdiffeq: dopri5 (and tsit5 where the
installed torchdiffeq has it; 0.2.x does not) on the whole batch
(one shared step size, its error norm over the whole batch); diffrax: Tsit5 under
``jax.vmap`` (per-sample steps, like ours), PIDController(rtol, atol).  rtol = atol = tol.
Error: mean over samples of max-abs error at T against a torchdiffeq dopri8 reference at
rtol = atol = 1e-12.  NFE per sample: ours counted per sample (mean); torchdiffeq: calls
of f on the batch; diffrax: steps x 6 + 1 (Tsit5 is FSAL).  float64; B = 1024 (quick 256).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
    from . import _peers as Pe
    from .sde_work_precision import setup_jax
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks import _peers as Pe  # type: ignore[no-redef]
    from benchmarks.sde_work_precision import setup_jax  # type: ignore[no-redef]

NAME = "ode_work_precision"


def _problems(B: int) -> dict[str, dict[str, Any]]:
    import jax.numpy as jnp
    import torch

    g = torch.Generator().manual_seed(0)
    y0_lv = 0.5 + torch.rand(B, 2, generator=g, dtype=torch.float64)
    y0_nn = 2 * torch.rand(B, 2, generator=g, dtype=torch.float64) - 1

    def lv_t(t, y):
        x, z = y[..., 0], y[..., 1]
        return torch.stack([1.5 * x - x * z, -3.0 * z + x * z], -1)

    def lv_j(t, y, args):
        x, z = y[0], y[1]
        return jnp.stack([1.5 * x - x * z, -3.0 * z + x * z])

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
    ).double()
    for p in net.parameters():
        p.requires_grad_(False)
    Ws = [(jnp.asarray(m.weight.numpy()), jnp.asarray(m.bias.numpy())) for m in net if isinstance(m, torch.nn.Linear)]

    def nn_t(t, y):
        return net(y)

    def nn_j(t, y, args):
        h = jnp.tanh(Ws[0][0] @ y + Ws[0][1])
        h = jnp.tanh(Ws[1][0] @ h + Ws[1][1])
        return Ws[2][0] @ h + Ws[2][1]

    return {
        "lotka_volterra": {"title": "Lotka–Volterra, t in [0, 10]", "t1": 10.0, "y0": y0_lv, "f": lv_t, "fj": lv_j},
        "neural_ode": {"title": "neural ODE (MLP 2-64-64-2, tanh), t in [0, 1]", "t1": 1.0, "y0": y0_nn, "f": nn_t, "fj": nn_j},
    }


def _runners(prob: dict) -> dict[str, Callable[[float], dict]]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchdiffeq

    import diffeqbridge as deb

    f, y0, t1 = prob["f"], prob["y0"], prob["t1"]
    ts = torch.tensor([0.0, t1], dtype=torch.float64)
    with torch.no_grad():
        ref = torchdiffeq.odeint(lambda t, y: f(t, y), y0, ts, method="dopri8", rtol=1e-12, atol=1e-12)[-1].numpy()
    runners: dict[str, Callable[[float], dict]] = {}

    def ours(alg):
        p = deb.ODEProblem(f, y0, (0.0, t1))

        def run(tol):
            sol = deb.solve(p, alg(), atol=tol, rtol=tol, max_steps=100_000)
            return {"y": sol.ys[-1].numpy(), "nfe": float(sol.stats.nf.double().mean())}

        return run

    def tde(method):
        count = {"n": 0}

        def fc(t, y):
            count["n"] += 1
            return f(t, y)

        def run(tol):
            count["n"] = 0
            with torch.no_grad():
                y = torchdiffeq.odeint(fc, y0, ts, method=method, rtol=tol, atol=tol)[-1]
            return {"y": y.numpy(), "nfe": float(count["n"])}

        return run

    def dfx():
        fj = prob["fj"]

        def one(y, tol):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(fj),
                diffrax.Tsit5(),
                0.0,
                t1,
                dt0=None,
                y0=y,
                stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                saveat=diffrax.SaveAt(t1=True),
                max_steps=100_000,
                throw=False,
            )
            return sol.ys[-1], sol.stats["num_steps"]

        batched = jax.jit(jax.vmap(one, in_axes=(0, None)))
        yj = jnp.asarray(y0.numpy())

        def run(tol):
            y, steps = jax.block_until_ready(batched(yj, jnp.asarray(tol)))
            return {"y": np.asarray(y), "nfe": float(np.mean(np.asarray(steps)) * 6 + 1)}

        return run

    runners["ours Tsit5"] = ours(deb.Tsit5)
    runners["ours Dopri5"] = ours(deb.Dopri5)
    runners["torchdiffeq dopri5"] = tde("dopri5")
    import torchdiffeq._impl.odeint as _tde_impl

    if "tsit5" in getattr(_tde_impl, "SOLVERS", {}):  # torchdiffeq 0.2.x has no tsit5
        runners["torchdiffeq tsit5"] = tde("tsit5")
    runners["diffrax Tsit5"] = dfx()
    return runners, ref


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    import numpy as np

    size = size or ("quick" if quick else "full")
    threading = setup_jax(threads)
    B = {"tiny": 8, "quick": 256, "full": 1024}[size]
    tols = {"tiny": [1e-3], "quick": [1e-3, 1e-5, 1e-7], "full": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]}[size]
    repeats = 3 if size == "full" else 1
    probs = _problems(B)
    if size == "tiny":
        probs = {"lotka_volterra": probs["lotka_volterra"]}
    results: dict[str, Any] = {}
    for pname, prob in probs.items():
        runners, ref = _runners(prob)
        runners["diffrax Tsit5"](tols[0])  # compile
        rows: dict[str, list[dict]] = {k: [] for k in runners}
        times: dict[tuple[str, float], list[float]] = {}
        items = [(k, tol) for k in runners for tol in tols]
        for r in range(repeats):
            shift = (r * len(items)) // repeats
            for key, tol in items[shift:] + items[:shift]:
                t = time.perf_counter()
                res = runners[key](tol)
                times.setdefault((key, tol), []).append(time.perf_counter() - t)
                if r == 0:
                    err = float(np.abs(res["y"] - ref).max(axis=1).mean())
                    rows[key].append({"tol": tol, "err": err, "nfe": res["nfe"]})
        for key, lst in rows.items():
            for row in lst:
                ts_ = sorted(times[(key, row["tol"])])
                row["wall_s"] = ts_[len(ts_) // 2]
        matched = []
        ranges = [
            (
                min(r["err"] for k, v in rows.items() if k.startswith(lib) for r in v),
                max(r["err"] for k, v in rows.items() if k.startswith(lib) for r in v),
            )
            for lib in ("ours", "torchdiffeq", "diffrax")
        ]
        for target in Pe.error_targets(ranges):
            e: dict[str, Any] = {"err": target}
            for lib in ("ours", "torchdiffeq", "diffrax"):
                for cost in ("nfe", "wall_s"):
                    cs = [Pe.cost_at([(r[cost], r["err"]) for r in v], target) for k, v in rows.items() if k.startswith(lib)]
                    cs = [c for c in cs if c is not None]
                    e[f"{lib}_{cost}"] = min(cs) if cs else None
            for peer in ("torchdiffeq", "diffrax"):
                for cost in ("nfe", "wall_s"):
                    a, b = e[f"ours_{cost}"], e[f"{peer}_{cost}"]
                    e[f"ratio_{cost}_vs_{peer}"] = a / b if a and b else None
            matched.append(e)
        results[pname] = {"title": prob["title"], "methods": rows, "matched": matched}
        if progress:
            progress(pname)
    payload = {
        "config": {"B": B, "size": size, "tols": tols, "repeats": repeats, "threads": threading, "dtype": "float64"},
        "notes": [
            "torchdiffeq solves the batch as one system (one step size, norm over the batch); "
            "ours and diffrax (vmap) step per sample."
        ],
        "problems": results,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    print(tables(doc)["matched"])
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    results, B = doc["problems"], doc["config"]["B"]
    fig, axes = H.figure(ncols=2, nrows=len(results), size=(5.2, 3.8))
    colors = {"ours": "C0", "torchdiffeq": "C2", "diffrax": "C1"}
    for i, res in enumerate(results.values()):
        for j, cost in enumerate(("nfe", "wall_s")):
            series = {k: ([r[cost] for r in v], [r["err"] for r in v]) for k, v in res["methods"].items()}
            styles = {
                k: {"color": colors[k.split()[0]], "linestyle": "--" if k.lower().endswith("tsit5") else "-", "markersize": 4}
                for k in series
            }
            H.plot_series(
                axes[2 * i + j],
                series,
                xlabel="NFE per sample" if cost == "nfe" else f"wall time, B={B} [s]",
                ylabel="error at T",
                title=res["title"],
                styles=styles,
            )
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``matched``: each library's best NFE per sample and ours / peer wall time at matched errors."""
    rows = [
        (
            pname,
            H.sci(m["err"], 0),
            H.fmt(m["ours_nfe"], "{:.0f}"),
            H.fmt(m["torchdiffeq_nfe"], "{:.0f}"),
            H.fmt(m["diffrax_nfe"], "{:.0f}"),
            H.ratio(m["ratio_wall_s_vs_torchdiffeq"]),
            H.ratio(m["ratio_wall_s_vs_diffrax"]),
        )
        for pname, res in doc["problems"].items()
        for m in res["matched"]
    ]
    header = ["problem", "error", "ours NFE", "torchdiffeq NFE", "diffrax NFE", "time ours/torchdiffeq", "time ours/diffrax"]
    return {"matched": H.markdown_table(header, rows)}


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
