"""Fixed-grid and adaptive diffusion samplers: DPM-Solver(++), EDM, BDIA/EDICT, dd.invert.

Oracles (no trained weights): a 1-D Gaussian N(mu, s^2), whose probability flow is affine,
``x_t = alpha_t mu + (x_T - alpha_T mu) sqrt(alpha_t^2 s^2 + sigma_t^2) / sqrt(alpha_T^2 s^2 + sigma_T^2)``
(so every ODE sampler's error is known exactly), and the 2-D mixture of the issue
(weights (0.5, 0.3, 0.2), means (-3,0), (3,0), (0,3), std 0.5) with its exact score.
Everything in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import fitted_order

import diffeqbridge as deb
from diffeqbridge import diffusion as dd
from diffeqbridge.diffusion.dpm_solver import singlestep_orders
from diffeqbridge.diffusion.inversion import InversionState

T_END = 1e-3
MU, S = 0.5, 0.8


def _gaussian_model(sde, parameterization="eps"):
    return dd.GaussianMixture([1.0], [[MU]], S).score_model(sde, parameterization)


def _exact_flow(sde, x_T: torch.Tensor, t: float) -> torch.Tensor:
    """The probability-flow ODE's solution at ``t`` from ``x_T`` at ``T`` for N(MU, S^2) data."""
    a_T, s_T = sde.marginal(torch.tensor([sde.T], dtype=torch.float64))
    a, s = sde.marginal(torch.tensor([t], dtype=torch.float64))
    return a * MU + (x_T - a_T * MU) * torch.sqrt(a * a * S * S + s * s) / torch.sqrt(a_T * a_T * S * S + s_T * s_T)


def _x_T(sde) -> torch.Tensor:
    return sde.prior_std * torch.linspace(-2.0, 2.0, 8, dtype=torch.float64).reshape(8, 1)


def _mixture() -> dd.GaussianMixture:
    return dd.GaussianMixture([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], 0.5)


class CountingModel:
    """Wraps a model; counts calls and evaluated rows."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x, t)


# ------------------------------------------------------------------ convergence orders
CONVERGENCE = [
    # (label, method, options, step budgets, theoretical order)
    ("DPM-Solver-1", "dpm_solver", {"algorithm": "dpmsolver", "variant": "singlestep", "order": 1}, [12, 24, 48, 96], 1),
    ("DPM-Solver-2", "dpm_solver", {"algorithm": "dpmsolver", "variant": "singlestep", "order": 2}, [24, 48, 96, 192], 2),
    ("DPM-Solver-3", "dpm_solver", {"algorithm": "dpmsolver", "variant": "singlestep", "order": 3}, [96, 192, 384, 768], 3),
    ("DPM-Solver++(2S)", "dpm_solver", {"algorithm": "dpmsolver++", "variant": "singlestep", "order": 2}, [48, 96, 192, 384], 2),
    ("DPM-Solver++(2M)", "dpm_solver", {"algorithm": "dpmsolver++", "variant": "multistep", "order": 2}, [24, 48, 96, 192], 2),
    ("EDM Heun", "edm", {}, [32, 64, 128, 256], 2),
]


@pytest.mark.parametrize("label,method,options,budgets,order", CONVERGENCE, ids=[c[0] for c in CONVERGENCE])
@pytest.mark.parametrize("sde", [dd.VPSDE(), dd.VESDE()], ids=["VP", "VE"])
def test_convergence_order(label, method, options, budgets, order, sde):
    """Fitted slope of the error against 1/NFE on the Gaussian's exact flow: theory +- 0.3."""
    model = _gaussian_model(sde)
    x_T = _x_T(sde)
    exact = _exact_flow(sde, x_T, T_END)
    errors = []
    for steps in budgets:
        extra = {"lower_order_final": False} if method == "dpm_solver" else {}
        sol = dd.sample(model, sde, x_T, method=method, steps=steps, t_end=T_END, **options, **extra)
        assert sol.success and int(sol.stats.nf[0]) == steps
        errors.append(float((sol.ys[-1] - exact).abs().max()))
    slope = fitted_order([1.0 / n for n in budgets], errors)
    assert abs(slope - order) <= 0.3, (label, slope, errors)


def test_lower_order_final_costs_little_and_keeps_the_budget():
    """The reference's lower-order final steps change the result by less than the error itself."""
    sde = dd.VPSDE()
    model, x_T = _gaussian_model(sde), _x_T(sde)
    exact = _exact_flow(sde, x_T, T_END)
    for options in ({"variant": "multistep", "order": 2}, {"variant": "singlestep", "order": 3, "algorithm": "dpmsolver"}):
        low = dd.sample(model, sde, x_T, method="dpm_solver", steps=20, **options)
        assert int(low.stats.nf[0]) == 20
        err = float((low.ys[-1] - exact).abs().max())
        assert err < 0.05, (options, err)


# ------------------------------------------------------------------ NFE counts
@pytest.mark.parametrize("steps,orders", [(10, [3, 3, 3, 1]), (11, [3, 3, 3, 2]), (12, [3, 3, 3, 2, 1]), (2, [2]), (1, [1])])
def test_singlestep_budget_split(steps, orders):
    assert singlestep_orders(steps, 3, True) == orders
    assert sum(orders) == steps


@pytest.mark.parametrize(
    "method,options,steps,expected",
    [
        ("dpm_solver", {"variant": "singlestep", "order": 3}, 10, 10),
        ("dpm_solver", {"variant": "singlestep", "order": 3, "lower_order_final": False}, 10, 9),
        ("dpm_solver", {"variant": "singlestep", "order": 2}, 7, 7),
        ("dpm_solver", {"variant": "multistep", "order": 3}, 9, 9),
        ("dpm_solver", {"algorithm": "sde-dpmsolver++"}, 9, 9),
        ("edm", {}, 9, 8),
        ("edm", {"denoise_to_zero": True}, 9, 9),
        ("edm", {"denoise_to_zero": True, "S_churn": 5.0}, 10, 9),
        ("bdia", {}, 9, 9),
        ("edict", {}, 9, 18),
    ],
)
def test_nf_counts_every_model_call(method, options, steps, expected):
    sde = dd.VPSDE()
    model = CountingModel(_gaussian_model(sde))
    x_T = _x_T(sde)
    sol = dd.sample(model, sde, x_T, method=method, steps=steps, **options)
    assert sol.stats.nf.tolist() == [expected] * x_T.shape[0]
    assert model.rows == expected * x_T.shape[0]


def test_adaptive_nf_counts_only_running_samples():
    sde = dd.VPSDE()
    model = CountingModel(_mixture().score_model(sde, "eps"))
    x_T = sde.prior_sample((64, 2), seed=3)
    for order in (2, 3):
        model.rows = 0
        sol = dd.sample(model, sde, x_T, method="dpm_solver", variant="adaptive", order=order, rtol=1e-3, atol=1e-4)
        assert sol.success
        assert torch.equal(sol.stats.nf, order * (sol.stats.naccept + sol.stats.nreject))
        assert model.rows == int(sol.stats.nf.sum())
        assert int(sol.stats.nf.min()) < int(sol.stats.nf.max())  # the samples took their own steps
    for order in (2, 3):  # multistep: one call at T, then one per accepted step but the last; rejections are free
        model.rows = 0
        sol = dd.sample(model, sde, x_T, method="dpm_solver", variant="adaptive_multistep", order=order, rtol=1e-3, atol=1e-4)
        assert sol.success and int(sol.stats.nreject.sum()) > 0
        assert torch.equal(sol.stats.nf, sol.stats.naccept)
        assert model.rows == int(sol.stats.nf.sum())
        assert int(sol.stats.nf.min()) < int(sol.stats.nf.max())


@pytest.mark.parametrize(
    "variant,order", [("adaptive", 2), ("adaptive", 3), ("adaptive_multistep", 2), ("adaptive_multistep", 3)]
)
def test_adaptive_error_follows_the_tolerance(variant, order):
    """On the Gaussian's exact flow the error falls with the tolerance and stays within 10x of it
    (the tolerance bounds local errors; the global error sums them)."""
    sde = dd.VPSDE()
    model, x_T = _gaussian_model(sde), _x_T(sde)
    exact = _exact_flow(sde, x_T, T_END)
    errors, nfes = [], []
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        sol = dd.sample(model, sde, x_T, method="dpm_solver", variant=variant, order=order, rtol=tol, atol=tol / 10)
        errors.append(float((sol.ys[-1] - exact).abs().max()))
        nfes.append(float(sol.stats.nf.double().mean()))
        assert errors[-1] <= 10 * tol, (tol, errors)
    assert errors[-1] < errors[0] / 30 and nfes[-1] > nfes[0], (errors, nfes)


# ------------------------------------------------------------------ per-sample independence
def test_adaptive_result_does_not_depend_on_the_batch():
    """A sample's adaptive trajectory is a function of its own state only (the references'
    batch-wide error norm would couple them)."""
    sde = dd.VPSDE()
    model = _mixture().score_model(sde, "eps")
    x_T = sde.prior_sample((40, 2), seed=1)
    rows = torch.tensor([3, 17, 29])
    other = sde.prior_sample((25, 2), seed=9) * 3.0  # far-out companions: very different step sizes
    for variant, order, controller in (
        ("adaptive", 2, "pi"),
        ("adaptive", 3, "pi"),
        ("adaptive", 3, "paper"),
        ("adaptive_multistep", 3, "pi"),
    ):
        kw = {"method": "dpm_solver", "variant": variant, "order": order, "rtol": 1e-3, "atol": 1e-4, "controller": controller}
        full = dd.sample(model, sde, x_T, **kw)
        alone = dd.sample(model, sde, x_T[rows], **kw)
        mixed = dd.sample(model, sde, torch.cat([other, x_T[rows]]), **kw)
        for sol in (alone, mixed):
            tail = sol.ys[-1][-3:]
            assert torch.allclose(tail, full.ys[-1][rows], rtol=0, atol=1e-12)
            assert torch.equal(sol.stats.nf[-3:], full.stats.nf[rows])


def test_sde_dpm_solver_noise_is_per_sample():
    sde = dd.VPSDE()
    model = _mixture().score_model(sde, "x0")
    x_T = sde.prior_sample((12, 2), seed=2)
    full = dd.sample(model, sde, x_T, method="dpm_solver", algorithm="sde-dpmsolver++", steps=15, seed=4, parameterization="x0")
    part = dd.sample(
        model, sde, x_T[:5], method="dpm_solver", algorithm="sde-dpmsolver++", steps=15, seed=4, parameterization="x0"
    )
    other = dd.sample(model, sde, x_T, method="dpm_solver", algorithm="sde-dpmsolver++", steps=15, seed=5, parameterization="x0")
    assert torch.allclose(part.ys[-1], full.ys[-1][:5], rtol=0, atol=1e-13)
    assert (other.ys[-1] - full.ys[-1]).abs().max() > 1e-3


# ------------------------------------------------------------------ parameterizations
@pytest.mark.parametrize(
    "method,options",
    [
        ("dpm_solver", {"steps": 12}),
        ("dpm_solver", {"steps": 12, "variant": "singlestep", "order": 3, "algorithm": "dpmsolver"}),
        ("dpm_solver", {"steps": 12, "algorithm": "sde-dpmsolver++"}),
        ("edm", {"steps": 12, "S_churn": 3.0}),
        ("bdia", {"steps": 12}),
        ("edict", {"steps": 12}),
    ],
)
@pytest.mark.parametrize("sde", [dd.VPSDE(), dd.VESDE()], ids=["VP", "VE"])
def test_parameterizations_give_the_same_samples(method, options, sde):
    gm = _mixture()
    x_T = sde.prior_sample((16, 2), seed=0)
    outs = [
        dd.sample(gm.score_model(sde, p), sde, x_T, method=method, parameterization=p, **options).ys[-1]
        for p in ("eps", "x0", "score", "v")
    ]
    scale = float(outs[0].abs().max())
    for out in outs[1:]:
        assert float((out - outs[0]).abs().max()) <= 1e-9 * scale


# ------------------------------------------------------------------ exact inversion
@pytest.mark.parametrize(
    "method,options",
    [
        ("bdia", {"gamma": 1.0}),
        ("bdia", {"gamma": 0.9}),
        ("edict", {}),
        ("edict", {"p": 0.97}),
    ],
)
@pytest.mark.parametrize("sde", [dd.VPSDE(), dd.VESDE()], ids=["VP", "VE"])
def test_round_trip_is_exact(method, options, sde):
    gm = _mixture()
    model = gm.score_model(sde, "eps")
    x0 = gm.sample(32, seed=7)
    state = dd.invert(model, sde, x0, method=method, steps=30, **options)
    assert isinstance(state, InversionState) and state.method == method
    back = dd.sample(model, sde, state, method=method)
    rel = float((back.ys[-1] - x0).norm() / x0.norm())
    assert rel <= 1e-10, rel
    assert int(back.stats.nf[0]) == (29 if method == "bdia" else 60)


def test_bdia_inversion_is_unstable_for_small_gamma_at_many_steps():
    """Documented in docs/diffusion_samplers.md: the inversion multiplies BDIA's parasitic mode by
    about -1/gamma per step, so rounding errors grow like gamma^-N."""
    sde = dd.VPSDE()
    model = _mixture().score_model(sde, "eps")
    x0 = _mixture().sample(16, seed=1)
    errors = {}
    for gamma in (1.0, 0.5):
        state = dd.invert(model, sde, x0, method="bdia", steps=120, gamma=gamma)
        back = dd.sample(model, sde, state, method="bdia")
        errors[gamma] = float((back.ys[-1] - x0).norm() / x0.norm())
    assert errors[1.0] <= 1e-12
    assert not errors[0.5] <= 1e-3, errors  # (NaN counts as failed too)


def test_plain_pair_and_mismatched_grids():
    sde = dd.VPSDE()
    model = _mixture().score_model(sde, "eps")
    x0 = _mixture().sample(8, seed=2)
    state = dd.invert(model, sde, x0, method="bdia", steps=10)
    plain = dd.sample(model, sde, (state.x, state.y), method="bdia", steps=10)
    assert torch.allclose(plain.ys[-1], x0, rtol=0, atol=1e-12)
    for bad in ({"steps": 11}, {"t_end": 2e-3}, {"gamma": 0.5}, {"skip_type": "logSNR"}):
        with pytest.raises(ValueError):
            dd.sample(model, sde, state, method="bdia", **bad)
    with pytest.raises(ValueError):
        dd.sample(model, sde, state, method="edict")


def test_invert_ode_round_trip():
    sde = dd.VPSDE()
    model = _gaussian_model(sde)
    x0 = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64).reshape(6, 1)
    x_T = dd.invert(model, sde, x0, method="ode", atol=1e-9, rtol=1e-9)
    exact_T = _exact_inverse(sde, x0)
    assert torch.allclose(x_T, exact_T, rtol=0, atol=1e-6)


def _exact_inverse(sde, x0):
    a0, s0 = sde.marginal(torch.tensor([T_END], dtype=torch.float64))
    a, s = sde.marginal(torch.tensor([sde.T], dtype=torch.float64))
    return a * MU + (x0 - a0 * MU) * torch.sqrt(a * a * S * S + s * s) / torch.sqrt(a0 * a0 * S * S + s0 * s0)


# ------------------------------------------------------------------ sample statistics
STATISTICS = [
    ("dpm_solver", {"steps": 50}),
    ("dpm_solver", {"steps": 48, "variant": "singlestep", "order": 3, "algorithm": "dpmsolver"}),
    ("dpm_solver", {"variant": "adaptive", "order": 3, "rtol": 1e-2, "atol": 1e-3}),
    ("dpm_solver", {"variant": "adaptive", "order": 2, "rtol": 1e-2, "atol": 1e-3}),
    ("dpm_solver", {"variant": "adaptive_multistep", "order": 3, "rtol": 1e-2, "atol": 1e-3}),
    ("dpm_solver", {"steps": 100, "algorithm": "sde-dpmsolver++"}),
    ("edm", {"steps": 60}),
    ("edm", {"steps": 199, "S_churn": 100.0, "denoise_to_zero": True}),
    ("bdia", {"steps": 50}),
    ("edict", {"steps": 100}),
]


@pytest.mark.parametrize("method,options", STATISTICS)
def test_mixture_statistics(method, options):
    """Component weights within 0.03 (about 4 standard errors at N = 4000) and component stds
    within 0.035 of the law at t_end (0.5 to 4 digits), on the issue's 2-D mixture."""
    sde = dd.VPSDE()
    gm = _mixture()
    x_T = sde.prior_sample((4000, 2), seed=0)
    sol = dd.sample(gm.score_model(sde, "eps"), sde, x_T, method=method, **options)
    assert sol.success
    frac, std = gm.component_stats(sol.ys[-1])
    assert torch.allclose(frac, gm.weights, rtol=0, atol=0.03), frac
    assert torch.allclose(std, torch.full_like(std, 0.5), rtol=0, atol=0.035), std


# ------------------------------------------------------------------ gradients and dtypes
GRADIENT_CASES = [
    ("dpm_solver", {"steps": 10}),
    ("dpm_solver", {"steps": 9, "variant": "singlestep", "order": 3, "algorithm": "dpmsolver"}),
    ("dpm_solver", {"steps": 10, "algorithm": "sde-dpmsolver++"}),
    ("edm", {"steps": 10, "S_churn": 2.0}),
    ("bdia", {"steps": 10}),
    ("edict", {"steps": 10}),
]


def _finite_difference(fn, x, w, eps=1e-6):
    fd = torch.zeros_like(x)
    for idx in range(x.numel()):
        e = torch.zeros_like(x).flatten()
        e[idx] = eps
        e = e.reshape(x.shape)
        fd.view(-1)[idx] = ((fn(x + e) - fn(x - e)) * w).sum() / (2 * eps)
    return fd


@pytest.mark.parametrize("method,options", GRADIENT_CASES)
def test_gradient_through_sampling_matches_finite_differences(method, options):
    """Autograd through the sampler's loop (sensealg=None) w.r.t. x_T, float64."""
    sde = dd.VPSDE()
    model = _mixture().score_model(sde, "eps")
    x_T = sde.prior_sample((3, 2), seed=3)
    w = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(3, 2)

    def fn(x):
        return dd.sample(model, sde, x, method=method, **options).ys[-1]

    x = x_T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((fn(x) * w).sum(), x)
    fd = _finite_difference(fn, x_T, w)
    assert float((grad - fd).abs().max()) <= 1e-6 * float(fd.abs().max())


@pytest.mark.parametrize("variant", ["adaptive", "adaptive_multistep"])
def test_adaptive_gradient_holds_the_steps_fixed(variant):
    """The adaptive solver does not differentiate its step sizes (as diffrax): the gradient
    differs from finite differences (which see the steps move) by about the tolerance only."""
    sde = dd.VPSDE()
    model = _gaussian_model(sde)
    x_T = _x_T(sde)[:3]
    kw = {"method": "dpm_solver", "variant": variant, "order": 3, "rtol": 1e-4, "atol": 1e-5}
    x = x_T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dd.sample(model, sde, x, **kw).ys[-1].sum(), x)
    # the Gaussian's flow is affine: d x(t_end) / d x_T is the ratio of marginal stds
    a_T, s_T = sde.marginal(torch.tensor([sde.T], dtype=torch.float64))
    a, s = sde.marginal(torch.tensor([T_END], dtype=torch.float64))
    exact = torch.sqrt(a * a * S * S + s * s) / torch.sqrt(a_T * a_T * S * S + s_T * s_T)
    assert torch.allclose(grad, exact.expand_as(grad), rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "method,options",
    [
        ("dpm_solver", {"steps": 12}),
        ("dpm_solver", {"variant": "adaptive", "order": 2}),
        ("edm", {"steps": 12, "S_churn": 1.0}),
        ("bdia", {"steps": 12}),
        ("edict", {"steps": 50}),
    ],
)
def test_float32_follows_float64(method, options):
    sde = dd.VPSDE()
    x64 = _x_T(sde)
    out64 = dd.sample(_gaussian_model(sde), sde, x64, method=method, **options)
    out32 = dd.sample(_gaussian_model(sde), sde, x64.float(), method=method, **options)
    assert out32.ys.dtype == torch.float32 and out32.ts.dtype == torch.float32
    assert torch.allclose(out32.ys[-1].double(), out64.ys[-1], rtol=0, atol=1e-4)


# ------------------------------------------------------------------ input validation
class Forbidden:
    def __call__(self, x, t):
        raise AssertionError("the model must not be called for bad input")


BAD = [
    ("dpm_solver", {"order": 4}, ValueError),
    ("dpm_solver", {"algorithm": "dpm"}, ValueError),
    ("dpm_solver", {"variant": "exponential"}, ValueError),
    ("dpm_solver", {"skip_type": "karras"}, ValueError),
    ("dpm_solver", {"variant": "adaptive", "order": 1}, ValueError),
    ("dpm_solver", {"variant": "adaptive", "steps": 10}, ValueError),
    ("dpm_solver", {"variant": "adaptive", "atol": -1.0}, ValueError),
    ("dpm_solver", {"variant": "adaptive", "theta": 1.5}, ValueError),
    ("dpm_solver", {"variant": "adaptive", "controller": "pid"}, ValueError),
    ("dpm_solver", {"variant": "adaptive_multistep", "order": 1}, ValueError),
    ("dpm_solver", {"variant": "adaptive_multistep", "steps": 10}, ValueError),
    ("dpm_solver", {"algorithm": "sde-dpmsolver++", "variant": "singlestep"}, ValueError),
    ("dpm_solver", {"algorithm": "sde-dpmsolver++", "order": 3}, ValueError),
    ("dpm_solver", {"variant": "singlestep", "order": 3, "steps": 2, "lower_order_final": False}, ValueError),
    ("dpm_solver", {"lower_order_final": "yes"}, TypeError),
    ("dpm_solver", {"unknown_option": 1}, TypeError),
    ("dpm_solver", {"steps": 0}, ValueError),
    ("dpm_solver", {"t_end": 0.0}, ValueError),
    ("dpm_solver", {"t_end": 1.5}, ValueError),
    ("edm", {"rho": 0.0}, ValueError),
    ("edm", {"S_churn": -1.0}, ValueError),
    ("edm", {"sigma_max": 1e6}, ValueError),
    ("edm", {"sigma_min": 5.0, "sigma_max": 1.0}, ValueError),
    ("edm", {"sigma_min": 1e-4}, ValueError),  # below sigma/alpha at t_end: the model would see t < t_end
    ("edm", {"steps": 1}, ValueError),
    ("edm", {"atol": 1e-3}, TypeError),
    ("bdia", {"gamma": 0.0}, ValueError),
    ("bdia", {"gamma": 1.5}, ValueError),
    ("edict", {"p": 0.0}, ValueError),
    ("edict", {"skip_type": "uniform"}, ValueError),
    ("unknown", {}, ValueError),
]


@pytest.mark.parametrize("method,options,error", BAD)
def test_bad_input_is_rejected_before_the_first_model_call(method, options, error):
    sde = dd.VPSDE()
    x_T = sde.prior_sample((4, 2), seed=0)
    with pytest.raises(error):
        dd.sample(Forbidden(), sde, x_T, method=method, **options)


@pytest.mark.parametrize("x_T", [torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4), torch.full((4, 2), math.nan)])
@pytest.mark.parametrize("method", ["dpm_solver", "edm", "bdia", "edict"])
def test_bad_state_is_rejected(method, x_T):
    with pytest.raises((TypeError, ValueError)):
        dd.sample(Forbidden(), dd.VPSDE(), x_T, method=method)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "bdia", "steps": 0},
        {"method": "edict", "p": 2.0},
        {"method": "bogus"},
        {"method": "ode", "steps": 10},
        {"method": "bdia", "atol": 1e-3},
        {"method": "bdia", "unknown": 1},
        {"method": "edict", "t_end": 1.0},
    ],
)
def test_invert_rejects_bad_input(kwargs):
    sde = dd.VPSDE()
    with pytest.raises((TypeError, ValueError)):
        dd.invert(Forbidden(), sde, torch.zeros(4, 2, dtype=torch.float64), **kwargs)


def test_non_finite_samples_are_flagged_per_sample():
    sde = dd.VPSDE()
    good = _gaussian_model(sde)

    def model(x, t):  # fails (inf) for far-out states only, so the failing sample is x_T[1]
        out = good(x, t)
        return torch.where(x.abs() > 50.0, out * math.inf, out)

    x_T = _x_T(sde)[:4].clone()
    x_T[1] = 100.0
    good_rows = torch.tensor([0, 2, 3])
    cases = (
        ("dpm_solver", {"steps": 8}),
        ("edm", {"steps": 8}),
        ("bdia", {"steps": 8}),
        ("edict", {"steps": 8}),
        ("dpm_solver", {"variant": "adaptive", "order": 3}),
        ("dpm_solver", {"variant": "adaptive_multistep", "order": 3}),
    )
    for method, options in cases:
        sol = dd.sample(model, sde, x_T, method=method, **options)
        codes = sol.retcode
        assert codes[1] in (deb.ReturnCode.Unstable, deb.ReturnCode.DtLessThanMin), (method, codes)
        assert codes[0] == codes[2] == codes[3] == deb.ReturnCode.Success, (method, codes)
        alone = dd.sample(good, sde, x_T[good_rows], method=method, **options)  # the bad row changed nothing
        assert torch.allclose(sol.ys[-1][good_rows], alone.ys[-1], rtol=0, atol=1e-12), method


@pytest.mark.parametrize(
    "method,options,points",
    [
        ("dpm_solver", {"steps": 9, "variant": "singlestep", "order": 3}, 5),  # orders [3, 3, 2, 1]
        ("dpm_solver", {"steps": 6}, 7),
        ("edm", {"steps": 8}, 5),
        ("edm", {"steps": 7, "denoise_to_zero": True}, 5),  # 4 levels + sigma = 0
    ],
)
def test_save_trajectory(method, options, points):
    sde = dd.VPSDE()
    x_T = _x_T(sde)
    full = dd.sample(_gaussian_model(sde), sde, x_T, method=method, save_trajectory=True, **options)
    ends = dd.sample(_gaussian_model(sde), sde, x_T, method=method, **options)
    assert full.ys.shape == (points, *x_T.shape) and full.ts.shape == (points,)
    assert bool((full.ts[1:] < full.ts[:-1]).all()) and float(full.ts[0]) == sde.T
    assert torch.equal(full.ys[0], x_T) and torch.equal(full.ys[-1], ends.ys[-1])


def test_guidance_counts_network_evaluations():
    """Classifier-free guidance costs two network evaluations per model call."""
    sde = dd.VPSDE()
    base = _mixture().score_model(sde, "eps")

    def conditional(x, t, c):
        return base(x, t) + (0.0 if c is None else 0.1 * c)

    cond = torch.ones(1, 2, dtype=torch.float64)
    guided = dd.ClassifierFreeGuidance(conditional, cond, torch.zeros(1, 2, dtype=torch.float64), scale=2.0)
    x_T = sde.prior_sample((4, 2), seed=0)
    for method, options, calls in (
        ("dpm_solver", {"steps": 7}, 7),
        ("edm", {"steps": 8}, 8),
        ("bdia", {"steps": 5}, 5),
        ("edict", {"steps": 5}, 10),
    ):
        sol = dd.sample(guided, sde, x_T, method=method, **options)
        assert sol.stats.nf.tolist() == [2 * calls] * 4, method
    adaptive = dd.sample(guided, sde, x_T, method="dpm_solver", variant="adaptive", order=2)
    assert torch.equal(adaptive.stats.nf, 2 * 2 * (adaptive.stats.naccept + adaptive.stats.nreject))
