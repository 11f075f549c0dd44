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

Layout: :mod:`.common` (base class, parameter discovery, the boundary), one module per
sensealg (:mod:`.discrete`, :mod:`.interpolating`, :mod:`.backsolve`, with
:mod:`.reversible` for ``BacksolveAdjoint`` after a reversible solver); this module picks
the default sensealg and runs a solve with one.  No sensealg has an integrator of its own:
every forward, re-solve and backward solve runs on :class:`~diffeqbridge.engine.Integrator`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..brownian import VirtualBrownianTree
from ..engine import EngineOptions, StartValues, integrate
from ..problem import ODEProblem, Terms
from ..solution import Solution
from ..solvers.base import AbstractSolver
from .backsolve import BacksolveAdjoint
from .common import (
    ExternalSolve,
    SensitivityAlgorithm,
    _Ctx,
    _flat_params,
    _flatten_grads,
    _SolveFunction,
    check_closure_params,
    discover_params,
)
from .discrete import DiscreteAdjoint
from .interpolating import InterpolatingAdjoint, segment_times

__all__ = [
    "BacksolveAdjoint",
    "DiscreteAdjoint",
    "ExternalSolve",
    "InterpolatingAdjoint",
    "SensitivityAlgorithm",
    "check_closure_params",
    "check_sensealg",
    "default_sensealg",
    "discover_params",
    "segment_times",
    "solve_with_sensealg",
]
_BOUNDARY = (_SolveFunction, _flat_params, _flatten_grads)  # used by the julia backend


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
    start_values: StartValues | None = None,
) -> Solution:
    """Run the solve so that autograd differentiates it with ``sensealg`` (``start_values``:
    the start-up ``(drift(t0, y0), diffusion(t0, y0))``, :func:`~diffeqbridge.engine.integrate`)."""
    c = _Ctx(
        prob,
        terms,
        solver,
        save_times,
        dt_initial,
        options,
        tree,
        f0,
        initial_counts,
        sensealg,
        observer=observer,
        start_values=start_values,
    )
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
                start_values=start_values,
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
