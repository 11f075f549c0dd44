"""What every native sensealg shares: the base class, the discovery of the parameters a
solve differentiates, the per-solve context and THE autograd boundary
(:class:`_SolveFunction`) through which the adjoint sensealgs enter autograd.

Each sensealg module (:mod:`.discrete`, :mod:`.interpolating`, :mod:`.backsolve`,
:mod:`.reversible`) implements :meth:`SensitivityAlgorithm.forward_pass` /
:meth:`SensitivityAlgorithm.backward_pass`; the boundary only dispatches to them.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..brownian import VirtualBrownianTree
from ..engine import EngineOptions, Integrator, LoopState, StartValues, integrate
from ..problem import ODEProblem, Terms
from ..solution import ReturnCode, Solution
from ..solvers.base import AbstractSolver


def _check_checkpoints(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}(checkpoints=...) must be None or a positive int (number of segments); got {value!r}")
    return value


class SensitivityAlgorithm:
    """Base class of the native sensealgs.

    A sensealg that goes through the autograd boundary (:class:`_SolveFunction`) implements
    :meth:`forward_pass` (the solve without a graph) and :meth:`backward_pass` (the
    vector-Jacobian product of everything the forward returned).
    """

    uses_boundary: bool = False  # goes through _SolveFunction (needs explicit params)
    auto_params: bool = False  # chosen by default_sensealg: differentiate prob.params + closure leaves

    def check(self, prob: ODEProblem, solver: AbstractSolver, adaptive: bool) -> None:
        """Raise ValueError if this sensealg cannot differentiate ``prob`` solved by ``solver``."""

    def forward_pass(self, c: _Ctx, y0: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Any]:
        """The solve from the detached ``y0`` (sets ``c.stats``).  Returns ``ys``
        ``(T, B, *state)``, the tensors the backward needs (saved with
        ``save_for_backward``) and any other object it needs.  Default: the plain solve, ``ys`` kept."""
        sol = plain_solve(c, y0)
        return sol.ys, (sol.ys,), None

    def backward_pass(self, c: _Ctx, saved: tuple[Tensor, ...], extra: Any, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
        """``(dL/dy0, dL/dθ_flat)`` from ``grad_ys = dL/dys`` ``(T, B, *state)``."""
        raise NotImplementedError(f"{type(self).__name__} does not go through the autograd boundary")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
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
    start_values: StartValues | None = None  # the start-up (drift(t0, y0), diffusion(t0, y0)), engine.integrate

    def detached_start(self) -> StartValues | None:
        """:attr:`start_values` without their graph (for the graph-free forward passes)."""
        if self.start_values is None:
            return None
        f0, g0 = self.start_values
        return (None if f0 is None else f0.detach(), None if g0 is None else g0.detach())

    def detached_f0(self) -> Tensor | None:
        """:attr:`f0` without its graph."""
        return None if self.f0 is None else self.f0.detach()

    def detached_loop(self, y0: Tensor) -> tuple[Integrator, LoopState]:
        """The engine's loop of this solve and its initial state from ``y0``, without a graph
        (the forward passes of the sensealgs that run the loop themselves)."""
        loop = Integrator(self.terms, self.solver, self.save_times, self.dt_initial, self.options, self.tree, self.observer)
        return loop, loop.init(y0, self.dt_initial, self.detached_f0(), self.initial_counts, self.detached_start())

    @property
    def theta(self) -> list[Tensor]:
        """The tensors the boundary differentiates: those of ``params`` (default ``prob.params``)
        that require grad -- a module's frozen parameters are skipped, as autograd skips them."""
        params = self.prob.params if self.params is None else self.params
        return [p for p in params if p.requires_grad]


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
        ys, saved, extra = c.sensealg.forward_pass(c, y0.detach())
        ctx.save_for_backward(*saved)
        ctx.c, ctx.extra = c, extra
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[None, Tensor, Tensor]:  # type: ignore[override]
        if isinstance(ctx.c, ExternalSolve):
            return (None, *ctx.c.backward(grad_ys))
        c: _Ctx = ctx.c
        gy0, gp = c.sensealg.backward_pass(c, ctx.saved_tensors, ctx.extra, grad_ys)
        return None, gy0, gp


def plain_solve(c: _Ctx, y0: Tensor) -> Solution:
    """The engine's solve of ``c`` from ``y0`` without a graph; sets ``c.stats``."""
    sol = integrate(
        c.terms,
        c.solver,
        y0,
        c.save_times,
        c.dt_initial,
        c.options,
        c.tree,
        f0=c.detached_f0(),
        initial_counts=c.initial_counts,
        observer=c.observer,
        start_values=c.detached_start(),
    )
    c.stats = [sol]
    return sol
