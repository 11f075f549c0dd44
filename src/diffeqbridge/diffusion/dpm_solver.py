"""DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE.

References: Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver: A Fast ODE Solver for Diffusion
Probabilistic Model Sampling in Around 10 Steps" (NeurIPS 2022) and "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models" (2022b).

With ``lambda = log(alpha / sigma)`` and ``h = lambda_t - lambda_s > 0`` (sampling runs
towards larger ``lambda``), the probability-flow ODE has the exact solution (Lu et al.
2022, Eq. 3.4; 2022b, Eq. 9)::

    noise prediction (DPM-Solver):   x_t = (alpha_t/alpha_s) x_s - sigma_t int_0^h e^{h-u} eps(lambda_s+u) du
    data prediction (DPM-Solver++):  x_t = (sigma_t/sigma_s) x_s + alpha_t int_0^h e^{u-h} x0(lambda_s+u) du

Expanding the prediction ``f`` in ``u`` gives, for both, ``x_t = L x_s + c [phi0 f + phi1
(h f') + phi2 (h^2 f'') + ...]`` with (``E = expm1``)::

    DPM-Solver:    L = alpha_t/alpha_s,  c = -sigma_t,  phi0 = E(h),   phi1 = (E(h) - h)/h,   phi2 = (E(h) - h - h^2/2)/h^2
    DPM-Solver++:  L = sigma_t/sigma_s,  c =  alpha_t,  phi0 = -E(-h), phi1 = (h + E(-h))/h,  phi2 = (h^2/2 - h - E(-h))/h^2

and the solvers differ in how ``h f'`` and ``h^2 f''`` are estimated:

* singlestep order 2 (DPM-Solver-2 / DPM-Solver++(2S)): one intermediate point at
  ``lambda_s + r1 h`` (``r1 = 1/2``), ``h f' ~ (f(u1) - f0) / r1`` with the ``phi0/2`` weight
  of the papers' Algorithms (DPM-Solver Alg. 1, DPM-Solver++ Alg. 1);
* singlestep order 3 (DPM-Solver-3): points at ``r1 = 1/3``, ``r2 = 2/3`` (DPM-Solver Alg. 2);
* multistep (DPM-Solver++ Alg. 2): backward differences of the previous predictions; order 2
  with ``phi0 / (2 r)``, order 3 with divided differences ``D1 ~ h f'``, ``D2 ~ h^2 f''/2``;
* the SDE variant SDE-DPM-Solver++(2M) (2022b, Appendix; the reverse SDE's exact linear
  part): ``x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) (f0 + D/2)
  + sigma_t sqrt(1 - e^{-2h}) z`` with ``D ~ h f'`` from the previous step and ``z``
  per-sample noise from ``(seed, step)``;
* the adaptive solver (DPM-Solver Sec. 3.4 / Appendix C): an embedded pair, orders 1-2
  (DPM-Solver-12) or 2-3 (DPM-Solver-23, the order-2 member at ``r1 = 1/3`` so it shares the
  first evaluation), error ``E = RMS((x_high - x_low) / max(atol, rtol max(|x_low|, |x_s|)))``
  and the paper's ``h <- min(theta h E^{-1/order}, lambda_end - lambda_s)`` (``controller=
  "paper"``) or, by default, the engine's PI controller (:class:`~diffeqbridge.controller.
  PIController`; on the benchmark's mixtures it rejects about 5x fewer steps and reaches a
  given error with equal or fewer evaluations).  Here ``E``, ``h`` and the acceptance are
  **per sample** (the reference implementations use one norm for the whole batch), and only
  the samples still running are passed to the model.
* the variable-step multistep solver (``variant="adaptive_multistep"``; not in the papers):
  DPM-Solver(++)(2M) with per-sample steps, the 2M coefficients taking ``r = h_prev / h``
  per sample, and error estimate ``3M - 2M`` (the third divided difference, free from the
  history); ``order=3`` advances with the 3M result (local extrapolation), ``order=2`` with
  2M.  The estimate is a function of the proposed ``h`` only, so a rejection costs no model
  call: one call per accepted step (none after the last), one at ``T``.  The first step is
  first order with ``h_init``, the second uses ``2M - 1`` as its estimate.

Budgets (``steps`` = model evaluations per sample), as DPM-Solver's reference code
(``get_orders_and_timesteps_for_singlestep_solver``): singlestep order 3 with
``lower_order_final=True`` splits ``steps`` into ``[3, ..., 3, 2, 1]`` / ``[3, ..., 3, 1]`` /
``[3, ..., 3, 2]`` by ``steps mod 3`` (order 2 likewise); with ``lower_order_final=False``
it takes ``steps // order`` steps of order ``order``.  Multistep takes ``steps`` steps, the
first ones at lower order (warm-up) and, with ``lower_order_final``, the last ones too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..controller import QOLD_INIT, PIController
from ..problem import expand_to
from ..solution import ReturnCode, Solution, Stats
from .common import STREAMS, grid_solution, per_sample_normal
from .grids import (
    Point,
    at_time,
    check_skip_type,
    evaluations_per_call,
    point,
    t_of_lam,
    time_grid,
)

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")
VARIANTS = ("singlestep", "multistep", "adaptive", "adaptive_multistep")
CONTROLLERS = ("pi", "paper")
Predictor = Callable[[Tensor, Tensor], Tensor]  # f(x (B, ...), t (B,) or (1,) float64) -> x's shape


class Coef(NamedTuple):
    """Step coefficients from ``s`` to ``t``, each ``(B,)`` float64 (see the module docstring)."""

    h: Tensor
    L: Tensor
    c: Tensor
    phi0: Tensor
    phi1: Tensor
    phi2: Tensor


def coefficients(s: Point, t: Point, algorithm: str) -> Coef:
    """:class:`Coef` of the exponential integrator from ``s`` to ``t`` for ``algorithm``."""
    h = t.lam - s.lam
    if algorithm == "dpmsolver":
        e = torch.expm1(h)
        return Coef(h, t.alpha / s.alpha, -t.sigma, e, (e - h) / h, (e - h - 0.5 * h * h) / (h * h))
    e = torch.expm1(-h)
    if algorithm == "sde-dpmsolver++":
        e2 = torch.expm1(-2.0 * h)  # integrating factor of the reverse SDE: e^{-2(h-u)}
        return Coef(h, t.sigma / s.sigma * torch.exp(-h), t.alpha, -e2, 1.0 + e2 / (2.0 * h), torch.zeros_like(h))
    return Coef(h, t.sigma / s.sigma, t.alpha, -e, (h + e) / h, (0.5 * h * h - h - e) / (h * h))


def _bc(v: Tensor, x: Tensor) -> Tensor:
    return expand_to(v.to(x.dtype), x)


def first_order(x: Tensor, f0: Tensor, co: Coef) -> Tensor:
    """DDIM / DPM-Solver-1 / DPM-Solver++(1): ``L x + c phi0 f0``."""
    return _bc(co.L, x) * x + _bc(co.c * co.phi0, x) * f0


def _sub_point(sde: Any, s: Point, t: Point, r: float, bounds: tuple[float, float]) -> Point:
    """The point at ``lambda_s + r (lambda_t - lambda_s)``."""
    return point(sde, t_of_lam(sde, s.lam + r * (t.lam - s.lam), *bounds))


def singlestep_2(
    fn: Predictor,
    sde: Any,
    x: Tensor,
    f0: Tensor,
    s: Point,
    t: Point,
    algorithm: str,
    bounds: tuple[float, float],
    r1: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """DPM-Solver-2 / DPM-Solver++(2S) from ``s`` to ``t`` (one model call at ``lambda_s + r1 h``).

    Returns ``(x_2, x_1)``: the second-order result and the first-order one (free).
    """
    co = coefficients(s, t, algorithm)
    s1 = _sub_point(sde, s, t, r1, bounds)
    u1 = first_order(x, f0, coefficients(s, s1, algorithm))
    x1 = first_order(x, f0, co)
    return x1 + _bc(co.c * co.phi0 / (2.0 * r1), x) * (fn(u1, s1.t) - f0), x1


def singlestep_3(
    fn: Predictor,
    sde: Any,
    x: Tensor,
    f0: Tensor,
    s: Point,
    t: Point,
    algorithm: str,
    bounds: tuple[float, float],
    r1: float = 1.0 / 3.0,
    r2: float = 2.0 / 3.0,
) -> tuple[Tensor, Tensor]:
    """DPM-Solver-3 from ``s`` to ``t`` (model calls at ``lambda_s + r1 h`` and ``+ r2 h``).

    Returns ``(x_3, x_2)``: the third-order result and DPM-Solver-2 at ``r1`` (same calls).
    """
    co = coefficients(s, t, algorithm)
    s1, s2 = _sub_point(sde, s, t, r1, bounds), _sub_point(sde, s, t, r2, bounds)
    d1 = fn(first_order(x, f0, coefficients(s, s1, algorithm)), s1.t) - f0
    co2 = coefficients(s, s2, algorithm)
    u2 = first_order(x, f0, co2) + _bc(co2.c * co2.phi1 * (r2 / r1), x) * d1
    d2 = fn(u2, s2.t) - f0
    x1 = first_order(x, f0, co)
    return x1 + _bc(co.c * co.phi1 / r2, x) * d2, x1 + _bc(co.c * co.phi0 / (2.0 * r1), x) * d1


def multistep(x: Tensor, fs: list[Tensor], hs: list[Tensor], co: Coef, order: int) -> Tensor:
    """One multistep update of ``order`` from the newest predictions ``fs = [f0, f1, f2]`` (at
    ``lambda_s``, ``lambda_s - hs[0]``, ``lambda_s - hs[0] - hs[1]``)."""
    out = first_order(x, fs[0], co)
    if order == 1:
        return out
    r0 = hs[0] / co.h
    if order == 2:
        return out + _bc(co.c * co.phi0 / (2.0 * r0), x) * (fs[0] - fs[1])
    r1 = hs[1] / co.h
    d1_0 = (fs[0] - fs[1]) / _bc(r0, x)
    d1_1 = (fs[1] - fs[2]) / _bc(r1, x)
    d1 = d1_0 + _bc(r0 / (r0 + r1), x) * (d1_0 - d1_1)  # ~ h f'
    d2 = (d1_0 - d1_1) / _bc(r0 + r1, x)  # ~ h^2 f'' / 2
    return out + _bc(co.c * co.phi1, x) * d1 + _bc(2.0 * co.c * co.phi2, x) * d2


def singlestep_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Orders of the singlestep steps that spend ``steps`` model evaluations (module docstring)."""
    if not lower_order_final or order == 1:
        return [order] * (steps // order)
    k, rest = divmod(steps, order)
    if order == 2:
        return [2] * k + [1] * rest
    if rest == 0:
        return [3] * (k - 1) + [2, 1] if k >= 1 else []
    return [3] * k + [rest]


# ----------------------------------------------------------------------------- validation
def _check_options(
    order: Any,
    algorithm: Any,
    variant: Any,
    skip_type: Any,
    steps: int | None,
    atol: Any,
    rtol: Any,
    h_init: Any,
    theta: Any,
    max_steps: Any,
    lower_order_final: Any,
    controller: Any,
) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}; got {algorithm!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    allowed = {"singlestep": (1, 2, 3), "multistep": (1, 2, 3), "adaptive": (2, 3), "adaptive_multistep": (2, 3)}[variant]
    if algorithm == "sde-dpmsolver++":
        if variant != "multistep":
            raise ValueError(f"algorithm='sde-dpmsolver++' is multistep only (SDE-DPM-Solver++(1/2M)); got variant={variant!r}")
        allowed = (1, 2)
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"order must be one of {allowed} for variant={variant!r}, algorithm={algorithm!r}; got {order!r}")
    check_skip_type(skip_type)
    if not isinstance(lower_order_final, bool):
        raise TypeError(f"lower_order_final must be a bool; got {type(lower_order_final).__name__}")
    if variant.startswith("adaptive"):
        if steps is not None:
            raise ValueError(f"steps does not apply to variant={variant!r} (use atol/rtol); leave it None")
        for name, value in (("atol", atol), ("rtol", rtol), ("h_init", h_init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta <= 1:
            raise ValueError(f"theta must be a number in (0, 1]; got {theta!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int; got {max_steps!r}")
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}; got {controller!r}")
    elif steps is not None and variant == "singlestep" and not singlestep_orders(steps, order, lower_order_final):
        raise ValueError(f"steps={steps} is less than order={order}: no singlestep step fits the budget")


def _predictor(adapter: Any, algorithm: str) -> Predictor:
    pred = adapter.eps if algorithm == "dpmsolver" else adapter.x0
    return lambda x, t: pred(x, t.to(x.dtype).expand(x.shape[0]))


# ----------------------------------------------------------------------------- samplers
def sample_dpm_solver(
    adapter: Any,
    sde: Any,
    x_T: Tensor,
    *,
    t_end: float,
    steps: int | None,
    seed: int = 0,
    order: int = 2,
    algorithm: str = "dpmsolver++",
    variant: str = "multistep",
    skip_type: str = "logSNR",
    lower_order_final: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    h_init: float = 0.05,
    theta: float = 0.9,
    max_steps: int = 10_000,
    save_trajectory: bool = False,
    controller: str = "pi",
    sensealg: Any = None,
) -> Solution:
    """DPM-Solver / DPM-Solver++ from ``sde.T`` down to ``t_end``.

    Args:
        adapter: a :class:`~diffeqbridge.diffusion.ModelAdapter` (``.eps``/``.x0`` of ``(B, *shape)``
            states at ``(B,)`` times).
        sde: the forward process.
        x_T: ``(B, *shape)`` states at ``T``.
        t_end: final time.
        steps: model evaluations per sample (fixed-grid variants; default 20).
        seed: noise seed of ``"sde-dpmsolver++"`` (sample ``i`` depends on ``(seed, i)`` only).
        order: 1, 2, 3 (adaptive: 2 -> DPM-Solver-12, 3 -> DPM-Solver-23; adaptive_multistep:
            2 -> advance with 2M, 3 -> with 3M).
        algorithm: ``"dpmsolver"`` (noise prediction), ``"dpmsolver++"`` (data prediction),
            ``"sde-dpmsolver++"`` (SDE-DPM-Solver++, multistep orders 1-2).
        variant: ``"singlestep"``, ``"multistep"``, ``"adaptive"`` (the paper's singlestep pairs)
            or ``"adaptive_multistep"`` (variable-step 2M/3M, one call per accepted step).
        skip_type: ``"logSNR"``, ``"time_uniform"`` or ``"time_quadratic"`` time grid.
        lower_order_final: lower orders at the last steps (see the module docstring).
        atol, rtol: adaptive tolerances (defaults 0.0078 and 0.05 as the DPM-Solver paper).
        h_init, theta: adaptive initial step in ``lambda`` and safety factor.
        controller: adaptive step-size rule: ``"pi"`` (default; the engine's PI controller,
            ``beta1 = 0.7/order``, ``beta2 = 0.4/order``, growth at most 10x, shrink at most 5x)
            or ``"paper"`` (``h <- min(theta h E^(-1/order), ...)``, unbounded growth).
            ``"adaptive_multistep"`` always uses the PI controller (with ``order = 3``).
        max_steps: adaptive step attempts per sample before ``ReturnCode.MaxIters``.
        save_trajectory: save the states at every outer grid time (fixed grids).
        sensealg: must be ``None``: gradients flow by autograd through the loop.

    Returns:
        :class:`~diffeqbridge.Solution`; ``ys[-1]`` ``(B, *shape)`` the samples at ``t_end``,
        ``stats.nf`` model evaluations per sample.
    """
    atol = 0.0078 if atol is None else atol
    rtol = 0.05 if rtol is None else rtol
    _check_options(
        order, algorithm, variant, skip_type, steps, atol, rtol, h_init, theta, max_steps, lower_order_final, controller
    )
    if sensealg is not None:
        raise ValueError("method='dpm_solver' is differentiated by autograd through its loop; pass sensealg=None")
    fn = _predictor(adapter, algorithm)
    per_call = evaluations_per_call(adapter)
    bounds = (float(t_end), float(sde.T))
    if variant.startswith("adaptive"):
        run = _adaptive if variant == "adaptive" else _adaptive_multistep
        sol = run(
            fn, sde, x_T, order, algorithm, bounds, float(atol), float(rtol), float(h_init), float(theta), max_steps, controller
        )
        sol.stats.nf = sol.stats.nf * per_call
        return sol
    steps = 20 if steps is None else steps
    if variant == "singlestep":
        orders = singlestep_orders(steps, order, lower_order_final)
    else:
        orders = [min(order, i + 1, steps - i if lower_order_final else order) for i in range(steps)]
    ts = time_grid(sde, float(sde.T), float(t_end), len(orders), skip_type, device=x_T.device)
    sol = _fixed(fn, sde, x_T, ts, orders, variant, algorithm, bounds, seed, save_trajectory)
    sol.stats.nf = sol.stats.nf * per_call
    return sol


def _fixed(
    fn: Predictor,
    sde: Any,
    x: Tensor,
    ts: Tensor,
    orders: list[int],
    variant: str,
    algorithm: str,
    bounds: tuple[float, float],
    seed: int,
    save_trajectory: bool,
) -> Solution:
    batch = x.shape[0]
    saved = [x]
    grid = point(sde, ts)  # (K+1,): every sample shares the grid; steps use (1,) slices
    fs: list[Tensor] = []
    hs: list[Tensor] = []
    nf = 0
    for i, k in enumerate(orders):
        s, t = grid.select(ts.new_tensor([i], dtype=torch.long)), grid.select(ts.new_tensor([i + 1], dtype=torch.long))
        f0 = fn(x, s.t)
        nf += k if variant == "singlestep" else 1
        if variant == "singlestep":
            if k == 1:
                x = first_order(x, f0, coefficients(s, t, algorithm))
            elif k == 2:
                x = singlestep_2(fn, sde, x, f0, s, t, algorithm, bounds)[0]
            else:
                x = singlestep_3(fn, sde, x, f0, s, t, algorithm, bounds)[0]
        else:
            co = coefficients(s, t, algorithm)
            fs, x_prev = [f0] + fs[:2], x
            x = multistep(x_prev, fs, hs, co, k)
            if algorithm == "sde-dpmsolver++":
                z = per_sample_normal(tuple(x.shape), seed, STREAMS["sampler"] + i, dtype=x.dtype, device=x.device)
                x = x + _bc(t.sigma * torch.sqrt(-torch.expm1(-2.0 * co.h)), x) * z
            hs = [co.h] + hs[:1]
        if save_trajectory:
            saved.append(x)
    if not save_trajectory:
        saved.append(x)
        ts = ts[[0, -1]]
    nf_t = torch.full((batch,), nf, dtype=torch.long, device=x.device)
    return grid_solution(ts, torch.stack(saved), nf_t, len(orders), alg=f"dpm_solver:{algorithm}:{variant}")


def error_norm(x_high: Tensor, x_low: Tensor, x_prev: Tensor, atol: float, rtol: float) -> Tensor:
    """DPM-Solver's adaptive error per sample: ``RMS((x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|)))``,
    ``(B, ...) -> (B,)`` float64 (Lu et al. 2022, Appendix C; the paper's ``delta`` uses ``max``, not a sum)."""
    delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
    return ((x_high - x_low) / delta).double().square().flatten(1).mean(dim=1).sqrt()


def _adaptive(
    fn: Predictor,
    sde: Any,
    x: Tensor,
    order: int,
    algorithm: str,
    bounds: tuple[float, float],
    atol: float,
    rtol: float,
    h_init: float,
    theta: float,
    max_steps: int,
    controller: str,
) -> Solution:
    """Per-sample adaptive DPM-Solver-12 / -23 (module docstring); only running samples are evaluated."""
    t_end, t_start = bounds
    batch, device = x.shape[0], x.device
    x0, x = x, x.clone()
    lam_end = float(sde.log_snr(torch.tensor([t_end], dtype=torch.float64, device=device))[0])
    t_s = at_time(t_start, batch, device)
    h = torch.full((batch,), h_init, dtype=torch.float64, device=device)
    running = torch.ones(batch, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tiny = torch.zeros(batch, dtype=torch.bool, device=device)
    nf = torch.zeros(batch, dtype=torch.long, device=device)
    naccept, nreject = torch.zeros_like(nf), torch.zeros_like(nf)
    step = singlestep_2 if order == 2 else singlestep_3
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    h_min = 1e-12 * max(1.0, abs(lam_end))  # below this a step cannot move lambda: give up
    pi = None if controller == "paper" else PIController(beta1=0.7 / order, beta2=0.4 / order, qmin=0.2, qmax=10.0, gamma=theta)
    qold = torch.full((batch,), QOLD_INIT, dtype=torch.float64, device=device)
    while True:
        idx = running.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xs, s = x[idx], point(sde, t_s[idx])
        remaining = lam_end - s.lam
        h_try = torch.minimum(h[idx], remaining)
        last = h_try >= remaining
        t = point(sde, torch.where(last, torch.full_like(h_try, t_end), t_of_lam(sde, s.lam + h_try, *bounds)))
        f0 = fn(xs, s.t)
        x_high, x_low = step(fn, sde, xs, f0, s, t, algorithm, bounds, r1)
        err = error_norm(x_high, x_low, xs, atol, rtol).detach()  # steps are not differentiated (as diffrax)
        finite = torch.isfinite(err)
        accept = finite & (err <= 1.0)
        x[idx] = torch.where(expand_to(accept, xs), x_high, xs)
        t_s[idx] = torch.where(accept, t.t, s.t)
        if pi is None:  # the paper's rule
            h_new = theta * h_try * torch.pow(err.clamp_min(1e-16), -1.0 / order)
            h[idx] = torch.where(finite, h_new, 0.2 * h_try)
        else:
            h_new, qold[idx] = pi.propose(h_try, torch.where(finite, err, torch.full_like(err, math.inf)), qold[idx], accept)
            h[idx] = h_new
        nf[idx] += order
        naccept[idx] += accept.long()
        nreject[idx] += (~accept).long()
        finished = accept & last
        done[idx] = finished
        tiny[idx] = h[idx] < h_min
        running[idx] = ~finished & (naccept[idx] + nreject[idx] < max_steps) & ~tiny[idx]
    return _adaptive_solution(x0, x, done, tiny, nf, naccept, nreject, bounds, f"dpm_solver:{algorithm}:adaptive{order}")


def _adaptive_solution(
    x0: Tensor,
    final: Tensor,
    done: Tensor,
    tiny: Tensor,
    nf: Tensor,
    naccept: Tensor,
    nreject: Tensor,
    bounds: tuple[float, float],
    alg: str,
) -> Solution:
    """Solution of an adaptive run: ``Success`` where finished, ``DtLessThanMin`` where the step
    collapsed, ``MaxIters`` otherwise."""
    codes = torch.where(done, int(ReturnCode.Success), torch.where(tiny, int(ReturnCode.DtLessThanMin), int(ReturnCode.MaxIters)))
    stats = Stats(nf=nf, ng=torch.zeros_like(nf), naccept=naccept, nreject=nreject)
    ts = torch.tensor([bounds[1], bounds[0]], dtype=final.dtype, device=final.device)
    return Solution(ts=ts, ys=torch.stack([x0, final]), stats=stats, retcodes=codes.long(), alg=alg)


MAX_SHRINKS = 12  # rejected multistep proposals retried per iteration (no model call needed)


def _adaptive_multistep(
    fn: Predictor,
    sde: Any,
    x: Tensor,
    order: int,
    algorithm: str,
    bounds: tuple[float, float],
    atol: float,
    rtol: float,
    h_init: float,
    theta: float,
    max_steps: int,
    controller: str,
) -> Solution:
    """Per-sample variable-step multistep DPM-Solver(++) (module docstring): one model call per
    accepted step; a rejected proposal costs none (the estimate is a function of ``h``)."""
    del controller  # always the PI controller
    t_end, t_start = bounds
    batch, device = x.shape[0], x.device
    x0, x = x, x.clone()
    lam_end = float(sde.log_snr(torch.tensor([t_end], dtype=torch.float64, device=device))[0])
    t_s = at_time(t_start, batch, device)
    hist = fn(x0, t_s).unsqueeze(0).repeat(3, *[1] * x.ndim)  # f0, f1, f2: newest first (x0: x is updated in place)
    hs = torch.zeros(2, batch, dtype=torch.float64, device=device)  # the two previous step sizes
    nhist = torch.zeros(batch, dtype=torch.long, device=device)
    h = torch.full((batch,), h_init, dtype=torch.float64, device=device)
    qold = torch.full((batch,), QOLD_INIT, dtype=torch.float64, device=device)
    pi = PIController(beta1=0.7 / 3, beta2=0.4 / 3, qmin=0.2, qmax=10.0, gamma=theta)  # 2M's local error ~ h^3
    running = torch.ones(batch, dtype=torch.bool, device=device)
    done, tiny = torch.zeros_like(running), torch.zeros_like(running)
    nf = torch.ones(batch, dtype=torch.long, device=device)
    naccept, nreject = torch.zeros_like(nf), torch.zeros_like(nf)
    h_min = 1e-12 * max(1.0, abs(lam_end))
    while True:
        idx = running.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xs, s, fs, nh = x[idx], point(sde, t_s[idx]), list(hist[:, idx]), nhist[idx]
        remaining, hq, q = lam_end - s.lam, h[idx], qold[idx]
        got = torch.zeros_like(nh, dtype=torch.bool)
        out = (xs, s.t, hq, q, torch.zeros_like(got), hq)
        for _ in range(MAX_SHRINKS):
            h_try = torch.minimum(hq, remaining)
            last = h_try >= remaining
            t = point(sde, torch.where(last, torch.full_like(h_try, t_end), t_of_lam(sde, s.lam + h_try, *bounds)))
            co = coefficients(s, t, algorithm)
            prev = [torch.where(nh >= k, hs[k - 1, idx], co.h) for k in (1, 2)]  # finite stand-ins before warm-up
            x1, x2, x3 = (multistep(xs, fs, prev, co, k) for k in (1, 2, 3))
            warm1, warm2 = expand_to(nh >= 1, xs), expand_to(nh >= 2, xs)
            new, ref = torch.where(warm1, x2, x1), torch.where(warm2, x3, x1)  # estimate: 3M - 2M (2M - 1 at warm-up)
            err = torch.where(nh == 0, torch.zeros_like(hq), error_norm(new, ref, xs, atol, rtol).detach())
            if order == 3:
                new = torch.where(warm2, x3, new)  # local extrapolation
            acc = torch.isfinite(err) & (err <= 1.0)
            h_new, q_new = pi.propose(h_try, torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf)), q, acc)
            take = acc & ~got
            out = tuple(
                torch.where(expand_to(take, a), b, a) for a, b in zip(out, (new, t.t, h_new, q_new, last, co.h), strict=True)
            )
            nreject[idx] += (~acc & ~got).long()
            got = got | acc
            hq = torch.where(got, hq, h_new)
            if bool(got.all()) or bool((hq[~got] < h_min).all()):
                break
        x_new, t_new, h_next, q_next, last, h_taken = out
        x[idx], t_s[idx] = x_new, t_new
        h[idx], qold[idx] = torch.where(got, h_next, hq), q_next
        naccept[idx] += got.long()
        finished = got & last
        done[idx] = finished
        tiny[idx] = ~got & (hq < h_min)
        more = idx[got & ~last]  # accepted, not finished: the next step needs the prediction here
        if more.numel():
            hist[:, more] = torch.cat([fn(x[more], t_s[more]).unsqueeze(0), hist[:2, more]])
            hs[:, more] = torch.stack([h_taken[got & ~last], hs[0, more]])
            nhist[more] += 1
            nf[more] += 1
        running[idx] = ~finished & ~tiny[idx] & (naccept[idx] + nreject[idx] < max_steps)
    return _adaptive_solution(
        x0, x, done, tiny, nf, naccept, nreject, bounds, f"dpm_solver:{algorithm}:adaptive_multistep{order}"
    )
