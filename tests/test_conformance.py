"""One conformance suite for every backend: ``native`` here, ``julia`` wherever Julia runs.

Each test takes the ``backend`` fixture; the julia case is skipped with
``julia_status()``'s reason where Julia is unavailable (this repository's CI).  Reference
values are analytic, so both backends must meet the same bounds:

* strong orders on SDEProblemLibrary problems (fixed steps ``2^-k``): EM on GBM ~0.5,
  SRIW1 on GBM ~1.5, SRA1 on the additive problem ~2 (fitted slope within ±0.3).  The
  exact solution needs the Brownian path the solver used: native solves take an explicit
  ``VirtualBrownianTree``; julia solves report SciML's ``W(t1)`` in ``stats.extra["W_end"]``.
* shapes of ``ts``/``ys`` for several state shapes, with and without ``saveat``;
* retcodes: ``Success``, and ``MaxIters`` with a tiny ``max_steps``;
* gradients against analytic derivatives: GBM ``∂u_T/∂μ = T u_T`` (pathwise, Itô),
  ODE ``y' = -θ y``: ``∂y_T/∂θ = -T y_T``, ``∂y_T/∂y0 = e^{-θT}``.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import additive, fitted_order, linear, tree_for

import diffeqbridge as deb
from diffeqbridge.julia import julia_status

B = 64


@pytest.fixture(params=["native", "julia"])
def backend(request):
    if request.param == "julia":
        ok, reason = julia_status()
        if not ok:
            pytest.skip(f"julia backend unavailable: {reason}")
    return request.param


def _solve(prob, alg, backend, seed=3, **kwargs):
    """Solve and return (solution, W(t1) - W(t0) of the path used, (B, *noise_shape))."""
    t1 = prob.tspan[1]
    if backend == "native":
        bm = tree_for(prob, seed, tol=2.0**-10)
        sol = deb.solve(prob, alg, backend="native", brownian=bm, **kwargs)
        return sol, bm.W(t1)
    sol = deb.solve(prob, alg, backend="julia", seed=seed, **kwargs)
    return sol, sol.stats.extra["W_end"]


@pytest.mark.parametrize(
    "builder, alg, ks, theory",
    [(linear, deb.EM(), range(3, 8), 0.5), (linear, deb.SRIW1(), range(3, 8), 1.5), (additive, deb.SRA1(), range(2, 6), 2.0)],
    ids=["EM-GBM", "SRIW1-GBM", "SRA1-additive"],
)
def test_strong_order(backend, builder, alg, ks, theory):
    prob, exact = builder(B)
    t1 = prob.tspan[1]
    dts, errors = [], []
    for k in ks:
        sol, w = _solve(prob, alg, backend, dt=2.0**-k, adaptive=False)
        assert sol.success
        err = (sol.ys[-1] - exact(t1, w)).abs().flatten(1).amax(dim=1).mean()
        dts.append(2.0**-k)
        errors.append(float(err))
    order = fitted_order(dts, errors)
    assert abs(order - theory) < 0.3, f"{type(alg).__name__}: fitted strong order {order:.2f}, errors {errors}"


@pytest.mark.parametrize("state", [(1,), (3,), (2, 3)], ids=["1", "3", "2x3"])
def test_shapes(backend, state):
    y0 = torch.full((5, *state), 0.5, dtype=torch.float64)
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * y, y0, (0.0, 1.0))
    sol = deb.solve(prob, deb.SOSRI(), backend=backend)
    assert sol.ts.shape == (2,) and sol.ys.shape == (2, 5, *state)
    saveat = [0.25, 0.5, 1.0]
    sol = deb.solve(prob, deb.SOSRI(), saveat=saveat, backend=backend)
    assert sol.ys.shape == (3, 5, *state)
    torch.testing.assert_close(sol.ts, torch.tensor(saveat, dtype=torch.float64))
    assert sol.stats.nf.shape == (5,) and bool((sol.stats.nf > 0).all()) and bool((sol.stats.ng > 0).all())
    ode = deb.ODEProblem(lambda t, y: -y, y0, (0.0, 1.0))
    sol = deb.solve(ode, deb.Tsit5(), saveat=saveat, backend=backend)
    assert sol.ys.shape == (3, 5, *state)
    torch.testing.assert_close(sol.ys[-1], y0 * math.exp(-1.0), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "additive", "general"])
def test_noise_types(backend, noise):
    """Every noise type runs on both backends; EM's mean of dy = -y dt + g dW is exactly
    y0 (1 - h)^N (checked to 5 standard errors over 400 paths)."""
    y0 = torch.full((400, 3), 1.0, dtype=torch.float64)
    if noise == "general":

        def diffusion(t, y):
            return 0.2 * torch.stack([y, torch.ones_like(y)], dim=-1)
    elif noise == "additive":

        def diffusion(t, y):
            return torch.full_like(y, 0.2)
    else:

        def diffusion(t, y):
            return 0.2 * y

    prob = deb.SDEProblem(lambda t, y: -y, diffusion, y0, (0.0, 1.0), noise=noise, noise_dim=2 if noise == "general" else None)
    sol = deb.solve(prob, deb.EM(), dt=2.0**-6, backend=backend)
    assert sol.success and sol.ys.shape == (2, 400, 3)
    mean = sol.ys[-1].mean(dim=0)
    stderr = sol.ys[-1].std(dim=0) / 20
    expected = (1 - 2.0**-6) ** 64  # EM's mean for the linear drift: (1 - h)^N, exactly
    assert bool(((mean - expected).abs() < 5 * stderr).all()), (mean, expected)


def test_retcodes(backend):
    prob, _ = linear(4)
    sol = deb.solve(prob, deb.SOSRI(), backend=backend)
    assert sol.success and sol.retcode == [deb.ReturnCode.Success] * 4
    sol = deb.solve(prob, deb.SOSRI(), max_steps=3, atol=1e-8, rtol=1e-8, backend=backend)
    assert sol.retcode == [deb.ReturnCode.MaxIters] * 4


def test_gbm_gradient_pathwise(backend):
    """Itô GBM: u_T = u0 exp((μ - σ²/2) T + σ W_T), so ∂u_T/∂μ = T u_T and ∂u_T/∂u0 = u_T/u0."""
    mu = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.5, dtype=torch.float64)
    y0 = torch.full((8, 1), 0.5, dtype=torch.float64, requires_grad=True)
    prob = deb.SDEProblem(lambda t, y: mu * y, lambda t, y: sigma * y, y0, (0.0, 1.0), params=[mu])
    sol, _ = _solve(prob, deb.SRIW1(), backend, dt=2.0**-8, adaptive=False, sensealg=deb.InterpolatingAdjoint())
    u_t = sol.ys[-1]
    gmu, gy0 = torch.autograd.grad(u_t.sum(), [mu, y0])
    torch.testing.assert_close(gmu, (1.0 * u_t).sum().detach(), rtol=2e-2, atol=1e-8)
    torch.testing.assert_close(gy0, (u_t / 0.5).detach(), rtol=2e-2, atol=1e-8)


def test_ode_gradient(backend):
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -theta * y, y0, (0.0, 2.0), params=[theta])
    sol = deb.solve(prob, deb.Tsit5(), atol=1e-10, rtol=1e-10, sensealg=deb.InterpolatingAdjoint(), backend=backend)
    y_t = sol.ys[-1]
    torch.testing.assert_close(y_t.detach(), y0.detach() * math.exp(-1.4), rtol=1e-7, atol=1e-9)
    gtheta, gy0 = torch.autograd.grad(y_t.sum(), [theta, y0])
    torch.testing.assert_close(gtheta, (-2.0 * y_t).sum().detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gy0, torch.full_like(y0, math.exp(-1.4)), rtol=1e-5, atol=1e-8)
