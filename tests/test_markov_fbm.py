"""``deb.noise.MarkovFBM``: the Markov approximation of fractional Brownian motion (Daems et al. 2024).

Oracles: the closed-form L2 error and variances of the approximation, the incomplete gamma
function of torch, the exact evidence of the linear Markov fractional OU (Kalman filter),
finite differences for the gradient in the Hurst index."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.noise import MarkovFBM, fractional_ou_log_evidence, regularized_gammainc, simulate_fractional_ou

pytestmark = pytest.mark.usefixtures("float64_default")


def test_incomplete_gamma_matches_torch():
    a = torch.tensor([0.55, 0.8, 1.2, 1.7, 2.4]).unsqueeze(1)
    x = torch.tensor([1e-6, 1e-3, 0.5, 10.0, 120.0, 450.0, 900.0])
    assert torch.allclose(regularized_gammainc(a, x), torch.special.gammainc(a, x), rtol=1e-11, atol=1e-14)
    # differentiable in a (torch.special.gammainc is not): d/da by central differences
    a0 = torch.tensor(0.8, requires_grad=True)
    (g,) = torch.autograd.grad(regularized_gammainc(a0, torch.tensor(2.0)), [a0])
    fd = (
        torch.special.gammainc(torch.tensor(0.8 + 1e-6), torch.tensor(2.0))
        - torch.special.gammainc(torch.tensor(0.8 - 1e-6), torch.tensor(2.0))
    ) / 2e-6
    assert math.isclose(float(g), float(fd), rel_tol=1e-7)


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_error_falls_with_the_number_of_processes(hurst):
    """Relative L2 error over [0, T] at the optimal weights: non-increasing in K and 8x smaller
    from K = 1 to K = 8 (measured 0.27 -> 0.029 at H = 0.3, 0.19 -> 9e-4 at H = 0.7)."""
    errors = [float(MarkovFBM(hurst, k, (1e-2, 1e3)).approximation_error().detach()) for k in (1, 2, 3, 5, 8)]
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.125 * errors[0], errors
    # the variance of B̂ approaches t^{2H} / (2H Γ(H + ½)²)
    approx, exact = MarkovFBM(hurst, 8, (1e-2, 1e3)).variance(torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(approx, exact, rtol=0.03), (approx, exact)


def test_brownian_motion_is_reproduced_at_hurst_one_half():
    """H = ½: B^H = W; the kernel is constant, so the slowest OU process alone carries it."""
    fbm = MarkovFBM(0.5, 6, (1e-4, 1e2))
    assert float(fbm.approximation_error().detach()) < 1e-3
    approx, exact = fbm.variance(torch.tensor([0.5, 1.0]))
    assert torch.allclose(exact, torch.tensor([0.5, 1.0]), rtol=1e-12)
    assert torch.allclose(approx, exact, rtol=1e-3)


def test_markov_problem_has_the_approximate_variance():
    """``dX = dB̂`` solved on the engine (general noise, EM): Var X_1 matches Var B̂_1 in law."""
    fbm = MarkovFBM(0.3, 5, (1e-1, 1e2))
    B = 3000
    prob = fbm.problem(lambda t, x: torch.zeros_like(x), lambda t, x: torch.ones_like(x), torch.zeros(B, 1))
    with torch.no_grad():
        x1 = deb.solve(prob, deb.EM(), dt=2**-9, seed=1).ys[-1, :, 0]
        approx, _ = fbm.variance(torch.tensor([1.0]))
    var, target = float(x1.var()), float(approx)
    assert abs(var - target) < 4 * target * math.sqrt(2 / B) + 0.02 * target, (var, target)


def _observations(hurst: float, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    truth = MarkovFBM(hurst, 12, (1e-2, 1e3), T=2.0)
    dt = 2.0 / 80
    obs = simulate_fractional_ou(truth, 1.0, 0.5, torch.zeros(batch), dt, 80, seed=seed)
    return obs + 0.01 * torch.randn(obs.shape, generator=torch.Generator().manual_seed(seed + 1)), dt


def test_hurst_index_of_a_fractional_ou_is_recovered():
    """64 paths of a fractional OU (θ = 1, σ = 0.5, H = 0.3; simulated exactly from a 12-process
    approximation) observed at 80 times with noise 0.01; the 6-process model's Hurst index is
    fitted by gradient ascent (Adam, 40 steps from H = 0.5) on the evidence, the ELBO's maximum
    over controls for this linear-Gaussian model.  Tolerance 0.03 (measured 0.310)."""
    obs, dt = _observations(0.3, 64, seed=1)
    model = MarkovFBM(0.5, 6, (1e-2, 1e3), T=2.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        loss = -fractional_ou_log_evidence(model, 1.0, 0.5, torch.zeros(64), dt, obs, 0.01).mean()
        loss.backward()
        opt.step()
    assert abs(float(model.hurst.detach()) - 0.3) < 0.03, float(model.hurst.detach())


def test_elbo_bounds_the_evidence_and_is_differentiable_in_hurst():
    obs, dt = _observations(0.3, 1, seed=4)  # one observed path, (N, 1)
    obs = obs[:16]
    fbm = MarkovFBM(0.3, 4, (1e-1, 1e2), T=16 * dt)
    evidence = float(fractional_ou_log_evidence(fbm, 1.0, 0.5, torch.zeros(1), dt, obs, 0.1))
    ts = torch.arange(17) * dt
    B = 400

    def log_lik(xs):  # xs (T, B, 1): Gaussian observation noise 0.1 at ts[1:]
        return (-0.5 * ((xs[1:, :, 0] - obs) / 0.1) ** 2 - math.log(0.1 * math.sqrt(2 * math.pi))).sum(0)

    def elbo(control, seed=0):
        return fbm.elbo(
            lambda t, x: -x,
            lambda t, x: 0.5 * torch.ones_like(x),
            control,
            torch.zeros(B, 1),
            ts,
            log_lik,
            seed=seed,
            alg=deb.EM(),
            dt=dt / 4,
        )

    def nudge(t, s):  # a control steering the path towards the next observation
        k = (t / dt).long().clamp(max=15)
        return 2.0 * (obs[k, 0].unsqueeze(1) - s[:, :1])

    for control in (lambda t, s: torch.zeros_like(s[:, :1]), nudge):
        values = elbo(control)
        assert float(values.mean()) < evidence + 3 * float(values.std()) / math.sqrt(B)
    # pathwise gradient in the Hurst index (fixed Brownian path) against central differences
    value = elbo(nudge).mean()
    (grad,) = torch.autograd.grad(value, [fbm.hurst_logit])
    with torch.no_grad():
        fbm.hurst_logit += 1e-5
        up = float(elbo(nudge).mean())
        fbm.hurst_logit -= 2e-5
        down = float(elbo(nudge).mean())
        fbm.hurst_logit += 1e-5
    fd = (up - down) / 2e-5
    assert abs(float(grad) - fd) < 1e-5 * abs(fd) + 1e-6, (float(grad), fd)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="hurst"):
        MarkovFBM(1.2)
    with pytest.raises(ValueError, match="n_processes"):
        MarkovFBM(0.3, 0)
    with pytest.raises(ValueError, match="gamma_range"):
        MarkovFBM(0.3, 3, (10.0, 1.0))
    with pytest.raises(ValueError, match="x0"):
        MarkovFBM(0.3).problem(lambda t, x: x, lambda t, x: x, torch.zeros(3))
