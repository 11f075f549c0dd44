"""Solver adapters shared by the SDE benchmarks: one callable per (library, method, setting).

Each ``make_*`` returns ``run(level) -> dict(err=..., nfe=..., y=..., w=...)`` where ``level``
is a step size (fixed-step methods) or a tolerance (adaptive ones, ``rtol = atol = level``).
``nfe`` is drift + diffusion evaluations per path (mean over paths for per-sample steppers).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._sde_problems import T0, T1, CountingSDE, Problem, torchsde_brownian_from

TREE_TOL = 2.0**-20  # finest resolution of every Brownian tree (ours and diffrax alike)
ADAPTIVE_DT0 = 0.05  # initial step of the peers' adaptive solves (ours picks its own)

# diffrax: drift + diffusion evaluations per step (2 x stages; ItoMilstein adds one JVP of g)
DIFFRAX_EVALS = {"Euler": 2, "ItoMilstein": 3, "SPaRK": 6, "GeneralShARK": 6, "ShARK": 4, "SRA1": 4, "SlowRK": 14}
STRATONOVICH_DIFFRAX = {"SPaRK", "GeneralShARK", "SlowRK"}


def strong_error(y_end, exact_end) -> float:
    """Mean over paths of the max-abs error over components at ``T``."""
    import numpy as np

    d = np.abs(np.asarray(y_end, dtype=np.float64) - np.asarray(exact_end, dtype=np.float64)).reshape(len(y_end), -1)
    return float(d.max(axis=1).mean())


# ---------------------------------------------------------------------------- ours
def make_ours(P: Problem, B: int, alg_name: str, adaptive: bool, seed: int = 0) -> Callable[[float], dict]:
    import torch

    import diffeqbridge as deb

    prob = P.ours(B)
    bm = deb.VirtualBrownianTree(T0, T1, (B, P.noise_dim), seed=seed, tol=TREE_TOL, dtype=torch.float64)
    w_end = bm.W(T1)
    exact_end = P.exact(T1, w_end)
    name, _, variant = alg_name.partition("-")  # "SOSRI-sciml": StochasticDiffEq's error estimate
    cls = getattr(deb, name)

    def alg() -> Any:
        return cls(error_estimate=variant) if variant else cls()

    def run(level: float) -> dict:
        kw: dict[str, Any] = {"atol": level, "rtol": level} if adaptive else {"dt": level}
        sol = deb.solve(prob, alg(), brownian=bm, max_steps=200_000, **kw)
        ok = sol.retcodes == int(deb.ReturnCode.Success)
        return {
            "y": sol.ys[-1],
            "err": strong_error(sol.ys[-1].numpy(), exact_end.numpy()),
            "nfe": float((sol.stats.nf + sol.stats.ng).double().mean()),
            "failed": int((~ok).sum()),
        }

    return run


# ------------------------------------------------------------------------ torchsde
def make_torchsde(P: Problem, B: int, method: str, adaptive: bool, seed: int = 0) -> Callable[[float], dict]:
    import torch
    import torchsde

    import diffeqbridge as deb

    bm_tree = deb.VirtualBrownianTree(T0, T1, (B, P.noise_dim), seed=seed, tol=TREE_TOL, dtype=torch.float64)
    bm = torchsde_brownian_from(bm_tree)
    exact_end = P.exact(T1, bm_tree.W(T1)).numpy()
    sde = CountingSDE(P.torchsde(B))
    y0 = P.ours(B).y0
    ts = torch.tensor([T0, T1], dtype=torch.float64)
    options = {"grad_free": True} if method == "milstein" else None

    def run(level: float) -> dict:
        sde.reset()
        kw: dict[str, Any] = {"dt": ADAPTIVE_DT0, "adaptive": True, "rtol": level, "atol": level, "dt_min": 1e-6} if adaptive else {"dt": level}
        with torch.no_grad():
            ys = torchsde.sdeint(sde.module, y0, ts, bm=bm, method=method, options=options, **kw)
        return {"y": ys[-1], "err": strong_error(ys[-1].numpy(), exact_end), "nfe": float(sde.nfe), "failed": 0}

    return run


# ------------------------------------------------------------------------- diffrax
def make_diffrax(P: Problem, B: int, solver_name: str, adaptive: bool, seed: int = 0) -> Callable[[float], dict]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np

    strat = solver_name in STRATONOVICH_DIFFRAX
    f, g = P.diffrax_terms(strat)
    if P.noise != "scalar":
        g_raw = g

        def g(t, y, a):  # diagonal noise as a diagonal linear operator
            return lx.DiagonalLinearOperator(g_raw(t, y, a))

    levy = diffrax.SpaceTimeLevyArea if solver_name not in ("Euler", "ItoMilstein") else None
    solver = getattr(diffrax, solver_name)()
    y0 = jnp.asarray(P.u0, dtype=jnp.float64)
    m = P.noise_dim

    def one(key, level):
        kw = {"levy_area": levy} if levy is not None else {}
        bm = diffrax.VirtualBrownianTree(T0, T1, tol=TREE_TOL, shape=(m,), key=key, **kw)
        terms = diffrax.MultiTerm(diffrax.ODETerm(f), diffrax.ControlTerm(g, bm))
        if adaptive:
            ctrl = diffrax.PIDController(rtol=level, atol=level)
            dt0 = ADAPTIVE_DT0
        else:
            ctrl = diffrax.ConstantStepSize()
            dt0 = level
        sol = diffrax.diffeqsolve(terms, solver, T0, T1, dt0=dt0, y0=y0, stepsize_controller=ctrl,
                                  saveat=diffrax.SaveAt(t1=True), max_steps=2**16, throw=False)
        w = bm.evaluate(T0, T1)
        return sol.ys[-1], w, sol.stats["num_steps"], sol.result == diffrax.RESULTS.successful

    batched = jax.jit(jax.vmap(one, in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(seed + 1), B)
    per_step = DIFFRAX_EVALS[solver_name]

    def run(level: float) -> dict:
        y, w, steps, ok = jax.block_until_ready(batched(keys, jnp.asarray(level, dtype=jnp.float64)))
        y, w = np.asarray(y), np.asarray(w)
        return {
            "y": y,
            "err": strong_error(y, P.exact_np(T1, w)),
            "nfe": float(np.mean(np.asarray(steps)) * per_step),
            "failed": int((~np.asarray(ok)).sum()),
        }

    return run


# ------------------------------------------------------------------ matched levels
def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(cost, err) points -> the lower-left front sorted by cost (error strictly falling)."""
    pts = sorted((c, e) for c, e in points if c is not None and e is not None and math.isfinite(e) and e > 0)
    front: list[tuple[float, float]] = []
    for c, e in pts:
        if not front or e < front[-1][1]:
            front.append((c, e))
    return front


def cost_at(points: list[tuple[float, float]], target: float) -> float | None:
    """Least cost reaching error ``target``, log-log interpolated on the Pareto front; None outside."""
    front = pareto(points)
    if not front or front[-1][1] > target:
        return None
    if front[0][1] <= target:
        return front[0][0]
    for (c0, e0), (c1, e1) in zip(front, front[1:]):
        if e0 >= target >= e1:
            s = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(c0) + s * (math.log(c1) - math.log(c0)))
    return None


def error_targets(ranges: list[tuple[float, float]], per_decade: int = 1) -> list[float]:
    """Error levels 10^k (and 10^(k+1/2) when per_decade=2) covered by every ``(lo, hi)`` range."""
    lo = max(r[0] for r in ranges)
    hi = min(r[1] for r in ranges)
    if not (lo < hi):
        return []
    out = []
    k = math.floor(math.log10(lo) * per_decade)
    while 10 ** (k / per_decade) <= hi:
        v = 10 ** (k / per_decade)
        if lo <= v <= hi:
            out.append(v)
        k += 1
    return out
