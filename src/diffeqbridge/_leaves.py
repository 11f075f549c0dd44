"""Run a solve on fresh leaf copies of non-leaf inputs, routing their gradients back.

The adjoint sensealgs differentiate with respect to ``y0`` and ``prob.params`` only, by VJPs
over exactly those tensors.  A model whose vector field uses a tensor computed by another
network (a latent SDE's encoder context, a neural CDE's learned control coefficients) must
therefore hand the solve a *leaf* copy of it, listed in ``params``; :func:`through_leaves`
makes the copy, runs the solve on it, and in the backward pass pulls the cotangents of the
outputs back to the copy and on to the original tensor (and to the given parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class _ThroughLeaves(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], n_inputs: int, *tensors: Tensor) -> Any:  # type: ignore[override]
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad():
            outs = run(*leaves)
        ctx.leaves, ctx.params, ctx.outs = leaves, params, outs
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        wrt = [*ctx.leaves, *ctx.params]
        live = [i for i, x in enumerate(wrt) if x.requires_grad]
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        result: list[Tensor | None] = [None] * len(wrt)
        if pairs and live:
            got = torch.autograd.grad(
                [o for o, _ in pairs], [wrt[i] for i in live], grad_outputs=[g for _, g in pairs], allow_unused=True
            )
            for i, g in zip(live, got):
                result[i] = g
        ctx.outs = None
        return (None, None, *result)


def through_leaves(
    run: Callable[..., tuple[Tensor, ...]], inputs: Sequence[Tensor], params: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``run(*leaf_copies_of_inputs) -> outputs`` with gradients routed to ``inputs`` and ``params``.

    ``params`` are the leaf parameters ``run`` uses directly (they must be listed so that
    autograd delivers their gradients through this node).
    """
    return _ThroughLeaves.apply(run, len(inputs), *inputs, *params)
