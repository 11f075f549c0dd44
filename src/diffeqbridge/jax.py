"""JAX front end: solve SDEs/ODEs whose drift/diffusion are written in JAX, with ``jax.grad``.

::

    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    from diffeqbridge.jax import solve

    ys = solve(lambda t, y, p: p["mu"] * y, lambda t, y, p: p["sigma"] * y,
               y0, tspan=(0.0, 1.0), saveat=[0.0, 1.0], params={"mu": 0.5, "sigma": 0.3},
               alg="SRIW1", dt=2**-6, seed=0)
    jax.grad(lambda p: solve(..., params=p)[-1].sum())(params)

How it works.  The integration is the native torch engine.  ``y0`` and the parameters (any
pytree, flattened with ``jax.flatten_util.ravel_pytree`` into one vector) cross to torch
through DLPack (no copy on CPU for contiguous arrays).  The JAX drift/diffusion are wrapped
as torch functions (a ``torch.autograd.Function`` whose forward evaluates the JAX function
and whose backward is ``jax.vjp``), so every torch ``sensealg`` differentiates them.  The
solve itself is a ``jax.custom_vjp``: the forward runs the torch solve; the backward re-runs
it with the autograd graph on (same Brownian tree: identical noise) and pulls the JAX
cotangent back with ``torch.autograd.grad`` (or the chosen adjoint), returning the
gradients for ``y0`` and the parameter pytree.  The cost of the backward is one forward solve
plus the sensealg's backward.

``jax.jit``.  Both the forward and the backward cross to torch through ``jax.pure_callback``
with the output shapes declared up front, so ``jax.jit(solve_fn)`` and
``jax.jit(jax.grad(loss))`` work (tested).  What does NOT work: ``jax.vmap`` over the solve
(the callback is not batched: put samples on the batch axis instead), forward-mode
(``jax.jvp``/``jax.jacfwd``: ``custom_vjp`` has no JVP rule), higher-order derivatives
(``jax.hessian``), accelerator placement (the callback runs on the host; arrays are moved
to host memory), and differentiating with respect to ``tspan``/``saveat``/``dt``.  Inside
the callback the solve is ordinary eager torch (not compiled by XLA).
``sensealg=BacksolveAdjoint()`` on an Itô problem needs second derivatives of the
diffusion (the Itô→Stratonovich correction), which the JAX wrapper does not provide: use a
Stratonovich/additive problem or another sensealg with JAX functions (such a call is a
``ValueError``; it used to return wrong gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.flatten_util import ravel_pytree
from torch.autograd.function import once_differentiable

from . import solvers as _solvers
from .adjoint import BacksolveAdjoint
from .problem import ODEProblem, SDEProblem
from .solve import _check_saveat
from .solve import solve as _torch_solve

__all__ = ["solve"]


def _to_torch(x: Any) -> torch.Tensor:
    x = jnp.asarray(x)
    try:
        return torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 - e.g. unsupported dtype/layout: fall back to a copy
        return torch.from_numpy(np.array(x))


def _to_jax(x: torch.Tensor) -> jax.Array:
    x = x.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    try:
        return jnp.from_dlpack(x)
    except Exception:  # noqa: BLE001
        return jnp.asarray(x.cpu().numpy())


class _JaxField(torch.autograd.Function):
    """``fn(t, y, unravel(theta))`` evaluated in JAX (``vjp_fn`` = jitted ``jax.vjp``), differentiated by its VJP."""

    @staticmethod
    def forward(
        ctx: Any,
        fn: Callable,
        vjp_fn: Callable,
        t: torch.Tensor,
        y: torch.Tensor,  # type: ignore[override]
        theta: torch.Tensor,
    ) -> torch.Tensor:
        out, vjp = vjp_fn(_to_jax(t), _to_jax(y), _to_jax(theta))
        ctx.vjp = vjp
        return _to_torch(out).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gy, gth = ctx.vjp(_to_jax(grad.contiguous()))
        return None, None, None, _to_torch(gy).clone(), _to_torch(gth).clone()


def _resolve_alg(alg: Any) -> Any:
    if isinstance(alg, str):
        if not hasattr(_solvers, alg):
            raise ValueError(f"alg={alg!r} is not a diffeqbridge solver name")
        return getattr(_solvers, alg)()
    return alg


def _check_inputs(
    drift: Callable,
    diffusion: Callable | None,
    y0: jax.Array,
    tspan: tuple[float, float],
    saveat: Sequence[float] | None,
    params: Any,
    noise: str,
    interpretation: str,
    noise_dim: int | None,
    sensealg: Any,
) -> None:
    """Argument errors as ValueError/TypeError here, before the solve (inside the host callback
    they would surface as an opaque ``JaxRuntimeError``).  Field output shapes are checked with
    ``jax.eval_shape`` (abstract: no evaluation, also under ``jax.jit``)."""
    if not callable(drift):
        raise TypeError(f"drift must be callable as drift(t, y, params); got {type(drift).__name__}")
    if diffusion is not None and not callable(diffusion):
        raise TypeError(f"diffusion must be callable as diffusion(t, y, params) or None; got {type(diffusion).__name__}")
    shell = torch.zeros(y0.shape, dtype=torch.float64)
    prob: ODEProblem = (
        ODEProblem(lambda t, y: y, shell, tspan)
        if diffusion is None
        else SDEProblem(
            lambda t, y: y, lambda t, y: y, shell, tspan, noise=noise, interpretation=interpretation, noise_dim=noise_dim
        )
    )
    _check_saveat(saveat, *prob.tspan, shell.device)
    if isinstance(sensealg, BacksolveAdjoint) and diffusion is not None and interpretation == "ito" and noise != "additive":
        # its Itô→Stratonovich correction differentiates ½(∂σ/∂y)σ again: the JAX field's VJP is
        # once-differentiable, and that derivative came out silently dropped (wrong gradients)
        raise ValueError(
            f"sensealg=BacksolveAdjoint() on an Itô problem with noise={noise!r} needs second derivatives "
            "of the JAX diffusion, which diffeqbridge.jax does not provide: use interpretation='stratonovich', "
            "noise='additive', or sensealg=InterpolatingAdjoint()/DiscreteAdjoint()"
        )
    t = jax.ShapeDtypeStruct((y0.shape[0],), y0.dtype)
    fields = [("drift", drift, tuple(y0.shape), "y0's shape")]
    if diffusion is not None:
        fields.append(("diffusion", diffusion, tuple(prob.diffusion_shape()), f"noise={noise!r}"))  # type: ignore[attr-defined]
    for name, fn, expected, why in fields:
        out = jax.eval_shape(fn, t, y0, params)
        if not isinstance(out, jax.ShapeDtypeStruct) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
            raise ValueError(f"{name}(t, y, params) returns shape {got}; expected {expected} ({why})")


def solve(
    drift: Callable,
    diffusion: Callable | None,
    y0: Any,
    tspan: tuple[float, float],
    saveat: Sequence[float] | None = None,
    params: Any = None,
    *,
    noise: str = "diagonal",
    interpretation: str = "ito",
    noise_dim: int | None = None,
    alg: Any = None,
    seed: int = 0,
    sensealg: Any = None,
    **solve_kwargs: Any,
) -> jax.Array:
    """Solve with JAX drift/diffusion; differentiable with ``jax.grad`` w.r.t. ``y0`` and ``params``.

    Args:
        drift: ``drift(t, y, params)`` in JAX; ``t`` has shape ``(B,)``, ``y`` ``(B, *state)``.
        diffusion: ``diffusion(t, y, params)`` or ``None`` for an ODE.
        y0: ``(B, *state_shape)`` JAX array (float64 needs ``jax_enable_x64``).
        tspan, saveat: as :func:`diffeqbridge.solve` (static: not differentiated).
        params: a pytree of JAX arrays (or None).
        noise, interpretation, noise_dim: as :class:`diffeqbridge.SDEProblem`.
        alg: a solver instance or its name (``"SRIW1"``...).
        seed: Brownian seed: the same seed gives the same path as the torch ``solve``.
        sensealg: a torch sensealg (``deb.BacksolveAdjoint()``...), used by the backward.
        **solve_kwargs: ``dt``, ``adaptive``, ``atol``, ``rtol``, ``max_steps``...

    Returns:
        ``ys`` of shape ``(T, B, *state_shape)``.
    """
    y0 = jnp.asarray(y0)
    _check_inputs(drift, diffusion, y0, tspan, saveat, params, noise, interpretation, noise_dim, sensealg)
    flat, unravel = ravel_pytree(params if params is not None else ())
    if flat.size == 0:
        flat = jnp.zeros((0,), dtype=y0.dtype)
    flat = flat.astype(y0.dtype)
    n_save = 2 if saveat is None else len(np.atleast_1d(np.asarray(saveat)))
    out_shape = jax.ShapeDtypeStruct((n_save, *y0.shape), y0.dtype)
    alg = _resolve_alg(alg)
    saveat_t = None if saveat is None else [float(s) for s in np.atleast_1d(np.asarray(saveat))]

    def jitted_vjp(fn: Callable) -> Callable:
        # one compiled forward and one compiled transpose per shape, reused at every step
        flat_fn = jax.jit(lambda t, y, th: fn(t, y, unravel(th)))
        return lambda t, y, th: jax.vjp(lambda yy, tt: flat_fn(t, yy, tt), y, th)

    drift_vjp = jitted_vjp(drift)
    diffusion_vjp = jitted_vjp(diffusion) if diffusion is not None else None

    def torch_solve(y0_t: torch.Tensor, flat_t: torch.Tensor) -> torch.Tensor:
        f = lambda t, y: _JaxField.apply(drift, drift_vjp, t, y, flat_t)  # noqa: E731
        if diffusion is None:
            prob: ODEProblem = ODEProblem(f, y0_t, tspan, params=[flat_t])
        else:
            g = lambda t, y: _JaxField.apply(diffusion, diffusion_vjp, t, y, flat_t)  # noqa: E731
            prob = SDEProblem(f, g, y0_t, tspan, noise=noise, interpretation=interpretation, noise_dim=noise_dim, params=[flat_t])
        return _torch_solve(prob, alg, saveat=saveat_t, seed=seed, sensealg=sensealg, **solve_kwargs).ys

    def host_forward(y0_h: Any, flat_h: Any) -> np.ndarray:
        with torch.no_grad():
            ys = torch_solve(_to_torch(y0_h).clone(), _to_torch(flat_h).clone())
        return np.asarray(ys.detach().cpu().numpy(), dtype=out_shape.dtype)

    def host_backward(y0_h: Any, flat_h: Any, g_h: Any) -> tuple[np.ndarray, np.ndarray]:
        y0_t = _to_torch(y0_h).clone().requires_grad_(True)
        flat_t = _to_torch(flat_h).clone().requires_grad_(True)
        with torch.enable_grad():
            ys = torch_solve(y0_t, flat_t)
            gy, gp = torch.autograd.grad(ys, [y0_t, flat_t], grad_outputs=_to_torch(g_h).clone(), allow_unused=True)
        gy = torch.zeros_like(y0_t) if gy is None else gy
        gp = torch.zeros_like(flat_t) if gp is None else gp
        return (np.asarray(gy.detach().cpu().numpy(), dtype=y0.dtype), np.asarray(gp.detach().cpu().numpy(), dtype=flat.dtype))

    @jax.custom_vjp
    def _solve(y0_j: jax.Array, flat_j: jax.Array) -> jax.Array:
        return jax.pure_callback(host_forward, out_shape, y0_j, flat_j)

    def _fwd(y0_j: jax.Array, flat_j: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return _solve(y0_j, flat_j), (y0_j, flat_j)

    def _bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
        y0_j, flat_j = res
        shapes = (jax.ShapeDtypeStruct(y0_j.shape, y0_j.dtype), jax.ShapeDtypeStruct(flat_j.shape, flat_j.dtype))
        return tuple(jax.pure_callback(host_backward, shapes, y0_j, flat_j, g))  # type: ignore[return-value]

    _solve.defvjp(_fwd, _bwd)
    return _solve(y0, flat)
