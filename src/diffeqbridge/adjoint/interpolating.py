"""``InterpolatingAdjoint``: checkpointed forward states, each segment re-solved with the
graph on (on the replayed noise) and differentiated by backprop.  The segment machinery
(:func:`segmented_forward`, :func:`segmented_backward`) is shared with
``DiscreteAdjoint(checkpoints=k)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine import Integrator, LoopState, _rebuild
from .common import SensitivityAlgorithm, _check_checkpoints, _Ctx, _dead_samples, _flat_params, _flatten_grads, _masked_terms

__all__ = ["InterpolatingAdjoint", "segment_times", "segmented_forward", "segmented_backward"]


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

    def forward_pass(self, c: _Ctx, y0: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Any]:
        return segmented_forward(c, y0, self.checkpoints)

    def backward_pass(self, c: _Ctx, saved: tuple[Tensor, ...], extra: Any, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
        loop, snaps = extra
        return segmented_backward(c, loop, snaps, grad_ys)


def segment_times(save_times: Tensor, checkpoints: int | None) -> list[float]:
    """Interior times after which the forward snapshots its whole loop state: the save
    times, plus ``checkpoints - 1`` equally spaced times when ``checkpoints`` is given, in the
    direction time runs (the first snapshot is the start)."""
    times = [float(x) for x in save_times]
    t0, t1 = times[0], times[-1]
    extra = [float(e) for e in torch.linspace(t0, t1, checkpoints + 1, dtype=torch.float64)[1:-1]] if checkpoints else []
    sign = 1.0 if t1 >= t0 else -1.0
    return sorted(set(times[1:-1]) | set(extra), key=lambda x: sign * x)


def segmented_forward(c: _Ctx, y0: Tensor, checkpoints: int | None) -> tuple[Tensor, tuple[Tensor, ...], Any]:
    """The plain solve (no graph) snapshotting its whole loop state at the first check after
    the slowest sample passed each of :func:`segment_times`; returns ``(ys, (), (loop, snapshots))``."""
    loop, state = c.detached_loop(y0)
    snaps = [loop.snapshot(state)]
    snaps += loop.run(state, boundaries=segment_times(c.save_times, checkpoints), progress=c.options.progress)
    sol = loop.solution(state)
    c.stats = [sol]
    loop.observer = None  # the backward's re-runs are not recorded
    return sol.ys, (), (loop, snaps)


def _leaves(carry: Any) -> tuple[Any, list[Tensor]]:
    """``carry`` (None, a tensor or nested (named) tuples of tensors and plain values) with its
    floating-point tensors as fresh leaves requiring grad, and those leaves in :func:`_as_list`'s order."""
    leaves: list[Tensor] = []

    def fresh(x: Any) -> Any:
        if isinstance(x, tuple):
            return _rebuild(x, (fresh(v) for v in x))
        if isinstance(x, Tensor) and x.is_floating_point():
            leaves.append(x.detach().requires_grad_(True))
            return leaves[-1]
        return x

    return fresh(carry), leaves


def _as_list(carry: Any) -> list[Tensor]:
    """The floating-point tensors of ``carry`` (nested as :func:`_leaves`'s input), in order."""
    if isinstance(carry, tuple):
        return [x for v in carry for x in _as_list(v)]
    return [carry] if isinstance(carry, Tensor) and carry.is_floating_point() else []


def segmented_backward(c: _Ctx, loop: Integrator, snaps: list[LoopState], grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    """Walk the snapshots from last to first: restore the whole loop state (y and the
    solver's carry as leaves), re-run the same iterations with the graph on, and pull the
    adjoints of ``y``, the carry and the ``ys`` written in the segment back through them."""
    params = c.theta
    gp = torch.zeros_like(_flat_params(params, grad_ys))
    adj_y: Tensor | None = None
    adj_carry: list[Tensor] | None = None
    adj_state: list[Tensor] | None = None
    carries = c.solver.graph_state  # the solver's state is differentiated like the carry
    for k in range(len(snaps) - 1, -1, -1):
        snap = snaps[k]
        # failed samples nobody differentiates see a finite state (their 0 * NaN would reach
        # the shared parameters' gradient)
        seen = grad_ys.abs().sum(0) + (adj_y.abs() if adj_y is not None else 0.0)
        loop.terms = _masked_terms(c.terms, _dead_samples(c, seen), c.prob.y0.detach())
        stop = snaps[k + 1].iteration if k + 1 < len(snaps) else None
        with torch.enable_grad():
            y_start = snap.y.detach().requires_grad_(True)
            state_leaves: list[Tensor] = []
            solver_state = None
            if k == 0:  # the carry and state are functions of y0 (FSAL f0 = drift(t0, y0), ReversibleHeun's z, ShARK's g)
                f0 = loop.terms.drift(snap.t, y_start) if c.solver.fsal else None
                carry = c.solver.initial_carry(loop.terms, snap.t, y_start, f0) if c.solver.fsal else None
                carry_leaves: list[Tensor] = []
                if carries:  # the forward's start-up g0, re-evaluated on the graph
                    has_g0 = c.start_values is not None and c.start_values[1] is not None
                    g0 = loop.terms.diffusion(snap.t, y_start) if has_g0 and loop.terms.diffusion else None
                    solver_state = loop.solver_init(snap.t, y_start, (None, g0))
            else:
                carry, carry_leaves = _leaves(snap.carry)
                if carries:
                    solver_state, state_leaves = _leaves(snap.solver_state)
            state = loop.restore(snap, y_start, carry, solver_state)
            loop.run(state, stop_at=stop)
            outs: list[Tensor] = [state.ys]
            cots: list[Tensor] = [grad_ys]
            if adj_y is not None:
                outs.append(state.y)
                cots.append(adj_y)
            for adjoint, values in ((adj_carry, state.carry), (adj_state, state.solver_state if carries else None)):
                for out, cot in zip(_as_list(values), adjoint or []):
                    outs.append(out)
                    cots.append(cot)
            pairs = [(o, g) for o, g in zip(outs, cots) if o.requires_grad]
            inputs = [y_start, *carry_leaves, *state_leaves, *params]
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
        n_carry, n_state = len(carry_leaves), len(state_leaves)
        adj_carry = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads[1 : 1 + n_carry], carry_leaves)]
        adj_state = [
            g if g is not None else torch.zeros_like(x) for g, x in zip(grads[1 + n_carry : 1 + n_carry + n_state], state_leaves)
        ]
        gp = gp + _flatten_grads(tuple(grads[1 + n_carry + n_state :]), params, grad_ys)
    assert adj_y is not None
    return adj_y + grad_ys[0], gp
