"""Engine-independent tests of the explicit embedded RK solvers (Tsit5, Dopri5)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import diffeqbridge  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffeqbridge.controller import hairer_initial_dt
from diffeqbridge.problem import ODEProblem, Terms
from diffeqbridge.solvers.runge_kutta import (
    DOPRI5_TABLEAU,
    TSIT5_TABLEAU,
    Dopri5,
    Tsit5,
)

SOLVERS = [Tsit5, Dopri5]
DT = torch.float64


def lotka_volterra(t, y):
    a, b, c, d = 1.5, 1.0, 3.0, 1.0
    x, z = y[:, 0], y[:, 1]
    return torch.stack([a * x - b * x * z, -c * z + d * x * z], dim=1)


def cos_decay(t, y):
    # y' = -y cos(t), exact y(t) = y(t0) exp(-(sin t - sin t0)); t has shape (B,)
    return -y * torch.cos(t)[:, None]


def fixed_step_solve(solver, f, y0, t0, t1, n):
    terms = Terms(ODEProblem(f, y0, (t0, t1)))
    B = y0.shape[0]
    t = torch.full((B,), t0, dtype=DT)
    dt = torch.full((B,), (t1 - t0) / n, dtype=DT)
    y = y0
    f0 = f(t, y)
    nf = 1
    for i in range(n):
        out = solver.step(terms, t, y, dt, None, None, f0=f0)
        y, f0 = out.y1, out.f1
        nf += out.nf
        t = torch.full((B,), t0 + (i + 1) * (t1 - t0) / n, dtype=DT)
    return y, nf


def fitted_order(hs, errs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


# ---------------------------------------------------------------------------------- tableaus


@pytest.mark.parametrize("tab", [TSIT5_TABLEAU, DOPRI5_TABLEAU], ids=["tsit5", "dopri5"])
def test_tableau_consistency(tab):
    c = np.array(tab.c)
    for i, row in enumerate(tab.a):
        assert abs(sum(row) - c[i]) < 1e-14, f"row {i} sum != c"
    b = np.array(tab.b)
    bhat = b - np.array(tab.b_error)
    assert abs(b.sum() - 1) < 1e-14 and abs(bhat.sum() - 1) < 1e-14
    # quadrature conditions: sum b c^(k-1) = 1/k up to the order (b̂ up to the embedded order)
    for k in range(1, 6):
        assert abs((b * c ** (k - 1)).sum() - 1 / k) < 1e-13, k
    for k in range(1, 5):
        assert abs((bhat * c ** (k - 1)).sum() - 1 / k) < 1e-13, k
    # the embedded solution is genuinely lower order
    assert abs((bhat * c**4).sum() - 1 / 5) > 1e-6
    assert tab.fsal


def test_metadata():
    for cls in SOLVERS:
        assert cls.is_sde is False and cls.adaptive is True and cls.fsal is True
        assert cls.noise_types == frozenset() and cls.needs_levy_area is False
        assert cls.strong_order == cls.weak_order == cls.controller_order == 5
        assert (cls.qmax, cls.qmin, cls.gamma) == (10.0, 0.2, 0.9)
    assert Tsit5.beta2 == pytest.approx(0.08) and Tsit5.beta1 == pytest.approx(0.14)
    assert Dopri5.beta2 == pytest.approx(0.04) and Dopri5.beta1 == pytest.approx(0.17)


# ------------------------------------------------------------------- (a) convergence order


def oscillator(t, y):
    return torch.stack([y[:, 1], -y[:, 0]], dim=1)


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_convergence_order_oscillator(cls):
    # Asymptotic regime is reached well above float64 round-off: tight ±0.3 window.
    y0 = torch.tensor([[0.5, 0.3], [1.0, -2.0]], dtype=DT)
    t0, t1 = 0.0, 10.0
    c, s = math.cos(t1), math.sin(t1)
    exact = torch.stack([y0[:, 0] * c + y0[:, 1] * s, -y0[:, 0] * s + y0[:, 1] * c], dim=1)
    ns = [40, 56, 80, 113, 160]
    errs = []
    for n in ns:
        y, nf = fixed_step_solve(cls(), oscillator, y0, t0, t1, n)
        assert nf == 1 + 6 * n  # FSAL: 6 new evaluations per step
        errs.append((y - exact).abs().max().item())
    p = fitted_order([(t1 - t0) / n for n in ns], errs)
    assert abs(p - 5) < 0.3, (p, errs)


# Nonlinear problems exercise the nonlinear order conditions.  Both pairs (Tsit5 by
# design: tiny principal error coefficients) show a pre-asymptotic regime where the
# h^6 term still dominates down to errors ~1e-12, so the fitted slope lies between 5 and
# ~6.5 there; an order < 5 (a wrong coefficient) would fail the lower bound.
@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_convergence_order_cos_decay(cls):
    y0 = torch.tensor([[1.0], [2.0], [-0.5]], dtype=DT)
    t0, t1 = 0.0, 5.0
    exact = y0 * math.exp(-(math.sin(t1) - math.sin(t0)))
    ns = [20, 28, 40, 56, 80]
    errs = []
    for n in ns:
        y, _ = fixed_step_solve(cls(), cos_decay, y0, t0, t1, n)
        errs.append((y - exact).abs().max().item())
    p = fitted_order([(t1 - t0) / n for n in ns], errs)
    assert 4.7 < p < 6.5, (p, errs)


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_convergence_order_lotka_volterra(cls):
    from scipy.integrate import solve_ivp

    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5]], dtype=DT)
    t0, t1 = 0.0, 3.0
    refs = []
    for row in y0.numpy():
        sol = solve_ivp(
            lambda t, u: lotka_volterra(None, torch.tensor(u[None])).numpy()[0],
            (t0, t1),
            row,
            method="DOP853",
            rtol=1e-13,
            atol=1e-13,
        )
        refs.append(sol.y[:, -1])
    ref = torch.tensor(np.array(refs), dtype=DT)
    ns = [40, 56, 80, 113, 160]
    errs = []
    for n in ns:
        y, _ = fixed_step_solve(cls(), lotka_volterra, y0, t0, t1, n)
        errs.append((y - ref).abs().max().item())
    p = fitted_order([(t1 - t0) / n for n in ns], errs)
    assert 4.7 < p < 6.7, (p, errs)
    assert errs[-1] < 1e-9


# ---------------------------------------------- (b) embedded error estimate ∝ dt^5 (local)


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_embedded_error_scaling(cls):
    y0 = torch.tensor([[1.0, 1.0]], dtype=DT)
    terms = Terms(ODEProblem(lotka_volterra, y0, (0.0, 1.0)))
    t = torch.zeros(1, dtype=DT)
    hs = [0.08, 0.04, 0.02, 0.01]
    est, true_local = [], []
    from scipy.integrate import solve_ivp

    for h in hs:
        out = cls().step(terms, t, y0, torch.tensor([h], dtype=DT), None, None)
        assert out.nf == 7  # no f0 given
        est.append(out.error.norm().item())
        ref = solve_ivp(
            lambda s, u: lotka_volterra(None, torch.tensor(u[None])).numpy()[0],
            (0.0, h),
            y0.numpy()[0],
            method="DOP853",
            rtol=2.3e-14,
            atol=1e-14,
        ).y[:, -1]
        true_local.append(np.linalg.norm(out.y1.numpy()[0] - ref))
    p_est = fitted_order(hs, est)
    assert abs(p_est - 5) < 0.3, (p_est, est)
    # the estimate bounds the (order-6) local error of the propagated solution
    assert all(tl < e for tl, e in zip(true_local[:2], est[:2]))
    p_true = fitted_order(hs[:3], true_local[:3])
    assert p_true > 5.5, (p_true, true_local)


# ------------------------------------------------------------------------------ (c) FSAL


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_fsal_and_batching(cls):
    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(4, 2, 3, generator=gen, dtype=DT)  # arbitrary trailing state shape

    def f(t, y):
        return torch.sin(y) * t[:, None, None] - 0.3 * y

    terms = Terms(ODEProblem(f, y0, (0.0, 3.0)))  # covers every t + dt below
    t = torch.tensor([0.0, 0.1, 0.5, 2.0], dtype=DT)
    dt = torch.tensor([0.1, 0.05, 0.2, 0.01], dtype=DT)
    f0 = f(t, y0)
    out = cls().step(terms, t, y0, dt, None, None, f0=f0)
    assert out.nf == 6 and out.ng == 0
    assert out.y1.shape == y0.shape and out.error.shape == y0.shape
    torch.testing.assert_close(out.f1, f(t + dt, out.y1), rtol=0, atol=0)
    # per-sample dt: each sample equals its own single-sample step
    for i in range(4):
        oi = cls().step(terms, t[i : i + 1], y0[i : i + 1], dt[i : i + 1], None, None)
        torch.testing.assert_close(oi.y1, out.y1[i : i + 1], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(oi.error, out.error[i : i + 1], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_differentiable(cls):
    y0 = torch.tensor([[1.0, 0.7], [0.4, 1.2]], dtype=DT, requires_grad=True)
    theta = torch.tensor(0.8, dtype=DT, requires_grad=True)

    def f(t, y):
        return theta * lotka_volterra(t, y)

    terms = Terms(ODEProblem(f, y0, (0.0, 1.0)))

    def run(y0_, theta_):
        nonlocal theta
        theta = theta_
        t = torch.zeros(2, dtype=DT)
        out = cls().step(terms, t, y0_, torch.tensor([0.1, 0.3], dtype=DT), None, None)
        return out.y1, out.error

    assert torch.autograd.gradcheck(run, (y0, theta))


# --------------------------------------------------------------- (d) vs torchdiffeq dopri5


def test_dopri5_matches_torchdiffeq():
    td = pytest.importorskip("torchdiffeq")
    try:
        from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU as tab
        from torchdiffeq._impl.rk_common import _runge_kutta_step
    except ImportError:  # private API moved
        pytest.skip("torchdiffeq private RK internals not available")
    del td
    # same stages and propagated weights
    for i, beta in enumerate(tab.beta):
        np.testing.assert_allclose(DOPRI5_TABLEAU.a[i + 1], beta.numpy(), rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(DOPRI5_TABLEAU.b, tab.c_sol.numpy(), rtol=1e-15, atol=1e-16)

    y0 = torch.tensor([[1.0, 1.0]], dtype=DT)
    t0 = torch.tensor(0.3, dtype=DT)
    dt = torch.tensor(0.07, dtype=DT)

    def func(t, y, perturb=None):
        return lotka_volterra(t.reshape(1), y)

    f0 = func(t0, y0)
    y1_td, f1_td, _err_td, _ = _runge_kutta_step(func, y0, f0, t0, dt, t0 + dt, tab)
    terms = Terms(ODEProblem(lotka_volterra, y0, (0.0, 1.0)))
    out = Dopri5().step(terms, t0.reshape(1), y0, dt.reshape(1), None, None, f0=f0)
    torch.testing.assert_close(out.y1, y1_td, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.f1, f1_td, rtol=0, atol=1e-12)
    # (torchdiffeq's error uses Shampine's b̂, not the classical one: not compared.)


# ------------------------------------------------------------------- initial step (Hairer)


def _initdt_reference(f, t0, u0, order, atol, rtol, dtmax=math.inf, dtmin=0.0):
    """Scalar transcription of OrdinaryDiffEq's out-of-place ode_determine_initdt."""
    norm = lambda x: math.sqrt(float(np.mean(np.square(x))))  # noqa: E731
    sk = atol + np.abs(u0) * rtol
    d0 = norm(u0 / sk)
    f0 = f(t0, u0)
    d1 = norm(f0 / sk)
    dt0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else d0 / d1 / 100
    dt0 = min(dt0, dtmax)
    u1 = u0 + dt0 * f0
    f1 = f(t0 + dt0, u1)
    if np.array_equal(f0, f1):
        return max(dtmin, 100 * dt0)
    d2 = norm((f1 - f0) / sk) / dt0
    m = max(d1, d2)
    dt1 = max(1e-6, dt0 * 1e-3) if m <= 1e-15 else 10 ** (-(2 + math.log10(m)) / order)
    return max(dtmin, min(100 * dt0, dt1, dtmax))


def test_hairer_initial_dt_matches_reference():
    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5], [10.0, 3.0], [0.0, 0.0]], dtype=DT)
    t0 = torch.tensor([0.0, 0.5, 1.0, 0.0], dtype=DT)
    dtmax = torch.tensor([1.0, 1.0, 1e-3, 1.0], dtype=DT)
    for atol, rtol in [(1e-6, 1e-3), (1e-9, 1e-9)]:
        dt, nf = hairer_initial_dt(lotka_volterra, t0, y0, None, 5, atol, rtol, dtmax=dtmax)
        assert nf == 2 and dt.shape == (4,) and dt.dtype == DT
        for i in range(4):
            ref = _initdt_reference(
                lambda t, u: lotka_volterra(None, torch.tensor(u[None])).numpy()[0],
                float(t0[i]),
                y0[i].numpy(),
                5,
                atol,
                rtol,
                dtmax=float(dtmax[i]),
            )
            assert dt[i].item() == pytest.approx(ref, rel=1e-12)
        # zero state, zero drift -> constant -> 100 * 1e-6
        assert dt[3].item() == pytest.approx(1e-4)
    f0 = lotka_volterra(t0, y0)
    dt2, nf2 = hairer_initial_dt(lotka_volterra, t0, y0, f0, 5, 1e-6, 1e-3, dtmax=dtmax)
    assert nf2 == 1
    dt3, _ = hairer_initial_dt(lotka_volterra, t0, y0, None, 5, 1e-6, 1e-3, dtmax=dtmax)
    torch.testing.assert_close(dt2, dt3, rtol=0, atol=0)


def test_hairer_initial_dt_time_dependent_and_no_grad():
    y0 = torch.tensor([[1.0], [3.0]], dtype=DT, requires_grad=True)
    t0 = torch.tensor([0.0, 1.0], dtype=DT)
    dt, nf = hairer_initial_dt(cos_decay, t0, y0, None, 5, 1e-6, 1e-3)
    assert not dt.requires_grad and nf == 2
    for i in range(2):
        ref = _initdt_reference(lambda t, u: -u * math.cos(t), float(t0[i]), y0[i].detach().numpy(), 5, 1e-6, 1e-3)
        assert dt[i].item() == pytest.approx(ref, rel=1e-12)
