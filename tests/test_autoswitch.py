"""Per-sample Newton convergence flags (ReturnCode.ConvergenceFailure), stiffness estimates
and per-sample automatic switching (AutoTsit5 / AutoSOSRI).

Measured while writing (float64, rtol = 1e-6, atol = 1e-6/1e-8):

* Van der Pol, μ = 1000, y0 = (2, 0), t ∈ [0, 3000]: AutoTsit5(Rodas4()) 571 accepted + 135
  rejected steps, 7 switches; Rodas4 alone 1062 + 97; Tsit5 alone hit max_steps = 200 000.
* batch VdP μ = (1, 1000), t ∈ [0, 10]: the μ = 1 sample never switches and takes exactly
  Tsit5's 86 steps; the μ = 1000 sample switches at t = 0.0176 and takes 30 + 3 steps
  (Tsit5: 8522 + 3).
* λ(t) = 1 + 10⁴ σ(20 (t - 1)) (turns stiff mid-way), t ∈ [0, 3]: AutoTsit5(Rodas4()) switches at
  t = 0.933, 186 + 6 steps; Tsit5 5763 + 6 (on [0, 1.2]: 96 + 6 vs 607 + 6).
"""

from __future__ import annotations

import math

import pytest
import torch

import diffeqbridge as deb

SUCCESS = int(deb.ReturnCode.Success)
CONV = int(deb.ReturnCode.ConvergenceFailure)


# ------------------------------------------------------------------ ConvergenceFailure
def _mixed_problem(include_failing: bool = True):
    """Samples: stiff λ = -1e4, mild λ = -1 (y' = λ (y - cos t)) and, optionally, one whose
    implicit stage equation has no root for any step: f jumps from +1e6 to -1e6 at y = 0
    and y0 = 0, so ``z = h f(z)`` has no solution (Newton oscillates between ±1e6 h)."""
    lam = torch.tensor([-1e4, -1.0, -1.0], dtype=torch.float64)
    no_root = torch.tensor([False, False, True])
    n = 3 if include_failing else 2
    lam, no_root = lam[:n], no_root[:n]

    def f(t, y):
        smooth = lam.unsqueeze(-1) * (y - torch.cos(t).unsqueeze(-1))
        jump = 1e6 * torch.where(y >= 0, -torch.ones_like(y), torch.ones_like(y))
        return torch.where(no_root.unsqueeze(-1), jump, smooth)

    y0 = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)[:n]
    return deb.ODEProblem(f, y0, (0.0, 1.0)), lam


def _exact(lam: torch.Tensor, t: float) -> torch.Tensor:
    # y' = λ (y - cos t), y(0) = 1
    tt = torch.tensor(t, dtype=torch.float64)
    particular = lam * (lam * torch.cos(tt) - torch.sin(tt)) / (lam * lam + 1)
    return (1 - lam * lam / (lam * lam + 1)) * torch.exp(lam * tt) + particular


@pytest.mark.parametrize("alg", [deb.Kvaerno5(), deb.ImplicitEM], ids=["Kvaerno5", "ImplicitEM-fixed"])
def test_convergence_failure_is_per_sample(alg):
    prob, lam = _mixed_problem()
    if not isinstance(alg, deb.Kvaerno5):  # the same drift as an SDE with zero noise
        prob = deb.SDEProblem(prob.drift, lambda t, y: 0.0 * y, prob.y0, tspan=(0.0, 1.0))
        sol = deb.solve(prob, deb.ImplicitEM(), dt=0.01, adaptive=False)
        assert [int(c) for c in sol.retcodes] == [SUCCESS, SUCCESS, CONV]
        assert int(sol.stats.naccept[2]) == 0  # fixed step: stops at the first failure
        return
    sol = deb.solve(prob, alg, rtol=1e-6, atol=1e-9, max_steps=300)
    assert [int(c) for c in sol.retcodes] == [SUCCESS, SUCCESS, CONV]
    # adaptive: rejected and retried with dt / 5 until 10 consecutive failures
    assert int(sol.stats.naccept[2]) == 0 and int(sol.stats.nreject[2]) == 10
    # rtol 1e-4: Kvaerno5's third stage sits at c = 1.23, so on the last step its time is
    # clamped to t1 (user functions only see times inside tspan); with λ = -1e4 and a
    # time-dependent forcing that costs ~3e-5 relative here (7e-8 without the clamp)
    assert torch.allclose(sol.ys[-1, :2, 0], _exact(lam[:2], 1.0), rtol=1e-4, atol=1e-8)
    # the failing sample does not perturb the others: same steps and values as without it
    prob2, _ = _mixed_problem(include_failing=False)
    ref = deb.solve(prob2, alg, rtol=1e-6, atol=1e-9)
    assert torch.equal(ref.stats.naccept, sol.stats.naccept[:2])
    assert torch.allclose(ref.ys[-1], sol.ys[-1, :2], rtol=1e-12, atol=1e-14)
    # fixed step: ConvergenceFailure at once
    fixed = deb.solve(prob, alg, dt=0.01, adaptive=False)
    assert [int(c) for c in fixed.retcodes] == [SUCCESS, SUCCESS, CONV]


# ------------------------------------------------------------------ stiffness estimates
def test_stiffness_estimates_match_the_eigenvalue():
    """Linear y' = A y with A = diag(-1, -50): Hairer's two-stage estimate (Tsit5, SOSRI) sees at
    most the dominant |λ| = 50; ‖J‖_∞ (Rodas4, ImplicitEM) is exactly 50."""
    A = torch.tensor([-1.0, -50.0], dtype=torch.float64)
    y0 = torch.ones(3, 2, dtype=torch.float64)
    ode = deb.ODEProblem(lambda t, y: A * y, y0, (0.0, 0.05))
    for alg in (deb.Tsit5(), deb.Rodas4()):
        sol = deb.solve(ode, alg, rtol=1e-8, atol=1e-10)
        est = sol.stats.extra["max_eigen_est"]
        assert est.shape == (3,)
        assert torch.all(est <= 50.0 * (1 + 1e-9)) and torch.all(est >= 40.0), (alg, est)
    scalar = deb.ODEProblem(lambda t, y: -50.0 * y, torch.ones(2, 1, dtype=torch.float64), (0.0, 0.05))
    sol = deb.solve(scalar, deb.Tsit5(), rtol=1e-8, atol=1e-10)
    assert torch.allclose(sol.stats.extra["eigen_est"], torch.full((2,), 50.0, dtype=torch.float64), rtol=1e-9)
    sde = deb.SDEProblem(lambda t, y: -50.0 * y, lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=torch.float64), tspan=(0.0, 0.05))
    for alg in (deb.SOSRI(), deb.ImplicitEM()):
        sol = deb.solve(sde, alg)
        assert torch.allclose(sol.stats.extra["eigen_est"], torch.full((2,), 50.0, dtype=torch.float64), rtol=1e-6), alg
    additive = deb.SDEProblem(
        lambda t, y: -50.0 * y,
        lambda t, y: 0.1 * torch.ones_like(y),
        torch.ones(2, 1, dtype=torch.float64),
        tspan=(0.0, 0.05),
        noise="additive",
    )
    sol = deb.solve(additive, deb.ShARK(), seed=0)
    assert torch.allclose(sol.stats.extra["eigen_est"], torch.full((2,), 50.0, dtype=torch.float64), rtol=1e-9)


# ------------------------------------------------------------------ automatic switching
def _vdp(mu: torch.Tensor):
    def f(t, y):
        a, b = y.unbind(-1)
        return torch.stack([b, mu * (1 - a * a) * b - a], -1)

    return f


def test_autotsit5_switches_per_sample_on_van_der_pol():
    """Batch VdP with μ = (1, 1000): the non-stiff sample never switches and takes exactly
    Tsit5's steps; the stiff one switches early, takes far fewer steps than Tsit5 and matches
    a tight Rodas4 reference."""
    mu = torch.tensor([1.0, 1000.0], dtype=torch.float64)
    prob = deb.ODEProblem(_vdp(mu), torch.tensor([[2.0, 0.0]] * 2, dtype=torch.float64), (0.0, 1.0))
    sol = deb.solve(prob, deb.AutoTsit5(deb.Rodas4()), rtol=1e-6, atol=1e-6)
    explicit = deb.solve(prob, deb.Tsit5(), rtol=1e-6, atol=1e-6)
    ref = deb.solve(prob, deb.Rodas4(), rtol=1e-10, atol=1e-10)
    assert sol.success and explicit.success and ref.success
    extra = sol.stats.extra
    assert extra["nswitch"].tolist()[0] == 0 and extra["stiff_steps"].tolist()[0] == 0
    assert math.isnan(float(extra["first_switch_t"][0]))
    assert int(sol.stats.naccept[0]) == int(explicit.stats.naccept[0])
    assert int(extra["nswitch"][1]) >= 1 and int(extra["is_stiff"][1]) == 1
    assert 0.0 < float(extra["first_switch_t"][1]) < 0.1  # ρ dt / 3.5068 > 0.9 for 11 steps in a row
    steps_auto = int(sol.stats.nsteps[1])
    steps_tsit5 = int(explicit.stats.nsteps[1])
    assert steps_tsit5 > 10 * steps_auto, (steps_auto, steps_tsit5)
    assert torch.allclose(sol.ys[-1, 1], ref.ys[-1, 1], rtol=1e-4, atol=1e-5)
    assert torch.allclose(sol.ys[-1, 0], ref.ys[-1, 0], rtol=1e-4, atol=1e-5)
    assert float(extra["max_eigen_est"][1]) > 1000.0


def test_autotsit5_switches_mid_way():
    """λ(t) = 1 + 1e4 σ(20 (t - 1)): non-stiff until t ≈ 0.8; the switch happens there."""

    def f(t, y):
        lam = 1e4 * torch.sigmoid(20 * (t - 1.0)) + 1.0
        return -lam.unsqueeze(-1) * (y - torch.sin(t).unsqueeze(-1))

    prob = deb.ODEProblem(f, torch.ones(1, 1, dtype=torch.float64), (0.0, 1.2))
    sol = deb.solve(prob, deb.AutoTsit5(deb.Rodas4()), rtol=1e-6, atol=1e-8)
    explicit = deb.solve(prob, deb.Tsit5(), rtol=1e-6, atol=1e-8)
    ref = deb.solve(prob, deb.Rodas4(), rtol=1e-8, atol=1e-10)
    assert sol.success
    switch_t = float(sol.stats.extra["first_switch_t"][0])
    assert 0.7 < switch_t < 1.1, switch_t
    assert int(sol.stats.extra["stiff_steps"][0]) > 0
    assert int(explicit.stats.nsteps[0]) > 4 * int(sol.stats.nsteps[0])  # 613 vs 102 on [0, 1.2]
    assert abs(float(sol.ys[-1, 0, 0] - ref.ys[-1, 0, 0])) < 1e-5


def test_autoswitch_validation():
    with pytest.raises(ValueError, match="stiffness estimate"):
        deb.AutoSwitch(deb.Rodas4(), deb.Kvaerno5())
    with pytest.raises(ValueError, match="two ODE or two SDE"):
        deb.AutoTsit5(deb.ImplicitEM())
    with pytest.raises(ValueError, match="maxstiffstep"):
        deb.AutoTsit5(deb.Rodas4(), maxstiffstep=-1)
    sde = deb.SDEProblem(lambda t, y: -y, lambda t, y: y, torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="ODE solver"):
        deb.solve(sde, deb.AutoTsit5(deb.Rodas4()))


# ------------------------------------------------------------------ alg_hints
def test_alg_hints_stiff_choose_as_sciml():
    y = torch.ones(2, 3, dtype=torch.float64)
    f, g = (lambda t, y: -y), (lambda t, y: 0.1 * y)
    choose = lambda prob: type(deb.solve(prob, alg_hints=["stiff"], dt=0.1, adaptive=False).alg).__name__
    additive = lambda t, y: 0.1 * torch.ones_like(y)  # noise="additive" is verified (issue 15)
    assert choose(deb.SDEProblem(f, additive, y, noise="additive")) == "SKenCarp"
    assert choose(deb.SDEProblem(f, g, y)) == "ImplicitRKMil"
    assert choose(deb.SDEProblem(f, g, y, interpretation="stratonovich")) == "ImplicitRKMil"
    general = deb.SDEProblem(f, lambda t, y: 0.1 * y.unsqueeze(-1), y, noise="general", noise_dim=1)
    assert choose(general) == "ISSEM"
    assert choose(deb.ODEProblem(f, y, (0.0, 1.0))) == "Rodas4"
    assert choose(deb.ODEProblem(f, torch.ones(1, 100, dtype=torch.float64), (0.0, 1.0))) == "Kvaerno5"
    # no hint / nonstiff: the default stays
    assert type(deb.solve(deb.SDEProblem(f, g, y), alg_hints=["nonstiff"]).alg).__name__ == "SRIW1"  # measured winner
    with pytest.raises(ValueError, match="alg_hints"):
        deb.solve(deb.SDEProblem(f, g, y), alg_hints=["stif"])
    with pytest.raises(TypeError, match="alg_hints"):
        deb.solve(deb.SDEProblem(f, g, y), alg_hints="stiff")
    with pytest.raises(ValueError, match="ImplicitEulerHeun"):
        deb.solve(
            deb.SDEProblem(f, lambda t, y: 0.1 * y.unsqueeze(-1), y, noise="general", noise_dim=1, interpretation="stratonovich"),
            alg_hints=["stiff"],
        )


def test_autososri_switches_per_sample():
    """SDE composite: with SciML's nonstifftol = 0.9 SOSRI's heuristic error control keeps
    ρ dt ≈ 1.5–2 on dX = λ (X - 1) dt + 0.1 X dW, λ = -1000 (below 0.9 x 9.84), so no switch
    happens; a lower nonstifftol makes the stiff sample switch to ImplicitRKMil while the mild
    (λ = -1) sample stays on SOSRI and follows exactly SOSRI's path."""
    lam = torch.tensor([[-1000.0], [-1.0]], dtype=torch.float64)
    prob = deb.SDEProblem(
        lambda t, y: lam * (y - 1), lambda t, y: 0.1 * y, torch.full((2, 1), 2.0, dtype=torch.float64), tspan=(0.0, 0.5)
    )
    sol = deb.solve(prob, deb.AutoSOSRI(nonstifftol=0.05), seed=1)
    plain = deb.solve(prob, deb.SOSRI(unit_step_power=0.0), seed=1)  # AutoSOSRI runs SOSRI unweighted
    assert sol.success
    extra = sol.stats.extra
    assert int(extra["nswitch"][0]) >= 1 and int(extra["stiff_steps"][0]) >= 1 and int(extra["njac"][0]) >= 1
    assert int(extra["nswitch"][1]) == 0 and int(extra["njac"][1]) == 0
    assert torch.equal(sol.ys[-1, 1], plain.ys[-1, 1])
    assert abs(float(sol.ys[-1, 0, 0]) - 1.0) < 0.05  # relaxed to the fixed point 1 (noise 0.1 X dW)


# ------------------------------------------------------------------ alg=None switches
def test_default_ode_algorithm_switches_on_a_stiff_problem():
    """alg=None (AutoTsit5(Rodas4())) on y' = -1e4 (y - cos t): switches early and takes a
    small fraction of Tsit5's steps, at Tsit5's accuracy or better."""
    lam = torch.tensor([-1e4], dtype=torch.float64)
    prob = deb.ODEProblem(lambda t, y: lam * (y - torch.cos(t).unsqueeze(-1)), torch.ones(1, 1, dtype=torch.float64), (0.0, 1.0))
    auto = deb.solve(prob)
    tsit = deb.solve(prob, deb.Tsit5())
    assert auto.success and tsit.success
    assert int(auto.stats.extra["nswitch"][0]) >= 1
    assert int(auto.stats.nsteps[0]) * 5 < int(tsit.stats.nsteps[0]), (auto.stats.nsteps, tsit.stats.nsteps)
    assert torch.allclose(auto.ys[-1, 0], _exact(lam, 1.0), rtol=1e-3, atol=1e-6)


def test_default_additive_sde_algorithm_switches_on_a_stiff_problem():
    """alg=None on dX = -1e4 (X - cos t) dt + 0.1 dW, X0 = 1, t ∈ [0, 1], default tolerances
    (AutoSwitch(ShARK(), ImplicitRKMil(smooth_est=True))): every path switches to the implicit
    method.  Measured (B = 32, seed 1): ~550 drift evaluations per path (with StochasticDiffEq's
    unfiltered estimate dt² J f / 2 as partner ~8.4e3; ShARK alone ~1.0e4; SKenCarp alone 196
    but strong error 0.2, see tests/test_stiff_sde.py).
    X(1) - cos 1 is Gaussian with std ≈ 0.1/√(2e4) = 7.1e-4 (Ornstein–Uhlenbeck); the implicit
    method damps it at dt ≫ 1e-4, so the std is checked in [0.3, 1.5] x that."""
    lam, sigma, batch = -1e4, 0.1, 32
    prob = deb.SDEProblem(
        lambda t, y: lam * (y - torch.cos(t).unsqueeze(-1)),
        lambda t, y: sigma * torch.ones_like(y),
        torch.ones(batch, 1, dtype=torch.float64),
        tspan=(0.0, 1.0),
        noise="additive",
    )
    sol = deb.solve(prob, seed=1)
    assert sol.success
    assert torch.all(sol.stats.extra["nswitch"] >= 1)
    assert float(sol.stats.nf.double().mean()) < 2000
    dev = sol.ys[-1, :, 0] - math.cos(1.0)
    std = sigma / math.sqrt(-2 * lam)
    assert abs(float(dev.mean())) < 4 * std / math.sqrt(batch)
    assert 0.3 * std < float(dev.std()) < 1.5 * std
