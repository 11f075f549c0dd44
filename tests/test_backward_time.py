"""Backward time: ``tspan = (t0, t1)`` with ``t1 < t0``.

The oracle is the forward solve of the time-reversed problem ``s = -t``:
``dY = -f(-s, Y) ds + g(-s, Y) dB(s)`` with ``B(s) = W(-s) - W(t0)``, integrated over
``[-t0, -t1]`` with the reflected Brownian path (a :class:`Reflected` tree built from the
same tree).  ODEs must agree to the last bit (negation is exact); SDEs to rounding (the
reflected tree computes the same increments and Lévy areas by different float operations).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import diffeqbridge as deb
from diffeqbridge.engine import fixed_grid

DT = torch.float64


class Reflected(deb.VirtualBrownianTree):
    """``B(s) = W(-s)`` on ``[-b, -a]`` for a tree ``W`` on ``[a, b]``, with ``J_B(s) = -J_W(-s)``
    (``dJ_B/ds = B``): the engine only uses differences of ``W`` and ``J``, which are then
    the exact negatives of the tree's, so the reflected solve sees bitwise the same numbers."""

    def __init__(self, base: deb.VirtualBrownianTree):  # noqa: D107 (no super().__init__: a view)
        self.base = base
        self.t0, self.t1 = -base.t1, -base.t0
        self.shape, self.dtype, self.device = base.shape, base.dtype, base.device
        self.batch_size, self.seed, self.tol, self.depth = base.batch_size, base.seed, base.tol, base.depth
        self._padded = base._padded  # the fused path's compiled depth (increment_from dispatches on it)

    def evaluate(self, t):  # type: ignore[override]
        w, j = self.base.evaluate(-self._times(t))
        return w, -j

    def evaluate_scalar(self, t, levy=True):  # type: ignore[override]
        w, j = self.base.evaluate_scalar(-float(t), levy=levy)
        return w, None if j is None else -j


def reversed_problem(prob: deb.ODEProblem) -> deb.ODEProblem:
    """The forward problem in ``s = -t``."""
    t0, t1 = prob.tspan
    f = prob.f if hasattr(prob, "f") else prob.drift

    def drift(s: Tensor, y: Tensor) -> Tensor:
        return -f(-s, y)

    if not prob.is_sde:
        return deb.ODEProblem(drift, prob.y0, (-t0, -t1), params=prob.params)
    g = prob.diffusion
    return deb.SDEProblem(
        drift,
        lambda s, y: g(-s, y),
        prob.y0,
        (-t0, -t1),
        noise=prob.noise,
        interpretation=prob.interpretation,
        noise_dim=prob.noise_dim,
        params=prob.params,
    )


def _ode(y0: Tensor, theta: Tensor | None = None) -> deb.ODEProblem:
    th = theta if theta is not None else torch.tensor(0.7, dtype=DT)

    def f(t: Tensor, y: Tensor) -> Tensor:
        return torch.stack([y[:, 1], -th * torch.sin(y[:, 0]) + 0.1 * torch.cos(t)], dim=1)

    return deb.ODEProblem(f, y0, (2.0, -1.0), params=[th] if theta is not None else None)


@pytest.mark.parametrize("alg", [deb.Tsit5(), deb.Dopri5(), deb.Rodas4(), deb.Kvaerno5()])
def test_ode_backward_equals_reversed_forward_bitwise(alg):
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5], [-1.0, 2.0]], dtype=DT)
    prob = _ode(y0)
    saveat = [2.0, 1.0, 0.25, -1.0]
    back = deb.solve(prob, alg, saveat=saveat, atol=1e-7, rtol=1e-7)
    fwd = deb.solve(reversed_problem(prob), alg, saveat=[-s for s in saveat], atol=1e-7, rtol=1e-7)
    assert back.success and fwd.success
    assert torch.equal(back.ts, torch.tensor(saveat, dtype=DT))
    assert torch.equal(back.stats.naccept, fwd.stats.naccept)
    assert torch.equal(back.ys, fwd.ys)
    # and it is the right answer: integrating forward again returns to the start
    again = deb.solve(deb.ODEProblem(prob.f, back.ys[-1], (-1.0, 2.0)), alg, atol=1e-11, rtol=1e-11)
    assert (again.ys[-1] - y0).abs().max() < 1e-5


def _sde(batch: int, noise: str, interpretation: str = "ito") -> deb.SDEProblem:
    y0 = torch.linspace(0.5, 1.5, batch, dtype=DT).reshape(batch, 1)

    def drift(t: Tensor, y: Tensor) -> Tensor:
        return -0.8 * y + 0.3 * torch.sin(t).reshape(-1, 1)

    if noise == "additive":

        def diffusion(t: Tensor, y: Tensor) -> Tensor:
            return (0.4 + 0.1 * t).reshape(-1, 1).expand_as(y)
    else:

        def diffusion(t: Tensor, y: Tensor) -> Tensor:
            return 0.3 * y * (1.0 + 0.1 * torch.cos(t)).reshape(-1, 1)

    return deb.SDEProblem(drift, diffusion, y0, (1.0, 0.0), noise=noise, interpretation=interpretation)


CASES = [
    (deb.EM(), dict(dt=0.01), "diagonal", "ito"),
    (deb.EulerHeun(), dict(dt=0.01), "diagonal", "stratonovich"),
    (deb.RKMil(), dict(dt=0.01), "diagonal", "ito"),
    (deb.SOSRA(), dict(atol=1e-2, rtol=1e-2), "additive", "ito"),
    (deb.SRIW1(), dict(atol=1e-2, rtol=1e-2), "diagonal", "ito"),
    (deb.SOSRI(), dict(atol=1e-2, rtol=1e-2), "diagonal", "ito"),
    (deb.LambaEM(), dict(atol=1e-2, rtol=1e-2), "diagonal", "ito"),
    (deb.ImplicitRKMil(), dict(atol=1e-2, rtol=1e-2), "diagonal", "ito"),
]


def _case_id(x: object) -> str | None:
    return type(x).__name__ if isinstance(x, deb.solvers.base.AbstractSolver) else None


@pytest.mark.parametrize("alg,kw,noise,interp", CASES, ids=_case_id)
def test_sde_backward_equals_reversed_forward_pathwise(alg, kw, noise, interp):
    prob = _sde(6, noise, interp)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (6, 1), seed=3, dtype=DT)
    saveat = [1.0, 0.6, 0.0]
    back = deb.solve(prob, alg, saveat=saveat, brownian=bm, **kw)
    fwd = deb.solve(reversed_problem(prob), alg, saveat=[-s for s in saveat], brownian=Reflected(bm), **kw)
    assert back.success and fwd.success
    assert torch.equal(back.stats.naccept, fwd.stats.naccept)
    assert torch.equal(back.stats.nreject, fwd.stats.nreject)
    assert torch.equal(back.ys, fwd.ys)


def test_em_backward_matches_hand_loop_and_law():
    """EM backwards by hand: ``y += f(t) h + g ΔW`` with ``h < 0``, ``ΔW = W(t + h) - W(t)``;
    and the law of an OU path run backwards (mean ``y0 e^{-θ (t1 - t0)}``: the drift's
    sign flips with the direction of time, the noise variance is ``|h|`` per step)."""
    batch, h = 4000, 0.05
    prob = deb.SDEProblem(lambda t, y: 0.5 * y, lambda t, y: 0.2 * torch.ones_like(y), torch.ones(batch, 1, dtype=DT), (1.0, 0.0))
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=5, dtype=DT)
    sol = deb.solve(prob, deb.EM(), dt=h, brownian=bm)
    y = torch.ones(batch, 1, dtype=DT)
    grid = fixed_grid(1.0, 0.0, h)
    assert len(grid) == 21 and grid[-1] == 0.0
    for a, b in zip(grid[:-1], grid[1:]):
        y = y + 0.5 * y * (b - a) + 0.2 * bm(a, b)[0]
    assert (sol.ys[-1] - y).abs().max() < 1e-13
    # E[y(0)] = e^{-0.5}, Var = 0.04 (1 - e^{-1}) / 1 (exact OU in reversed time) up to O(h)
    mean, var = float(sol.ys[-1].mean()), float(sol.ys[-1].var())
    assert abs(mean - math.exp(-0.5)) < 4 * math.sqrt(var / batch) + 0.02
    assert abs(var - 0.04 * (1 - math.exp(-1.0))) < 0.15 * 0.04


def test_levy_area_of_reversed_interval():
    """``increment_from(t, ., s, .)`` with ``s < t`` gives ``(W(s) - W(t), H_[s,t])``."""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (3, 2), seed=1, dtype=DT)
    s, t = torch.full((3,), 0.3, dtype=DT), torch.full((3,), 0.71, dtype=DT)
    dw_f, h_f = bm.increment_from(s, bm.evaluate(s), t, bm.evaluate(t))
    dw_b, h_b = bm.increment_from(t, bm.evaluate(t), s, bm.evaluate(s))
    assert torch.allclose(dw_b, -dw_f, rtol=0, atol=1e-15)
    assert torch.allclose(h_b, h_f, rtol=0, atol=1e-14)


SENSEALGS = [
    None,
    deb.DiscreteAdjoint(),
    deb.DiscreteAdjoint(checkpoints=3),
    deb.InterpolatingAdjoint(),
    deb.InterpolatingAdjoint(checkpoints=2),
    deb.BacksolveAdjoint(),
]


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=repr)
def test_ode_gradients_backward(sensealg):
    theta = torch.tensor(0.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5]], dtype=DT, requires_grad=True)
    kw = dict(atol=1e-10, rtol=1e-10, saveat=[2.0, 0.5, -1.0], sensealg=sensealg)
    sol = deb.solve(_ode(y0, theta), deb.Tsit5(), **kw)
    assert sol.success
    loss = (sol.ys[1:] ** 2).sum()
    g_y0, g_th = torch.autograd.grad(loss, [y0, theta])
    ref_th = theta.detach().clone().requires_grad_(True)
    ref_y0 = y0.detach().clone().requires_grad_(True)
    ref = deb.solve(
        reversed_problem(_ode(ref_y0, ref_th)), deb.Tsit5(), atol=1e-10, rtol=1e-10, saveat=[-2.0, -0.5, 1.0], sensealg=sensealg
    )
    assert torch.equal(sol.ys, ref.ys)
    r_y0, r_th = torch.autograd.grad((ref.ys[1:] ** 2).sum(), [ref_y0, ref_th])
    tol = 1e-12
    assert torch.allclose(g_y0, r_y0, rtol=tol, atol=tol)
    assert torch.allclose(g_th, r_th, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "sensealg", [None, deb.DiscreteAdjoint(checkpoints=2), deb.InterpolatingAdjoint(), deb.BacksolveAdjoint()], ids=repr
)
@pytest.mark.parametrize("interp", ["ito", "stratonovich"])
def test_sde_gradients_backward(sensealg, interp):
    """Backward SDE gradients equal those of the reversed forward problem on the reflected path
    (to rounding for the discrete sensealgs; to the backsolve's discretisation for the
    continuous adjoint, whose Itô correction flips sign with the direction of time)."""
    batch = 4
    theta = torch.tensor(0.8, dtype=DT, requires_grad=True)

    def make(th: Tensor, y0: Tensor, tspan: tuple[float, float], sign: float) -> deb.SDEProblem:
        return deb.SDEProblem(
            lambda t, y: sign * (-th * y), lambda t, y: 0.3 * y * (1 + th * 0.1), y0, tspan, interpretation=interp, params=[th]
        )

    y0 = torch.linspace(0.5, 1.0, batch, dtype=DT).reshape(batch, 1)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=2, dtype=DT)
    alg = deb.EM() if interp == "ito" else deb.EulerHeun()
    sol = deb.solve(make(theta, y0, (1.0, 0.0), 1.0), alg, dt=2.0**-8, brownian=bm, sensealg=sensealg)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), [theta])
    ref_th = theta.detach().clone().requires_grad_(True)
    ref = deb.solve(make(ref_th, y0, (-1.0, 0.0), -1.0), alg, dt=2.0**-8, brownian=Reflected(bm), sensealg=sensealg)
    assert torch.equal(sol.ys, ref.ys)
    (r,) = torch.autograd.grad(ref.ys[-1].sum(), [ref_th])
    tol = 1e-11 if not isinstance(sensealg, deb.BacksolveAdjoint) else 1e-9
    assert abs(float(g) - float(r)) < tol * (1 + abs(float(r)))


def test_validation_of_backward_saveat():
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=DT), (1.0, 0.0))
    sol = deb.solve(prob, deb.Tsit5(), saveat=[0.75, 0.5, 0.0])
    assert torch.equal(sol.ts, torch.tensor([0.75, 0.5, 0.0], dtype=DT))
    assert torch.allclose(sol.ys[-1], torch.full((2, 1), math.e, dtype=DT), rtol=1e-5)
    with pytest.raises(ValueError, match="decreasing"):
        deb.solve(prob, deb.Tsit5(), saveat=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="decreasing"):
        deb.solve(prob, deb.Tsit5(), saveat=[1.0, 0.2, 0.5])
    with pytest.raises(ValueError, match="inside tspan"):
        deb.solve(prob, deb.Tsit5(), saveat=[1.5, 0.5])
    with pytest.raises(ValueError, match="increasing"):
        deb.solve(deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=DT), (0.0, 1.0)), deb.Tsit5(), saveat=[1.0, 0.5])
    with pytest.raises(ValueError, match="t1 != t0"):
        deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=DT), (1.0, 1.0))


def test_reversible_heun_backward_exact_backsolve():
    batch = 3
    theta = torch.tensor(0.5, dtype=DT, requires_grad=True)
    prob = deb.SDEProblem(
        lambda t, y: -theta * torch.tanh(y),
        lambda t, y: 0.2 * torch.cos(y),
        torch.ones(batch, 1, dtype=DT),
        (1.0, 0.0),
        interpretation="stratonovich",
        params=[theta],
    )
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=4, dtype=DT)
    a = deb.solve(prob, deb.ReversibleHeun(), dt=0.05, brownian=bm, sensealg=deb.BacksolveAdjoint())
    b = deb.solve(prob, deb.ReversibleHeun(), dt=0.05, brownian=bm, sensealg=deb.DiscreteAdjoint())
    assert torch.equal(a.ys, b.ys)
    (ga,) = torch.autograd.grad(a.ys[-1].sum(), [theta])
    (gb,) = torch.autograd.grad(b.ys[-1].sum(), [theta])
    assert abs(float(ga) - float(gb)) < 1e-12 * (1 + abs(float(gb)))
