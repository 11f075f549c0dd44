"""Issue 12 item 2: ``BacksolveAdjoint`` integrates its augmented system on the engine's loop.

Per-sample backward steps (a sample's gradient does not depend on its batch), return codes
instead of ``RuntimeError`` when ``max_steps`` is hit, agreement with ``DiscreteAdjoint``
within O(tol) on the wave SDE at tol 1e-4 and 1e-6 (the issue's reproducer stopped with
"backward solve exceeded max_steps" at 1e-6), and gradients against closed forms on an ODE
and an SDE.  float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffeqbridge as deb

F64 = torch.float64
MAX_ITERS = int(deb.ReturnCode.MaxIters)
SUCCESS = int(deb.ReturnCode.Success)


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Normwise relative difference of two lists of gradients."""
    diff = torch.cat([(g - w).reshape(-1) for g, w in zip(got, want)])
    ref = torch.cat([w.reshape(-1) for w in want])
    return float(diff.norm() / ref.norm())


def _wave_gradients(sensealg, tol: float, t_end: float, batch: int):
    """``prob_sde_wave`` with its two coefficients as parameters: d Σ u(T)² / d(u0, c1, c2)."""
    c1 = torch.tensor(0.01, dtype=F64, requires_grad=True)
    c2 = torch.tensor(0.1, dtype=F64, requires_grad=True)
    y0 = torch.linspace(0.5, 1.0, batch, dtype=F64).reshape(batch, 1).requires_grad_(True)
    prob = deb.SDEProblem(
        lambda t, y: -c1 * torch.sin(y) * torch.cos(y) ** 3,
        lambda t, y: c2 * torch.cos(y) ** 2,
        y0,
        (0.0, t_end),
        noise="diagonal",
        params=[c1, c2],
    )
    bm = deb.VirtualBrownianTree(0.0, t_end, (batch, 1), seed=5)
    sol = deb.solve(prob, deb.SOSRI(), brownian=bm, atol=tol, rtol=tol, sensealg=sensealg)
    assert sol.success
    return list(torch.autograd.grad(sol.ys[-1].square().sum(), [y0, c1, c2])), sol


@pytest.mark.parametrize("tol, t_end, batch", [(1e-4, 1.0, 4), (1e-6, 0.02, 2)])
def test_wave_backsolve_agrees_with_discrete_within_tol(tol, t_end, batch):
    """Measured (normwise over dL/du0, dL/dc1, dL/dc2): 2.7e-4 at 1e-4, ~2e-6 at 1e-6."""
    want, _ = _wave_gradients(deb.DiscreteAdjoint(), tol, t_end, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failure warning
        got, sol = _wave_gradients(deb.BacksolveAdjoint(), tol, t_end, batch)
    assert bool((sol.stats.extra["adjoint_retcodes"] == SUCCESS).all())
    assert _rel(got, want) < 20 * tol


def _decay(lam: torch.Tensor, y0: torch.Tensor, sensealg, **kw):
    """y' = -λ_b y with per-sample rates ``lam`` (B, 1) (a parameter)."""
    prob = deb.ODEProblem(lambda t, y: -lam * y, y0, (0.0, 1.0), params=[lam])
    return deb.solve(prob, deb.Tsit5(), sensealg=sensealg, **kw)


def test_per_sample_backward_steps_and_batch_independence():
    """Rates 1 and 30: the fast sample takes many more backward steps; the slow sample's
    gradient solved alone equals its gradient in the batch bit for bit."""
    grads, steps = [], []
    for rates in ([1.0, 30.0], [1.0]):
        lam = torch.tensor(rates, dtype=F64).reshape(-1, 1).requires_grad_(True)
        y0 = torch.ones(len(rates), 1, dtype=F64, requires_grad=True)
        sol = _decay(lam, y0, deb.BacksolveAdjoint(), atol=1e-7, rtol=1e-7)
        sol.ys[-1].sum().backward()
        grads.append((y0.grad[0].clone(), lam.grad[0].clone()))
        steps.append(sol.stats.extra["adjoint_naccept"])
    assert int(steps[0][1]) > 3 * int(steps[0][0])
    assert int(steps[1][0]) == int(steps[0][0])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # and the values: dy(1)/dy0 = e^-1, dy(1)/dλ = -e^-1
    assert abs(float(grads[1][0]) - math.exp(-1.0)) < 1e-7
    assert abs(float(grads[1][1]) + math.exp(-1.0)) < 1e-7


def test_sde_backward_steps_are_per_sample():
    """OU with rates 0.5 and 10 (SOSRA, tol 1e-3): per-sample backward step counts, and the slow
    sample's gradient does not depend on the batch."""
    out = []
    for rates in ([0.5, 10.0], [0.5]):
        batch = len(rates)
        k = torch.tensor(rates, dtype=F64).reshape(-1, 1).requires_grad_(True)
        y0 = torch.ones(batch, 1, dtype=F64, requires_grad=True)
        prob = deb.SDEProblem(
            lambda t, y: -k * y, lambda t, y: 0.3 * torch.ones_like(y), y0, (0.0, 1.0), noise="additive", params=[k]
        )
        bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=2)
        sol = deb.solve(prob, deb.SOSRA(), brownian=bm, atol=1e-3, rtol=1e-3, sensealg=deb.BacksolveAdjoint())
        sol.ys[-1].sum().backward()
        out.append((y0.grad[0].clone(), k.grad[0].clone(), sol.stats.extra["adjoint_naccept"]))
    (gy_b, gk_b, steps_b), (gy_1, gk_1, steps_1) = out
    assert int(steps_b[1]) > 2 * int(steps_b[0]) and int(steps_1[0]) == int(steps_b[0])
    assert torch.equal(gy_b, gy_1) and torch.equal(gk_b, gk_1)
    # additive noise: dy(1)/dy0 = e^-k exactly, whatever the path
    assert abs(float(gy_1) - math.exp(-0.5)) < 1e-3


def test_max_steps_gives_a_retcode_not_an_exception():
    """Forward at 1e-4, backward at 1e-12 with max_steps=60: the fast sample runs out of
    steps in the backward solve -> MaxIters in stats.extra, a RuntimeWarning, NaN for its
    dL/dy0 and for the shared parameter; the slow sample's dL/dy0 stays finite and right."""
    lam = torch.tensor([[0.0], [40.0]], dtype=F64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=F64, requires_grad=True)
    scale = torch.tensor(1.0, dtype=F64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -scale * lam * y, y0, (0.0, 1.0), params=[lam, scale])
    sol = deb.solve(prob, deb.Tsit5(), atol=1e-4, rtol=1e-4, max_steps=60, sensealg=deb.BacksolveAdjoint(atol=1e-12, rtol=1e-12))
    assert sol.success
    with pytest.warns(RuntimeWarning, match="backward solve failed for 1 of 2"):
        sol.ys[-1].sum().backward()
    codes = sol.stats.extra["adjoint_retcodes"].tolist()
    assert codes == [SUCCESS, MAX_ITERS]
    assert abs(float(y0.grad[0]) - 1.0) < 1e-12 and math.isnan(float(y0.grad[1]))
    assert math.isnan(float(scale.grad))


def test_ode_gradient_matches_closed_form_as_tol_shrinks():
    """y' = -θ y: dy(1)/dθ = -y0 e^-θ, dy(1)/dy0 = e^-θ; the error follows the tolerance."""
    errs = []
    for tol in (1e-5, 1e-9):
        theta = torch.tensor(0.7, dtype=F64, requires_grad=True)
        y0 = torch.tensor([[1.0], [-2.0]], dtype=F64, requires_grad=True)
        prob = deb.ODEProblem(lambda t, y: -theta * y, y0, (0.0, 1.0), params=[theta])
        sol = deb.solve(prob, deb.Dopri5(), atol=tol, rtol=tol, sensealg=deb.BacksolveAdjoint())
        g = torch.autograd.grad(sol.ys[-1].sum(), [y0, theta])
        e = math.exp(-0.7)
        errs.append(_rel(list(g), [torch.full_like(y0, e), torch.tensor(-(1.0 - 2.0) * e, dtype=F64)]))
    assert errs[1] < 1e-7 and errs[1] < errs[0]


def test_sde_gradient_matches_pathwise_derivative():
    """Itô GBM (SOSRI, adaptive forward and backward): du(1)/dμ = u(1), du(1)/dσ = (W(1) - σ) u(1)."""
    batch = 4
    errs = []
    for tol in (1e-2, 1e-3):
        mu = torch.full((batch, 1), 0.5, dtype=F64, requires_grad=True)
        sigma = torch.full((batch, 1), 0.6, dtype=F64, requires_grad=True)
        prob = deb.SDEProblem(
            lambda t, y: mu * y, lambda t, y: sigma * y, torch.ones(batch, 1, dtype=F64), (0.0, 1.0), params=[mu, sigma]
        )
        bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=7)
        sol = deb.solve(prob, deb.SOSRI(), brownian=bm, atol=tol, rtol=tol, sensealg=deb.BacksolveAdjoint())
        g = torch.autograd.grad(sol.ys[-1].sum(), [mu, sigma])
        u = sol.ys[-1].detach()
        errs.append(_rel(list(g), [u, (bm.W(1.0) - 0.6) * u]))
    assert errs[1] < errs[0] and errs[1] < 5e-3, errs  # measured ~1.5e-3 at 1e-3


def test_seminorm_false_is_refused():
    with pytest.raises(ValueError, match="seminorm"):
        deb.BacksolveAdjoint(seminorm=False)


def test_fixed_step_parameter_gradient_ignores_iterations_after_the_end():
    """A fixed-step ODE backward solve runs masked iterations until the loop's next stop check
    (``check_every=8``); finished lanes add nothing to dL/dθ: the gradient equals the one of
    ``check_every=1`` and the closed form dy(1)/dθ = -y0 e^-θ to the scheme's accuracy."""
    grads = []
    for every in (1, 8):
        theta = torch.tensor(0.7, dtype=F64, requires_grad=True)
        y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
        prob = deb.ODEProblem(lambda t, y: -theta * y, y0, (0.0, 1.0), params=[theta])
        sol = deb.solve(prob, deb.Tsit5(), dt=0.1, adaptive=False, check_every=every, sensealg=deb.BacksolveAdjoint())
        (g,) = torch.autograd.grad(sol.ys[-1].sum(), [theta])
        grads.append(g)
    assert torch.equal(grads[0], grads[1])
    assert abs(float(grads[1]) + 3.0 * math.exp(-0.7)) < 1e-6


def _gbm_tight(sensealg, max_steps: int = 100_000):
    """Itô GBM ``du = 0.5 u dt + 0.6 u dW`` on [0, 1/4], ``SRIW1`` at tol 1e-6, B = 2; the
    gradient of ``Σ u(T)`` and its pathwise value ``(T u(T), (W(T) - σT) u(T))``."""
    batch, t_end = 2, 0.25
    mu = torch.full((batch, 1), 0.5, dtype=F64, requires_grad=True)
    sigma = torch.full((batch, 1), 0.6, dtype=F64, requires_grad=True)
    prob = deb.SDEProblem(
        lambda t, y: mu * y, lambda t, y: sigma * y, torch.ones(batch, 1, dtype=F64), (0.0, t_end), params=[mu, sigma]
    )
    bm = deb.VirtualBrownianTree(0.0, t_end, (batch, 1), seed=7)
    sol = deb.solve(prob, deb.SRIW1(), brownian=bm, atol=1e-6, rtol=1e-6, max_steps=max_steps, sensealg=sensealg)
    assert sol.success
    got = list(torch.autograd.grad(sol.ys[-1].sum(), [mu, sigma]))
    u = sol.ys[-1].detach()
    return got, [t_end * u, (bm.W(t_end) - 0.6 * t_end) * u], sol


def test_gbm_tight_tolerance_backsolve_with_looser_backward_tolerance():
    """Forward at 1e-6, backward at 1e-4: Success, gradient within O(backward tol) of the
    pathwise one (measured 1.3e-4 normwise, ``DiscreteAdjoint()`` 6.9e-6; ~420 backward
    attempts per sample, where the default backward at 1e-6 takes 31,000–37,000 and 96 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want, sol = _gbm_tight(deb.BacksolveAdjoint(atol=1e-4, rtol=1e-4))
    assert bool((sol.stats.extra["adjoint_retcodes"] == SUCCESS).all())
    assert _rel(got, want) < 1e-3
    assert int((sol.stats.extra["adjoint_naccept"] + sol.stats.extra["adjoint_nreject"]).max()) < 2_000


def test_gbm_tight_tolerance_backsolve_out_of_steps_says_why():
    """The default backward at 1e-6 runs out of ``max_steps`` (its Heun/Euler estimate is first
    order: steps ∝ 1/tol): ``MaxIters``, NaN gradients, and a warning naming the remedies."""
    with pytest.warns(RuntimeWarning, match=r"1/tol.*BacksolveAdjoint\(atol=1e-4"):
        got, _, sol = _gbm_tight(deb.BacksolveAdjoint(), max_steps=3_000)
    assert bool((sol.stats.extra["adjoint_retcodes"] == MAX_ITERS).all())
    assert all(bool(torch.isnan(g).all()) for g in got)
