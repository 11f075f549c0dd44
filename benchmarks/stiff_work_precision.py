"""Stiff work-precision: Robertson, HIRES, Van der Pol (ε = 1e-6) and the stiff linear SDE.

Sizes: ``--quick`` runs Robertson and HIRES at tol 1e-4, 1e-6 (under a minute); the full run
adds Van der Pol and tolerances 1e-3 .. 1e-9; ``--tiny`` Robertson at 1e-4 only.

ODEs (one sample, float64, rtol = tol, atol = 1e-2 tol): ours ``Rodas4``, ``Kvaerno5`` and
``AutoTsit5(Rodas4())``; diffrax ``Kvaerno5`` and ``KenCarp4`` with
``PIDController(rtol, atol, pcoeff=0.3, icoeff=0.4)`` (diffrax's suggestion for implicit
solvers; KenCarp4 with the whole field as its implicit term); torchdiffeq's only implicit solver,
``implicit_adams`` (fixed step, functional
iteration) at a few fixed step counts.  Error: max relative error over the components at T
against the Hairer/Wanner test-set references (RADAU at 1e-18, as in tests/test_stiff_ode.py).
Cost: accepted + rejected steps for everyone; drift evaluations (NFE) where countable (ours
per sample, torchdiffeq calls; diffrax does not expose them); wall time.

SDE: dX = -1000 X dt + X dW on [0, 1] (E X² = e^{-1999 t}), 64 paths: for each method the
step sizes tried, whether every path stayed bounded (|X_T| < 1), and the drift evaluations
per path.  EM (ours), torchsde ``euler`` and diffrax ``Euler`` need dt < about 2/|λ| = 0.002
(mean-square stability of EM: |1 + λ dt|² + μ² dt < 1); ours ``ImplicitEM`` and ``SROCK1``
stay bounded at dt = 0.1.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
    from ._stiff_problems import REFERENCES, fields
    from .sde_work_precision import setup_jax
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks._stiff_problems import REFERENCES, fields  # type: ignore[no-redef]
    from benchmarks.sde_work_precision import setup_jax  # type: ignore[no-redef]

NAME = "stiff_work_precision"


def _rel_err(y: Any, ref: list[float]) -> float:
    import numpy as np

    y = np.asarray(y, dtype=np.float64).reshape(-1)
    r = np.asarray(ref)
    e = float(np.max(np.abs(y - r) / np.abs(r)))
    return e if math.isfinite(e) else float("inf")


def _ode(size: str) -> dict[str, Any]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchdiffeq

    import diffeqbridge as deb

    tols = {"tiny": [1e-4], "quick": [1e-4, 1e-6], "full": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]}[size]
    names = {"tiny": ["robertson"], "quick": ["robertson", "hires"], "full": list(REFERENCES)}[size]
    tf = fields(lambda xs: torch.stack(xs, -1))
    jf = fields(lambda xs: jnp.stack(xs, -1))
    results: dict[str, Any] = {}
    for name in names:
        T, y0, ref = REFERENCES[name]
        rows: dict[str, list[dict]] = {}
        prob = deb.ODEProblem(tf[name], torch.tensor([y0], dtype=torch.float64), (0.0, T))
        for label, make in (
            ("ours Rodas4", deb.Rodas4),
            ("ours Kvaerno5", deb.Kvaerno5),
            ("ours AutoTsit5(Rodas4)", lambda: deb.AutoTsit5(deb.Rodas4())),
        ):
            rows[label] = []
            for tol in tols:
                start = time.perf_counter()
                sol = deb.solve(prob, make(), rtol=tol, atol=1e-2 * tol, max_steps=100_000)
                wall = time.perf_counter() - start
                print(f"  {name} {label} tol={tol:g}: {wall:.2f} s", file=sys.stderr, flush=True)
                rows[label].append(
                    {
                        "tol": tol,
                        "err": _rel_err(sol.ys[-1, 0].numpy(), ref),
                        "steps": int(sol.stats.nsteps[0]),
                        "nfe": int(sol.stats.nf[0]),
                        "wall_s": wall,
                        "success": bool(sol.success),
                    }
                )
        f_j = jf[name]
        for label, solver in (("diffrax Kvaerno5", diffrax.Kvaerno5()), ("diffrax KenCarp4", diffrax.KenCarp4())):

            def one(rtol, atol, solver=solver, field=f_j, t_end=T, start_state=y0):
                term = diffrax.ODETerm(lambda t, u, args: field(t, u))
                if isinstance(solver, diffrax.KenCarp4):  # IMEX: everything in the implicit part
                    term = diffrax.MultiTerm(diffrax.ODETerm(lambda t, u, args: jnp.zeros_like(u)), term)
                sol = diffrax.diffeqsolve(
                    term,
                    solver,
                    0.0,
                    t_end,
                    dt0=None,
                    y0=jnp.asarray(start_state, dtype=jnp.float64),
                    stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4),
                    saveat=diffrax.SaveAt(t1=True),
                    max_steps=100_000,
                    throw=False,
                )
                return sol.ys[-1], sol.stats["num_steps"], sol.stats["num_rejected_steps"]

            fn = jax.jit(one)
            jax.block_until_ready(fn(tols[0], 1e-2 * tols[0]))  # compile
            rows[label] = []
            for tol in tols:
                start = time.perf_counter()
                y_end, steps, rej = jax.block_until_ready(fn(tol, 1e-2 * tol))
                wall = time.perf_counter() - start
                rows[label].append(
                    {
                        "tol": tol,
                        "err": _rel_err(np.asarray(y_end), ref),
                        "steps": int(steps) + int(rej),
                        "nfe": None,
                        "wall_s": wall,
                    }
                )
        # torchdiffeq implicit_adams: fixed step, a few step counts (cheap ones only)
        rows["torchdiffeq implicit_adams"] = []
        counts = {"tiny": [100], "quick": [200], "full": [200, 2000, 20000]}[size]
        y0_t = torch.tensor(y0, dtype=torch.float64)
        for n in counts:
            calls = {"n": 0}

            def fc(t, u, f=tf[name], calls=calls):
                calls["n"] += 1
                return f(t, u)

            start = time.perf_counter()
            try:
                import warnings

                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "Functional iteration did not converge"
                    y = torchdiffeq.odeint(
                        fc,
                        y0_t,
                        torch.tensor([0.0, T], dtype=torch.float64),
                        method="implicit_adams",
                        options={"step_size": T / n},
                    )[-1]
                err = _rel_err(y.numpy(), ref)
            except Exception:  # noqa: BLE001 - a diverging peer is a result, not an error
                err = float("inf")
            rows["torchdiffeq implicit_adams"].append(
                {"steps": n, "err": err, "nfe": calls["n"], "wall_s": time.perf_counter() - start}
            )
        results[name] = {"T": T, "methods": rows}
    return results


def _sde(size: str) -> dict[str, Any]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchsde

    import diffeqbridge as deb

    lam, mu, B = -1000.0, 1.0, {"tiny": 4, "quick": 64, "full": 256}[size]
    dts = {
        "tiny": [0.1, 0.001],
        "quick": [0.1, 0.01, 0.0015, 0.001],
        "full": [0.1, 0.03, 0.01, 0.003, 0.002, 0.0015, 0.001, 0.0005],
    }[size]
    prob = deb.SDEProblem(lambda t, y: lam * y, lambda t, y: mu * y, torch.ones(B, 1, dtype=torch.float64), tspan=(0.0, 1.0))
    rows: dict[str, list[dict]] = {}

    def record(label: str, dt: float, y_end: Any, nfe: float, wall: float) -> None:
        y = np.asarray(y_end, dtype=np.float64)
        bounded = bool(np.all(np.isfinite(y)) and np.max(np.abs(y)) < 1.0)
        rows.setdefault(label, []).append(
            {"dt": dt, "bounded": bounded, "max_abs_XT": float(np.nanmax(np.abs(y))), "nfe": nfe, "wall_s": wall}
        )

    for label, make in (("ours EM", deb.EM), ("ours ImplicitEM", deb.ImplicitEM), ("ours SROCK1", deb.SROCK1)):
        for dt in dts:
            start = time.perf_counter()
            sol = deb.solve(prob, make(), dt=dt, adaptive=False, seed=0, max_steps=10_000)
            record(label, dt, sol.ys[-1].numpy(), float(sol.stats.nf.double().mean()), time.perf_counter() - start)

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return lam * y

        def g(self, t, y):
            return mu * y

    for dt in dts:
        start = time.perf_counter()
        with torch.no_grad():
            bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, 1), dtype=torch.float64, entropy=0)
            ys = torchsde.sdeint(
                SDE(), torch.ones(B, 1, dtype=torch.float64), torch.tensor([0.0, 1.0]), bm=bm, method="euler", dt=dt
            )
        record("torchsde euler", dt, ys[-1].numpy(), round(1.0 / dt), time.perf_counter() - start)

    def solve_dfx(dt, key):
        bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=dt / 4, shape=(1,), key=key)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: lam * y), diffrax.ControlTerm(lambda t, y, a: (mu * y)[:, None], bm)
        )
        return diffrax.diffeqsolve(
            terms, diffrax.Euler(), 0.0, 1.0, dt0=dt, y0=jnp.ones(1), saveat=diffrax.SaveAt(t1=True), max_steps=20_000
        ).ys[-1]

    keys = jax.random.split(jax.random.PRNGKey(0), B)
    for dt in dts:
        fn = jax.jit(jax.vmap(lambda k, dt=dt: solve_dfx(dt, k)))
        start = time.perf_counter()
        y = jax.block_until_ready(fn(keys))
        record("diffrax Euler", dt, np.asarray(y), round(1.0 / dt), time.perf_counter() - start)
    # the largest dt at which each method kept every path bounded, and its cost
    stable = {}
    for label, lst in rows.items():
        ok = [r for r in lst if r["bounded"]]
        best = max(ok, key=lambda r: r["dt"]) if ok else None
        stable[label] = None if best is None else {"dt": best["dt"], "nfe": best["nfe"]}
    return {"lambda": lam, "mu": mu, "B": B, "methods": rows, "largest_stable_dt": stable}


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    size = size or ("quick" if quick else "full")
    threading = setup_jax(threads)
    ode = _ode(size)
    sde = _sde(size)
    payload = {
        "config": {"size": size, "threads": threading, "dtype": "float64"},
        "notes": [
            "diffrax NFE is not exposed: compare steps (accepted + rejected) and wall time.",
            "torchdiffeq implicit_adams is fixed-step with functional iteration (no Newton).",
        ],
        "ode": ode,
        "sde": sde,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    table = []
    for name, res in ode.items():
        for label, lst in res["methods"].items():
            for r in lst:
                table.append(
                    (
                        name,
                        label,
                        f"{r.get('tol', '—')}",
                        f"{r['err']:.2g}",
                        r["steps"],
                        "—" if r["nfe"] is None else r["nfe"],
                        f"{r['wall_s']:.3f}",
                    )
                )
    print(H.markdown_table(["problem", "method", "tol", "rel. err", "steps", "NFE", "wall s"], table))
    print(
        H.markdown_table(
            ["SDE method", "largest bounded dt", "NFE/path there"],
            [
                (k, "—" if v is None else v["dt"], "—" if v is None else f"{v['nfe']:.0f}")
                for k, v in sde["largest_stable_dt"].items()
            ],
        )
    )
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    ode, sde = doc["ode"], doc["sde"]
    fig, axes = H.figure(ncols=len(ode) + 1, nrows=1, size=(4.8, 3.8))
    colors = {"ours": "C0", "diffrax": "C1", "torchdiffeq": "C2"}
    for ax, (name, res) in zip(axes, ode.items()):
        series = {
            k: ([r["steps"] for r in v], [r["err"] if math.isfinite(r["err"]) else None for r in v])
            for k, v in res["methods"].items()
        }
        styles = {
            k: {"color": colors[k.split()[0]], "linestyle": "--" if "Kenc" in k or "Auto" in k else "-", "markersize": 4}
            for k in series
        }
        H.plot_series(
            ax,
            series,
            xlabel="steps (accepted + rejected)",
            ylabel="max relative error at T",
            title=f"{name}, T = {res['T']:g}",
            styles=styles,
        )
    ax = axes[len(ode)]
    sde_series = {
        k: ([r["dt"] for r in v], [r["max_abs_XT"] if math.isfinite(r["max_abs_XT"]) else 1e300 for r in v])
        for k, v in sde["methods"].items()
    }
    H.plot_series(ax, sde_series, xlabel="dt", ylabel="max |X_T| over paths", title="dX = -1000 X dt + X dW: bounded?")
    return fig


LABELS = {"robertson": "Robertson", "hires": "HIRES", "vanderpol": "Van der Pol"}


def tables(doc: dict) -> dict[str, str]:
    """``ode``: steps and error per problem and tolerance (adaptive methods); ``sde``: largest bounded dt."""
    ode = doc["ode"]
    methods = [m for res in ode.values() for m, lst in res["methods"].items() if lst and "tol" in lst[0]]
    methods = list(dict.fromkeys(methods))
    rows = []
    for name, res in ode.items():
        tols = sorted({r["tol"] for lst in res["methods"].values() for r in lst if "tol" in r}, reverse=True)
        for tol in tols:
            cells = []
            for m in methods:
                hit = [r for r in res["methods"].get(m, []) if r.get("tol") == tol]
                cells.append("—" if not hit else f"{hit[0]['steps']}, {H.sci(hit[0]['err'])}")
            rows.append((f"{LABELS.get(name, name)} {H.sci(tol, 0)}", *cells))
    sde = [
        (k, H.fmt(None if v is None else v["dt"], "{:g}"), H.fmt(None if v is None else v["nfe"], "{:.0f}"))
        for k, v in doc["sde"]["largest_stable_dt"].items()
    ]
    return {
        "ode": H.markdown_table(["problem, tol (steps, max rel. error)", *methods], rows),
        "sde": H.markdown_table(["method", "largest bounded dt", "NFE/path"], sde),
    }


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
