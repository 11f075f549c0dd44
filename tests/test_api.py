"""The public API contract of DESIGN.md: shapes, dtypes, what user functions see, defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import diffeqbridge as deb

F64 = torch.float64
B = 3
STATE = (2, 3)
M = 4


class Recorder:
    """Wraps a vector field and records the (shape, dtype) of every ``t`` and ``y`` it sees."""

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def __call__(self, t, y):
        self.seen.append((tuple(t.shape), t.dtype, tuple(y.shape), y.dtype))
        return self.fn(t, y)


def _problem(noise: str, dtype=F64, interpretation: str = "ito"):
    y0 = (1.0 + 0.1 * torch.arange(B * 6, dtype=dtype)).reshape(B, *STATE)
    weights = torch.linspace(0.1, 0.4, M, dtype=dtype)
    drift = Recorder(lambda t, y: -0.5 * y + torch.cos(t).reshape(-1, 1, 1))
    if noise == "general":
        diffusion = Recorder(lambda t, y: 0.2 * torch.sin(y).unsqueeze(-1) * weights)
    elif noise == "additive":
        diffusion = Recorder(lambda t, y: 0.3 * torch.ones_like(y) * (1 + t).reshape(-1, 1, 1))
    else:
        diffusion = Recorder(lambda t, y: 0.3 * y)
    prob = deb.SDEProblem(
        drift, diffusion, y0, noise=noise, interpretation=interpretation, noise_dim=M if noise == "general" else None
    )
    return prob, drift, diffusion


CASES = [
    ("diagonal", deb.EM()),
    ("diagonal", deb.LambaEM()),
    ("diagonal", deb.SOSRI()),
    ("scalar", deb.EM()),
    ("scalar", deb.LambaEM()),
    ("scalar", deb.SOSRI()),
    ("additive", deb.EM()),
    ("additive", deb.LambaEM()),
    ("additive", deb.SOSRI()),
    ("additive", deb.SOSRA()),
    ("general", deb.EM()),
    ("general", deb.LambaEM()),
]


@pytest.mark.parametrize("noise, alg", CASES, ids=[f"{n}-{type(a).__name__}" for n, a in CASES])
def test_shapes_for_a_matrix_state(noise, alg):
    prob, drift, diffusion = _problem(noise)
    assert prob.noise_shape == {"diagonal": STATE, "additive": STATE, "scalar": (1,), "general": (M,)}[noise]
    saveat = [0.0, 0.5, 1.0]
    kwargs = {"dt": 0.05} if not alg.adaptive else {}
    sol = deb.solve(prob, alg, saveat=saveat, seed=1, **kwargs)
    assert sol.success, sol
    assert sol.ts.shape == (3,)
    assert sol.ys.shape == (3, B, *STATE)
    assert torch.equal(sol.ys[0], prob.y0)
    assert bool(torch.isfinite(sol.ys).all())
    assert float((sol.ys[-1] - sol.ys[0]).abs().min()) > 0
    assert isinstance(sol.alg, type(alg))
    for stats_name in ("nf", "ng", "naccept", "nreject"):
        assert getattr(sol.stats, stats_name).shape == (B,)
    assert sol.retcodes.shape == (B,)
    assert sol.retcode == [deb.ReturnCode.Success] * B
    # user functions see t of shape (B,) in float64, and y of shape (B, *state_shape)
    for record in drift.seen + diffusion.seen:
        assert record == ((B,), F64, (B, *STATE), F64)
    assert len(drift.seen) > 1 and len(diffusion.seen) > 1


def test_explicit_brownian_of_noise_shape_is_used():
    prob, _, _ = _problem("general")
    bm = deb.VirtualBrownianTree(0.0, 1.0, (B, M), seed=5)
    a = deb.solve(prob, deb.EM(), dt=0.05, brownian=bm)
    b = deb.solve(prob, deb.EM(), dt=0.05, brownian=deb.VirtualBrownianTree(0.0, 1.0, (B, M), seed=5))
    c = deb.solve(prob, deb.EM(), dt=0.05, brownian=deb.VirtualBrownianTree(0.0, 1.0, (B, M), seed=6))
    assert torch.equal(a.ys, b.ys)
    assert not torch.equal(a.ys, c.ys)


def test_seed_is_the_tree_seed():
    """``solve(seed=s)`` uses the tree ``VirtualBrownianTree(t0, t1, (B, *noise_shape), seed=s)``."""
    prob, _, _ = _problem("diagonal")
    by_seed = deb.solve(prob, deb.EM(), dt=0.05, seed=8)
    by_tree = deb.solve(prob, deb.EM(), dt=0.05, brownian=deb.VirtualBrownianTree(0.0, 1.0, (B, *STATE), seed=8))
    torch.testing.assert_close(by_seed.ys, by_tree.ys, rtol=0, atol=1e-14)


@pytest.mark.parametrize("alg", [deb.EM(), deb.SOSRI(), deb.LambaEM()], ids=lambda a: type(a).__name__)
def test_float32_problem_runs_in_float32(alg):
    prob, drift, diffusion = _problem("diagonal", dtype=torch.float32)
    kwargs = {"dt": 0.05} if not alg.adaptive else {}
    sol = deb.solve(prob, alg, seed=2, **kwargs)
    assert sol.success
    assert sol.ys.dtype == torch.float32
    for record in drift.seen + diffusion.seen:  # time stays float64 (issue 15, item 3)
        assert record == ((B,), F64, (B, *STATE), torch.float32)
    ref = deb.solve(_problem("diagonal")[0], alg, seed=2, **kwargs)
    if not alg.adaptive:  # same path, same steps: float32 agrees with float64 to float32 accuracy
        torch.testing.assert_close(sol.ys.double(), ref.ys, rtol=1e-4, atol=1e-5)


def test_float32_ode():
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(B, 2, dtype=torch.float32), (0.0, 1.0))
    sol = deb.solve(prob, deb.Tsit5(), rtol=1e-5, atol=1e-6)
    assert sol.ys.dtype == torch.float32
    torch.testing.assert_close(sol.ys[-1], torch.full((B, 2), torch.exp(torch.tensor(-1.0)).item()), rtol=1e-4, atol=1e-5)


def test_import_does_not_import_juliacall():
    code = "import sys, diffeqbridge; print('juliacall' in sys.modules, 'juliapkg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ default algorithm
def _small(noise="diagonal", interpretation="ito"):
    y0 = torch.ones(2, 2, dtype=F64)
    if noise == "general":
        g = lambda t, y: 0.1 * torch.ones(2, 2, 3, dtype=F64)
    else:
        g = lambda t, y: 0.1 * torch.ones_like(y)
    return deb.SDEProblem(
        lambda t, y: -y, g, y0, noise=noise, interpretation=interpretation, noise_dim=3 if noise == "general" else None
    )


@pytest.mark.parametrize(
    "problem_kwargs, solve_kwargs, expected",
    [
        ({"noise": "diagonal"}, {}, deb.AutoSOSRI),  # SOSRI + ImplicitRKMil(smooth_est=True)
        ({"noise": "scalar"}, {}, deb.AutoSOSRI),
        ({"noise": "additive"}, {}, deb.AutoSwitch),  # ShARK (fewer evaluations than SOSRA) + ImplicitRKMil
        ({"noise": "general"}, {}, deb.LambaEM),
        ({"interpretation": "stratonovich"}, {"dt": 0.05}, deb.SPaRK),  # SciML: RKMil
        ({"noise": "scalar", "interpretation": "stratonovich"}, {"dt": 0.05}, deb.SPaRK),
    ],
    ids=["diagonal-ito", "scalar-ito", "additive", "general-ito", "diagonal-strat-dt", "scalar-strat-dt"],
)
def test_default_algorithm(problem_kwargs, solve_kwargs, expected):
    sol = deb.solve(_small(**problem_kwargs), None, seed=0, **solve_kwargs)
    assert type(sol.alg) is expected
    assert sol.success
    composites = {
        deb.AutoSwitch: ("AutoSwitch(ShARK(), ImplicitRKMil(theta=1, smooth_est=True))", deb.ShARK()),
        deb.AutoSOSRI: ("AutoSOSRI(ImplicitRKMil(theta=1, smooth_est=True))", deb.SOSRI(unit_step_power=0.0)),
    }
    if expected in composites:
        text, nonstiff = composites[expected]
        assert repr(sol.alg) == text
        plain = deb.solve(_small(**problem_kwargs), nonstiff, seed=0, **solve_kwargs)
        assert torch.equal(sol.ys, plain.ys) and torch.equal(sol.ts, plain.ts)  # non-stiff: the explicit method's bits


@pytest.mark.parametrize("noise", ["diagonal", "general"])
def test_default_for_stratonovich_without_dt_is_an_adaptive_stratonovich_solver(noise):
    sol = deb.solve(_small(noise=noise, interpretation="stratonovich"), seed=0)
    assert sol.success
    assert type(sol.alg).adaptive
    assert "stratonovich" in type(sol.alg).interpretations
    assert noise in type(sol.alg).noise_types


def test_default_for_ode_is_autotsit5_with_tsit5_bits_when_not_stiff():
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=F64), (0.0, 1.0))
    sol = deb.solve(prob)
    assert repr(sol.alg) == "AutoTsit5(Rodas4(jac='autodiff'))"
    torch.testing.assert_close(sol.ys[-1], torch.full((2, 1), 0.36787944117144233, dtype=F64), rtol=1e-4, atol=1e-6)
    plain = deb.solve(prob, deb.Tsit5())
    assert torch.equal(sol.ys, plain.ys) and torch.equal(sol.stats.naccept, plain.stats.naccept)
    assert torch.equal(sol.stats.nf, plain.stats.nf)


def test_solver_classes_are_accepted_like_instances():
    prob = _small()
    a = deb.solve(prob, deb.EM, dt=0.1, seed=1)
    b = deb.solve(prob, deb.EM(), dt=0.1, seed=1)
    assert torch.equal(a.ys, b.ys)


def test_solver_metadata_is_declared():
    for cls in (deb.EM, deb.EulerHeun, deb.RKMil, deb.LambaEM, deb.SRIW1, deb.SOSRI, deb.SRA1, deb.SOSRA):
        assert cls.is_sde and cls.noise_types and cls.interpretations
        assert cls.strong_order > 0 and cls.weak_order > 0
    assert deb.SRIW1.needs_levy_area and deb.SOSRA.needs_levy_area and not deb.EM.needs_levy_area
    assert deb.SOSRI.adaptive and deb.LambaEM.adaptive and not deb.EM.adaptive and not deb.RKMil.adaptive
    assert deb.SRIW1.strong_order == 1.5 and deb.EM.strong_order == 0.5 and deb.RKMil.strong_order == 1.0
    for cls in (deb.Tsit5, deb.Dopri5):
        assert not cls.is_sde and cls.adaptive


def test_public_names():
    for name in (
        "SDEProblem",
        "ODEProblem",
        "solve",
        "Solution",
        "ReturnCode",
        "Stats",
        "VirtualBrownianTree",
        "EM",
        "EulerHeun",
        "RKMil",
        "LambaEM",
        "SRIW1",
        "SOSRI",
        "SRA1",
        "SOSRA",
        "Tsit5",
        "Dopri5",
    ):
        assert name in deb.__all__ and hasattr(deb, name)
    assert {c.name for c in deb.ReturnCode} >= {"Success", "MaxIters", "DtLessThanMin", "Unstable"}
