"""Solver-heuristic regularization (``solve(..., regularize=...)``, Pal et al. 2021/2023).

The engine's decisions are recorded by a solver wrapper that keeps every step call's inputs
and output; the tests replay them independently of the engine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffeqbridge as deb
from diffeqbridge.controller import scaled_error_norm
from diffeqbridge.regularization import (
    eigen_estimate,
    real_stability_interval,
    stability_size,
)
from diffeqbridge.solvers.runge_kutta import DOPRI5_TABLEAU, TSIT5_TABLEAU

T_END = 1.0


def _recording(cls: type) -> type:
    """A subclass of solver ``cls`` that records ``(t, y, dt, dw, levy, out)`` of every call."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls: list[tuple] = []

        def step(self, terms, t, y, dt, dw, levy_h, f0=None):
            out = super().step(terms, t, y, dt, dw, levy_h, f0)
            self.calls.append(
                (
                    t.detach().clone(),
                    y.detach().clone(),
                    dt.detach().clone(),
                    dw,
                    levy_h,
                    out.y1.detach().clone(),
                    out.error.detach().clone(),
                    out.nf,
                    out.ng,
                )
            )
            return out

    Recording.__name__ = cls.__name__
    return Recording


def _sde(theta: torch.Tensor, batch: int = 3) -> deb.SDEProblem:
    y0 = torch.linspace(0.5, 1.5, 2 * batch, dtype=torch.float64).reshape(batch, 2)
    return deb.SDEProblem(
        lambda t, y: -theta * y**3 + 0.5 * y, lambda t, y: 0.4 * torch.sin(y) + 0.1, y0, (0.0, T_END), params=[theta]
    )


def _ode(theta: torch.Tensor, batch: int = 3) -> deb.ODEProblem:
    y0 = torch.linspace(0.5, 1.5, 2 * batch, dtype=torch.float64).reshape(batch, 2)
    return deb.ODEProblem(lambda t, y: -theta * y**3 + torch.flip(y, [1]), y0, (0.0, T_END), params=[theta])


def _accepted(calls: list[tuple], atol: float, rtol: float) -> list[torch.Tensor]:
    """Per call, the ``(B,)`` mask of active samples whose step the controller accepted."""
    masks = []
    for t, y, _dt, _dw, _h, y1, err, *_ in calls:
        eest = scaled_error_norm(err, y, y1, atol, rtol)
        masks.append((t < T_END) & (eest <= 1.0) & torch.isfinite(y1).flatten(1).all(1))
    return masks


def _replay(solver, prob, calls, masks, atol, rtol):
    """The forward with frozen controller decisions: same steps, same noise, θ live."""
    terms = deb.problem.Terms(prob)
    y = prob.y0
    total = torch.zeros(y.shape[0], dtype=y.dtype)
    for (t, _y, dt, dw, levy, *_), acc in zip(calls, masks):
        out = type(solver).__mro__[1].step(solver, terms, t, y, dt, dw, levy, None)
        eest = scaled_error_norm(out.error, y, out.y1, atol, rtol)
        total = total + torch.where(acc, eest * dt, torch.zeros_like(eest))
        y = torch.where(acc[:, None], out.y1, y)
    return total, y


@pytest.mark.parametrize("cls,make,tol", [(deb.SOSRI, _sde, 0.05), (deb.Tsit5, _ode, 1e-6)])
def test_global_error_equals_forward_estimates_and_fd_gradient(cls, make, tol):
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    solver = _recording(cls)()
    prob = make(theta)
    atol = rtol = tol
    sol = deb.solve(prob, solver, atol=atol, rtol=rtol, regularize="error")
    assert sol.success
    calls = list(solver.calls)
    masks = _accepted(calls, atol, rtol)
    # the recorded accepted steps are the engine's: same count, same final state
    assert torch.equal(torch.stack(masks).sum(0), sol.stats.naccept)
    expected = sum(
        torch.where(m, scaled_error_norm(c[6], c[1], c[5], atol, rtol) * c[2], torch.zeros(3, dtype=torch.float64))
        for c, m in zip(calls, masks)
    )
    torch.testing.assert_close(sol.regularization.detach(), expected, rtol=1e-12, atol=0)
    assert bool((expected > 0).all())

    (grad,) = torch.autograd.grad(sol.regularization.sum(), theta)
    with torch.no_grad():
        r0, y_end = _replay(solver, make(theta), calls, masks, atol, rtol)
        torch.testing.assert_close(y_end, sol.ys[-1].detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r0, expected, rtol=1e-12, atol=0)
        h = 1e-3  # the replay is smooth in θ (frozen decisions); smaller h only adds rounding noise
        rp = _replay(solver, make(theta + h), calls, masks, atol, rtol)[0].sum()
        rm = _replay(solver, make(theta - h), calls, masks, atol, rtol)[0].sum()
    fd = (rp - rm) / (2 * h)
    assert abs(float(grad)) > 1e-3
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-10)


def test_global_stiffness_matches_replayed_eigen_estimates():
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    solver = _recording(deb.Tsit5)()
    prob = _ode(theta)
    sols = {agg: deb.solve(prob, solver, regularize=deb.Regularization("stiffness", aggregate=agg)) for agg in ("max", "mean")}
    n = len(solver.calls) // 2
    calls = solver.calls[:n]  # the "max" solve
    masks = _accepted(calls, 1e-6, 1e-3)
    f = prob.drift
    with torch.no_grad():
        vals = []
        for (t, _y, dt, _dw, _h, y1, err, *_), _m in zip(calls, masks):
            y_hat = y1 - err
            vals.append(eigen_estimate(f(t + dt, y1), f(t + dt, y_hat), y1, y_hat) / 3.5068)
        vals_t = torch.stack(vals)
        m = torch.stack(masks)
        peak = torch.where(m, vals_t, torch.full_like(vals_t, -1.0)).max(0).values
        mean = torch.where(m, vals_t, torch.zeros_like(vals_t)).sum(0) / m.sum(0)
    torch.testing.assert_close(sols["max"].regularization.detach(), peak, rtol=1e-10, atol=0)
    torch.testing.assert_close(sols["mean"].regularization.detach(), mean, rtol=1e-10, atol=0)
    # one extra drift evaluation per attempted step (FSAL gives f(y1)), counted apart from nf
    assert torch.equal(sols["max"].stats.extra["nf_regularization"], sols["max"].stats.nsteps)
    (g,) = torch.autograd.grad(sols["mean"].regularization.sum(), theta)
    assert torch.isfinite(g) and float(g) != 0.0


@pytest.mark.parametrize("cls,make", [(deb.SOSRI, _sde), (deb.LambaEM, _sde), (deb.Tsit5, _ode), (deb.Dopri5, _ode)])
def test_local_costs_one_step_per_sample_and_biased_equals_a_forward_step(cls, make):
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    solver = _recording(cls)()
    prob = make(theta)
    atol, rtol = (0.05, 0.05) if prob.is_sde else (1e-6, 1e-3)
    reg = deb.Regularization("local_error", sampling="biased", seed=3)
    sol = deb.solve(prob, solver, atol=atol, rtol=rtol, regularize=reg)
    assert sol.success
    forward_calls = solver.calls[:-1]
    extra_call = solver.calls[-1]
    # exactly one extra (batched) step: one per sample, counted apart from the solve's stats
    plain = _recording(cls)()
    base = deb.solve(prob, plain, atol=atol, rtol=rtol)
    assert len(solver.calls) == len(plain.calls) + 1
    assert torch.equal(base.stats.nf, sol.stats.nf) and torch.equal(base.stats.nsteps, sol.stats.nsteps)
    assert sol.stats.extra["nsteps_regularization"].tolist() == [1, 1, 1]
    assert sol.stats.extra["nf_regularization"].tolist() == [extra_call[7]] * 3
    assert sol.stats.extra["ng_regularization"].tolist() == [extra_call[8]] * 3
    # biased: t1 is an accepted step time and the step is the forward's own step (same y, dt, noise)
    masks = _accepted(forward_calls, atol, rtol)
    values = torch.stack([scaled_error_norm(c[6], c[1], c[5], atol, rtol) * c[2] for c in forward_calls])
    values = torch.where(torch.stack(masks), values, torch.full_like(values, float("inf")))
    gap = (values - sol.regularization.detach()).abs().min(0).values
    assert float(gap.max()) <= 1e-12 * float(sol.regularization.detach().abs().max())
    (g,) = torch.autograd.grad(sol.regularization.sum(), theta)
    assert torch.isfinite(g)


def test_local_unbiased_one_differentiable_step_fd_gradient_and_sensealgs():
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    prob = _sde(theta)
    tree = deb.VirtualBrownianTree(0.0, T_END, (3, 2), seed=5)
    kw = {"atol": 0.05, "rtol": 0.05, "brownian": tree}
    sol = deb.solve(prob, deb.SOSRI(), regularize=deb.Regularization("local_error", seed=11), **kw)
    base = deb.solve(prob, deb.SOSRI(), **kw)
    # the forward is untouched by the recorder
    assert torch.equal(sol.ys, base.ys) and torch.equal(sol.stats.nf, base.stats.nf)
    assert sol.stats.extra["nsteps_regularization"].tolist() == [1, 1, 1]
    solver = _recording(deb.SOSRI)()
    sol2 = deb.solve(prob, solver, regularize=deb.Regularization("local_error", seed=11), **kw)
    torch.testing.assert_close(sol2.regularization, sol.regularization, rtol=0, atol=0)
    t1, y1, dt, dw, levy = solver.calls[-1][:5]
    assert bool(((t1 > 0) & (t1 < T_END) & (t1 + dt <= T_END + 1e-12)).all())
    # same Brownian path: the increment is the tree's over (t1, t1 + dt)
    dw_tree, _ = tree(t1, t1 + dt)
    torch.testing.assert_close(dw, dw_tree.to(dw.dtype), rtol=0, atol=0)

    def local_value(th: float) -> torch.Tensor:
        p = _sde(torch.tensor(th, dtype=torch.float64))
        out = deb.SOSRI().step(deb.problem.Terms(p), t1, y1, dt, dw, levy)
        return scaled_error_norm(out.error, y1, out.y1, 0.05, 0.05) * dt

    (g,) = torch.autograd.grad(sol2.regularization.sum(), theta)
    h = 1e-6
    fd = (local_value(1.3 + h).sum() - local_value(1.3 - h).sum()) / (2 * h)
    torch.testing.assert_close(local_value(1.3), sol2.regularization.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-12)
    # every sensealg: same term, same gradient (the term is a separate computation)
    # the backsolve reconstructs y backwards through the expanding reversed flow of -θy³ + y/2:
    # at the forward's tol 0.05 that reconstruction is off by ~10 % (dL/dθ -1.08 against -1.19
    # at 1e-3 and 1e-4) and can leave the stability check (Unstable -> NaN), so it gets its own
    # tolerance; the other sensealgs follow the forward's steps
    backsolve = deb.BacksolveAdjoint(atol=1e-3, rtol=1e-3)
    for sensealg in (backsolve, deb.InterpolatingAdjoint(), deb.DiscreteAdjoint(checkpoints=2)):
        s = deb.solve(prob, deb.SOSRI(), sensealg=sensealg, regularize=deb.Regularization("local_error", seed=11), **kw)
        if not isinstance(sensealg, deb.DiscreteAdjoint):  # checkpoints move the step grid
            torch.testing.assert_close(s.regularization, sol.regularization, rtol=1e-12, atol=0)
        (gs,) = torch.autograd.grad(s.regularization.sum() + s.ys.sum(), theta)
        assert torch.isfinite(gs)
        assert s.stats.extra["nsteps_regularization"].tolist() == [1, 1, 1]


def _train(regularize, weight: float, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    drift = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    diffusion = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()).double()
    model = deb.NeuralSDE(drift, diffusion, alg=deb.SOSRI(), regularize=regularize, atol=0.1, rtol=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    y0 = torch.randn(4, 2, dtype=torch.float64)
    target = torch.zeros(3, 4, 2, dtype=torch.float64)
    for it in range(steps):
        opt.zero_grad()
        ys = model(y0, [0.0, 0.5, 1.0], seed=it)
        loss = (ys - target).square().mean()
        if model.regularization is not None:
            loss = loss + weight * model.regularization.mean()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_weight_zero_leaves_training_unchanged_and_weight_changes_it():
    ref = _train(None, 0.0)
    for reg in ("error", "local_error", deb.Regularization("local_stiffness", sampling="biased")):
        for p, q in zip(ref, _train(reg, 0.0)):
            assert torch.equal(p, q)
    moved = _train("error", 10.0)
    assert any(not torch.equal(p, q) for p, q in zip(ref, moved))


def test_neural_ode_module_exposes_term():
    torch.manual_seed(0)
    model = deb.NeuralODE(
        nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double(), alg=deb.Tsit5(), regularize="local_error"
    )
    y0 = torch.randn(5, 2, dtype=torch.float64)
    model(y0, [0.0, 1.0])
    first = model.regularization
    assert first.shape == (5,) and first.requires_grad
    assert model.stats.extra["nsteps_regularization"].tolist() == [1] * 5
    model(y0, [0.0, 1.0])  # the module's Regularization stream advances: new local times
    assert not torch.equal(first, model.regularization)


def test_stability_sizes():
    # OrdinaryDiffEq's alg_stability_size values are the real-axis stability intervals
    assert real_stability_interval(TSIT5_TABLEAU.a[:6], TSIT5_TABLEAU.b[:6]) == pytest.approx(3.5068, abs=1e-4)
    assert real_stability_interval(DOPRI5_TABLEAU.a[:6], DOPRI5_TABLEAU.b[:6]) == pytest.approx(3.3066, abs=1e-4)
    assert stability_size(deb.Tsit5()) == 3.5068
    assert stability_size(deb.LambaEM()) == 2.0
    # explicit Euler as an RK tableau: [-2, 0]; classical RK4: 2.7853
    assert real_stability_interval([()], (1.0,)) == pytest.approx(2.0, abs=1e-8)
    rk4 = [(), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)]
    assert real_stability_interval(rk4, (1 / 6, 1 / 3, 1 / 3, 1 / 6)) == pytest.approx(2.7853, abs=1e-4)
    assert stability_size(deb.SOSRI()) > 2.0


def test_clear_errors():
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    prob = _sde(theta)
    with pytest.raises(ValueError, match="regularize.*EM.*adaptive"):
        deb.solve(prob, deb.EM(), dt=0.1, regularize="error")
    with pytest.raises(ValueError, match="local_error"):
        deb.solve(prob, deb.SOSRI(), regularize="error", sensealg=deb.BacksolveAdjoint())
    with pytest.raises(ValueError, match="regularize"):
        deb.solve(prob, deb.SOSRI(), regularize="errors")
    with pytest.raises(TypeError, match="regularize"):
        deb.solve(prob, deb.SOSRI(), regularize=1.0)
    with pytest.raises(ValueError, match="aggregate"):
        deb.Regularization("error", aggregate="max")
    with pytest.raises(ValueError, match="sampling"):
        deb.Regularization("local_error", sampling="uniform")
    with pytest.raises(ValueError, match="adaptive"):
        deb.solve(prob, deb.SOSRI(), dt=0.1, adaptive=False, regularize="local_error")


def test_eigen_estimate_is_zero_where_the_difference_is_rounding():
    # float32: the embedded solution equals the solution bit for bit while f(y1) from the
    # step and a fresh f(ŷ) differ by rounding; the quotient used to be ~1e11
    y = torch.tensor([[0.9, -0.4, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float32)
    f_a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float32)
    f_b = f_a + torch.tensor([[6e-8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y_b = y + torch.tensor([[0.0, 0.0, 0.0], [1e-3, 0.0, 0.0]])
    y_b.requires_grad_(True)
    f_b2 = f_b + torch.tensor([[0.0, 0.0, 0.0], [2e-3, 0.0, 0.0]])
    lam = eigen_estimate(f_a, f_b2, y, y_b)
    torch.testing.assert_close(lam[0], torch.tensor(0.0))
    torch.testing.assert_close(lam[1], torch.tensor(2.0), rtol=1e-3, atol=0)
    (g,) = torch.autograd.grad(lam.sum(), y_b)
    assert bool(torch.isfinite(g).all()) and float(g[0].abs().sum()) == 0.0
    # float64: a genuine small difference (1e-12 of the state) is still resolved
    y64, f64 = y.double(), f_a.double()
    lam64 = eigen_estimate(f64 + 3e-12, f64, y64 + 1e-12, y64)
    torch.testing.assert_close(lam64, torch.full((2,), 3.0, dtype=torch.float64), rtol=1e-3, atol=0)
