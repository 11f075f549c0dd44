"""Dense output (fitted orders, SDE linear interpolation, shapes) and events (first passage vs the
inverse-Gaussian law, bouncing ball vs its closed form, event-time gradients vs analytic/finite differences)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import diffeqbridge as deb

G = 9.81


def oscillator(batch: int = 2) -> deb.ODEProblem:
    """y = (sin t, cos t)."""
    y0 = torch.tensor([[0.0, 1.0]] * batch, dtype=torch.float64)
    return deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], 1), y0, (0.0, 5.0))


@pytest.mark.parametrize("alg,order", [(deb.Tsit5(), 4), (deb.Dopri5(), 4), (deb.Rodas4(), 3), (deb.Kvaerno5(), 3)])
def test_dense_output_order(alg, order):
    """Fixed steps h: the dense output's maximum error over 1001 points (between the steps) falls as
    h^(order+1) (the interpolant's local error; the solution's own error is of higher or equal order)."""
    tq = torch.linspace(0.0, 5.0, 1001, dtype=torch.float64)
    exact = torch.stack([torch.sin(tq), torch.cos(tq)], -1).unsqueeze(1)
    hs, errors = [0.2, 0.1, 0.05, 0.025], []
    for h in hs:
        sol = deb.solve(oscillator(), alg, dt=h, adaptive=False, dense=True)
        errors.append(float((sol(tq) - exact).abs().max()))
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert slope > order + 1 - 0.3, (errors, slope)
    assert sol.interpolation.order == order


def test_dense_output_shapes_per_sample_and_outside():
    sol = deb.solve(oscillator(3), deb.Tsit5(), dense=True, atol=1e-9, rtol=1e-9)
    assert sol(1.0).shape == (3, 2)
    assert sol([0.5, 1.0]).shape == (2, 3, 2)
    t = torch.tensor([0.3, 2.0, 4.9], dtype=torch.float64)
    per = sol.evaluate(t, per_sample=True)
    torch.testing.assert_close(per, torch.stack([torch.sin(t), torch.cos(t)], -1), atol=1e-7, rtol=0)
    assert torch.equal(sol(torch.stack([t, t])), torch.stack([per, per]))
    assert bool(torch.isnan(sol(5.5)).all())
    torch.testing.assert_close(sol(5.0), sol.ys[-1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="dense=True"):
        deb.solve(oscillator(), deb.Tsit5())(1.0)


def test_sde_dense_output_is_linear_between_steps():
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.5 * y, torch.ones(4, 1, dtype=torch.float64), (0.0, 1.0))
    grid = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    sol = deb.solve(prob, deb.EM(), dt=0.125, saveat=grid, dense=True)
    torch.testing.assert_close(sol(grid), sol.ys, atol=1e-15, rtol=0)
    torch.testing.assert_close(sol(0.3125), 0.5 * (sol.ys[2] + sol.ys[3]), atol=1e-15, rtol=0)


def test_first_passage_time_of_drifted_brownian_motion_is_inverse_gaussian():
    """X = μ t + σ W hits a > 0 at τ ~ IG(mean a/μ, shape a²/σ²).  Monitoring on Euler steps of size h
    hits late like a continuous path hitting a + 0.5826 σ √h (Broadie, Glasserman, Kou 1997: the
    discrete-monitoring correction, β = -ζ(1/2)/√(2π)); the event times located on the steps'
    linear interpolants pass a KS test against that law at level 1 % (seed 0, 4000 paths)."""
    mu, sigma, a, n, h = 2.0, 1.0, 1.0, 4000, 2.0**-9
    prob = deb.SDEProblem(
        lambda t, y: mu + 0 * y, lambda t, y: sigma + 0 * y, torch.zeros(n, 1, dtype=torch.float64), (0.0, 4.0), noise="additive"
    )
    bm = deb.VirtualBrownianTree(0.0, 4.0, (n, 1), seed=0, tol=h)
    # a linear condition on a linear interpolant: interior sample points add nothing
    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - a, direction=1, interp_points=0)
    sol = deb.solve(prob, deb.EM(), dt=h, brownian=bm, events=[event])
    assert sol.success and bool((sol.retcodes == int(deb.ReturnCode.Terminated)).all())
    assert deb.ReturnCode.Terminated.successful
    tau = sol.events.t
    assert torch.equal(sol.stats.extra["event_time"], tau) and bool((sol.stats.extra["nevents"] == 1).all())
    barrier = a + 0.5826 * sigma * math.sqrt(h)
    shape = barrier**2 / sigma**2
    law = stats.invgauss(mu=(barrier / mu) / shape, scale=shape)
    assert stats.kstest(tau.numpy(), law.cdf).pvalue > 0.01


def bouncing_ball(h0: torch.Tensor, e: torch.Tensor, t_end: float, **kwargs) -> deb.Solution:
    def f(t, y):
        return torch.stack([y[:, 1], torch.zeros_like(y[:, 1]) - G], 1)

    def bounce(t, y):
        return torch.stack([y[:, 0], -e * y[:, 1]], 1)

    event = deb.ContinuousEvent(lambda t, y: y[:, 0], bounce, terminate=False, direction=-1)
    y0 = torch.stack([h0, torch.zeros_like(h0)], 1)
    return deb.solve(deb.ODEProblem(f, y0, (0.0, t_end), params=[e]), deb.Tsit5(), events=[event], **kwargs)


def test_bouncing_ball_with_restitution_matches_the_closed_form():
    """Dropped from h0: impacts at t_1 = √(2h0/g), t_{k+1} = t_k + 2 e^k v_1 / g (v_1 = g t_1); between
    impacts a parabola.  Per-sample restitution e; event times and the end state to 1e-9."""
    e = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64)
    t_end = 1.3
    sol = bouncing_ball(torch.ones(3, dtype=torch.float64), e, t_end, atol=1e-11, rtol=1e-11)
    assert sol.success
    t1 = math.sqrt(2 / G)
    for i, ei in enumerate(e.tolist()):
        times, speed = [t1], G * t1
        while times[-1] + 2 * ei * speed / G < t_end:
            speed *= ei
            times.append(times[-1] + 2 * speed / G)
        speed *= ei
        got = sol.events.times[i][~torch.isnan(sol.events.times[i])]
        assert got.numel() == len(times) == int(sol.events.counts[i, 0])
        np.testing.assert_allclose(got.numpy(), times, atol=1e-9, rtol=0)
        tau = t_end - times[-1]
        want = [speed * tau - G * tau**2 / 2, speed - G * tau]
        np.testing.assert_allclose(sol.ys[-1, i].numpy(), want, atol=1e-9, rtol=0)


def test_event_time_gradient_matches_the_implicit_function_theorem():
    """y' = -k y, y(0) = y0, event y = 1/2 (terminating): t* = log(2 y0)/k, so
    dt*/dk = -t*/k and dt*/dy0 = 1/(k y0)."""
    k = torch.tensor([1.3, 0.7], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -k.unsqueeze(1) * y, y0, (0.0, 5.0), params=[k])
    sol = deb.solve(prob, deb.Tsit5(), events=[deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5)], atol=1e-10, rtol=1e-10)
    kd, yd = k.detach(), y0.detach()[:, 0]
    t_star = torch.log(2 * yd) / kd
    torch.testing.assert_close(sol.events.t.detach(), t_star, atol=1e-9, rtol=0)
    gk, gy = torch.autograd.grad(sol.events.t.sum(), [k, y0])
    torch.testing.assert_close(gk, -t_star / kd, atol=1e-7, rtol=0)
    torch.testing.assert_close(gy[:, 0], 1 / (kd * yd), atol=1e-7, rtol=0)


def test_gradient_through_bounces_matches_finite_differences():
    """The end state after bounces depends on the impact times; its gradient with respect to the drop
    height and the restitution (backprop with the event-time correction) vs central differences."""
    h0 = torch.tensor([1.0, 1.5], dtype=torch.float64, requires_grad=True)
    e = torch.tensor([0.6, 0.8], dtype=torch.float64, requires_grad=True)
    opts = {"atol": 1e-11, "rtol": 1e-11}

    def loss(sol: deb.Solution) -> torch.Tensor:
        return sol.ys[-1, :, 0] + 0.3 * sol.ys[-1, :, 1]

    gh, ge = torch.autograd.grad(loss(bouncing_ball(h0, e, 1.3, **opts)).sum(), [h0, e])
    eps = 1e-6
    with torch.no_grad():

        def fd(dh: float, de: float) -> torch.Tensor:
            return loss(bouncing_ball(h0 + dh, e + de, 1.3, **opts))

        fd_h = (fd(eps, 0) - fd(-eps, 0)) / (2 * eps)
        fd_e = (fd(0, eps) - fd(0, -eps)) / (2 * eps)
    torch.testing.assert_close(gh, fd_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ge, fd_e, atol=1e-5, rtol=1e-5)


def test_discrete_event_and_validation():
    """A DiscreteEvent halves the state whenever it exceeds 2 at a step end: y' = y from 1 with
    fixed steps stays below 2 at every step end; terminate stops with Terminated."""
    prob = deb.ODEProblem(lambda t, y: y, torch.ones(2, 1, dtype=torch.float64), (0.0, 3.0))
    halve = deb.DiscreteEvent(lambda t, y: y[:, 0] > 2.0, lambda t, y: y / 2)
    sol = deb.solve(prob, deb.Tsit5(), dt=0.01, adaptive=False, events=[halve], saveat=[1.0, 2.0, 3.0])
    assert bool((sol.ys <= 2.0).all()) and int(sol.events.counts[0, 0]) == 4
    stop = deb.DiscreteEvent(lambda t, y: t >= 1.0, terminate=True)
    sol = deb.solve(prob, deb.Tsit5(), dt=0.25, adaptive=False, events=stop)
    assert sol.retcode[0] is deb.ReturnCode.Terminated and sol.success
    torch.testing.assert_close(sol.events.t, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="direction"):
        deb.ContinuousEvent(lambda t, y: y[:, 0], direction=2)
    with pytest.raises(ValueError, match="affect"):
        deb.ContinuousEvent(lambda t, y: y[:, 0], terminate=False)
    with pytest.raises(TypeError, match="events"):
        deb.solve(prob, deb.Tsit5(), events=[lambda t, y: y])
    with pytest.raises(ValueError, match="sensealg"):
        deb.solve(prob, deb.Tsit5(), events=stop, sensealg=deb.InterpolatingAdjoint())


def test_reflection_on_an_adaptive_sde_keeps_the_barrier():
    """A non-terminating event on an SDE (the engine leaves the lockstep Brownian grid for EM):
    dX = dt + 0.5 dW from 0.2, reflected at 0 to |X| + 0.05, stays >= 0 at every save time and at the
    dense output's points, for adaptive SOSRA and fixed-step EM."""
    prob = deb.SDEProblem(
        lambda t, y: 1.0 + 0 * y,
        lambda t, y: 0.5 + 0 * y,
        torch.full((16, 1), 0.2, dtype=torch.float64),
        (0.0, 1.0),
        noise="additive",
    )
    reflect = deb.ContinuousEvent(lambda t, y: y[:, 0], lambda t, y: y.abs() + 0.05, terminate=False, direction=-1)
    grid = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    for alg, kwargs in ((deb.SOSRA(), {}), (deb.EM(), {"dt": 0.01})):
        sol = deb.solve(prob, alg, events=[reflect], dense=True, saveat=grid, **kwargs)
        assert sol.success and bool((sol.events.counts > 0).any())
        assert float(sol.ys.min()) >= 0.0
        assert float(sol(torch.linspace(0.0, 1.0, 101, dtype=torch.float64)).min()) >= 0.0


def test_dense_output_and_events_backwards_in_time():
    """tspan = (5, 0): sol(t) between the steps and the crossings of sin t = 1/2 (at 5π/6, π/6)."""
    y0 = torch.tensor([[math.sin(5.0), math.cos(5.0)]] * 2, dtype=torch.float64)
    prob = deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], 1), y0, (5.0, 0.0))
    count = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5, affect=lambda t, y: y, terminate=False)
    sol = deb.solve(prob, deb.Tsit5(), dense=True, atol=1e-10, rtol=1e-10, events=[count])
    tq = torch.tensor([4.0, 2.5, 0.3], dtype=torch.float64)
    torch.testing.assert_close(sol(tq)[:, :, 0], torch.sin(tq).unsqueeze(1).expand(3, 2), atol=1e-9, rtol=0)
    assert bool(torch.isnan(sol(6.0)).all())
    want = torch.tensor([5 * math.pi / 6, math.pi / 6], dtype=torch.float64)
    torch.testing.assert_close(sol.events.times, want.expand(2, 2), atol=1e-9, rtol=0)
