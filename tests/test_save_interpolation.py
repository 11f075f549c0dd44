"""Saving (issue 15 item 9): adaptive ODE solves fill save times from the solver's interpolant
instead of stepping onto them; fixed-step solves save at a grid point within rounding of a
save time instead of adding a sliver step; off-grid times still land exactly (SDE paths).

Oracles: closed-form linear ODEs, the dense output ``sol(t)`` (same interpolant), analytic
gradients, the Brownian tree's own ``W(t)``, bitwise comparisons with the solve that saves
on the grid / the reflected forward problem / a sub-batch."""

from __future__ import annotations

import math

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.engine import fixed_steps, snap_tolerance

RATES = (0.5, 1.0, 1.5, 2.0)


def decay(rates=RATES, t0: float = 0.0, t1: float = 10.0, p: torch.Tensor | None = None) -> deb.ODEProblem:
    """``y' = -k (1 + cos(t)/2) y``, ``y(t0) = 1``: ``y = exp(-k (t - t0 + (sin t - sin t0)/2))``."""
    k = torch.tensor(rates, dtype=torch.float64).unsqueeze(1)
    scale = p if p is not None else 1.0

    def f(t, y):
        return -scale * k[: y.shape[0]] * (1.0 + 0.5 * torch.cos(t)).unsqueeze(1) * y

    y0 = torch.ones(len(rates), 1, dtype=torch.float64)
    return deb.ODEProblem(f, y0, (t0, t1), params=[p] if p is not None else None)


def decay_exact(ts: torch.Tensor, rates=RATES, t0: float = 0.0) -> torch.Tensor:
    k = torch.tensor(rates, dtype=torch.float64)
    phase = ts - t0 + 0.5 * (torch.sin(ts) - math.sin(t0))
    return torch.exp(-k.unsqueeze(0) * phase.unsqueeze(1)).unsqueeze(2)  # (T, B, 1)


#: None: alg=None's AutoTsit5(Rodas4()), per sample the interpolant of the method it used
INTERPOLATING = [deb.Tsit5(), deb.Dopri5(), deb.Rodas4(), None]
#: save error / (atol + rtol |y|) allowed: the solvers' own interpolants (measured 1.1-5.8 at
#: tol 1e-6 and 1e-8)
ALLOWED = {"Tsit5": 20, "Dopri5": 20, "Rodas4": 20, "NoneType": 20}


def _name(alg) -> str:
    return "alg=None" if alg is None else type(alg).__name__


@pytest.mark.parametrize("alg", INTERPOLATING, ids=_name)
def test_many_saves_take_the_free_steps(alg):
    """10^4 save times: the same steps as saving only the end, the end value bit for bit, and
    every save within a stated multiple of the tolerance of the closed form."""
    tol = 1e-8
    ts = torch.linspace(0.0, 10.0, 10_000, dtype=torch.float64)
    free = deb.solve(decay(), alg, atol=tol, rtol=tol)
    many = deb.solve(decay(), alg, atol=tol, rtol=tol, saveat=ts)
    assert bool(many.success)
    assert (many.stats.naccept - free.stats.naccept).abs().max() <= 2, (many.stats.naccept, free.stats.naccept)
    assert int(many.stats.naccept.max()) < 1000  # was >= 9,999: one step per save time
    assert torch.equal(many.ys[-1], free.ys[-1])
    exact = decay_exact(ts)
    ratio = ((many.ys - exact).abs() / (tol + tol * exact.abs())).max()
    assert ratio < ALLOWED[type(alg).__name__], float(ratio)


@pytest.mark.parametrize("alg", INTERPOLATING, ids=_name)
def test_saves_equal_dense_output(alg):
    ts = torch.linspace(0.0, 10.0, 777, dtype=torch.float64)
    sol = deb.solve(decay(), alg, atol=1e-6, rtol=1e-6, saveat=ts, dense=True)
    torch.testing.assert_close(sol.ys[1:-1], sol(ts[1:-1]), rtol=0, atol=1e-13)


@pytest.mark.parametrize("alg", [deb.Kvaerno5(), deb.AutoTsit5(deb.Kvaerno5())], ids=["Kvaerno5", "AutoTsit5(Kvaerno5)"])
def test_hermite_only_solvers_land_on_save_times(alg):
    """Kvaerno5 (alone, or as a composite's stiff partner) has only a cubic Hermite interpolant
    between its steps (measured 8-119x the tolerance), so it steps onto every save time and
    every save stays within the tolerance's order of the closed form."""
    ts = torch.linspace(0.0, 10.0, 200, dtype=torch.float64)
    sol = deb.solve(decay(), alg, saveat=ts, atol=1e-8, rtol=1e-8)
    free = deb.solve(decay(), alg, atol=1e-8, rtol=1e-8)
    assert bool((sol.stats.naccept >= len(ts) - 1).all())
    assert bool((sol.stats.naccept > free.stats.naccept).all())
    exact = decay_exact(ts)
    assert float(((sol.ys - exact).abs() / (1e-8 + 1e-8 * exact)).max()) < 20


LAMBDAS = (1.0, 10.0, 1e3, 1e4)


def relaxation(lams=LAMBDAS) -> deb.ODEProblem:
    """``y' = -λ (y - cos t)``, ``y(0) = 0``, one sample per ``λ`` on ``[0, 2]``."""
    lam = torch.tensor(lams, dtype=torch.float64).unsqueeze(1)

    def f(t, y):
        return -lam[: y.shape[0]] * (y - torch.cos(t).unsqueeze(1))

    return deb.ODEProblem(f, torch.zeros(len(lams), 1, dtype=torch.float64), (0.0, 2.0))


def relaxation_exact(ts: torch.Tensor, lams=LAMBDAS) -> torch.Tensor:
    """``y = λ (λ cos t + sin t)/(λ² + 1) - λ²/(λ² + 1) e^{-λ t}``, ``(T, B, 1)``."""
    lam, t = torch.tensor(lams, dtype=torch.float64).unsqueeze(0), ts.unsqueeze(1)
    return (lam * (lam * torch.cos(t) + torch.sin(t)) / (lam**2 + 1) - lam**2 / (lam**2 + 1) * torch.exp(-lam * t)).unsqueeze(2)


def test_default_solver_interpolates_per_sample_method():
    """alg=None on a batch mixing non-stiff and stiff rates: the stiff samples switch to Rodas4
    and each sample's saves come from the interpolant of the method it used in that step:
    the free steps, the closed form within 20x the tolerance (measured 0.06-6.9 at tol 1e-7;
    Rodas4's 3rd-order interpolant at tol 3e-7 reaches 54 on λ = 1e4), ``sol(t)`` the same
    values, and a sample's saves independent of its batch."""
    tol = 1e-7
    ts = torch.linspace(0.0, 2.0, 300, dtype=torch.float64)
    sol = deb.solve(relaxation(), None, atol=tol, rtol=tol, saveat=ts, dense=True)
    free = deb.solve(relaxation(), None, atol=tol, rtol=tol)
    assert bool(sol.success)
    stiff_steps = sol.stats.extra["stiff_steps"]
    assert int(stiff_steps[0]) == 0 and int(stiff_steps[1]) == 0
    assert bool((stiff_steps[2:] > 0).all()), stiff_steps  # λ = 1e3, 1e4 switched to Rodas4
    assert (sol.stats.naccept - free.stats.naccept).abs().max() <= 2, (sol.stats.naccept, free.stats.naccept)
    exact = relaxation_exact(ts)
    ratio = ((sol.ys - exact).abs() / (tol + tol * exact.abs())).amax(dim=(0, 2))
    assert bool((ratio < 20).all()), ratio
    torch.testing.assert_close(sol.ys[1:-1], sol(ts[1:-1]), rtol=0, atol=1e-13)
    part = deb.solve(relaxation(LAMBDAS[1:3]), None, atol=tol, rtol=tol, saveat=ts)
    assert torch.equal(part.ys, sol.ys[:, 1:3])
    assert torch.equal(part.stats.naccept, sol.stats.naccept[1:3])


def test_gradient_through_interpolated_saves():
    """L = Σ_saves Σ_samples y: dL/dp vs the closed form, for every sensealg."""
    ts = torch.linspace(0.0, 3.0, 61, dtype=torch.float64)
    exact = decay_exact(ts)
    k = torch.tensor(RATES, dtype=torch.float64)
    phase = (ts + 0.5 * torch.sin(ts)).unsqueeze(1)
    expected = float((-k * phase * exact[..., 0]).sum())
    for sensealg in [None, deb.DiscreteAdjoint(checkpoints=3), deb.InterpolatingAdjoint(), deb.BacksolveAdjoint()]:
        p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        prob = decay(t1=3.0, p=p)
        sol = deb.solve(prob, deb.Tsit5(), atol=1e-10, rtol=1e-10, saveat=ts, sensealg=sensealg)
        free = deb.solve(decay(t1=3.0), deb.Tsit5(), atol=1e-10, rtol=1e-10)
        assert torch.equal(sol.stats.naccept, free.stats.naccept), sensealg
        (grad,) = torch.autograd.grad(sol.ys.sum(), p)
        assert abs(float(grad) - expected) < 1e-6 * abs(expected), (sensealg, float(grad), expected)


def test_backward_time_is_the_reflected_forward_solve():
    """t1 < t0 with decreasing save times = the forward solve of z(s) = y(-s), bit for bit, and the
    closed form within the tolerance's order."""
    ts = torch.linspace(4.0, 0.0, 3_000, dtype=torch.float64)
    back = deb.solve(decay(t0=4.0, t1=0.0), deb.Tsit5(), atol=1e-9, rtol=1e-9, saveat=ts)
    free = deb.solve(decay(t0=4.0, t1=0.0), deb.Tsit5(), atol=1e-9, rtol=1e-9)
    assert torch.equal(back.stats.naccept, free.stats.naccept)
    exact = decay_exact(ts, t0=4.0)
    assert float(((back.ys - exact).abs() / (1e-9 + 1e-9 * exact)).max()) < 20
    k = torch.tensor(RATES, dtype=torch.float64).unsqueeze(1)

    def reflected(s, z):
        return k * (1.0 + 0.5 * torch.cos(-s)).unsqueeze(1) * z

    prob = deb.ODEProblem(reflected, torch.ones(4, 1, dtype=torch.float64), (-4.0, 0.0))
    fwd = deb.solve(prob, deb.Tsit5(), atol=1e-9, rtol=1e-9, saveat=-ts)
    assert torch.equal(fwd.stats.naccept, back.stats.naccept)
    assert torch.equal(fwd.ys, back.ys)


def test_batch_invariance():
    """A sample's saved values do not depend on the batch it is solved in."""
    ts = torch.linspace(0.0, 10.0, 1_001, dtype=torch.float64)
    whole = deb.solve(decay(), deb.Tsit5(), atol=1e-7, rtol=1e-7, saveat=ts)
    part = deb.solve(decay(RATES[2:]), deb.Tsit5(), atol=1e-7, rtol=1e-7, saveat=ts)
    assert torch.equal(whole.ys[:, 2:], part.ys)
    assert torch.equal(whole.stats.naccept[2:], part.stats.naccept)


def test_tstops_force_steps():
    """tstops=saveat: the steps land on every save time again (the values there are step ends,
    not interpolated); a tstop at a kink of the field makes the solve exact past it."""
    ts = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)
    forced = deb.solve(decay(), deb.Tsit5(), atol=1e-8, rtol=1e-8, saveat=ts, tstops=ts)
    free = deb.solve(decay(), deb.Tsit5(), atol=1e-8, rtol=1e-8, saveat=ts)
    assert bool((forced.stats.naccept >= 100).all())
    assert bool((free.stats.naccept < 100).all())
    assert float((forced.ys - decay_exact(ts)).abs().max()) < 1e-7

    def kink(t, y):  # y' = -y up to t = 1, then y' = 0
        return torch.where((t < 1.0).unsqueeze(1), -y, torch.zeros_like(y))

    y0 = torch.ones(1, 1, dtype=torch.float64)
    hit = deb.solve(deb.ODEProblem(kink, y0, (0.0, 3.0)), deb.Tsit5(), atol=1e-10, rtol=1e-10, tstops=[1.0])
    assert abs(float(hit.ys[-1, 0, 0]) - math.exp(-1.0)) < 1e-9


def test_tstops_validation():
    with pytest.raises(ValueError, match="tstops must lie inside tspan"):
        deb.solve(decay(), deb.Tsit5(), tstops=[11.0])
    with pytest.raises(TypeError, match="tstops must be a 1-D"):
        deb.solve(decay(), deb.Tsit5(), tstops=1.0)
    with pytest.raises(ValueError, match="tstops contains NaN"):
        deb.solve(decay(), deb.Tsit5(), tstops=[float("nan")])


def test_terminating_event_with_interpolated_saves():
    """Saves before a terminating event are interpolated (closed form), later ones stay NaN."""
    ts = torch.linspace(0.0, 10.0, 1_001, dtype=torch.float64)
    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.1)
    sol = deb.solve(decay(), deb.Tsit5(), atol=1e-9, rtol=1e-9, saveat=ts, events=[event])
    assert bool((sol.retcodes == int(deb.ReturnCode.Terminated)).all())
    exact = decay_exact(ts)
    before = exact > 0.1 + 1e-6
    after = exact < 0.1 - 1e-6
    assert float(((sol.ys - exact).abs()[before]).max()) < 1e-7
    assert bool(sol.ys[after].isnan().all())


def sde(batch: int = 4, t1: float = 1.0) -> deb.SDEProblem:
    return deb.SDEProblem(lambda t, y: 0.1 * y, lambda t, y: 0.2 * y, torch.ones(batch, 1, dtype=torch.float64), (0.0, t1))


def test_fixed_step_saves_snap_to_the_grid():
    """EM with dt = 1e-4 on linspace(0, 0.25, 2501): exactly 2,500 steps, and the same numbers,
    bit for bit, as saving at the grid points themselves (t_k = t_{k-1} + dt) and as not saving
    (the issue's linspace(0, 1, 10^4 + 1), shortened to keep the test fast)."""
    ts = torch.linspace(0.0, 0.25, 2_501, dtype=torch.float64)
    steps, _ = fixed_steps([0.0, 0.25], 1e-4)
    grid = [0.0] + [t for _, _, t in steps]
    assert len(grid) == 2_501
    off = max(abs(a - b) for a, b in zip(grid, ts.tolist()))
    assert 0 < off <= snap_tolerance(1e-4, [0.0, 0.25])  # the grid is not linspace, within rounding
    prob = sde(2, t1=0.25)
    snapped = deb.solve(prob, deb.EM(), dt=1e-4, saveat=ts)
    on_grid = deb.solve(prob, deb.EM(), dt=1e-4, saveat=grid)
    assert bool((snapped.stats.naccept == 2_500).all())
    assert torch.equal(snapped.ys, on_grid.ys)
    assert torch.equal(snapped.ys[-1], deb.solve(prob, deb.EM(), dt=1e-4).ys[-1])


def test_fixed_step_ode_saves_snap_to_the_grid():
    ts = torch.linspace(0.0, 10.0, 1_001, dtype=torch.float64)
    sol = deb.solve(decay(), deb.Tsit5(), dt=0.01, adaptive=False, saveat=ts)
    assert bool((sol.stats.naccept == 1_000).all())
    assert float((sol.ys - decay_exact(ts)).abs().max()) < 1e-9


def test_off_grid_saves_land_on_the_brownian_path():
    """dy = dW with EM (y = W exactly): save times off the dt grid still get the tree's W there."""
    batch, dt = 3, 0.1
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=5, dtype=torch.float64)
    prob = deb.SDEProblem(
        lambda t, y: torch.zeros_like(y),
        lambda t, y: torch.ones_like(y),
        torch.zeros(batch, 1, dtype=torch.float64),
        (0.0, 1.0),
        noise="additive",
    )
    ts = [0.0, 0.05, 0.3, 0.33, 0.7071, 1.0]
    sol = deb.solve(prob, deb.EM(), dt=dt, saveat=ts, brownian=bm)
    for k, t in enumerate(ts[1:], start=1):
        w, _ = bm(torch.zeros(batch, dtype=torch.float64), torch.full((batch,), t, dtype=torch.float64))
        torch.testing.assert_close(sol.ys[k], w, rtol=0, atol=1e-12)
    # 0 -> 0.05 (off grid: lands, the grid restarts), 0.15, 0.25, 0.3, 0.33, 0.43, 0.53, 0.63,
    # 0.7071, 0.8071, 0.9071, 1.0
    assert bool((sol.stats.naccept == 12).all()), sol.stats.naccept


def test_adaptive_sde_still_lands_on_save_times():
    ts = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
    sol = deb.solve(sde(), deb.SOSRI(), saveat=ts, atol=1e-2, rtol=1e-2)
    assert bool((sol.stats.naccept >= 20).all())
