"""Ensembles and events on the peers' own problems, written in deb's public API.

Facts taken from the peers (no code): SciML's ``EnsembleProblem`` (``prob_func`` per trajectory,
``output_func``, ``reduction``, ``batch_size``, ``trajectories``; ``EnsembleSummary`` means and
quantiles), the GBM ``prob_sde_linear`` of SDEProblemLibrary, DiffEqCallbacks' bouncing ball,
``terminate!``, upcrossing/downcrossing ``affect!``/``affect_neg!`` and ``PresetTimeCallback``;
torchdiffeq's ``odeint_event`` (terminal event time, state and its gradient by the implicit
function theorem); diffrax's ``Event`` (the root found to the root finder's tolerance).
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import LINEAR_MU, LINEAR_SIGMA, LINEAR_U0, linear
from scipy import stats

import diffeqbridge as deb

G = 9.81


# ------------------------------------------------------------------ ensembles (SciML EnsembleProblem)
def linear_ode_ensemble(n: int, **kwargs) -> deb.EnsembleProblem:
    """SciML's tutorial ensemble: u' = 1.01 u with a per-trajectory initial value (here u0_i = (i+1)/n,
    from the global index, where SciML's tutorial draws ``rand()``)."""

    def prob_func(indices: torch.Tensor) -> deb.ODEProblem:
        u0 = ((indices + 1).to(torch.float64) / n).unsqueeze(1)
        return deb.ODEProblem(lambda t, y: 1.01 * y, u0, (0.0, 1.0))

    return deb.EnsembleProblem(prob_func, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 7, 50])
def test_prob_func_output_func_and_reduction_independent_of_batch_size(batch_size):
    """Every trajectory is u0_i e^{1.01}; output_func (u(1), u(1)²) reduced to the mean gives
    e^{1.01} (n+1)/(2n) and e^{2.02} (n+1)(2n+1)/(6n²); the Collect reduction returns trajectories
    in global order, whatever the batch size (SciML's batch_size)."""
    n = 50
    eprob = linear_ode_ensemble(
        n,
        output_func=lambda sol, idx: torch.cat([sol.ys[-1], sol.ys[-1] ** 2], 1),
        reduction={"m": deb.Moments(), "all": deb.Collect()},
    )
    esol = deb.solve_ensemble(eprob, n, batch_size=batch_size, alg=deb.Tsit5(), atol=1e-10, rtol=1e-10)
    assert esol.batches == math.ceil(n / batch_size) and esol.n == n and esol.retcodes == {"Success": n}
    got = esol.result["all"]
    assert torch.equal(got["indices"], torch.arange(n))
    u0 = torch.arange(1, n + 1, dtype=torch.float64) / n
    torch.testing.assert_close(got["values"][:, 0], u0 * math.exp(1.01), atol=1e-9, rtol=0)
    want = torch.tensor(
        [math.exp(1.01) * (n + 1) / (2 * n), math.exp(2.02) * (n + 1) * (2 * n + 1) / (6 * n**2)], dtype=torch.float64
    )
    torch.testing.assert_close(esol.result["m"]["mean"], want, atol=1e-9, rtol=0)
    assert esol.result["m"]["count"] == n


def gbm_ensemble(*reductions: deb.Reduction) -> deb.EnsembleProblem:
    return deb.EnsembleProblem(lambda idx: linear(idx.shape[0])[0], reduction=list(reductions))


def test_gbm_ensemble_summary_matches_closed_form_moments_and_quantiles():
    """SDEProblemLibrary's GBM (μ = 1.01, σ = 0.87, u0 = 1/2) on 20 000 trajectories with SOSRI:
    E u(1) = u0 e^μ, Var u(1) = u0² e^{2μ}(e^{σ²} - 1), and the quantiles of the lognormal
    u0 exp((μ - σ²/2) + σ z_q).  Mean within 4 standard errors; variance within 4 standard errors of
    the sample variance; each quantile within 4 of its asymptotic standard error √(q(1-q)/n)/pdf(x_q).
    Batches of 5000 give the same trajectories, bit for bit, as one batch; another seed other ones."""
    n, qs = 20_000, (0.1, 0.5, 0.9)
    eprob = gbm_ensemble(deb.Moments(), deb.Quantiles(qs, capacity=n), deb.Collect())
    kwargs = {"alg": deb.SOSRI(), "atol": 1e-3, "rtol": 1e-3, "seed": 5}
    esol = deb.solve_ensemble(eprob, n, batch_size=5000, **kwargs)
    assert esol.retcodes == {"Success": n} and esol.batches == 4
    m, mu, sigma, u0 = esol.result["moments"], LINEAR_MU, LINEAR_SIGMA, LINEAR_U0
    mean, var = u0 * math.exp(mu), u0**2 * math.exp(2 * mu) * (math.exp(sigma**2) - 1)
    assert abs(float(m["mean"]) - mean) < 4 * float(m["sem"]), (float(m["mean"]), mean)
    x = esol.result["collect"]["values"].ravel()
    se_var = float(((x - x.mean()) ** 4).mean() - x.var() ** 2) ** 0.5 / n**0.5
    assert abs(float(m["var"]) - var) < 4 * se_var, (float(m["var"]), var)
    law = stats.lognorm(s=sigma, scale=u0 * math.exp(mu - sigma**2 / 2))
    quant = esol.result["quantiles"]
    assert quant["exact"]
    for k, q in enumerate(qs):
        xq = law.ppf(q)
        se = math.sqrt(q * (1 - q) / n) / law.pdf(xq)
        assert abs(float(quant["quantiles"][k]) - xq) < 4 * se, (q, float(quant["quantiles"][k]), xq)
    one = deb.solve_ensemble(gbm_ensemble(deb.Collect()), n, batch_size=n, **kwargs)
    assert torch.equal(one["values"], esol.result["collect"]["values"])
    other = deb.solve_ensemble(gbm_ensemble(deb.Collect()), 100, **{**kwargs, "seed": 6})
    assert not torch.equal(other["values"], one["values"][:100])


def test_trajectory_seeds_follow_the_global_index():
    """Trajectory i of an ensemble is the sample with global index i of one big solve with the same
    seed (SciML: ``remake(prob, seed = i)``-style reproducibility), for any slice of the ensemble."""
    n = 12
    big = deb.solve(linear(n)[0], deb.EM(), dt=2.0**-6, seed=3)
    esol = deb.solve_ensemble(gbm_ensemble(deb.Collect()), n, batch_size=5, alg=deb.EM(), dt=2.0**-6, seed=3)
    assert torch.equal(esol["values"], big.ys[-1])


# ------------------------------------------------------------------ SciML callbacks
def ball(h0: torch.Tensor, events, t_end: float, extra: int = 0) -> deb.Solution:
    """y = (height, velocity, *counters); y'' = -g."""

    def f(t, y):
        dy = torch.zeros_like(y)
        return torch.cat([y[:, 1:2], torch.full_like(y[:, :1], -G), dy[:, 2:]], 1)

    y0 = torch.cat([h0.unsqueeze(1), torch.zeros(h0.shape[0], 1 + extra, dtype=h0.dtype)], 1)
    return deb.solve(deb.ODEProblem(f, y0, (0.0, t_end)), deb.Tsit5(), events=events, atol=1e-11, rtol=1e-11)


def test_bouncing_ball_terminates_at_the_third_bounce():
    """DiffEqCallbacks' bouncing ball with a bounce counter: affect! reverses the velocity (restitution
    e) and counts; a DiscreteCallback checked at the event's new state calls terminate! at the third
    bounce.  Bounce k is at t_1 (1 + 2e + ... + 2e^{k-1}), t_1 = √(2h/g); the stopped state is
    (0, e³ g t_1, 3)."""
    h0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    e = torch.tensor([0.8, 0.6], dtype=torch.float64)

    def bounce(t, y):
        return torch.stack([y[:, 0], -e * y[:, 1], y[:, 2] + 1], 1)

    events = [
        deb.ContinuousEvent(lambda t, y: y[:, 0], bounce, terminate=False, direction=-1),
        deb.DiscreteEvent(lambda t, y: y[:, 2] >= 3, terminate=True),
    ]
    sol = ball(h0, events, 10.0, extra=1)
    assert sol.success and all(r is deb.ReturnCode.Terminated for r in sol.retcode)
    t1 = torch.sqrt(2 * h0 / G)
    want_times = torch.stack([t1, t1 * (1 + 2 * e), t1 * (1 + 2 * e + 2 * e**2)], 1)
    torch.testing.assert_close(sol.events.times[:, :3], want_times, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.events.t, want_times[:, 2], atol=1e-9, rtol=0)
    want_y = torch.stack([torch.zeros_like(h0), e**3 * G * t1, torch.full_like(h0, 3.0)], 1)
    torch.testing.assert_close(sol.events.y, want_y, atol=1e-8, rtol=0)
    assert sol.events.counts.tolist() == [[3, 1], [3, 1]]


@pytest.mark.parametrize("direction", [1, -1, 0])
def test_direction_selects_upcrossings_or_downcrossings(direction):
    """(sin t, cos t) on [0, 4π], g = sin t - 1/2: upcrossings at π/6 + 2πk, downcrossings at
    5π/6 + 2πk (SciML's affect! / affect_neg!); a counting affect sees only the chosen ones."""
    y0 = torch.tensor([[0.0, 1.0]] * 2, dtype=torch.float64)
    prob = deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], 1), y0, (0.0, 4 * math.pi))
    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5, lambda t, y: y, terminate=False, direction=direction)
    sol = deb.solve(prob, deb.Tsit5(), events=[event], atol=1e-11, rtol=1e-11)
    up = [math.pi / 6, math.pi / 6 + 2 * math.pi]
    down = [5 * math.pi / 6, 5 * math.pi / 6 + 2 * math.pi]
    want = sorted(up if direction == 1 else down if direction == -1 else up + down)
    torch.testing.assert_close(sol.events.times, torch.tensor([want] * 2, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.ys[-1], y0, atol=1e-8, rtol=0)


def test_preset_time_doses_with_tstops():
    """DiffEqCallbacks' PresetTimeCallback as tstops + a DiscreteEvent at those times: u' = -u from 1
    with a dose of +1 at t = 1 and t = 2 (adaptive Tsit5 lands on them) gives
    u(3) = e^{-3} + e^{-2} + e^{-1}, and u(t) between the doses from the dense output."""
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(3, 1, dtype=torch.float64), (0.0, 3.0))
    doses = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def at_dose(t, y):
        return (t.unsqueeze(1) == doses).any(dim=1)

    dose = deb.DiscreteEvent(at_dose, lambda t, y: y + 1)
    sol = deb.solve(prob, deb.Tsit5(), tstops=doses, events=[dose], atol=1e-10, rtol=1e-10, saveat=[1.5, 2.5, 3.0])
    assert sol.success and sol.events.counts[:, 0].tolist() == [2, 2, 2]
    torch.testing.assert_close(sol.events.times, doses.expand(3, 2), atol=0, rtol=0)
    e = math.exp
    want = torch.tensor([e(-1.5) + e(-0.5), e(-2.5) + e(-1.5) + e(-0.5), e(-3) + e(-2) + e(-1)], dtype=torch.float64)
    torch.testing.assert_close(sol.ys[:, :, 0], want.unsqueeze(1).expand(3, 3), atol=1e-9, rtol=0)


# ------------------------------------------------------------------ torchdiffeq odeint_event, diffrax Event
def test_terminal_event_time_state_and_gradient_vs_closed_form():
    """odeint_event-style projectile: x'' = -g from x = 0 upward at speed v, event x = c (a parameter of
    the condition) on the way down: t* = (v + √(v² - 2gc))/g, the state (c, v - g t*);
    dt*/dv = (1 + v/√(v²-2gc))/g and dt*/dc = -1/√(v²-2gc) by the implicit function theorem."""
    v = torch.tensor([5.0, 7.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.stack([torch.zeros_like(v), v], 1)
    prob = deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], torch.full_like(y[:, 1], -G)], 1), y0, (0.0, 5.0), params=[v])
    hit = deb.ContinuousEvent(lambda t, y: y[:, 0] - c, direction=-1)
    sol = deb.solve(prob, deb.Tsit5(), events=[hit], atol=1e-11, rtol=1e-11)
    vd, cd = v.detach(), c.detach()
    root = torch.sqrt(vd**2 - 2 * G * cd)
    t_star = (vd + root) / G
    torch.testing.assert_close(sol.events.t.detach(), t_star, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.events.y.detach(), torch.stack([cd, vd - G * t_star], 1), atol=1e-9, rtol=0)
    gv, gc = torch.autograd.grad(sol.events.t.sum(), [v, c])
    torch.testing.assert_close(gv, (1 + vd / root) / G, atol=1e-7, rtol=0)
    torch.testing.assert_close(gc, -1 / root, atol=1e-7, rtol=0)


def test_event_root_is_found_to_machine_precision_on_the_interpolant():
    """diffrax's Event with a root finder: the located time is a root of the condition on the solver's
    interpolant to the root tolerance, whatever the ODE tolerance.  A condition in t alone
    (g = t - 0.7355) is located to 1e-13 at loose rtol 1e-3; g = y - 1/2 on y' = -y is zero at the
    reported state to 1e-13, and t* = log 2 to the solver's accuracy."""
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=torch.float64), (0.0, 3.0))
    at = deb.ContinuousEvent(lambda t, y: t - 0.7355 + 0 * y[:, 0])
    sol = deb.solve(prob, deb.Tsit5(), events=[at], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(sol.events.t, torch.full((2,), 0.7355, dtype=torch.float64), atol=1e-13, rtol=0)
    half = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5)
    sol = deb.solve(prob, deb.Tsit5(), events=[half], atol=1e-3, rtol=1e-3)
    assert float((sol.events.y[:, 0] - 0.5).abs().max()) < 1e-13
    assert float((sol.events.t - math.log(2)).abs().max()) < 1e-3


# ------------------------------------------------------------------ events in SDEs, per-sample times
def test_sde_first_passage_state_is_on_the_boundary_and_batch_independent():
    """X = 2t + W stopped at X = 1 (EM, h = 2^-8): every sample stops with its state on the boundary
    (the linear interpolant's root, to 1e-12), at a time inside the step that crossed, and the stop
    time and state of a sample do not depend on the batch it was solved in (global index seeds)."""
    n, h = 64, 2.0**-8

    def prob_func(idx: torch.Tensor) -> deb.SDEProblem:
        y0 = torch.zeros(idx.shape[0], 1, dtype=torch.float64)
        return deb.SDEProblem(lambda t, y: 2.0 + 0 * y, lambda t, y: 1.0 + 0 * y, y0, (0.0, 8.0), noise="additive")

    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - 1.0, direction=1)
    out = deb.EnsembleProblem(
        prob_func, output_func=lambda sol, idx: torch.cat([sol.events.t.unsqueeze(1), sol.events.y], 1), reduction=deb.Collect()
    )
    kwargs = {"alg": deb.EM(), "dt": h, "events": [event], "seed": 1}
    full = deb.solve_ensemble(out, n, batch_size=n, **kwargs)
    parts = deb.solve_ensemble(out, n, batch_size=10, **kwargs)
    assert full.retcodes == {"Terminated": n}
    torch.testing.assert_close(parts["values"], full["values"], atol=1e-14, rtol=0)
    tau, x = full["values"][:, 0], full["values"][:, 1]
    assert float((x - 1.0).abs().max()) < 1e-12
    assert bool((tau > 0).all()) and bool((tau < 8.0).all())
    # the step that crossed: the path on the step grid is below 1 before floor(tau/h) h
    sol = deb.solve(prob_func(torch.arange(n)), deb.EM(), dt=h, seed=1, saveat=torch.arange(0, 8.0 + h / 2, h).double())
    k = torch.floor(tau / h).long()
    before = sol.ys[:, :, 0].T.gather(1, k.unsqueeze(1)).squeeze(1)
    after = sol.ys[:, :, 0].T.gather(1, (k + 1).unsqueeze(1)).squeeze(1)
    assert bool((before < 1.0).all()) and bool((after >= 1.0).all())


def test_per_sample_event_times_equal_separate_solves():
    """y' = -k_i y with k_i = 0.5, 1, 2, 4 stopped at y = 1/2: event times log(2)/k_i in one batch, each
    equal to the same sample solved alone (per-sample step control and root finding)."""
    k = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)

    def solve(kk: torch.Tensor) -> deb.Solution:
        prob = deb.ODEProblem(lambda t, y: -kk.unsqueeze(1) * y, torch.ones(kk.shape[0], 1, dtype=torch.float64), (0.0, 5.0))
        return deb.solve(prob, deb.Tsit5(), events=[deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5)], atol=1e-10, rtol=1e-10)

    batch = solve(k)
    torch.testing.assert_close(batch.events.t, math.log(2) / k, atol=1e-9, rtol=0)
    alone = torch.cat([solve(k[i : i + 1]).events.t for i in range(4)])
    torch.testing.assert_close(batch.events.t, alone, atol=1e-14, rtol=0)


def test_earliest_of_several_events_wins_per_sample():
    """diffrax's several ``cond_fn`` (which one fired) / SciML's CallbackSet: x = a sin t, walls at
    x = 1/2 (event 0) and x = -0.8 (event 1), both terminating.  a = 1 stops at π/6 on wall 0,
    a = -1 at asin 0.8 on wall 1, a = 0.3 never stops (Success, NaN event time)."""
    a = torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64)
    y0 = torch.stack([torch.zeros_like(a), a], 1)
    prob = deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], 1), y0, (0.0, 3.0))
    walls = [deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5), deb.ContinuousEvent(lambda t, y: y[:, 0] + 0.8)]
    sol = deb.solve(prob, deb.Tsit5(), events=walls, atol=1e-11, rtol=1e-11)
    assert [r.name for r in sol.retcode] == ["Terminated", "Terminated", "Success"] and sol.success
    assert sol.events.which[:, 0].tolist() == [0, 1, -1]
    assert sol.events.counts.tolist() == [[1, 0], [0, 1], [0, 0]]
    torch.testing.assert_close(
        sol.events.t[:2], torch.tensor([math.pi / 6, math.asin(0.8)], dtype=torch.float64), atol=1e-9, rtol=0
    )
    assert math.isnan(float(sol.events.t[2]))
    torch.testing.assert_close(sol.events.y[:2, 0], torch.tensor([0.5, -0.8], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        sol.ys[-1, 2], torch.tensor([0.3 * math.sin(3.0), 0.3 * math.cos(3.0)], dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_preset_time_doses_backwards_in_time():
    """The same doses on tspan = (3, 0): u' = -u from u(3) = 1, +1 at t = 2 and t = 1, so
    u(0) = e³ + e² + e; the events see the stop times exactly (2, then 1)."""
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=torch.float64), (3.0, 0.0))
    doses = torch.tensor([2.0, 1.0], dtype=torch.float64)
    dose = deb.DiscreteEvent(lambda t, y: (t.unsqueeze(1) == doses).any(dim=1), lambda t, y: y + 1)
    sol = deb.solve(prob, deb.Tsit5(), tstops=doses, events=[dose], atol=1e-10, rtol=1e-10)
    assert torch.equal(sol.events.times, doses.expand(2, 2))
    want = math.exp(3) + math.exp(2) + math.exp(1)
    torch.testing.assert_close(sol.ys[-1, :, 0], torch.full((2,), want, dtype=torch.float64), atol=1e-8, rtol=1e-9)


def test_sde_first_passage_time_gradient_through_the_linear_interpolant():
    """X = μt + σW (EM is exact on the step grid), stopped at X = a: τ is the root of the crossing
    step's chord X_k + (t - t_k) s, s = (X_{k+1} - X_k)/h, and X_k depends on μ through μ t_k, so
    dτ/dμ = -τ/s and dτ/da = 1/s (implicit function theorem on the chord, per sample)."""
    n, h, sigma = 16, 2.0**-7, 0.7
    mu = torch.full((n,), 1.5, dtype=torch.float64, requires_grad=True)
    a = torch.full((n,), 1.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.zeros(n, 1, dtype=torch.float64)

    def problem(m: torch.Tensor) -> deb.SDEProblem:
        return deb.SDEProblem(
            lambda t, y: m.unsqueeze(1) + 0 * y, lambda t, y: sigma + 0 * y, y0, (0.0, 8.0), noise="additive", params=[m]
        )

    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - a, direction=1)
    sol = deb.solve(problem(mu), deb.EM(), dt=h, seed=2, events=[event])
    assert bool((sol.retcodes == int(deb.ReturnCode.Terminated)).all())
    tau = sol.events.t
    g_mu, g_a = torch.autograd.grad(tau.sum(), [mu, a])
    grid = torch.arange(0, 8.0 + h / 2, h, dtype=torch.float64)
    with torch.no_grad():
        path = deb.solve(problem(mu.detach()), deb.EM(), dt=h, seed=2, saveat=grid).ys[:, :, 0].T  # (n, T)
    k = torch.floor(tau.detach() / h).long().unsqueeze(1)
    slope = ((path.gather(1, k + 1) - path.gather(1, k)) / h).squeeze(1)
    torch.testing.assert_close(g_mu, -tau.detach() / slope, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_a, 1 / slope, atol=1e-9, rtol=1e-9)


def test_adaptive_sde_first_passage_stops_on_the_boundary():
    """The same first passage with adaptive SOSRA (additive noise): the stop state is on the boundary
    to 1e-12 and each sample stops at its own time, equal to the sample's time in a batch of one."""
    n = 8
    y0 = torch.zeros(n, 1, dtype=torch.float64)
    prob = deb.SDEProblem(lambda t, y: 2.0 + 0 * y, lambda t, y: 1.0 + 0 * y, y0, (0.0, 8.0), noise="additive")
    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - 1.0, direction=1)
    sol = deb.solve(prob, deb.SOSRA(), events=[event], seed=4, atol=1e-3, rtol=1e-3)
    assert bool((sol.retcodes == int(deb.ReturnCode.Terminated)).all())
    assert float((sol.events.y[:, 0] - 1.0).abs().max()) < 1e-12
    assert int(torch.unique(sol.events.t).numel()) == n
    one = deb.SDEProblem(prob.drift, prob.diffusion, y0[:1], (0.0, 8.0), noise="additive")
    alone = [deb.solve(one, deb.SOSRA(), events=[event], seed=4, atol=1e-3, rtol=1e-3, sample_offset=i).events.t for i in (0, 5)]
    torch.testing.assert_close(torch.cat(alone), sol.events.t[[0, 5]], atol=1e-14, rtol=0)


def test_preset_time_doses_on_a_fixed_step_sde():
    """PresetTimeCallback on EM with dt = 0.01 (the steps reach t = 1 and 2 only up to rounding):
    the doses fire at exactly 1 and 2.  dX = -X dt + 0.3 dW, so the dosed and undosed EM paths of
    the same noise differ by (1 - h)^{(3-1)/h} + (1 - h)^{(3-2)/h} at t = 3."""
    h = 0.01
    prob = deb.SDEProblem(
        lambda t, y: -y, lambda t, y: 0.3 + 0 * y, torch.ones(4, 1, dtype=torch.float64), (0.0, 3.0), noise="additive"
    )
    doses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    dose = deb.DiscreteEvent(lambda t, y: (t.unsqueeze(1) == doses).any(dim=1), lambda t, y: y + 1)
    dosed = deb.solve(prob, deb.EM(), dt=h, tstops=doses, events=[dose], seed=7)
    plain = deb.solve(prob, deb.EM(), dt=h, tstops=doses, seed=7)
    assert torch.equal(dosed.events.times, doses.expand(4, 2))
    want = (1 - h) ** round(2 / h) + (1 - h) ** round(1 / h)
    torch.testing.assert_close(dosed.ys[-1] - plain.ys[-1], torch.full((4, 1), want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_timeseries_summary_of_gbm_against_the_lognormal_law():
    """SciML's ``EnsembleSummary(sim, 0:0.25:1)``: means and quantiles at every save time.  GBM with
    SOSRI saved at t = 0, 1/4, ..., 1, output (T, 1) per trajectory: mean u0 e^{μt} within 4 standard
    errors and median u0 e^{(μ-σ²/2)t} within 4 asymptotic standard errors at every t > 0, and the
    exact u0 at t = 0."""
    n, grid = 8000, torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    eprob = deb.EnsembleProblem(
        lambda idx: linear(idx.shape[0])[0],
        output_func=lambda sol, idx: sol.ys.transpose(0, 1),
        reduction=[deb.Moments(), deb.Quantiles([0.5], capacity=n)],
    )
    esol = deb.solve_ensemble(eprob, n, batch_size=3000, alg=deb.SOSRI(), saveat=grid, atol=1e-3, rtol=1e-3, seed=9)
    m, q = esol.result["moments"], esol.result["quantiles"]
    assert m["mean"].shape == (5, 1) and q["quantiles"].shape == (1, 5, 1) and q["exact"]
    mu, sigma, u0 = LINEAR_MU, LINEAR_SIGMA, LINEAR_U0
    assert float(m["mean"][0, 0]) == u0 and float(m["var"][0, 0]) == 0.0
    for k in range(1, 5):
        t = float(grid[k])
        assert abs(float(m["mean"][k, 0]) - u0 * math.exp(mu * t)) < 4 * float(m["sem"][k, 0]), k
        law = stats.lognorm(s=sigma * math.sqrt(t), scale=u0 * math.exp((mu - sigma**2 / 2) * t))
        se = math.sqrt(0.25 / n) / law.pdf(law.median())
        assert abs(float(q["quantiles"][0, k, 0]) - law.median()) < 4 * se, k


def test_ensemble_where_no_sample_succeeds_reduces_to_nan():
    """Every trajectory blows up (Unstable): the reductions report zero successful samples, a NaN
    mean and NaN quantiles (Quantiles raised IndexError, Moments gave a mean of 0)."""

    def prob_func(idx: torch.Tensor) -> deb.SDEProblem:
        y0 = torch.ones(idx.shape[0], 1, dtype=torch.float64)
        return deb.SDEProblem(lambda t, y: 1e300 * y * y, lambda t, y: 0.1 + 0 * y, y0, (0.0, 1.0), noise="additive")

    eprob = deb.EnsembleProblem(prob_func, reduction=[deb.Moments(), deb.Quantiles([0.5, 0.9]), deb.Collect()])
    esol = deb.solve_ensemble(eprob, 20, batch_size=10, alg=deb.EM(), dt=0.5)
    assert esol.retcodes == {"Unstable": 20} and esol.successful == 0
    assert esol.result["moments"]["count"] == 0 and bool(torch.isnan(esol.result["moments"]["mean"]).all())
    assert esol.result["quantiles"]["quantiles"].shape == (2, 1) and bool(
        torch.isnan(esol.result["quantiles"]["quantiles"]).all()
    )
    assert esol.result["collect"]["values"].shape == (0, 1)


def test_affect_and_affect_neg_as_two_directed_events():
    """SciML's ``ContinuousCallback(condition, affect!, affect_neg!)`` as two events on one condition:
    on (sin t, cos t, c) over [0, 4π], an upcrossing of sin t = 1/2 adds 1 to c and a downcrossing
    adds 10, so c ends at 2·1 + 2·10 = 22 (and the oscillator is untouched)."""
    y0 = torch.tensor([[0.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    prob = deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -y[:, 0], torch.zeros_like(y[:, 0])], 1), y0, (0.0, 4 * math.pi))

    def add(amount: float):
        return lambda t, y: y + torch.tensor([0.0, 0.0, amount], dtype=y.dtype)

    cond = lambda t, y: y[:, 0] - 0.5  # noqa: E731
    events = [
        deb.ContinuousEvent(cond, add(1.0), terminate=False, direction=1),
        deb.ContinuousEvent(cond, add(10.0), terminate=False, direction=-1),
    ]
    sol = deb.solve(prob, deb.Tsit5(), events=events, atol=1e-10, rtol=1e-10)
    assert sol.events.counts.tolist() == [[2, 2], [2, 2]]
    assert sol.events.which[0].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(sol.ys[-1], torch.tensor([[0.0, 1.0, 22.0]] * 2, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("interp_points, found", [(10, 2), (0, 0)])
def test_interp_points_find_a_crossing_and_return_inside_one_step(interp_points, found):
    """SciML's ``interp_points``: with fixed steps of 1 the condition sin t - 0.99 is negative at both
    ends of the step [1, 2] but positive in (asin 0.99, π - asin 0.99) inside it.  Sampling the
    step's interpolant at 10 interior points finds both crossings; with none, neither is seen."""
    y0 = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    prob = deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], 1), y0, (0.0, 3.0))
    count = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.99, lambda t, y: y, terminate=False, interp_points=interp_points)
    sol = deb.solve(prob, deb.Tsit5(), dt=1.0, adaptive=False, events=[count], dense=True)
    assert int(sol.events.counts[0, 0]) == found
    if found:
        root = math.asin(0.99)
        times = sol.events.times[0]
        # roots of the condition on Tsit5's interpolant (bisected to 2^-52 of the step) ...
        assert float((sol(times)[:, 0, 0] - 0.99).abs().max()) < 1e-12
        # ... which is a step-1 approximation: the times are the exact ones to its error / |slope| ≈ 5e-3
        torch.testing.assert_close(times, torch.tensor([root, math.pi - root], dtype=torch.float64), atol=1e-2, rtol=0)


def test_event_time_gradient_with_respect_to_condition_parameters_only():
    """torchdiffeq's ``event_fn`` may hold the only parameters that need a gradient.  y' = -y from 1
    (nothing requires grad), event y = c: t* = -log c, dt*/dc = -1/c and the event state y* = c, so
    dy*/dc = 1; event t = d (a time-only condition): dt*/dd = 1.  (Before, no gradient: the
    correction ran only when the state required grad.)"""
    c = torch.tensor([0.5, 0.8], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([0.3, 1.1], dtype=torch.float64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=torch.float64), (0.0, 3.0))
    opts = {"atol": 1e-10, "rtol": 1e-10}
    sol = deb.solve(prob, deb.Tsit5(), events=[deb.ContinuousEvent(lambda t, y: y[:, 0] - c)], **opts)
    torch.testing.assert_close(sol.events.t.detach(), -torch.log(c.detach()), atol=1e-9, rtol=0)
    (g_t,) = torch.autograd.grad(sol.events.t.sum(), [c], retain_graph=True)
    (g_y,) = torch.autograd.grad(sol.events.y[:, 0].sum(), [c])
    torch.testing.assert_close(g_t, -1 / c.detach(), atol=1e-8, rtol=0)
    torch.testing.assert_close(g_y, torch.ones(2, dtype=torch.float64), atol=1e-8, rtol=0)
    sol = deb.solve(prob, deb.Tsit5(), events=[deb.ContinuousEvent(lambda t, y: t - d + 0 * y[:, 0])], **opts)
    (g_d,) = torch.autograd.grad(sol.events.t.sum(), [d])
    torch.testing.assert_close(g_d, torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_event_time_gradient_backwards_in_time():
    """y' = k y on tspan (0, -5) from y0, event y = 1/2: t* = log(1/(2 y0))/k < 0,
    dt*/dk = -t*/k, dt*/dy0 = -1/(k y0)."""
    k = torch.tensor([1.3, 0.7], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: k.unsqueeze(1) * y, y0, (0.0, -5.0), params=[k])
    sol = deb.solve(prob, deb.Tsit5(), events=[deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5)], atol=1e-10, rtol=1e-10)
    kd, yd = k.detach(), y0.detach()[:, 0]
    t_star = torch.log(1 / (2 * yd)) / kd
    torch.testing.assert_close(sol.events.t.detach(), t_star, atol=1e-9, rtol=0)
    gk, gy = torch.autograd.grad(sol.events.t.sum(), [k, y0])
    torch.testing.assert_close(gk, -t_star / kd, atol=1e-7, rtol=0)
    torch.testing.assert_close(gy[:, 0], -1 / (kd * yd), atol=1e-7, rtol=0)
