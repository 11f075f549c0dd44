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
from problems import ODE_SOLVERS, fitted_order, sine_exact

import diffeqbridge as deb

F64 = torch.float64
EXPLICIT = {"Tsit5": deb.Tsit5, "Dopri5": deb.Dopri5}
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


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
def test_torchdiffeq_gradients_with_respect_to_times(reverse):
    """torchdiffeq's ``construct_problem`` makes ``t_points`` with ``requires_grad=True`` and its
    gradient tests differentiate ``odeint`` in them.  Ours: ``tspan`` entries and ``saveat``
    that require grad get ``dy(t_k)/dt_k = f(t_k, y_k)`` and ``dy/dt0 = -(dy/dy0) f(t0, y0)``
    under every sensealg.  These times were silently detached before (``ts.grad`` stayed
    None).  The sine ODE is linear in ``y`` with ``dy(t)/dy0 = (t/t0)^2``, so the gradients of
    ``L = sum_k w_k y(t_k)`` at ``t_k = linspace(1, 8, 10)`` have a closed form; torchdiffeq's
    own gradients agree with it to ``1e-5``."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    tol = 1e-9
    times = torch.linspace(*_span(reverse), 10, dtype=F64)
    y0 = torch.tensor([[0.7]], dtype=F64)
    weights = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=F64)

    def field(t, y):
        return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3

    # closed form: y(t) = Y(t) + (t/t0)^2 (y0 - Y(t0)), Y the exact solution above
    t0 = times[0]
    ys = sine_exact(times) + (times / t0) ** 2 * (y0[0, 0] - sine_exact(t0))
    dy_dt0 = -((times / t0) ** 2) * field(t0, y0[0, 0])
    ref_t = weights * field(times, ys)
    ref_t[0] = ref_t[0] + (weights * dy_dt0).sum()
    ref_y0 = (weights * (times / t0) ** 2).sum()

    ts = times.clone().requires_grad_()
    y0_leaf = y0.clone().requires_grad_()
    peer = torchdiffeq.odeint(field, y0_leaf[0], ts, rtol=tol, atol=tol)
    peer_t, peer_y0 = torch.autograd.grad((peer[:, 0] * weights).sum(), [ts, y0_leaf])
    assert float((peer_t - ref_t).abs().max()) < 1e-5 * float(ref_t.abs().max())
    for sensealg in (None, deb.BacksolveAdjoint(), deb.InterpolatingAdjoint()):
        prob = deb.ODEProblem(_sine_field, y0_leaf, (ts[0], ts[-1]))
        sol = deb.solve(prob, deb.Tsit5(), saveat=ts, rtol=tol, atol=tol, sensealg=sensealg)
        got_t, got_y0 = torch.autograd.grad((sol.ys[:, 0, 0] * weights).sum(), [ts, y0_leaf])
        assert float((got_t - ref_t).abs().max()) < 1e-6 * float(ref_t.abs().max()), sensealg
        assert abs(float(got_y0) - float(ref_y0)) < 1e-6 * abs(float(ref_y0)), sensealg


# ----------------------------------------------------------------- torchdiffeq: odeint_event


def _sine_field(t, y):
    t = t.to(y.dtype)[:, None]
    return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3


EVENT_CASES = [(name, F64) for name in ("Tsit5", "Dopri5", "Rodas4", "Kvaerno5")] + [("Tsit5", torch.float32)]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("ode", ["constant", "sine"])
@pytest.mark.parametrize("name, dtype", EVENT_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in EVENT_CASES])
def test_torchdiffeq_event_at_third_save_time(name, dtype, ode, reverse):
    """``event_tests.py``: starting at ``t_points[0]``, stop where ``y`` reaches its exact value
    at ``t_points[2]`` of ``linspace(1, 8, 10)`` (flipped when reversed); the event time and
    state within ``1e-4`` relative (torchdiffeq's bound for its adaptive methods, at its
    default tolerances)."""
    ts = torch.linspace(*_span(reverse), 10, dtype=F64)
    if ode == "sine":
        exact, field = sine_exact(ts), _sine_field
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


@pytest.mark.parametrize("closed", ["right", "left"], ids=["H(t>=J)", "H(t>J)"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("name", ["Tsit5", "Rodas4"])  # (Dopri5: the torchdiffeq comparison below)
def test_torchdiffeq_jump_t_as_tstops(name, reverse, closed):
    """torchdiffeq's ``options={"jump_t": [1/2]}``: the field is evaluated on the correct side
    of the jump.  Our ODE ``tstops`` do the same: the step lands one float64 spacing before
    the stop and the next starts one spacing after it with ``f`` re-evaluated there.  Before,
    the step ending at the jump saw the field's value at it, and FSAL carried that value
    into the next step: with ``tstops=[0.5]`` Tsit5 took 76 accepted + 38 rejected steps
    (1.7e-8 error), and 1.9e-7 (19x the tolerance) for a left-continuous ``H``; now 27 + 0
    and 3.7e-10.  Checks: error within the tolerance, no rejected step, fewer evaluations
    than without the stop, either convention for ``H(J)`` and either time direction, and the
    gradient in ``y0`` (``dy(t1)/dy0 = exp(-(t1 - t0))``)."""
    tol = 1e-8
    if closed == "right":
        step = lambda t: (t >= JUMP).to(torch.float64)  # noqa: E731
    else:
        step = lambda t: (t > JUMP).to(torch.float64)  # noqa: E731

    def field(t, y):
        return -y + 3.0 * step(t)[:, None]

    tspan = (2.0, 0.0) if reverse else (0.0, 2.0)
    y_start = _jump_exact(torch.tensor(tspan[0], dtype=F64))
    y0 = torch.full((2, 1), float(y_start), dtype=F64, requires_grad=True)
    prob = deb.ODEProblem(field, y0, tspan)
    ts = torch.linspace(*tspan, 9, dtype=F64)
    sol = deb.solve(prob, ODE_SOLVERS[name](), rtol=tol, atol=tol, saveat=ts, tstops=[JUMP])
    plain = deb.solve(prob, ODE_SOLVERS[name](), rtol=tol, atol=tol, saveat=ts)
    assert sol.success
    err = float((sol.ys[..., 0].detach() - _jump_exact(ts)[:, None]).abs().max())
    assert err < 10 * tol, err
    assert int(sol.stats.nreject.max()) == 0 < int(plain.stats.nreject.min())
    assert int(sol.stats.nf[0]) < int(plain.stats.nf[0])
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [y0])
    assert float((grad - math.exp(-(tspan[1] - tspan[0]))).abs().max()) < 1e-7 * math.exp(2.0)


def test_torchdiffeq_jump_t_matches_torchdiffeq():
    """The same problem through ``torchdiffeq.odeint(..., options={"jump_t": [0.5]})``
    (dopri5) and our Dopri5 with ``tstops=[0.5]`` at rtol = atol = 1e-8: both within 1e-8 of
    the closed form, and within 2x of each other's evaluation counts."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    ts = torch.linspace(0.0, 2.0, 9, dtype=F64)
    calls = [0]

    def peer_field(t, y):
        calls[0] += 1
        return -y + 3.0 * float(t >= JUMP)

    jump = torch.tensor([JUMP], dtype=F64)
    peer = torchdiffeq.odeint(peer_field, torch.ones(1, dtype=F64), ts, rtol=1e-8, atol=1e-8, options={"jump_t": jump})
    sol = deb.solve(
        deb.ODEProblem(lambda t, y: -y + 3.0 * (t >= JUMP).to(y.dtype)[:, None], torch.ones(1, 1, dtype=F64), (0.0, 2.0)),
        deb.Dopri5(),
        rtol=1e-8,
        atol=1e-8,
        saveat=ts,
        tstops=[JUMP],
    )
    exact = _jump_exact(ts)
    assert float((peer[:, 0] - exact).abs().max()) < 1e-8
    assert float((sol.ys[:, 0, 0] - exact).abs().max()) < 1e-8
    assert 0.5 < int(sol.stats.nf[0]) / calls[0] < 2.0


@pytest.mark.parametrize("name", ["Tsit5", "Rodas4", "Kvaerno5"])
def test_torchdiffeq_grid_points_as_tstops(name):
    """``grid_points``/diffrax's ``step_ts``: steps stop at the given times (ODEs: one-sidedly,
    see the jump test above; the field is never called at the stop itself).  The field's kink
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
    # the step before lands one spacing short of the stop, the next starts one spacing after it
    assert any(bool((s == math.nextafter(JUMP, math.inf)).any()) for s in seen)
    assert not any(bool((s == JUMP).any()) for s in seen)
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


# ----------------------------------------------------------------------- diffrax: fixed steps
def _diffrax():
    """diffrax with float64 (as tests/test_jax.py); skipped where it is not installed."""
    dfx = pytest.importorskip("diffrax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return dfx, jax


LV = (1.5, 1.0, 3.0, 1.0)  # SciML's prob_ode_lotkavolterra: p = [a, b, c, d]


def _lv_torch(t, y):
    a, b, c, d = LV
    x, z = y[:, 0], y[:, 1]
    return torch.stack([a * x - b * x * z, -c * z + d * x * z], -1)


def _lv_jax(t, y, args):
    import jax.numpy as jnp

    a, b, c, d = LV
    x, z = y[..., 0], y[..., 1]
    return jnp.stack([a * x - b * x * z, -c * z + d * x * z], -1)


def test_diffrax_fixed_step_and_dense_output_agree():
    """Fixed-step ``Tsit5`` (``ConstantStepSize``, ``dt0 = 0.05``) gives diffrax's numbers to
    rounding, at the save times and through the dense interpolant between steps (both use
    Tsitouras' 4th-order interpolant; Dopri5 is compared with torchdiffeq in
    test_runge_kutta_step.py); ``Kvaerno5`` with a tight Newton
    (``optimistix.Newton(1e-12)``) agrees to ``1e-8``, 1/100 of its distance to the exact
    solution (same tableau; the Newton stopping rules differ).  Three initial conditions."""
    dfx, jax = _diffrax()
    import jax.numpy as jnp
    import numpy as np
    import optimistix

    y0 = torch.tensor([[1.0, 1.0], [0.5, 2.0], [2.0, 0.3]], dtype=F64)
    ts = np.linspace(0.0, 2.0, 11)
    mids = np.array([0.025, 0.73, 1.111, 1.98])
    exact = deb.solve(deb.ODEProblem(_lv_torch, y0, (0.0, 2.0)), deb.Tsit5(), saveat=torch.tensor(ts), rtol=1e-12, atol=1e-12)
    solvers = {
        "Tsit5": (dfx.Tsit5(), 1e-13),
        "Kvaerno5": (dfx.Kvaerno5(root_finder=optimistix.Newton(rtol=1e-12, atol=1e-12)), 1e-8),
    }
    for name, (peer_solver, tol) in solvers.items():
        dense = name == "Tsit5"  # (Kvaerno5's Hermite interpolants agree too: one compilation less)
        peer = dfx.diffeqsolve(  # the batch as one (3, 2) state
            dfx.ODETerm(_lv_jax),
            peer_solver,
            0.0,
            2.0,
            0.05,
            jnp.asarray(y0.numpy()),
            saveat=dfx.SaveAt(ts=ts, dense=dense),
            stepsize_controller=dfx.ConstantStepSize(),
        )
        peer_ys = torch.from_numpy(np.array(peer.ys))
        sol = deb.solve(
            deb.ODEProblem(_lv_torch, y0, (0.0, 2.0)),
            ODE_SOLVERS[name](),
            dt=0.05,
            adaptive=False,
            saveat=torch.tensor(ts),
            dense=True,
        )
        assert float((sol.ys - peer_ys).abs().max()) < tol, name
        if dense:
            peer_mid = torch.from_numpy(np.array(jax.vmap(peer.evaluate)(mids)))
            assert float((sol.evaluate(torch.tensor(mids)) - peer_mid).abs().max()) < tol, name
        if name == "Kvaerno5":
            assert float((sol.ys - exact.ys).abs().max()) > 100 * tol


def test_diffrax_adaptive_lotka_volterra_and_its_invariant():
    """Adaptive ``Tsit5`` (PID controller, rtol = atol = 1e-10) on ``[0, 10]``: ours and diffrax
    agree to ``1e-7``, and both keep ``V = d x - c log x + b y - a log y`` constant."""
    dfx, _ = _diffrax()
    import jax.numpy as jnp
    import numpy as np

    a, b, c, d = LV
    ts = np.linspace(0.0, 10.0, 21)
    peer = dfx.diffeqsolve(
        dfx.ODETerm(_lv_jax),
        dfx.Tsit5(),
        0.0,
        10.0,
        None,
        jnp.array([1.0, 1.0]),
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        max_steps=100_000,
    )
    sol = deb.solve(
        deb.ODEProblem(_lv_torch, torch.ones(2, 2, dtype=F64), (0.0, 10.0)),
        deb.Tsit5(),
        saveat=torch.tensor(ts),
        rtol=1e-10,
        atol=1e-10,
    )
    assert sol.success
    assert float((sol.ys - torch.from_numpy(np.asarray(peer.ys))[:, None]).abs().max()) < 1e-7
    x, z = sol.ys[..., 0], sol.ys[..., 1]
    invariant = d * x - c * torch.log(x) + b * z - a * torch.log(z)
    assert float((invariant - invariant[0]).abs().max()) < 1e-8


@pytest.mark.parametrize("name", list(ODE_SOLVERS))
def test_diffrax_exponential_decay_saveat_forms(name):
    """diffrax's ``y' = -y`` (``y(t) = y0 e^{-t}``): ``SaveAt(t0=True, t1=True)`` is our default
    ``saveat``; ``SaveAt(ts=...)`` with a first time after ``t0`` and ``SaveAt(t1=True)``;
    ``SaveAt(dense=True)`` is ``dense=True``.  Errors within 10x the tolerance at rtol = 1e-6,
    atol = 1e-9, state ``(B, 2, 3)``."""
    y0 = torch.linspace(0.5, 2.0, 12, dtype=F64).reshape(2, 2, 3)
    prob = deb.ODEProblem(lambda t, y: -y, y0, (0.0, 2.0))
    kw = dict(rtol=1e-6, atol=1e-9)
    bound = 10 * 1e-6 * float(y0.abs().max())
    default = deb.solve(prob, ODE_SOLVERS[name](), **kw)
    assert default.ts.tolist() == [0.0, 2.0] and torch.equal(default.ys[0], y0)
    ts = torch.tensor([0.3, 1.0, 1.7], dtype=F64)
    at_ts = deb.solve(prob, ODE_SOLVERS[name](), saveat=ts, **kw)
    only_end = deb.solve(prob, ODE_SOLVERS[name](), saveat=[2.0], **kw)
    dense = deb.solve(prob, ODE_SOLVERS[name](), dense=True, **kw)
    tt = torch.linspace(0.0, 2.0, 41, dtype=F64)
    for got, times in (
        (default.ys, default.ts),
        (at_ts.ys, ts),
        (only_end.ys, torch.tensor([2.0], dtype=F64)),
        (dense.evaluate(tt), tt),
    ):
        exact = y0 * torch.exp(-times).reshape(-1, 1, 1, 1)
        assert got.shape == exact.shape
        assert float((got - exact).abs().max()) < bound, name


def test_diffrax_max_steps_is_per_sample():
    """diffrax raises when ``max_steps`` is reached (``throw=True``) or marks the whole solve;
    ours gives that sample ``ReturnCode.MaxIters`` (its final state NaN) and the others finish
    with their accurate values: ``y' = -lam y`` with ``lam = (1, 1e4, 2)``, explicit Tsit5 and
    ``max_steps=300`` (the stiff sample needs ~ 1e4 x 3.3 / 3.5 steps for stability)."""
    lam = torch.tensor([[1.0], [1e4], [2.0]], dtype=F64)
    sol = deb.solve(deb.ODEProblem(lambda t, y: -lam * y, torch.ones(3, 1, dtype=F64), (0.0, 1.0)), deb.Tsit5(), max_steps=300)
    assert sol.retcode == [deb.ReturnCode.Success, deb.ReturnCode.MaxIters, deb.ReturnCode.Success]
    assert not sol.success
    assert int(sol.stats.nsteps[1]) == 300 and int(sol.stats.nsteps[0]) < 20
    ok = torch.tensor([0, 2])
    assert float((sol.ys[-1, ok] - torch.exp(-lam[ok])).abs().max()) < 1e-6
    assert bool(torch.isnan(sol.ys[-1, 1]).all())
    stiff = deb.solve(deb.ODEProblem(lambda t, y: -lam * y, torch.ones(3, 1, dtype=F64), (0.0, 1.0)), deb.Rodas4(), max_steps=300)
    assert stiff.success


# ------------------------------------------------------------------------------------ torchode
TORCHODE_T_EVAL = ((0.1, 0.15, 1.0), (1.0, 1.9, 2.0))  # torchode's interface_test.py


def _torchode_sine(t, y):
    """torchode's ``sine_dynamics``: ``t`` ``(B,)``, ``y`` ``(B, 1)``."""
    return (2 * y[:, 0] / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3)[:, None]


def test_torchode_per_sample_time_spans_by_rescaling():
    """torchode solves each sample on its own span (``t_eval`` ``(B, T)``).  Ours has one
    ``tspan``; per-sample spans ``[t0_i, t1_i]`` are the substitution ``t = t0_i + s (t1_i - t0_i)``,
    ``dy/ds = (t1_i - t0_i) f(t, y)`` on ``s in [0, 1]``, read at each sample's own ``s`` from
    the dense output (``sol.evaluate`` with ``(T, B)`` times).  Relative error ``< 1e-5`` as
    torchode's test, and agreement with torchode itself at the same tolerances."""
    t_eval = torch.tensor(TORCHODE_T_EVAL, dtype=F64)
    t0, t1 = t_eval[:, 0], t_eval[:, -1]
    y0 = sine_exact(t0)[:, None]

    def rescaled(s, y):
        return (t1 - t0)[:, None] * _torchode_sine(t0 + s * (t1 - t0), y)

    sol = deb.solve(deb.ODEProblem(rescaled, y0, (0.0, 1.0)), deb.Tsit5(), rtol=1e-7, atol=1e-7, dense=True)
    s_eval = ((t_eval - t0[:, None]) / (t1 - t0)[:, None]).T  # (T, B)
    ys = sol.evaluate(s_eval)[..., 0].T  # (B, T)
    exact = sine_exact(t_eval)
    assert float(((ys - exact) / exact).abs().max()) < 1e-5
    torchode = pytest.importorskip("torchode")
    peer = torchode.solve_ivp(_torchode_sine, y0, t_eval)
    assert peer.status.tolist() == [0, 0]
    assert float(((ys - peer.ys[..., 0]) / exact).abs().max()) < 1e-5


def test_torchode_per_sample_steps_and_status_codes():
    """``y' = -lam y``, ``lam = (1, 300, 2)``, Tsit5 at rtol = atol = 1e-6: every sample takes its
    own number of steps (torchode's ``stats["n_steps"]``, our ``stats.nsteps``; within a
    factor 2 of torchode's per sample); with ``max_steps=50`` only the stiff sample stops —
    torchode's ``Status.REACHED_MAX_STEPS`` is our ``ReturnCode.MaxIters`` — and the others'
    values are unchanged."""
    lam = torch.tensor([[1.0], [300.0], [2.0]], dtype=F64)
    y0 = torch.ones(3, 1, dtype=F64)
    ts = torch.linspace(0.0, 1.0, 5, dtype=F64)
    prob = deb.ODEProblem(lambda t, y: -lam * y, y0, (0.0, 1.0))
    free = deb.solve(prob, deb.Tsit5(), rtol=1e-6, atol=1e-6, saveat=ts)
    capped = deb.solve(prob, deb.Tsit5(), rtol=1e-6, atol=1e-6, saveat=ts, max_steps=50)
    assert free.success and int(free.stats.nsteps[1]) > 5 * int(free.stats.nsteps[[0, 2]].max())
    assert capped.retcode == [deb.ReturnCode.Success, deb.ReturnCode.MaxIters, deb.ReturnCode.Success]
    assert int(capped.stats.nsteps[1]) == 50
    assert torch.equal(capped.ys[:, [0, 2]], free.ys[:, [0, 2]])
    assert float((free.ys[..., 0] - torch.exp(-lam[:, 0] * ts[:, None])).abs().max()) < 1e-6

    torchode = pytest.importorskip("torchode")
    for max_steps, ours in ((None, free), (50, capped)):
        term = torchode.ODETerm(lambda t, y: -lam * y)
        controller = torchode.IntegralController(atol=1e-6, rtol=1e-6, term=term)
        solver = torchode.AutoDiffAdjoint(torchode.Tsit5(term=term), controller, max_steps=max_steps)
        peer = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=ts.expand(3, -1)))
        codes = {0: deb.ReturnCode.Success, 3: deb.ReturnCode.MaxIters}
        assert [codes[int(c)] for c in peer.status] == ours.retcode
        ratio = ours.stats.nsteps.double() / peer.stats["n_steps"].double()
        assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio


# ------------------------------------------------------------------ SciML's ODEProblemLibrary
LINEAR_RATE = 1.01  # prob_ode_linear / prob_ode_2Dlinear: u' = 1.01 u on [0, 1]


@pytest.mark.parametrize("name, order, slack", [("Tsit5", 5, 0.5), ("Dopri5", 5, 0.3), ("Rodas4", 4, 0.3), ("Kvaerno5", 5, 0.3)])
def test_sciml_2dlinear_fixed_step_orders(name, order, slack):
    """``prob_ode_2Dlinear`` (state ``(4, 2)``, ``u0 = rand(4, 2)``; three draws as the batch):
    the fitted slope of the final error against ``dt`` (1/8 ... 1/64) is the solver's order --
    Tsit5 within 0.5: its principal error coefficients are tuned small, so on this problem the
    error ratios per halving are still 17.5, 26, 29 (not 32; measured; the step itself matches
    diffrax's Tsit5 to rounding, test_diffrax_fixed_step_and_dense_output_agree) -- and
    ``prob_ode_linear``'s ``u0 = 1/2`` (state ``(1,)``) gives the same relative errors (to
    rounding: a linear problem's step is ``u0`` times the stability function)."""
    u0 = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    dts = [1 / 8, 1 / 16, 1 / 32, 1 / 64]
    errors, scalar_errors = [], []
    for dt in dts:
        for y0, out in ((u0, errors), (torch.full((1, 1), 0.5, dtype=F64), scalar_errors)):
            sol = deb.solve(
                deb.ODEProblem(lambda t, y: LINEAR_RATE * y, y0, (0.0, 1.0)), ODE_SOLVERS[name](), dt=dt, adaptive=False
            )
            out.append(float(((sol.ys[-1] - y0 * math.exp(LINEAR_RATE)) / y0).abs().max()))
    assert abs(fitted_order(dts, errors) - order) < slack, errors
    assert max(abs(e - s) for e, s in zip(errors, scalar_errors)) < 1e-13


@pytest.mark.parametrize("name", ["Rodas4", "Kvaerno5", "AutoTsit5"])
def test_sciml_rober_conserves_mass(name):
    """``prob_ode_rober`` (``k = (0.04, 3e7, 1e4)``, ``u0 = (1, 0, 0)``, ``tspan = (0, 1e5)``):
    ``y1 + y2 + y3 = 1`` is a linear invariant every Runge–Kutta/Rosenbrock step keeps, at
    all 9 save times; ``y2`` stays in ``[0, 3.7e-5]`` (its peak is ``3.65e-5``); the
    stiff-aware ``AutoTsit5`` switches to Rodas4 and needs a few hundred steps."""
    k1, k2, k3 = 0.04, 3e7, 1e4

    def rober(t, y):
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2**2 - k3 * y2 * y3, k2 * y2**2], -1)

    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    saveat = torch.logspace(-5, 5, 9, dtype=F64)
    saveat = torch.cat([torch.zeros(1, dtype=F64), saveat])
    sol = deb.solve(
        deb.ODEProblem(rober, y0, (0.0, 1e5)), ODE_SOLVERS[name](), saveat=saveat, rtol=1e-6, atol=1e-10, max_steps=5_000
    )
    assert sol.success
    assert float((sol.ys.sum(-1) - 1).abs().max()) < 1e-12
    assert float(sol.ys[..., 1].min()) > -1e-12 and float(sol.ys[..., 1].max()) < 3.7e-5
    assert int(sol.stats.nsteps[0]) < 1_000
    if name == "AutoTsit5":
        assert int(sol.stats.extra["nswitch"][0]) >= 1


def test_sciml_vanderpol_stiff_needs_a_stiff_solver():
    """``prob_ode_vanderpol_stiff`` (``x' = y``, ``y' = mu ((1 - x^2) y - x)``, ``mu = 1e6``,
    ``u0 = (sqrt 3, 0)``, here on ``[0, 0.1]``): explicit Tsit5 stops at ``max_steps``
    (``MaxIters``), Rodas4 and ``AutoTsit5(Rodas4())`` succeed and agree to ``1e-4``."""
    mu = 1e6

    def vdp(t, y):
        x, v = y.unbind(-1)
        return torch.stack([v, mu * ((1 - x**2) * v - x)], -1)

    prob = deb.ODEProblem(vdp, torch.tensor([[math.sqrt(3.0), 0.0]], dtype=F64), (0.0, 0.1))
    explicit = deb.solve(prob, deb.Tsit5(), rtol=1e-6, atol=1e-6, max_steps=500)
    assert explicit.retcode == deb.ReturnCode.MaxIters
    stiff = deb.solve(prob, deb.Rodas4(), rtol=1e-6, atol=1e-6)
    auto = deb.solve(prob, deb.AutoTsit5(deb.Rodas4()), rtol=1e-6, atol=1e-6)
    assert stiff.success and auto.success
    rel = ((auto.ys[-1] - stiff.ys[-1]) / stiff.ys[-1]).abs().max()
    assert float(rel) < 1e-4, float(rel)
    assert int(auto.stats.nsteps[0]) < 200 and int(auto.stats.extra["nswitch"][0]) >= 1
