"""Exact diffusion inversion: ``dd.invert`` and the paired samplers BDIA and EDICT.

Both run on a DDIM grid ``t_0 = T > t_1 > ... > t_N = t_end`` (``skip_type``, default uniform
in ``t`` as DDIM) and use the DDIM step (DPM-Solver-1 with noise prediction)
``ddim(z, eps, a -> b) = (alpha_b/alpha_a) z - sigma_b expm1(lambda_b - lambda_a) eps``, which
also runs upwards in time (``b > a``).  Each carries a pair of states; :func:`invert` returns
an :class:`InversionState` holding the pair at ``T`` and the grid it was made on, and
``dd.sample(..., method="bdia" | "edict")`` accepts it (or a plain ``(B, *shape)`` tensor of
noise).  A round trip ``sample(invert(x0))`` gives ``x0`` back up to rounding.

BDIA (Zhang, Lewis, Kleijn, "Exact Diffusion Inversion via Bi-directional Integration
Approximation", ECCV 2024), BDIA-DDIM: with ``eps_k = eps(z_k, t_k)``::

    z_{k+1} = ddim(z_k, eps_k, t_k -> t_{k+1}) + gamma (z_{k-1} - ddim(z_k, eps_k, t_k -> t_{k-1}))

(the paper's ``x_{i-1} = gamma (x_{i+1} - x_i) - gamma Delta(t_i -> t_{i+1}) + Delta(t_i -> t_{i-1}) + x_i``
after cancelling), one model call per step; the first step from pure noise is plain DDIM.
Inverting solves the same relation for ``z_{k-1}``: a division by ``gamma``.  The two-step
recurrence has a parasitic mode that the sampler multiplies by about ``-gamma`` per step
and the inversion by about ``-1/gamma``: for ``gamma < 1`` rounding errors in the inversion
grow like ``gamma^-N`` (measured in docs/diffusion_samplers.md), so long round trips need ``gamma``
close to 1; ``gamma = 1`` (default) is neutral both ways.

EDICT (Wallace, Gokul, Naik, "EDICT: Exact Diffusion Inversion via Coupled Transformations",
CVPR 2023, Eqs. 10-16) couples two chains ``(x, y)`` with mixing ``p`` (default 0.93)::

    x' = a x + b eps(y, t_k);   y' = a y + b eps(x', t_k)
    x'' = p x' + (1 - p) y';    y'' = p y' + (1 - p) x''

(``a, b`` the DDIM coefficients of ``t_k -> t_{k+1}``), two model calls per step; each line is
inverted in reverse order.  From noise both chains start at ``x_T``; the sample is ``x``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing_extensions import Self

from ..problem import expand_to
from ..solution import Solution
from .common import (
    check_model_dtype,
    check_steps,
    check_t_end,
    check_x,
    grid_solution,
)
from .dpm_solver import coefficients, first_order
from .grids import Point, check_skip_type, evaluations_per_call, point, time_grid

INVERT_METHODS = ("ode", "bdia", "edict")


class InversionState(tuple):
    """The pair of states at ``T`` that BDIA/EDICT sampling starts from (what :func:`invert` returns).

    A 2-tuple ``(x, y)`` of ``(B, *shape)`` tensors -- BDIA: ``x`` at ``T`` and ``y`` at the
    next grid time ``t_1``; EDICT: the two coupled chains at ``T`` -- that also records the
    grid it was made on, so that ``dd.sample`` can refuse a different one.  A plain
    ``(x, y)`` tuple is accepted as well (the grid then comes from ``dd.sample``'s arguments).

    Attributes:
        method: ``"bdia"`` or ``"edict"``.
        steps, t_end, skip_type: the grid.
        mixing: BDIA's ``gamma`` or EDICT's ``p``.
    """

    method: str
    steps: int
    t_end: float
    skip_type: str
    mixing: float

    def __new__(cls, x: Tensor, y: Tensor, *, method: str, steps: int, t_end: float, skip_type: str, mixing: float) -> Self:
        self = super().__new__(cls, (x, y))
        self.method, self.steps, self.t_end, self.skip_type, self.mixing = method, steps, t_end, skip_type, mixing
        return self

    @property
    def x(self) -> Tensor:
        return self[0]

    @property
    def y(self) -> Tensor:
        return self[1]

    def __repr__(self) -> str:
        return (
            f"InversionState(method={self.method!r}, shape={tuple(self[0].shape)}, steps={self.steps}, "
            f"t_end={self.t_end}, skip_type={self.skip_type!r}, mixing={self.mixing})"
        )


def _grid(sde: Any, steps: int, t_end: float, skip_type: str, device: Any) -> list[Point]:
    """The grid's points, each of shape ``(1,)`` (shared by every sample)."""
    ts = time_grid(sde, float(sde.T), t_end, steps, skip_type, device=device)
    grid = point(sde, ts)
    return [grid.select(torch.tensor([k], device=device)) for k in range(steps + 1)]


def _ddim(z: Tensor, eps: Tensor, a: Point, b: Point) -> Tensor:
    return first_order(z, eps, coefficients(a, b, "dpmsolver"))


def _eps(adapter: Any, z: Tensor, p: Point) -> Tensor:
    return adapter.eps(z, p.t.to(z.dtype).expand(z.shape[0]))


def _mixing(name: str, value: Any, state: InversionState | None, default: float) -> float:
    if value is None:
        return state.mixing if state is not None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    if state is not None and float(value) != state.mixing:
        raise ValueError(f"{name}={value} differs from the {name}={state.mixing} the state was inverted with")
    return float(value)


def _start(
    method: str,
    x_T: Any,
    steps: int | None,
    t_end: float,
    skip_type: str | None,
) -> tuple[tuple[Tensor, Tensor] | None, InversionState | None, Tensor, int, str]:
    """Validate a sampler's start: noise ``(B, *shape)``, an :class:`InversionState` of
    ``method`` or a plain ``(x, y)`` pair.  Returns ``(pair, state, x, steps, skip_type)``."""
    state = x_T if isinstance(x_T, InversionState) else None
    if state is not None:
        if state.method != method:
            raise ValueError(f"x_T is an InversionState of method={state.method!r}; sample it with that method")
        if steps is not None and steps != state.steps:
            raise ValueError(f"steps={steps} differs from the steps={state.steps} the state was inverted with")
        if not math.isclose(float(t_end), state.t_end, rel_tol=1e-12):
            raise ValueError(f"t_end={t_end} differs from the t_end={state.t_end} the state was inverted with")
        if skip_type is not None and skip_type != state.skip_type:
            raise ValueError(f"skip_type={skip_type!r} differs from the state's {state.skip_type!r}")
        steps, skip_type = state.steps, state.skip_type
    pair = None
    if isinstance(x_T, (tuple, list)):
        if len(x_T) != 2:
            raise ValueError(f"x_T must be a tensor or the (x, y) pair dd.invert returns; got {len(x_T)} items")
        pair = (check_x("x_T[0]", x_T[0]), check_x("x_T[1]", x_T[1]))
        if pair[0].shape != pair[1].shape or pair[0].dtype != pair[1].dtype:
            raise ValueError("the two states of x_T must share shape and dtype")
        x = pair[0]
    else:
        x = check_x("x_T", x_T)
    skip_type = check_skip_type("time_uniform" if skip_type is None else skip_type)
    return pair, state, x, check_steps(steps, 50), skip_type


def _no_sensealg(sensealg: Any, method: str) -> None:
    if sensealg is not None:
        raise ValueError(f"method={method!r} is differentiated by autograd through its loop; pass sensealg=None")


def sample_bdia(
    adapter: Any,
    sde: Any,
    x_T: Tensor | InversionState,
    *,
    t_end: float,
    steps: int | None,
    seed: int = 0,
    gamma: float | None = None,
    skip_type: str | None = None,
    sensealg: Any = None,
) -> Solution:
    """BDIA-DDIM sampling (module docstring) from noise ``x_T`` ``(B, *shape)`` or a BDIA
    :class:`InversionState`.  ``steps`` DDIM intervals (default 50, or the state's); one model
    call per step (``steps - 1`` from a state).  ``gamma`` defaults to the state's or 1.
    Deterministic: ``seed`` is unused."""
    pair, state, x, steps, skip_type = _start("bdia", x_T, steps, t_end, skip_type)
    gamma = _mixing("gamma", gamma, state, 1.0)
    _no_sensealg(sensealg, "bdia")
    grid = _grid(sde, steps, float(t_end), skip_type, x.device)
    nf = 0
    if pair is None:
        prev, cur = x, _ddim(x, _eps(adapter, x, grid[0]), grid[0], grid[1])
        nf += 1
    else:
        prev, cur = pair
    for k in range(1, steps):
        eps = _eps(adapter, cur, grid[k])
        nxt = _ddim(cur, eps, grid[k], grid[k + 1]) + gamma * (prev - _ddim(cur, eps, grid[k], grid[k - 1]))
        prev, cur = cur, nxt
        nf += 1
    return _solution(grid, x, cur, nf * evaluations_per_call(adapter), steps, "bdia")


def sample_edict(
    adapter: Any,
    sde: Any,
    x_T: Tensor | InversionState,
    *,
    t_end: float,
    steps: int | None,
    seed: int = 0,
    p: float | None = None,
    skip_type: str | None = None,
    sensealg: Any = None,
) -> Solution:
    """EDICT sampling (module docstring) from noise ``x_T`` ``(B, *shape)`` or an EDICT
    :class:`InversionState`; two model calls per step; ``ys[-1]`` is the ``x`` chain.
    ``p`` defaults to the state's or 0.93.  Deterministic: ``seed`` is unused."""
    pair, state, x, steps, skip_type = _start("edict", x_T, steps, t_end, skip_type)
    p = _mixing("p", p, state, 0.93)
    _no_sensealg(sensealg, "edict")
    grid = _grid(sde, steps, float(t_end), skip_type, x.device)
    a, b = (x, x) if pair is None else pair
    for k in range(steps):
        co = coefficients(grid[k], grid[k + 1], "dpmsolver")
        a = first_order(a, _eps(adapter, b, grid[k]), co)
        b = first_order(b, _eps(adapter, a, grid[k]), co)
        a = p * a + (1.0 - p) * b
        b = p * b + (1.0 - p) * a
    return _solution(grid, x, a, 2 * steps * evaluations_per_call(adapter), steps, "edict")


def _solution(grid: list[Point], x_T: Tensor, x_end: Tensor, nf: int, steps: int, alg: str) -> Solution:
    ts = torch.cat([grid[0].t, grid[-1].t])
    nf_t = torch.full((x_T.shape[0],), nf, dtype=torch.long, device=x_T.device)
    return grid_solution(ts, torch.stack([x_T, x_end]), nf_t, steps, alg=alg)


# ----------------------------------------------------------------------------- inversion
def _invert_bdia(adapter: Any, sde: Any, x0: Tensor, steps: int, t_end: float, skip_type: str, gamma: float) -> InversionState:
    grid = _grid(sde, steps, t_end, skip_type, x0.device)
    nxt = x0
    cur = _ddim(nxt, _eps(adapter, nxt, grid[steps]), grid[steps], grid[steps - 1])  # DDIM inversion step
    for k in range(steps - 1, 0, -1):
        eps = _eps(adapter, cur, grid[k])
        prev = _ddim(cur, eps, grid[k], grid[k - 1]) + (nxt - _ddim(cur, eps, grid[k], grid[k + 1])) / gamma
        nxt, cur = cur, prev
    return InversionState(cur, nxt, method="bdia", steps=steps, t_end=t_end, skip_type=skip_type, mixing=gamma)


def _invert_edict(adapter: Any, sde: Any, x0: Tensor, steps: int, t_end: float, skip_type: str, p: float) -> InversionState:
    grid = _grid(sde, steps, t_end, skip_type, x0.device)
    a, b = x0, x0
    for k in range(steps - 1, -1, -1):
        co = coefficients(grid[k], grid[k + 1], "dpmsolver")
        lin, shift = expand_to(co.L.to(a.dtype), a), expand_to((co.c * co.phi0).to(a.dtype), a)
        b = (b - (1.0 - p) * a) / p
        a = (a - (1.0 - p) * b) / p
        b = (b - shift * _eps(adapter, a, grid[k])) / lin
        a = (a - shift * _eps(adapter, b, grid[k])) / lin
    return InversionState(a, b, method="edict", steps=steps, t_end=t_end, skip_type=skip_type, mixing=p)


def invert(
    model: Any,
    sde: Any,
    x0: Tensor,
    method: str = "ode",
    steps: int | None = None,
    parameterization: str = "eps",
    atol: float | None = None,
    rtol: float | None = None,
    t_end: float = 1e-3,
    **options: Any,
) -> Tensor | InversionState:
    """Map data ``x0`` ``(B, *shape)`` (at ``t_end``) to the sampler's start at ``T``.

    Args:
        model: ``model(x, t)`` predicting ``parameterization`` (or a ``ModelAdapter``).
        sde: the forward process.
        x0: ``(B, *shape)`` states at ``t_end``.
        method: ``"ode"`` (probability-flow ODE from ``t_end`` up to ``T`` with ``deb.solve``,
            adaptive; invertible to the solver's tolerance), ``"bdia"`` or ``"edict"``
            (exact to rounding; ``steps`` DDIM intervals, default 50).
        atol, rtol: tolerances of ``"ode"`` (default 1e-5 each).
        t_end: the time ``x0`` sits at (the default of ``dd.sample``).
        options: ``"ode"``: ``alg`` (default ``Tsit5``); ``"bdia"``: ``gamma`` (default 1),
            ``skip_type``; ``"edict"``: ``p`` (default 0.93), ``skip_type``.

    Returns:
        ``"ode"``: the ``(B, *shape)`` tensor at ``T``; ``"bdia"``/``"edict"``: an
        :class:`InversionState` that ``dd.sample(model, sde, state, method=method)`` maps back to ``x0``.
    """
    from .models import (
        ModelAdapter,
        as_adapter,
        check_model,
        check_parameterization,
        check_sde,
    )

    if method not in INVERT_METHODS:
        raise ValueError(f"method must be one of {INVERT_METHODS}; got {method!r}")
    sde = check_sde(sde)
    check_model(model)
    if not isinstance(model, ModelAdapter):
        check_parameterization(parameterization)
    check_x("x0", x0)
    check_model_dtype(model, x0, "x0")
    t_end = check_t_end(t_end, float(sde.T))
    adapter = as_adapter(model, sde, parameterization)
    if method == "ode":
        allowed = {"alg"}
        if set(options) - allowed:
            raise TypeError(f"invert(method='ode') got unexpected options {sorted(set(options) - allowed)}")
        if steps is not None:
            raise ValueError("steps does not apply to method='ode' (adaptive; use atol/rtol)")
        return _invert_ode(adapter, sde, x0, t_end, atol, rtol, options.get("alg"))
    if atol is not None or rtol is not None:
        raise ValueError(f"atol/rtol do not apply to method={method!r} (exact inversion on a fixed grid)")
    steps = check_steps(steps, 50)
    name = "gamma" if method == "bdia" else "p"
    allowed = {name, "skip_type"}
    if set(options) - allowed:
        raise TypeError(f"invert(method={method!r}) got unexpected options {sorted(set(options) - allowed)}")
    skip_type = check_skip_type(options.get("skip_type", "time_uniform"))
    mixing = _mixing(name, options.get(name), None, 1.0 if method == "bdia" else 0.93)
    if method == "bdia":
        return _invert_bdia(adapter, sde, x0, steps, t_end, skip_type, mixing)
    return _invert_edict(adapter, sde, x0, steps, t_end, skip_type, mixing)


def _invert_ode(adapter: Any, sde: Any, x0: Tensor, t_end: float, atol: float | None, rtol: float | None, alg: Any) -> Tensor:
    """The probability-flow ODE ``dx/dt = f(t) x - g(t)^2 score(x, t) / 2`` from ``t_end`` up to ``T``."""
    from ..problem import ODEProblem
    from ..solve import solve
    from ..solvers import Tsit5
    from .sampling import ODE_TOLERANCES, reverse_sde_drift

    prob = ODEProblem(reverse_sde_drift(adapter, sde, 0.5), x0, (t_end, float(sde.T)))
    sol = solve(
        prob,
        alg if alg is not None else Tsit5(),
        atol=ODE_TOLERANCES[0] if atol is None else atol,
        rtol=ODE_TOLERANCES[1] if rtol is None else rtol,
    )
    return sol.ys[-1]
