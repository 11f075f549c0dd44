"""Sensitivity algorithms (``sensealg``) of the native backend.

``deb.solve(prob, alg, ..., sensealg=...)`` decides how ``torch.autograd`` sees a solve:

==========================  ==============================  ===============================  ====================
sensealg                    memory (forward + backward)     compute (backward)               gradient
==========================  ==============================  ===============================  ====================
``None`` (default)          = ``DiscreteAdjoint()``         as below                         exact for the steps
``DiscreteAdjoint()``       O(steps) autograd graph         1 backprop through the steps     exact for the steps
``DiscreteAdjoint(k)``      O(steps / segments) + states    1 re-solve of every segment +    exact for the steps
                            at segment boundaries           backprop
``InterpolatingAdjoint()``  states at save times (+k        1 re-solve of every segment      exact for the steps
                            checkpoints); one segment's     (with graph) + backprop through
                            graph at a time                 it
``BacksolveAdjoint()``      O(1) in the number of steps     the adjoint ODE/SDE solved       continuous adjoint:
                            (states at save times only)     backwards with y (1 VJP/stage)   consistent, not exact
==========================  ==============================  ===============================  ====================

"exact for the steps" means: the gradient of the numbers the solve returned (up to rounding).
``BacksolveAdjoint`` is the optimise-then-discretise gradient (Li et al. 2020 for SDEs): it
converges to the true pathwise derivative as the backward solve is refined, and agrees with
the discrete gradient only to discretisation error.

The default.  SciMLSensitivity's automatic choice (``sensealg=nothing``) picks by problem
size and by what the user code supports (``ForwardDiffSensitivity`` for fewer than ~100
parameters+states, otherwise ``InterpolatingAdjoint``/``QuadratureAdjoint`` with the best
VJP back end that works, and ``BacksolveAdjoint`` for SDEs).  Here ``sensealg=None`` is plain
backprop through the steps (``DiscreteAdjoint()``): on the native backend the steps already
are PyTorch ops, so this is the fastest and exact option and memory is the only reason to
pick something else; pass ``DiscreteAdjoint(checkpoints=k)`` or ``InterpolatingAdjoint`` to
bound memory, ``BacksolveAdjoint`` to make it flat in the number of steps.

The autograd boundary.  Continuous/recomputing adjoints (``BacksolveAdjoint``,
``InterpolatingAdjoint``) enter autograd through ONE ``torch.autograd.Function``,
:class:`_SolveFunction`, whose inputs are ``y0`` and the problem's parameters as one flat
vector (``torch.cat`` of ``prob.params``), and whose output is ``ys`` at every save time.
Its backward runs the sensealg and returns ``(dL/dy0, dL/dθ_flat)``; autograd routes the
flat gradient back to every tensor of ``prob.params``.  Vector-Jacobian products of the
user's functions are taken with ``torch.autograd.grad`` over ``[y, *prob.params]`` (the
same VJPs ``torch.func.vjp`` over a flat vector would give); the julia backend reuses this
boundary.  Because parameters must be named explicitly, a drift/diffusion that depends on
tensors requiring grad which are *not* in ``prob.params`` is detected (one evaluation of
each function and a walk of its autograd graph) and rejected with a ``ValueError``:
SciMLSensitivity silently returns zero gradients for such closures; we refuse instead.
``DiscreteAdjoint`` is plain autograd and needs no ``params``.

Brownian noise is never stored: every recomputation (checkpoint re-solve, backward SDE)
queries the same :class:`~diffeqbridge.VirtualBrownianTree`, so it sees identical noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .brownian import VirtualBrownianTree
from .engine import EngineOptions, integrate
from .problem import ODEProblem, Terms
from .solution import ReturnCode, Solution, Stats
from .solvers.base import AbstractSolver
from .solvers.runge_kutta import DOPRI5_TABLEAU

__all__ = ["SensitivityAlgorithm", "DiscreteAdjoint", "BacksolveAdjoint", "InterpolatingAdjoint"]


def _check_checkpoints(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}(checkpoints=...) must be None or a positive int (number of segments); got {value!r}")
    return value


class SensitivityAlgorithm:
    """Base class of the native sensealgs."""

    uses_boundary: bool = False  # goes through _SolveFunction (needs explicit params)

    def check(self, prob: ODEProblem, solver: AbstractSolver, adaptive: bool) -> None:
        """Raise ValueError if this sensealg cannot differentiate ``prob`` solved by ``solver``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DiscreteAdjoint(SensitivityAlgorithm):
    """Backpropagate through the solver's steps ("discretise-then-optimise").

    Args:
        checkpoints: ``None`` keeps the autograd graph of every step (memory grows linearly
            with the number of steps, backward = one backprop).  An int ``k`` splits
            ``tspan`` into segments at the save times and at ``k`` equally spaced interior
            times, and wraps each segment's solve in ``torch.utils.checkpoint``
            (non-reentrant): the forward keeps only the state at each segment boundary; the
            backward re-runs one segment at a time (every drift/diffusion evaluation, every
            Brownian-tree query, the step-size controller) with the graph on, and backprops
            through it.  Memory is O(boundaries + steps per segment), compute is one extra
            forward solve.  The Brownian tree replays identical noise, so the recomputed
            steps are bit-identical to the forward's and the gradient is exact.

    Restrictions: none (any solver, fixed or adaptive; ``params`` not needed: plain autograd
    reaches closures).  With ``checkpoints``, every segment restarts the step-size controller
    from the initial ``dt`` and the interior checkpoint times become step endpoints, so an
    adaptive solve's output differs from ``sensealg=None``'s at the level of the tolerance
    (the gradient is exact for what was returned).
    """

    def __init__(self, checkpoints: int | None = None):
        self.checkpoints = _check_checkpoints(checkpoints, "DiscreteAdjoint")

    def __repr__(self) -> str:
        return f"DiscreteAdjoint(checkpoints={self.checkpoints})"


class InterpolatingAdjoint(SensitivityAlgorithm):
    """Checkpointed forward states, each segment re-solved on the replayed noise.

    The forward solve runs without an autograd graph and keeps the states at the save times
    (and at ``checkpoints`` extra equally spaced times).  The backward walks the segments
    from last to first: it re-solves the segment forward from its stored start state with
    the graph on (same solver, same controller, same Brownian tree, hence the same steps
    and noise) and pulls the adjoint ``a = dL/dy`` back through it with one
    ``torch.autograd.grad`` over ``[y_start, *prob.params]``, adding ``dL/dys[k]`` at each
    save time (the adjoint's jumps).

    Memory: the boundary states plus the graph of ONE segment, so it is flat in the number of
    steps for a fixed number of segments when ``checkpoints`` grows with it.  Compute: one
    extra forward solve.  Gradient: exact for the steps taken (like ``DiscreteAdjoint``).

    Restrictions: ``prob.params`` must list every tensor the drift/diffusion differentiate
    through (checked).  Segments restart the step-size controller (see ``DiscreteAdjoint``).
    SciMLSensitivity's ``InterpolatingAdjoint`` instead solves the adjoint equation backwards
    on an interpolated forward solution; for SDEs that has no interpolant, and re-solving
    with backprop gives the exact discrete gradient at the same memory profile.
    """

    uses_boundary = True

    def __init__(self, checkpoints: int | None = None):
        self.checkpoints = _check_checkpoints(checkpoints, "InterpolatingAdjoint")

    def __repr__(self) -> str:
        return f"InterpolatingAdjoint(checkpoints={self.checkpoints})"


class BacksolveAdjoint(SensitivityAlgorithm):
    """The continuous adjoint, solved backwards in time together with the state.

    ODEs: the augmented system ``[y, a, g]`` with ``y' = f``, ``a' = -a ∂f/∂y``,
    ``g' = -a ∂f/∂θ`` is integrated from ``t1`` to ``t0`` with Dormand–Prince 5(4)
    (adaptive: the forward's ``atol``/``rtol`` unless given; ``seminorm=True`` leaves the
    parameter part ``g`` out of the error norm, Kidger et al. 2021).

    SDEs: the stochastic adjoint of Li, Wong, Chen, Duvenaud (2020).  In Stratonovich form
    ``dy = b dt + σ∘dW``, backwards from ``t1``::

        dy = b dt + σ∘dW,   da = -a ∂b/∂y dt - a ∂σ/∂y ∘dW,   dg = -a ∂b/∂θ dt - a ∂σ/∂θ ∘dW

    solved with the Stratonovich Heun scheme on the SAME Brownian path (the tree is queried
    at the backward step's ends: no noise is stored).  Itô problems are converted: the
    backward uses the Stratonovich drift ``b - ½ (∂σ/∂y) σ`` (``(∂σ/∂y)σ`` is one JVP).  That
    correction is exact for scalar noise, additive noise (zero) and diagonal noise whose
    ``σ_i`` depends on ``y_i`` only (commutative diagonal noise, as SciML's diagonal-noise
    Milstein schemes assume); Itô general noise is rejected (use
    ``interpretation="stratonovich"`` or another sensealg).

    Args:
        dt: backward step.  Default: for fixed-step forward solves the forward's grid is
            replayed exactly in reverse (same points); for adaptive solves the backward is
            adaptive (shared step over the batch) starting from the forward's mean step.
        adaptive: force (True) or forbid (False) backward step control; default follows
            the forward solve.
        atol, rtol: backward tolerances (default: the forward's).
        seminorm: exclude the parameter adjoint from the error norm (default True).
        checkpointing: reset ``y`` to the forward's stored state at every save time (as
            SciMLSensitivity's ``BacksolveAdjoint(checkpointing=true)`` and torchsde do);
            False backsolves ``y`` all the way (less accurate for unstable reverse flows).

    Memory O(1) in the number of steps (the states at the save times, the augmented state);
    compute: per backward step, one VJP per stage (plus one JVP for Itô diagonal/scalar).
    The gradient is consistent (error → 0 with dt / tolerance) but not the exact gradient of
    the forward's numbers.  Needs ``prob.params`` (checked).
    """

    uses_boundary = True

    def __init__(self, dt: float | None = None, adaptive: bool | None = None, atol: float | None = None,
                 rtol: float | None = None, seminorm: bool = True, checkpointing: bool = True):
        if dt is not None and (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0):
            raise ValueError(f"BacksolveAdjoint(dt=...) must be a positive number or None; got {dt!r}")
        if adaptive is not None and not isinstance(adaptive, bool):
            raise TypeError(f"BacksolveAdjoint(adaptive=...) must be a bool or None; got {adaptive!r}")
        for name, v in (("atol", atol), ("rtol", rtol)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"BacksolveAdjoint({name}=...) must be a non-negative number or None; got {v!r}")
        self.dt = None if dt is None else float(dt)
        self.adaptive = adaptive
        self.atol, self.rtol = atol, rtol
        self.seminorm = bool(seminorm)
        self.checkpointing = bool(checkpointing)

    def check(self, prob: ODEProblem, solver: AbstractSolver, adaptive: bool) -> None:
        if prob.is_sde and prob.interpretation == "ito" and prob.noise == "general":
            raise ValueError(
                f"sensealg=BacksolveAdjoint needs the Itô→Stratonovich drift correction, which is implemented for "
                f"diagonal/scalar/additive noise only; this problem is {prob!r}. Use interpretation='stratonovich' "
                f"(with e.g. EulerHeun) or sensealg=InterpolatingAdjoint()/DiscreteAdjoint()"
            )
        if self.adaptive is False and self.dt is None and adaptive:
            raise ValueError("sensealg=BacksolveAdjoint(adaptive=False) after an adaptive solve needs dt=...")

    def __repr__(self) -> str:
        return (f"BacksolveAdjoint(dt={self.dt}, adaptive={self.adaptive}, seminorm={self.seminorm}, "
                f"checkpointing={self.checkpointing})")


SENSEALGS = (DiscreteAdjoint, BacksolveAdjoint, InterpolatingAdjoint)


def check_sensealg(sensealg: Any, prob: ODEProblem, solver: AbstractSolver, adaptive: bool) -> SensitivityAlgorithm | None:
    """Validate ``solve(..., sensealg=...)``: an instance of a native sensealg (classes are instantiated)."""
    if sensealg is None:
        return None
    if isinstance(sensealg, type) and issubclass(sensealg, SensitivityAlgorithm):
        sensealg = sensealg()
    if not isinstance(sensealg, SensitivityAlgorithm):
        raise TypeError(
            f"sensealg must be None or one of deb.DiscreteAdjoint(), deb.BacksolveAdjoint(), "
            f"deb.InterpolatingAdjoint(); got {sensealg!r}"
        )
    sensealg.check(prob, solver, adaptive)
    return sensealg


# --------------------------------------------------------------------------- helpers
def _leaf_tensors(outputs: list[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that ``outputs`` were computed from (graph walk)."""
    seen: set[int] = set()
    leaves: list[Tensor] = []
    stack = [o.grad_fn for o in outputs if isinstance(o, Tensor) and o.grad_fn is not None]
    for o in outputs:
        if isinstance(o, Tensor) and o.requires_grad and o.grad_fn is None:
            leaves.append(o)
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if isinstance(variable, Tensor):
            leaves.append(variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


def check_closure_params(prob: ODEProblem, terms: Terms, sensealg: SensitivityAlgorithm) -> None:
    """Refuse drift/diffusion that differentiate through tensors missing from ``prob.params``.

    One evaluation of each function at ``(t0, y0.detach())`` with grad enabled; the leaves of
    its autograd graph must all be in ``prob.params``.
    """
    t = torch.full((prob.batch_size,), prob.tspan[0], dtype=torch.float64, device=prob.y0.device)
    y = prob.y0.detach()
    with torch.enable_grad():
        outs = [terms.drift(t, y)]
        if terms.diffusion is not None:
            outs.append(terms.diffusion(t, y))
    known = {id(p) for p in prob.params}
    missing = [x for x in _leaf_tensors(outs) if id(x) not in known]
    if missing:
        shapes = ", ".join(str(tuple(m.shape)) for m in missing[:5])
        what = "prob.params is empty" if not prob.params else "they are not in prob.params"
        raise ValueError(
            f"sensealg={sensealg!r}: drift/diffusion depend on {len(missing)} tensor(s) that require grad "
            f"(shapes {shapes}{', ...' if len(missing) > 5 else ''}) but {what}. This sensealg differentiates "
            f"only with respect to y0 and the tensors passed explicitly as {type(prob).__name__}(..., params=...) "
            f"(an nn.Module or a list of tensors); gradients through closures would be silently zero "
            f"(as in SciMLSensitivity). Pass params=..., or use sensealg=None / DiscreteAdjoint()."
        )


def _flat_params(params: list[Tensor], like: Tensor) -> Tensor:
    if not params:
        return torch.zeros(0, dtype=like.dtype, device=like.device)
    return torch.cat([p.reshape(-1) for p in params])


def _flatten_grads(grads: tuple[Tensor | None, ...], params: list[Tensor], like: Tensor) -> Tensor:
    if not params:
        return torch.zeros(0, dtype=like.dtype, device=like.device)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).to(like.dtype)
        for g, p in zip(grads, params)
    ])


def segment_times(save_times: Tensor, checkpoints: int | None) -> tuple[Tensor, Tensor]:
    """Segment boundaries (save times ∪ ``checkpoints`` equally spaced interior times) and the
    index of every save time among them."""
    if not checkpoints or checkpoints <= 1:
        return save_times, torch.arange(save_times.numel(), device=save_times.device)
    t0, t1 = float(save_times[0]), float(save_times[-1])
    extra = torch.linspace(t0, t1, checkpoints + 1, dtype=torch.float64, device=save_times.device)[1:-1]
    span = t1 - t0
    keep = [float(e) for e in extra if bool((save_times - e).abs().min() > 1e-9 * span)]
    bounds = torch.cat([save_times, torch.tensor(keep, dtype=torch.float64, device=save_times.device)]).sort().values
    index = torch.searchsorted(bounds, save_times)
    return bounds, index


@dataclass
class _Ctx:
    """Everything the forward and backward passes of one solve need."""

    prob: ODEProblem
    terms: Terms
    solver: AbstractSolver
    save_times: Tensor
    dt_initial: Tensor
    options: EngineOptions
    tree: VirtualBrownianTree | None
    f0: Tensor | None
    initial_counts: tuple[int, int]
    sensealg: SensitivityAlgorithm
    stats: list[Solution] | None = None
    observer: Any = None  # solve(..., regularize=...)'s recorder (stops recording after the forward)


class _Accumulator:
    """Combines the Solutions of consecutive segments (stats summed, first failure kept)."""

    def __init__(self) -> None:
        self.parts: list[Solution] = []

    def add(self, sol: Solution) -> None:
        self.parts.append(sol)

    def combined(self, ts: Tensor, ys: Tensor, solver: AbstractSolver) -> Solution:
        parts = self.parts
        stats = Stats(
            nf=sum(p.stats.nf for p in parts), ng=sum(p.stats.ng for p in parts),
            naccept=sum(p.stats.naccept for p in parts), nreject=sum(p.stats.nreject for p in parts),
        )
        success = int(ReturnCode.Success)
        retcodes = parts[0].retcodes.clone()
        for p in parts[1:]:
            retcodes = torch.where(retcodes == success, p.retcodes, retcodes)
        return Solution(ts=ts, ys=ys, stats=stats, retcodes=retcodes, alg=solver)


def _solve_segment(c: _Ctx, y: Tensor, a: float, b: float, first: bool) -> Solution:
    times = torch.tensor([a, b], dtype=torch.float64, device=c.save_times.device)
    counts = c.initial_counts if first else (0, 0)
    f0 = None
    if c.solver.fsal:
        # always from this segment's y (a recomputation starts from a fresh leaf); the first
        # segment's evaluation was already counted by solve()
        f0 = c.terms.drift(times[0].expand(y.shape[0]), y)
        if not first:
            counts = (counts[0] + 1, counts[1])
    return integrate(c.terms, c.solver, y, times, c.dt_initial, c.options, c.tree, f0=f0, initial_counts=counts,
                     observer=c.observer)


def _segmented_forward(c: _Ctx, y0: Tensor, bounds: Tensor, use_checkpoint: bool) -> tuple[list[Tensor], _Accumulator]:
    acc = _Accumulator()
    states = [y0]
    y = y0
    for k in range(bounds.numel() - 1):
        a, b = float(bounds[k]), float(bounds[k + 1])
        recorded: list[bool] = []

        def segment(y_in: Tensor, a: float = a, b: float = b, k: int = k, recorded: list[bool] = recorded) -> Tensor:
            sol = _solve_segment(c, y_in, a, b, first=(k == 0))
            if not recorded:  # the recomputation in backward must not count twice
                recorded.append(True)
                acc.add(sol)
            return sol.ys[-1]

        if use_checkpoint and torch.is_grad_enabled():
            y = checkpoint(segment, y, use_reentrant=False)
        else:
            y = segment(y)
        states.append(y)
    return states, acc


# ------------------------------------------------------------------ the boundary
class _SolveFunction(torch.autograd.Function):
    """THE autograd boundary for adjoint sensealgs: ``(y0, θ_flat) -> ys`` (all save times).

    ``backward`` runs ``ctx.solve_ctx.sensealg``'s backward pass and returns
    ``(dL/dy0, dL/dθ_flat)``; VJPs of the user's functions are taken over
    ``[y, *prob.params]``.  Any backend can reuse it by providing a forward and a VJP pass.
    """

    @staticmethod
    def forward(ctx: Any, c: _Ctx, y0: Tensor, flat_params: Tensor) -> Tensor:  # type: ignore[override]
        y0 = y0.detach()
        sensealg = c.sensealg
        if isinstance(sensealg, InterpolatingAdjoint):
            bounds, index = segment_times(c.save_times, sensealg.checkpoints)
            states, acc = _segmented_forward(c, y0, bounds, use_checkpoint=False)
            stacked = torch.stack(states)
            ys = stacked[index]
            c.stats = [acc.combined(c.save_times.to(y0.dtype), ys, c.solver)]
            ctx.bounds, ctx.index = bounds, index
            ctx.save_for_backward(stacked)
        else:
            sol = integrate(c.terms, c.solver, y0, c.save_times, c.dt_initial, c.options, c.tree,
                            f0=c.f0.detach() if c.f0 is not None else None, initial_counts=c.initial_counts,
                            observer=c.observer)
            c.stats = [sol]
            ys = sol.ys
            ctx.save_for_backward(ys)
        ctx.c = c
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[None, Tensor, Tensor]:  # type: ignore[override]
        c: _Ctx = ctx.c
        (stored,) = ctx.saved_tensors
        if isinstance(c.sensealg, InterpolatingAdjoint):
            gy0, gp = _interpolating_backward(c, stored, ctx.bounds, ctx.index, grad_ys)
        else:
            assert isinstance(c.sensealg, BacksolveAdjoint)
            gy0, gp = _backsolve_backward(c, stored, grad_ys)
        return None, gy0, gp


def _interpolating_backward(c: _Ctx, states: Tensor, bounds: Tensor, index: Tensor, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    params = c.prob.params
    grad_bounds = torch.zeros_like(states)
    grad_bounds[index] = grad_ys
    adj = grad_bounds[-1].clone()
    gp = torch.zeros_like(_flat_params(params, states))
    for k in range(bounds.numel() - 2, -1, -1):
        with torch.enable_grad():
            y_start = states[k].detach().requires_grad_(True)
            y_end = _solve_segment(c, y_start, float(bounds[k]), float(bounds[k + 1]), first=(k == 0)).ys[-1]
            grads = torch.autograd.grad(y_end, [y_start, *params], grad_outputs=adj, allow_unused=True)
        adj = (grads[0] if grads[0] is not None else torch.zeros_like(adj)) + grad_bounds[k]
        gp = gp + _flatten_grads(grads[1:], params, states)
    return adj, gp


# ---------------------------------------------------------------- backsolve
_HEUN = ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5), (-0.5, 0.5))  # c, a, b, b - b_embedded(Euler)


class _Augmented:
    """Increments of the reversed augmented system over a backward step ``[t - h, t]``.

    ``K(t, y, a, h, dW) = (Δy, Δa, Δg)`` with ``Δy = -(b h + σ∘dW)`` and
    ``(Δa, Δg) = vjp of (b h + σ∘dW) at (y, θ) with cotangent a`` (``b`` the Stratonovich
    drift).  One ``autograd.grad`` call per evaluation.
    """

    def __init__(self, c: _Ctx):
        self.terms = c.terms
        self.params = c.prob.params
        self.stochastic = c.tree is not None
        prob = c.prob
        self.ito_correction = bool(prob.is_sde and prob.interpretation == "ito" and prob.noise in ("diagonal", "scalar"))
        self.batch = prob.batch_size

    def strat_drift(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        terms = self.terms
        b = terms.drift(t, y)
        if not self.stochastic:
            return b, None
        assert terms.diffusion is not None
        g = terms.diffusion(t, y)
        if self.ito_correction:
            # (∂σ/∂y) σ by the double-vjp trick: v = J^T w (linear in w), J σ = d<v, σ>/dw.
            w = torch.zeros_like(g, requires_grad=True)
            (v,) = torch.autograd.grad(g, y, grad_outputs=w, create_graph=True)
            (jg,) = torch.autograd.grad(v, w, grad_outputs=g, create_graph=True)
            b = b - 0.5 * jg
        return b, g

    def __call__(self, t: float, y: Tensor, a: Tensor, h: float, dw: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        tt = torch.full((self.batch,), t, dtype=torch.float64, device=y.device)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            b, g = self.strat_drift(tt, y_)
            step = b * h
            if g is not None and dw is not None:
                step = step + self.terms.g_dw(g, dw)
            grads = torch.autograd.grad(step, [y_, *self.params], grad_outputs=a, allow_unused=True)
        da = grads[0] if grads[0] is not None else torch.zeros_like(a)
        return -step.detach(), da, _flatten_grads(grads[1:], self.params, a)


def _fixed_grid(a: float, b: float, dt: float) -> list[float]:
    """The engine's fixed-step grid on ``[a, b]`` (same float arithmetic as engine.integrate)."""
    points = [a]
    t = a
    while True:
        remaining = b - t
        if dt >= remaining * (1 - 1e-12):
            points.append(b)
            return points
        t = t + dt
        points.append(t)


def _rms_norm(err: Tensor, s0: Tensor, s1: Tensor, atol: float, rtol: float) -> Tensor:
    scale = atol + rtol * torch.maximum(s0.abs(), s1.abs())
    r = (err / scale).reshape(err.shape[0], -1) if err.ndim > 1 else (err / scale).reshape(1, -1)
    return torch.sqrt(torch.mean(r * r, dim=1))


def _backsolve_backward(c: _Ctx, ys: Tensor, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    sensealg = c.sensealg
    assert isinstance(sensealg, BacksolveAdjoint)
    field = _Augmented(c)
    tree = c.tree
    if tree is None:
        tab = DOPRI5_TABLEAU
        scheme = (tab.c, tab.a, tab.b, tab.b_error)
        order = 4.0
    else:
        scheme = _HEUN
        order = 1.0
    nodes, rows, weights, err_weights = scheme
    adaptive = c.options.adaptive if sensealg.adaptive is None else sensealg.adaptive
    if sensealg.dt is not None:
        adaptive = adaptive if sensealg.adaptive is not None else False
    atol = c.options.atol if sensealg.atol is None else float(sensealg.atol)
    rtol = c.options.rtol if sensealg.rtol is None else float(sensealg.rtol)
    times = [float(x) for x in c.save_times]
    span = times[-1] - times[0]
    if sensealg.dt is not None:
        dt = sensealg.dt
    elif not c.options.adaptive:
        dt = float(c.dt_initial.max())
    else:
        steps = max(float(c.stats[0].stats.naccept.double().mean()) if c.stats else 1.0, 1.0)
        dt = span / steps
    valid = torch.isfinite(ys).reshape(ys.shape[0], ys.shape[1], -1).all(dim=2)  # (T, B)

    def increment(t: float, h: float, y: Tensor, adj: Tensor, dw: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        ks: list[tuple[Tensor, Tensor, Tensor]] = []
        for i, ci in enumerate(nodes):
            yi, ai = y, adj
            for j, aij in enumerate(rows[i]):
                if aij != 0.0:
                    yi = yi + aij * ks[j][0]
                    ai = ai + aij * ks[j][1]
            ks.append(field(t - ci * h, yi, ai, h, dw))
        dy = sum(bi * k[0] for bi, k in zip(weights, ks) if bi != 0.0)
        da = sum(bi * k[1] for bi, k in zip(weights, ks) if bi != 0.0)
        dg = sum(bi * k[2] for bi, k in zip(weights, ks) if bi != 0.0)
        ey = sum(ei * k[0] for ei, k in zip(err_weights, ks) if ei != 0.0)
        ea = sum(ei * k[1] for ei, k in zip(err_weights, ks) if ei != 0.0)
        eg = sum(ei * k[2] for ei, k in zip(err_weights, ks) if ei != 0.0)
        return dy, da, dg, ey, ea, eg  # type: ignore[return-value]

    def noise(s: float, t: float, state_t: Any) -> tuple[Tensor | None, Any]:
        if tree is None:
            return None, None
        state_s = tree.evaluate(s)
        dw, _ = tree.increment_from(torch.tensor(s, dtype=torch.float64), state_s,
                                    torch.tensor(t, dtype=torch.float64), state_t)
        return dw.to(ys.dtype), state_s

    y = ys[-1].clone()
    adj = grad_ys[-1].clone()
    gp = torch.zeros_like(_flat_params(c.prob.params, ys))
    for k in range(len(times) - 1, 0, -1):
        a_time, b_time = times[k - 1], times[k]
        if sensealg.checkpointing:
            y = torch.where(valid[k].reshape((-1,) + (1,) * (y.ndim - 1)), ys[k], y)
        state_t = tree.evaluate(b_time) if tree is not None else None
        if not adaptive:
            grid = _fixed_grid(a_time, b_time, dt)
            for i in range(len(grid) - 1, 0, -1):
                s, t = grid[i - 1], grid[i]
                dw, state_s = noise(s, t, state_t)
                dy, da, dg, *_ = increment(t, t - s, y, adj, dw)
                y, adj, gp = y + dy, adj + da, gp + dg
                state_t = state_s
        else:
            t = b_time
            h = min(dt, t - a_time)
            n_steps = 0
            while t > a_time:
                hit = h >= (t - a_time) * (1 - 1e-12)
                s = a_time if hit else t - h
                h_step = t - s
                dw, state_s = noise(s, t, state_t)
                dy, da, dg, ey, ea, eg = increment(t, h_step, y, adj, dw)
                e = torch.maximum(_rms_norm(ey, y, y + dy, atol, rtol), _rms_norm(ea, adj, adj + da, atol, rtol))
                if not sensealg.seminorm and gp.numel():
                    e = torch.maximum(e, _rms_norm(eg.unsqueeze(0), gp.unsqueeze(0), (gp + dg).unsqueeze(0), atol, rtol))
                e = e[torch.isfinite(e)]
                err = float(e.max()) if e.numel() else 0.0
                n_steps += 1
                if n_steps > c.options.max_steps:
                    raise RuntimeError(f"sensealg=BacksolveAdjoint: backward solve exceeded max_steps={c.options.max_steps}")
                if err <= 1.0:
                    y, adj, gp = y + dy, adj + da, gp + dg
                    t = s
                    state_t = state_s
                factor = 0.9 * (1.0 / max(err, 1e-10)) ** (1.0 / (order + 1.0))
                factor = min(max(factor, 0.2), 5.0 if tree is None else 2.0)
                if err <= 1.0 and hit:
                    factor = max(factor, 1.0)
                h = max(h_step * factor, c.options.dtmin)
        adj = adj + grad_ys[k - 1]
        if math.isnan(float(adj.sum())):
            adj = torch.nan_to_num(adj)
    return adj, gp


# ---------------------------------------------------------------- entry point
def solve_with_sensealg(
    sensealg: SensitivityAlgorithm,
    prob: ODEProblem,
    terms: Terms,
    solver: AbstractSolver,
    save_times: Tensor,
    dt_initial: Tensor,
    options: EngineOptions,
    tree: VirtualBrownianTree | None,
    f0: Tensor | None,
    initial_counts: tuple[int, int],
    observer: Any = None,
) -> Solution:
    """Run the solve so that autograd differentiates it with ``sensealg``."""
    c = _Ctx(prob, terms, solver, save_times, dt_initial, options, tree, f0, initial_counts, sensealg,
             observer=observer)
    if isinstance(sensealg, DiscreteAdjoint):
        if sensealg.checkpoints is None:
            return integrate(terms, solver, prob.y0, save_times, dt_initial, options, tree, f0=f0,
                             initial_counts=initial_counts, observer=observer)
        bounds, index = segment_times(save_times, sensealg.checkpoints)
        states, acc = _segmented_forward(c, prob.y0, bounds, use_checkpoint=True)
        ys = torch.stack(states)[index]
        return acc.combined(save_times.to(prob.y0.dtype), ys, solver)
    check_closure_params(prob, terms, sensealg)
    flat = _flat_params(prob.params, prob.y0)
    ys = _SolveFunction.apply(c, prob.y0, flat)
    assert c.stats is not None
    sol = c.stats[0]
    return Solution(ts=save_times.to(prob.y0.dtype), ys=ys, stats=sol.stats, retcodes=sol.retcodes, alg=solver)
