"""ODE problems and usage patterns from the peers' own test suites, through the public API.

Facts (equations, tolerances, expected behaviour) come from the peers' tests; the calls are
ours.  ``tests/test_peer_problems.py`` already has torchdiffeq's sine ODE and the
matrix-exponential gradients of its linear ODE; this file adds:

* torchdiffeq (``tests/problems.py``, ``event_tests.py``, ``api_tests.py``): ``ConstantODE``
  ``y' = a + (y - (a t + b))^5`` (exact ``a t + b``; every consistent method reproduces it,
  gradients ``dy/da = t - t0``, ``dy/db = 0``, ``dy/dy0 = 1``) forward/backward in float32 and
  float64; ``LinearODE`` (``A = U - U^T``, dim 10) and ``HarmonicOscillator`` against the
  matrix exponential and ``torchdiffeq.odeint``; ``odeint_adjoint(adjoint_params=...)``
  gradients against ours; ``odeint_event`` (event at the third save time of ``construct_problem``,
  relative error ``< 1e-4``); ``jump_t``/``grid_points`` as ``tstops``; tuple states and tensor
  tolerances, which our API refuses with errors naming the argument.
* diffrax (``test/test_integrate.py`` etc.): fixed-step ``Tsit5``/``Dopri5``/``Kvaerno5`` and
  their dense interpolants against diffrax's on Lotka–Volterra; ``y' = -y`` with
  ``SaveAt(t0, t1, ts, dense)``; ``max_steps`` (diffrax raises, we mark the sample
  ``MaxIters`` and finish the others); complex states (refused).
* torchode (``tests/problems.py``): its sine problem with per-sample spans
  ``t_eval = [[0.1, 0.15, 1.0], [1.0, 1.9, 2.0]]`` (we have one ``tspan``: the per-sample spans are
  a time rescaling onto ``[0, 1]``), per-sample step counts and status codes.
* SciML (ODEProblemLibrary): ``prob_ode_linear``, ``prob_ode_2Dlinear`` (state ``(4, 2)``),
  Lotka–Volterra with its conserved quantity, ROBER's conservation law, stiff Van der Pol.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffeqbridge as deb

F64 = torch.float64
EXPLICIT = {"Tsit5": deb.Tsit5, "Dopri5": deb.Dopri5}
ODE_SOLVERS = {
    "Tsit5": deb.Tsit5,
    "Dopri5": deb.Dopri5,
    "Rodas4": deb.Rodas4,
    "Kvaerno5": deb.Kvaerno5,
    "AutoTsit5": lambda: deb.AutoTsit5(deb.Rodas4()),
    "AutoDP5": lambda: deb.AutoDP5(deb.Kvaerno5()),
}
# torchdiffeq's odeint defaults
TD_RTOL, TD_ATOL = 1e-7, 1e-9


def _span(reverse: bool) -> tuple[float, float]:
    """torchdiffeq's ``construct_problem`` times: ``linspace(1, 8)``, flipped when ``reverse``."""
    return (8.0, 1.0) if reverse else (1.0, 8.0)


# --------------------------------------------------------------------- torchdiffeq: ConstantODE
A_CONST, B_CONST = 0.2, 3.0


def _constant_problem(dtype: torch.dtype, tspan: tuple[float, float], batch: int = 2):
    """torchdiffeq's ``ConstantODE`` with trainable ``a, b`` and an independent leaf ``y0``."""
    a = torch.tensor(A_CONST, dtype=dtype, requires_grad=True)
    b = torch.tensor(B_CONST, dtype=dtype, requires_grad=True)

    def f(t, y):
        return a + (y - (a * t.to(y.dtype)[:, None] + b)) ** 5

    y0 = torch.full((batch, 1), A_CONST * tspan[0] + B_CONST, dtype=dtype, requires_grad=True)
    return deb.ODEProblem(f, y0, tspan, params=[a, b]), (a, b, y0)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("name", list(ODE_SOLVERS))
def test_torchdiffeq_constant_ode_values_and_gradients(name, reverse, dtype):
    """The exact solution is linear, so every explicit RK and Rosenbrock method reproduces it
    to rounding; ``Kvaerno5``'s Newton iteration converges only linearly at this quintuple
    root (``f - a = e^5``), so it is held to its tolerance.  Gradients of ``y(t1)``:
    ``(t1 - t0, 0, 1)`` with respect to ``(a, b, y0)``."""
    tspan = _span(reverse)
    prob, (a, b, y0) = _constant_problem(dtype, tspan)
    ts = torch.linspace(*tspan, 10, dtype=dtype)
    sol = deb.solve(prob, ODE_SOLVERS[name](), saveat=ts, rtol=TD_RTOL, atol=TD_ATOL)
    assert sol.success and sol.ys.dtype == dtype
    exact = (A_CONST * ts + B_CONST).to(F64)
    err = float(((sol.ys[..., 0].detach().to(F64) - exact[:, None]) / exact[:, None]).abs().max())
    eps = torch.finfo(dtype).eps
    bound = 1e-6 if name in ("Kvaerno5", "AutoDP5") else 64 * eps
    assert err < max(bound, 64 * eps), err
    grads = torch.autograd.grad(sol.ys[-1].sum(), [a, b, y0])
    refs = (2 * (tspan[1] - tspan[0]), 0.0, 1.0)
    gtol = 1e-4 if name in ("Kvaerno5", "AutoDP5") else 1e3 * eps
    for got, ref in zip(grads, refs):
        assert float((got.to(F64) - ref).abs().max()) < gtol * max(1.0, abs(ref)), (got, ref)


@pytest.mark.parametrize("name", ["Tsit5", "Dopri5", "Rodas4", "Kvaerno5"])
def test_torchdiffeq_constant_ode_fixed_steps(name):
    """torchdiffeq's fixed-grid pattern (``options={"step_size": ...}``): a grid that does not
    divide the span still ends exactly at ``t1`` with the exact value."""
    prob, _ = _constant_problem(F64, (1.0, 8.0))
    sol = deb.solve(prob, ODE_SOLVERS[name](), dt=0.3, adaptive=False)
    assert sol.success
    assert float(sol.ts[-1]) == 8.0
    assert float((sol.ys[-1].detach() - (A_CONST * 8 + B_CONST)).abs().max()) < 1e-9
    assert int(sol.stats.naccept[0]) == math.ceil(7 / 0.3 - 1e-9)


# ------------------------------------------------------------ torchdiffeq: linear / harmonic ODEs
def _skew_linear(dim: int, seed: int) -> torch.Tensor:
    """torchdiffeq's ``LinearODE`` matrix ``A = 2U - (U + U^T) = U - U^T``, ``U ~ 0.1 N(0, 1)``."""
    u = 0.1 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return 2 * u - (u + u.T)


def _harmonic(dim: int, seed: int) -> torch.Tensor:
    """torchdiffeq's ``HarmonicOscillator``: ``y' = y D_H`` (row vector) with
    ``D_H = [[0, -diag(kappa)], [I, 0]]``, ``kappa = 0.1 |N(0, 1)|``; as ``y' = A y``, ``A = D_H^T``."""
    n = dim // 2
    kappa = 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64).abs()
    upper = torch.cat([torch.zeros(n, n, dtype=F64), torch.diag(-kappa)], 1)
    lower = torch.cat([torch.eye(n, dtype=F64), torch.zeros(n, n, dtype=F64)], 1)
    return torch.cat([upper, lower], 0).T


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("matrix", ["linear", "harmonic"])
def test_torchdiffeq_linear_problems_match_expm_and_odeint(matrix, reverse):
    """``y(t) = exp(A (t - t0)) y0`` with ``y0 = 1`` (torchdiffeq's ``initial_val``) on
    ``linspace(1, 8, 10)``; ours (Tsit5, Dopri5) and ``torchdiffeq.odeint(method="dopri5")`` at
    rtol = atol = 1e-10 agree with the matrix exponential.  The skew ``LinearODE`` keeps
    ``|y|`` constant."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    a = _skew_linear(10, 0) if matrix == "linear" else _harmonic(4, 0)
    dim = a.shape[0]
    tspan = _span(reverse)
    ts = torch.linspace(*tspan, 10, dtype=F64)
    y0 = torch.ones(3, dim, dtype=F64) * torch.tensor([[1.0], [0.5], [-2.0]], dtype=F64)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(a * (t - tspan[0])).T for t in ts])
    peer = torchdiffeq.odeint(lambda t, y: y @ a.T, y0, ts, method="dopri5", rtol=1e-10, atol=1e-10)
    assert float((peer - exact).abs().max()) < 1e-8
    for alg in (deb.Tsit5(), deb.Dopri5()):
        sol = deb.solve(deb.ODEProblem(lambda t, y: y @ a.T, y0, tspan), alg, saveat=ts, rtol=1e-10, atol=1e-10)
        assert float((sol.ys - exact).abs().max()) < 1e-8
        assert float((sol.ys - peer).abs().max()) < 2e-8
        if matrix == "linear":
            norms = sol.ys.norm(dim=-1)
            assert float((norms - y0.norm(dim=-1)).abs().max()) < 1e-8


# --------------------------------------------------------------- torchdiffeq: odeint_adjoint
class _MLPField(torch.nn.Module):
    """A small tanh field ``f(t, y) = W2 tanh(W1 y + t c)`` (a typical neural ODE)."""

    def __init__(self, dim: int, hidden: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(hidden, dim, generator=gen, dtype=F64))
        self.c = torch.nn.Parameter(0.5 * torch.randn(hidden, generator=gen, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(dim, hidden, generator=gen, dtype=F64))

    def forward(self, t, y):
        t = t.reshape(-1, 1) if t.ndim else t
        return torch.tanh(y @ self.w1.T + t * self.c) @ self.w2.T


@pytest.mark.parametrize(
    "sensealg",
    [None, deb.BacksolveAdjoint(), deb.InterpolatingAdjoint(), deb.DiscreteAdjoint(checkpoints=4)],
    ids=["default", "backsolve", "interpolating", "discrete-ckpt"],
)
def test_torchdiffeq_odeint_adjoint_gradients_match(sensealg):
    """``odeint_adjoint(func, y0, t, adjoint_params=func.parameters())`` and our sensealgs give
    the same loss gradients for the parameters and ``y0`` (loss over every save time; no
    closed form, tight tolerances on both sides: agreement to ``1e-6`` relative)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = _MLPField(3, 16, seed=3)
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=F64).requires_grad_()
    ts = torch.linspace(0.0, 2.0, 6, dtype=F64)
    weights = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    params = list(field.parameters())
    peer = torchdiffeq.odeint_adjoint(field, y0, ts, rtol=1e-10, atol=1e-10, adjoint_params=tuple(params))
    peer_grads = torch.autograd.grad((peer * weights).sum(), [*params, y0])
    sol = deb.solve(
        deb.ODEProblem(field, y0, (0.0, 2.0), params=field), deb.Tsit5(), saveat=ts, rtol=1e-10, atol=1e-10, sensealg=sensealg
    )
    assert float((sol.ys - peer).detach().abs().max()) < 1e-8
    grads = torch.autograd.grad((sol.ys * weights).sum(), [*params, y0])
    for got, ref in zip(grads, peer_grads):
        assert float((got - ref).abs().max()) < 1e-6 * float(ref.abs().max()) + 1e-9


# ----------------------------------------------------------------- torchdiffeq: odeint_event
def _sine_exact(t: torch.Tensor) -> torch.Tensor:
    return (
        -0.5 * t**4 * torch.cos(2 * t)
        + 0.5 * t**3 * torch.sin(2 * t)
        + 0.25 * t**2 * torch.cos(2 * t)
        - t**3
        + 2 * t**4
        + (math.pi - 0.25) * t**2
    )


def _sine_field(t, y):
    t = t.to(y.dtype)[:, None]
    return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("ode", ["constant", "sine"])
@pytest.mark.parametrize("name", ["Tsit5", "Dopri5", "Rodas4", "Kvaerno5"])
def test_torchdiffeq_event_at_third_save_time(name, ode, reverse, dtype):
    """``event_tests.py``: starting at ``t_points[0]``, stop where ``y`` reaches its exact value
    at ``t_points[2]`` of ``linspace(1, 8, 10)`` (flipped when reversed); the event time and
    state within ``1e-4`` relative (torchdiffeq's bound for its adaptive methods, at its
    default tolerances)."""
    ts = torch.linspace(*_span(reverse), 10, dtype=F64)
    if ode == "sine":
        exact, field = _sine_exact(ts), _sine_field
    else:
        exact = A_CONST * ts + B_CONST

        def field(t, y):
            return A_CONST + (y - (A_CONST * t.to(y.dtype)[:, None] + B_CONST)) ** 5

    target = float(exact[2])
    y0 = torch.full((2, 1), float(exact[0]), dtype=dtype)
    event = deb.ContinuousEvent(lambda t, y: y[:, 0] - target)
    prob = deb.ODEProblem(field, y0, _span(reverse))
    sol = deb.solve(prob, ODE_SOLVERS[name](), events=[event], rtol=TD_RTOL, atol=TD_ATOL)
    assert all(code == deb.ReturnCode.Terminated for code in sol.retcode)
    assert float(((sol.events.t - ts[2]) / ts[2]).abs().max()) < 1e-4
    assert float(((sol.events.y[:, 0].to(F64) - target) / target).abs().max()) < 1e-4
    assert int(sol.events.counts.sum()) == 2


# ---------------------------------------------------- torchdiffeq: jump_t / grid_points -> tstops
JUMP = 0.5


def _jump_exact(t: torch.Tensor) -> torch.Tensor:
    """``y' = -y + 3 H(t - 1/2)``, ``y(0) = 1``."""
    after = 3 + (math.exp(-JUMP) - 3) * torch.exp(-(t - JUMP))
    return torch.where(t < JUMP, torch.exp(-t), after)


def test_torchdiffeq_jump_t_as_a_split_solve():
    """torchdiffeq's ``options={"jump_t": [1/2]}`` evaluates the field on the correct side of the
    jump.  Our ``tstops`` only land steps on the time (as SciML's): the field is still called
    at ``t = 1/2`` by the step that ends there (and its FSAL value starts the next step), so
    a jump needs the solve split there (docs/guides/migrating.md).  The split solve is
    accurate to the tolerance, and the second part starts at the first part's end state."""
    y0 = torch.ones(2, 1, dtype=F64)
    ts = torch.linspace(0.0, 2.0, 9, dtype=F64)
    first = deb.solve(
        deb.ODEProblem(lambda t, y: -y, y0, (0.0, JUMP)), deb.Tsit5(), saveat=ts[ts <= JUMP], rtol=1e-10, atol=1e-10
    )
    second = deb.solve(
        deb.ODEProblem(lambda t, y: 3.0 - y, first.ys[-1], (JUMP, 2.0)),
        deb.Tsit5(),
        saveat=ts[ts >= JUMP],
        rtol=1e-10,
        atol=1e-10,
    )
    ys = torch.cat([first.ys, second.ys[1:]])
    assert float((ys[..., 0] - _jump_exact(ts)[:, None]).abs().max()) < 1e-9
    assert int(first.stats.nreject.sum() + second.stats.nreject.sum()) == 0


@pytest.mark.parametrize("name", ["Tsit5", "Rodas4", "Kvaerno5"])
def test_torchdiffeq_grid_points_as_tstops(name):
    """``grid_points``/diffrax's ``step_ts``: steps land on the given times.  The field's kink
    at ``t = 1/2`` (``y' = -y + 3 max(t - 1/2, 0)``) is stepped onto: the dense output's
    error stays at the tolerance's level on both sides."""

    def field(t, y):
        return -y + 3.0 * (t - JUMP).clamp(min=0.0)[:, None]

    def exact(t):  # y' = -y + 3 (t - 1/2) for t > 1/2: particular solution 3 (t - 1/2) - 3
        y_half = math.exp(-JUMP)
        after = 3 * (t - JUMP) - 3 + (y_half + 3) * torch.exp(-(t - JUMP))
        return torch.where(t < JUMP, torch.exp(-t), after)

    y0 = torch.ones(2, 1, dtype=F64)
    seen = []
    sol = deb.solve(
        deb.ODEProblem(lambda t, y: seen.append(t.detach().clone()) or field(t, y), y0, (0.0, 2.0)),
        ODE_SOLVERS[name](),
        rtol=1e-9,
        atol=1e-9,
        tstops=[JUMP],
        dense=True,
    )
    assert sol.success
    assert any(bool((s == JUMP).any()) for s in seen)  # a step ended (or started) exactly there
    tt = torch.linspace(0.0, 2.0, 81, dtype=F64)
    assert float((sol.evaluate(tt)[..., 0] - exact(tt)[:, None]).abs().max()) < 1e-7


# --------------------------------------------------------- torchdiffeq / diffrax: refused inputs
def test_tuple_and_complex_states_and_tolerance_forms():
    """torchdiffeq accepts tuple states and tensor tolerances; diffrax accepts complex states.
    We take one real tensor ``(B, *state)`` (stack tuple parts along a state axis); tolerances
    are numbers or per-component tensors (tests/test_tolerances.py); the refusals name the
    argument.  A one-element tensor tolerance
    (``torch.tensor(1e-6)``, torchdiffeq's usual spelling) is a number."""
    with pytest.raises(TypeError, match=r"^y0 must be a torch.Tensor"):
        deb.ODEProblem(lambda t, y: -y, (torch.ones(2, 1), torch.ones(2, 1)), (0.0, 1.0))
    with pytest.raises(TypeError, match=r"^y0 must be real .*complex states are not supported"):
        deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=torch.complex128), (0.0, 1.0))
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 3, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"^rtol of shape \(4,\) does not broadcast to the state shape \(3,\)"):
        deb.solve(prob, deb.Tsit5(), rtol=torch.full((4,), 1e-6))
    with pytest.raises(ValueError, match=r"^saveat must be strictly increasing"):
        deb.solve(prob, deb.Tsit5(), saveat=[0.0, 0.5, 0.5, 1.0])
    tensor_tol = deb.solve(prob, deb.Tsit5(), rtol=torch.tensor(1e-8, dtype=F64), atol=torch.tensor([1e-8], dtype=F64))
    float_tol = deb.solve(prob, deb.Tsit5(), rtol=1e-8, atol=1e-8)
    assert torch.equal(tensor_tol.ys, float_tol.ys)
    assert float((float_tol.ys[-1] - math.exp(-1)).abs().max()) < 1e-8

    # the tuple pattern of api_tests.py, stacked: (f(y[0]), f(y[1])) on state (B, 2, 1)
    pair = torch.stack([torch.ones(2, 1, dtype=F64), 2 * torch.ones(2, 1, dtype=F64)], dim=1)
    sol = deb.solve(
        deb.ODEProblem(lambda t, y: torch.stack([-y[:, 0], -2 * y[:, 1]], 1), pair, (0.0, 1.0)), deb.Tsit5(), rtol=1e-9, atol=1e-9
    )
    ref = torch.tensor([math.exp(-1), 2 * math.exp(-2)], dtype=F64).reshape(1, 2, 1)
    assert float((sol.ys[-1] - ref).abs().max()) < 1e-8
