"""Solver adapters shared by the SDE benchmarks: one callable per (library, method, setting).

Each ``make_*`` returns ``run(level) -> dict(err=..., nfe=..., y=..., w=...)`` where ``level``
is a step size (fixed-step methods) or a tolerance (adaptive ones, ``rtol = atol = level``).
``nfe`` is drift + diffusion evaluations per path (mean over paths for per-sample steppers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._sde_problems import CountingSDE, Problem, torchsde_brownian_from

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
def make_ours(
    P: Problem, B: int, alg_name: str, adaptive: bool, seed: int = 0, compile: bool = False, check_every: int | None = None
) -> Callable[[float], dict]:
    """``compile``: ``solve(..., compile=True)`` (the iteration through ``torch.compile``), with
    ``check_every`` iterations per compiled call (None: the default)."""

    import diffeqbridge as deb

    name, _, variant = alg_name.partition("-")  # "SOSRI-sciml": StochasticDiffEq's error estimate
    strat = variant == "strat"  # "SPaRK-strat": the Stratonovich form of the same SDE (as diffrax's SPaRK gets)
    if strat and P.ours_strat is None:
        raise ValueError(f"{P.name} has no Stratonovich form")
    prob = P.ours_strat(B) if strat else P.ours(B)  # type: ignore[misc]
    bm = our_tree(P, B, seed)
    exact_end = reference_ours(P, P.ours(B), bm, seed)
    cls = getattr(deb, name)

    def alg() -> Any:
        return cls(error_estimate=variant) if variant and not strat else cls()

    def run(level: float) -> dict:
        kw: dict[str, Any] = {"atol": level, "rtol": level} if adaptive else {"dt": level, "adaptive": False}
        sol = deb.solve(prob, alg(), brownian=bm, max_steps=200_000, compile=compile, check_every=check_every, **kw)
        ok = sol.retcodes == int(deb.ReturnCode.Success)
        return {
            "y": sol.ys[-1],
            "err": strong_error(sol.ys[-1].numpy(), exact_end.numpy()),
            "nfe": float((sol.stats.nf + sol.stats.ng).double().mean()),
            "failed": int((~ok).sum()),
        }

    return run


def our_tree(P: Problem, B: int, seed: int = 0) -> Any:
    """Our Brownian tree over the problem's interval (ours and torchsde share it)."""
    import torch

    import diffeqbridge as deb

    lo, hi = sorted(P.tspan)
    return deb.VirtualBrownianTree(lo, hi, (B, P.noise_dim), seed=seed, tol=TREE_TOL, dtype=torch.float64)


_REFERENCES: dict[tuple[str, int, int], Any] = {}


def reference_ours(P: Problem, prob: Any, bm: Any, seed: int = 0) -> Any:
    """``(B, dim)`` solution at the end of ``P.tspan`` on ``bm``'s path (``our_tree(P, B, seed)``):
    the closed form, or a fine fixed-step ShARK solve (``P.reference_dt``, cached) when there is none."""
    import diffeqbridge as deb

    t_end = P.tspan[1]
    if P.exact is not None:
        return P.exact(t_end, bm.W(t_end) - bm.W(P.tspan[0]))
    key = (P.name, prob.y0.shape[0], seed)
    if key not in _REFERENCES:
        _REFERENCES[key] = deb.solve(prob, deb.ShARK(), brownian=bm, dt=P.reference_dt, adaptive=False, max_steps=10**7).ys[-1]
    return _REFERENCES[key]


# ------------------------------------------------------------------------ torchsde
def make_torchsde(P: Problem, B: int, method: str, adaptive: bool, seed: int = 0) -> Callable[[float], dict]:
    import torch
    import torchsde

    bm_tree = our_tree(P, B, seed)
    bm = torchsde_brownian_from(bm_tree, reverse_from=P.tspan[0] if P.reversed else None)
    exact_end = reference_ours(P, P.ours(B), bm_tree, seed).numpy()
    sde = CountingSDE(P.torchsde(B))
    y0 = P.ours(B).y0
    ts = torch.tensor([0.0, abs(P.tspan[1] - P.tspan[0])] if P.reversed else list(P.tspan), dtype=torch.float64)
    options = {"grad_free": True} if method == "milstein" else None

    def run(level: float) -> dict:
        sde.reset()
        kw: dict[str, Any] = (
            {"dt": ADAPTIVE_DT0, "adaptive": True, "rtol": level, "atol": level, "dt_min": 1e-6} if adaptive else {"dt": level}
        )
        with torch.no_grad():
            ys = torchsde.sdeint(sde.module, y0, ts, bm=bm, method=method, options=options, **kw)
        return {"y": ys[-1], "err": strong_error(ys[-1].numpy(), exact_end), "nfe": float(sde.nfe), "failed": 0}

    return run


# ------------------------------------------------------------------------- diffrax
# (problem name, B, seed) -> diffrax's reference solution at T on its paths (keys from the seed);
# the fine fixed-step ShARK solve does not depend on the method compared, so it is made once
_DIFFRAX_REFERENCES: dict[tuple[str, int, int], Any] = {}


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
    m = P.noise_dim
    # reversed problems: forward in s = t0 - t (P.diffrax_terms is written in s)
    s0, s1 = (0.0, abs(P.tspan[1] - P.tspan[0])) if P.reversed else P.tspan
    y0s = jnp.asarray(P.y0_batch(B) if P.y0_batch is not None else np.tile(np.asarray(P.u0, dtype=np.float64), (B, 1)))

    def path(key):
        kw = {"levy_area": diffrax.SpaceTimeLevyArea} if (levy is not None or P.exact is None) else {}
        return diffrax.VirtualBrownianTree(s0, s1, tol=TREE_TOL, shape=(m,), key=key, **kw)

    def reference(key, y0):  # fine fixed-step ShARK on the same path
        terms = diffrax.MultiTerm(diffrax.ODETerm(f), diffrax.ControlTerm(g, path(key)))
        return diffrax.diffeqsolve(
            terms, diffrax.ShARK(), s0, s1, dt0=P.reference_dt, y0=y0, saveat=diffrax.SaveAt(t1=True), max_steps=2**20
        ).ys[-1]

    def one(key, y0, level):
        bm = path(key)
        terms = diffrax.MultiTerm(diffrax.ODETerm(f), diffrax.ControlTerm(g, bm))
        if adaptive:
            ctrl = diffrax.PIDController(rtol=level, atol=level)
            dt0 = ADAPTIVE_DT0
        else:
            ctrl = diffrax.ConstantStepSize()
            dt0 = level
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            s0,
            s1,
            dt0=dt0,
            y0=y0,
            stepsize_controller=ctrl,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=2**16,
            throw=False,
        )
        w = bm.evaluate(s0, s1)
        return sol.ys[-1], w, sol.stats["num_steps"], sol.result == diffrax.RESULTS.successful

    batched = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
    keys = jax.random.split(jax.random.key(seed + 1), B)
    per_step = DIFFRAX_EVALS[solver_name]
    ref_key = (P.name, B, seed)

    def exact_end(w: Any) -> Any:
        if P.exact_np is not None:
            return P.exact_np(s1, w)
        if ref_key not in _DIFFRAX_REFERENCES:  # diffrax's own fine solve on its own paths, shared by its methods
            _DIFFRAX_REFERENCES[ref_key] = np.asarray(jax.jit(jax.vmap(reference))(keys, y0s))
        return _DIFFRAX_REFERENCES[ref_key]

    def run(level: float) -> dict:
        y, w, steps, ok = jax.block_until_ready(batched(keys, y0s, jnp.asarray(level, dtype=jnp.float64)))
        y, w = np.asarray(y), np.asarray(w)
        return {
            "y": y,
            "err": strong_error(y, exact_end(w)),
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
