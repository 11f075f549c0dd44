"""dd.sample's engine-based samplers ("sde", "ode") on exact scores, backwards in time on the
engine: closed-form flows, mixture statistics, no variance inflation from rejected steps,
per-sample determinism, gradients (float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import diffeqbridge as deb
from diffeqbridge import diffusion as dd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.diffusion_rejections import ggf_sampler  # noqa: E402 - the GGF reference sampler

F64 = torch.float64
MIX = ((0.5, 0.3, 0.2), ((-3.0, 0.0), (3.0, 0.0), (0.0, 3.0)), 0.5)


def _mixture() -> dd.GaussianMixture:
    return dd.GaussianMixture(*MIX)


class GaussianEps(nn.Module):
    """The exact eps-model of 1-D data N(mu, s^2) under ``sde``; ``mu`` is a parameter."""

    def __init__(self, sde, mu=0.7, s=0.4):
        super().__init__()
        self.sde, self.s = sde, s
        self.mu = nn.Parameter(torch.tensor([mu], dtype=F64))

    def var(self, t):
        alpha, sigma = self.sde.marginal(t)
        return alpha**2 * self.s**2 + sigma**2

    def forward(self, x, t):
        alpha, sigma = self.sde.marginal(t)
        score = (alpha[:, None] * self.mu - x) / self.var(t)[:, None]
        return -sigma[:, None] * score


def _flow_map(model, sde, x_T, t_end):
    """The probability flow of Gaussian data is affine: the standardised coordinate is constant."""
    a_T, a_e = sde.marginal(torch.tensor([sde.T], dtype=F64))[0], sde.marginal(torch.tensor([t_end], dtype=F64))[0]
    v_T, v_e = model.var(torch.tensor([sde.T], dtype=F64)), model.var(torch.tensor([t_end], dtype=F64))
    z = (x_T - a_T * model.mu) / v_T.sqrt()
    return a_e * model.mu + v_e.sqrt() * z, (v_e / v_T).sqrt(), a_e - (v_e / v_T).sqrt() * a_T


@pytest.mark.parametrize("sde", [dd.VPSDE(), dd.SubVPSDE(), dd.VESDE(sigma_max=10.0)], ids=["vp", "subvp", "ve"])
def test_ode_sampling_of_gaussian_is_exact(sde):
    """Default tolerances (Tsit5, 1e-5): the probability-flow samples of a 1-D Gaussian match the
    affine closed form to 1e-4 (relative to the state's scale); steps run from T down to t_end."""
    model = GaussianEps(sde)
    x_T = sde.prior_sample((64, 1), seed=1)
    sol = dd.sample(model, sde, x_T, method="ode")
    assert sol.success and float(sol.ts[0]) == sde.T and abs(float(sol.ts[-1]) - 1e-3) < 1e-15
    exact = _flow_map(model, sde, x_T, 1e-3)[0].detach()
    scale = 1 + float(exact.abs().max())
    assert float((sol.ys[-1] - exact).abs().max()) < 1e-4 * scale
    assert bool((sol.stats.nf > 10).all()) and bool((sol.stats.nf < 300).all())


def test_parameterizations_give_identical_samples():
    """Fixed grids (an adaptive solve may flip an accept/reject decision on rounding-level
    differences and then differ at the level of its tolerance)."""
    sde, gm = dd.VPSDE(), _mixture()
    x_T = sde.prior_sample((8, 2), seed=2)
    for method, alg in (("ode", deb.Tsit5()), ("sde", deb.EM())):
        outs = [
            dd.sample(gm.score_model(sde, p), sde, x_T, method=method, parameterization=p, seed=3, alg=alg, steps=40).ys[-1]
            for p in dd.PARAMETERIZATIONS
        ]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-8, atol=1e-8)


def test_sde_mixture_statistics():
    """Reverse SDE, default solver (SRA1, adaptive, default tolerances), 1500 samples of the
    2-D mixture: component weights within 4 standard errors, stds 0.5 +- 0.03."""
    sde, gm = dd.VPSDE(), _mixture()
    n = 1500
    sol = dd.sample(gm.score_model(sde, "eps"), sde, sde.prior_sample((n, 2), seed=0), method="sde", seed=0)
    assert sol.success and isinstance(sol.alg, deb.SRA1)
    frac, stds = gm.component_stats(sol.ys[-1])
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert bool(((frac - gm.weights).abs() < 4 * se).all()), frac
    assert bool(((stds - 0.5).abs() < 0.03).all()), stds
    assert bool((sol.stats.nf > 0).all())


@pytest.mark.parametrize("sde", [dd.VESDE(), dd.SubVPSDE()], ids=["ve", "subvp"])
@pytest.mark.parametrize("method", ["sde", "ode", "pc"])
def test_other_processes_sample_the_mixture(sde, method):
    """VE and sub-VP (1000 samples): weights within 4 standard errors, stds 0.5 +- 0.05
    (measured 0.48-0.52)."""
    gm, n = _mixture(), 1000
    options = {"steps": 200, "sigma_data": 0.5} if method == "pc" else {}
    sol = dd.sample(gm.score_model(sde, "eps"), sde, sde.prior_sample((n, 2), seed=0), method=method, **options)
    assert sol.success
    frac, stds = gm.component_stats(sol.ys[-1])
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert bool(((frac - gm.weights).abs() < 4 * se).all()), frac
    assert bool(((stds - 0.5).abs() < 0.05).all()), stds


def test_per_sample_results_independent_of_batch():
    """Adaptive per-sample steps and the per-sample Brownian tree: sample i of a batch of 12 is
    sample i of a batch of 5 (same seed), whatever the other samples do."""
    sde, gm = dd.VPSDE(), _mixture()
    x_T = sde.prior_sample((12, 2), seed=5)
    for method in ("sde", "ode"):
        full = dd.sample(gm.score_model(sde, "eps"), sde, x_T, method=method, seed=9)
        part = dd.sample(gm.score_model(sde, "eps"), sde, x_T[:5], method=method, seed=9)
        torch.testing.assert_close(part.ys[-1], full.ys[-1][:5], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part.stats.nf, full.stats.nf[:5])


# ---------------------------------------------------------------------- rejected steps
def test_rejections_add_no_bias_unlike_redraws():
    """The same adaptive controller (GGF's) on the 2-D mixture (component std 0.5) at two
    tolerances (measured, 1500 samples, eps_rel 0.02/0.05/0.1: redraw 0.58-0.65, fixed path
    0.49-0.51): redrawing the noise after a rejection inflates the component stds; re-querying
    a fixed Brownian path (what the engine does on every rejection) does not -- and neither
    does dd.sample(method="sde")."""
    sde, gm = dd.VPSDE(), _mixture()
    n, t_end = 1200, 1e-3
    x_T = sde.prior_sample((n, 2), seed=0)
    score = gm.score_model(sde, "score")
    redraw_stds, fixed_stds = [], []
    for eps_rel in (0.02, 0.1):
        x_r, _ = ggf_sampler(score, sde, x_T, t_end, 0.0078, eps_rel, seed=1)
        tree = deb.VirtualBrownianTree(t_end, sde.T, (n, 2), seed=1)
        x_f, _ = ggf_sampler(score, sde, x_T, t_end, 0.0078, eps_rel, tree=tree)
        redraw_stds.append(gm.component_stats(x_r)[1])
        fixed_stds.append(gm.component_stats(x_f)[1])
    redraw, fixed = torch.stack(redraw_stds), torch.stack(fixed_stds)
    print("redraw stds", redraw, "fixed path stds", fixed)
    assert bool(((fixed - 0.5).abs() < 0.03).all()), fixed
    assert float(redraw.mean()) > 0.56, redraw
    ours = dd.sample(score, sde, x_T, method="sde", parameterization="score")
    assert bool(((gm.component_stats(ours.ys[-1])[1] - 0.5).abs() < 0.03).all())


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "sensealg", [None, deb.InterpolatingAdjoint(), deb.BacksolveAdjoint()], ids=["default", "interpolating", "backsolve"]
)
def test_ode_gradients_analytic(sensealg):
    """d x_end / d x_T and d x_end / d mu of the Gaussian's affine flow, analytically."""
    sde = dd.VPSDE()
    model = GaussianEps(sde)
    x_T = sde.prior_sample((4, 1), seed=3).requires_grad_(True)
    sol = dd.sample(model, sde, x_T, method="ode", sensealg=sensealg, atol=1e-8, rtol=1e-8)
    gx, gmu = torch.autograd.grad(sol.ys[-1].sum(), [x_T, model.mu])
    _, dx, dmu = _flow_map(model, sde, x_T.detach(), 1e-3)
    tol = 1e-5 if isinstance(sensealg, deb.BacksolveAdjoint) else 1e-6
    torch.testing.assert_close(gx, dx.expand_as(gx), rtol=tol, atol=tol)
    torch.testing.assert_close(gmu, (4 * dmu).reshape(1), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "sensealg",
    [None, deb.InterpolatingAdjoint(checkpoints=4), deb.DiscreteAdjoint(checkpoints=4)],
    ids=["default", "interpolating", "discrete_checkpointed"],
)
def test_sde_gradients_vs_finite_differences(sensealg):
    """Reverse SDE with EM on a fixed grid (the path is a fixed Brownian path): gradients with
    respect to x_T and the model's mean against central differences on the same path."""
    sde = dd.VPSDE()
    model = GaussianEps(sde)
    x_T = sde.prior_sample((3, 1), seed=4)

    def run(x, mu=None):
        if mu is not None:
            model.mu.data.fill_(mu)
        return dd.sample(model, sde, x, method="sde", alg=deb.EM(), steps=64, seed=2, sensealg=sensealg).ys[-1]

    x = x_T.clone().requires_grad_(True)
    gx, gmu = torch.autograd.grad(run(x).sum(), [x, model.mu])
    eps = 1e-5
    with torch.no_grad():
        fd_x = (run(x_T + eps) - run(x_T - eps)) / (2 * eps)
        fd_mu = (run(x_T, 0.7 + eps).sum() - run(x_T, 0.7 - eps).sum()) / (2 * eps)
        model.mu.data.fill_(0.7)
    torch.testing.assert_close(gx, fd_x, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gmu, fd_mu.reshape(1), rtol=1e-6, atol=1e-8)


def test_sde_backsolve_adjoint_is_consistent():
    """The continuous stochastic adjoint (BacksolveAdjoint) on the reverse SDE agrees with the
    exact discrete gradient to O(dt): measured 1.2e-4 (x_T, where the flow contracts to 1e-3)
    and 0.2% (the mean) at 256 EM steps."""
    sde = dd.VPSDE()
    model = GaussianEps(sde)
    x_T = sde.prior_sample((3, 1), seed=4)
    grads = []
    for sensealg in (None, deb.BacksolveAdjoint()):
        x = x_T.clone().requires_grad_(True)
        sol = dd.sample(model, sde, x, method="sde", alg=deb.EM(), steps=256, seed=2, sensealg=sensealg)
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), [x, model.mu]))
    (dx, dmu), (bx, bmu) = grads
    assert float((bx - dx).abs().max()) < 3e-4
    assert abs(float(bmu / dmu) - 1) < 5e-3


def test_guidance_conditioning_gradient():
    """CFG conditioning requires grad: the "ode" sample differentiates w.r.t. it (vs FD)."""
    sde = dd.VPSDE()
    base = GaussianEps(sde)
    base.mu.requires_grad_(False)  # only the conditioning is differentiated here

    def cond_model(x, t, c):
        return base(x, t) + (0.0 if c is None else 0.1 * c * sde.marginal(t)[1][:, None])

    cond = torch.tensor([[0.5]], dtype=F64, requires_grad=True)
    x_T = sde.prior_sample((2, 1), seed=6)

    def run(c):
        cfg = dd.ClassifierFreeGuidance(cond_model, c, None, scale=2.0)
        return dd.sample(cfg, sde, x_T, method="ode", atol=1e-9, rtol=1e-9, sensealg=deb.InterpolatingAdjoint()).ys[-1].sum()

    (g,) = torch.autograd.grad(run(cond), cond)
    with torch.no_grad():
        fd = (run(cond + 1e-5) - run(cond - 1e-5)) / 2e-5
    torch.testing.assert_close(g, fd.reshape(1, 1), rtol=1e-5, atol=1e-7)


def test_pc_gradient_vs_finite_differences():
    sde = dd.VPSDE()
    model = GaussianEps(sde)
    x_T = sde.prior_sample((3, 1), seed=7)
    x = x_T.clone().requires_grad_(True)
    run = lambda x: dd.sample(model, sde, x, method="pc", steps=30, seed=1).ys[-1].sum()  # noqa: E731
    (g,) = torch.autograd.grad(run(x), x)
    with torch.no_grad():
        fd = torch.stack([(run(x_T + 1e-5 * e) - run(x_T - 1e-5 * e)) / 2e-5 for e in torch.eye(3, dtype=F64)[:, :, None]])
    torch.testing.assert_close(g.flatten(), fd, rtol=1e-6, atol=1e-8)


def test_model_sees_times_inside_span_only():
    sde, gm = dd.VPSDE(), _mixture()
    seen = []
    inner = gm.score_model(sde, "eps")

    def model(x, t):
        seen.append((float(t.min()), float(t.max())))
        return inner(x, t)

    x_T = sde.prior_sample((4, 2), seed=0)
    for method in ("sde", "ode", "pc"):
        seen.clear()
        dd.sample(model, sde, x_T, method=method, steps=20 if method == "pc" else None, t_end=0.01)
        assert min(s[0] for s in seen) >= 0.01 - 1e-15 and max(s[1] for s in seen) <= 1.0


def test_jax_model_samples_and_gradients():
    """dd.from_jax: the Gaussian's eps-model written in JAX samples and differentiates as the
    torch one (x_T and the mean, through the JAX VJP)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    sde = dd.VPSDE()
    b0, b1 = sde.beta_min, sde.beta_max

    def eps(x, t, p):
        alpha = jnp.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
        sigma = jnp.sqrt(1 - alpha**2)
        var = alpha**2 * 0.4**2 + sigma**2
        return -sigma[:, None] * (alpha[:, None] * p["mu"] - x) / var[:, None]

    jmodel = dd.from_jax(eps, {"mu": jnp.array([0.7])})
    tmodel = GaussianEps(sde)
    x_T = sde.prior_sample((4, 1), seed=3)
    outs = []
    for model, param in ((jmodel, jmodel.theta), (tmodel, tmodel.mu)):
        x = x_T.clone().requires_grad_(True)
        sol = dd.sample(model, sde, x, method="ode", atol=1e-8, rtol=1e-8, sensealg=deb.InterpolatingAdjoint())
        outs.append((sol.ys[-1].detach(), *torch.autograd.grad(sol.ys[-1].sum(), [x, param])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert float(jmodel.params(outs[0][2])["mu"][0]) == pytest.approx(float(outs[1][2][0]), rel=1e-10)


def test_log_likelihood_gradients_vs_finite_differences():
    """Maximum-likelihood training needs d logp / d theta: through the augmented flow (the
    exact trace's VJPs with create_graph) against central differences, for the data points
    and the model's mean."""
    sde = dd.VPSDE()
    model = GaussianEps(sde)
    x0 = torch.tensor([[0.3], [1.1], [-0.2]], dtype=F64)
    x = x0.clone().requires_grad_(True)
    logp, _ = dd.log_likelihood(model, sde, x, atol=1e-8, rtol=1e-8)
    gx, gmu = torch.autograd.grad(logp.sum(), [x, model.mu])

    def total(points, mu=0.7):
        with torch.no_grad():
            model.mu.fill_(mu)
            out = dd.log_likelihood(model, sde, points, atol=1e-8, rtol=1e-8)[0]
            model.mu.fill_(0.7)
        return out

    eps = 1e-5
    fd_x = (total(x0 + eps) - total(x0 - eps)) / (2 * eps)  # per-sample: logp_i depends on x_i only
    fd_mu = (total(x0, 0.7 + eps).sum() - total(x0, 0.7 - eps).sum()) / (2 * eps)
    torch.testing.assert_close(gx.flatten(), fd_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gmu, fd_mu.reshape(1), rtol=1e-5, atol=1e-6)
