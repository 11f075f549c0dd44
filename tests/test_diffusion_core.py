"""diffeqbridge.diffusion core: forward processes, model adapters/guidance, the Gaussian-mixture
oracle, the predictor-corrector sampler, likelihoods, validation (float64, closed forms)."""

from __future__ import annotations

import math

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import diffusion as dd
from diffeqbridge.diffusion.processes import DiffusionProcess

F64 = torch.float64
MIX = dict(weights=(0.5, 0.3, 0.2), means=((-3.0, 0.0), (3.0, 0.0), (0.0, 3.0)), stds=0.5)


def _mixture() -> dd.GaussianMixture:
    return dd.GaussianMixture(MIX["weights"], MIX["means"], MIX["stds"])


def _vp_callables():
    b0, b1 = 0.1, 20.0
    alpha = lambda t: torch.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)  # noqa: E731
    return alpha, lambda t: torch.sqrt(1 - alpha(t) ** 2)


PROCESSES = {
    "vp": lambda: dd.VPSDE(),
    "subvp": lambda: dd.SubVPSDE(),
    "ve": lambda: dd.VESDE(),
    "vp_T2": lambda: dd.VPSDE(0.2, 10.0, T=2.0),
    "ddpm": lambda: dd.DiscreteVPSDE(torch.linspace(1e-4, 0.02, 1000)),
    "custom": lambda: dd.ScheduleSDE(*_vp_callables()),
}


# ---------------------------------------------------------------------- processes
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_forward_sde_matches_marginals(name):
    """f = d log(alpha)/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (autograd of the marginals)
    agree with each process's closed forms; log_snr decreases and t_from_log_snr inverts it."""
    sde = PROCESSES[name]()
    t = torch.linspace(0.02, 0.98, 49, dtype=F64) * sde.T
    if name == "ddpm":  # log alpha is piecewise linear: differentiate inside the pieces
        t = (torch.arange(20, 980, 20, dtype=F64) + 0.5) / 1000
    f_auto = DiffusionProcess.f(sde, t)
    g2_auto = DiffusionProcess.g2(sde, t)
    torch.testing.assert_close(sde.f(t), f_auto, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.g2(t), g2_auto, rtol=1e-8, atol=1e-9)
    x = torch.randn(len(t), 3, dtype=F64)
    torch.testing.assert_close(sde.drift(t, x), sde.f(t)[:, None] * x)
    torch.testing.assert_close(sde.diffusion(t, x), sde.g2(t).sqrt()[:, None].expand(-1, 3))
    lam = sde.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-9)
    alpha, sigma = sde.marginal(t)
    torch.testing.assert_close(lam, torch.log(alpha / sigma), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(DiffusionProcess.t_from_log_snr(sde, lam), t, rtol=1e-9, atol=1e-9)


def test_song_et_al_constants():
    """VP/sub-VP/VE at Song et al. 2021's defaults: closed-form values at t = 1/2 and T."""
    t = torch.tensor([0.5, 1.0], dtype=F64)
    log_alpha = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    a, s = dd.VPSDE().marginal(t)
    torch.testing.assert_close(a, log_alpha.exp())
    torch.testing.assert_close(s, (1 - (2 * log_alpha).exp()).sqrt())
    a, s = dd.SubVPSDE().marginal(t)
    torch.testing.assert_close(s, 1 - (2 * log_alpha).exp())
    a, s = dd.VESDE().marginal(t)
    torch.testing.assert_close(s, 0.01 * 5000.0**t)
    assert float(a.sub(1).abs().max()) == 0.0
    assert dd.VESDE().prior_std == 50.0 and dd.VPSDE().prior_std == 1.0


def test_custom_schedule_and_ddpm_table_reproduce_vp():
    """ScheduleSDE with VP's callables is VPSDE (autograd f, g^2); DDPM's linear table
    (1e-4 .. 0.02, N = 1000) is the discretisation of VPSDE(0.1, 20): marginals agree to 2e-3."""
    vp, custom = dd.VPSDE(), dd.ScheduleSDE(*_vp_callables())
    t = torch.linspace(0.01, 1.0, 50, dtype=F64)
    for a, b in zip(custom.marginal(t), vp.marginal(t)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(custom.f(t), vp.f(t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(custom.g2(t), vp.g2(t), rtol=1e-10, atol=1e-10)
    ddpm = dd.VPSDE.from_ddpm_betas(torch.linspace(1e-4, 0.02, 1000))
    assert isinstance(ddpm, dd.DiscreteVPSDE)
    for a, b in zip(ddpm.marginal(t), vp.marginal(t)):
        assert float((a - b).abs().max()) < 2e-3
    # g^2 = -2 d log(alpha)/dt = -N log(1 - beta_n) = N beta_n (1 + beta_n / 2 + ...): 1% high at beta = 0.02
    rel = (ddpm.g2(t[1:-1]) / vp.g2(t[1:-1]) - 1).abs().max()
    assert float(rel) < 1.2e-2
    # DDPM's own table at its steps: alpha_n^2 = prod_{m <= n} (1 - beta_m)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    n = torch.tensor([0, 9, 499, 999], dtype=F64)
    alpha_bar = torch.cumprod(1 - betas, 0)[n.long()]
    torch.testing.assert_close(ddpm.marginal((n + 1) / 1000.0)[0] ** 2, alpha_bar)
    torch.testing.assert_close(ddpm.ddpm_timestep((n + 1) / 1000.0), n)


def test_prior_sample_per_sample_and_logp():
    sde = dd.VESDE()
    x = sde.prior_sample((4000, 3), seed=7)
    assert x.dtype == F64 and x.shape == (4000, 3)
    torch.testing.assert_close(sde.prior_sample((10, 3), seed=7), x[:10], rtol=0, atol=0)
    assert not torch.equal(sde.prior_sample((10, 3), seed=8), x[:10])
    assert abs(float(x.std()) / 50.0 - 1) < 0.03 and abs(float(x.mean())) < 50 * 4 / math.sqrt(12000)
    ref = torch.distributions.Normal(0.0, 50.0).log_prob(x).sum(1)
    torch.testing.assert_close(sde.prior_logp(x), ref)
    assert sde.prior_sample((2, 3), dtype=torch.float32).dtype == torch.float32


# ---------------------------------------------------------------------- models
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_parameterization_conversions_round_trip(sde_name):
    """An exact model in any parameterization, seen through ModelAdapter, gives every other
    parameterization of the same oracle."""
    sde, gm = PROCESSES[sde_name](), _mixture()
    x = gm.sample(64, seed=3) * 1.5
    t = torch.linspace(0.05, 0.95, 64, dtype=F64)
    truth = {p: gm.score_model(sde, p)(x, t) for p in dd.PARAMETERIZATIONS}
    for given in dd.PARAMETERIZATIONS:
        adapter = dd.ModelAdapter(gm.score_model(sde, given), sde, given)
        for want in dd.PARAMETERIZATIONS:
            torch.testing.assert_close(adapter.predict(want, x, t), truth[want], rtol=1e-9, atol=1e-9)
        assert adapter.calls == 4 and bool((adapter.nfe == 4).all())


def test_oracle_score_is_gradient_of_marginal_log_prob():
    sde, gm = dd.VPSDE(), _mixture()
    x = (gm.sample(32, seed=1) * 0.7).requires_grad_(True)
    t = torch.linspace(0.0, 1.0, 32, dtype=F64).clamp_min(1e-3)
    (grad,) = torch.autograd.grad(gm.marginal_log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(gm.marginal_score(x, t, sde), grad, rtol=1e-10, atol=1e-10)
    # t -> 0 is the data law
    torch.testing.assert_close(
        gm.marginal_log_prob(x, dd.VESDE(sigma_min=1e-9).T * 0.0, dd.VESDE(sigma_min=1e-9)), gm.log_prob(x), rtol=1e-8, atol=1e-8
    )


def test_mixture_sampling_statistics():
    gm = _mixture()
    x, comp = gm.sample_with_components(20000, seed=0)
    frac, stds = gm.component_stats(x)
    se = torch.sqrt(gm.weights * (1 - gm.weights) / 20000)
    assert bool(((frac - gm.weights).abs() < 4 * se).all())
    assert bool(((stds - 0.5).abs() < 0.015).all())
    torch.testing.assert_close(gm.sample(5, seed=0), x[:5], rtol=0, atol=0)


def _conditional_model(calls):
    def model(x, t, c):
        calls.append(x.shape[0])
        shift = torch.zeros_like(x) if c is None else c.to(x.dtype)
        return -x * (1 + t[:, None]) + shift

    return model


def test_classifier_free_guidance_reductions():
    x = torch.randn(6, 2, dtype=F64)
    t = torch.full((6,), 0.3, dtype=F64)
    cond, uncond = torch.ones(6, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    calls: list[int] = []
    inner = _conditional_model(calls)
    out_c, out_u = inner(x, t, cond), inner(x, t, uncond.expand(6, 2))
    calls.clear()
    torch.testing.assert_close(dd.ClassifierFreeGuidance(inner, cond, uncond, scale=0.0)(x, t), out_u)
    torch.testing.assert_close(dd.ClassifierFreeGuidance(inner, cond, uncond, scale=1.0)(x, t), out_c)
    assert calls == [6, 6]  # one branch each
    calls.clear()
    cfg = dd.ClassifierFreeGuidance(inner, cond, uncond, scale=3.0)
    torch.testing.assert_close(cfg(x, t), out_u + 3.0 * (out_c - out_u))
    assert calls == [12] and cfg.evaluations_per_call == 2  # both branches in one batched call
    # composes with every parameterization: the guided eps model seen as x0 is the guided x0
    sde = dd.VPSDE()
    as_x0 = dd.ModelAdapter(cfg, sde, "eps").x0(x, t)
    alpha, sigma = sde.marginal(t)
    expected = (x - sigma[:, None] * (out_u + 3 * (out_c - out_u))) / alpha[:, None]
    torch.testing.assert_close(as_x0, expected)
    none = dd.ClassifierFreeGuidance(inner, cond, None, scale=2.0)
    torch.testing.assert_close(none(x, t), inner(x, t, None) + 2 * (out_c - inner(x, t, None)))


# ---------------------------------------------------------------------- predictor-corrector
def test_pc_mixture_statistics_and_nfe():
    """PC (100 steps, 1 corrector, per-sample step sizes, sigma_data = 0.5) on the exact
    mixture score: component weights within 4 standard errors, stds 0.5 +- 0.03."""
    sde, gm = dd.VPSDE(), _mixture()
    n = 3000
    x_T = sde.prior_sample((n, 2), seed=0)
    sol = dd.sample(gm.score_model(sde, "score"), sde, x_T, method="pc", parameterization="score", steps=100, sigma_data=0.5)
    assert sol.success and sol.ys.shape == (2, n, 2)
    assert bool((sol.stats.nf == 200).all())
    frac, stds = gm.component_stats(sol.ys[-1])
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert bool(((frac - gm.weights).abs() < 4 * se).all()), frac
    assert bool(((stds - 0.5).abs() < 0.03).all()), stds


def test_pc_parameterizations_give_identical_samples_and_batch_independence():
    sde, gm = dd.VPSDE(), _mixture()
    x_T = sde.prior_sample((12, 2), seed=4)
    outs = {
        p: dd.sample(gm.score_model(sde, p), sde, x_T, method="pc", parameterization=p, steps=20, seed=5).ys[-1]
        for p in dd.PARAMETERIZATIONS
    }
    for p in dd.PARAMETERIZATIONS:
        torch.testing.assert_close(outs[p], outs["eps"], rtol=1e-9, atol=1e-9)
    part = dd.sample(gm.score_model(sde, "eps"), sde, x_T[:5], method="pc", steps=20, seed=5).ys[-1]
    torch.testing.assert_close(part, outs["eps"][:5], rtol=1e-12, atol=1e-12)
    other = dd.sample(gm.score_model(sde, "eps"), sde, x_T[:5], method="pc", steps=20, seed=6).ys[-1]
    assert not torch.allclose(other, part)


# ---------------------------------------------------------------------- likelihood
def test_log_likelihood_gaussian_closed_form():
    """Gaussian data N(mu, 0.7^2 I) in 3-D: log p_{t_end} by the probability flow matches the
    closed form to 1e-4 nats once the prior is replaced by the exact p_T (the prior N(0, I)
    differs from p_T by ~1e-2 nats at T = 1 for VP: alpha_T = 6.6e-3)."""
    sde = dd.VPSDE()
    g = dd.GaussianMixture([1.0], [[0.5, -0.3, 0.2]], 0.7)
    x = g.sample(16, seed=2)
    logp, sol = dd.log_likelihood(g.score_model(sde, "eps"), sde, x)
    assert sol.success and logp.shape == (16,)
    x_T = sol.ys[-1][:, :3]
    exact_prior = logp - sde.prior_logp(x_T) + g.marginal_log_prob(x_T, sde.T, sde)
    truth = g.marginal_log_prob(x, 1e-5, sde)
    assert float((exact_prior - truth).abs().max()) < 1e-4
    assert float((logp - truth).abs().max()) < 3e-2
    bpd = dd.bits_per_dim(logp, 3)
    torch.testing.assert_close(bpd, -logp / (3 * math.log(2)))


def test_log_likelihood_hutchinson_unbiased():
    """Hutchinson traces (Rademacher and Gaussian probes, fixed per solve) on a 2-D mixture,
    where the Jacobian is not isotropic: the mean error over 48 points is within 4 standard
    errors of zero and the spread shrinks with more probes."""
    sde = dd.VPSDE()
    gm = dd.GaussianMixture([0.6, 0.4], [[-1.0, 0.0], [1.0, 0.5]], [0.4, 0.6])
    x = gm.sample(48, seed=3)
    model = gm.score_model(sde, "score")
    exact, _ = dd.log_likelihood(model, sde, x, parameterization="score", atol=1e-6, rtol=1e-6)
    for probe in ("rademacher", "gaussian"):
        spreads = []
        for n_probes in (1, 8):
            est, _ = dd.log_likelihood(
                model,
                sde,
                x,
                parameterization="score",
                trace="hutchinson",
                probe=probe,
                n_probes=n_probes,
                seed=1,
                atol=1e-6,
                rtol=1e-6,
            )
            err = est - exact
            se = float(err.std()) / math.sqrt(len(err))
            assert abs(float(err.mean())) < 4 * se + 1e-6, (probe, n_probes, float(err.mean()), se)
            spreads.append(float(err.std()))
        assert spreads[1] < spreads[0]


# ---------------------------------------------------------------------- validation
class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return -x


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(method="nope"), ValueError),
        (dict(x_T=torch.zeros(4, dtype=F64)), ValueError),
        (dict(x_T=torch.zeros(4, 2, dtype=torch.int64)), TypeError),
        (dict(x_T=torch.full((4, 2), float("nan"), dtype=F64)), ValueError),
        (dict(x_T=[1.0, 2.0]), TypeError),
        (dict(t_end=0.0), ValueError),
        (dict(t_end=1.0), ValueError),
        (dict(t_end=-1e-3), ValueError),
        (dict(t_end="1e-3"), TypeError),
        (dict(steps=0), ValueError),
        (dict(steps=2.5), ValueError),
        (dict(parameterization="noise"), ValueError),
        (dict(seed=-1), ValueError),
        (dict(atol=-1.0), ValueError),
        (dict(method="pc", snr=-0.1), ValueError),
        (dict(method="pc", n_corrector=-1), ValueError),
        (dict(method="pc", step_size="global"), ValueError),
        (dict(method="pc", alg=deb.EM()), ValueError),
        (dict(sde="vp"), TypeError),
    ],
)
def test_bad_input_rejected_before_first_model_call(kwargs, error):
    model = _Counting()
    args = dict(model=model, sde=dd.VPSDE(), x_T=torch.zeros(4, 2, dtype=F64))
    args.update(kwargs)
    with pytest.raises(error):
        dd.sample(**args)
    assert model.calls == 0


def test_module_dtype_mismatch_rejected():
    """An nn.Module model's parameter dtype is checked against x_T before it is called."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            raise AssertionError("called")

    with pytest.raises(TypeError, match="dtype"):
        dd.sample(Net(), dd.VPSDE(), torch.zeros(3, 2, dtype=F64), method="pc")


def test_likelihood_and_process_validation():
    sde = dd.VPSDE()
    model = _Counting()
    with pytest.raises(ValueError, match="trace"):
        dd.log_likelihood(model, sde, torch.zeros(2, 2, dtype=F64), trace="approx")
    with pytest.raises(ValueError, match="n_probes"):
        dd.log_likelihood(model, sde, torch.zeros(2, 2, dtype=F64), trace="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="t_end"):
        dd.log_likelihood(model, sde, torch.zeros(2, 2, dtype=F64), t_end=2.0)
    assert model.calls == 0
    with pytest.raises(ValueError, match="beta_max"):
        dd.VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="sigma_max"):
        dd.VESDE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="betas"):
        dd.DiscreteVPSDE([0.5, 1.5])
    with pytest.raises(ValueError, match="decrease"):
        dd.ScheduleSDE(lambda t: torch.ones_like(t), lambda t: torch.ones_like(t))
    with pytest.raises(ValueError, match="parameterization"):
        dd.ModelAdapter(model, sde, "noise")
    with pytest.raises(ValueError, match="shape"):
        sde.prior_sample((4,))
