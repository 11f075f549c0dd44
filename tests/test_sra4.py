"""SRA4 and SRA5: additive-noise SRAs with a drift part of order 4 (Kutta's 3/8 rule) and 5
(Butcher's six-stage method); our tableaus.

* The tableaus: Rößler's (2010) strong-order-1.5 conditions for additive noise, the two extra
  linear-drift conditions they were solved with, and Butcher's conditions up to order 4 for
  their drift parts (order 5: measured below).
* Strong order 1.5 ± 0.25 on four additive problems with nonlinear drift (fixed steps, the
  same Brownian tree, against a fine-step reference).  The closed-form additive problems of
  ``tests/problems.py`` are no test of the noise order: their solutions are functions of
  ``W(T)``, where the noise part is accurate to one order more (order 3; checked below).
* Deterministic order 4 / 5 with zero noise.
* The embedded estimate is ``y1`` minus the order-1 solution from the same first stage and the
  same ``ΔW``, ``H``, and shrinks like ``dt^1.5 ... dt^2`` (one step); adaptive runs follow the
  tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import additive, additive_system, fitted_order, strong_error, tree_for

import diffeqbridge as deb
from diffeqbridge.problem import Terms

F64 = torch.float64
METHODS = [deb.SRA4, deb.SRA5]
DRIFT_ORDER = {deb.SRA4: 4, deb.SRA5: 5}


def _dot(u, v) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def _matvec(m, v) -> list[float]:
    return [_dot(row, v) for row in m]


@pytest.mark.parametrize("cls", METHODS)
def test_tableau_order_conditions(cls):
    tab = cls.tableau
    alpha, c, a0 = tab.alpha, tab.c0, tab.a0
    s = [sum(row) for row in tab.b0]
    e = [1.0] * tab.stages
    approx = pytest.approx
    # Rößler 2010, strong order 1.5 for additive noise
    assert sum(alpha) == approx(1.0)
    assert sum(tab.beta1) == approx(1.0) and sum(tab.beta2) == approx(0.0, abs=1e-15)
    assert _dot(alpha, s) == approx(1.0)
    assert _dot(alpha, _matvec(a0, e)) == approx(0.5)
    assert _dot(alpha, [x * x for x in s]) == approx(1.5)
    assert _dot(tab.beta1, tab.c1) == approx(1.0) and _dot(tab.beta2, tab.c1) == approx(-1.0)
    # the two linear-drift conditions the shifts were solved with
    assert _dot(alpha, [ci * si for ci, si in zip(c, s, strict=True)]) == approx(0.5)
    assert _dot(alpha, _matvec(a0, s)) == approx(0.5)
    # Butcher's conditions up to order 4 (c = A e)
    assert _matvec(a0, e) == approx(list(c))
    ac = _matvec(a0, c)
    assert _dot(alpha, c) == approx(1 / 2)
    assert _dot(alpha, [x**2 for x in c]) == approx(1 / 3)
    assert _dot(alpha, ac) == approx(1 / 6)
    assert _dot(alpha, [x**3 for x in c]) == approx(1 / 4)
    assert _dot(alpha, [ci * x for ci, x in zip(c, ac, strict=True)]) == approx(1 / 8)
    assert _dot(alpha, _matvec(a0, [x**2 for x in c])) == approx(1 / 12)
    assert _dot(alpha, _matvec(a0, ac)) == approx(1 / 24)
    # the diffusion is used at t (carried in) and t + dt (carried out) only
    assert tab.carried_stages == (0, 1)
    assert [tab.diffusion_used(j) for j in range(tab.stages)] == [True, True] + [False] * (tab.stages - 2)


def _problem(name: str, batch: int) -> deb.SDEProblem:
    y0 = torch.full((batch, 1), 0.5, dtype=F64)
    if name == "sin":  # constant noise
        return deb.SDEProblem(lambda t, y: 2 * torch.sin(y) - y, lambda t, y: torch.ones_like(y), y0, noise="additive")
    if name == "sin_t":  # time-dependent drift and noise (tests/test_error_estimates.py)
        return deb.SDEProblem(
            lambda t, y: -torch.sin(y) * (1 + t[:, None]) + torch.cos(3 * t)[:, None],
            lambda t, y: (0.8 * (1 + t) ** 2)[:, None].expand_as(y),
            y0,
            noise="additive",
        )
    if name == "cubic":
        return deb.SDEProblem(
            lambda t, y: -(y**3) + torch.sin(3 * t)[:, None],
            lambda t, y: (0.5 * (1 + t) ** 2)[:, None].expand_as(y),
            y0,
            noise="additive",
        )

    # "hopf": the Hopf normal form (a coupled 2-D system), noise on both components
    def drift(t, y):
        x, v = y[:, 0], y[:, 1]
        r2 = x * x + v * v
        return torch.stack([x - v - x * r2, x + v - v * r2], dim=1)

    def diffusion(t, y):
        return torch.full_like(y, 0.6)

    return deb.SDEProblem(drift, diffusion, torch.full((batch, 2), 0.5, dtype=F64), noise="additive")


@pytest.mark.parametrize("name", ["sin", "sin_t", "cubic", "hopf"])
def test_strong_order(name):
    """Fixed steps 2^-2 ... 2^-6 against SRA4 at 2^-11 on the same tree (finest cell 2^-11);
    SRA5 2^-5 ... 2^-9: its larger stage coefficients carry the noise into the drift stages, so
    its slope from coarser steps is pre-asymptotic (cubic: 1.88 over 2^-3 ... 2^-7, 1.75 over
    2^-4 ... 2^-8, 1.67 here; it overflows on some paths at 2^-2)."""
    prob = _problem(name, 300)
    bm = tree_for(prob, seed=4, tol=2.0**-11)
    ref = deb.solve(prob, deb.SRA4(), dt=2.0**-11, adaptive=False, brownian=bm).ys[-1]
    for cls, ks in ((deb.SRA4, range(2, 7)), (deb.SRA5, range(5, 10))):
        _check_strong_order(cls, name, prob, bm, ref, ks)


def _check_strong_order(cls, name, prob, bm, ref, ks):
    dts, errors = [], []
    for k in ks:
        sol = deb.solve(prob, cls(), dt=2.0**-k, adaptive=False, brownian=bm)
        dts.append(2.0**-k)
        errors.append(float((sol.ys[-1] - ref).abs().flatten(1).amax(dim=1).mean()))
    order = fitted_order(dts, errors)
    print(f"{cls.__name__} on {name}: strong order {order:.3f}, errors {errors}")
    assert abs(order - 1.5) <= 0.25, (cls.__name__, order, errors)


def _zero_noise(batch: int) -> tuple[deb.SDEProblem, object]:
    """y' = y cos t (g = 0) on [0, 2]: y = y0 exp(sin t)."""
    prob = deb.SDEProblem(
        lambda t, y: y * torch.cos(t)[:, None],
        lambda t, y: torch.zeros_like(y),
        torch.full((batch, 1), 0.5, dtype=F64),
        (0.0, 2.0),
        noise="additive",
    )
    return prob, lambda t: 0.5 * math.exp(math.sin(t))


@pytest.mark.parametrize("cls", METHODS)
def test_deterministic_order(cls):
    prob, exact = _zero_noise(2)
    dts, errors = [], []
    for k in range(3, 8) if cls is deb.SRA4 else range(2, 6):
        sol = deb.solve(prob, cls(), dt=2.0**-k, adaptive=False, seed=0)
        dts.append(2.0**-k)
        errors.append(float((sol.ys[-1] - exact(2.0)).abs().max()))
    order = fitted_order(dts, errors)
    print(f"{cls.__name__} with zero noise: order {order:.3f}, errors {errors}")
    assert abs(order - DRIFT_ORDER[cls]) <= 0.25, (order, errors)


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("builder", [additive, additive_system], ids=["additive", "additivesystem"])
def test_sciml_additive_problems_see_the_drift_order(builder, cls):
    """SciML's closed-form additive problems: the drift's error falls like h^4 and, by the two
    linear-drift conditions, the noise part's like h^3 (not h^2).  Measured 4.3 (additive, the
    drift's error dominates) and 3.3 (additivesystem, 10x more noise)."""
    prob, exact = builder(200)
    bm = tree_for(prob, seed=1, tol=2.0**-10)
    dts, errors = [], []
    for k in range(0, 5):
        sol = deb.solve(prob, cls(), dt=2.0**-k, adaptive=False, brownian=bm)
        dts.append(2.0**-k)
        errors.append(strong_error(sol, exact, bm))
    order = fitted_order(dts, errors)
    print(f"{cls.__name__} on {builder.__name__}: order {order:.3f}, errors {errors}")
    assert 2.75 <= order <= 4.5, (order, errors)


@pytest.mark.parametrize("cls", METHODS)
def test_embedded_estimate(cls):
    """error = y1 - ŷ1 with ŷ1 = y + dt f(t, y) + g(t + dt) ΔW (strong order 1, the same stage
    and ΔW); one step's estimate shrinks like dt^1.5 (g(t) varies) to dt^2."""
    prob, _ = additive_system(2000)
    terms = Terms(prob)
    b = prob.batch_size
    gen = torch.Generator().manual_seed(5)
    z1 = torch.randn(b, 4, generator=gen, dtype=F64)
    z2 = torch.randn(b, 4, generator=gen, dtype=F64)
    t0 = torch.zeros(b, dtype=F64)
    dts, sizes = [2.0**-k for k in range(2, 10)], []
    for h in dts:
        dt = torch.full((b,), h, dtype=F64)
        dw = z1 * math.sqrt(h)
        out = cls().step(terms, t0, prob.y0, dt, dw, z2 * math.sqrt(h / 12))
        low = prob.y0 + h * prob.drift(t0, prob.y0) + prob.diffusion(t0 + h, prob.y0) * dw
        torch.testing.assert_close(out.error, out.y1 - low, rtol=0, atol=1e-14)
        assert (out.nf, out.ng) == (cls.tableau.stages, 2)
        sizes.append(float(out.error.abs().mean()))
    order = fitted_order(dts, sizes)
    print(f"{cls.__name__} embedded estimate: one-step order {order:.3f}")
    assert 1.3 <= order <= 2.2, (order, sizes)


@pytest.mark.parametrize("cls", METHODS)
def test_carried_diffusion_counts(cls):
    """With g(t) carried in: 4 (SRA5: 6) drift + 1 diffusion per step, and the same step."""
    prob, _ = additive(8)
    terms = Terms(prob)
    t0 = torch.zeros(8, dtype=F64)
    dt = torch.full((8,), 0.25, dtype=F64)
    dw = torch.randn(8, 1, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.5
    hh = torch.randn(8, 1, dtype=F64, generator=torch.Generator().manual_seed(2)) * math.sqrt(0.25 / 12)
    alg = cls()
    fresh = alg.step(terms, t0, prob.y0, dt, dw, hh)
    carried = alg.step(terms, t0, prob.y0, dt, dw, hh, state=(prob.diffusion(t0, prob.y0),))
    assert (carried.nf, carried.ng) == (cls.tableau.stages, 1)
    torch.testing.assert_close(carried.y1, fresh.y1, rtol=0, atol=0)
    torch.testing.assert_close(carried.state[0], prob.diffusion(t0 + dt, prob.y0), rtol=0, atol=0)


@pytest.mark.parametrize("cls", METHODS)
def test_error_tracks_tolerance(cls):
    """Adaptive SRA4/SRA5 (embedded estimate) on the additive system: error below 10·tol·|u|, work
    growing no faster than tol^-0.75 over tol 1e-2 ... 1e-5 (tests/test_error_estimates.py)."""
    prob, exact = additive_system(64)
    bm = tree_for(prob, seed=7)
    tols = [1e-2, 1e-3, 1e-4, 1e-5]
    errors, work = [], []
    for tol in tols:
        sol = deb.solve(prob, cls(), atol=tol, rtol=tol, brownian=bm)
        assert sol.success
        scale = float(sol.ys[-1].abs().mean())
        errors.append(strong_error(sol, exact, bm))
        work.append(float((sol.stats.nf + sol.stats.ng).double().mean()))
        assert errors[-1] <= 10 * tol * max(scale, 1.0), (tol, errors, work)
    growth = -fitted_order(tols, work)
    print(f"{cls.__name__} adaptive: errors {errors}, work {work} (tol^-{growth:.2f})")
    assert growth <= 0.75, (growth, work, errors)
    assert errors[-1] < errors[0]
