"""Per-sample step-size control: error norms, the PI controller and initial step sizes.

Everything works on ``(B,)`` tensors; nothing synchronises with the host.

PI controller as OrdinaryDiffEq/StochasticDiffEq (``stepsize_controller!`` for
``PIController``)::

    q11 = EEst^beta1;  q = q11 / qold^beta2;  q = clamp(q / gamma, 1/qmax, 1/qmin)
    accept (EEst <= 1): dt_new = dt / q,  qold = max(EEst, 1e-4)
    reject:             dt_new = dt / min(1/qmin, q11 / gamma)

with ``beta1 = 7/(10 q_alg)``, ``beta2 = 2/(5 q_alg)`` unless the solver overrides them;
``qmax = 9/8`` for SDE solvers and 10 for ODE solvers, ``qmin = 1/5``, ``gamma = 0.9``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .problem import Terms, expand_to
from .solvers.base import AbstractSolver

QOLD_INIT = 1e-4


def layout_free_pow(x: Tensor, b: float) -> Tensor:
    """``x ** b`` for ``x >= 0`` (``(B,)``), as ``exp(b log x)``: ``torch.pow`` rounds
    differently in its vectorised blocks and its scalar tail (AVX-512), so a sample's step
    size would depend on the batch length; ``exp``/``log`` are the same in both (tested in
    ``tests/test_batch_invariance.py``).  ``0 -> 0``, ``inf -> inf``, NaN stays NaN (``b > 0``)."""
    return torch.exp(b * torch.log(x))


#: a tolerance: a number, or per-component ``(1, *state_shape)`` (``solve``'s ``atol``/``rtol``)
Tolerance = float | Tensor


def tolerance_bound(tol: Tolerance) -> float:
    """The tightest component of a per-component tolerance (a number as is)."""
    return float(tol.min()) if isinstance(tol, Tensor) else tol


def scaled_error_norm(error: Tensor, y0: Tensor, y1: Tensor, atol: float | Tensor, rtol: float | Tensor) -> Tensor:
    """RMS over the state of ``error / (atol + rtol * max(|y0|, |y1|))``: ``(B, ...) -> (B,)``."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return (error / scale).square().flatten(1).mean(dim=1).sqrt()


@dataclass(frozen=True)
class PIController:
    beta1: float
    beta2: float
    qmin: float
    qmax: float
    gamma: float

    @classmethod
    def for_solver(cls, solver: AbstractSolver) -> PIController:
        order = solver.controller_order
        sde_default_qmax = 9 / 8 if solver.is_sde else 10.0
        return cls(
            beta1=solver.beta1 if solver.beta1 is not None else 7 / (10 * order),
            beta2=solver.beta2 if solver.beta2 is not None else 2 / (5 * order),
            qmin=solver.qmin if solver.qmin is not None else 1 / 5,
            qmax=solver.qmax if solver.qmax is not None else sde_default_qmax,
            gamma=solver.gamma if solver.gamma is not None else 9 / 10,
        )

    def propose(self, dt: Tensor, err: Tensor, qold: Tensor, accepted: Tensor) -> tuple[Tensor, Tensor]:
        """Next ``dt`` and ``qold`` for every sample (``(B,)`` each).

        ``err`` may hold ``inf`` for a non-finite step: that sample shrinks by ``qmin``.
        """
        q11 = layout_free_pow(err, self.beta1)
        q = q11 / layout_free_pow(qold, self.beta2)
        # clamped, so NaN is the only non-finite value left: nan_to_num touches nothing else
        q = torch.clamp(q / self.gamma, 1 / self.qmax, 1 / self.qmin).nan_to_num(nan=1 / self.qmin)
        dt_accept = dt / q
        shrink = torch.clamp(q11 / self.gamma, max=1 / self.qmin).nan_to_num(nan=1 / self.qmin)  # q11 >= 0: no -inf
        dt_reject = dt / shrink
        new_dt = torch.where(accepted, dt_accept, dt_reject)
        new_qold = torch.where(accepted, torch.clamp(err, min=QOLD_INIT), qold)
        return new_dt, new_qold

    def next_dt(
        self,
        step_dt: Tensor,
        dt: Tensor,
        err: Tensor,
        qold: Tensor,
        accepted: Tensor,
        clipped: Tensor,
        factor: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The loop's next step size and ``qold`` (``(B,)`` each): :meth:`propose` from the step
        taken (``step_dt``); after a step clipped to a save time (``clipped``) the unclipped
        ``dt`` is kept when larger; ``factor`` (a composite's method switch, ``solver.update``)
        multiplies the result."""
        proposed, qold = self.propose(step_dt, err, qold, accepted)
        proposed = torch.where(accepted & clipped, torch.maximum(proposed, dt), proposed)
        if factor is not None:
            proposed = proposed * factor
        return proposed, qold


def clip_step(
    dt: Tensor,
    t: Tensor,
    target: Tensor,
    active: Tensor,
    sign: float,
    snap: Tensor | None = None,
    last: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The step each sample takes towards its next forced time ``target`` (``(B,)`` each).

    ``dt``: proposed magnitudes; ``sign``: the time direction.  Adaptive (``snap`` None): a
    step reaching ``target`` (within ``1e-12`` relative) lands on it exactly.  Fixed steps:
    a grid point within ``snap`` (``(B,)``) of ``target`` counts as reaching it and keeps its
    full step, unless ``last`` (``(B,)``: ``target`` is the end) — only a step overshooting
    ``target`` by more than ``snap`` is shortened onto it.  Returns the step magnitudes, the
    new times (``t`` for inactive samples) and the ``(B,)`` mask of steps that reach ``target``.
    """
    remaining = target - t if sign > 0 else t - target
    if snap is None:
        hits = active & (dt >= remaining * (1 - 1e-12))
        land = hits
    else:
        hits = active & (dt + snap >= remaining)
        land = hits & ((dt - remaining > snap) | last) if last is not None else hits & (dt - remaining > snap)
    step_dt = torch.where(land, remaining, dt)
    t_new = torch.where(active, torch.where(land, target, t + step_dt if sign > 0 else t - step_dt), t)
    return step_dt, t_new, hits


def _rms(x: Tensor) -> Tensor:
    """Per-sample RMS over the state: ``(B, ...) -> (B,)``."""
    return x.square().flatten(1).mean(dim=1).sqrt()


def _as_batch(x: float | Tensor | None, default: float, like: Tensor) -> Tensor:
    if x is None:
        x = default
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).expand_as(like)


def hairer_initial_dt(
    f: Callable[[Tensor, Tensor], Tensor],
    t0: Tensor,
    y0: Tensor,
    f0: Tensor | None,
    order: float,
    atol: float | Tensor,
    rtol: float | Tensor,
    dtmax: float | Tensor | None = None,
    dtmin: float | Tensor | None = None,
    direction: float = 1.0,
) -> tuple[Tensor, int]:
    """Per-sample starting step size (Hairer–Nørsett–Wanner I, Sec. II.4).

    Follows OrdinaryDiffEq.jl's out-of-place ``ode_determine_initdt`` (forward in time),
    with every norm a per-sample RMS over the state, all as batched tensor ops::

        sk  = atol + rtol * |y0|
        d0  = ‖y0 / sk‖,  d1 = ‖f0 / sk‖
        dt0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else d0 / d1 / 100;   dt0 = min(dt0, dtmax)
        (dt0 < 10 eps -> max(1e-6, dtmin), as the in-place variant)
        f1  = f(t0 + dt0, y0 + dt0 * f0)
        (f1 == f0 exactly -> max(dtmin, 100 dt0))
        d2  = ‖(f1 - f0) / sk‖ / dt0
        dt1 = max(1e-6, 1e-3 dt0) if max(d1, d2) <= 1e-15 else 10^(-(2 + log10 max(d1, d2)) / order)
        dt  = max(dtmin, min(100 dt0, dt1, dtmax))

    Like OrdinaryDiffEq (which strips dual numbers with ``DiffEqBase.value``), the
    result carries no gradient: the inputs are detached and ``f`` runs under
    ``torch.no_grad()``.  No host synchronisation.

    Args:
        f: the drift, ``f(t (B,), y (B, *state))``.
        t0: ``(B,)`` start times.
        y0: ``(B, *state)`` initial states.
        f0: ``f(t0, y0)`` if known (else evaluated, counted in the returned ``nf``).
        order: the method's order (``controller_order``; 5 for Tsit5/Dopri5).
        atol, rtol: tolerances (floats or tensors broadcastable against ``y0``).
        dtmax: upper bound, float or ``(B,)`` (e.g. ``t1 - t0``); default unbounded.
        dtmin: lower bound, float or ``(B,)``; default 0.
        direction: ``-1.0`` when time runs backwards (the probe is at ``t0 - dt0``); the
            returned step is a magnitude either way.

    Returns:
        ``(dt, nf)``: ``(B,)`` step sizes in ``t0``'s dtype and the number of ``f``
        evaluations made (1, or 2 when ``f0`` was not given).
    """
    nf = 0
    with torch.no_grad():
        y0 = y0.detach()
        t0 = t0.detach()
        if f0 is None:
            f0 = f(t0, y0)
            nf += 1
        f0 = f0.detach()
        real = y0.dtype
        tiny = torch.finfo(real).tiny
        eps = torch.finfo(t0.dtype).eps if t0.is_floating_point() else torch.finfo(real).eps
        dtmax_b = _as_batch(dtmax, math.inf, t0)
        dtmin_b = _as_batch(dtmin, 0.0, t0)
        small = torch.full_like(t0, 1e-6)

        sk = atol + rtol * y0.abs()
        d0 = _rms(y0 / sk)
        d1 = _rms(f0 / sk)
        degenerate = (d0 < 1e-5) | (d1 < 1e-5)
        dt0 = torch.where(degenerate, small.to(d0.dtype), d0 / d1.clamp_min(tiny) / 100).to(t0.dtype)
        dt0 = torch.minimum(dt0, dtmax_b)
        too_small = ~(dt0 >= 10 * eps)  # also catches NaN
        fallback = torch.maximum(small, dtmin_b)
        dt0 = torch.where(too_small, fallback, dt0)

        y1 = y0 + expand_to(direction * dt0, y0).to(real) * f0
        f1 = f(t0 + direction * dt0, y1)
        nf += 1
        constant = (f1 == f0).flatten(1).all(dim=1)

        d2 = _rms((f1 - f0) / sk) / dt0.to(real)
        m = torch.maximum(d1, d2)
        dt1_flat = torch.maximum(small, dt0 * 1e-3)
        # 10^(-(2 + log10 m) / order) as exp(-(log 100 + log m) / order): torch.pow with a
        # tensor exponent rounds differently in vectorised blocks and the scalar tail
        dt1_est = torch.exp(-(math.log(100.0) + torch.log(m.clamp_min(tiny))) / order).to(t0.dtype)
        dt1 = torch.where(m <= 1e-15, dt1_flat, dt1_est)
        dt = torch.maximum(dtmin_b, torch.minimum(torch.minimum(100 * dt0, dt1), dtmax_b))
        dt = torch.where(constant, torch.maximum(dtmin_b, 100 * dt0), dt)
        dt = torch.where(too_small, fallback, dt)
    return dt, nf


def sde_initial_dt(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Callable[[Tensor, Tensor], Tensor],
    g_size: Callable[[Tensor], Tensor],
    t0: Tensor,
    y0: Tensor,
    f0: Tensor,
    g0: Tensor,
    order: float,
    atol: Tolerance,
    rtol: Tolerance,
    dtmax: float,
    direction: float = 1.0,
) -> tuple[Tensor, int, int]:
    """Per-sample starting step for SDEs, after StochasticDiffEq's ``sde_determine_initdt``.

    ``g_size(g)`` maps a diffusion value to the state's shape (identity for diagonal
    noise, a row norm for general noise).  ``direction = -1.0`` when time runs backwards
    (the probe is at ``t0 - dt0``).  Returns ``(dt (B,), nf, ng)``, step magnitudes.
    """
    with torch.no_grad():
        y0, f0 = y0.detach(), f0.detach()
        gs0 = 3 * g_size(g0.detach())
        scale = atol + rtol * y0.abs()
        d0 = _rms(y0 / scale)
        d1 = _rms(torch.maximum((f0 + gs0).abs(), (f0 - gs0).abs()) / scale)
        small = torch.full_like(t0, 1e-6)
        dt0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), small, (0.01 * d0 / d1.clamp_min(1e-300)).to(t0.dtype))
        dt0 = dt0.clamp(max=dtmax)
        y1 = y0 + expand_to(direction * dt0, y0).to(y0.dtype) * f0
        f1 = drift(t0 + direction * dt0, y1)
        gs1 = 3 * g_size(diffusion(t0 + direction * dt0, y1))
        dg_max = (gs0 - gs1).abs()
        df = f1 - f0
        d2 = _rms(torch.maximum((df + dg_max).abs(), (df - dg_max).abs()) / scale) / dt0.to(y0.dtype)
        m = torch.maximum(d1, d2).to(t0.dtype)
        dt1 = torch.where(
            m <= 1e-15,
            torch.maximum(small, dt0 * 1e-3),
            # 10^(-(2 + log10 m) / order) = exp(-(log 100 + log m) / order): layout-free
            torch.exp(-(math.log(100.0) + torch.log(m.clamp_min(1e-300))) / order),
        )
        dt = torch.minimum(torch.minimum(100 * dt0, dt1), torch.full_like(dt0, dtmax))
        dt = torch.where(torch.isfinite(dt) & (dt > 0), dt, small)
    return dt, 1, 1


def _g_size(terms: Terms) -> Callable[[Tensor], Tensor]:
    """A diffusion value's size in the state's shape (row norms for general noise)."""
    if terms.noise == "general":
        return lambda g: torch.sqrt(torch.sum(g * g, dim=-1))
    return lambda g: g


def initial_dt(
    terms: Terms,
    solver: AbstractSolver,
    t0: Tensor,
    y0: Tensor,
    f0: Tensor | None,
    g0: Tensor | None,
    atol: Tolerance,
    rtol: Tolerance,
    span: float,
    direction: float,
    dt: float | None,
    dtmin: float,
) -> tuple[Tensor, int, int]:
    """Every sample's first step magnitude ``(B,)`` float64, and the ``(nf, ng)`` it cost.

    ``dt`` given: that step.  Otherwise StochasticDiffEq's ``sde_determine_initdt`` for SDEs
    (:func:`sde_initial_dt`) or Hairer's ODE heuristic (:func:`hairer_initial_dt`) with the
    method's ``controller_order``, at most ``span``; both can return absurdly small steps on
    stiff problems (the exponent is divided by the order), so the result is at least
    ``max(100 dtmin, 1e-10 min(span, 1))``.  ``t0``: ``(B,)``; ``f0``/``g0``: the fields at
    ``(t0, y0)`` (``g0`` None for ODEs; both may be None when ``dt`` is given); ``direction``:
    ``-1.0`` when time runs backwards.
    """
    if dt is not None:
        return torch.full((y0.shape[0],), float(dt), dtype=torch.float64, device=y0.device), 0, 0
    assert f0 is not None
    order = solver.controller_order
    if g0 is not None:
        assert terms.diffusion is not None
        first, nf, ng = sde_initial_dt(
            terms.drift, terms.diffusion, _g_size(terms), t0, y0, f0, g0, order, atol, rtol, span, direction=direction
        )
        first = (first * solver.first_step_factor).clamp(max=span)
    else:
        first, nf = hairer_initial_dt(terms.drift, t0, y0, f0, order, atol, rtol, dtmax=span, direction=direction)
        ng = 0
    return first.clamp(min=max(100.0 * dtmin, 1e-10 * min(span, 1.0))), nf, ng
