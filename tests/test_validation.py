"""Bad input raises ValueError/TypeError naming the argument, before integration starts.

Every problem here uses counting vector fields: ``solve`` may probe ``drift``/``diffusion``
once at ``t0`` (to check their output shapes), never more before it raises.
"""

from __future__ import annotations

import pytest
import torch

import diffeqbridge as deb

F64 = torch.float64
B, D = 3, 2


class Counting:
    """A vector field that counts its calls and refuses a second one."""

    def __init__(self, fn, limit: int = 1):
        self.fn, self.calls, self.limit = fn, 0, limit

    def __call__(self, t, y):
        self.calls += 1
        if self.calls > self.limit:
            raise AssertionError("integration started before the input was validated")
        return self.fn(t, y)


def _fields(drift=None, diffusion=None):
    f = Counting(drift or (lambda t, y: -y))
    g = Counting(diffusion or (lambda t, y: 0.1 * y))
    return f, g


def _y0(dtype=F64):
    return torch.ones(B, D, dtype=dtype)


def _sde(f, g, **kwargs):
    return deb.SDEProblem(f, g, kwargs.pop("y0", _y0()), **kwargs)


def _raises(exc, match, f, g, *args, **kwargs):
    with pytest.raises(exc, match=match):
        deb.solve(*args, **kwargs)
    assert f.calls <= 1 and g.calls <= 1


# -------------------------------------------------------------- vector-field shapes
def test_drift_with_wrong_shape():
    f, g = _fields(drift=lambda t, y: y[:, :1])
    _raises(ValueError, r"drift.*shape", f, g, _sde(f, g), deb.EM(), dt=0.1)


def test_drift_with_wrong_dtype():
    f, g = _fields(drift=lambda t, y: y.float())
    _raises(ValueError, r"drift.*dtype", f, g, _sde(f, g), deb.EM(), dt=0.1)


def test_drift_returning_non_tensor():
    f, g = _fields(drift=lambda t, y: 1.0)
    _raises(TypeError, r"drift", f, g, _sde(f, g), deb.EM(), dt=0.1)


def test_ode_f_with_wrong_shape():
    f = Counting(lambda t, y: y.sum(1))
    with pytest.raises(ValueError, match=r"\bf\(t, y\).*shape"):
        deb.solve(deb.ODEProblem(f, _y0(), (0.0, 1.0)), deb.Tsit5())
    assert f.calls == 1


def test_diffusion_with_wrong_shape_diagonal():
    f, g = _fields(diffusion=lambda t, y: 0.1 * y[:, :1])
    _raises(ValueError, r"diffusion.*shape", f, g, _sde(f, g), deb.EM(), dt=0.1)


def test_diffusion_with_wrong_shape_general():
    # general noise with m = 4 needs (B, D, 4); returning the state's shape is an error
    f, g = _fields(diffusion=lambda t, y: 0.1 * y)
    prob = _sde(f, g, noise="general", noise_dim=4)
    _raises(ValueError, r"diffusion.*\(3, 2, 4\)", f, g, prob, deb.EM(), dt=0.1)


def test_diffusion_with_wrong_noise_dim_general():
    f, g = _fields(diffusion=lambda t, y: torch.zeros(B, D, 3, dtype=F64))
    prob = _sde(f, g, noise="general", noise_dim=4)
    _raises(ValueError, r"diffusion", f, g, prob, deb.EM(), dt=0.1)


# ------------------------------------------------------------- solver / problem fit
@pytest.mark.parametrize(
    "alg, problem_kwargs, match",
    [
        (deb.SRA1(), {"noise": "diagonal"}, r"alg=SRA1.*noise='diagonal'"),
        (deb.SOSRA(), {"noise": "scalar"}, r"alg=SOSRA.*noise='scalar'"),
        (deb.RKMil(), {"noise": "general", "noise_dim": 2}, r"alg=RKMil.*noise='general'"),
        (deb.SOSRI(), {"noise": "general", "noise_dim": 2}, r"alg=SOSRI.*noise='general'"),
        (deb.EM(), {"interpretation": "stratonovich"}, r"alg=EM.*stratonovich"),
        (deb.SOSRI(), {"interpretation": "stratonovich"}, r"alg=SOSRI.*stratonovich"),
        (deb.EulerHeun(), {"interpretation": "ito"}, r"alg=EulerHeun.*ito"),
        (deb.Tsit5(), {}, r"alg=Tsit5.*ODE solver"),
    ],
    ids=[
        "SRA1-diagonal",
        "SOSRA-scalar",
        "RKMil-general",
        "SOSRI-general",
        "EM-strat",
        "SOSRI-strat",
        "EulerHeun-ito",
        "Tsit5-SDE",
    ],
)
def test_solver_that_cannot_handle_the_problem(alg, problem_kwargs, match):
    noise_dim = problem_kwargs.get("noise_dim")
    diffusion = (lambda t, y: torch.zeros(B, D, noise_dim, dtype=F64)) if noise_dim else None
    f, g = _fields(diffusion=diffusion)
    _raises(ValueError, match, f, g, _sde(f, g, **problem_kwargs), alg, dt=0.1)
    assert f.calls == 0 and g.calls == 0


def test_sde_solver_on_ode_problem():
    f = Counting(lambda t, y: -y)
    with pytest.raises(ValueError, match=r"alg=SOSRI.*SDE solver"):
        deb.solve(deb.ODEProblem(f, _y0(), (0.0, 1.0)), deb.SOSRI())
    assert f.calls == 0


def test_alg_that_is_not_a_solver():
    f, g = _fields()
    _raises(TypeError, r"alg", f, g, _sde(f, g), "EM", dt=0.1)


def test_prob_that_is_not_a_problem():
    with pytest.raises(TypeError, match="prob"):
        deb.solve((lambda t, y: y, _y0()), deb.EM(), dt=0.1)


# ------------------------------------------------------------------------ problem
@pytest.mark.parametrize("tspan", [(1.0, 1.0), (0.0, float("inf"))])
def test_tspan_must_be_nonempty_and_finite(tspan):  # t1 < t0 runs backwards (test_backward_time.py)
    f, g = _fields()
    with pytest.raises(ValueError, match="tspan"):
        _sde(f, g, tspan=tspan)
    with pytest.raises(ValueError, match="tspan"):
        deb.ODEProblem(f, _y0(), tspan)
    assert f.calls == 0


def test_tspan_not_a_pair():
    f, g = _fields()
    with pytest.raises(TypeError, match="tspan"):
        _sde(f, g, tspan=1.0)


def test_integer_y0_is_a_type_error():
    f, g = _fields()
    with pytest.raises(TypeError, match="y0"):
        _sde(f, g, y0=torch.ones(B, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="y0"):
        _sde(f, g, y0=[[1.0, 1.0]])


def test_nan_y0():
    f, g = _fields()
    y0 = _y0()
    y0[1, 0] = float("nan")
    with pytest.raises(ValueError, match="y0"):
        _sde(f, g, y0=y0)
    assert f.calls == 0


def test_scalar_y0_without_batch_axis():
    f, g = _fields()
    with pytest.raises(ValueError, match="y0"):
        _sde(f, g, y0=torch.tensor(1.0, dtype=F64))


def test_general_noise_without_noise_dim():
    f, g = _fields()
    with pytest.raises(ValueError, match="noise_dim"):
        _sde(f, g, noise="general")


def test_noise_dim_contradicting_noise_type():
    f, g = _fields()
    with pytest.raises(ValueError, match="noise_dim"):
        _sde(f, g, noise="scalar", noise_dim=3)


def test_unknown_noise_string():
    f, g = _fields()
    with pytest.raises(ValueError, match="noise"):
        _sde(f, g, noise="multiplicative")


def test_unknown_interpretation():
    f, g = _fields()
    with pytest.raises(ValueError, match="interpretation"):
        _sde(f, g, interpretation="ito-ish")


def test_non_callable_drift_and_diffusion():
    with pytest.raises(TypeError, match="drift"):
        deb.SDEProblem(1.0, lambda t, y: y, _y0())
    with pytest.raises(TypeError, match="diffusion"):
        deb.SDEProblem(lambda t, y: y, None, _y0())


# ------------------------------------------------------------------------ solve args
@pytest.mark.parametrize(
    "saveat",
    [[0.0, 0.5, 1.5], [-0.1, 0.5], [0.0, 0.7, 0.3], [0.2, 0.2, 0.9]],
    ids=["after-t1", "before-t0", "decreasing", "repeated"],
)
def test_bad_saveat(saveat):
    f, g = _fields()
    _raises(ValueError, "saveat", f, g, _sde(f, g), deb.EM(), dt=0.1, saveat=saveat)
    assert f.calls == 0


def test_saveat_scalar_is_a_type_error():
    f, g = _fields()
    _raises(TypeError, "saveat", f, g, _sde(f, g), deb.EM(), dt=0.1, saveat=0.5)


def test_fixed_step_solver_without_dt():
    f, g = _fields()
    _raises(ValueError, r"\bdt\b", f, g, _sde(f, g), deb.EM())
    assert f.calls == 0


@pytest.mark.parametrize("dt", [-0.1, 0.0, float("nan"), float("inf")])
def test_bad_dt(dt):
    f, g = _fields()
    _raises(ValueError, r"\bdt\b", f, g, _sde(f, g), deb.EM(), dt=dt)
    assert f.calls == 0


def test_adaptive_true_for_a_fixed_step_solver():
    f, g = _fields()
    _raises(ValueError, "adaptive", f, g, _sde(f, g), deb.EM(), dt=0.1, adaptive=True)


@pytest.mark.parametrize("name, value", [("atol", -1.0), ("rtol", float("nan")), ("max_steps", 0), ("seed", -3), ("dtmin", -1.0)])
def test_bad_numeric_options(name, value):
    f, g = _fields()
    _raises(ValueError, name, f, g, _sde(f, g), deb.SOSRI(), **{name: value})
    assert f.calls == 0


def test_bad_backend_string():
    f, g = _fields()
    _raises(ValueError, "backend", f, g, _sde(f, g), deb.EM(), dt=0.1, backend="cuda")
    assert f.calls == 0


def test_brownian_with_wrong_shape():
    f, g = _fields()
    bm = deb.VirtualBrownianTree(0.0, 1.0, (B, D + 1), seed=0)
    _raises(ValueError, "brownian", f, g, _sde(f, g), deb.EM(), dt=0.1, brownian=bm)
    assert f.calls == 0


def test_brownian_for_scalar_noise_needs_one_channel():
    f, g = _fields()
    bm = deb.VirtualBrownianTree(0.0, 1.0, (B, D), seed=0)
    _raises(ValueError, r"brownian.*\(3, 1\)", f, g, _sde(f, g, noise="scalar"), deb.EM(), dt=0.1, brownian=bm)


def test_brownian_not_covering_tspan():
    f, g = _fields()
    bm = deb.VirtualBrownianTree(0.0, 0.5, (B, D), seed=0)
    _raises(ValueError, "brownian", f, g, _sde(f, g), deb.EM(), dt=0.1, brownian=bm)


def test_brownian_of_wrong_type():
    f, g = _fields()
    _raises(TypeError, "brownian", f, g, _sde(f, g), deb.EM(), dt=0.1, brownian=torch.zeros(B, D))


def test_bad_sensealg_names_it():
    f, g = _fields()
    _raises((TypeError, ValueError), "sensealg", f, g, _sde(f, g), deb.EM(), dt=0.1, sensealg="backsolve")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_check_every_names_it(bad):
    f, g = _fields()
    _raises(ValueError, "check_every", f, g, _sde(f, g), deb.EM(), dt=0.1, check_every=bad)


def test_check_every_changes_no_result():
    """The termination-check period is a cost knob only: same states, stats and retcodes."""
    prob = _sde(lambda t, y: -y, lambda t, y: 0.1 * y)
    sols = [deb.solve(prob, deb.SOSRI(), seed=3, check_every=k) for k in (None, 1, 8)]
    for sol in sols[1:]:
        assert torch.equal(sol.ys, sols[0].ys)
        assert torch.equal(sol.stats.nf, sols[0].stats.nf) and torch.equal(sol.retcodes, sols[0].retcodes)
