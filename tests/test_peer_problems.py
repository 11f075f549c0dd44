"""Peers' own test problems through the public API (float64, closed-form oracles).

* torchdiffeq (``tests/problems.py``): the sine ODE ``y' = 2y/t + t^4 sin 2t - t^2 + 4t^3`` on
  ``[1, 8]`` with its closed form, and the linear ODE ``y' = A y`` whose solution and
  gradients come from the matrix exponential; forward and backward in time.
* torchsde (``tests/problems.py``, ``BasicSDE1``): a module with a trainable, an unused and a
  frozen (``requires_grad=False``) parameter under the continuous adjoints.
* diffrax (``test/test_sde.py``): commutative general noise with ``m != d``,
  ``dy = a y dt + y sum_j b_j dW_j``, whose pathwise solution is
  ``y0 exp((a - |b|^2/2 [Itô]) t + b . W)``.
* SciML's ``LambaEM`` on GBM: the strong error must fall as the tolerance tightens.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import fitted_order, sine_exact

import diffeqbridge as deb

F64 = torch.float64
SENSEALGS = [None, deb.BacksolveAdjoint(), deb.InterpolatingAdjoint()]
SENSE_IDS = ["default", "backsolve", "interpolating"]


# ----------------------------------------------------------------------------- torchdiffeq


@pytest.mark.parametrize("alg", [deb.Tsit5(), deb.Dopri5(), deb.Rodas4(), None], ids=["Tsit5", "Dopri5", "Rodas4", "auto"])
@pytest.mark.parametrize("tspan", [(1.0, 8.0), (8.0, 1.0)], ids=["forward", "backward"])
def test_torchdiffeq_sine_ode(alg, tspan):
    """Closed form at 50 save times, relative error below 1e-7 at tolerances 1e-9."""
    ts = torch.linspace(*tspan, 50, dtype=F64)

    def f(t, y):
        return 2 * y / t[:, None] + (t**4 * torch.sin(2 * t) - t**2 + 4 * t**3)[:, None]

    y0 = sine_exact(ts[:1]).expand(3, 1).clone()
    sol = deb.solve(deb.ODEProblem(f, y0, tspan), alg, saveat=ts, atol=1e-9, rtol=1e-9)
    assert sol.success
    ref = sine_exact(ts)[:, None, None]
    assert float(((sol.ys - ref) / ref).abs().max()) < 1e-7


class _Linear(torch.nn.Module):
    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())

    def forward(self, t, y):
        return y @ self.a.T


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=SENSE_IDS)
@pytest.mark.parametrize("tspan", [(0.0, 1.0), (1.0, 0.0), (0.5, 2.0)], ids=["forward", "backward", "offset"])
def test_torchdiffeq_linear_ode_matrix_exponential_gradients(sensealg, tspan):
    """``y(t) = exp(A (t - t0)) y0``: values and the gradients of a weighted sum of all save
    times with respect to ``A`` (an ``nn.Module`` parameter) and ``y0``."""
    gen = torch.Generator().manual_seed(1)
    d, batch = 4, 3
    a = 0.3 * torch.randn(d, d, generator=gen, dtype=F64)
    y0 = torch.randn(batch, d, generator=gen, dtype=F64).requires_grad_()
    module = _Linear(a)
    ts = torch.linspace(*tspan, 7, dtype=F64)
    sol = deb.solve(
        deb.ODEProblem(module, y0, tspan, params=module), deb.Tsit5(), saveat=ts, atol=1e-10, rtol=1e-10, sensealg=sensealg
    )
    weights = torch.randn(sol.ys.shape, generator=gen, dtype=F64)
    grad_a, grad_y0 = torch.autograd.grad((sol.ys * weights).sum(), [module.a, y0])

    a_ref = a.clone().requires_grad_()
    y0_ref = y0.detach().clone().requires_grad_()
    ref = torch.stack([y0_ref @ torch.linalg.matrix_exp(a_ref * (t - tspan[0])).T for t in ts])
    ref_a, ref_y0 = torch.autograd.grad((ref * weights).sum(), [a_ref, y0_ref])
    assert float((sol.ys - ref).abs().max()) < 1e-9
    assert float((grad_a - ref_a).abs().max()) < 1e-8 * float(ref_a.abs().max()) + 1e-8
    assert float((grad_y0 - ref_y0).abs().max()) < 1e-8


# ------------------------------------------------------------------------------- torchsde
class _GBMWithFrozen(torch.nn.Module):
    """GBM whose module also holds an unused trainable and a frozen parameter (torchsde's
    ``BasicSDE1`` pattern): ``du = (mu + frozen) u dt + s u dW``."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(0.4, dtype=F64))
        self.s = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))
        self.unused = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.frozen = torch.nn.Parameter(torch.tensor(0.0, dtype=F64), requires_grad=False)

    def drift(self, t, y):
        return (self.mu + self.frozen) * y

    def diffusion(self, t, y):
        return self.s * y


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=SENSE_IDS)
def test_frozen_and_unused_module_parameters(sensealg):
    """A frozen parameter in ``params`` crashed the continuous adjoints' backward ("One of the
    differentiated Tensors does not require grad"); gradients match the pathwise derivative
    of ``u0 exp((mu - s^2/2) T + s W)``."""
    batch = 8
    module = _GBMWithFrozen()
    y0 = torch.full((batch, 2), 0.8, dtype=F64, requires_grad=True)
    prob = deb.SDEProblem(module.drift, module.diffusion, y0, (0.0, 1.0), params=module)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 2), seed=11, dtype=F64, tol=1e-8)
    sol = deb.solve(prob, deb.SRIW1(), brownian=bm, sensealg=sensealg, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(sol.ys[-1].sum(), [module.mu, module.s, y0, module.unused], allow_unused=True)
    exact = y0 * torch.exp(module.mu - module.s**2 / 2 + module.s * bm.W(1.0))
    refs = torch.autograd.grad(exact.sum(), [module.mu, module.s, y0])
    for got, ref in zip(grads[:3], refs):  # measured: relative errors <= 3e-3
        assert float((got - ref).abs().max()) < 1e-2 * float(ref.abs().max())
    assert grads[3] is None or float(grads[3].abs().max()) == 0.0
    assert module.frozen.grad is None


# --------------------------------------------------------------------------------- diffrax
B_COMMUTATIVE = (0.2, 0.5, -0.4)


def _commutative(batch: int, interpretation: str, shape=(2,), params=False):
    """``dy = a y dt + y sum_j b_j dW_j``, state ``(batch, *shape)``, ``m = 3`` Brownian motions."""
    a = torch.tensor(0.3, dtype=F64, requires_grad=params)
    b = torch.tensor(B_COMMUTATIVE, dtype=F64, requires_grad=params)
    y0 = torch.ones(batch, *shape, dtype=F64)
    prob = deb.SDEProblem(
        lambda t, y: a * y,
        lambda t, y: y.unsqueeze(-1) * b,
        y0,
        (0.0, 1.0),
        noise="general",
        noise_dim=3,
        interpretation=interpretation,
        params=[a, b] if params else None,
    )
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 3), seed=7, dtype=F64, tol=1e-8)
    rate = a - (b * b).sum() / 2 if interpretation == "ito" else a
    exact = y0 * torch.exp(rate + bm.W(1.0) @ b).reshape(batch, *([1] * len(shape)))
    return prob, bm, exact, (a, b)


@pytest.mark.parametrize(
    "alg, order",
    [(deb.EulerHeun(), 1.0), (deb.SPaRK(), 1.0), (deb.ReversibleHeun(), 1.0)],
    ids=["EulerHeun", "SPaRK", "ReversibleHeun"],
)
def test_commutative_general_noise_strong_order_image_state(alg, order):
    """Stratonovich methods are strong order 1 on commutative noise; state ``(B, 2, 2, 3)``."""
    prob, bm, exact, _ = _commutative(8, "stratonovich", shape=(2, 2, 3))
    dts = [2.0**-k for k in range(4, 9)]
    errors = []
    for dt in dts:
        sol = deb.solve(prob, alg, dt=dt, adaptive=False, brownian=bm)
        errors.append(float((sol.ys[-1] - exact).abs().flatten(1).amax(dim=1).mean()))
    assert abs(fitted_order(dts, errors) - order) < 0.3, errors


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=SENSE_IDS)
def test_commutative_general_noise_gradients(sensealg):
    """Gradients in ``a`` and ``b`` vs the pathwise derivative of the closed form (SPaRK,
    Stratonovich, adaptive)."""
    prob, bm, exact, (a, b) = _commutative(8, "stratonovich", params=True)
    sol = deb.solve(prob, deb.SPaRK(), brownian=bm, sensealg=sensealg, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(sol.ys[-1].sum(), [a, b])
    refs = torch.autograd.grad(exact.sum(), [a, b])
    for got, ref in zip(grads, refs):
        assert float((got - ref).abs().max()) < 2e-3 * float(ref.abs().max())


# ---------------------------------------------------------------------------------- LambaEM
def _strong_error_lamba(prob, bm, exact, tol: float) -> tuple[float, float]:
    sol = deb.solve(prob, deb.LambaEM(), brownian=bm, atol=tol, rtol=tol)
    assert sol.success
    return float((sol.ys[-1] - exact).abs().flatten(1).amax(dim=1).mean()), float(sol.stats.naccept.double().mean())


def test_lamba_em_converges_as_tolerance_tightens():
    """Multiplying Lamba's noise estimate by the realized ``dW^2 - dt`` made the accepted steps
    anticipate the path; the error then stalled (GBM ``du = 0.3 u dt + 0.67 u dW``, 32 paths:
    1.4e-2 at tol 1e-3 and 1.5e-2 at tol 1e-4 with 9x the steps).  Order 1/2 in the number of
    steps means the error falls by ~2.4x for ~6x the steps."""
    batch = 32
    prob = deb.SDEProblem(lambda t, y: 0.3 * y, lambda t, y: 0.67 * y, torch.ones(batch, 1, dtype=F64), (0.0, 1.0))
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=7, dtype=F64, tol=1e-8)
    exact = torch.exp(0.3 - 0.67**2 / 2 + 0.67 * bm.W(1.0))
    (e1, n1), (e2, n2) = (_strong_error_lamba(prob, bm, exact, tol) for tol in (1e-3, 1e-4))
    assert n2 > 3 * n1
    assert e2 < 0.6 * e1, (e1, e2)


def test_default_general_ito_solver_converges():
    """``alg=None`` on general Itô noise (LambaEM) against the closed form."""
    prob, bm, exact, _ = _commutative(16, "ito")
    sol = deb.solve(prob, brownian=bm, atol=1e-4, rtol=1e-4)
    assert sol.success
    error = float((sol.ys[-1] - exact).abs().amax(dim=1).mean())
    assert error < 2.5e-2, error  # measured 1.7e-2 (~790 steps; fixed-step EM with 1024: ~1.1e-2)


@pytest.mark.parametrize("alg", [deb.Tsit5(), deb.Rodas4()], ids=["Tsit5", "Rodas4"])
def test_torchdiffeq_event_time_gradient(alg):
    """``y' = -k y``, terminal event ``y = 1/2``: ``t* = ln 2 / k``, ``dt*/dk = -ln 2 / k^2``
    (torchdiffeq's ``odeint_event`` differentiates the event time the same way)."""
    k = torch.tensor([0.5, 1.0, 2.0], dtype=F64, requires_grad=True)
    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5)
    prob = deb.ODEProblem(lambda t, y: -k[:, None] * y, torch.ones(3, 1, dtype=F64), (0.0, 5.0), params=[k])
    sol = deb.solve(prob, alg, events=[event], atol=1e-9, rtol=1e-9)
    assert all(code == deb.ReturnCode.Terminated for code in sol.retcode)
    (grad,) = torch.autograd.grad(sol.events.t.sum(), k)
    assert float((sol.events.t - math.log(2) / k).abs().max()) < 1e-8
    assert float((grad + math.log(2) / k**2).abs().max()) < 1e-6


def test_brownian_query_outside_the_tree_is_refused():
    """A float query past ``t1`` was clamped silently: ``bm(0, 2)`` on a tree over ``[0, 1]``
    returned ``W(1) - W(0)`` (variance 1, not 2).  torchsde's ``BrownianInterval`` refuses it too."""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (4, 2), seed=0, dtype=F64)
    with pytest.raises(ValueError, match=r"^t must lie inside"):
        bm(0.0, 2.0)
    with pytest.raises(ValueError, match=r"^s must lie inside"):
        bm(-0.5, 0.5)
    with pytest.raises(ValueError, match=r"^t must lie inside"):
        bm.W(1.5)
    dw, _ = bm(0.25, 1.0)  # the end points themselves are fine
    assert torch.equal(dw, bm.W(1.0) - bm.W(0.25))
