"""Gradients through ``deb.solve`` against analytic pathwise derivatives, for every sensealg.

Every test runs in float64 on one fixed Brownian path (a ``VirtualBrownianTree``) and checks
that the error against the exact pathwise derivative shrinks when the step (or the
tolerance) shrinks, and is small at the finer setting.  Errors are normwise relative
errors over the batch.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffeqbridge as deb

SENSEALGS = {
    "none": lambda: None,
    "discrete": lambda: deb.DiscreteAdjoint(),
    "discrete_ckpt": lambda: deb.DiscreteAdjoint(checkpoints=4),
    "interpolating": lambda: deb.InterpolatingAdjoint(),
    "interpolating_ckpt": lambda: deb.InterpolatingAdjoint(checkpoints=4),
    "backsolve": lambda: deb.BacksolveAdjoint(),
}
B = 4
T = 1.0


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error over the batch."""
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def _gbm_errors(interpretation: str, alg: deb.solvers.AbstractSolver, sensealg_name: str, **solve_kwargs):
    """Per-sample parameters (mu, sigma of shape (B, 1)) so that d u_T[b] / d mu[b] is per sample."""
    mu = torch.full((B, 1), 0.5, dtype=torch.float64, requires_grad=True)
    sigma = torch.full((B, 1), 0.6, dtype=torch.float64, requires_grad=True)
    prob = deb.SDEProblem(
        lambda t, y: mu * y,
        lambda t, y: sigma * y,
        torch.ones(B, 1, dtype=torch.float64),
        (0.0, T),
        interpretation=interpretation,
        params=[mu, sigma],
    )
    bm = deb.VirtualBrownianTree(0.0, T, (B, 1), seed=7)
    sol = deb.solve(prob, alg, brownian=bm, sensealg=SENSEALGS[sensealg_name](), **solve_kwargs)
    assert sol.success
    u_t = sol.ys[-1]
    g_mu, g_sigma = torch.autograd.grad(u_t.sum(), [mu, sigma])
    w_t = bm.W(T)
    u_d = u_t.detach()
    want_mu = T * u_d
    want_sigma = (w_t - (sigma.detach() * T if interpretation == "ito" else 0.0)) * u_d
    return _rel(g_mu, want_mu), _rel(g_sigma, want_sigma)


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_gbm_ito_fixed_step(sensealg: str) -> None:
    """Itô GBM with SRIW1 (fixed step): du_T/dmu = T u_T, du_T/dsigma = (W_T - sigma T) u_T."""
    coarse = _gbm_errors("ito", deb.SRIW1(), sensealg, dt=2**-4, adaptive=False)
    fine = _gbm_errors("ito", deb.SRIW1(), sensealg, dt=2**-6, adaptive=False)
    # measured (mu, sigma) at dt=2^-6: discrete/interpolating (7e-4, 1.8e-3), backsolve (1.7e-3, 1.2e-2)
    assert max(fine) < max(coarse)
    assert max(fine) < 2e-2, (coarse, fine)


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_gbm_ito_adaptive(sensealg: str) -> None:
    """Itô GBM with adaptive SOSRI: the error shrinks with the tolerance."""
    coarse = _gbm_errors("ito", deb.SOSRI(), sensealg, atol=1e-2, rtol=1e-2)
    fine = _gbm_errors("ito", deb.SOSRI(), sensealg, atol=1e-3, rtol=1e-3)
    # SOSRI's embedded error estimate makes the error follow the tolerance (the old
    # StochasticDiffEq estimate over-solved: 1.5e-3 at tol 1e-2); backsolve's backward Heun runs
    # at the forward's tolerance; BacksolveAdjoint(atol=, rtol=) tightens it
    assert max(fine) < max(coarse)
    assert max(fine) < 2.5e-2, (coarse, fine)


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
@pytest.mark.parametrize("alg", ["RKMil", "EulerHeun"])
def test_gbm_stratonovich(sensealg: str, alg: str) -> None:
    """Stratonovich GBM, u_T = u0 exp(mu T + sigma W_T): du_T/dsigma = W_T u_T."""
    solver = getattr(deb, alg)()
    coarse = _gbm_errors("stratonovich", solver, sensealg, dt=2**-4)
    fine = _gbm_errors("stratonovich", solver, sensealg, dt=2**-6)
    # measured at dt=2^-6: RKMil 1.7e-2, EulerHeun 7e-3, backsolve 9.6e-3 (sigma)
    assert max(fine) < max(coarse)
    assert max(fine) < 2.5e-2, (coarse, fine)


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_additive(sensealg: str) -> None:
    """SciML prob_sde_additive: du_T/dbeta = (T + alpha W_T)/sqrt(1+T) (SRA1 fixed step)."""
    alpha = 0.1
    errs = []
    for dt in (2**-3, 2**-5):
        beta = torch.full((B, 1), 0.05, dtype=torch.float64, requires_grad=True)
        prob = deb.SDEProblem(
            lambda t, y: beta / torch.sqrt(1 + t)[:, None] - y / (2 * (1 + t))[:, None],
            lambda t, y: (alpha * beta / torch.sqrt(1 + t)[:, None]).expand_as(y),
            torch.ones(B, 1, dtype=torch.float64),
            (0.0, T),
            noise="additive",
            params=[beta],
        )
        bm = deb.VirtualBrownianTree(0.0, T, (B, 1), seed=3)
        sol = deb.solve(prob, deb.SRA1(), dt=dt, adaptive=False, brownian=bm, sensealg=SENSEALGS[sensealg]())
        (g,) = torch.autograd.grad(sol.ys[-1].sum(), [beta])
        want = (T + alpha * bm.W(T)) / math.sqrt(1 + T)
        errs.append(_rel(g, want))
    assert errs[1] < 1e-3, errs  # the map beta -> u_T is affine: only the time discretisation matters
    assert errs[1] <= errs[0] + 1e-12


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
@pytest.mark.parametrize("alg", ["Tsit5", "Dopri5"])
def test_ode_decay(sensealg: str, alg: str) -> None:
    """y' = -theta y: dy_T/dtheta = -T y0 exp(-theta T); also dy_T/dy0 = exp(-theta T)."""
    errs = []
    for tol in (1e-4, 1e-8):
        theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
        prob = deb.ODEProblem(lambda t, y: -theta * y, y0, (0.0, 2.0), params=[theta])
        sol = deb.solve(prob, getattr(deb, alg)(), atol=tol, rtol=tol, sensealg=SENSEALGS[sensealg]())
        g_theta, g_y0 = torch.autograd.grad(sol.ys[-1].sum(), [theta, y0])
        want = -2.0 * 3.0 * math.exp(-1.4)
        errs.append(max(abs(float(g_theta) - want) / abs(want), float((g_y0 - math.exp(-1.4)).abs().max()) / math.exp(-1.4)))
    assert errs[1] < errs[0]
    assert errs[1] < 1e-6, errs


def test_saveat_several_times_and_t0() -> None:
    """A loss on intermediate outputs (adjoint jumps at every save time), y0 gradient included."""
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name, make in SENSEALGS.items():
        y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
        prob = deb.ODEProblem(lambda t, y: -theta * y, y0, (0.0, 2.0), params=[theta])
        sol = deb.solve(prob, deb.Tsit5(), atol=1e-9, rtol=1e-9, saveat=[0.0, 0.5, 1.2, 2.0], sensealg=make())
        weights = torch.tensor([0.3, 1.0, -2.0, 0.5], dtype=torch.float64)[:, None, None]
        loss = (weights * sol.ys).sum()
        grads[name] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [theta, y0])])
    ts = torch.tensor([0.0, 0.5, 1.2, 2.0], dtype=torch.float64)
    w = torch.tensor([0.3, 1.0, -2.0, 0.5], dtype=torch.float64)
    e = torch.exp(-0.7 * ts)
    want_theta = float((w * (-ts) * e).sum() * 3.0)
    want_y0 = float((w * e).sum())
    want = torch.tensor([want_theta, want_y0, want_y0], dtype=torch.float64)
    for name, g in grads.items():
        assert torch.allclose(g, want, rtol=1e-6, atol=0), (name, g, want)


def test_errors() -> None:
    """Clear errors: bad sensealg, closure parameters not in params, Itô general noise for backsolve."""
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    prob = deb.ODEProblem(lambda t, y: -w * y, y0, (0.0, 1.0))
    with pytest.raises(TypeError, match="sensealg"):
        deb.solve(prob, deb.Tsit5(), sensealg="adjoint")
    for sa in (deb.BacksolveAdjoint(), deb.InterpolatingAdjoint()):
        with pytest.raises(ValueError, match="params"):
            deb.solve(prob, deb.Tsit5(), sensealg=sa)
    # plain autograd reaches closures: fine without params
    sol = deb.solve(prob, deb.Tsit5(), sensealg=deb.DiscreteAdjoint())
    assert torch.autograd.grad(sol.ys[-1].sum(), [w])[0] < 0
    with pytest.raises(ValueError, match="checkpoints"):
        deb.DiscreteAdjoint(checkpoints=0)
    general = deb.SDEProblem(
        lambda t, y: -y, lambda t, y: torch.ones(2, 1, 2, dtype=torch.float64), y0, noise="general", noise_dim=2
    )
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        deb.solve(general, deb.EM(), dt=0.1, sensealg=deb.BacksolveAdjoint())
