"""Drift-implicit SDE solvers (ImplicitEM, ImplicitRKMil, ISSEM) and the batched Newton solver.

Problems:

* stiff linear SDE ``dX = λ X dt + μ X dW``, λ = -1000, μ = 1, X0 = 1 (Itô):
  ``E X_t² = X0² exp((2λ + μ²) t)``.
* ``prob_sde_stiffquadito`` (SciML DiffEqProblemLibrary, lib/SDEProblemLibrary):
  ``du = -(α + β² u)(1 - u²) dt + β (1 - u²) dW``, α = β = 1, u0 = 1/2, t ∈ [0, 3],
  ``u = tanh(artanh u0 - α t + β W)``; ``prob_sde_stiffquadstrat``: Stratonovich with
  drift ``-α (1 - u²)``, same solution.

Strong orders (B = 200, tree seed 1, dt = 3·2^-k for k = 4..8), measured while writing:
ImplicitEM 0.51, ImplicitRKMil Itô 1.01, ImplicitRKMil Stratonovich 0.99.  At the two
coarsest steps a few paths (46 of 200 for ImplicitEM, 26 for ImplicitRKMil, 5 Strat.)
cross u = 1, where the Itô drift is cubic and unstable and the implicit equation has no
root near the path: those samples fail (NaN -> ReturnCode.Unstable) and are excluded from
the fit for all step sizes, so every step size is measured on the same paths.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from problems import fitted_order

import diffeqbridge as deb
from diffeqbridge.nonlinear import (
    NewtonOptions,
    batched_jacobian,
    lu_factor,
    newton_matrix,
    newton_stage,
)

LAM, MU = -1000.0, 1.0
SUCCESS = int(deb.ReturnCode.Success)


def stiff_linear(batch: int, tspan=(0.0, 1.0)) -> deb.SDEProblem:
    return deb.SDEProblem(lambda t, y: LAM * y, lambda t, y: MU * y, torch.ones(batch, 1, dtype=torch.float64), tspan=tspan)


def stiffquad(batch: int, interpretation: str = "ito", alpha: float = 1.0, beta: float = 1.0, u0: float = 0.5):
    if interpretation == "ito":

        def drift(t, y):
            return -(alpha + beta**2 * y) * (1 - y * y)
    else:

        def drift(t, y):
            return -alpha * (1 - y * y)

    prob = deb.SDEProblem(
        drift,
        lambda t, y: beta * (1 - y * y),
        torch.full((batch, 1), u0, dtype=torch.float64),
        tspan=(0.0, 3.0),
        interpretation=interpretation,
    )

    def exact(t: float, w):
        return torch.tanh(math.atanh(u0) - alpha * t + beta * w)

    return prob, exact


# ---------------------------------------------------------------- stiff linear SDE
def test_implicit_em_stable_where_em_blows_up():
    prob = stiff_linear(16)
    em = deb.solve(prob, deb.EM(), dt=0.1)
    assert em.ys[-1].abs().min() > 1e10  # |1 + λ dt| = 99 per step
    for alg in (deb.ImplicitEM(), deb.ImplicitRKMil(), deb.ISSEM()):
        sol = deb.solve(prob, alg, dt=0.1, adaptive=False)
        assert sol.success
        assert sol.ys[-1].abs().max() < 1e-3, alg


def test_implicit_em_adaptive_on_stiff_linear():
    sol = deb.solve(stiff_linear(8), deb.ImplicitEM())
    assert sol.success
    assert sol.ys[-1].abs().max() < 1e-10
    assert int(sol.stats.naccept.max()) < 2000


def test_implicit_em_mean_square_small_dt():
    """E X_T² = exp((2λ + μ²) T) at T = 0.002 (= e^-3.998 ≈ 0.0184), dt = 1e-5 (200 steps).

    Backward Euler's own mean square per step is (1 + μ² dt)/(1 - λ dt)² vs the exact
    exp((2λ + μ²) dt): a bias of +2.0 % after 200 steps.  Sampling: the relative standard
    error of the mean of X_T² is sqrt(exp(4 μ² T) - 1)/sqrt(B) ≈ 0.2 % at B = 2000.  The
    tolerance (5 %) covers the bias plus > 10 standard errors."""
    T, dt, batch = 0.002, 1e-5, 2000
    sol = deb.solve(stiff_linear(batch, (0.0, T)), deb.ImplicitEM(), dt=dt, adaptive=False, seed=3)
    assert sol.success
    ms = float(sol.ys[-1].square().mean())
    exact = math.exp((2 * LAM + MU**2) * T)
    scheme = ((1 + MU**2 * dt) / (1 - LAM * dt) ** 2) ** round(T / dt)
    assert abs(ms / exact - 1) < 0.05, (ms, exact)
    assert abs(ms / scheme - 1) < 0.02, (ms, scheme)


def test_theta_half_mean_square():
    """Trapezoidal θ = 1/2 is second order in the drift: at dt = 1e-4 (λ dt = -0.1), T = 0.01
    its mean-square bias is 0.03 % per step (1.7 % in all)."""
    T, dt, batch = 0.01, 1e-4, 2000
    sol = deb.solve(stiff_linear(batch, (0.0, T)), deb.ImplicitEM(theta=0.5), dt=dt, adaptive=False, seed=4)
    ms = float(sol.ys[-1].square().mean())
    exact = math.exp((2 * LAM + MU**2) * T)
    assert abs(ms / exact - 1) < 0.06, (ms, exact)


# ---------------------------------------------------------------- strong orders
def _quad_order(alg, interpretation: str) -> tuple[float, list[float], int]:
    batch = 200
    prob, exact = stiffquad(batch, interpretation)
    bm = deb.VirtualBrownianTree(0.0, 3.0, (batch, 1), seed=1, tol=3 * 2.0**-11, dtype=torch.float64)
    ok = torch.ones(batch, dtype=torch.bool)
    dts, errs = [], []
    for k in range(4, 9):
        dt = 3 * 2.0**-k
        sol = deb.solve(prob, alg, dt=dt, adaptive=False, brownian=bm)
        ok &= sol.retcodes == SUCCESS
        dts.append(dt)
        errs.append((sol.ys[-1] - exact(3.0, bm.W(3.0)))[:, 0].abs())
    means = [float(e[ok].mean()) for e in errs]
    return fitted_order(dts, means), means, int(ok.sum())


@pytest.mark.parametrize(
    "alg, interpretation, theory",
    [
        (deb.ImplicitEM(), "ito", 0.5),
        (deb.ImplicitRKMil(), "ito", 1.0),
        (deb.ImplicitRKMil(), "stratonovich", 1.0),
        (deb.ISSEM(), "ito", 0.5),
    ],
    ids=["ImplicitEM-ito", "ImplicitRKMil-ito", "ImplicitRKMil-strat", "ISSEM-ito"],
)
def test_strong_order_stiffquad(alg, interpretation, theory):
    order, errors, used = _quad_order(alg, interpretation)
    assert used >= 140, used
    assert abs(order - theory) < 0.25, (order, errors)


# ---------------------------------------------------------------- Newton
def _stiff_system(batch: int):
    torch.manual_seed(0)
    m = torch.randn(batch, 3, 3, dtype=torch.float64)
    a = -(m @ m.transpose(1, 2)) * 50 - torch.eye(3, dtype=torch.float64)

    def drift(t, y):
        return torch.einsum("bij,bj->bi", a, y) + 0.5 * torch.sin(y)

    return drift, a


def test_jacobians_autodiff_fd_user_agree():
    drift, a = _stiff_system(5)
    y = torch.randn(5, 3, dtype=torch.float64)
    t = torch.zeros(5, dtype=torch.float64)
    exact = a + torch.diag_embed(0.5 * torch.cos(y))
    j_ad, _ = batched_jacobian(drift, t, y, "autodiff")
    j_fd, nf = batched_jacobian(drift, t, y, "fd")
    j_user, _ = batched_jacobian(drift, t, y, lambda t, y: a + torch.diag_embed(0.5 * torch.cos(y)))
    assert torch.allclose(j_ad, exact, atol=1e-12)
    assert torch.allclose(j_user, exact, atol=1e-12)
    assert torch.allclose(j_fd, exact, rtol=1e-5, atol=1e-4) and nf == 4


@pytest.mark.parametrize(
    "opts",
    [
        NewtonOptions(jac="fd", full_newton=True),
        NewtonOptions(linsolve="krylov"),
        NewtonOptions(jac="autodiff", full_newton=False, max_iters=30),
    ],
    ids=["fd-full", "krylov", "simplified"],
)
def test_implicit_em_newton_variants_agree(opts):
    drift, _ = _stiff_system(6)
    prob = deb.SDEProblem(drift, lambda t, y: 0.1 * y, torch.ones(6, 3, dtype=torch.float64), tspan=(0.0, 0.5))
    ref = deb.solve(prob, deb.ImplicitEM(), dt=0.05, adaptive=False)
    sol = deb.solve(prob, deb.ImplicitEM(newton=opts), dt=0.05, adaptive=False)
    assert ref.success and sol.success
    assert torch.allclose(sol.ys, ref.ys, rtol=1e-6, atol=1e-9)


def test_newton_failure_is_per_sample():
    """z = y + dt z² has no real root when 4 dt y > 1 (here y = 1.5, dt = 0.5): at a fixed step that sample stops
    with ConvergenceFailure (as SciML), the others finish."""
    prob = deb.SDEProblem(
        lambda t, y: y * y, lambda t, y: 0.0 * y, torch.tensor([[0.1], [1.5], [-1.0]], dtype=torch.float64), tspan=(0.0, 0.5)
    )
    sol = deb.solve(prob, deb.ImplicitEM(), dt=0.5, adaptive=False)
    codes = [int(c) for c in sol.retcodes]
    assert codes == [SUCCESS, int(deb.ReturnCode.ConvergenceFailure), SUCCESS]
    root = (1 - math.sqrt(1 - 4 * 0.5 * 0.1)) / (2 * 0.5)
    assert abs(float(sol.ys[-1, 0, 0]) - root) < 1e-9
    # adaptive: the failing sample is retried with smaller steps (y = 1/(1/1.5 - t) is
    # finite on [0, 0.5]) and every sample succeeds
    adaptive = deb.solve(prob, deb.ImplicitEM(), dt=0.5, atol=1e-3, rtol=1e-3)
    assert adaptive.success
    assert int(adaptive.stats.nreject[1]) >= 1
    assert abs(float(adaptive.ys[-1, 1, 0]) / (1 / (1 / 1.5 - 0.5)) - 1) < 0.2  # first-order method, atol=rtol=1e-3


def test_newton_stage_flags():
    f = lambda t, y: y * y
    base = torch.tensor([[0.1], [10.0]], dtype=torch.float64)
    gh = torch.full((2,), 0.5, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.float64)
    J, _ = batched_jacobian(f, t, base)
    res = newton_stage(f, t, base, gh, base, NewtonOptions(full_newton=True), lu_factor(newton_matrix(J, gh)))
    assert res.converged.tolist() == [True, False]


def test_general_noise_implicit_em():
    drift, _ = _stiff_system(4)

    def diffusion(t, y):
        return 0.1 * torch.stack([y, torch.ones_like(y)], dim=-1)

    prob = deb.SDEProblem(drift, diffusion, torch.ones(4, 3, dtype=torch.float64), tspan=(0.0, 0.2), noise="general", noise_dim=2)
    sol = deb.solve(prob, deb.ImplicitEM())
    assert sol.success and torch.isfinite(sol.ys).all()


@pytest.mark.parametrize("early_exit", [True, False])
def test_gradient_through_newton_matches_finite_difference(early_exit):
    """Backprop through the Newton iterations gives the implicit-function derivative: the
    final correction from the converged iterate carries ``W^-1 (d base + gh df)`` at the
    solution (without it the gradient had the wrong sign here)."""
    opts = NewtonOptions(full_newton=True, early_exit=early_exit, max_iters=6)

    def run(lam):
        prob = deb.SDEProblem(
            lambda t, y: lam * y - y**3,
            lambda t, y: 0.3 * y,
            torch.ones(4, 1, dtype=torch.float64),
            tspan=(0.0, 0.5),
            params=[lam],
        )
        return deb.solve(prob, deb.ImplicitEM(newton=opts), dt=0.05, adaptive=False, seed=2).ys[-1].sum()

    lam = torch.tensor(-50.0, dtype=torch.float64, requires_grad=True)
    run(lam).backward()
    h = 1e-6
    with torch.no_grad():
        fd = (run(torch.tensor(-50.0 + h, dtype=torch.float64)) - run(torch.tensor(-50.0 - h, dtype=torch.float64))) / (2 * h)
    assert float(lam.grad) == pytest.approx(float(fd), rel=1e-5)


def test_krylov_newton_survives_identity_jacobian():
    """GMRES breaks down after one iteration when the Jacobian is a multiple of the
    identity (prob_sde_additivesystem); the least-squares solve must not become singular,
    and the Krylov answer must match the dense LU one."""
    from problems import additive_system, tree_for

    prob, _ = additive_system(8)
    bm = tree_for(prob, 1, tol=2**-10)
    for k in (2, 4, 6):
        krylov = deb.solve(prob, deb.ImplicitEM(linsolve="krylov"), dt=2.0**-k, adaptive=False, brownian=bm)
        dense = deb.solve(prob, deb.ImplicitEM(), dt=2.0**-k, adaptive=False, brownian=bm)
        assert krylov.success
        assert torch.allclose(krylov.ys, dense.ys, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- alg=None on the stiff SDE (issue 12)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _stiff_sde as stiff_sde  # noqa: E402 - the issue's problem and its pathwise reference


class CountingDrift:
    """``stiff_sde.drift`` counting its calls (each call evaluates every sample of the batch)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return stiff_sde.drift(t, y)


@pytest.mark.parametrize("noise", ["additive", "diagonal"])
def test_default_algorithm_on_the_stiff_sde(noise):
    """alg=None on dX = -1e4 (X - cos t) dt + 0.1 dW (additive: AutoSwitch(ShARK,
    ImplicitRKMil(smooth_est=True))) and + 0.1 X dW (diagonal: AutoSOSRI), default tolerances
    (1e-2): every path switches to the implicit method, < 2,000 drift evaluations per path,
    strong error at t = 1 against the exact pathwise reference below tol / 5.

    Measured (B = 8, seed 1): additive 590 evaluations per path (95 accepted steps), strong
    error 7.1e-4; diagonal 432 (81 steps), 3.8e-4.  Before: 8,372 (AutoSwitch(ShARK,
    ImplicitRKMil)) and 20,312 (SOSRI, no switch), errors 4.3e-4 and 2.6e-4.  The errors are
    the size of the Ornstein–Uhlenbeck fluctuation (std 8.4e-4 / 4.5e-4 on these paths),
    which steps with dt |λ| >> 1 damp instead of resolving."""
    batch, tol = 8, 1e-2
    counter = CountingDrift()
    prob = stiff_sde.problem(batch, noise, drift_fn=counter)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=1, dtype=torch.float64, tol=2.0**-24)
    sol = deb.solve(prob, brownian=bm)
    assert sol.success
    assert type(sol.alg).__name__ == ("AutoSwitch" if noise == "additive" else "AutoSOSRI")
    assert torch.all(sol.stats.extra["nswitch"] >= 1)
    assert counter.calls < 2000, counter.calls
    assert float(sol.stats.nf.double().mean()) < 2000
    error = (sol.ys[-1] - stiff_sde.reference(bm, noise)).abs()
    assert float(error.mean()) < tol / 5, float(error.mean())


def test_autososri_switches_once_at_a_tight_tolerance():
    """AutoSOSRI (alg=None for diagonal noise) at tol 1e-3 on the diagonal stiff SDE: with
    SciML's stifftol 0.9 the implicit method's own steps (ρ dt ~ 5) sent the samples back to
    SOSRI and forth again (265 switches per path, 22,776 drift evaluations; SOSRI alone 28,648);
    with stifftol = nonstifftol = 0.1 it switches once.  Measured (B = 8, seed 1): 1.2 switches,
    4,872 evaluations per path, strong error 2.6e-4."""
    batch, tol = 4, 1e-3
    prob = stiff_sde.problem(batch, "diagonal")
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=1, dtype=torch.float64, tol=2.0**-24)
    sol = deb.solve(prob, deb.AutoSOSRI(), brownian=bm, atol=tol, rtol=tol)
    assert sol.success
    switches = sol.stats.extra["nswitch"]
    assert torch.all(switches >= 1) and int(switches.max()) <= 3, switches
    assert float(sol.stats.nf.double().mean()) < 10_000
    error = (sol.ys[-1] - stiff_sde.reference(bm, "diagonal")).abs()
    assert float(error.mean()) < tol
