"""Sensitivity algorithms (``sensealg``) of the native backend.

``deb.solve(prob, alg, ..., sensealg=...)`` decides how ``torch.autograd`` sees a solve:

==========================  ==============================  ===============================  ====================
sensealg                    memory (forward + backward)     compute (backward)               gradient
==========================  ==============================  ===============================  ====================
``None`` (default)          chosen by problem size: see :func:`default_sensealg`
``DiscreteAdjoint()``       O(steps) autograd graph         1 backprop through the steps     exact for the steps
``DiscreteAdjoint(k)``      states at segment boundaries    1 re-solve of every segment      exact for the steps
                            + one segment's graph           (with graph) + backprop
``InterpolatingAdjoint()``  states at save times (+k        1 re-solve of every segment      exact for the steps
                            checkpoints); one segment's     (with graph) + backprop through
                            graph at a time                 it
``BacksolveAdjoint()``      O(1) in the number of steps     the adjoint ODE/SDE solved       continuous adjoint:
                            (states at save times only)     backwards with y (1 VJP/stage)   consistent, O(dt)
``BacksolveAdjoint()``      O(1) in the number of steps     the steps undone one by one      exact for the steps
after ``ReversibleHeun``    (final state only)              (algebraic inverse) + 1 VJP
                                                            per step
==========================  ==============================  ===============================  ====================

"exact for the steps" means: the gradient of the numbers the solve returned (up to rounding).
``BacksolveAdjoint`` after a non-reversible solver is the optimise-then-discretise gradient
(Li et al. 2020 for SDEs): it converges to the true pathwise derivative as the backward solve
is refined, and agrees with the discrete gradient only to discretisation error (O(dt);
measured 5e-3 relative at dt = 2^-5 on the test neural SDE).  After ``ReversibleHeun``
(Kidger et al. 2021) it is exact (measured 2e-16 relative to ``DiscreteAdjoint``) at O(1)
memory, diffrax's ``ReversibleAdjoint`` idea.

The default.  SciMLSensitivity's automatic choice (``sensealg=nothing``) picks by problem
size: ``ForwardDiffSensitivity`` when ``length(u0) + length(p) <= 100``, otherwise an adjoint
(``InterpolatingAdjoint``/``QuadratureAdjoint``/``GaussAdjoint`` with the best VJP back end
that works).  :func:`default_sensealg` applies the same size rule to what exists here: small
problems and any autograd graph that fits :data:`GRAPH_BUDGET_BYTES` get
``DiscreteAdjoint()`` (on the native backend the steps already are PyTorch ops, so it is the
fastest exact option); a fixed-step solve above the budget gets
``InterpolatingAdjoint(checkpoints=k)``, or ``BacksolveAdjoint()`` with a reversible solver.

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
``DiscreteAdjoint()`` is plain autograd and needs no ``params``; ``DiscreteAdjoint(checkpoints=k)``
and the sensealgs :func:`default_sensealg` picks go through the boundary with ``prob.params``
plus the leaf tensors the drift/diffusion use at ``(t0, y0)`` (found by the same graph walk).

Brownian noise is never stored: every recomputation (checkpoint re-solve, backward SDE)
queries the same :class:`~diffeqbridge.VirtualBrownianTree`, so it sees identical noise.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .brownian import VirtualBrownianTree
from .engine import EngineOptions, Integrator, LoopState, fixed_grid, fixed_steps, forced_times, integrate
from .problem import ODEProblem, Terms
from .solution import ReturnCode, Solution, Stats
from .solvers.base import AbstractSolver
from .solvers.reversible_heun import reversible_heun_step
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
    auto_params: bool = False  # chosen by default_sensealg: differentiate prob.params + closure leaves

    def check(self, prob: ODEProblem, solver: AbstractSolver, adaptive: bool) -> None:
        """Raise ValueError if this sensealg cannot differentiate ``prob`` solved by ``solver``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DiscreteAdjoint(SensitivityAlgorithm):
    """Backpropagate through the solver's steps ("discretise-then-optimise").

    Args:
        checkpoints: ``None`` keeps the autograd graph of every step (memory grows linearly
            with the number of steps, backward = one backprop).  An int ``k``: the forward
            (the plain solve, run inside the autograd boundary :class:`_SolveFunction`
            without a graph) snapshots its whole loop state (:class:`~diffeqbridge.engine.LoopState`:
            time, state, step size, controller and solver state, Brownian path, counters)
            when the slowest sample passes a save time or one of ``k - 1`` equally spaced
            times; the backward restores one snapshot at a time, re-runs exactly the same
            iterations with the graph on and backprops through them, as
            ``InterpolatingAdjoint`` does.  Memory is the boundary states plus one segment's
            graph: flat in the number of steps when ``k`` grows with it (measured +6% from
            40 to 160 steps with ``k = steps / 50``; ``torch.utils.checkpoint``, used before,
            grew 70% from 100 to 1600 steps because it still builds a graph node per op).
            Compute: one extra forward solve.  The Brownian tree replays identical noise, so
            the recomputed steps are bit-identical to the forward's and the gradient is exact.

    Restrictions: ``params`` not needed: the gradient is taken with respect to ``prob.params``
    and every leaf tensor the drift/diffusion use at ``(t0, y0)`` (closures included; a tensor
    used only at other times or states would be missed -- list it in ``params``).  With
    ``checkpoints`` the forward IS the plain solve (bit-identical ``ys``, the same steps and
    ``stats``, ``stats.extra`` included) and the gradient is exact for it.
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
    through (checked).  Segments are snapshots of the whole loop state (see
    ``DiscreteAdjoint``): the forward is bit-identical to the plain solve.
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
    The gradient is consistent (error → 0 with dt / tolerance, O(dt)) but not the exact
    gradient of the forward's numbers.  Needs ``prob.params`` (checked).

    Reversible solvers (``alg=deb.ReversibleHeun()``): the backward instead undoes the
    forward's steps one by one with the solver's algebraic inverse (no stored states, no
    backward SDE), re-evaluates the drift and diffusion at each reconstructed ``z_n`` with the
    graph on and pulls the cotangents back through them: the exact gradient of the returned numbers in
    O(1) memory (one drift + one diffusion evaluation with graph and one backward pass through
    them per step, the work of backprop through the steps).  ``dt``,
    ``adaptive``, tolerances and ``checkpointing`` are ignored there.
    """

    uses_boundary = True

    def __init__(
        self,
        dt: float | None = None,
        adaptive: bool | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        seminorm: bool = True,
        checkpointing: bool = True,
    ):
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
        return (
            f"BacksolveAdjoint(dt={self.dt}, adaptive={self.adaptive}, seminorm={self.seminorm}, "
            f"checkpointing={self.checkpointing})"
        )


SENSEALGS = (DiscreteAdjoint, BacksolveAdjoint, InterpolatingAdjoint)

#: ``sensealg=None`` keeps the whole autograd graph while it is estimated below this many bytes
GRAPH_BUDGET_BYTES = 2**30
#: bytes of graph per step per state element, a rough estimate (a few stages, each saving a
#: few activations of the state's size; width-128 MLPs save more, tiny fields less)
GRAPH_BYTES_PER_STEP_ELEMENT = 16 * 8
#: SciMLSensitivity's threshold on length(u0) + length(p) for ForwardDiffSensitivity
SMALL_PROBLEM_SIZE = 100


def default_sensealg(prob: ODEProblem, solver: AbstractSolver, adaptive: bool, dt: float | None) -> SensitivityAlgorithm | None:
    """The sensealg ``solve(..., sensealg=None)`` uses, chosen by problem size.

    SciMLSensitivity (``automatic_sensealg_choice``) takes ``ForwardDiffSensitivity`` when
    ``length(u0) + length(p) <= 100`` (differentiating the solver's own operations: exact and
    cheapest for small problems) and an adjoint (``InterpolatingAdjoint``) above.  Here:

    1. no gradient wanted (``torch.is_grad_enabled()`` is False): ``None``, a plain solve;
    2. ``y0.numel() + Σ params.numel() <= 100``: ``DiscreteAdjoint()`` (backprop through the
       steps, the analogue of differentiating the solver's operations);
    3. a fixed-step solve whose graph is estimated above :data:`GRAPH_BUDGET_BYTES`
       (``steps * y0.numel() * GRAPH_BYTES_PER_STEP_ELEMENT``): with a reversible solver
       (``ReversibleHeun``) ``BacksolveAdjoint()`` (exact, O(1) memory); else
       ``InterpolatingAdjoint(checkpoints=k)``, ``k`` segments of at most a quarter of the
       budget each (exact gradient, one extra forward solve; the forward is the plain solve,
       bit for bit);
    4. otherwise ``DiscreteAdjoint()``: the fastest exact option while memory allows
       (adaptive solves: the number of steps is not known in advance; pass a sensealg to
       bound memory).

    Choice 3 falls back to a plain solve when nothing requires grad (``y0`` and every tensor
    the fields use).  It differentiates with respect to ``prob.params`` and any other leaf tensor the
    drift/diffusion use at ``(t0, y0)`` (no ``params`` needed, as with ``DiscreteAdjoint``).
    """
    if not torch.is_grad_enabled():
        return None
    size = prob.y0.numel() + sum(p.numel() for p in prob.params)
    if size <= SMALL_PROBLEM_SIZE:
        return DiscreteAdjoint()
    if adaptive or dt is None:
        return DiscreteAdjoint()
    steps = math.ceil(abs(prob.tspan[1] - prob.tspan[0]) / dt)
    graph = steps * prob.y0.numel() * GRAPH_BYTES_PER_STEP_ELEMENT
    if graph <= GRAPH_BUDGET_BYTES:
        return DiscreteAdjoint()
    if not prob.y0.requires_grad and not discover_params(prob, Terms(prob)):
        return None  # nothing to differentiate: a plain solve, the same numbers as under no_grad
    chosen: SensitivityAlgorithm
    if getattr(solver, "reversible", False):
        chosen = BacksolveAdjoint()
    else:
        chosen = InterpolatingAdjoint(checkpoints=min(steps, math.ceil(4 * graph / GRAPH_BUDGET_BYTES)))
    chosen.auto_params = True
    return chosen


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


class _Touched(torch.overrides.TorchFunctionMode):
    """Records the ids of the tensors every torch function call receives (arguments only)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        leaves, _ = torch.utils._pytree.tree_flatten((args, kwargs or {}))
        self.ids.update(id(x) for x in leaves if isinstance(x, Tensor))
        return func(*args, **(kwargs or {}))


def _warn_detached(params: list[Tensor], outs: list[Tensor], touched: set[int]) -> None:
    """Warn about listed parameters the fields touched at ``(t0, y0)`` without autograd seeing
    them (``p.detach()``, ``torch.no_grad()``): the adjoints would return zero gradients for
    them without a word.  Parameters not touched at all (an encoder in the same module) are
    not reported."""
    in_graph = {id(x) for x in _leaf_tensors(outs)}
    for i, p in enumerate(params):
        if p.requires_grad and id(p) in touched and id(p) not in in_graph:
            warnings.warn(
                f"params[{i}] (shape {tuple(p.shape)}) is used by drift/diffusion at (t0, y0) but not through "
                f"autograd (.detach() or torch.no_grad()?): its gradient from this solve will be zero",
                UserWarning,
                stacklevel=6,
            )


def _probe_fields(prob: ODEProblem, terms: Terms) -> list[Tensor]:
    """Drift (and diffusion) evaluated once at ``(t0, y0.detach())`` with grad enabled, so
    their autograd graphs show which leaf tensors they use (and :func:`_warn_detached` which
    listed parameters they use outside autograd)."""
    t = torch.full((prob.batch_size,), prob.tspan[0], dtype=torch.float64, device=prob.y0.device)
    y = prob.y0.detach()
    touched = _Touched()
    with torch.enable_grad(), touched:
        outs = [terms.drift(t, y)]
        if terms.diffusion is not None:
            outs.append(terms.diffusion(t, y))
    _warn_detached(prob.params, outs, touched.ids)
    return outs


def check_closure_params(prob: ODEProblem, terms: Terms, sensealg: SensitivityAlgorithm) -> None:
    """Refuse drift/diffusion that differentiate through tensors missing from ``prob.params``.

    One evaluation of each function at ``(t0, y0.detach())`` with grad enabled; the leaves of
    its autograd graph must all be in ``prob.params``.
    """
    outs = _probe_fields(prob, terms)
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


def discover_params(prob: ODEProblem, terms: Terms) -> list[Tensor]:
    """``prob.params`` plus every other leaf tensor requiring grad that drift/diffusion use at
    ``(t0, y0)`` (one evaluation each, a walk of the autograd graph): the parameters a
    closure hides.  Tensors used only at other times/states are not seen."""
    outs = _probe_fields(prob, terms)
    params = list(prob.params)
    known = {id(p) for p in params}
    for leaf in _leaf_tensors(outs):
        if id(leaf) not in known:
            known.add(id(leaf))
            params.append(leaf)
    return params


def _flat_params(params: list[Tensor], like: Tensor) -> Tensor:
    if not params:
        return torch.zeros(0, dtype=like.dtype, device=like.device)
    return torch.cat([p.reshape(-1) for p in params])


def _flatten_grads(grads: tuple[Tensor | None, ...], params: list[Tensor], like: Tensor) -> Tensor:
    if not params:
        return torch.zeros(0, dtype=like.dtype, device=like.device)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(like.dtype) for g, p in zip(grads, params)])


def segment_times(save_times: Tensor, checkpoints: int | None) -> list[float]:
    """Interior times after which the forward snapshots its whole loop state: the save
    times, plus ``checkpoints - 1`` equally spaced times when ``checkpoints`` is given, in the
    direction time runs (the first snapshot is the start)."""
    times = [float(x) for x in save_times]
    t0, t1 = times[0], times[-1]
    extra = [float(e) for e in torch.linspace(t0, t1, checkpoints + 1, dtype=torch.float64)[1:-1]] if checkpoints else []
    sign = 1.0 if t1 >= t0 else -1.0
    return sorted(set(times[1:-1]) | set(extra), key=lambda x: sign * x)


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
    params: list[Tensor] | None = None  # what the boundary differentiates (default prob.params)
    observer: Any = None  # solve(..., regularize=...)'s recorder (stops recording after the forward)

    @property
    def theta(self) -> list[Tensor]:
        return self.prob.params if self.params is None else self.params


def _dead_samples(c: _Ctx, adj: Tensor) -> Tensor:
    """``(B,)``: samples that failed in the forward solve and receive no gradient (``adj`` is
    zero over their state) -- their NaN/Inf must not reach the shared parameters' gradient."""
    assert c.stats is not None
    failed = c.stats[0].retcodes != int(ReturnCode.Success)
    return failed & (adj == 0).flatten(1).all(dim=1)


def _masked_terms(terms: Terms, dead: Tensor, y_safe: Tensor) -> Terms:
    """``terms`` whose fields see ``y_safe`` (finite, e.g. ``y0``) in place of the states of
    the ``dead`` samples.  A dead sample's cotangent is zero, but a VJP through its NaN/Inf
    state still gives ``0 * NaN = NaN`` in a parameter shared by the batch (``p * y * y``);
    evaluating its fields at a finite state makes its contribution an exact zero."""
    if not bool(dead.any()):
        return terms
    masked = copy.copy(terms)
    keep = dead.reshape(dead.shape + (1,) * (y_safe.ndim - 1))

    def guard(field: Any) -> Any:
        return lambda t, y: field(t, torch.where(keep, y_safe, y))

    masked.drift = guard(terms.drift)
    masked.diffusion = guard(terms.diffusion) if terms.diffusion is not None else None
    return masked


# ------------------------------------------------------------------ the boundary
class ExternalSolve:
    """Hook for other backends: pass an instance instead of a ``_Ctx`` to ``_SolveFunction``.

    ``forward(y0, flat_params) -> ys`` (detached inputs, ``ys`` of shape ``(T, B, *state)``)
    and ``backward(grad_ys) -> (dL/dy0, dL/dθ_flat)``.
    """

    def forward(self, y0: Tensor, flat_params: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class _SolveFunction(torch.autograd.Function):
    """THE autograd boundary for adjoint sensealgs: ``(y0, θ_flat) -> ys`` (all save times).

    ``backward`` runs ``ctx.solve_ctx.sensealg``'s backward pass and returns
    ``(dL/dy0, dL/dθ_flat)``; VJPs of the user's functions are taken over
    ``[y, *prob.params]``.  Any backend can reuse it by providing a forward and a VJP pass.
    """

    @staticmethod
    def forward(ctx: Any, c: _Ctx, y0: Tensor, flat_params: Tensor) -> Tensor:  # type: ignore[override]
        if isinstance(c, ExternalSolve):  # another backend's forward/backward (julia)
            ctx.c = c
            return c.forward(y0.detach(), flat_params.detach())
        y0 = y0.detach()
        sensealg = c.sensealg
        if _segmented(sensealg):
            loop = Integrator(c.terms, c.solver, c.save_times, c.dt_initial, c.options, c.tree, c.observer)
            state = loop.init(y0, c.dt_initial, c.f0.detach() if c.f0 is not None else None, c.initial_counts)
            snaps = [loop.snapshot(state)]
            snaps += loop.run(
                state,
                boundaries=segment_times(c.save_times, sensealg.checkpoints),  # type: ignore[attr-defined]
                progress=c.options.progress,
            )
            sol = loop.solution(state)
            c.stats = [sol]
            ys = sol.ys
            loop.observer = None  # the backward's re-runs are not recorded
            ctx.loop, ctx.snaps = loop, snaps
        elif _reversible(c):
            ys, y_end, carry_end = _reversible_forward(c, y0)
            ctx.save_for_backward(y_end, carry_end[0])
        else:
            sol = integrate(
                c.terms,
                c.solver,
                y0,
                c.save_times,
                c.dt_initial,
                c.options,
                c.tree,
                f0=c.f0.detach() if c.f0 is not None else None,
                initial_counts=c.initial_counts,
                observer=c.observer,
            )
            c.stats = [sol]
            ys = sol.ys
            ctx.save_for_backward(ys)
        ctx.c = c
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[None, Tensor, Tensor]:  # type: ignore[override]
        if isinstance(ctx.c, ExternalSolve):
            return (None, *ctx.c.backward(grad_ys))
        c: _Ctx = ctx.c
        if _reversible(c):
            y_end, z_end = ctx.saved_tensors
            gy0, gp = _reversible_backward(c, y_end, z_end, grad_ys)
            return None, gy0, gp
        if _segmented(c.sensealg):
            gy0, gp = _segmented_backward(c, ctx.loop, ctx.snaps, grad_ys)
        else:
            (stored,) = ctx.saved_tensors
            assert isinstance(c.sensealg, BacksolveAdjoint)
            gy0, gp = _backsolve_backward(c, stored, grad_ys)
        return None, gy0, gp


def _segmented(sensealg: SensitivityAlgorithm) -> bool:
    """Forward in segments, backward by re-solving each segment with the graph on."""
    if isinstance(sensealg, InterpolatingAdjoint):
        return True
    return isinstance(sensealg, DiscreteAdjoint) and sensealg.checkpoints is not None


def _reversible(c: _Ctx) -> bool:
    return isinstance(c.sensealg, BacksolveAdjoint) and getattr(c.solver, "reversible", False)


def _leaves(carry: Any) -> tuple[Any, list[Tensor]]:
    """``carry`` (None, a tensor or a tuple of tensors) as fresh leaves requiring grad."""
    if carry is None:
        return None, []
    if isinstance(carry, tuple):
        parts = tuple(x.detach().requires_grad_(True) for x in carry)
        return parts, list(parts)
    leaf = carry.detach().requires_grad_(True)
    return leaf, [leaf]


def _as_list(carry: Any) -> list[Tensor]:
    return [] if carry is None else list(carry) if isinstance(carry, tuple) else [carry]


def _segmented_backward(c: _Ctx, loop: Integrator, snaps: list[LoopState], grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    """Walk the snapshots from last to first: restore the whole loop state (y and the
    solver's carry as leaves), re-run the same iterations with the graph on, and pull the
    adjoints of ``y``, the carry and the ``ys`` written in the segment back through them."""
    params = c.theta
    gp = torch.zeros_like(_flat_params(params, grad_ys))
    adj_y: Tensor | None = None
    adj_carry: list[Tensor] | None = None
    for k in range(len(snaps) - 1, -1, -1):
        snap = snaps[k]
        # failed samples nobody differentiates see a finite state (their 0 * NaN would reach
        # the shared parameters' gradient)
        seen = grad_ys.abs().sum(0) + (adj_y.abs() if adj_y is not None else 0.0)
        loop.terms = _masked_terms(c.terms, _dead_samples(c, seen), c.prob.y0.detach())
        stop = snaps[k + 1].iteration if k + 1 < len(snaps) else None
        with torch.enable_grad():
            y_start = snap.y.detach().requires_grad_(True)
            if k == 0:  # the carry is a function of y0 (FSAL f0 = drift(t0, y0), ReversibleHeun's z)
                f0 = loop.terms.drift(snap.t, y_start) if c.solver.fsal else None
                carry = c.solver.initial_carry(loop.terms, snap.t, y_start, f0) if c.solver.fsal else None
                carry_leaves: list[Tensor] = []
            else:
                carry, carry_leaves = _leaves(snap.carry)
            state = loop.restore(snap, y_start, carry)
            loop.run(state, stop_at=stop)
            outs: list[Tensor] = [state.ys]
            cots: list[Tensor] = [grad_ys]
            if adj_y is not None:
                outs.append(state.y)
                cots.append(adj_y)
            if adj_carry is not None:
                for out, cot in zip(_as_list(state.carry), adj_carry):
                    outs.append(out)
                    cots.append(cot)
            pairs = [(o, g) for o, g in zip(outs, cots) if o.requires_grad]
            inputs = [y_start, *carry_leaves, *params]
            # retain_graph: a closure's tensor computed outside the solve (w = 2 * p) is part of
            # every segment's graph
            grads = (
                torch.autograd.grad(
                    [o for o, _ in pairs], inputs, grad_outputs=[g for _, g in pairs], allow_unused=True, retain_graph=True
                )
                if pairs
                else (None,) * len(inputs)
            )
        adj_y = grads[0] if grads[0] is not None else torch.zeros_like(y_start)
        adj_carry = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads[1 : 1 + len(carry_leaves)], carry_leaves)]
        gp = gp + _flatten_grads(tuple(grads[1 + len(carry_leaves) :]), params, grad_ys)
    assert adj_y is not None
    return adj_y + grad_ys[0], gp


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
        self.params = c.theta
        self.stochastic = c.tree is not None
        prob = c.prob
        self.ito_correction = bool(prob.is_sde and prob.interpretation == "ito" and prob.noise in ("diagonal", "scalar"))
        self.batch = prob.batch_size
        # a solve with t1 < t0 is Itô in reversed time: its Stratonovich drift is b + ½(∂σ/∂y)σ
        self.direction = 1.0 if float(c.save_times[-1]) >= float(c.save_times[0]) else -1.0

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
            b = b - (0.5 * self.direction) * jg
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


def _rms_norm(err: Tensor, s0: Tensor, s1: Tensor, atol: float, rtol: float) -> Tensor:
    scale = atol + rtol * torch.maximum(s0.abs(), s1.abs())
    r = (err / scale).reshape(err.shape[0], -1) if err.ndim > 1 else (err / scale).reshape(1, -1)
    return torch.sqrt(torch.mean(r * r, dim=1))


_Increments = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # dy, da, dg and their error estimates


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
    span = abs(times[-1] - times[0])
    if sensealg.dt is not None:
        dt = sensealg.dt
    elif not c.options.adaptive:
        dt = float(c.dt_initial.max())
    else:
        steps = max(float(c.stats[0].stats.naccept.double().mean()) if c.stats else 1.0, 1.0)
        dt = span / steps
    valid = torch.isfinite(ys).reshape(ys.shape[0], ys.shape[1], -1).all(dim=2)  # (T, B)

    def increment(t: float, h: float, y: Tensor, adj: Tensor, dw: Tensor | None) -> _Increments:
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
        state_s = tree.evaluate_scalar(s, levy=False)
        return tree._shape_out(state_t[0] - state_s[0]).to(ys.dtype), state_s

    y = ys[-1].clone()
    adj = grad_ys[-1].clone()
    gp = torch.zeros_like(_flat_params(c.theta, ys))
    for k in range(len(times) - 1, 0, -1):
        a_time, b_time = times[k - 1], times[k]
        if sensealg.checkpointing:
            y = torch.where(valid[k].reshape((-1,) + (1,) * (y.ndim - 1)), ys[k], y)
        field.terms = _masked_terms(c.terms, _dead_samples(c, adj), ys[0])
        state_t = tree.evaluate_scalar(b_time, levy=False) if tree is not None else None
        if not adaptive:
            grid = fixed_grid(a_time, b_time, dt)
            for i in range(len(grid) - 1, 0, -1):
                s, t = grid[i - 1], grid[i]
                dw, state_s = noise(s, t, state_t)
                dy, da, dg, *_ = increment(t, t - s, y, adj, dw)
                y, adj, gp = y + dy, adj + da, gp + dg
                state_t = state_s
        else:
            d = 1.0 if a_time > b_time else -1.0  # the direction the backsolve runs in
            t = b_time
            h = min(dt, abs(t - a_time))
            n_steps = 0
            while d * (a_time - t) > 0:
                hit = h >= d * (a_time - t) * (1 - 1e-12)
                s = a_time if hit else t + d * h
                h_step = t - s  # signed: positive after a forward solve
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
                h = max(abs(h_step) * factor, c.options.dtmin)
        adj = adj + grad_ys[k - 1]
    return adj, gp


# ------------------------------------------------- reversible solvers (exact backsolve)
def _reversible_steps(c: _Ctx) -> tuple[list[tuple[float, float, float]], list[int]]:
    """The engine's fixed steps ``(t, h, t + h)`` over the save times and ``tstops`` (same
    float arithmetic, :func:`diffeqbridge.engine.fixed_steps`) and, for every save time after the first, the
    number of steps taken to reach it."""
    stops, slots = forced_times(c.save_times, c.options.tstops, interpolate=False)
    steps, reached = fixed_steps(stops.tolist(), float(c.dt_initial[0]))
    return steps, [n for n, slot in zip(reached, slots.tolist()[1:]) if slot >= 0]


def _reversible_noise(c: _Ctx, s: float, t: float, dtype: torch.dtype) -> Tensor:
    """``W(t) - W(s)`` exactly as the engine computes it for the step ``[s, t]``."""
    assert c.tree is not None
    return c.tree.increment_scalar(s, t).to(dtype)


def _vec(c: _Ctx, value: float, like: Tensor) -> Tensor:
    return torch.full((c.prob.batch_size,), value, dtype=torch.float64, device=like.device).to(like.dtype)


def _reversible_forward(c: _Ctx, y0: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Fixed-step forward of a reversible solver without a graph; returns ``ys`` (the engine's
    numbers), the final ``y`` and the final carry ``(z, f(z), g(z))``."""
    steps, ends = _reversible_steps(c)
    terms, solver = c.terms, c.solver
    t0 = steps[0][0] if steps else float(c.save_times[0])
    carry = solver.initial_carry(terms, _vec(c, t0, y0), y0, c.f0.detach() if c.f0 is not None else None)
    y = y0
    ys = [y0]
    end_iter = iter(ends)
    next_end = next(end_iter, -1)
    for n, (s, h, t) in enumerate(steps, start=1):
        dw = _reversible_noise(c, s, t, y0.dtype)
        y, carry = reversible_heun_step(terms, _vec(c, s, y), y, _vec(c, h, y), dw, carry)
        while n == next_end:
            ys.append(y)
            next_end = next(end_iter, -1)
    stacked = torch.stack(ys)
    batch = c.prob.batch_size
    n_steps = torch.full((batch,), len(steps), dtype=torch.long, device=y0.device)
    nf = n_steps + c.initial_counts[0]
    ng = n_steps + c.initial_counts[1]
    finite = torch.isfinite(stacked).reshape(stacked.shape[0], batch, -1).all(dim=2).all(dim=0)
    retcodes = torch.where(finite, int(ReturnCode.Success), int(ReturnCode.Unstable))
    stats = Stats(nf=nf, ng=ng, naccept=n_steps, nreject=torch.zeros_like(n_steps))
    c.stats = [Solution(ts=c.save_times.to(y0.dtype), ys=stacked, stats=stats, retcodes=retcodes, alg=solver)]
    return stacked, y, carry


def _reversible_backward(c: _Ctx, y_end: Tensor, z_end: Tensor, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    """Exact discrete gradient of :func:`_reversible_forward` in O(1) memory.

    The forward is a chain over nodes ``j = 0..N`` with ``F_j = (f, g)(t_j, z_j)`` evaluated
    once per node and used by two steps (``h_j``, ``dW_j``: step ``j``'s size and noise)::

        z_{j+1} = 2 y_j - z_j + f_j h_j + g_j dW_j
        y_{j+1} = y_j + (f_j + f_{j+1}) h_j / 2 + (g_j + g_{j+1}) dW_j / 2

    ``y`` enters linearly, so walking the nodes backwards the cotangents are
    ``ȳ_j = ȳ_{j+1} + 2 z̄_{j+1} (+ dL/dys at a save node)`` and
    ``z̄_j = F_j^T[(ȳ_j h_{j-1}/2, ȳ_j dW_{j-1}/2) + ((z̄_{j+1} + ȳ_{j+1}/2) h_j, ... dW_j)] - z̄_{j+1}``:
    ONE drift and ONE diffusion evaluation with graph per node, and one backward pass through
    them (the same work as backprop through ReversibleHeun's steps).  The node's state is
    reconstructed from the next one with the algebraic inverse first
    (``z_j = 2 y_{j+1} - z_{j+1} - F_{j+1}`` with step ``j``'s ``h, dW``; then
    ``y_j = y_{j+1} - (F_j + F_{j+1})/2``), so nothing is stored.
    """
    terms, params = c.terms, c.theta
    assert terms.diffusion is not None
    steps, ends = _reversible_steps(c)
    n = len(steps)
    save_at_node = {node: k + 1 for k, node in enumerate(ends)}
    like = y_end

    def node_time(j: int) -> Tensor:  # the time the forward evaluated F_j at (t + dt in the state's dtype)
        if j == 0:
            return _vec(c, steps[0][0] if steps else float(c.save_times[0]), like)
        s, h, _ = steps[j - 1]
        return _vec(c, s, like) + _vec(c, h, like)

    def step_terms(j: int) -> tuple[Tensor, Tensor]:  # (h_j broadcast over the state, dW_j)
        s, h, t = steps[j]
        return _vec(c, h, like).reshape((-1,) + (1,) * (like.ndim - 1)), _reversible_noise(c, s, t, like.dtype)

    gp = torch.zeros_like(_flat_params(params, like))
    y, z = y_end, z_end
    f_next = g_next = None  # F_{j+1} (detached) while walking back
    ybar_next = zbar_next = None
    step_next: tuple[Tensor, Tensor] | None = None  # (h_j, dW_j) of the step leaving node j
    ybar = grad_ys[-1]
    for j in range(n, -1, -1):
        step_prev = step_terms(j - 1) if j >= 1 else None  # (h_{j-1}, dW_{j-1})
        if j < n:
            assert ybar_next is not None and zbar_next is not None
            ybar = ybar_next + 2.0 * zbar_next
            if j in save_at_node:
                ybar = ybar + grad_ys[save_at_node[j]]
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            tj = node_time(j)
            f_j, g_j = terms.drift(tj, z_in), terms.diffusion(tj, z_in)
            outs: list[Tensor] = []
            cots: list[Tensor] = []
            if step_prev is not None:
                h_prev, dw_prev = step_prev
                outs.append(0.5 * f_j * h_prev + terms.g_dw(0.5 * g_j, dw_prev))
                cots.append(ybar)
            if step_next is not None:
                assert ybar_next is not None and zbar_next is not None
                h_next, dw_next = step_next
                outs.append(f_j * h_next + terms.g_dw(g_j, dw_next))
                cots.append(zbar_next + 0.5 * ybar_next)
            if outs:
                grads = torch.autograd.grad(outs, [z_in, *params], grad_outputs=cots, allow_unused=True)
            else:
                grads = (None,) * (1 + len(params))
        zbar = grads[0] if grads[0] is not None else torch.zeros_like(ybar)
        if zbar_next is not None:
            zbar = zbar - zbar_next
        gp = gp + _flatten_grads(tuple(grads[1:]), params, like)
        f_j, g_j = f_j.detach(), g_j.detach()
        if j < n:  # y_j from y_{j+1} (step j undone; z_j was reconstructed in the previous iteration)
            assert step_next is not None and f_next is not None and g_next is not None
            h_next, dw_next = step_next
            y = y - 0.5 * (f_j + f_next) * h_next - terms.g_dw(0.5 * (g_j + g_next), dw_next)
        if step_prev is not None:  # z_{j-1}
            h_prev, dw_prev = step_prev
            z = 2.0 * y - z - f_j * h_prev - terms.g_dw(g_j, dw_prev)
        f_next, g_next, step_next = f_j, g_j, step_prev
        ybar_next, zbar_next = ybar, zbar
    # node 0: z_0 = y_0 = y0, and ys[0] = y0
    assert ybar_next is not None and zbar_next is not None
    return ybar_next + zbar_next + grad_ys[0], gp


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
    c = _Ctx(prob, terms, solver, save_times, dt_initial, options, tree, f0, initial_counts, sensealg, observer=observer)
    if isinstance(sensealg, DiscreteAdjoint):
        if sensealg.checkpoints is None:
            return integrate(
                terms,
                solver,
                prob.y0,
                save_times,
                dt_initial,
                options,
                tree,
                f0=f0,
                initial_counts=initial_counts,
                observer=observer,
            )
        # the InterpolatingAdjoint machinery (no graph in the forward, one segment's graph at a
        # time in the backward) over prob.params and the leaves closures use
        c.params = discover_params(prob, terms)
    elif sensealg.auto_params:
        c.params = discover_params(prob, terms)
    else:
        check_closure_params(prob, terms, sensealg)
    flat = _flat_params(c.theta, prob.y0)
    ys = _SolveFunction.apply(c, prob.y0, flat)
    assert c.stats is not None
    sol = c.stats[0]
    return Solution(ts=save_times.to(prob.y0.dtype), ys=ys, stats=sol.stats, retcodes=sol.retcodes, alg=solver)
