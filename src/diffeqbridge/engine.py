"""The native integration loop.

Every sample has its own time ``t``, step ``dt``, accept/reject decision, save index and
return code.  Finished (or failed) samples are masked, not removed, so all tensors keep
the batch shape and the loop makes no host synchronisation except a termination check
every ``check_every`` iterations.  Steps are clipped to land exactly on the save times,
so SDE output needs no interpolation.  A rejected step re-queries the Brownian tree at
the shorter step; no noise is stored.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .brownian import VirtualBrownianTree
from .controller import PIController, scaled_error_norm
from .problem import Terms
from .solution import ReturnCode, Solution, Stats
from .solvers.base import AbstractSolver

SUCCESS = int(ReturnCode.Success)
DEFAULT = int(ReturnCode.Default)
CONVERGENCE_FAILURE = int(ReturnCode.ConvergenceFailure)
TERMINATED = int(ReturnCode.Terminated)


@dataclass
class EngineOptions:
    adaptive: bool
    atol: float
    rtol: float
    max_steps: int
    dtmin: float
    progress: bool = False
    check_every: int = 8
    # adaptive: consecutive Newton failures of a sample before ReturnCode.ConvergenceFailure
    max_convergence_failures: int = 10


class _Progress:
    """A small progress bar over the slowest sample's time (tqdm when installed)."""

    def __init__(self, enabled: bool, t0: float, t1: float):
        self.enabled = enabled
        self.t0, self.span = t0, t1 - t0
        self.bar: Any = None
        self.last = 0
        self.start = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=1000, desc="solve", unit="‰", leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, t_min: float, n_active: int) -> None:
        if not self.enabled:
            return
        done = int(1000 * min(max((t_min - self.t0) / self.span, 0.0), 1.0))
        if self.bar is not None:
            self.bar.update(done - self.last)
            self.bar.set_postfix(active=n_active, refresh=False)
        elif done - self.last >= 100 or n_active == 0:
            print(f"solve: {done / 10:5.1f}% ({n_active} active)", file=sys.stderr)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _select(mask: Tensor, new: Any, old: Any) -> Any:
    """``torch.where`` with a ``(B,)`` mask broadcast over trailing axes (tuples: per element)."""
    if isinstance(new, tuple):
        return tuple(_select(mask, a, b) for a, b in zip(new, old))
    return torch.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def _masked_lanes(active: Tensor, t: Tensor, step_dt: Tensor, sign: float, t_start: Tensor,
                  t_end: Tensor) -> tuple[Tensor, Tensor]:
    """The signed step the solver is called with (``(B,)`` float64), per sample.

    Active samples: ``sign * step_dt``.  Finished or failed samples are still computed
    (masked, their results discarded) but are held at their time ``t`` and must keep the
    user's functions inside ``tspan``: their step points forwards if it fits before ``t_end``,
    else backwards into the span (a sample that finished sits at ``t_end``), so every stage
    time ``t + c dt`` with ``0 <= c <= 1`` stays inside.  The step is non-zero, so no ``0/0``
    reaches a gradient.
    """
    ahead, behind = sign * (t_end - t), sign * (t - t_start)
    h = torch.where(step_dt > 0, step_dt, ahead.abs() + behind.abs())
    h = torch.minimum(h, torch.maximum(ahead, behind))
    masked = torch.where(ahead >= h, h, -h)
    return sign * torch.where(active, step_dt, masked)


def _all_finite(x: Tensor) -> Tensor:
    return torch.isfinite(x).flatten(1).all(dim=1)


def fixed_grid(a: float, b: float, dt: float) -> list[float]:
    """The points a fixed-step solve visits from ``a`` to ``b`` (``b < a``: time runs backwards;
    the loop's float arithmetic: ``t ± dt`` until the step would reach ``b`` within ``1e-12``
    relative, then ``b``).  ``dt > 0`` is the step's magnitude."""
    sign = 1.0 if b >= a else -1.0
    points = [a]
    t = a
    while True:
        remaining = sign * (b - t)
        if dt >= remaining * (1 - 1e-12):
            points.append(b)
            return points
        t = t + sign * dt
        points.append(t)


def _shared_grid(save_times: Tensor, dt_initial: Tensor, options: EngineOptions) -> list[float] | None:
    """The step times shared by every sample of a fixed-step solve (one host sync, before the
    loop), or None when the samples do not step in lockstep (adaptive, or per-sample ``dt``)."""
    if options.adaptive or dt_initial.numel() == 0:
        return None
    dt = dt_initial.to(torch.float64)
    if not bool((dt == dt[0]).all()):
        return None
    step, times = float(dt[0]), [float(x) for x in save_times]
    grid = [times[0]]
    for a, b in zip(times[:-1], times[1:]):
        grid.extend(fixed_grid(a, b, step)[1:])
        if len(grid) > options.max_steps + len(times):
            return None  # too long to list; the per-sample path handles MaxIters
    return grid


def integrate(
    terms: Terms,
    solver: AbstractSolver,
    y0: Tensor,
    save_times: Tensor,
    dt_initial: Tensor,
    options: EngineOptions,
    tree: VirtualBrownianTree | None,
    f0: Tensor | None = None,
    initial_counts: tuple[int, int] = (0, 0),
    observer: Any = None,
) -> Solution:
    """Integrate every sample from ``save_times[0]`` to ``save_times[-1]``.

    Args:
        terms: the problem's vector fields.
        solver: a solver instance.
        y0: ``(B, *state_shape)`` initial states at ``save_times[0]``.
        save_times: ``(T,)`` float64, strictly monotonic, ``save_times[0] = t0``; decreasing
            when time runs backwards (``t1 < t0``).
        dt_initial: ``(B,)`` float64 initial step sizes (magnitudes, > 0).
        options: tolerances, limits, flags.
        tree: the Brownian path (None for ODEs).
        f0: ``drift(t0, y0)`` for FSAL solvers.
        initial_counts: ``(nf, ng)`` already spent per sample (probing, initial dt).
        observer: ``solve(..., regularize=...)``'s recorder (:mod:`diffeqbridge.regularization`),
            called once per iteration after the controller; None otherwise.
    """
    batch, device, dtype = y0.shape[0], y0.device, y0.dtype
    n_save = save_times.shape[0]
    # time direction: step sizes are magnitudes here; solvers receive the signed step
    sign = 1.0 if n_save < 2 or float(save_times[-1]) >= float(save_times[0]) else -1.0
    t_start, t_end = save_times[0], save_times[-1]
    samples = torch.arange(batch, device=device)
    controller = PIController.for_solver(solver) if options.adaptive else None

    t = save_times[0].expand(batch).clone()
    y = y0
    dt = dt_initial.to(torch.float64)
    qold = torch.full((batch,), 1e-4, dtype=torch.float64, device=device)
    save_index = torch.ones(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    retcodes = torch.full((batch,), DEFAULT, dtype=torch.long, device=device)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    nf, ng = zeros + initial_counts[0], zeros + initial_counts[1]
    naccept, nreject = zeros.clone(), zeros.clone()

    ys = torch.full((n_save, *y0.shape), float("nan"), dtype=dtype, device=device)
    ys[0] = y0
    if n_save == 1:
        active = torch.zeros_like(active)
        retcodes = torch.full_like(retcodes, SUCCESS)
    # Fixed step: every active sample is at grid[i] at iteration i, so the Brownian tree is
    # queried once per step at a time shared by the batch (tree.evaluate_scalar: same numbers,
    # cached descent) and the loop stops right after the last step.
    # (events hook: an event that moves a sample back inside its step breaks the lockstep)
    lockstep = getattr(observer, "lockstep", True)
    grid = _shared_grid(save_times, dt_initial, options) if tree is not None and lockstep else None
    save_set = {float(x) for x in save_times} if grid is not None else set()
    if tree is None:
        tree_state = None
    elif grid is not None:
        tree_state = tree.evaluate_scalar(grid[0], levy=solver.needs_levy_area)
    else:
        tree_state = tree.evaluate(t)
    if solver.fsal:
        f0 = solver.initial_carry(terms, t, y0, f0)
    progress = _Progress(options.progress, float(save_times[0]), float(save_times[-1]))
    solver.begin(y0)
    newton_streak = zeros.clone()  # consecutive Newton failures per sample
    eigen_last: Tensor | None = None  # stiffness estimates (solvers that report them)
    eigen_max: Tensor | None = None
    njac: Tensor | None = None  # Jacobian evaluations (implicit solvers)

    iteration = 0
    while True:
        if grid is not None and iteration == len(grid) - 1:
            break  # every sample has reached the end or stopped earlier
        if iteration % options.check_every == 0:
            n_active = int(active.sum())
            progress.update(float(sign * (sign * torch.where(active, t, t_end)).min()), n_active)
            if n_active == 0:
                break
        iteration += 1

        target = save_times[save_index.clamp(max=n_save - 1)]
        remaining = sign * (target - t)
        hits = active & (dt >= remaining * (1 - 1e-12))
        step_dt = torch.where(hits, remaining, dt)
        t_new = torch.where(hits, target, t + sign * step_dt)
        t_new = torch.where(active, t_new, t)
        dt_eval = _masked_lanes(active, t, step_dt, sign, t_start, t_end)

        if tree is not None:
            assert tree_state is not None
            if grid is not None and not solver.needs_levy_area:
                # W only: dW = W(t_new) - W(t) as increment_from computes it, no Lévy area
                new_tree_state = tree.evaluate_scalar(grid[iteration], levy=False)
                dw, levy = tree._shape_out(new_tree_state[0] - tree_state[0]).to(dtype), None
            else:
                new_tree_state = tree.evaluate(t_new) if grid is None else tree.evaluate_scalar(grid[iteration])
                dw, levy = tree.increment_from(t, tree_state, t_new, new_tree_state)
                dw, levy = dw.to(dtype), levy.to(dtype)
        else:
            new_tree_state, dw, levy = None, None, None

        out = solver.step(terms, t, y, dt_eval.to(dtype), dw, levy if solver.needs_levy_area else None, f0)
        y1 = out.y1
        finite = _all_finite(y1)
        if controller is not None:
            assert out.error is not None
            # the controller is not differentiated: step sizes carry no gradient
            err = scaled_error_norm(out.error.detach(), y.detach(), y1.detach(), options.atol, options.rtol).to(torch.float64)
            err = torch.where(finite & torch.isfinite(err), err, torch.full_like(err, float("inf")))
            accepted = active & (err <= 1.0)
        else:
            err = None
            accepted = active & finite
        rejected = active & ~accepted
        newton_failed = active & ~out.converged if out.converged is not None else None
        if out.njac is not None:
            njac = (njac if njac is not None else zeros) + active * out.njac
        if out.stiffness is not None:
            rho = out.stiffness.detach().to(torch.float64)
            eigen_last = torch.where(accepted, rho, eigen_last if eigen_last is not None else torch.zeros_like(rho))
            eigen_max = torch.maximum(eigen_max, eigen_last) if eigen_max is not None else eigen_last
        dt_factor = solver.after_step(accepted, active, torch.where(accepted, t_new, t), dt_eval.abs(), out)

        nf = nf + active * out.nf
        ng = ng + active * out.ng
        naccept = naccept + accepted
        nreject = nreject + rejected

        y_prev, t_prev, f_prev = y, t, f0
        y = _select(accepted, y1, y)
        t = torch.where(accepted, t_new, t)
        if grid is not None:
            tree_state = new_tree_state  # lockstep: a stopped sample never moves again
        elif tree_state is not None and new_tree_state is not None:
            tree_state = (
                _select(accepted, new_tree_state[0], tree_state[0]),
                _select(accepted, new_tree_state[1], tree_state[1]),
            )
        if solver.fsal and out.f1 is not None and f0 is not None:
            f0 = _select(accepted, out.f1, f0)
        # --- events hook (diffeqbridge.events): may move samples back to an event time inside
        # the step, change their state (f0 / Brownian state refreshed) and stop them; a cut
        # step saves nothing (hits cleared)
        stopped = None
        if observer is not None and hasattr(observer, "after_merge"):
            y, t, f0, tree_state, hits, stopped = observer.after_merge(
                t_prev, y_prev, t, y, f0, tree_state, accepted, hits, out, f_prev, dt_eval, tree)

        saved_now = accepted & hits
        slot = save_index.clamp(max=n_save - 1)
        if grid is None or grid[iteration] in save_set:  # lockstep: nobody saves between save times
            ys[slot, samples] = _select(saved_now, y, ys[slot, samples])
        save_index = save_index + saved_now
        finished = saved_now & (save_index >= n_save)
        retcodes = torch.where(finished, torch.full_like(retcodes, SUCCESS), retcodes)
        active = active & ~finished
        if stopped is not None:  # events hook: a terminating event
            retcodes = torch.where(stopped, torch.full_like(retcodes, TERMINATED), retcodes)  # even at t1
            active = active & ~stopped

        if controller is not None:
            assert err is not None
            proposed, qold = controller.propose(step_dt, err, qold, accepted)
            # After a step clipped to a save time, keep the unclipped proposal if larger.
            proposed = torch.where(accepted & hits, torch.maximum(proposed, dt), proposed)
            if dt_factor is not None:  # a composite solver switched method
                proposed = proposed * dt_factor
            dt = torch.where(active, proposed, dt)
            too_small = active & (dt < options.dtmin)  # as SciML: on accepted steps too
            retcodes = torch.where(too_small, torch.full_like(retcodes, int(ReturnCode.DtLessThanMin)), retcodes)
            active = active & ~too_small
            if newton_failed is not None:
                # a Newton failure rejects the step (NaN proposal -> dt shrinks by qmin); a
                # sample that keeps failing, or underflows dtmin doing so, stops here
                newton_streak = torch.where(newton_failed, newton_streak + 1, torch.where(accepted, 0, newton_streak))
                gave_up = newton_failed & (too_small | (active & (newton_streak >= options.max_convergence_failures)))
                retcodes = torch.where(gave_up, torch.full_like(retcodes, CONVERGENCE_FAILURE), retcodes)
                active = active & ~gave_up
        else:
            unstable = rejected
            code = torch.full_like(retcodes, int(ReturnCode.Unstable))
            if newton_failed is not None:  # fixed step: a Newton failure ends the sample (as SciML)
                code = torch.where(newton_failed, torch.full_like(retcodes, CONVERGENCE_FAILURE), code)
            retcodes = torch.where(unstable, code, retcodes)
            active = active & ~unstable
        if observer is not None:
            observer.observe(t_prev, y_prev, t_new, step_dt, out, accepted | rejected, accepted, dt, f_prev)

        out_of_steps = active & (naccept + nreject >= options.max_steps)
        retcodes = torch.where(out_of_steps, torch.full_like(retcodes, int(ReturnCode.MaxIters)), retcodes)
        active = active & ~out_of_steps

    if grid is not None:
        progress.update(float(save_times[-1]), 0)
    progress.close()
    stats = Stats(nf=nf, ng=ng, naccept=naccept, nreject=nreject)
    if eigen_last is not None and eigen_max is not None:
        stats.extra["eigen_est"], stats.extra["max_eigen_est"] = eigen_last, eigen_max
    if njac is not None:
        stats.extra["njac"] = njac
    stats.extra.update(solver.extra_stats())
    return Solution(ts=save_times.to(dtype), ys=ys, stats=stats, retcodes=retcodes, alg=solver)
