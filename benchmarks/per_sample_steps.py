"""Per-sample vs shared step size on batches whose samples differ widely in stiffness/scale.

* ODE (Prothero–Robinson): y' = -lam_i (y - cos t) - sin t, y(0) = 1, t in [0, 2], exact
  y = cos t, with lam_i log-spaced over 3 decades (1 .. 1000).  Ours: Tsit5 with per-sample
  steps; torchdiffeq: dopri5 on the whole batch (one shared step, what it does); diffrax:
  Tsit5 under vmap (per-sample).  Error: max over samples of |y(T) - cos T|.
* SDE: GBM du = 1.01 u dt + sigma_i u dW, u0 = 1/2, with 8 values of sigma_i log-spaced over
  0.1 .. 2 (B/8 paths each).  Ours: SOSRI, per-sample adaptive; torchsde: adaptive srk
  (shared step).  Same Brownian path for both.  Error: max over the 8 sigma groups of the
  group's mean strong error at T.

"NFE total" = drift + diffusion evaluations summed over samples: ours counts each sample's
own evaluations; shared-step peers evaluate every sample at every step (batch calls x B).
Ours masks finished samples instead of removing them, so the work it actually does is the
number of loop iterations x B ("batch work"), reported alongside: per-sample steps save
compute only where the engine compacts the batch.  Totals are compared at equal error
(log-log interpolation over the tolerance sweep).
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
    from ._sde_problems import CountingSDE, torchsde_brownian_from, torchsde_module
    from .sde_work_precision import setup_jax
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks import _peers as Pe  # type: ignore[no-redef]
    from benchmarks._sde_problems import CountingSDE, torchsde_brownian_from, torchsde_module  # type: ignore[no-redef]
    from benchmarks.sde_work_precision import setup_jax  # type: ignore[no-redef]

NAME = "per_sample_steps"
ODE_T1 = 2.0
GROUPS = 8


def _ode(B: int, tols: list[float]) -> dict[str, list[dict]]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchdiffeq

    import diffeqbridge as deb

    lam = torch.logspace(0, 3, B, dtype=torch.float64)

    def f(t, y):
        tt = t.reshape(-1, *([1] * (y.ndim - 1))) if t.ndim else t
        return -lam.reshape(-1, 1) * (y - torch.cos(tt)) - torch.sin(tt)

    y0 = torch.ones(B, 1, dtype=torch.float64)
    exact = math.cos(ODE_T1)
    rows: dict[str, list[dict]] = {
        "ours Tsit5 (per-sample)": [],
        "torchdiffeq dopri5 (shared)": [],
        "diffrax Tsit5 (vmap, per-sample)": [],
    }

    def fj(t, y, lam_i):
        return -lam_i * (y - jnp.cos(t)) - jnp.sin(t)

    def one(lam_i, tol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(fj),
            diffrax.Tsit5(),
            0.0,
            ODE_T1,
            dt0=None,
            y0=jnp.ones(1),
            args=lam_i,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=100_000,
            throw=False,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    dfx = jax.jit(jax.vmap(one, in_axes=(0, None)))
    lam_j = jnp.asarray(lam.numpy())
    jax.block_until_ready(dfx(lam_j, jnp.asarray(tols[0])))
    prob = deb.ODEProblem(f, y0, (0.0, ODE_T1))
    for tol in tols:
        t = time.perf_counter()
        sol = deb.solve(prob, deb.Tsit5(), atol=tol, rtol=tol, max_steps=100_000)
        wall = time.perf_counter() - t
        nf = sol.stats.nf
        rows["ours Tsit5 (per-sample)"].append(
            {
                "tol": tol,
                "err": float((sol.ys[-1] - exact).abs().max()),
                "nfe_total": float(nf.sum()),
                "batch_work": float(nf.max()) * B,
                "wall_s": wall,
            }
        )
        count = {"n": 0}

        def fc(t, y):
            count["n"] += 1  # noqa: B023 (fc is called within this iteration)
            return f(t.expand(B), y)

        t = time.perf_counter()
        with torch.no_grad():
            y = torchdiffeq.odeint(fc, y0, torch.tensor([0.0, ODE_T1], dtype=torch.float64), method="dopri5", rtol=tol, atol=tol)[
                -1
            ]
        wall = time.perf_counter() - t
        rows["torchdiffeq dopri5 (shared)"].append(
            {
                "tol": tol,
                "err": float((y - exact).abs().max()),
                "nfe_total": float(count["n"] * B),
                "batch_work": float(count["n"] * B),
                "wall_s": wall,
            }
        )
        t = time.perf_counter()
        yj, steps = jax.block_until_ready(dfx(lam_j, jnp.asarray(tol)))
        wall = time.perf_counter() - t
        steps = np.asarray(steps)
        rows["diffrax Tsit5 (vmap, per-sample)"].append(
            {
                "tol": tol,
                "err": float(np.abs(np.asarray(yj) - exact).max()),
                "nfe_total": float((steps * 6 + 1).sum()),
                "batch_work": float((steps.max() * 6 + 1) * B),
                "wall_s": wall,
            }
        )
    return rows


def _sde(B: int, tols: list[float]) -> dict[str, list[dict]]:
    import torch
    import torchsde

    import diffeqbridge as deb

    sig = (
        torch.logspace(math.log10(0.1), math.log10(2.0), GROUPS, dtype=torch.float64)
        .repeat_interleave(B // GROUPS)
        .reshape(-1, 1)
    )
    B = sig.shape[0]
    mu, u0 = 1.01, 0.5
    y0 = torch.full((B, 1), u0, dtype=torch.float64)
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, 1), seed=0, tol=Pe.TREE_TOL)
    exact = u0 * torch.exp((mu - 0.5 * sig**2) + sig * tree.W(1.0))

    def err_of(y):
        e = (y - exact).abs().reshape(GROUPS, -1).mean(dim=1)
        return float(e.max())

    prob = deb.SDEProblem(lambda t, y: mu * y, lambda t, y: sig * y, y0, (0.0, 1.0), noise="diagonal")

    sde = CountingSDE(torchsde_module(lambda t, y: mu * y, lambda t, y: sig * y, "diagonal"))
    bm = torchsde_brownian_from(tree)
    rows: dict[str, list[dict]] = {"ours SOSRI (per-sample)": [], "torchsde srk adaptive (shared)": []}
    for tol in tols:
        t = time.perf_counter()
        sol = deb.solve(prob, deb.SOSRI(), atol=tol, rtol=tol, brownian=tree)
        wall = time.perf_counter() - t
        n = sol.stats.nf + sol.stats.ng
        rows["ours SOSRI (per-sample)"].append(
            {"tol": tol, "err": err_of(sol.ys[-1]), "nfe_total": float(n.sum()), "batch_work": float(n.max()) * B, "wall_s": wall}
        )
        sde.reset()
        t = time.perf_counter()
        with torch.no_grad():
            ys = torchsde.sdeint(
                sde.module,
                y0,
                torch.tensor([0.0, 1.0], dtype=torch.float64),
                bm=bm,
                method="srk",
                adaptive=True,
                dt=Pe.ADAPTIVE_DT0,
                rtol=tol,
                atol=tol,
                dt_min=1e-6,
            )
        wall = time.perf_counter() - t
        rows["torchsde srk adaptive (shared)"].append(
            {"tol": tol, "err": err_of(ys[-1]), "nfe_total": float(sde.nfe * B), "batch_work": float(sde.nfe * B), "wall_s": wall}
        )
    return rows


def _matched(rows: dict[str, list[dict]], base: str) -> list[dict]:
    ranges = [(min(r["err"] for r in v), max(r["err"] for r in v)) for v in rows.values()]
    out = []
    for target in Pe.error_targets(ranges, per_decade=2):
        e: dict[str, Any] = {"err": target}
        for k, v in rows.items():
            e[k] = {c: Pe.cost_at([(r[c], r["err"]) for r in v], target) for c in ("nfe_total", "batch_work", "wall_s")}
        for k in rows:
            if k != base:
                e[f"ratio nfe_total {base} / {k}"] = (
                    (e[base]["nfe_total"] / e[k]["nfe_total"]) if e[base]["nfe_total"] and e[k]["nfe_total"] else None
                )
                e[f"ratio batch_work {base} / {k}"] = (
                    (e[base]["batch_work"] / e[k]["batch_work"]) if e[base]["batch_work"] and e[k]["batch_work"] else None
                )
        out.append(e)
    return out


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    size = size or ("quick" if quick else "full")
    threading = setup_jax(threads)
    B = {"tiny": 16, "quick": 256, "full": 1024}[size]
    ode_tols = {"tiny": [1e-3], "quick": [1e-3, 1e-5, 1e-7], "full": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]}[size]
    sde_tols = {"tiny": [1e-1], "quick": [10**-1, 10**-1.5, 10**-2], "full": [10**-1, 10**-1.5, 10**-2, 10**-2.5, 10**-3]}[size]
    results = {}
    ode = _ode(B, ode_tols)
    results["ode_prothero_robinson"] = {"methods": ode, "matched": _matched(ode, "ours Tsit5 (per-sample)")}
    if progress:
        progress("ode")
    sde = _sde(B, sde_tols)
    results["sde_gbm_sigma_spread"] = {"methods": sde, "matched": _matched(sde, "ours SOSRI (per-sample)")}
    if progress:
        progress("sde")
    payload = {
        "config": {
            "B": B,
            "size": size,
            "ode_tols": ode_tols,
            "sde_tols": sde_tols,
            "threads": threading,
            "lambda": "logspace(1, 1000, B)",
            "sigma": f"{GROUPS} values logspace(0.1, 2)",
        },
        "notes": [
            "nfe_total: evaluations summed over samples "
            "(per-sample counts for ours/diffrax, batch calls x B for shared-step peers).",
            "batch_work: what is computed: ours and diffrax(vmap) evaluate masked (finished) samples too -> max steps x B.",
        ],
        "problems": results,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    for pname, res in results.items():
        print(pname)
        for m in res["matched"]:
            print(
                f"  err {m['err']:.1e}: "
                + ", ".join(f"{k}={v:.3g}" for k, v in m.items() if k.startswith("ratio") and v is not None)
            )
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    results = doc["problems"]
    fig, axes = H.figure(ncols=2, size=(5.5, 4.2))
    colors = ["C0", "C2", "C1"]
    for ax, (pname, res) in zip(axes, results.items()):
        series, styles = {}, {}
        for i, (k, v) in enumerate(res["methods"].items()):
            series[f"{k}: NFE total"] = ([r["nfe_total"] for r in v], [r["err"] for r in v])
            styles[f"{k}: NFE total"] = {"color": colors[i]}
            if "per-sample" in k:
                series[f"{k}: batch work"] = ([r["batch_work"] for r in v], [r["err"] for r in v])
                styles[f"{k}: batch work"] = {"color": colors[i], "linestyle": ":", "marker": "x"}
        H.plot_series(ax, series, xlabel="evaluations summed over the batch", ylabel="max error", title=pname, styles=styles)
        ax.legend(fontsize=6)
    return fig


def _column(key: str) -> str:
    """``"ratio nfe_total ours X (per-sample) / peer Y (shared)"`` -> ``"NFE ours / peer Y"``."""
    kind, _, pair = key.removeprefix("ratio ").partition(" ")
    peer = pair.split(" / ")[1].split(" (")[0]
    return f"{'NFE' if kind == 'nfe_total' else 'batch work'} ours / {peer}"


def tables(doc: dict) -> dict[str, str]:
    """``matched``: ours / peer in evaluations summed over the batch and in batch work, at matched max errors."""
    rows, header = [], ["problem", "max error"]
    for pname, res in doc["problems"].items():
        for m in res["matched"]:
            keys = [k for k in m if k.startswith("ratio ")]
            cols = [_column(k) for k in keys]
            header += [c for c in cols if c not in header]
            rows.append((pname, H.sci(m["err"]), {c: H.fmt(m[k], "{:.2f}") for c, k in zip(cols, keys)}))
    body = [(p, e, *(cells.get(c, "—") for c in header[2:])) for p, e, cells in rows]
    return {"matched": H.markdown_table(header, body)}


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
