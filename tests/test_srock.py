"""SROCK1 (stabilized explicit S-ROCK, Itô).

Measured while writing: on the stiff linear SDE dX = -1000 X dt + X dW at dt = 0.1, EM's
|X| grows like 99^n (1e20 after 10 steps) while SROCK1 (25 stages per step, chosen from the
power-iteration estimate ρ ≈ 1200 including the 1.2 safety factor) decays; strong order on
prob_sde_linear (GBM, dt = 2^-3..2^-7, 200 paths): 1.03 with nstages=5, 1.01 with automatic
stages — above the declared 0.5 because the derivative-free Milstein term makes it order 1
for diagonal noise (as StochasticDiffEq's step); general noise (no Milstein term, 2-d
commuting GBM, 300 paths): 0.47.  Mean square at λ = -5, μ = 1, dt = 0.002: 1.07 x exact
(standard error 9 %).
"""

from __future__ import annotations

import pytest
import torch
from problems import fitted_order, linear, strong_error, tree_for

import diffeqbridge as deb


def stiff_linear(batch: int, lam: float = -1000.0, mu: float = 1.0) -> deb.SDEProblem:
    return deb.SDEProblem(lambda t, y: lam * y, lambda t, y: mu * y, torch.ones(batch, 1, dtype=torch.float64), tspan=(0.0, 1.0))


def test_srock1_stable_where_em_blows_up():
    prob = stiff_linear(8)
    em = deb.solve(prob, deb.EM(), dt=0.1, seed=3)
    srock = deb.solve(prob, deb.SROCK1(), dt=0.1, seed=3)
    assert float(em.ys[-1].abs().max()) > 1e10  # |1 - 100 + ΔW| ≈ 99 per step
    assert srock.success
    assert float(srock.ys[-1].abs().max()) < 1e-3
    # stage count from the stiffness estimate: ρ ≈ 1000 (x 1.2 safety), ρ dt = 120 -> s = 25
    assert torch.allclose(srock.stats.extra["eigen_est"], torch.full((8,), 1200.0, dtype=torch.float64), rtol=1e-3)
    assert torch.all(srock.stats.nf >= 10 * 25)


def test_srock1_mean_square_decay_statistics():
    """E X_T² = exp((2λ + μ²) T) for λ = -5, μ = 1, T = 1 (SROCK1 at dt = 0.002, λ dt = -0.01,
    so the first-order weak bias is a few %): 4000 paths, tolerance 5 standard errors + 10 %."""
    lam, mu, T = -5.0, 1.0, 1.0
    prob = deb.SDEProblem(lambda t, y: lam * y, lambda t, y: mu * y, torch.ones(4000, 1, dtype=torch.float64), tspan=(0.0, T))
    sol = deb.solve(prob, deb.SROCK1(), dt=0.002, seed=11)
    x2 = sol.ys[-1, :, 0] ** 2
    exact = torch.exp(torch.tensor((2 * lam + mu * mu) * T, dtype=torch.float64))
    se = x2.std() / x2.numel() ** 0.5
    assert abs(float(x2.mean() - exact)) < 5 * float(se) + 0.1 * float(exact)


def test_srock1_strong_order_gbm():
    prob, exact = linear(200)
    bm = tree_for(prob, 5, tol=2**-12)
    dts = [2.0**-k for k in range(3, 8)]
    errs = [strong_error(deb.solve(prob, deb.SROCK1(nstages=5), dt=dt, brownian=bm), exact, bm) for dt in dts]
    order = fitted_order(dts, errs)
    assert order >= 0.5 - 0.25, (order, errs)
    assert order <= 1.25, (order, errs)


def test_srock1_general_noise_strong_order():
    """dX = a X dt + (σ1 X dW1 + σ2 X dW2) on one state (general noise, commuting):
    X = X0 exp((a - (σ1² + σ2²)/2) t + σ1 W1 + σ2 W2); plain g ΔW noise -> order 0.5."""
    a, s1, s2 = 0.5, 0.3, 0.4
    prob = deb.SDEProblem(
        lambda t, y: a * y,
        lambda t, y: torch.stack([s1 * y, s2 * y], dim=-1),
        torch.ones(300, 1, dtype=torch.float64),
        noise="general",
        noise_dim=2,
    )
    bm = tree_for(prob, 2, tol=2**-12)

    def exact(t, w):
        return torch.exp((a - (s1 * s1 + s2 * s2) / 2) * t + s1 * w[:, :1] + s2 * w[:, 1:])

    dts = [2.0**-k for k in range(3, 8)]
    errs = [strong_error(deb.solve(prob, deb.SROCK1(), dt=dt, brownian=bm), exact, bm) for dt in dts]
    assert abs(fitted_order(dts, errs) - 0.5) < 0.25, errs


def test_srock1_per_sample_stage_counts():
    """Stiff and mild samples in one batch: each gets its own stage count (nf per sample)."""
    lam = torch.tensor([[-1000.0], [-1.0]], dtype=torch.float64)
    prob = deb.SDEProblem(lambda t, y: lam * y, lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=torch.float64), tspan=(0.0, 0.5))
    sol = deb.solve(prob, deb.SROCK1(), dt=0.05)
    assert sol.success
    steps = sol.stats.naccept
    per_step = (sol.stats.nf - 2) / steps  # minus the start-up evaluations
    assert float(per_step[1]) < float(per_step[0])
    assert float(sol.ys[-1, 0].abs()) < 1e-6


def test_srock1_validation():
    with pytest.raises(ValueError, match="nstages"):
        deb.SROCK1(nstages=0)
    with pytest.raises(ValueError, match="nstages"):
        deb.SROCK1(nstages=500)
    with pytest.raises(ValueError, match="fixed-step"):
        deb.solve(stiff_linear(1), deb.SROCK1())
    strat = deb.SDEProblem(lambda t, y: -y, lambda t, y: y, torch.ones(1, 1, dtype=torch.float64), interpretation="stratonovich")
    with pytest.raises(ValueError, match="interpretation"):
        deb.solve(strat, deb.SROCK1(), dt=0.1)
