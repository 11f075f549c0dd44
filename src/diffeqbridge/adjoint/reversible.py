"""``BacksolveAdjoint`` after an algebraically reversible solver (``ReversibleHeun``): the
forward is the engine's plain fixed-step solve (keeping only the final state and carry), the
backward undoes its steps one by one with the algebraic inverse and pulls the cotangents back
through one drift and one diffusion evaluation per step: the exact gradient of the returned
numbers in O(1) memory (Kidger, Foster, Li, Lyons 2021; diffrax's ``ReversibleAdjoint`` idea).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine import fixed_steps, forced_times
from .common import _Ctx, _flat_params, _flatten_grads

__all__ = ["reversible_forward", "reversible_backward"]


def reversible_forward(c: _Ctx, y0: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Any]:
    """The engine's fixed-step solve without a graph; returns ``ys`` and ``(y_end, z_end)``
    (the final state and the ``z`` of the solver's state), all the backward needs."""
    loop, state = c.detached_loop(y0)
    loop.run(state, progress=c.options.progress)
    sol = loop.solution(state)
    c.stats = [sol]
    return sol.ys, (state.y, state.solver_state[0]), None


def reversible_steps(c: _Ctx) -> tuple[list[tuple[float, float, float]], list[int]]:
    """The engine's fixed steps ``(t, h, t + h)`` over the save times and ``tstops`` (same
    float arithmetic, :func:`diffeqbridge.engine.fixed_steps`) and, for every save time after
    the first, the number of steps taken to reach it."""
    stops, slots = forced_times(c.save_times, c.options.tstops, interpolate=False)
    steps, reached = fixed_steps(stops.tolist(), float(c.dt_initial[0]))
    return steps, [n for n, slot in zip(reached, slots.tolist()[1:]) if slot >= 0]


def _reversible_noises(c: _Ctx, steps: list[tuple[float, float, float]], dtype: torch.dtype) -> Tensor:
    """``W(t) - W(s)`` of every step ``(s, h, t)``, ``(n, *noise shape)``, exactly as the
    engine computes them (one tree query for the whole grid: ``evaluate_grid``)."""
    tree = c.tree
    assert tree is not None
    if not steps:
        return torch.zeros((0, *tree.shape), dtype=dtype, device=tree.device)
    w, _ = tree.evaluate_grid([steps[0][0]] + [t for _, _, t in steps], levy=False)
    return (w[1:] - w[:-1]).reshape(len(steps), *tree.shape).to(tree.dtype).to(dtype)


def _vec(c: _Ctx, value: float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(B,)`` filled with ``value``, in ``like``'s dtype (or ``dtype``)."""
    return torch.full((c.prob.batch_size,), value, dtype=torch.float64, device=like.device).to(dtype or like.dtype)


def reversible_backward(c: _Ctx, y_end: Tensor, z_end: Tensor, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    """Exact discrete gradient of :func:`reversible_forward` in O(1) memory.

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
    steps, ends = reversible_steps(c)
    n = len(steps)
    save_at_node = {node: k + 1 for k, node in enumerate(ends)}
    like = y_end

    def node_time(j: int) -> Tensor:  # the engine's float64 t plus the step in the state's dtype
        if j == 0:
            return _vec(c, steps[0][0] if steps else float(c.save_times[0]), like, torch.float64)
        s, h, _ = steps[j - 1]
        return _vec(c, s, like, torch.float64) + _vec(c, h, like)

    noises = _reversible_noises(c, steps, like.dtype)

    def step_terms(j: int) -> tuple[Tensor, Tensor]:  # (h_j broadcast over the state, dW_j)
        return _vec(c, steps[j][1], like).reshape((-1,) + (1,) * (like.ndim - 1)), noises[j]

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
            grads: tuple[Tensor | None, ...]
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
