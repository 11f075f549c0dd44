"""The native integration loop.

Every sample has its own time ``t``, step ``dt``, accept/reject decision, save index and
return code.  Finished (or failed) samples are masked, not removed, so all tensors keep
the batch shape and the loop makes no host synchronisation except a termination check
every ``check_every`` iterations.  Steps are clipped to land exactly on the save times,
so SDE output needs no interpolation.  A rejected step re-queries the Brownian tree at
the shorter step; no noise is stored.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .brownian import VirtualBrownianTree
from .controller import QOLD_INIT, PIController, scaled_error_norm
from .problem import Terms
from .solution import ReturnCode, Solution, Stats
from .solvers.base import AbstractSolver, StepOutput, per_unit_step

SUCCESS = int(ReturnCode.Success)
DEFAULT = int(ReturnCode.Default)
CONVERGENCE_FAILURE = int(ReturnCode.ConvergenceFailure)
UNSTABLE = int(ReturnCode.Unstable)
#: a sample whose step underflows dtmin with ``max|y| > GROWTH (1 + max|y0|)`` is Unstable
GROWTH = 1e6
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
    # solve(..., compile=True): the iteration's tensor math through torch.compile (_compiled_core)
    compile: bool = False
    # solve(..., compact=f): gather the active samples into a smaller batch when their
    # fraction falls below f (0: never; Integrator.run, _compactable)
    compact: float = 0.0


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


def _masked_lanes(active: Tensor, t: Tensor, step_dt: Tensor, sign: float, t_start: Tensor, t_end: Tensor) -> Tensor:
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


def _spacing(t: Tensor) -> Tensor:
    """The float64 spacing at ``t`` (``(B,)``): Julia's ``eps(t)``."""
    a = t.abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)) - a


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


def _iteration_core(
    solver: AbstractSolver,
    terms: Terms,
    t: Tensor,
    y: Tensor,
    dt_eval: Tensor,
    dw: Tensor | None,
    levy: Tensor | None,
    carry: Any,
    active: Tensor,
    tolerances: tuple[float, float] | None,
) -> tuple[StepOutput, Tensor | None, Tensor]:
    """The pure tensor math of one iteration: ``solver.step`` (with the user's drift and
    diffusion), the per-sample error norm and the accept decision.

    ``t``, ``dt_eval``, ``active``: ``(B,)``; ``y``: ``(B, *state_shape)``; ``tolerances``:
    ``(atol, rtol)`` for adaptive solves, None for fixed steps.  Returns the step's output,
    the ``(B,)`` float64 scaled error (``inf`` where the step is not finite; None for fixed
    steps) and the ``(B,)`` accepted mask.
    """
    out = solver.step(terms, t, y, dt_eval, dw, levy, carry)
    finite = _all_finite(out.y1)
    if tolerances is None:
        return out, None, active & finite
    assert out.error is not None
    # the controller is not differentiated: step sizes carry no gradient
    err = scaled_error_norm(out.error.detach(), y.detach(), out.y1.detach(), *tolerances).to(torch.float64)
    if solver.unit_step_power and terms.noise not in (None, "additive"):
        err = per_unit_step(err, dt_eval.detach(), terms.span, solver.unit_step_power)
    err = torch.where(finite & torch.isfinite(err), err, torch.full_like(err, float("inf")))
    return out, err, active & (err <= 1.0)


#: torch.compile'd :func:`_iteration_core` per (solver type, state shape, dtype, device, adaptive)
_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
#: the same keys plus the ids of the user's drift/diffusion, for compilations that failed
#: (warned about once, then eager), with the reason
_COMPILE_FAILED: dict[tuple[Any, ...], str] = {}


def _compiled_core(key: tuple[Any, ...]) -> Callable[..., Any]:
    """The compiled iteration for ``key``, made on first use."""
    if key not in _COMPILED:
        import torch._functorch.config as functorch_config

        # The checkpointed sensealgs differentiate segments with retain_graph=True, which
        # compiled backwards with donated buffers refuse.  The flag is read when the backward
        # is compiled (lazily, outside any context we could set), so it is switched off
        # process-wide: a memory optimisation of compiled backwards, not a numerical change.
        functorch_config.donated_buffer = False
        # fullgraph: a graph break (host sync, data-dependent branch) is an error -> eager
        _COMPILED[key] = torch.compile(_iteration_core, dynamic=False, fullgraph=True)
    return _COMPILED[key]


def _run_core(
    options: EngineOptions, solver: AbstractSolver, terms: Terms, t: Tensor, y: Tensor, *args: Any
) -> tuple[StepOutput, Tensor | None, Tensor]:
    """:func:`_iteration_core`, compiled when ``options.compile`` (eager after a failure, with
    a one-time warning naming it)."""
    if not options.compile:
        return _iteration_core(solver, terms, t, y, *args)
    key = (type(solver), tuple(y.shape), y.dtype, y.device, args[-1] is not None)
    problem = terms.problem
    failure_key = (*key, id(problem.drift), id(getattr(problem, "diffusion", None)))
    if failure_key not in _COMPILE_FAILED:
        try:
            return _compiled_core(key)(solver, terms, t, y, *args)
        except Exception as exc:  # no compiler, unsupported op, graph break: fall back
            message = str(exc).strip()
            reason = f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"
            _COMPILE_FAILED[failure_key] = reason
            warnings.warn(
                f"compile=True: torch.compile failed for {type(solver).__name__} "
                f"(state {tuple(y.shape)}, {y.dtype}); running eagerly. Reason: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _iteration_core(solver, terms, t, y, *args)


@dataclass
class LoopState:
    """Everything the loop carries from one iteration to the next, per sample ``(B,)`` unless
    noted: a snapshot of it (:meth:`Integrator.snapshot`) restarts the solve bit-identically.

    ``carry`` is the solver's FSAL slot (``f0``, or ``ReversibleHeun``'s tuple);
    ``tree_state`` the Brownian path at ``t``; ``solver_state`` what a solver object keeps
    between steps (composite switching counters, a reused Jacobian); ``ys`` ``(T, B, ...)``.
    """

    iteration: int
    t: Tensor
    y: Tensor
    dt: Tensor
    qold: Tensor
    carry: Any
    tree_state: Any
    save_index: Tensor
    active: Tensor
    retcodes: Tensor
    nf: Tensor
    ng: Tensor
    naccept: Tensor
    nreject: Tensor
    newton_streak: Tensor
    eigen_last: Tensor | None
    eigen_max: Tensor | None
    njac: Tensor | None
    solver_state: dict[str, Any]
    ys: Tensor


def _solver_state(solver: AbstractSolver) -> dict[str, Any]:
    """The per-solve state a solver object holds (its ``_``-prefixed attributes, recursively
    for the solvers it wraps), copied so later steps do not change the snapshot."""
    out: dict[str, Any] = {}
    for key, value in vars(solver).items():
        if isinstance(value, AbstractSolver):
            out[key] = ("solver", _solver_state(value))
        elif key.startswith("_"):
            out[key] = ("value", dict(value) if isinstance(value, dict) else value)
    return out


def _restore_solver_state(solver: AbstractSolver, state: dict[str, Any]) -> None:
    for key, (kind, value) in state.items():
        if kind == "solver":
            _restore_solver_state(getattr(solver, key), value)
        else:
            setattr(solver, key, dict(value) if isinstance(value, dict) else value)


def _detach(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    return x.detach() if isinstance(x, Tensor) else x


#: LoopState fields that hold one entry per sample along their first axis (``ys``: the second)
_PER_SAMPLE = (
    "t",
    "y",
    "dt",
    "qold",
    "carry",
    "save_index",
    "active",
    "retcodes",
    "nf",
    "ng",
    "naccept",
    "nreject",
    "newton_streak",
    "eigen_last",
    "eigen_max",
    "njac",
)


def _gather(x: Any, idx: Tensor) -> Any:
    if isinstance(x, tuple):
        return tuple(_gather(v, idx) for v in x)
    return x.index_select(0, idx) if isinstance(x, Tensor) else x


def _scatter(full: Any, part: Any, idx: Tensor, batch: int) -> Any:
    """``full`` (``(batch, ...)``) with rows ``idx`` replaced by ``part`` (out of place, so
    differentiable); ``full`` None: a counter the solver started after the batch was compacted."""
    if isinstance(part, tuple):
        return tuple(_scatter(f, p, idx, batch) for f, p in zip(full, part))
    if not isinstance(part, Tensor):
        return part
    if full is None:
        full = part.new_zeros((batch, *part.shape[1:]))
    return full.index_put((idx,), part)


class Integrator:
    """The native loop: ``init`` -> ``run`` (iterations of :meth:`step`) -> ``solution``.

    One iteration is a short sequence of stages on a :class:`LoopState`: propose the step
    (clip to the next save time) -> noise (query the tree) -> ``solver.step`` -> controller
    (accept, next ``dt``, retcodes) -> masked merge -> save -> stop checks.
    """

    def __init__(
        self,
        terms: Terms,
        solver: AbstractSolver,
        save_times: Tensor,
        dt_initial: Tensor,
        options: EngineOptions,
        tree: VirtualBrownianTree | None,
        observer: Any = None,
    ):
        self.terms, self.solver, self.save_times, self.options, self.tree = terms, solver, save_times, options, tree
        self.observer = observer
        self.n_save = save_times.shape[0]
        # time direction: step sizes are magnitudes here; solvers receive the signed step
        self.sign = 1.0 if self.n_save < 2 or float(save_times[-1]) >= float(save_times[0]) else -1.0
        self.t_start, self.t_end = save_times[0], save_times[-1]
        self.controller = PIController.for_solver(solver) if options.adaptive else None
        # Fixed step: every active sample is at grid[i] at iteration i, so the Brownian tree is
        # queried once per step at a time shared by the batch (tree.evaluate_scalar: same
        # numbers, cached descent) and the loop stops right after the last step.
        # (events hook: an event that moves a sample back inside its step breaks the lockstep)
        lockstep = getattr(observer, "lockstep", True)
        self.grid = _shared_grid(save_times, dt_initial, options) if tree is not None and lockstep else None
        self.save_set = {float(x) for x in save_times} if self.grid is not None else set()
        self.dtmin = torch.tensor(options.dtmin, dtype=torch.float64, device=save_times.device)
        self.growth_bound: Tensor | None = None  # set by init, with lanes = arange(B)
        self.lanes = torch.arange(0)  # the rows of ys the state's samples are (compaction)
        self._growth_full = torch.empty(0)

    def init(self, y0: Tensor, dt_initial: Tensor, f0: Tensor | None, initial_counts: tuple[int, int]) -> LoopState:
        batch, device, solver = y0.shape[0], y0.device, self.solver
        t = self.save_times[0].expand(batch).clone()
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        ys = torch.full((self.n_save, *y0.shape), float("nan"), dtype=y0.dtype, device=device)
        ys[0] = y0
        done = self.n_save == 1
        if self.tree is None:
            tree_state = None
        elif self.grid is not None:
            tree_state = self.tree.evaluate_scalar(self.grid[0], levy=solver.needs_levy_area)
        else:
            tree_state = self.tree.evaluate(t)
        carry = solver.initial_carry(self.terms, t, y0, f0) if solver.fsal else f0
        solver.begin(y0)
        self.growth_bound = GROWTH * (1.0 + y0.detach().abs().flatten(1).amax(dim=1))
        self.lanes = torch.arange(batch, device=device)
        return LoopState(
            iteration=0,
            t=t,
            y=y0,
            dt=dt_initial.to(torch.float64),
            qold=torch.full((batch,), QOLD_INIT, dtype=torch.float64, device=device),
            carry=carry,
            tree_state=tree_state,
            save_index=zeros + 1,
            active=torch.full((batch,), not done, device=device),
            retcodes=torch.full((batch,), SUCCESS if done else DEFAULT, dtype=torch.long, device=device),
            nf=zeros + initial_counts[0],
            ng=zeros + initial_counts[1],
            naccept=zeros,
            nreject=zeros,
            newton_streak=zeros,
            eigen_last=None,
            eigen_max=None,
            njac=None,
            solver_state={},
            ys=ys,
        )

    def snapshot(self, s: LoopState) -> LoopState:
        """A detached copy of ``s`` (with the solver's own state) to restart from; ``ys`` is not kept."""
        copy = LoopState(**{k: _detach(v) for k, v in vars(s).items()})
        copy.solver_state, copy.ys = _solver_state(self.solver), s.ys.new_empty(0)
        return copy

    def restore(self, snap: LoopState, y: Tensor, carry: Any) -> LoopState:
        """The state of ``snap`` with ``y``/``carry`` replaced (e.g. leaves requiring grad)."""
        _restore_solver_state(self.solver, snap.solver_state)
        state = LoopState(**vars(snap))
        state.y, state.carry = y, carry
        state.ys = torch.full((self.n_save, *y.shape), float("nan"), dtype=y.dtype, device=y.device)
        return state

    def run(
        self, s: LoopState, stop_at: int | None = None, boundaries: list[float] | None = None, progress: bool = False
    ) -> list[LoopState]:
        """Iterate until every sample stopped (or iteration ``stop_at``).  Returns a snapshot
        taken at the first check after the slowest sample passed each of ``boundaries``."""
        snaps: list[LoopState] = []
        pending = list(boundaries or [])
        sign, grid, every = self.sign, self.grid, self.options.check_every
        bar = _Progress(progress, float(self.t_start), float(self.t_end))
        compacting = self._compactable(stop_at, boundaries)
        full, idx = s, None  # s: the compacted state once samples left the batch (rows idx of full)
        while stop_at is None or s.iteration < stop_at:
            if grid is not None and s.iteration == len(grid) - 1:
                break  # every sample has reached the end or stopped earlier
            if s.iteration % every == 0:
                n_active = int(s.active.sum())
                slowest = float(sign * (sign * torch.where(s.active, s.t, self.t_end)).min())
                bar.update(slowest, n_active)
                passed = False
                while pending and (n_active == 0 or sign * (slowest - pending[0]) >= 0):
                    pending.pop(0)
                    passed = True
                if passed and n_active:
                    snaps.append(self.snapshot(s))
                if n_active == 0:
                    break
                if compacting and n_active < self.options.compact * s.t.shape[0]:
                    s, idx = self._compact(full, s, idx)
            self.step(s)
        if idx is not None:
            self._expand(full, s, idx)
        bar.update(float(self.t_end), 0)
        bar.close()
        return snaps

    def _compactable(self, stop_at: int | None, boundaries: list[float] | None) -> bool:
        """Compaction needs samples that are independent rows: no Brownian tree (its samples
        are fixed rows), no observers, no per-solve solver state, a whole run (no snapshots); not
        with ``compile=True`` (every compacted size would be a new compilation)."""
        return (
            self.options.compact > 0
            and not self.options.compile
            and stop_at is None
            and not boundaries
            and self.tree is None
            and self.observer is None
            and self.grid is None
            and not _solver_state(self.solver)
        )

    def _compact(self, full: LoopState, part: LoopState, idx: Tensor | None) -> tuple[LoopState, Tensor]:
        """The active samples of ``full`` as a smaller state (after writing ``part``, rows
        ``idx``, back).  Finished samples are frozen in the masked loop, so leaving them out
        changes no other sample's bits (every reduction is per sample)."""
        if idx is not None:
            self._expand(full, part, idx)
        assert self.growth_bound is not None
        growth_full = self.growth_bound if idx is None else self._growth_full
        idx = full.active.nonzero().squeeze(1)
        small = LoopState(**vars(full))  # ys is shared: saves go to rows self.lanes
        for name in _PER_SAMPLE:
            setattr(small, name, _gather(getattr(full, name), idx))
        self._growth_full, self.growth_bound, self.lanes = growth_full, growth_full.index_select(0, idx), idx
        return small, idx

    def _expand(self, full: LoopState, part: LoopState, idx: Tensor) -> None:
        """Write the compacted state ``part`` back into rows ``idx`` of ``full``."""
        batch = full.t.shape[0]
        for name in _PER_SAMPLE:
            setattr(full, name, _scatter(getattr(full, name), getattr(part, name), idx, batch))
        full.iteration = part.iteration
        self.growth_bound, self.lanes = self._growth_full, torch.arange(batch, device=idx.device)

    def step(self, s: LoopState) -> None:
        """One iteration, updating ``s`` in place."""
        opts, solver, sign, grid, dtype = self.options, self.solver, self.sign, self.grid, s.y.dtype
        s.iteration += 1
        # --- propose: clip to the next save time
        target = self.save_times[s.save_index.clamp(max=self.n_save - 1)]
        remaining = sign * (target - s.t)
        hits = s.active & (s.dt >= remaining * (1 - 1e-12))
        step_dt = torch.where(hits, remaining, s.dt)
        t_new = torch.where(s.active, torch.where(hits, target, s.t + sign * step_dt), s.t)
        dt_eval = _masked_lanes(s.active, s.t, step_dt, sign, self.t_start, self.t_end)
        # --- noise
        new_tree_state, dw, levy = self._noise(s, t_new)
        # --- solver
        tolerances = (opts.atol, opts.rtol) if self.controller is not None else None
        out, err, accepted = _run_core(
            opts,
            solver,
            self.terms,
            s.t,
            s.y,
            dt_eval.to(dtype),
            dw,
            levy if solver.needs_levy_area else None,
            s.carry,
            s.active,
            tolerances,
        )
        # --- controller decision
        rejected = s.active & ~accepted
        self._stats(s, out, accepted, rejected)
        dt_factor = solver.after_step(accepted, s.active, torch.where(accepted, t_new, s.t), dt_eval.abs(), out)
        # --- masked merge
        y_prev, t_prev, f_prev = s.y, s.t, s.carry
        s.y = _select(accepted, out.y1, s.y)
        s.t = torch.where(accepted, t_new, s.t)
        if grid is not None:
            s.tree_state = new_tree_state  # lockstep: a stopped sample never moves again
        elif s.tree_state is not None and new_tree_state is not None:
            s.tree_state = tuple(_select(accepted, a, b) for a, b in zip(new_tree_state, s.tree_state))
        if solver.fsal and out.f1 is not None and s.carry is not None:
            s.carry = _select(accepted, out.f1, s.carry)
        # --- events hook (diffeqbridge.events): may move samples back to an event time inside
        # the step, change their state (f0 / Brownian state refreshed) and stop them; a cut
        # step saves nothing (hits cleared)
        stopped = None
        if self.observer is not None and hasattr(self.observer, "after_merge"):
            s.y, s.t, s.carry, s.tree_state, hits, stopped = self.observer.after_merge(
                t_prev, y_prev, s.t, s.y, s.carry, s.tree_state, accepted, hits, out, f_prev, dt_eval, self.tree
            )
        # --- save
        saved_now = accepted & hits
        slot, lanes = s.save_index.clamp(max=self.n_save - 1), self.lanes
        if grid is None or grid[s.iteration] in self.save_set:  # lockstep: nobody saves between save times
            s.ys[slot, lanes] = _select(saved_now, s.y, s.ys[slot, lanes])
        s.save_index = s.save_index + saved_now
        # --- stop: finished, unstable, controller limits, max steps
        self._stop(s, accepted, rejected, saved_now & (s.save_index >= self.n_save), stopped, step_dt, err, hits, dt_factor, out)
        if self.observer is not None:
            self.observer.observe(t_prev, y_prev, t_new, step_dt, out, accepted | rejected, accepted, s.dt, f_prev)

    def _noise(self, s: LoopState, t_new: Tensor) -> tuple[Any, Tensor | None, Tensor | None]:
        tree, grid, dtype = self.tree, self.grid, s.y.dtype
        if tree is None:
            return None, None, None
        if grid is not None and not self.solver.needs_levy_area:
            # W only: dW = W(t_new) - W(t) as increment_from computes it, no Lévy area
            new = tree.evaluate_scalar(grid[s.iteration], levy=False)
            return new, tree._shape_out(new[0] - s.tree_state[0]).to(dtype), None
        new = tree.evaluate(t_new) if grid is None else tree.evaluate_scalar(grid[s.iteration])
        dw, levy = tree.increment_from(s.t, s.tree_state, t_new, new)  # type: ignore[arg-type]
        return new, dw.to(dtype), levy.to(dtype)

    def _stats(self, s: LoopState, out: StepOutput, accepted: Tensor, rejected: Tensor) -> None:
        if out.njac is not None:
            s.njac = (s.njac if s.njac is not None else torch.zeros_like(s.nf)) + s.active * out.njac
        if out.stiffness is not None:
            rho = out.stiffness.detach().to(torch.float64)
            s.eigen_last = torch.where(accepted, rho, s.eigen_last if s.eigen_last is not None else torch.zeros_like(rho))
            s.eigen_max = torch.maximum(s.eigen_max, s.eigen_last) if s.eigen_max is not None else s.eigen_last
        s.nf = s.nf + s.active * out.nf
        s.ng = s.ng + s.active * out.ng
        s.naccept = s.naccept + accepted
        s.nreject = s.nreject + rejected

    def _stop(
        self,
        s: LoopState,
        accepted: Tensor,
        rejected: Tensor,
        finished: Tensor,
        stopped: Tensor | None,
        step_dt: Tensor,
        err: Tensor | None,
        hits: Tensor,
        dt_factor: Tensor | None,
        out: StepOutput,
    ) -> None:
        def end(mask: Tensor, code: int | Tensor) -> None:
            s.retcodes = torch.where(mask, torch.as_tensor(code, device=mask.device), s.retcodes)
            s.active = s.active & ~mask

        # unstable_check: a state past sqrt(floatmax) is blowing up; stop it now rather than
        # crawl towards DtLessThanMin (NaN/Inf proposals are rejected before they get here)
        y_size = s.y.detach().abs().flatten(1).amax(dim=1)
        end(finished, SUCCESS)
        if stopped is not None:  # events hook: a terminating event (even at t1)
            s.retcodes = torch.where(stopped, TERMINATED, s.retcodes)
            s.active = s.active & ~stopped
        end(accepted & ~(y_size <= math.sqrt(torch.finfo(s.y.dtype).max)), UNSTABLE)
        newton_failed = s.active & ~out.converged if out.converged is not None else None
        if self.controller is not None:
            assert err is not None
            proposed, s.qold = self.controller.propose(step_dt, err, s.qold, accepted)
            # After a step clipped to a save time, keep the unclipped proposal if larger.
            proposed = torch.where(accepted & hits, torch.maximum(proposed, s.dt), proposed)
            if dt_factor is not None:  # a composite solver switched method
                proposed = proposed * dt_factor
            s.dt = torch.where(s.active, proposed, s.dt)
            # as SciML (timedepentdtmin): below max(dtmin, spacing of t), on accepted steps too
            too_small = s.active & (s.dt < torch.maximum(_spacing(s.t), self.dtmin))
            assert self.growth_bound is not None
            # a step that underflows while the state grew a millionfold is a blow-up
            code = torch.where(y_size > self.growth_bound, UNSTABLE, int(ReturnCode.DtLessThanMin))
            if newton_failed is not None:
                # a Newton failure rejects the step (NaN proposal -> dt shrinks by qmin); a
                # sample that keeps failing, or underflows dtmin doing so, stops here
                s.newton_streak = torch.where(newton_failed, s.newton_streak + 1, torch.where(accepted, 0, s.newton_streak))
                gave_up = newton_failed & (too_small | (s.newton_streak >= self.options.max_convergence_failures))
                end(gave_up, CONVERGENCE_FAILURE)
                too_small = too_small & s.active
            end(too_small, code)
        else:
            # fixed step: a non-finite step ends the sample; a Newton failure too (as SciML)
            code = torch.full_like(s.retcodes, UNSTABLE)
            if newton_failed is not None:
                code = torch.where(newton_failed, CONVERGENCE_FAILURE, code)
            end(rejected & s.active, code)
        end(s.active & (s.naccept + s.nreject >= self.options.max_steps), int(ReturnCode.MaxIters))

    def solution(self, s: LoopState) -> Solution:
        stats = Stats(nf=s.nf, ng=s.ng, naccept=s.naccept, nreject=s.nreject)
        if s.eigen_last is not None and s.eigen_max is not None:
            stats.extra["eigen_est"], stats.extra["max_eigen_est"] = s.eigen_last, s.eigen_max
        if s.njac is not None:
            stats.extra["njac"] = s.njac
        stats.extra.update(self.solver.extra_stats())
        return Solution(ts=self.save_times.to(s.y.dtype), ys=s.ys, stats=stats, retcodes=s.retcodes, alg=self.solver)


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
    loop = Integrator(terms, solver, save_times, dt_initial, options, tree, observer)
    state = loop.init(y0, dt_initial, f0, initial_counts)
    loop.run(state, progress=options.progress)
    return loop.solution(state)
