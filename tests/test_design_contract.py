"""DESIGN.md's public API, promise by promise, through ``import diffeqbridge`` only.

Each test checks one promise of DESIGN.md that the other API tests (test_api.py,
test_conformance.py, test_validation.py, test_diffusion_*.py ...) leave out, with numbers:
closed forms, the Brownian tree's own increments, exact call counts.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import diffusion as dd

F64 = torch.float64
NOISE_TYPES = ("diagonal", "scalar", "additive", "general")


def _gbm(batch: int = 3) -> deb.SDEProblem:
    y0 = torch.linspace(0.5, 1.5, 2 * batch, dtype=F64).reshape(batch, 2)
    return deb.SDEProblem(lambda t, y: 0.5 * y, lambda t, y: 0.4 * y, y0, (0.0, 1.0))


class Counting:
    """A vector field that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.fn(t, y)


# ------------------------------------------------------------------ signatures
_DEFAULTS = {
    "SDEProblem": (
        deb.SDEProblem,
        {"tspan": (0.0, 1.0), "noise": "diagonal", "interpretation": "ito", "noise_dim": None, "params": None},
    ),
    "ODEProblem": (deb.ODEProblem, {"params": None}),
    "solve": (
        deb.solve,
        {
            "alg": None,
            "dt": None,
            "adaptive": None,
            "saveat": None,
            "seed": 0,
            "brownian": None,
            "max_steps": 100_000,
            "dtmin": None,
            "backend": "auto",
            "sensealg": None,
            "progress": False,
        },
    ),
    "VirtualBrownianTree": (deb.VirtualBrownianTree, {"seed": 0, "tol": None, "dtype": F64, "device": None}),
    "VPSDE": (dd.VPSDE, {"beta_min": 0.1, "beta_max": 20.0}),
    "SubVPSDE": (dd.SubVPSDE, {"beta_min": 0.1, "beta_max": 20.0}),
    "VESDE": (dd.VESDE, {"sigma_min": 0.01, "sigma_max": 50.0}),
    "sample": (
        dd.sample,
        {
            "method": "sde",
            "parameterization": "eps",
            "alg": None,
            "t_end": 1e-3,
            "atol": None,
            "rtol": None,
            "steps": None,
            "seed": 0,
            "sensealg": None,
        },
    ),
    "log_likelihood": (
        dd.log_likelihood,
        {"parameterization": "eps", "alg": None, "atol": 1e-5, "rtol": 1e-5, "t_end": 1e-5, "trace": "exact", "seed": 0},
    ),
    "invert": (dd.invert, {"method": "ode", "steps": None, "parameterization": "eps", "atol": None, "rtol": None, "t_end": 1e-3}),
}


_POSITIONAL = {
    "SDEProblem": ["drift", "diffusion", "y0", "tspan"],
    "ODEProblem": ["f", "y0", "tspan"],
    "solve": ["prob", "alg"],
    "VirtualBrownianTree": ["t0", "t1", "shape"],
    "VPSDE": ["beta_min", "beta_max"],
    "SubVPSDE": ["beta_min", "beta_max"],
    "VESDE": ["sigma_min", "sigma_max"],
    "sample": ["model", "sde", "x_T", "method"],
    "log_likelihood": ["model", "sde", "x0"],
    "invert": ["model", "sde", "x0", "method"],
}


@pytest.mark.parametrize("name", sorted(_DEFAULTS))
def test_keyword_names_and_defaults_are_designs(name):
    """Every keyword DESIGN.md shows exists under that name with that default (solve's atol/rtol
    are None: the SDE/ODE defaults, checked by value below)."""
    fn, defaults = _DEFAULTS[name]
    params = inspect.signature(fn).parameters
    leading = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert leading[: len(_POSITIONAL[name])] == _POSITIONAL[name]  # DESIGN's calls pass these by position
    for key, value in defaults.items():
        assert key in params, f"{name} has no keyword {key!r}"
        assert params[key].default == value, f"{name}({key}=...) defaults to {params[key].default!r}, DESIGN says {value!r}"
    assert deb.SDEProblem(lambda t, y: y, lambda t, y: y, torch.ones(1, 1, dtype=F64)).tspan == (0.0, 1.0)
    assert dd.VPSDE().T == dd.SubVPSDE().T == dd.VESDE().T == 1.0


# ------------------------------------------------------------------ solve's defaults
def test_default_tolerances_seed_backend_and_progress():
    """atol = rtol = 1e-2 for SDEs (SciML's), 1e-6 / 1e-3 for ODEs, seed = 0, backend "auto" is
    native here, progress=True changes nothing; a different tolerance does change the steps."""
    prob = _gbm()
    default = deb.solve(prob, deb.SOSRI())
    explicit = deb.solve(prob, deb.SOSRI(), atol=1e-2, rtol=1e-2, seed=0, backend="native", progress=True)
    assert torch.equal(default.ys, explicit.ys) and torch.equal(default.stats.naccept, explicit.stats.naccept)
    tighter = deb.solve(prob, deb.SOSRI(), atol=1e-3, rtol=1e-3)
    assert bool((tighter.stats.naccept > default.stats.naccept).all())
    assert not torch.equal(deb.solve(prob, deb.SOSRI(), seed=1).ys, default.ys)

    ode = deb.ODEProblem(lambda t, y: -y, prob.y0, (0.0, 2.0))
    default = deb.solve(ode, deb.Tsit5())
    explicit = deb.solve(ode, deb.Tsit5(), atol=1e-6, rtol=1e-3)
    assert torch.equal(default.ys, explicit.ys) and torch.equal(default.stats.naccept, explicit.stats.naccept)
    assert not torch.equal(deb.solve(ode, deb.Tsit5(), atol=1e-2, rtol=1e-2).stats.naccept, default.stats.naccept)
    err = (default.ys[-1] - prob.y0 * math.exp(-2.0)).abs() / (1e-6 + 1e-3 * prob.y0 * math.exp(-2.0))
    assert float(err.max()) < 10.0  # the default tolerance is what the error follows


def test_adaptive_defaults_to_true_for_solvers_with_an_error_estimate():
    """With an error estimate, ``dt`` is only the first step: SOSRI(dt=0.1) adapts; adaptive=False
    takes exactly 10 steps of 0.1; fixed-step solvers have no estimate and need dt."""
    prob = _gbm()
    assert deb.SOSRI.adaptive and not deb.EM.adaptive
    with_dt = deb.solve(prob, deb.SOSRI(), dt=0.1)
    assert torch.equal(with_dt.ys, deb.solve(prob, deb.SOSRI(), dt=0.1, adaptive=True).ys)
    assert not bool((with_dt.stats.naccept == 10).all())
    fixed = deb.solve(prob, deb.SOSRI(), dt=0.1, adaptive=False)
    assert fixed.stats.naccept.tolist() == [10, 10, 10] and fixed.stats.nreject.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="dt"):
        deb.solve(prob, deb.EM())


@pytest.mark.parametrize("tspan", [(0.0, 1.0), (0.5, 2.0), (1.0, 0.25)], ids=["0-1", "0.5-2", "backward"])
def test_saveat_none_saves_t0_and_t1(tspan):
    """saveat=None -> ts = (t0, t1) exactly, ys[0] = y0, and ys[-1] is the solution at t1 (ODE
    y' = -y: y0 exp(-(t1 - t0)))."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    sol = deb.solve(deb.ODEProblem(lambda t, y: -y, y0, tspan), deb.Tsit5(), atol=1e-10, rtol=1e-10)
    assert sol.ts.tolist() == list(tspan) and sol.ts.dtype == F64
    assert sol.ys.shape == (2, 2, 1) and torch.equal(sol.ys[0], y0)
    torch.testing.assert_close(sol.ys[-1], y0 * math.exp(-(tspan[1] - tspan[0])), rtol=1e-8, atol=0)
    sde = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * y, y0, tspan)
    sol = deb.solve(sde, deb.EM(), dt=0.05)
    assert sol.ts.tolist() == list(tspan) and torch.equal(sol.ys[0], y0)


# ------------------------------------------------------------------ Solution
def test_retcode_is_per_sample_for_any_batch_size():
    """sol.retcode is one ReturnCode per sample (B = 1 included); it also compares equal to a
    single code when every sample has it; sol.success is a bool over all samples."""
    y0 = torch.tensor([[1.0], [4.0], [0.5]], dtype=F64)

    def f(t, y):  # sample 1 (y > 1 after t = 1/2) turns NaN; the others are y' = -y
        bad = (t > 0.5).reshape(-1, 1) & (y > 1.0)
        return torch.where(bad, torch.full_like(y, float("nan")), -y)

    sol = deb.solve(deb.ODEProblem(f, y0, (0.0, 1.0)), deb.Tsit5(), dt=0.1, adaptive=False)
    assert sol.retcode == [deb.ReturnCode.Success, deb.ReturnCode.Unstable, deb.ReturnCode.Success]
    assert sol.retcode != deb.ReturnCode.Success and sol.success is False
    assert sol.retcodes.tolist() == [int(code) for code in sol.retcode]
    healthy = deb.solve(deb.ODEProblem(f, y0[[0, 2]], (0.0, 1.0)), deb.Tsit5(), dt=0.1, adaptive=False)
    assert torch.equal(sol.ys[:, [0, 2]], healthy.ys)  # the other samples finish, bit for bit
    adaptive = deb.solve(deb.ODEProblem(f, y0, (0.0, 1.0)), deb.Tsit5())
    # adaptive: the NaN step is rejected until the step underflows dtmin (docs/concepts/return-codes.md)
    assert adaptive.retcode == [deb.ReturnCode.Success, deb.ReturnCode.DtLessThanMin, deb.ReturnCode.Success]
    assert torch.equal(adaptive.ys[:, [0, 2]], deb.solve(deb.ODEProblem(f, y0[[0, 2]], (0.0, 1.0)), deb.Tsit5()).ys)

    one = deb.solve(deb.ODEProblem(f, y0[:1], (0.0, 1.0)), deb.Tsit5())
    assert one.retcode == [deb.ReturnCode.Success] and one.retcode == deb.ReturnCode.Success
    assert len(one.retcode) == 1 and one.retcode[0] is deb.ReturnCode.Success and one.success is True
    assert [c.name for c in one.retcode] == ["Success"]


COUNTED = [
    (deb.EM(), {"dt": 0.1}, "diagonal"),
    (deb.RKMil(), {"dt": 0.1}, "diagonal"),
    (deb.SRIW1(), {}, "diagonal"),
    (deb.SOSRI(), {}, "diagonal"),
    (deb.LambaEM(), {}, "diagonal"),
    (deb.SRA1(), {}, "additive"),
    (deb.ShARK(), {}, "additive"),
    (None, {}, "diagonal"),
    (None, {}, "additive"),
    (deb.SPaRK(), {}, "general"),
    # the implicit, Rosenbrock and composite solvers: tests/test_stats_counts.py
]


@pytest.mark.parametrize("alg, kwargs, noise", COUNTED, ids=[f"{type(a).__name__}-{n}" for a, _, n in COUNTED])
def test_stats_count_every_drift_and_diffusion_call(alg, kwargs, noise):
    """stats.nf / stats.ng are the drift / diffusion evaluations: with one sample they equal the
    calls the user's functions receive; naccept + nreject are the steps (fixed: exactly 10)."""
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
    drift = Counting(lambda t, y: -y)
    if noise == "general":
        diffusion = Counting(lambda t, y: 0.2 * torch.stack([y, torch.ones_like(y)], dim=-1))
    elif noise == "additive":
        diffusion = Counting(lambda t, y: 0.3 * torch.ones_like(y))
    else:
        diffusion = Counting(lambda t, y: 0.3 * y)
    prob = deb.SDEProblem(drift, diffusion, y0, noise=noise, noise_dim=2 if noise == "general" else None)
    sol = deb.solve(prob, alg, **kwargs)
    assert sol.success
    assert sol.stats.nf.tolist() == [drift.calls] and sol.stats.ng.tolist() == [diffusion.calls]
    assert sol.stats.nf.dtype == torch.int64 and sol.stats.nsteps.tolist() == [int(sol.stats.naccept + sol.stats.nreject)]
    if "dt" in kwargs:
        assert sol.stats.naccept.tolist() == [10] and sol.stats.nreject.tolist() == [0]


@pytest.mark.parametrize(
    "alg",
    [deb.Tsit5(), deb.Dopri5(), None, deb.Rodas4(jac="fd")],
    ids=["Tsit5", "Dopri5", "default", "Rodas4-fd"],
)
def test_ode_stats_count_every_call_and_no_diffusion(alg):
    f = Counting(lambda t, y: -y)
    sol = deb.solve(deb.ODEProblem(f, torch.ones(1, 2, dtype=F64), (0.0, 1.0)), alg)
    assert sol.stats.nf.tolist() == [f.calls] and sol.stats.ng.tolist() == [0]


# ------------------------------------------------------------------ noise conventions
def _pure_noise(noise: str):
    """dy = g dW with a constant g: every solver's step is exact, y(t) = y0 + g dW(t0, t).
    State (B, 2, 3); general noise has m = 4 channels."""
    B, m = 3, 4
    y0 = torch.arange(B * 6, dtype=F64).reshape(B, 2, 3) / 10
    sigma = torch.linspace(0.5, 1.5, 6, dtype=F64).reshape(2, 3)
    G = torch.linspace(-1.0, 1.0, 6 * m, dtype=F64).reshape(2, 3, m)
    if noise == "general":
        g = lambda t, y: G.expand(y.shape[0], 2, 3, m)  # noqa: E731
        combine = lambda dw: torch.einsum("ijk,bk->bij", G, dw)  # noqa: E731
        shape = (B, m)
    elif noise == "scalar":
        g = lambda t, y: sigma.expand_as(y)  # noqa: E731
        combine = lambda dw: sigma * dw.reshape(B, 1, 1)  # noqa: E731  one W for every component
        shape = (B, 1)
    else:
        g = lambda t, y: sigma.expand_as(y)  # noqa: E731
        combine = lambda dw: sigma * dw  # noqa: E731
        shape = (B, 2, 3)
    prob = deb.SDEProblem(
        lambda t, y: torch.zeros_like(y), g, y0, (0.0, 1.0), noise=noise, noise_dim=m if noise == "general" else None
    )
    return prob, combine, shape


@pytest.mark.parametrize(
    "noise, alg, kwargs",
    [
        ("diagonal", deb.EM(), {"dt": 0.1}),
        ("scalar", deb.EM(), {"dt": 0.1}),
        ("general", deb.EM(), {"dt": 0.1}),
        ("additive", deb.EM(), {"dt": 0.1}),
        ("additive", deb.SRA1(), {}),
        ("scalar", deb.SOSRI(), {}),
    ],
    ids=["diagonal-EM", "scalar-EM", "general-EM", "additive-EM", "additive-SRA1", "scalar-SOSRI"],
)
def test_noise_shape_conventions_use_the_trees_increments(noise, alg, kwargs):
    """Brownian shape (B, *state) for diagonal/additive, (B, 1) scalar (one W drives every
    component), (B, m) general with diffusion (B, *state, m): the solve uses exactly
    ``brownian=``, so y(t) = y0 + g dW(t0, t) for the tree's dW, at every save time."""
    prob, combine, shape = _pure_noise(noise)
    bm = deb.VirtualBrownianTree(0.0, 1.0, shape, seed=7)
    saveat = [0.0, 0.35, 1.0]
    sol = deb.solve(prob, alg, brownian=bm, saveat=saveat, **kwargs)
    assert sol.success and sol.ys.shape == (3, 3, 2, 3)
    for k, t in enumerate(saveat):
        dw, _ = bm(0.0, t)
        assert dw.shape == shape
        torch.testing.assert_close(sol.ys[k], prob.y0 + combine(dw), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ VirtualBrownianTree
def test_brownian_query_forms_and_defaults():
    """bm(s, t) with scalars or (B,) tensors returns (dW, H) of `shape` in float64 on the CPU by
    default: scalar times equal the same times as (B,) tensors, per-sample times give each row
    its own interval (the law, additivity and Chen's relation: test_brownian.py)."""
    B = 4
    bm = deb.VirtualBrownianTree(0.0, 2.0, (B, 3), seed=11)
    dw, h = bm(0.5, 1.5)
    assert dw.shape == h.shape == (B, 3) and dw.dtype == h.dtype == F64 and dw.device.type == "cpu"
    s = torch.full((B,), 0.5, dtype=F64)
    t = torch.full((B,), 1.5, dtype=F64)
    dw2, h2 = bm(s, t)
    assert torch.equal(dw, dw2) and torch.equal(h, h2)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    t = torch.tensor([0.5, 1.0, 2.0, 1.75], dtype=F64)
    dw_rows, h_rows = bm(s, t)
    for i in range(B):
        dwi, hi = bm(float(s[i]), float(t[i]))
        torch.testing.assert_close(dw_rows[i], dwi[i], rtol=0, atol=1e-14)
        torch.testing.assert_close(h_rows[i], hi[i], rtol=0, atol=1e-14)
    f32 = deb.VirtualBrownianTree(0.0, 2.0, (B, 3), seed=11, dtype=torch.float32)
    assert f32(0.5, 1.5)[0].dtype == torch.float32
    torch.testing.assert_close(f32(0.5, 1.5)[0], dw.float())


# ------------------------------------------------------------------ solvers
def _public_solver_classes():
    return [
        getattr(deb, name)
        for name in deb.__all__
        if isinstance(getattr(deb, name), type) and hasattr(getattr(deb, name), "strong_order")
    ]


def _noise_problem(noise: str, interpretation: str, drift):
    y0 = torch.ones(2, 2, dtype=F64)
    if noise == "general":
        g = lambda t, y: 0.1 * torch.ones(2, 2, 3, dtype=F64)  # noqa: E731
    else:
        g = lambda t, y: 0.1 * torch.ones_like(y)  # noqa: E731
    return deb.SDEProblem(drift, g, y0, noise=noise, interpretation=interpretation, noise_dim=3 if noise == "general" else None)


def test_every_public_solver_declares_its_metadata_and_solve_enforces_it():
    """Each solver class declares strong/weak order, noise types, interpretations, adaptivity and
    Lévy-area need; solve refuses a problem outside them with a ValueError naming the solver and
    what the problem has, before the drift is ever called (additive noise: Itô and Stratonovich
    coincide, so either interpretation is accepted and gives the same path)."""
    names = {cls.__name__ for cls in _public_solver_classes()}
    assert {"EM", "EulerHeun", "LambaEM", "RKMil", "SRIW1", "SOSRI", "SRA1", "SOSRA", "ImplicitEM", "SKenCarp"} <= names
    assert {"Tsit5", "Dopri5"} <= names
    checked = 0
    for cls in _public_solver_classes():
        if cls.__name__.startswith("Auto"):  # composites: metadata of their parts (test_api.py)
            continue
        assert isinstance(cls.strong_order, float) and cls.strong_order > 0, cls
        assert isinstance(cls.weak_order, float) and cls.weak_order >= cls.strong_order, cls
        assert isinstance(cls.adaptive, bool) and isinstance(cls.needs_levy_area, bool), cls
        assert set(cls.interpretations) <= {"ito", "stratonovich"}, cls
        if not cls.is_sde:
            assert not cls.noise_types and not cls.needs_levy_area
            drift = Counting(lambda t, y: -y)
            with pytest.raises(ValueError, match=cls.__name__):
                deb.solve(_noise_problem("diagonal", "ito", drift), cls, dt=0.1)
            assert drift.calls == 0
            continue
        assert cls.noise_types and set(cls.noise_types) <= set(NOISE_TYPES) and cls.interpretations, cls
        for noise in NOISE_TYPES:
            for interpretation in ("ito", "stratonovich"):
                if noise in cls.noise_types and interpretation in cls.interpretations:
                    continue
                drift = Counting(lambda t, y: -y)
                if noise == "additive" and noise in cls.noise_types:  # Itô = Stratonovich: accepted, same path
                    other = "stratonovich" if interpretation == "ito" else "ito"
                    a = deb.solve(_noise_problem(noise, interpretation, drift), cls, dt=0.1)
                    b = deb.solve(_noise_problem(noise, other, drift), cls, dt=0.1)
                    assert a.success and torch.equal(a.ys, b.ys), cls
                    continue
                bad = noise if noise not in cls.noise_types else interpretation
                with pytest.raises(ValueError, match=rf"{cls.__name__}.*{bad}|{bad}.*{cls.__name__}"):
                    deb.solve(_noise_problem(noise, interpretation, drift), cls, dt=0.1)
                assert drift.calls == 0
                checked += 1
    assert checked > 20


def test_params_as_module_list_tuple_or_generator_give_the_analytic_gradient():
    """params= accepts an nn.Module or any iterable of tensors: y' = -θ y has
    d(sum y_T)/dθ = -T sum(y_T), for every form and sensealg."""

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

        def forward(self, t, y):
            return -self.theta * y

    model = Decay()
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    for sensealg in (None, deb.DiscreteAdjoint(), deb.InterpolatingAdjoint(), deb.BacksolveAdjoint()):
        for params in (model, [model.theta], (model.theta,), model.parameters()):
            model.zero_grad()
            prob = deb.ODEProblem(model, y0, (0.0, 2.0), params=params)
            y_t = deb.solve(prob, deb.Tsit5(), atol=1e-10, rtol=1e-10, sensealg=sensealg).ys[-1]
            y_t.sum().backward()
            expected = -2.0 * float(y_t.detach().sum())
            assert abs(float(model.theta.grad) - expected) < 1e-6 * abs(expected), (sensealg, type(params))


# ------------------------------------------------------------------ diffusion
def _gaussian_eps(sde, s0: float = 0.5):
    """Exact eps model for data N(0, s0² I): eps = sigma x / (alpha² s0² + sigma²)."""

    def eps(x, t):
        assert t.shape == (x.shape[0],)
        alpha, sigma = sde.marginal(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x * sigma.reshape(shape) / (alpha.reshape(shape) ** 2 * s0**2 + sigma.reshape(shape) ** 2)

    return eps


def _exact_flow(sde, x_T, t_end, s0: float = 0.5):
    """The probability flow of N(0, s0²) data is affine: x_t = x_T sqrt(a_t² s0² + s_t²) / sqrt(a_T² s0² + s_T²)."""
    a, s = sde.marginal(torch.tensor([t_end, sde.T], dtype=F64))
    std = (a * a * s0 * s0 + s * s).sqrt()
    return x_T * std[0] / std[1]


@pytest.mark.parametrize("name", ["VPSDE", "SubVPSDE", "VESDE"])
def test_prior_sample_and_logp(name):
    """prior_sample((B, *shape), seed, dtype, device) draws N(0, prior_std² I) per sample
    (seeded rows do not depend on B); prior_logp is its (B,) log-density in nats."""
    sde = getattr(dd, name)()
    std = {"VPSDE": 1.0, "SubVPSDE": 1.0, "VESDE": 50.0}[name]
    x = sde.prior_sample((2048, 2, 2), seed=4, dtype=F64, device="cpu")
    assert x.shape == (2048, 2, 2) and x.dtype == F64 and x.device.type == "cpu"
    assert torch.equal(sde.prior_sample((3, 2, 2), seed=4, dtype=F64), x[:3])
    assert abs(float(x.std()) / std - 1) < 4 * math.sqrt(0.5 / x.numel())
    logp = sde.prior_logp(x)
    expected = -0.5 * (x / std).square().flatten(1).sum(1) - 4 * math.log(std * math.sqrt(2 * math.pi))
    assert logp.shape == (2048,)
    torch.testing.assert_close(logp, expected, rtol=1e-12, atol=1e-12)


def test_ode_sampler_and_likelihood_default_to_tsit5():
    """ "ode": any deb ODE solver, default Tsit5 (as invert's "ode" and log_likelihood); the
    samples follow the exact affine flow to the default tolerance 1e-5."""
    sde = dd.VPSDE()
    x_T = sde.prior_sample((4, 2), seed=0, dtype=F64)
    sol = dd.sample(_gaussian_eps(sde), sde, x_T, method="ode")
    assert type(sol.alg) is deb.Tsit5 and sol.success
    assert sol.ts.tolist() == [1.0, 1e-3] and sol.ys.shape == (2, 4, 2)
    torch.testing.assert_close(sol.ys[-1], _exact_flow(sde, x_T, 1e-3), rtol=1e-4, atol=1e-5)
    explicit = dd.sample(_gaussian_eps(sde), sde, x_T, method="ode", alg=deb.Tsit5(), atol=1e-5, rtol=1e-5)
    assert torch.equal(sol.ys, explicit.ys)
    logp, lsol = dd.log_likelihood(_gaussian_eps(sde), sde, x_T * 0.5)
    assert type(lsol.alg) is deb.Tsit5 and logp.shape == (4,)


def test_invert_takes_samples_default_t_end_and_tolerances():
    """invert's default t_end is sample's (1e-3): invert(x0) = invert(x0, t_end=1e-3) != t_end=1e-2,
    and sample(invert(x0)) returns x0 to the tolerance; the affine flow gives the exact x_T."""
    assert {"sample", "log_likelihood", "invert", "VPSDE", "SubVPSDE", "VESDE"} <= set(dd.__all__)
    sde = dd.VPSDE()
    model = _gaussian_eps(sde)
    x0 = torch.linspace(-1.0, 1.0, 6, dtype=F64).reshape(3, 2)
    x_T = dd.invert(model, sde, x0, method="ode", atol=1e-9, rtol=1e-9)
    assert torch.equal(x_T, dd.invert(model, sde, x0, method="ode", t_end=1e-3, atol=1e-9, rtol=1e-9))
    assert not torch.allclose(x_T, dd.invert(model, sde, x0, method="ode", t_end=1e-2, atol=1e-9, rtol=1e-9))
    exact = x0 / _exact_flow(sde, torch.ones((), dtype=F64), 1e-3)
    torch.testing.assert_close(x_T, exact, rtol=1e-7, atol=1e-8)
    back = dd.sample(model, sde, x_T, method="ode", atol=1e-9, rtol=1e-9).ys[-1]
    torch.testing.assert_close(back, x0, rtol=1e-7, atol=1e-8)


FIXED_GRID = [
    ("dpm_solver", {"steps": 10}),
    ("dpm_solver", {"steps": 12, "variant": "singlestep", "order": 3, "algorithm": "dpmsolver"}),
    ("dpm_solver", {"variant": "adaptive", "order": 2, "rtol": 1e-3, "atol": 1e-4}),
    ("dpm_solver", {"steps": 10, "algorithm": "sde-dpmsolver++"}),
    ("edm", {"steps": 10}),
    ("bdia", {"steps": 10}),
    ("edict", {"steps": 10}),
]


@pytest.mark.parametrize("method, options", FIXED_GRID, ids=[f"{m}-{i}" for i, (m, _) in enumerate(FIXED_GRID)])
def test_model_sees_times_inside_the_span_for_every_sampler(method, options):
    """The model only ever sees times inside [t_end, T] (EDM without churn), one per row of x;
    the engine methods ("sde", "ode", "pc") are checked in test_diffusion_sampling.py."""
    sde, t_end = dd.VPSDE(), 0.02
    inner = _gaussian_eps(sde)
    seen = []

    def model(x, t):
        seen.append((tuple(t.shape) == (x.shape[0],), float(t.min()), float(t.max())))
        return inner(x, t)

    x_T = sde.prior_sample((5, 2), seed=1, dtype=F64)
    sol = dd.sample(model, sde, x_T, method=method, t_end=t_end, **options)
    assert sol.success and sol.ys[-1].shape == (5, 2) and sol.stats.nf.shape == (5,)
    assert float(sol.ts[0]) == sde.T and float(sol.ts[-1]) == t_end  # time runs from T down to t_end
    assert all(one_time_per_row for one_time_per_row, _, _ in seen)  # adaptive: only running rows
    assert min(lo for _, lo, _ in seen) >= t_end - 1e-12 and max(hi for _, _, hi in seen) <= sde.T + 1e-12


@pytest.mark.parametrize("method, options", [("sde", {}), ("ode", {}), ("pc", {"steps": 25})])
def test_engine_samplers_nf_is_the_number_of_model_calls(method, options):
    """sol.stats.nf counts every model call per sample: with one sample, exactly the calls."""
    sde = dd.VPSDE()
    model = Counting(_gaussian_eps(sde))  # model(x, t): Counting passes its two arguments through
    x_T = sde.prior_sample((1, 2), seed=2, dtype=F64)
    sol = dd.sample(model, sde, x_T, method=method, **options)
    assert sol.success and sol.stats.nf.tolist() == [model.calls] and model.calls > 1


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_log_likelihood_nf_is_the_number_of_model_calls_and_logp_is_per_sample(trace):
    """log_likelihood returns (B,) nats and a Solution whose nf counts the model calls (one
    call per augmented-flow evaluation, the trace by VJPs of that call); for Gaussian data
    the result is the closed form up to the prior N(0, I) differing from p_T."""
    sde = dd.VPSDE()
    model = Counting(_gaussian_eps(sde))
    x0 = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64)
    logp, sol = dd.log_likelihood(model, sde, x0, trace=trace)
    assert logp.shape == (1,) and sol.success and sol.stats.nf.tolist() == [model.calls]
    a, s = sde.marginal(torch.tensor([1e-5], dtype=F64))
    var = a * a * 0.25 + s * s
    exact = -0.5 * (x0.square().sum() / var + 3 * torch.log(2 * math.pi * var))
    assert abs(float(logp[0] - exact[0])) < 1e-3  # measured 4e-5
