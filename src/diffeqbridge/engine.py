"""The native integration loop.

Every sample has its own time ``t``, step ``dt``, accept/reject decision, save index and
return code.  Finished (or failed) samples are masked, not removed, so all tensors keep
the batch shape and the loop makes no host synchronisation except a termination check
every ``check_every`` iterations.  A rejected step re-queries the Brownian tree at the
shorter step; no noise is stored.

Saves (docs/engine.md, "Saving"): adaptive ODE solves with an interpolant step freely and
fill the save times inside each accepted step from the solver's interpolant
(:mod:`diffeqbridge.dense`; buffered, written at the termination check), landing only on
``tstops`` and the end.  SDE and fixed-step solves land on every save time; a fixed-step
save time within :func:`snap_tolerance` of the step's grid point is saved there instead
(no sliver step).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _cuda_graph
from .brownian import VirtualBrownianTree
from .controller import QOLD_INIT, PIController, clip_step, scaled_error_norm
from .dense import horner, interpolant_kind, step_coefficients
from .problem import Terms
from .solution import ReturnCode, Solution, Stats
from .solvers.base import AbstractSolver, Startup, StepOutput, call_step

SUCCESS = int(ReturnCode.Success)
DEFAULT = int(ReturnCode.Default)
CONVERGENCE_FAILURE = int(ReturnCode.ConvergenceFailure)
UNSTABLE = int(ReturnCode.Unstable)
#: a sample whose step underflows dtmin with ``max|y| > GROWTH (1 + max|y0|)`` is Unstable
GROWTH = 1e6
TERMINATED = int(ReturnCode.Terminated)
DT_LESS_THAN_MIN = int(ReturnCode.DtLessThanMin)
MAX_ITERS = int(ReturnCode.MaxIters)
_SQRT_FLOATMAX = {dtype: math.sqrt(torch.finfo(dtype).max) for dtype in (torch.float32, torch.float64)}
#: lockstep fixed-step solves skip the per-iteration machinery (Integrator._run_lockstep);
#: False forces the per-iteration loop (tests compare the two bit for bit)
LOCKSTEP_FAST_PATH = True
#: interpolated saves are written at the first termination check after this many queued steps
#: (and before a snapshot, a compaction and the end of ``run``)
FLUSH_AFTER = 16


@dataclass
class EngineOptions:
    adaptive: bool
    atol: float | Tensor  # per-component: (1, *state_shape)
    rtol: float | Tensor
    max_steps: int
    dtmin: float
    progress: bool = False
    check_every: int = 8
    # adaptive: consecutive Newton failures of a sample before ReturnCode.ConvergenceFailure
    max_convergence_failures: int = 10
    # solve(..., compile=True): the iteration's tensor math through torch.compile (_compiled_core)
    compile: bool = False
    # solve(..., compact=f): gather the active samples into a smaller batch when their
    # fraction falls below f (0: never; Integrator.run, Integrator.compact_refusal)
    compact: float = 0.0
    # warn (once per reason) when compact > 0 cannot apply
    compact_warn: bool = True
    # solve(..., tstops=...): times every sample's steps land on (besides the save times
    # where those are forced, and the end)
    tstops: tuple[float, ...] = ()


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


#: ``(drift(t0, y0), diffusion(t0, y0))`` as the start-up evaluated them (None: not evaluated)
StartValues = tuple[Tensor | None, Tensor | None]


def _start_terms(terms: Terms, t: Tensor, y: Tensor, values: StartValues) -> tuple[Terms, list[int]]:
    """``terms`` whose ``drift``/``diffusion`` return the start-up ``values`` when called with
    these very ``t`` and ``y`` tensors (the first step's first stage: SRI, Euler–Maruyama,
    RKMil, ... call ``drift(t, y)``/``diffusion(t, y)`` on the loop's own tensors), else
    evaluate; and ``[drift, diffusion]`` reuses, which the step's counts then drop.  The
    values are the same numbers the step would compute (the same point; the start-up's graph
    when it has one), so the step's results do not change."""
    hits = [0, 0]
    f0, g0 = values
    memo = copy.copy(terms)

    def drift(tt: Tensor, yy: Tensor) -> Tensor:
        if f0 is not None and tt is t and yy is y:
            hits[0] += 1
            return f0
        return terms.drift(tt, yy)

    memo.drift = drift
    if terms.diffusion is not None:
        diffusion_fn = terms.diffusion

        def diffusion(tt: Tensor, yy: Tensor) -> Tensor:
            if g0 is not None and tt is t and yy is y:
                hits[1] += 1
                return g0
            return diffusion_fn(tt, yy)

        memo.diffusion = diffusion
    return memo, hits


def _running_max(current: Tensor | None, value: Tensor) -> Tensor:
    """Elementwise running maximum: ``value`` (a copy) at the first report, else ``max(current, value)``."""
    return value.clone() if current is None else torch.maximum(current, value)


def _discount(out: StepOutput, hits: list[int]) -> StepOutput:
    """``out`` with the reused start-up values (:func:`_start_terms`) taken off its counts."""
    out.nf, out.ng = out.nf - hits[0], out.ng - hits[1]
    return out


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
    ahead, behind = _signed(sign, t_end - t), _signed(sign, t - t_start)
    h = torch.where(step_dt > 0, step_dt, ahead.abs() + behind.abs())
    h = torch.minimum(h, torch.maximum(ahead, behind))
    masked = torch.where(ahead >= h, h, -h)
    return _signed(sign, torch.where(active, step_dt, masked))


def _signed(sign: float, x: Tensor) -> Tensor:
    """``sign * x`` for the time direction ``sign = ±1`` (no op when time runs forwards)."""
    return x if sign > 0 else -x


def _and_not(a: Tensor, b: Tensor) -> Tensor:
    """``a & ~b`` for bool masks in one op (``True > False`` is the only true comparison)."""
    return a > b


def _count(total: Tensor, active: Tensor, n: int | Tensor) -> Tensor:
    """``total + active * n`` (``(B,)`` long; ``n`` evaluations per sample, an int or ``(B,)``)."""
    return torch.add(total, active, alpha=n) if isinstance(n, int) else total + active * n


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


_EPS64 = float(torch.finfo(torch.float64).eps)


def snap_bounds(times: Sequence[float]) -> tuple[float, float]:
    """``(floor, cap)`` of :func:`snap_tolerance` for the forced times ``times``."""
    floor = 64.0 * _EPS64 * max(abs(times[0]), abs(times[-1]))
    gap = min((abs(b - a) for a, b in zip(times[:-1], times[1:])), default=math.inf)
    return floor, 0.25 * gap


def snap_tolerance(dt: float | Tensor, times: Sequence[float], bounds: tuple[float, float] | None = None) -> Any:
    """How far a fixed-step solve's grid point may lie from a forced (save) time to be saved
    there instead of adding a sliver step: ``max(1e-9 dt, 64 eps max(|t_first|, |t_last|))``,
    at most ``dt / 2`` and a quarter of the smallest gap between the times (so two of them
    never snap to one grid point).  ``dt``: the step's magnitude, a float or a ``(B,)`` tensor;
    ``bounds``: :func:`snap_bounds` of ``times``, when already known.

    ``1e-9 dt`` covers the rounding a grid accumulated by ``t + dt`` collects over many
    steps; the state is then reported ``≤ 1e-9 dt`` away from its time, far below any
    scheme's error.  ``64 eps |t|`` covers a step that is tiny against ``|t|``."""
    floor, cap = snap_bounds(times) if bounds is None else bounds
    if isinstance(dt, Tensor):
        return torch.minimum((1e-9 * dt).clamp(min=floor), (0.5 * dt).clamp(max=cap))
    return min(max(1e-9 * dt, floor), 0.5 * dt, cap)


def fixed_steps(
    times: Sequence[float], dt: float, limit: int | None = None
) -> tuple[list[tuple[float, float, float]], list[int]]:
    """The steps ``(t, signed h, t + h)`` a fixed-step solve takes through the forced times
    ``times`` (``times[0]`` the start; decreasing: time runs backwards) with steps of
    magnitude ``dt``, in the loop's float arithmetic, and for every time after the first the
    number of steps taken when it is reached.

    A time within :func:`snap_tolerance` of the grid point ``t ± dt`` is reached there (the
    step is not shortened); one further away than that inside the step ends the step on it
    (the grid restarts there); the last time is always landed on exactly.  None of the lists
    when more than ``limit`` steps would be needed."""
    sign = 1.0 if times[-1] >= times[0] else -1.0
    snap = snap_tolerance(dt, times)
    steps: list[tuple[float, float, float]] = []
    reached: list[int] = []
    t, last = times[0], len(times) - 1
    for k in range(1, len(times)):
        target = times[k]
        while True:
            remaining = sign * (target - t)
            if dt + snap >= remaining and (dt - remaining > snap or k == last):
                steps.append((t, sign * remaining, target))
                t = target
                break
            t_new = t + sign * dt
            steps.append((t, sign * dt, t_new))
            t = t_new
            if dt + snap >= remaining:
                break
            if limit is not None and len(steps) > limit:
                raise _TooLong
        reached.append(len(steps))
    return steps, reached


class _TooLong(Exception):
    """:func:`fixed_steps` went past its ``limit``."""


def _shared_grid(stops: Tensor, dt_initial: Tensor, options: EngineOptions) -> tuple[list[float], list[int], list[float]] | None:
    """The step times shared by every sample of a fixed-step solve, per forced time after the
    first the iteration that reaches it, and the signed steps (one host sync, before the loop);
    None when the samples do not step in lockstep (adaptive, or per-sample ``dt``)."""
    if options.adaptive or dt_initial.numel() == 0:
        return None
    dt = dt_initial.to(torch.float64)
    if not bool((dt == dt[0]).all()):
        return None
    times = [float(x) for x in stops]
    try:  # too long to list: the per-sample path handles MaxIters
        steps, reached = fixed_steps(times, float(dt[0]), limit=options.max_steps + len(times))
    except _TooLong:
        return None
    return [times[0]] + [t for _, _, t in steps], reached, [h for _, h, _ in steps]


def saves_by_interpolation(solver: AbstractSolver, options: EngineOptions, is_sde: bool) -> bool:
    """Whether the loop fills save times from the solver's interpolant (adaptive ODE solvers
    with a dense interpolant of their own order: Tsit5, Dopri5, Rodas4, and composites of two
    of them, per sample, such as ``alg=None``'s ``AutoTsit5(Rodas4())``) rather than landing on
    them.  A cubic Hermite interpolant across a 5th-order method's long steps misses the
    tolerance by 50-120x (Kvaerno5 and composites with it), so those land on every save time."""
    kind = interpolant_kind(solver)
    return not is_sde and options.adaptive and all(part in ("tsit5", "dopri5", "rodas4") for part in kind.split("|"))


def _iteration_core(
    solver: AbstractSolver,
    terms: Terms,
    t: Tensor,
    y: Tensor,
    dt_eval: Tensor,
    dw: Tensor | None,
    levy: Tensor | None,
    carry: Any,
    solver_state: Any,
    active: Tensor,
    tolerances: tuple[float | Tensor, float | Tensor] | None,
) -> tuple[StepOutput, Tensor | None, Tensor]:
    """The pure tensor math of one iteration: ``solver.step`` (with the user's drift and
    diffusion), the per-sample error norm and the accept decision.

    ``t``, ``dt_eval``, ``active``: ``(B,)``; ``y``: ``(B, *state_shape)``; ``tolerances``:
    ``(atol, rtol)`` for adaptive solves, None for fixed steps.  Returns the step's output,
    the ``(B,)`` float64 scaled error (``inf`` where the step is not finite; None for fixed
    steps) and the ``(B,)`` accepted mask.
    """
    out = call_step(solver, terms, t, y, dt_eval, dw, levy, carry, solver_state)
    finite = _all_finite(out.y1)
    if tolerances is None:
        return out, None, active & finite
    assert out.error is not None
    # the controller is not differentiated: step sizes carry no gradient
    err = scaled_error_norm(out.error.detach(), y.detach(), out.y1.detach(), *tolerances).to(torch.float64)
    err = torch.where(finite & torch.isfinite(err), err, math.inf)
    return out, err, active & (err <= 1.0)


#: torch.compile'd :func:`_iteration_core` per (solver type, state shape, dtype, device, adaptive)
_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
#: the same keys plus the ids of the user's drift/diffusion, for compilations that failed
#: (warned about once, then eager), with the reason
_COMPILE_FAILED: dict[tuple[Any, ...], str] = {}


#: torch.compile'd :meth:`Integrator._sde_advance` (one wrapper; dynamo keys its graphs by guards)
_FUSED_SDE: Callable[..., Any] | None = None
#: compile=True: the largest ``ys`` (elements) the compiled iteration writes saves into
_SAVE_IN_GRAPH_ELEMENTS = 2**16
#: torch.compile'd :meth:`Integrator._iteration` (ODEs; SDEs whose tree query is traceable)
_FUSED_ITERATION: Callable[..., Any] | None = None


#: torch.compile'd :meth:`Integrator._iteration` with inductor's C++ wrapper, for unrolled ODE
#: calls on the CPU (:meth:`Integrator._cpp_wrapper`)
_FUSED_UNROLLED: Callable[..., Any] | None = None
#: whether unrolled ODE calls on the CPU use inductor's C++ wrapper (False after it failed)
_CPP_WRAPPER_UNROLLED = True

#: compile=True on CUDA: fuse keys whose graph capture failed (warned once), with the reason
_GRAPH_FAILED: dict[tuple[Any, ...], str] = {}
#: compile=True on CUDA: the most captured graphs one solve keeps (one per call length and state layout)
_MAX_GRAPHS = 4


def _new_graph() -> _cuda_graph.Graph:
    """A graph to capture a compiled call into (:mod:`._cuda_graph`)."""
    return _cuda_graph.CudaGraph()


def _configure_compile() -> None:
    """Process-wide settings for the compiled iteration."""
    import torch._functorch.config as functorch_config

    # The checkpointed sensealgs differentiate segments with retain_graph=True, which
    # compiled backwards with donated buffers refuse.  The flag is read when the backward
    # is compiled (lazily, outside any context we could set), so it is switched off
    # process-wide: a memory optimisation of compiled backwards, not a numerical change.
    functorch_config.donated_buffer = False


def _compile_failure(exc: Exception, solver: AbstractSolver, y: Tensor) -> str:
    """The reason a compilation failed, warned about once (the caller then runs eagerly)."""
    message = str(exc).strip()
    reason = f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"
    warnings.warn(
        f"compile=True: torch.compile failed for {type(solver).__name__} "
        f"(state {tuple(y.shape)}, {y.dtype}); running eagerly. Reason: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )
    return reason


def _compiled_core(key: tuple[Any, ...]) -> Callable[..., Any]:
    """The compiled iteration for ``key``, made on first use."""
    if key not in _COMPILED:
        _configure_compile()
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
            _COMPILE_FAILED[failure_key] = _compile_failure(exc, solver, y)
    return _iteration_core(solver, terms, t, y, *args)


@dataclass
class LoopState:
    """Everything the loop carries from one iteration to the next, per sample ``(B,)`` unless
    noted: a snapshot of it (:meth:`Integrator.snapshot`) restarts the solve bit-identically.

    ``carry`` is the solver's FSAL slot (``f0``);
    ``tree_state`` the Brownian path at ``t``; ``solver_state`` what the solver carries between
    steps (``solver.init``'s result, threaded through ``step``/``update``: composite switching
    counters, a reused Jacobian, ``ReversibleHeun``'s ``(z, f(z), g(z))``; None for most
    solvers), so the solver object itself never
    changes during a solve; ``ys`` ``(T, B, ...)``; ``save_index`` the next save time to fill,
    ``stop_index`` the next forced time (see :class:`Integrator`'s ``stops``).
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
    solver_state: Any
    ys: Tensor
    stop_index: Tensor | None = None


#: the LoopState fields a compiled call reads and replaces (captured as a graph on CUDA)
_GRAPH_FIELDS = tuple(f.name for f in fields(LoopState) if f.name != "iteration")


def _rebuild(like: tuple[Any, ...], items: Any) -> Any:
    """A tuple of ``items`` of ``like``'s type (NamedTuples keep their type)."""
    return type(like)(*items) if hasattr(like, "_fields") else tuple(items)


def _detach(x: Any) -> Any:
    if isinstance(x, tuple):
        return _rebuild(x, (_detach(v) for v in x))
    return x.detach() if isinstance(x, Tensor) else x


#: LoopState fields that hold one entry per sample along their first axis (nested tuples,
#: lists and dicts of batch-first tensors: ``carry``, ``tree_state``, ``solver_state``); ``ys``
#: (samples on its second axis) is shared and written through :attr:`Integrator.lanes`
_PER_SAMPLE = (
    "t",
    "y",
    "dt",
    "qold",
    "carry",
    "tree_state",
    "save_index",
    "stop_index",
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
    "solver_state",
)


def _batch_coupling(solver: AbstractSolver) -> str | None:
    """Why ``solver`` (or a solver it wraps) couples the samples of a batch, from its
    ``batch_coupled`` property or its Newton options (None: every sample's step is its own)."""
    reason = getattr(solver, "batch_coupled", None)
    if reason:
        return f"{type(solver).__name__}: {reason}"
    if getattr(getattr(solver, "newton", None), "early_exit", False):
        return (
            f"{type(solver).__name__}: its Newton iterations run until every sample of the batch has "
            "converged (NewtonOptions(early_exit=False) gives each sample a fixed count)"
        )
    inner = (v for v in vars(solver).values() if isinstance(v, AbstractSolver))
    return next((r for v in inner if (r := _batch_coupling(v))), None)


def _not_batch_first(x: Any, batch: int, where: str) -> str | None:
    """None when every tensor in ``x`` (nested tuples/lists/dicts) has ``batch`` rows along
    its first axis, so :func:`_gather` can select samples; else the first offending path.
    Other leaves (None, numbers, strings) are shared by the batch and kept as they are."""
    if isinstance(x, (tuple, list)):
        return next((r for i, v in enumerate(x) if (r := _not_batch_first(v, batch, f"{where}[{i}]"))), None)
    if isinstance(x, dict):
        return next((r for k, v in x.items() if (r := _not_batch_first(v, batch, f"{where}[{k!r}]"))), None)
    if isinstance(x, Tensor) and (x.ndim == 0 or x.shape[0] != batch):
        return f"{where} has shape {tuple(x.shape)}, not batch-first ({batch}, ...)"
    return None


def _gather(x: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of every tensor in ``x`` (nested (named) tuples/lists/dicts; other leaves
    as they are)."""
    if isinstance(x, tuple):
        return _rebuild(x, (_gather(v, idx) for v in x))
    if isinstance(x, list):
        return [_gather(v, idx) for v in x]
    if isinstance(x, dict):
        return {k: _gather(v, idx) for k, v in x.items()}
    return x.index_select(0, idx) if isinstance(x, Tensor) else x


def _scatter(full: Any, part: Any, idx: Tensor, batch: int) -> Any:
    """``full`` (``(batch, ...)`` tensors, nested as :func:`_gather`'s input) with rows ``idx``
    replaced by ``part`` (out of place, so differentiable).  A tensor of ``part`` where ``full``
    has None (a counter or state that started after the batch was compacted) gets zeros in the
    other rows; non-tensor leaves are taken from ``part``."""
    if isinstance(part, (tuple, list)):
        full = full if isinstance(full, (tuple, list)) else [None] * len(part)
        items = (_scatter(f, p, idx, batch) for f, p in zip(full, part))
        return _rebuild(part, items) if isinstance(part, tuple) else list(items)
    if isinstance(part, dict):
        full = full if isinstance(full, dict) else {}
        return {k: _scatter(full.get(k), v, idx, batch) for k, v in part.items()}
    if not isinstance(part, Tensor):
        return part
    if full is None:
        full = part.new_zeros((batch, *part.shape[1:]))
    return full.index_put((idx,), part)


class _QueuedStep(NamedTuple):
    """A step whose saves :meth:`Integrator._flush_saves` writes: per sample ``(B,)`` the first
    save index inside it and how many, its start ``t``, signed ``h`` and state ``y``, the
    solver's output and the FSAL ``f0`` (the interpolant's inputs)."""

    first: Tensor
    n: Tensor
    t: Tensor
    h: Tensor
    y: Tensor
    out: StepOutput
    f0: Any


def _cat_all(parts: list[Tensor | None]) -> Tensor | None:
    """``torch.cat(parts)`` along the batch axis, or None when any part is None."""
    present = [p for p in parts if p is not None]
    return torch.cat(present) if len(present) == len(parts) else None


def forced_times(save_times: Tensor, tstops: Sequence[float], interpolate: bool) -> tuple[Tensor, Tensor]:
    """``(stops, stop_slot)`` of :class:`Integrator`: ``tstops`` strictly inside the solve's
    span, merged with the save times (all of them, or the first and last when saves are
    interpolated), in the direction time runs."""
    times = save_times.tolist()
    sign = 1.0 if times[-1] >= times[0] else -1.0
    inner = {t for t in tstops if sign * (t - times[0]) > 0 and sign * (times[-1] - t) > 0}
    forced = set(times[:1] + times[-1:]) if interpolate else set(times)
    stops = sorted(forced | inner, key=lambda t: sign * t)
    index = {t: k for k, t in enumerate(times)}
    slot = [index.get(t, -1) for t in stops]
    device = save_times.device
    return torch.tensor(stops, dtype=torch.float64, device=device), torch.tensor(slot, dtype=torch.long, device=device)


class Integrator:
    """The native loop: ``init`` -> ``run`` (iterations of :meth:`step`) -> ``solution``.

    One iteration is a short sequence of stages on a :class:`LoopState`: propose the step
    (clip to the next forced time) -> noise (query the tree) -> ``solver.step`` -> controller
    (accept, next ``dt``, retcodes) -> masked merge -> save -> stop checks.

    Forced times ``stops`` (``(S,)``, ``stops[0] = t0``, ``stops[-1]`` the end): the save
    times and ``tstops``, or, when saves are interpolated (:func:`saves_by_interpolation`),
    ``tstops`` and the end only; ``stop_slot`` (``(S,)``) is the save index of each (-1: none).
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
        # (only when some save time is not a forced time anyway: same numbers, less work per step)
        inner = set(save_times[1:-1].tolist()) - set(options.tstops)
        self.interpolate = bool(inner) and saves_by_interpolation(solver, options, tree is not None)
        self.kind = interpolant_kind(solver)
        self.stops, self.stop_slot = forced_times(save_times, options.tstops, self.interpolate)
        self._jumps = self._one_sided_stops(options, tree is None)
        self.n_stop = self.stops.shape[0]
        self._snap_bounds = snap_bounds(self.stops.tolist())
        self._ascending = (self.sign * save_times).contiguous()  # searchsorted's order
        # the steps whose saves wait for :meth:`_flush_saves`
        self._pending: list[_QueuedStep] = []
        # Fixed step: every active sample is at grid[i] at iteration i, so the Brownian tree is
        # queried once per step at a time shared by the batch (tree.evaluate_scalar: same
        # numbers, cached descent) and the loop stops right after the last step.
        # (events hook: an event that moves a sample back inside its step breaks the lockstep)
        lockstep = getattr(observer, "lockstep", True)
        shared = _shared_grid(self.stops, dt_initial, options) if tree is not None and lockstep else None
        self.grid = shared[0] if shared is not None else None
        slots = self.stop_slot.tolist()
        # lockstep: the iterations that save (nobody saves in the others) and their save slots,
        # the iterations that reach a forced time, and the signed steps (:meth:`_run_lockstep`)
        self.save_slots = {i: slots[k] for k, i in enumerate(shared[1], start=1) if slots[k] >= 0} if shared else {}
        self.save_iterations = set(self.save_slots)
        self._reached, self._grid_steps = (shared[1], shared[2]) if shared is not None else ([], [])
        self.dtmin = torch.tensor(options.dtmin, dtype=torch.float64, device=save_times.device)
        self.growth_bound: Tensor | None = None  # set by init, with lanes = arange(B)
        self.lanes = torch.arange(0)  # the rows of ys the state's samples are (compaction)
        self._full_batch: tuple[VirtualBrownianTree | None, Tensor | None] = (tree, None)  # restored by _expand
        self.compact_refused: str | None = None  # why run() could not compact (compact > 0)
        self.rerun = False  # restore() was called: a checkpointed segment's re-run (no warnings)
        # compile=True: the tolerances as graph inputs (another tolerance is not another compilation)
        self._tolerances: tuple[Tensor, Tensor] = (
            torch.as_tensor(options.atol, dtype=torch.float64, device=save_times.device),
            torch.as_tensor(options.rtol, dtype=torch.float64, device=save_times.device),
        )
        #: compile=True, SDEs: (``s.t`` it was made for, the proposal) from the last compiled region
        self._next_proposal: tuple[Tensor | None, Any] = (None, None)
        #: compile=True, adaptive SDEs on the CPU's C kernel: the tree query inside the compiled
        #: iteration through its custom ops (set at the first, eager, iteration)
        self._tree_in_graph = False
        self._stop_at: int | None = None  # run()'s stop_at (compiled iterations are not unrolled past it)
        self._snapshots = False  # run() takes snapshots (they alias the state's tensors: no graphs)
        #: compile=True on CUDA: captured calls by (iterations, state layout); None: compiled, not captured yet
        self._graphs: dict[tuple[Any, ...], _cuda_graph.GraphedCall | None] = {}
        self._graph_device = options.compile and _cuda_graph.wanted(save_times.device)
        problem = terms.problem
        self._fuse_key = ("advance", type(solver), id(problem.drift), id(getattr(problem, "diffusion", None)))
        self._exact_ends: bool | None = None  # exact_step_ends, once decided
        #: ``(y0, drift(t0, y0), diffusion(t0, y0))`` until the first step has used them (:func:`_start_terms`)
        self._start_values: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    def _one_sided_stops(self, options: EngineOptions, ode: bool) -> Tensor | None:
        """ODE ``tstops`` as the discontinuities they mark (torchdiffeq's ``jump_t``): a step
        lands one float64 spacing before a stop ``J`` (its stages never see ``J``) and the next
        starts one spacing after it with ``f`` evaluated there (:meth:`_leap_jumps`), so a field
        that jumps at ``J`` is evaluated on the correct side whichever side ``J`` itself
        belongs to.  Returns the times after the jumps per stop (NaN: not a jump), or None.
        (SDEs keep exact stops: the Brownian path has no gap; compiled loops too.  A stop that
        is also a save time saves the state one spacing before it; ``tstops=saveat`` costs one
        more ``f`` per save time.)"""
        inner = set(options.tstops) - {float(self.t_start), float(self.t_end)}
        if not ode or options.compile or not inner:
            return None
        stops = self.stops.tolist()
        toward_start = [math.nextafter(t, -self.sign * math.inf) if t in inner else t for t in stops]
        after = [math.nextafter(t, self.sign * math.inf) if t in inner else math.nan for t in stops]
        self.stops = torch.tensor(toward_start, dtype=torch.float64, device=self.stops.device)
        return torch.tensor(after, dtype=torch.float64, device=self.stops.device)

    def _forced_time(self, s: LoopState, stop: Tensor, reached: Tensor) -> Tensor:
        """``(B,)``: the forced time (save time, ``tstops`` entry, end) a sample's step reached,
        else its time.  A fixed step reaches it within its snap and a one-sided stop one spacing
        before it, so ``s.t`` can differ from it by rounding; discrete events see this time
        (SciML's ``PresetTimeCallback`` condition ``t == t_k``)."""
        index = stop.clamp(max=self.n_stop - 1)
        target = self.stops.index_select(0, index)
        if self._jumps is not None:
            after = self._jumps.index_select(0, index)
            nominal = torch.nextafter(after, torch.full_like(after, -self.sign * math.inf))
            target = torch.where(torch.isnan(after), target, nominal)
        return torch.where(reached, target.to(s.t.dtype), s.t)

    def _leap_jumps(self, s: LoopState, stop: Tensor, reached: Tensor) -> None:
        """Samples that just landed before a jump (:meth:`_one_sided_stops`) continue from one
        spacing after it, with the FSAL slot re-evaluated there (one ``f`` call, counted)."""
        assert self._jumps is not None
        after = self._jumps.index_select(0, stop.clamp(max=self.n_stop - 1))
        leap = reached & ~torch.isnan(after)
        if not bool(leap.any()):
            return
        s.t = torch.where(leap, after, s.t)
        if self.solver.fsal and s.carry is not None:
            f = self.terms.drift(s.t.to(s.y.dtype), s.y)
            s.carry = _select(leap, self.solver.initial_carry(self.terms, s.t, s.y, f), s.carry)
            s.nf = s.nf + leap

    def exact_step_ends(self, y0: Tensor) -> bool:
        """Whether every step starts at ``t + dt`` of the sample's previous accepted step bit
        for bit (:attr:`~diffeqbridge.solvers.base.Startup.exact_times`): a float64 state (the
        solver's ``dt`` is ``dt_eval`` unrounded; ``t - h == t + (-h)`` backwards), no observer
        (events move samples), and a step landing on a forced time (``t_new = target``,
        ``dt = target - t``) either ends the solve (adaptive: no forced time inside the span)
        or lands exactly (fixed steps: checked on the shared grid).  Decided once per
        integrator (a checkpointed backward's re-runs, without the observer, keep it)."""
        if self._exact_ends is None:
            if y0.dtype != torch.float64 or self.observer is not None:
                self._exact_ends = False
            elif self.grid is not None:
                # (the last step is followed by none)
                grid, steps = self.grid, self._grid_steps
                self._exact_ends = all(a + h == b for a, h, b in zip(grid[:-2], steps[:-1], grid[1:-1]))
            else:
                self._exact_ends = self.n_stop <= 2
        return self._exact_ends

    def solver_init(self, t: Tensor, y0: Tensor, start_values: StartValues | None) -> Any:
        """``solver.init`` with the :class:`~diffeqbridge.solvers.base.Startup` of this solve
        (``start_values``: the start-up ``(drift(t0, y0), diffusion(t0, y0))``, None or None
        entries when not evaluated)."""
        f0, g0 = (None, None) if start_values is None else start_values
        return self.solver.init(self.terms, t, y0, Startup(f0=f0, g0=g0, exact_times=self.exact_step_ends(y0)))

    def init(
        self,
        y0: Tensor,
        dt_initial: Tensor,
        f0: Tensor | None,
        initial_counts: tuple[int, int],
        start_values: StartValues | None = None,
    ) -> LoopState:
        """The loop state at the start (``f0``: ``drift(t0, y0)`` for FSAL solvers;
        ``initial_counts``: the start-up evaluations already spent per sample;
        ``start_values``: ``(drift(t0, y0), diffusion(t0, y0))`` as the start-up evaluated
        them, reused by the first step (:func:`_start_terms`) and by solvers carrying the
        diffusion (:meth:`solver_init`))."""
        batch, device, solver = y0.shape[0], y0.device, self.solver
        self._start_values = None if start_values is None else (y0, *start_values)
        t = self.save_times[:1].repeat(batch)  # dense strides (a compiled iteration guards on them)
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
            stop_index=zeros + 1,
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
            solver_state=self.solver_init(t, y0, start_values),
            ys=ys,
        )

    def snapshot(self, s: LoopState) -> LoopState:
        """A detached copy of ``s`` to restart from; ``ys`` is not kept."""
        copy = LoopState(**{k: _detach(v) for k, v in vars(s).items()})
        copy.ys = s.ys.new_empty(0)
        return copy

    def restore(self, snap: LoopState, y: Tensor, carry: Any, solver_state: Any = None) -> LoopState:
        """The state of ``snap`` with ``y``/``carry`` (and ``solver_state`` unless None)
        replaced (e.g. leaves requiring grad)."""
        self.rerun = True
        state = LoopState(**vars(snap))
        state.y, state.carry = y, carry
        if solver_state is not None:
            state.solver_state = solver_state
        state.ys = torch.full((self.n_save, *y.shape), float("nan"), dtype=y.dtype, device=y.device)
        return state

    def run(
        self, s: LoopState, stop_at: int | None = None, boundaries: list[float] | None = None, progress: bool = False
    ) -> list[LoopState]:
        """Iterate until every sample stopped (or iteration ``stop_at``).  Returns a snapshot
        taken at the first check after the slowest sample passed each of ``boundaries``."""
        snaps: list[LoopState] = []
        self._stop_at, self._snapshots = stop_at, bool(boundaries)
        if self._lockstep_applies(s, stop_at, boundaries, progress) and self._run_lockstep(s):
            return snaps
        pending = list(boundaries or [])
        sign, grid, every = self.sign, self.grid, self.options.check_every
        bar = _Progress(progress, float(self.t_start), float(self.t_end))
        refused = self.compact_refusal()
        full, idx = s, None  # s: the compacted state once samples left the batch (rows idx of full)
        phase = self._check_phase(every, stop_at)
        while stop_at is None or s.iteration < stop_at:
            if grid is not None and s.iteration == len(grid) - 1:
                break  # every sample has reached the end or stopped earlier
            if s.iteration % every == phase or s.iteration == 0:
                if len(self._pending) >= FLUSH_AFTER:
                    self._flush_saves(s)
                n_active = int(s.active.sum())
                if bar.enabled or pending:  # the slowest sample's time: for the bar and snapshots only
                    slowest = float(sign * (sign * torch.where(s.active, s.t, self.t_end)).min())
                    bar.update(slowest, n_active)
                passed = False
                while pending and (n_active == 0 or sign * (slowest - pending[0]) >= 0):
                    pending.pop(0)
                    passed = True
                if passed and n_active:
                    self._flush_saves(s)
                    if idx is not None:  # a snapshot restarts the full batch
                        self._write_back(full, s, idx)
                    snaps.append(self.snapshot(full))
                if n_active == 0:
                    break
                if refused is None and n_active < self.options.compact * s.t.shape[0]:
                    refused = self._state_refusal(s) or self._field_refusal(s)
                    if refused is None:
                        self._flush_saves(s)
                        s, idx = self._compact(full, s, idx)
                s.solver_state = self.solver.plan(s.solver_state, s.active, every)
            self.step(s)
        self._flush_saves(s)
        if idx is not None:
            self._expand(full, s, idx)
        bar.update(float(self.t_end), 0)
        bar.close()
        self.compact_refused = refused if self.options.compact > 0 else None
        if self.compact_refused is not None and self.options.compact_warn and not self.rerun:
            warnings.warn(f"compact={self.options.compact:g} not applied: {self.compact_refused}", RuntimeWarning, stacklevel=2)
        return snaps

    def _lockstep_applies(self, s: LoopState, stop_at: int | None, boundaries: list[float] | None, progress: bool) -> bool:
        """Whether :meth:`run` may take :meth:`_run_lockstep`: a fixed-step SDE solve on a grid
        shared by the batch with nothing that watches single iterations (no observer,
        snapshots, ``stop_at``, progress bar, compaction or ``compile=True``), steps left, a
        tree that answers a grid in one query, and a solver that is not ``implicit`` (the loop
        takes all its steps; a composite hands over at its stiff method's first step,
        :meth:`AbstractSolver.implicit_next`)."""
        opts = self.options
        return (
            LOCKSTEP_FAST_PATH
            and self.grid is not None
            and self.controller is None
            and not self.solver.implicit
            and self.observer is None
            and not (opts.compile or progress or boundaries or opts.compact > 0)
            and stop_at is None
            and s.iteration < len(self.grid) - 1
            and hasattr(self.tree, "evaluate_grid")
        )

    def _run_lockstep(self, s: LoopState) -> bool:
        """The rest of a lockstep fixed-step solve (:meth:`_lockstep_applies`) without the
        per-iteration machinery: the Brownian values of the whole remaining grid in one tree
        query (:meth:`VirtualBrownianTree.evaluate_grid`), then per step only the solver's step
        and a running ``max |y|``; no masks, merges, counters or stop checks, so the forward
        issues few ops and the autograd graph holds little besides the solver's own.  The
        results, ``ys`` and the final state (times, counters, retcodes, solver state) are
        those of the per-iteration loop bit for bit: every sample is active and every step is
        accepted there too.  A step that is not finite or passes ``sqrt(floatmax)`` (where the
        loop stops the sample) or too few ``max_steps`` make it return False with ``s``
        untouched (the loop then runs); a step reporting Newton flags or Jacobians (a
        composite whose stiff method starts to run) makes it return False with the steps
        before it in ``s`` (:meth:`_lockstep_commit`; the loop takes over from there, none
        is taken twice); stiffness reports (SRI, ShARK) are kept as the loop's ``_stats``
        keeps them.  Returns True when the solve is complete."""
        grid, solver, tree, every = self.grid, self.solver, self.tree, self.options.check_every
        assert grid is not None and tree is not None and s.stop_index is not None
        first, n, dtype = s.iteration, len(grid) - 1, s.y.dtype
        taken = (s.naccept + s.nreject).amax()
        # the loop would stop a sample with MaxIters before its last step
        if not bool(s.active.all() & (taken + (n - first - 1) < self.options.max_steps)):
            return False
        levy = solver.needs_levy_area
        w, j = tree.evaluate_grid(grid[first:], levy=levy)  # (T, B, N) each
        batch, device = s.t.shape[0], s.t.device
        times = torch.tensor(grid[first:], dtype=torch.float64, device=device).unsqueeze(1).repeat(1, batch)  # (T, B)
        steps64 = torch.tensor(self._grid_steps[first:], dtype=torch.float64, device=device).unsqueeze(1).repeat(1, batch)
        steps, sizes = steps64.to(dtype), steps64.abs()
        dws = None if levy else (w[1:] - w[:-1]).reshape(n - first, *tree.shape).to(tree.dtype).to(dtype)
        y, carry, state = s.y, s.carry, s.solver_state
        start = self._start_values  # consumed only when the lockstep run completes
        peak: Tensor | None = None
        nf: int | Tensor = 0  # composites count per sample
        ng: int | Tensor = 0
        eigen_last, eigen_max = s.eigen_last, s.eigen_max  # stiffness reports: the loop's _stats, every step accepted
        saves: list[tuple[int, Tensor]] = []
        everyone = torch.ones_like(s.active)
        for k, i in enumerate(range(first, n)):
            if i % every == 0:
                state = solver.plan(state, everyone, every)
            if solver.implicit_next(state):  # Newton flags: the loop takes this step
                return self._lockstep_hand_over(
                    s, first, k, peak, (w, j), (y, carry, state, eigen_last, eigen_max, saves, nf, ng)
                )
            if levy:
                assert j is not None
                dw, levy_h = tree.increment_from(times[k], (w[k], j[k]), times[k + 1], (w[k + 1], j[k + 1]))
                dw, levy_h = dw.to(dtype), levy_h.to(dtype)
            else:
                assert dws is not None
                dw, levy_h = dws[k], None
            if k == 0 and start is not None and start[0] is y and solver.one_method(state):
                t_k = times[k]  # one tensor object: _start_terms matches by identity
                terms, hits = _start_terms(self.terms, t_k, y, start[1:])
                out = _discount(call_step(solver, terms, t_k, y, steps[k], dw, levy_h, carry, state), hits)
            else:
                out = call_step(solver, self.terms, times[k], y, steps[k], dw, levy_h, carry, state)
            if out.converged is not None or out.njac is not None:  # implicit_next said otherwise
                return self._lockstep_hand_over(
                    s, first, k, peak, (w, j), (y, carry, state, eigen_last, eigen_max, saves, nf, ng)
                )
            if out.stiffness is not None:
                eigen_last = out.stiffness.detach().to(torch.float64)
                eigen_max = _running_max(eigen_max, eigen_last)
            size = out.y1.detach().abs().amax()
            peak = size if peak is None else torch.maximum(peak, size)  # NaN propagates
            nf, ng = nf + out.nf, ng + out.ng
            if solver.carries_state and state is not None:
                state = out.state
            else:
                state, _ = solver.update(state, everyone, everyone, times[k + 1], sizes[k], out)
            if solver.fsal and out.f1 is not None and carry is not None:
                carry = out.f1
            y = out.y1
            if i + 1 in self.save_slots:
                saves.append((self.save_slots[i + 1], y))
        if peak is None or not bool(peak <= _SQRT_FLOATMAX[dtype]):  # non-finite or unstable: the loop decides
            return False
        self._lockstep_commit(s, first, n - first, (w, j), (y, carry, state, eigen_last, eigen_max, saves, nf, ng))
        s.retcodes = torch.full_like(s.retcodes, SUCCESS)
        s.active = torch.zeros_like(s.active)
        return True

    def _lockstep_hand_over(
        self,
        s: LoopState,
        first: int,
        k: int,
        peak: Tensor | None,
        tree_values: tuple[Tensor, Tensor | None],
        progress: tuple[Any, ...],
    ) -> bool:
        """False, for :meth:`run` to go on with the loop from the ``k`` lockstep steps taken
        (:meth:`_lockstep_commit`), or from ``s`` untouched where none was or one was not
        finite or passed ``sqrt(floatmax)`` (``peak``: their running ``max |y|``)."""
        if k > 0 and peak is not None and bool(peak <= _SQRT_FLOATMAX[s.y.dtype]):
            self._lockstep_commit(s, first, k, tree_values, progress)
        return False

    def _lockstep_commit(
        self, s: LoopState, first: int, k: int, tree_values: tuple[Tensor, Tensor | None], progress: tuple[Any, ...]
    ) -> None:
        """Write ``k`` lockstep steps taken from iteration ``first`` into ``s`` as the loop would
        have left it after them (every sample active, every step accepted): ``progress`` is
        ``(y, carry, solver_state, eigen_last, eigen_max, saves, nf, ng)`` after those steps,
        ``tree_values`` the grid's Brownian values ``(W, J)`` from ``grid[first]`` (``(T, B, N)``)."""
        y, carry, state, eigen_last, eigen_max, saves, nf, ng = progress
        w, j = tree_values
        assert self.grid is not None and s.stop_index is not None
        s.y, s.carry, s.solver_state, s.iteration = y, carry, state, first + k
        s.t = torch.full_like(s.t, self.grid[first + k])
        self._start_values = None
        s.tree_state = (w[k], j[k] if j is not None else None)
        s.eigen_last, s.eigen_max = eigen_last, eigen_max
        for slot, value in saves:
            s.ys[slot, self.lanes] = value
        s.save_index = s.save_index + len(saves)
        s.stop_index = s.stop_index + sum(1 for i in self._reached if first < i <= first + k)
        s.nf, s.ng, s.naccept = s.nf + nf, s.ng + ng, s.naccept + k

    def compact_refusal(self) -> str | None:
        """Why ``solve(..., compact=f)`` cannot compact this run (None: it can).  Compaction
        needs samples that are independent rows the loop can gather: no observers (events,
        dense output and regularizers record the full batch), a solver whose steps do not
        couple samples (``batch_coupled``; its state in ``LoopState.solver_state`` is gathered
        like the rest), and not ``compile=True`` (every compacted size would be a new
        compilation).  Checkpointed runs compact: their snapshots are of the full batch, and a
        segment's re-run with masked fields is caught by :meth:`_field_refusal`."""
        if self.options.compact <= 0:
            return "compact=0"
        if self.options.compile:
            return "compile=True (every compacted batch size would be a new compilation)"
        if self.observer is not None:
            return "events, dense output and regularizers observe the full batch"
        return _batch_coupling(self.solver)

    def _state_refusal(self, s: LoopState) -> str | None:
        """Why the loop state cannot be gathered by sample (a tensor that is not batch-first)."""
        batch = s.t.shape[0]
        return next((r for name in _PER_SAMPLE if (r := _not_batch_first(getattr(s, name), batch, name))), None)

    def _field_refusal(self, s: LoopState) -> str | None:
        """Why the user's fields cannot run on the running samples alone: ``field(t[rows],
        y[rows])`` must equal ``field(t, y)[rows]`` bit for bit (drift and diffusion, at the
        current state, without gradients).  Catches fields that capture per-sample tensors of
        the batch's shape or couple samples, and kernels whose rounding depends on the batch
        size.  Two calls of each field per compaction, not counted in the stats."""
        rows = s.active.nonzero().squeeze(1)
        t, y = s.t, s.y.detach()
        fields = (("drift", self.terms.drift), ("diffusion", self.terms.diffusion))
        with torch.no_grad():
            for name, field in fields:
                if field is None:
                    continue
                try:
                    whole = field(t, y).index_select(0, rows)
                    part = field(t.index_select(0, rows), y.index_select(0, rows))
                except Exception as exc:  # e.g. a captured (B, ...) tensor meets fewer rows
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    return f"{name}(t, y) fails on the running samples alone ({type(exc).__name__}: {first})"
                same = part.shape == whole.shape and bool(((part == whole) | (part.isnan() & whole.isnan())).all())
                if not same:
                    return (
                        f"{name}(t, y) on the running samples alone differs from those rows of the full "
                        "batch (a field that couples samples or captures per-sample tensors, or a kernel "
                        "whose rounding depends on the batch size)"
                    )
        return None

    def _compact(self, full: LoopState, part: LoopState, idx: Tensor | None) -> tuple[LoopState, Tensor]:
        """The active samples of ``part`` (rows ``idx`` of ``full``; None: ``part`` is ``full``)
        as a smaller state, and their rows of ``full``.  ``part`` is first written back to
        ``full`` (the samples leaving now keep their final values).  Finished samples are
        frozen in the masked loop, so leaving them out changes no other sample's bits (every
        reduction is per sample; the Brownian tree is selected to the same rows)."""
        rows = part.active.nonzero().squeeze(1)
        if idx is None:
            self._full_batch = (self.tree, self.growth_bound)
            new_idx = rows
        else:
            self._write_back(full, part, idx)
            new_idx = idx.index_select(0, rows)
        small = LoopState(**vars(part))  # ys is shared: saves go to rows self.lanes
        for name in _PER_SAMPLE:
            setattr(small, name, _gather(getattr(part, name), rows))
        assert self.growth_bound is not None
        self.growth_bound, self.lanes = self.growth_bound.index_select(0, rows), new_idx
        if self.tree is not None:
            self.tree = self.tree.select(rows)
        return small, new_idx

    def _write_back(self, full: LoopState, part: LoopState, idx: Tensor) -> None:
        """Write the compacted state ``part`` into rows ``idx`` of ``full``."""
        batch = full.t.shape[0]
        for name in _PER_SAMPLE:
            setattr(full, name, _scatter(getattr(full, name), getattr(part, name), idx, batch))
        full.iteration = part.iteration

    def _expand(self, full: LoopState, part: LoopState, idx: Tensor) -> None:
        """End of a compacted run: ``part`` written back to ``full``, the full batch's tree,
        growth bounds and lanes restored."""
        self._write_back(full, part, idx)
        self.tree, self.growth_bound = self._full_batch
        self.lanes = torch.arange(full.t.shape[0], device=idx.device)

    def step(self, s: LoopState) -> None:
        """One iteration, updating ``s`` in place: propose -> noise -> :meth:`_advance`
        (solver, controller, masked merge, stop checks) -> :meth:`_save`."""
        repeat = self._repeat(s)
        s.iteration += repeat
        if self._fused():
            record = self._fused_step(s, repeat)
        else:
            proposal = self._propose(s)
            record = self._advance(s, proposal, self._noise(s, proposal[2]), False)
        if record is not None:  # None: saved inside the compiled graph
            self._save(s, record)

    def _propose(self, s: LoopState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Clip every active sample's step to its next forced time (fixed step: snap to a grid
        point near it): ``(hits, step_dt, t_new, dt_eval)``, all ``(B,)`` (``dt_eval``: the
        signed step the solver is called with)."""
        sign, stop = self.sign, s.stop_index
        assert stop is not None
        target = self.stops.index_select(0, stop.clamp(max=self.n_stop - 1))
        if self.controller is not None:
            step_dt, t_new, hits = clip_step(s.dt, s.t, target, s.active, sign)
        else:
            snap = snap_tolerance(s.dt, (), self._snap_bounds)
            step_dt, t_new, hits = clip_step(s.dt, s.t, target, s.active, sign, snap, stop >= self.n_stop - 1)
        dt_eval = _masked_lanes(s.active, s.t, step_dt, sign, self.t_start, self.t_end)
        return hits, step_dt, t_new, dt_eval

    def _advance(
        self,
        s: LoopState,
        proposal: tuple[Tensor, Tensor, Tensor, Tensor],
        noise: tuple[Any, Tensor | None, Tensor | None],
        direct: bool,
    ) -> tuple[Any, ...]:
        """Solver step, controller, masked merge, stop index and stop checks of one iteration
        (``s`` updated in place; ``direct``: :func:`_iteration_core` called directly with the
        tolerances as tensors, as :meth:`_fused_step` compiles it; else through :func:`_run_core`).
        Returns what :meth:`_save` needs (``s.ys`` and ``s.save_index`` are not touched here)."""
        opts, solver, grid = self.options, self.solver, self.grid
        hits, step_dt, t_new, dt_eval = proposal
        new_tree_state, dw, levy = noise
        stop = s.stop_index
        assert stop is not None
        # --- solver
        tolerances = (self._tolerances if direct else (opts.atol, opts.rtol)) if self.controller is not None else None
        args = (
            dt_eval.to(s.y.dtype),
            dw,
            levy if solver.needs_levy_area else None,
            s.carry,
            s.solver_state,
            s.active,
            tolerances,
        )
        start = self._start_values
        if start is not None:  # the first iteration (compiled ones see None: no attribute write)
            self._start_values = None
        if start is not None and start[0] is s.y and solver.one_method(s.solver_state):  # eager (compile=True too: never traced)
            terms, reused = _start_terms(self.terms, s.t, s.y, start[1:])
            out, err, accepted = _iteration_core(solver, terms, s.t, s.y, *args)
            _discount(out, reused)
        elif direct:
            out, err, accepted = _iteration_core(solver, self.terms, s.t, s.y, *args)
        else:
            out, err, accepted = _run_core(opts, solver, self.terms, s.t, s.y, *args)
        # --- controller decision
        rejected = _and_not(s.active, accepted)
        self._stats(s, out, accepted, rejected)
        if solver.carries_state and s.solver_state is not None:  # per-sample values: kept where not accepted
            s.solver_state, dt_factor = _select(accepted, out.state, s.solver_state), None
        else:
            s.solver_state, dt_factor = solver.update(
                s.solver_state, accepted, s.active, torch.where(accepted, t_new, s.t), dt_eval.abs(), out
            )
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
                t_prev,
                y_prev,
                s.t,
                s.y,
                s.carry,
                s.tree_state,
                accepted,
                hits,
                out,
                f_prev,
                dt_eval,
                self.tree,
                t_forced=self._forced_time(s, stop, accepted & hits),
            )
        reached = accepted & hits
        if self._jumps is not None:
            self._leap_jumps(s, stop, reached)
        s.stop_index = stop + reached
        # --- stop: finished, unstable, controller limits, max steps
        self._stop(s, accepted, rejected, reached & (s.stop_index >= self.n_stop), stopped, step_dt, err, hits, dt_factor, out)
        if self.observer is not None:
            self.observer.observe(t_prev, y_prev, t_new, step_dt, out, accepted | rejected, accepted, s.dt, f_prev)
        return stop, reached, (t_prev, y_prev, f_prev, dt_eval, out, accepted) if self.interpolate else None

    def _save(self, s: LoopState, record: tuple[Any, ...]) -> None:
        """The save stage, after the stop checks (which change neither ``y`` nor ``t``): a
        forced time that is a save time gets the step's end state; with saves by
        interpolation, the save times strictly inside the step are queued first."""
        stop, reached, step = record
        slot = self.stop_slot.index_select(0, stop.clamp(max=self.n_stop - 1))
        saved_now = reached & (slot >= 0)
        if step is not None:
            self._queue_saves(s, *step)
        slot, lanes = slot.clamp(min=0), self.lanes
        if self.grid is None or s.iteration in self.save_iterations:  # lockstep: nobody saves in between
            s.ys[slot, lanes] = _select(saved_now, s.y, s.ys[slot, lanes])
        s.save_index = s.save_index + saved_now

    def _fused(self) -> bool:
        """Whether the iteration runs as compiled regions (:meth:`_fused_step`): ``compile=True``,
        no observers (events, dense output, regularizers keep Python state between iterations)
        and no failed compilation for this solver and these functions."""
        return self.options.compile and self.observer is None and self._fuse_key not in _COMPILE_FAILED

    def _iteration(self, s: LoopState, direct: bool, save: bool = False, repeat: int = 1) -> tuple[Any, ...] | None:
        """:meth:`_propose`, :meth:`_noise` and :meth:`_advance`: one compiled region for ODEs
        and for SDEs whose tree query the compiler traces (``_tree_in_graph``); with ``save``
        :meth:`_save` too (then None, else its record), ``repeat`` times (:meth:`_repeat`)."""
        for _ in range(repeat - 1):
            self._iteration(s, direct, True)
        proposal = self._propose(s)
        record = self._advance(s, proposal, self._noise(s, proposal[2]), direct)
        if not save:
            return record
        self._save(s, record)
        return None

    def _check_phase(self, every: int, stop_at: int | None) -> int:
        """The iterations :meth:`run` checks at besides the first: ``iteration % every ==
        phase``.  1 where compiled calls may run ``every`` iterations (:meth:`_repeat`): the
        first iteration runs eagerly, so checking right after it lets every later call be an
        unrolled one (with phase 0, iterations 1 to ``every - 1`` would be one compiled call
        each, and a second graph compiled for them)."""
        return 1 if self.options.compile and every > 1 and stop_at is None else 0

    def _repeat(self, s: LoopState) -> int:
        """How many iterations the next compiled call runs: ``check_every`` (unrolled in one
        graph, amortising the call's overhead) right after a check, when the iteration saves in
        the graph (:meth:`_save_in_graph`) and :meth:`run` has no ``stop_at``; else 1.  Stopped
        samples are frozen, so the iterations past the last sample's end change nothing (the
        per-iteration loop runs them too, up to its next check)."""
        every = self.options.check_every
        if every == 1 or s.iteration == 0 or self._stop_at is not None or not self._fused():
            return 1
        if s.iteration % every != self._check_phase(every, self._stop_at):
            return 1
        if (self.tree is not None and not self._tree_in_graph) or not self._save_in_graph(s):
            return 1
        return every

    def _save_in_graph(self, s: LoopState) -> bool:
        """Whether the compiled iteration saves too: saves at forced times only (no queued
        interpolated saves, no fixed-step grid) into a small ``ys`` (its in-place write is a
        graph-input mutation, copied back whole after every call)."""
        return not self.interpolate and self.grid is None and s.ys.numel() <= _SAVE_IN_GRAPH_ELEMENTS

    def _sde_advance(
        self, s: LoopState, proposal: tuple[Tensor, Tensor, Tensor, Tensor], noise: tuple[Any, Tensor | None, Tensor | None]
    ) -> tuple[tuple[Any, ...], tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`_advance`, then the next iteration's :meth:`_propose` (which the tree query
        needs before the next compiled region): one compiled region for SDEs."""
        return self._advance(s, proposal, noise, True), self._propose(s)

    def _fused_step(self, s: LoopState, repeat: int = 1) -> tuple[Any, ...] | None:
        """The iteration through ``torch.compile(fullgraph=True)``: ODEs and adaptive SDEs on
        the CPU's C tree kernel (its custom ops, :meth:`VirtualBrownianTree.evaluate_op`) as one
        graph (:meth:`_iteration`); other SDEs query the tree eagerly between graphs that run
        :meth:`_advance` (the solver step with the user's functions, error norm, controller,
        masked merge and stop checks) and propose the next step (:meth:`_sde_advance`).  After
        a failed compilation: a one-time warning and the per-core path."""
        global _FUSED_SDE, _FUSED_ITERATION, _FUSED_UNROLLED, _CPP_WRAPPER_UNROLLED
        if s.iteration == 1:  # eagerly once: the optional state (stiffness, Jacobian counts) appears here
            tree = self.tree
            self._tree_in_graph = self.grid is None and isinstance(tree, VirtualBrownianTree) and tree.traceable
            return self._iteration(s, True)
        if _FUSED_SDE is None or _FUSED_ITERATION is None or _FUSED_UNROLLED is None:
            _configure_compile()
            # size_asserts off: inductor's re-check of ~20 input sizes/strides per call (14 % of a
            # compiled Lotka-Volterra iteration) repeats what dynamo's guards already checked
            options: dict[str, str | int | bool | Callable[..., Any]] = {"size_asserts": False}
            _FUSED_SDE = torch.compile(Integrator._sde_advance, dynamic=False, fullgraph=True, options=options)
            _FUSED_ITERATION = torch.compile(Integrator._iteration, dynamic=False, fullgraph=True, options=options)
            cpp: dict[str, str | int | bool | Callable[..., Any]] = {**options, "cpp_wrapper": True}
            _FUSED_UNROLLED = torch.compile(Integrator._iteration, dynamic=False, fullgraph=True, options=cpp)
        if self.tree is None or self._tree_in_graph:
            save = self._save_in_graph(s)
            try:
                if save and self._graph_device and self._replay(s, repeat):
                    return None
                if self._cpp_wrapper(s, repeat):
                    try:
                        return _FUSED_UNROLLED(self, s, True, save, repeat)  # type: ignore[no-any-return]
                    except Exception as exc:  # the Python wrapper then, for the rest of the process
                        _CPP_WRAPPER_UNROLLED = False
                        warnings.warn(
                            f"compile=True: inductor's C++ wrapper failed ({type(exc).__name__}); unrolled "
                            "calls use its Python wrapper",
                            RuntimeWarning,
                            stacklevel=4,
                        )
                return _FUSED_ITERATION(self, s, True, save, repeat)  # type: ignore[no-any-return]
            except Exception as exc:  # no compiler, unsupported op, graph break: fall back
                _COMPILE_FAILED[self._fuse_key] = _compile_failure(exc, self.solver, s.y)
                self._tree_in_graph = False
                return self._iteration(s, False, repeat > 1, repeat)
        # the proposal the previous compiled region made, unless the state changed since
        # (snapshot restored, batch compacted: another ``s.t``)
        made_for, proposal = self._next_proposal
        if made_for is not s.t or proposal is None:
            proposal = self._propose(s)
        noise = self._noise(s, proposal[2])
        try:
            record, next_proposal = _FUSED_SDE(self, s, proposal, noise)
        except Exception as exc:
            _COMPILE_FAILED[self._fuse_key] = _compile_failure(exc, self.solver, s.y)
            return self._advance(s, proposal, noise, False)
        self._next_proposal = (s.t, next_proposal)
        return record  # type: ignore[no-any-return]

    def _cpp_wrapper(self, s: LoopState, repeat: int) -> bool:
        """Whether this compiled call goes through inductor's C++ wrapper: unrolled ODE calls
        (``repeat > 1``, no tree) on the CPU.  An unrolled call's graph is one C++ kernel and
        ~300 buffers its wrapper allocates or views per call (Lotka-Volterra, B = 64, 8
        iterations); the C++ wrapper does that without Python, 13-16 % of a solve
        (docs/engine.md), for 3-24 s more compilation per graph (load 2-4; and, once per
        inductor cache, its precompiled header).  CUDA captures graphs instead; one-iteration
        calls and differentiated solves (a backward graph too: untested with it) keep the
        Python wrapper."""
        return repeat > 1 and _CPP_WRAPPER_UNROLLED and self.tree is None and s.y.device.type == "cpu" and not s.y.requires_grad

    def _replay(self, s: LoopState, repeat: int) -> bool:
        """compile=True on CUDA: run this compiled call (``repeat`` iterations, saving in the
        graph) as a replay of its captured CUDA graph (:mod:`._cuda_graph`), captured at its
        second call (the first compiles it); False where the caller makes the plain compiled
        call: that first call, states with gradients or non-tensor leaves, runs with
        ``stop_at`` or snapshots, and after a failed capture (one warning)."""
        if self._fuse_key in _GRAPH_FAILED or self._snapshots or self._stop_at is not None:
            return False
        found = _cuda_graph.layout(s, _GRAPH_FIELDS)
        if found is None:
            return False
        key = (repeat, found[0])
        graphed = self._graphs.get(key)
        if graphed is None:
            if key not in self._graphs:  # first call of this layout: compile it, plainly
                if len(self._graphs) < _MAX_GRAPHS:
                    self._graphs[key] = None
                return False
            # the compiled function the first call compiled (no compiling during a capture)
            fused = _FUSED_UNROLLED if self._cpp_wrapper(s, repeat) else _FUSED_ITERATION
            assert fused is not None
            try:
                graphed = _cuda_graph.capture(lambda work: fused(self, work, True, True, repeat), s, _GRAPH_FIELDS, _new_graph())
            except Exception as exc:  # a host sync, an uncapturable op: compiled calls without graphs
                message = str(exc).strip()
                _GRAPH_FAILED[self._fuse_key] = f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"
                warnings.warn(
                    f"compile=True: CUDA graph capture failed for {type(self.solver).__name__}; running the "
                    f"compiled iteration without graphs. Reason: {_GRAPH_FAILED[self._fuse_key]}",
                    RuntimeWarning,
                    stacklevel=5,
                )
                return False
            self._graphs[key] = graphed
        graphed.replay(s, found[1])
        return True

    def _queue_saves(
        self, s: LoopState, t_prev: Tensor, y_prev: Tensor, f_prev: Any, h: Tensor, out: StepOutput, accepted: Tensor
    ) -> None:
        """Queue the save times strictly inside the accepted step ``[t_prev, s.t)`` (``h``:
        ``(B,)`` the signed step the solver took; an event may have cut it short) for
        :meth:`_flush_saves`; a save time equal to ``s.t`` is the next step's ``θ = 0`` (or a
        forced time's save).  No host synchronisation."""
        key = s.t if self.sign > 0 else -s.t
        before = torch.searchsorted(self._ascending, key.contiguous())  # save times < t
        # save_index >= before(t) always (equal after an interpolated save, one more after a save
        # at t itself), so a sample that did not move has count <= 0: nothing queued
        self._pending.append(_QueuedStep(s.save_index, before - s.save_index, t_prev, h, y_prev, out, f_prev))
        s.save_index = torch.where(accepted, before, s.save_index)

    def _flush_saves(self, s: LoopState) -> None:
        """Write the queued saves: save ``j`` of sample ``b`` in a queued step at ``θ =
        (t_save - t) / h`` of that step's interpolant (:func:`diffeqbridge.dense.horner`).  The
        steps that hold saves are concatenated along the batch axis and evaluated at once, an
        ``(R B, m)`` block (``m`` the most saves of any sample in one step), then scattered
        into ``ys``.  One host synchronisation (which steps hold saves, and ``m``)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        largest = torch.stack([p.n.max() for p in pending]).tolist()
        work = [p for p, m in zip(pending, largest) if m > 0]
        if not work:
            return
        first, count = torch.cat([p.first for p in work]), torch.cat([p.n for p in work])
        t, h, y = torch.cat([p.t for p in work]), torch.cat([p.h for p in work]), torch.cat([p.y for p in work])
        outs = [p.out for p in work]
        stages = [o.stages for o in outs]
        out = StepOutput(
            y1=torch.cat([o.y1 for o in outs]),
            error=None,
            nf=0,
            ng=0,
            f1=_cat_all([o.f1 for o in outs]),
            stages=None if any(k is None for k in stages) else [torch.cat(k) for k in zip(*stages)],  # type: ignore[misc]
            method=_cat_all([o.method for o in outs]),
        )
        f0 = _cat_all([p.f0 if isinstance(p.f0, Tensor) else None for p in work])
        j = torch.arange(int(max(largest)), device=count.device)
        valid = j < count.unsqueeze(1)  # (R B, m)
        index = torch.where(valid, first.unsqueeze(1) + j, 0)
        theta = (self.save_times[index] - t.unsqueeze(1)) / h.unsqueeze(1)
        coeffs = step_coefficients(self.kind, y, out.y1, h, out, f0)
        values = horner(y.unsqueeze(1), [c.unsqueeze(1) for c in coeffs], theta)  # (R B, m, *state)
        rows = self.lanes.repeat(len(work)).unsqueeze(1).expand_as(index)
        s.ys[index[valid], rows[valid]] = values[valid]

    def _noise(self, s: LoopState, t_new: Tensor) -> tuple[Any, Tensor | None, Tensor | None]:
        tree, grid, dtype = self.tree, self.grid, s.y.dtype
        if tree is None:
            return None, None, None
        if self._tree_in_graph:  # the C kernel's custom ops (same kernel, same bits), traceable
            point = tree.evaluate_op(t_new)
            dw, levy = tree.increment_op(s.t, s.tree_state, t_new, point)  # type: ignore[arg-type]
            return point, dw.to(dtype), levy.to(dtype)
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
            s.eigen_max = _running_max(s.eigen_max, s.eigen_last)
        s.nf = _count(s.nf, s.active, out.nf)
        s.ng = _count(s.ng, s.active, out.ng)
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
            s.retcodes = torch.where(mask, code, s.retcodes)
            s.active = _and_not(s.active, mask)

        # unstable_check: a state past sqrt(floatmax) is blowing up; stop it now rather than
        # crawl towards DtLessThanMin (NaN/Inf proposals are rejected before they get here)
        y_size = s.y.detach().abs().flatten(1).amax(dim=1)
        end(finished, SUCCESS)
        if stopped is not None:  # events hook: a terminating event (even at t1)
            end(stopped, TERMINATED)
        end(_and_not(accepted, y_size <= _SQRT_FLOATMAX[s.y.dtype]), UNSTABLE)
        newton_failed = s.active & ~out.converged if out.converged is not None else None
        if self.controller is not None:
            assert err is not None
            proposed, s.qold = self.controller.next_dt(step_dt, s.dt, err, s.qold, accepted, hits, dt_factor)
            s.dt = torch.where(s.active, proposed, s.dt)
            # as SciML (timedepentdtmin): below max(dtmin, spacing of t), on accepted steps too
            too_small = s.active & (s.dt < torch.maximum(_spacing(s.t), self.dtmin))
            assert self.growth_bound is not None
            # a step that underflows while the state grew a millionfold is a blow-up
            code = torch.where(y_size > self.growth_bound, UNSTABLE, DT_LESS_THAN_MIN)
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
        end(s.active & (s.naccept + s.nreject >= self.options.max_steps), MAX_ITERS)

    def solution(self, s: LoopState) -> Solution:
        stats = Stats(nf=s.nf, ng=s.ng, naccept=s.naccept, nreject=s.nreject)
        if s.eigen_last is not None and s.eigen_max is not None:
            stats.extra["eigen_est"], stats.extra["max_eigen_est"] = s.eigen_last, s.eigen_max
        if s.njac is not None:
            stats.extra["njac"] = s.njac
        stats.extra.update(self.solver.extra_stats(s.solver_state))
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
    start_values: StartValues | None = None,
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
        start_values: ``(drift(t0, y0), diffusion(t0, y0))`` as the start-up evaluated them
            (counted in ``initial_counts``): the first step reuses them instead of evaluating
            them again (:func:`_start_terms`), solvers carrying the diffusion start from the
            second (:meth:`Integrator.solver_init`).
        observer: ``solve(..., regularize=...)``'s recorder (:mod:`diffeqbridge.regularization`),
            called once per iteration after the controller; None otherwise.
    """
    loop = Integrator(terms, solver, save_times, dt_initial, options, tree, observer)
    state = loop.init(y0, dt_initial, f0, initial_counts, start_values)
    loop.run(state, progress=options.progress)
    return loop.solution(state)
