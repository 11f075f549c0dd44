"""JAX score networks as ``dd`` models: ``dd.from_jax(fn, params)``.

``fn(x, t, params)`` is a JAX function (``x`` ``(B, *shape)``, ``t`` ``(B,)``, ``params`` any
pytree) returning ``x``'s shape.  The wrapper is a torch ``nn.Module`` whose one parameter
``theta`` is the flattened pytree (``jax.flatten_util.ravel_pytree``); a call evaluates the
jitted ``fn`` through :mod:`diffeqbridge.jax`'s torch/JAX bridge (DLPack, no copy on CPU) and
its backward is ``jax.vjp``, so every sampler, ``log_likelihood`` and every sensealg
differentiate it with respect to ``x`` and ``theta`` (``model.params()`` unflattens
``theta`` back into the pytree, e.g. to read gradients: ``model.params(theta.grad)``).
float64 needs ``jax.config.update("jax_enable_x64", True)``.  The model runs on the host
(CPU arrays), as the rest of the JAX front end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class JaxModel(nn.Module):
    """A JAX ``fn(x, t, params)`` as a torch model ``(x, t) -> out`` (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], params: Any = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be a JAX function fn(x, t, params); got {type(fn).__name__}")
        import jax
        import numpy as np
        from jax.flatten_util import ravel_pytree

        flat, self._unravel = ravel_pytree(params if params is not None else ())
        self.theta = nn.Parameter(torch.as_tensor(np.array(flat), dtype=dtype).reshape(-1))
        flat_fn = jax.jit(lambda t, x, th: fn(x, t, self._unravel(th)))
        self._vjp = lambda t, x, th: jax.vjp(lambda xx, tt: flat_fn(t, xx, tt), x, th)

    def params(self, flat: Tensor | None = None) -> Any:
        """``theta`` (or another flat vector such as ``theta.grad``) as the JAX pytree."""
        import jax.numpy as jnp

        v = self.theta if flat is None else flat
        return self._unravel(jnp.asarray(v.detach().cpu().numpy()))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        from ..jax import _JaxField

        return _JaxField.apply(None, self._vjp, t.to(x.dtype), x, self.theta.to(x.dtype))


def from_jax(fn: Callable[..., Any], params: Any = None, dtype: torch.dtype = torch.float64) -> JaxModel:
    """Wrap a JAX ``fn(x, t, params)`` as a model for ``dd.sample``/``dd.log_likelihood``."""
    return JaxModel(fn, params, dtype)
