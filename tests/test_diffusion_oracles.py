"""diffeqbridge.diffusion against exact closed-form oracles (float64).

What the other diffusion test files do not cover: the DDPM tables and ``add_noise`` of
diffusers against our forward marginals, and the moment ODEs of every process; the diffused
Gaussian-mixture density against ``torch.distributions`` for every process (unequal
component stds, 3-D) and the continuity equation of its probability flow; the
probability-flow likelihood of a mixture against its exact log density (also on ``(2, 2)``
states, exact and Hutchinson traces); ``bits_per_dim`` against the uniform-dequantization
oracle and score_sde's formula; ``sliced_wasserstein`` against its Gaussian closed form and
samplers' output against a fresh exact sample; ODE inversion round trips against the
tolerance; classifier-free guidance of two Gaussians against the exact guided flow map; the
parameterization formulas against a model that knows ``(x0, eps)``; the laws of the
per-sample random draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from diffeqbridge import diffusion as dd

F64 = torch.float64

# 3-D mixture with unequal weights and stds (test_diffusion_core's mixture has equal stds)
GM3 = dict(weights=(0.5, 0.3, 0.2), means=((-2.0, 0.0, 1.0), (2.0, 1.0, 0.0), (0.0, -2.0, -1.0)), stds=(0.4, 0.7, 1.1))


def _gm3() -> dd.GaussianMixture:
    return dd.GaussianMixture(GM3["weights"], GM3["means"], GM3["stds"])


def _cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021's ``alpha_bar(t) = cos^2((t + s)/(1 + s) pi/2)`` (unnormalised)."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2).square()


def _cosine_sde() -> dd.ScheduleSDE:
    """The cosine schedule as a continuous process: ``alpha^2 = alpha_bar(t) / alpha_bar(0)``."""
    a0 = float(_cosine_alpha_bar(torch.zeros((), dtype=F64)))

    def alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(_cosine_alpha_bar(t) / a0)

    return dd.ScheduleSDE(alpha, lambda t: torch.sqrt(1 - alpha(t).square()), T=0.99)


PROCESSES = {
    "vp": lambda: dd.VPSDE(),
    "subvp": lambda: dd.SubVPSDE(),
    "ve": lambda: dd.VESDE(),
    "ve_T2": lambda: dd.VESDE(0.05, 20.0, T=2.0),
    "subvp_T2": lambda: dd.SubVPSDE(0.2, 10.0, T=2.0),
    "ddpm": lambda: dd.DiscreteVPSDE(torch.linspace(1e-4, 0.02, 1000)),
    "cosine": _cosine_sde,
}


# ---------------------------------------------------------------------- forward processes vs diffusers
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusers_ddpm_tables_and_add_noise(schedule):
    """diffusers' DDPMScheduler (float32 tables): ``alphas_cumprod[n]`` is our
    ``DiscreteVPSDE(betas)`` ``alpha^2`` at ``t = (n + 1)/N``, and ``add_noise(x0, eps, n)`` is
    ``alpha x0 + sigma eps`` there, to float32 rounding of a 1000-term product (rtol 2e-5)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    sde = dd.DiscreteVPSDE(sched.betas.double())
    n = torch.arange(0, 1000, 37)
    t = (n.double() + 1) / 1000
    alpha, sigma = sde.marginal(t)
    torch.testing.assert_close(alpha.square(), sched.alphas_cumprod[n].double(), rtol=2e-5, atol=1e-9)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(n), 3, generator=gen, dtype=F64)
    eps = torch.randn(len(n), 3, generator=gen, dtype=F64)
    theirs = sched.add_noise(x0, eps, n)
    ours = alpha[:, None] * x0 + sigma[:, None] * eps
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)


def test_diffusers_cosine_table_is_the_continuous_cosine_schedule():
    """``squaredcos_cap_v2`` betas telescope: ``prod_{m<=n}(1 - beta_m) = alpha_bar((n+1)/N) /
    alpha_bar(0)``; so ``DiscreteVPSDE`` on diffusers' table equals the continuous cosine
    ``ScheduleSDE`` at the grid points (up to the beta cap 0.999 at the last step and float32
    betas), and its f, g^2 are the continuous ones to O(1/N) between them."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ddpm, cont = dd.DiscreteVPSDE(sched.betas.double()), _cosine_sde()
    t = (torch.arange(0, 990, 11, dtype=F64) + 1) / 1000
    for a, b in zip(ddpm.marginal(t), cont.marginal(t)):
        torch.testing.assert_close(a, b, rtol=5e-5, atol=1e-7)
    mid = t[5:-5] + 0.5e-3
    torch.testing.assert_close(ddpm.f(mid), cont.f(mid), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(ddpm.g2(mid), cont.g2(mid), rtol=2e-3, atol=1e-6)


def test_forward_sde_moments_by_quadrature():
    """The marginal moments solve the moment ODEs of ``dx = f x dt + g dW``:
    ``m' = f m`` and ``V' = 2 f V + g^2``, i.e. ``m = m(0) e^F``,
    ``V = e^{2F} (V(0) + int_0^t e^{-2F} g^2)`` with ``F = int_0^t f``; the midpoint rule on
    4000 cells (exact for DDPM's piecewise-constant f, whose knots are cell edges) from the
    closed-form f, g^2 gives ``alpha(t)`` and ``sigma(t)^2``."""
    for name, make in PROCESSES.items():
        sde = make()
        grid = torch.linspace(0.0, sde.T * (0.95 if name != "ddpm" else 1.0), 4001, dtype=F64)
        h, mid = grid[1] - grid[0], 0.5 * (grid[1:] + grid[:-1])
        f_mid = sde.f(mid)
        int_f = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(h * f_mid, 0)])
        int_f_mid = int_f[:-1] + 0.5 * h * f_mid
        acc = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(h * torch.exp(-2 * int_f_mid) * sde.g2(mid), 0)])
        alpha, sigma = sde.marginal(grid)
        var = torch.exp(2 * int_f) * (sigma[0].square() + acc)
        torch.testing.assert_close(torch.exp(int_f) * alpha[0], alpha, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(var[1:], sigma[1:].square(), rtol=1e-5, atol=1e-8, msg=name)


def test_discrete_vp_below_the_first_ddpm_step():
    """Below DDPM's first step ``t = 1/N`` the table's process runs from the data
    (``alpha(0) = 1``, ``sigma(0) = 0``): ``log alpha`` is linear between ``(0, 0)`` and
    ``(1/N, log(1 - beta_0) / 2)``, so ``alpha <= 1`` and sigma is finite; DDPM's own
    ``q(x_1 | x_0)`` is unchanged.  (It was the first table segment extended, which gave
    ``alpha > 1`` and ``sigma = NaN`` for ``t < 1.7e-4``, and NaN likelihoods at the
    default ``t_end = 1e-5``.)"""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    sde = dd.DiscreteVPSDE(betas)
    t = torch.tensor([0.0, 1e-5, 1e-4, 5e-4, 1e-3], dtype=F64)
    alpha, sigma = sde.marginal(t)
    exact_log_alpha = t * 1000 * 0.5 * math.log1p(-1e-4)
    torch.testing.assert_close(alpha, exact_log_alpha.exp(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma, (1 - (2 * exact_log_alpha).exp()).sqrt(), rtol=1e-9, atol=0)
    assert float(sigma[0]) == 0.0 and float(alpha[0]) == 1.0
    torch.testing.assert_close(sde.f(t[1:4]), torch.full((3,), 500 * math.log1p(-1e-4), dtype=F64))
    lam = sde.log_snr(t[1:])
    torch.testing.assert_close(sde.t_from_log_snr(lam), t[1:], rtol=1e-9, atol=1e-12)
    # the likelihood at the default t_end = 1e-5 is finite (the exact score model is too);
    # loose tolerances: f jumps at each of the N knots, which costs the adaptive solver steps
    gm = dd.GaussianMixture([1.0], [[0.5, -0.3]], 0.7)
    x = gm.sample(2, seed=0)
    assert bool(gm.score_model(sde, "eps")(x, torch.full((2,), 1e-5, dtype=F64)).isfinite().all())
    logp, sol = dd.log_likelihood(gm.score_model(sde, "score"), sde, x, parameterization="score", atol=1e-3, rtol=1e-3)
    assert sol.success
    x_T = sol.ys[-1][:, :2]
    exact_prior = logp - sde.prior_logp(x_T) + gm.marginal_log_prob(x_T, 1.0, sde)
    assert float((exact_prior - gm.marginal_log_prob(x, 1e-5, sde)).abs().max()) < 2e-2


# ---------------------------------------------------------------------- the mixture oracle
def _torch_mixture_at(gm: dd.GaussianMixture, sde, t: torch.Tensor) -> D.Distribution:
    """The diffused mixture at times ``t`` ``(B,)`` as a torch.distributions object with batch ``(B,)``."""
    alpha, sigma = sde.marginal(t)
    loc = alpha[:, None, None] * gm.means[None]  # (B, K, dim)
    scale = torch.sqrt(alpha[:, None].square() * gm.stds[None].square() + sigma[:, None].square())  # (B, K)
    comp = D.Independent(D.Normal(loc, scale[..., None].expand_as(loc)), 1)
    return D.MixtureSameFamily(D.Categorical(probs=gm.weights.expand(len(t), -1)), comp)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_mixture_marginal_density_and_score_are_exact(name):
    """``marginal_log_prob`` equals torch.distributions' MixtureSameFamily of
    ``N(alpha mu_k, alpha^2 s_k^2 + sigma^2)``; ``marginal_score`` is its autograd gradient;
    every parameterization of ``score_model`` is consistent with that score, at every t."""
    sde, gm = PROCESSES[name](), _gm3()
    t = torch.linspace(1e-3, 1.0, 40, dtype=F64) * sde.T
    x = gm.sample(40, seed=5) * 1.3 + 0.2
    ref = _torch_mixture_at(gm, sde, t)
    xr = x.clone().requires_grad_(True)
    logp = ref.log_prob(xr)
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    torch.testing.assert_close(gm.marginal_log_prob(x, t, sde), logp.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.marginal_score(x, t, sde), grad, rtol=1e-9, atol=1e-9)
    alpha, sigma = (c[:, None] for c in sde.marginal(t))
    eps = gm.score_model(sde, "eps")(x, t)
    torch.testing.assert_close(eps, -sigma * grad, rtol=1e-9, atol=1e-9)
    x0 = gm.score_model(sde, "x0")(x, t)
    torch.testing.assert_close(x0, (x + sigma.square() * grad) / alpha, rtol=1e-9, atol=1e-9)
    # Tweedie: x0-prediction is the posterior mean E[x0 | x_t] = sum_k r_k E_k[x0 | x_t]
    v = alpha.square() * gm.stds.square()[None] + sigma.square()  # (B, K)
    resp = torch.softmax(gm._component_log_probs(x, alpha[:, 0], v), dim=1)
    post = gm.means[None] + (alpha * gm.stds.square()[None] / v)[..., None] * (x[:, None] - alpha[..., None] * gm.means[None])
    torch.testing.assert_close(x0, (resp[..., None] * post).sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_probability_flow_solves_the_continuity_equation(name):
    """The probability-flow field ``h = f x - g^2 score / 2`` (the sampler's and the
    likelihood's, ``reverse_sde_drift(.., 1/2)``) transports the exact diffused mixture:
    ``d/dt log p_t(x) = -div h - h . grad log p_t`` pointwise (autograd in ``t`` and ``x``),
    and the reverse SDE's drift (``scale = 1``) is ``h - g^2 score / 2``."""
    from diffeqbridge.diffusion.models import ModelAdapter
    from diffeqbridge.diffusion.sampling import reverse_sde_drift

    sde, gm = PROCESSES[name](), _gm3()
    n = 24
    t = (torch.linspace(0.05, 0.95, n, dtype=F64) * sde.T).requires_grad_(True)
    if name == "ddpm":  # inside the table's linear pieces
        t = ((torch.arange(n, dtype=F64) * 40 + 20.5) / 1000).requires_grad_(True)
    x = (gm.sample(n, seed=6) * 0.8).requires_grad_(True)
    logp = gm.marginal_log_prob(x, t, sde)
    dlogp_dt, score = torch.autograd.grad(logp.sum(), (t, x))
    adapter = ModelAdapter(gm.score_model(sde, "score"), sde, "score")
    flow = reverse_sde_drift(adapter, sde, 0.5)
    h = flow(t.detach(), x)
    div = sum(torch.autograd.grad(h[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(3))
    rhs = -div - (h * score).sum(1)
    torch.testing.assert_close(dlogp_dt, rhs.detach(), rtol=1e-7, atol=1e-7)
    g2 = sde.g2(t.detach())[:, None]
    rev = reverse_sde_drift(adapter, sde, 1.0)(t.detach(), x.detach())
    torch.testing.assert_close(rev, h.detach() - 0.5 * g2 * score, rtol=1e-10, atol=1e-10)


def test_mixture_at_zero_and_prior_gap():
    """At ``t -> 0`` the diffused law is the data law; at ``T`` the VP marginal differs from
    the prior by ``KL <= E log p_T - E log prior`` which is small (alpha_T = 6.7e-3)."""
    gm, vp = _gm3(), dd.VPSDE()
    x = gm.sample(500, seed=2)
    torch.testing.assert_close(gm.marginal_log_prob(x, 0.0, vp), gm.log_prob(x), rtol=0, atol=1e-12)
    x_T = gm.sample(4000, seed=3) * vp.marginal(1.0)[0] + vp.marginal(1.0)[1] * torch.randn(
        4000, 3, dtype=F64, generator=torch.Generator().manual_seed(1)
    )
    kl = float((gm.marginal_log_prob(x_T, 1.0, vp) - vp.prior_logp(x_T)).mean())
    # closed-form second-order term: KL ~ alpha_T^2 E|mu|^2 / 2 plus a variance term
    alpha_T = float(vp.marginal(1.0)[0])
    second_moment = float((gm.weights * (gm.means.square().sum(1) + 3 * gm.stds.square())).sum())
    assert abs(kl) < alpha_T**2 * second_moment, kl


# ---------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_log_likelihood_of_a_mixture_is_exact(name):
    """The probability flow of the exact score transports the exact law, so with the prior
    replaced by the exact ``p_T`` the ODE's ``log p_{t_end}`` equals the mixture's exact log
    density to the ODE tolerance (1e-4 nats at atol = rtol = 1e-8)."""
    sde, gm = PROCESSES[name](), _gm3()
    x = gm.sample(12, seed=4)
    logp, sol = dd.log_likelihood(gm.score_model(sde, "score"), sde, x, parameterization="score", atol=1e-8, rtol=1e-8)
    assert sol.success
    x_T = sol.ys[-1][:, :3]
    with_exact_prior = logp - sde.prior_logp(x_T) + gm.marginal_log_prob(x_T, sde.T, sde)
    truth = gm.marginal_log_prob(x, 1e-5, sde)
    err = float((with_exact_prior - truth).abs().max())
    assert err < 1e-4, err
    if name != "ve":  # the data law itself (VE's sigma(0) = sigma_min is not 0)
        assert float((truth - gm.log_prob(x)).abs().max()) < 1e-3


def test_log_likelihood_on_matrix_states_exact_and_hutchinson():
    """States of shape ``(2, 2)``, a v-prediction model: the exact trace gives the mixture's
    log density to 1e-6 nats; Hutchinson's (Rademacher, 4 probes per point, fixed for the
    solve) errors over 40 points have mean within 4 standard errors of 0 (unbiased)."""
    sde = dd.VPSDE()
    gm = dd.GaussianMixture([0.4, 0.6], [[[1.0, 0.0], [0.5, -1.0]], [[-1.0, 0.5], [0.0, 1.0]]], [0.5, 0.8])
    x = gm.sample(40, seed=1)
    model = gm.score_model(sde, "v")
    truth = gm.marginal_log_prob(x, 1e-5, sde)
    results = {}
    for trace in ("exact", "hutchinson"):
        logp, sol = dd.log_likelihood(model, sde, x, parameterization="v", atol=1e-7, rtol=1e-7, trace=trace, n_probes=4, seed=2)
        assert sol.success
        x_T = sol.ys[-1][:, :4].reshape(x.shape)
        results[trace] = logp - sde.prior_logp(x_T) + gm.marginal_log_prob(x_T, sde.T, sde) - truth
    assert float(results["exact"].abs().max()) < 1e-6
    err = results["hutchinson"]
    se = float(err.std()) / math.sqrt(len(err))
    assert abs(float(err.mean())) < 4 * se, (float(err.mean()), se)
    assert float(err.std()) > 1e-3  # it is an estimate: a zero spread would mean the exact trace ran


def test_bits_per_dim_oracle_and_score_sde_formula():
    """Uniform dequantized 8-bit data: on ``[-1, 1]^d`` the density is ``2^-d`` (log p =
    ``-d ln 2``), on ``[0, 1]^d`` it is 1; either way the bits per dim are exactly 8 with the
    documented offsets ``8 - log2(w)`` (7 and 8).  score_sde's ``bpd = -logp / ln 2 / N + 7 -
    inverse_scaler(-1)`` gives the same numbers."""
    d = 3 * 8 * 8
    logp = torch.tensor([-d * math.log(2.0), -d * math.log(2.0) + 5.0], dtype=F64)
    bpd = dd.bits_per_dim(logp, d, offset=8 - math.log2(2.0))
    assert abs(float(bpd[0]) - 8.0) < 1e-12
    score_sde = -logp / math.log(2.0) / d + 7.0 - 0.0  # centered data: inverse_scaler(-1) = 0
    torch.testing.assert_close(bpd, score_sde, rtol=0, atol=1e-12)
    zero = torch.zeros(1, dtype=F64)
    assert abs(float(dd.bits_per_dim(zero, d, offset=8.0)) - 8.0) < 1e-12
    score_sde01 = -zero / math.log(2.0) / d + 7.0 - (-1.0)  # [0, 1] data: inverse_scaler(-1) = -1
    torch.testing.assert_close(dd.bits_per_dim(zero, d, offset=8.0), score_sde01, rtol=0, atol=1e-12)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="dim"):
            dd.bits_per_dim(logp, bad)


# ---------------------------------------------------------------------- samplers vs exact samples
def test_sliced_wasserstein_gaussian_closed_form():
    """For ``N(m1, I)`` vs ``N(m2, I)`` in 2-D every 1-D projection on a unit ``theta`` is a shift by
    ``theta . (m2 - m1)``, and ``E[(theta . u)^2] = |u|^2 / D`` over uniform directions: the
    sliced W2 of large samples is ``|m2 - m1| / sqrt(D)``; identical samples give 0 and the
    order of the rows does not matter."""
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(5000, 2, generator=gen, dtype=F64)
    z2 = torch.randn(5000, 2, generator=gen, dtype=F64)
    shift = torch.tensor([3.0, -1.5], dtype=F64)
    sw = dd.sliced_wasserstein(z1, z2 + shift, n_projections=1000, seed=1)
    exact = float(shift.norm()) / math.sqrt(2.0)
    # (theta . u)^2 / |u|^2 ~ Beta(1/2, 1/2) in 2-D: relative std 0.71 / sqrt(1000) of SW^2, so
    # 1.1 % of SW; 5 % is 4.5 standard errors (plus the O(1/n) sampling term)
    assert abs(sw - exact) < 0.05 * exact, (sw, exact)
    assert dd.sliced_wasserstein(z1, z1[torch.randperm(5000, generator=gen)]) == 0.0
    with pytest.raises(ValueError):
        dd.sliced_wasserstein(z1, z2[:10])
    for bad in (0, 2.5, True):  # 0 was refused with a message about a shape, 2.5 was accepted
        with pytest.raises(ValueError, match="n_projections"):
            dd.sliced_wasserstein(z1, z2, n_projections=bad)


def test_mixture_refuses_states_of_another_shape():
    """A state of the wrong shape is a ValueError naming ``x`` (it was a matmul RuntimeError,
    or a (B, 3, 1) state for 3-vectors was flattened silently)."""
    gm, sde = _gm3(), dd.VPSDE()
    for bad in (torch.zeros(4, 2, dtype=F64), torch.zeros(4, 3, 1, dtype=F64)):
        for call in (gm.log_prob, lambda x: gm.marginal_log_prob(x, 0.5, sde), lambda x: gm.marginal_score(x, 0.5, sde)):
            with pytest.raises(ValueError, match="x must"):
                call(bad)


SW_CASES = [
    ("ode", {"atol": 1e-6, "rtol": 1e-6}),
    ("sde", {}),
    ("dpm_solver", {"steps": 20, "order": 3}),
    ("edm", {"steps": 30}),
    ("pc", {"steps": 100, "sigma_data": 0.7}),
]


@pytest.mark.parametrize("method,options", SW_CASES, ids=[c[0] for c in SW_CASES])
def test_sampler_output_is_close_to_a_fresh_exact_sample(method, options):
    """2000 samples of the 3-D mixture (VP, t_end = 1e-3) are as close in sliced W2 to a
    fresh exact draw of ``p_{t_end}`` as two independent exact draws are to each other (the
    noise floor), up to a factor 1.5; the component weights lie within 4 standard errors."""
    sde, gm = dd.VPSDE(), _gm3()
    n = 2000
    out = dd.sample(gm.score_model(sde, "eps"), sde, sde.prior_sample((n, 3), seed=11), method=method, **options)
    assert out.success
    x = out.ys[-1]
    a, s = sde.marginal(1e-3)
    gen = torch.Generator().manual_seed(5)
    fresh = a * gm.sample(n, seed=21) + s * torch.randn(n, 3, generator=gen, dtype=F64)
    other = a * gm.sample(n, seed=22) + s * torch.randn(n, 3, generator=gen, dtype=F64)
    floor = dd.sliced_wasserstein(fresh, other, seed=3)
    sw = dd.sliced_wasserstein(x, fresh, seed=3)
    assert sw < 1.5 * floor + 0.01, (sw, floor)
    frac, _ = gm.component_stats(x)
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert bool(((frac - gm.weights).abs() < 4 * se).all()), frac
    # a wrong law (means shifted by 0.5) is far outside the same bound: the test can fail
    assert dd.sliced_wasserstein(x + 0.5, fresh, seed=3) > 3 * floor


# ---------------------------------------------------------------------- guidance
def test_classifier_free_guidance_of_two_gaussians_is_the_guided_gaussian():
    """Class ``c`` has data law ``N(mu_c, s^2 I)``; eps is affine in the mean, so
    ``eps_u + w (eps_c - eps_u)`` is exactly the eps of ``N(mu_u + w (mu_c - mu_u), s^2 I)``.
    The probability flow of that law is the affine map
    ``x_t = alpha_t m + (x_T - alpha_T m) sqrt(v_t / v_T)``, ``v = alpha^2 s^2 + sigma^2``:
    ``dd.sample(method="ode")`` with the guided model reproduces it to 1e-7."""
    s, w = 0.6, 2.5
    mus = torch.tensor([[1.0, -0.5], [-1.0, 2.0]], dtype=F64)  # class 0 (unconditional), class 1
    for sde in (dd.VPSDE(), dd.VESDE(sigma_max=20.0)):
        models = [dd.GaussianMixture([1.0], [m.tolist()], s).score_model(sde, "eps") for m in mus]

        def inner(x, t, c, models=models):
            return torch.where(c.bool(), models[1](x, t), models[0](x, t))

        n = 16
        cond, uncond = torch.ones(n, 1, dtype=F64), torch.zeros(n, 1, dtype=F64)
        cfg = dd.ClassifierFreeGuidance(inner, cond, uncond, scale=w)
        x_T = sde.prior_sample((n, 2), seed=4)
        out = dd.sample(cfg, sde, x_T, method="ode", atol=1e-10, rtol=1e-10)
        m = mus[0] + w * (mus[1] - mus[0])
        a0, s0 = sde.marginal(1e-3)
        aT, sT = sde.marginal(sde.T)
        v0, vT = a0**2 * s**2 + s0**2, aT**2 * s**2 + sT**2
        exact = a0 * m + (x_T - aT * m) * torch.sqrt(v0 / vT)
        err = float((out.ys[-1] - exact).abs().max())
        assert err < 1e-7 * max(1.0, float(exact.abs().max())), (sde, err)
        assert bool((out.stats.nf % 2 == 0).all())  # two network evaluations per guided call


# ---------------------------------------------------------------------- parameterizations
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine"])
def test_parameterization_formulas_from_known_noise(name):
    """With ``x = alpha x0 + sigma eps`` for known ``(x0, eps)``, a model that returns the
    true ``eps`` / ``x0`` / ``v = alpha eps - sigma x0`` / ``score = -eps / sigma`` (the
    conditional score at this ``x0``) is seen through ModelAdapter as every other of them."""
    sde = PROCESSES[name]()
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(30, 2, generator=gen, dtype=F64)
    eps = torch.randn(30, 2, generator=gen, dtype=F64)
    t = torch.linspace(0.02, 0.98, 30, dtype=F64) * sde.T
    alpha, sigma = (c[:, None] for c in sde.marginal(t))
    x = alpha * x0 + sigma * eps
    truth = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma}
    for given, value in truth.items():
        adapter = dd.ModelAdapter(lambda x_, t_, value=value: value, sde, given)
        for want, expected in truth.items():
            torch.testing.assert_close(adapter.predict(want, x, t), expected, rtol=1e-9, atol=1e-9, msg=f"{given}->{want}")


# ---------------------------------------------------------------------- inversion
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_ode_inversion_round_trip_follows_the_tolerance(name):
    """``invert(method="ode")`` then ``sample(method="ode")`` on the mixture's exact model:
    ``x0 -> x_T -> x0`` returns within ``50 tol`` (relative), and tightening the tolerance by
    100 shrinks the round-trip error by at least 10; the latent is the exact flow's (the
    likelihood solve's latent, another integration of the same ODE) to the same bound."""
    sde, gm = PROCESSES[name](), _gm3()
    model = gm.score_model(sde, "eps")
    x0 = gm.sample(16, seed=9)
    errors = []
    for tol in (1e-5, 1e-7):
        x_T = dd.invert(model, sde, x0, method="ode", atol=tol, rtol=tol)
        back = dd.sample(model, sde, x_T, method="ode", atol=tol, rtol=tol).ys[-1]
        err = float((back - x0).norm() / x0.norm())
        assert err < 50 * tol, (tol, err)
        errors.append(err)
    assert errors[1] < errors[0] / 10, errors
    _, sol = dd.log_likelihood(model, sde, x0, atol=1e-9, rtol=1e-9, t_end=1e-3)
    ref = sol.ys[-1][:, :3]
    scale = float(ref.abs().max())
    assert float((x_T - ref).abs().max()) < 50 * 1e-7 * scale


# ---------------------------------------------------------------------- per-sample random draws
def test_per_sample_draws_have_their_laws():
    """``per_sample_normal`` / ``uniform`` / ``rademacher`` (the priors', mixtures' and
    Hutchinson probes' noise), 40000 draws at a fixed seed: Kolmogorov-Smirnov distance to
    N(0, 1) and U(0, 1) below the 1 % critical value 1.63/sqrt(n); mean, variance and
    kurtosis of the normals and the signs' mean within 4 standard errors; columns and streams
    uncorrelated (|r| < 4/sqrt(n)); row ``i`` is the same in a larger batch."""
    n = 20000
    crit = 1.63 / math.sqrt(2 * n)
    z = dd.per_sample_normal((n, 2), seed=3, stream=1)
    zs = torch.sort(z.flatten())[0]
    ks = float((torch.arange(1, 2 * n + 1, dtype=F64) / (2 * n) - D.Normal(0.0, 1.0).cdf(zs)).abs().max())
    assert ks < crit, ks
    m = 2 * n
    assert abs(float(z.mean())) < 4 / math.sqrt(m)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / m)
    assert abs(float(z.pow(4).mean()) - 3) < 4 * math.sqrt(96 / m)
    u = dd.per_sample_uniform((n, 2), seed=3, stream=1)
    us = torch.sort(u.flatten())[0]
    assert float((torch.arange(1, m + 1, dtype=F64) / m - us).abs().max()) < crit
    assert bool(((u > 0) & (u < 1)).all())
    r = dd.per_sample_rademacher((n, 2), seed=3, stream=1)
    assert bool((r.abs() == 1).all()) and abs(float(r.mean())) < 4 / math.sqrt(m)
    bound = 4 / math.sqrt(n)
    other = dd.per_sample_normal((n, 2), seed=3, stream=2)
    for a, b in ((z[:, 0], z[:, 1]), (z[:, 0], other[:, 0]), (z[:, 0], dd.per_sample_normal((n, 2), seed=4, stream=1)[:, 0])):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < bound
    torch.testing.assert_close(dd.per_sample_normal((7, 2), seed=3, stream=1), z[:7], rtol=0, atol=0)
