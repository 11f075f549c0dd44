"""Exact likelihoods through the probability-flow ODE (Song et al. 2021, Sec. 4.3 / App. D.2).

The flow ``dx/dt = h(t, x) = f(t) x - g(t)^2 score(x, t) / 2`` transports ``p_t``, so along a
trajectory ``d log p_t(x_t) / dt = -div h(t, x_t)`` (the instantaneous change of variables,
Chen et al. 2018) and::

    log p_{t_end}(x) = log p_T(x_T) + int_{t_end}^T div h(t, x_t) dt,

with ``x_T`` the flow's image of ``x`` and ``p_T`` replaced by the prior.  The state
``[x, int div]`` is solved forward from ``t_end`` to ``T`` by :func:`diffeqbridge.solve`
(per-sample adaptive steps, one error norm per sample over both parts).

Divergence: ``trace="exact"`` takes one vector-Jacobian product per state dimension, all in
one batched ``torch.autograd.grad(..., is_grads_batched=True)`` (memory ``D`` times one VJP:
for small ``D``); ``trace="hutchinson"`` (Hutchinson 1989; FFJORD, Grathwohl et al. 2019)
estimates ``E[v^T (dh/dx) v]`` with ``n_probes`` Rademacher or Gaussian probes drawn once per
sample from ``(seed, sample index)`` and held fixed for the whole solve (the estimator of
``log p`` is then unbiased and the ODE stays an ODE).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..problem import ODEProblem
from ..solution import Solution
from ..solve import solve
from ..solvers import Tsit5
from .common import STREAMS, check_model_dtype, check_seed, check_t_end, check_x, per_sample_normal, per_sample_rademacher
from .models import ModelAdapter, as_adapter, check_model, check_parameterization, check_sde
from .processes import DiffusionProcess
from .sampling import reverse_sde_drift

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _probes(shape: tuple[int, ...], n_probes: int, probe: str, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n_probes, B, *state_shape)`` probes; sample ``i``'s depend on ``(seed, i)`` only."""
    batch, rest = shape[0], shape[1:]
    draw = per_sample_rademacher if probe == "rademacher" else per_sample_normal
    v = draw((batch, n_probes * math.prod(rest)), seed, STREAMS["probe"], dtype, device)
    return v.reshape(batch, n_probes, *rest).movedim(1, 0).contiguous()


def _basis(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(D, B, *state_shape)``: the unit vectors of the state, repeated over the batch."""
    batch, rest = shape[0], shape[1:]
    d = math.prod(rest)
    eye = torch.eye(d, dtype=dtype, device=device).reshape(d, 1, *rest)
    return eye.expand(d, batch, *rest)


def _vjps(out: Tensor, x: Tensor, vs: Tensor, create_graph: bool) -> Tensor:
    """``v^T (d out / d x)`` for every ``v`` in ``vs`` ``(P, B, ...)`` -> ``(P, B, ...)``."""
    try:
        (g,) = torch.autograd.grad(out, x, vs, is_grads_batched=True, create_graph=create_graph, retain_graph=True)
        return g
    except RuntimeError:  # a model vmap cannot batch over: one VJP at a time
        rows = [torch.autograd.grad(out, x, v, create_graph=create_graph, retain_graph=True)[0] for v in vs]
        return torch.stack(rows)


def augmented_flow(
    adapter: ModelAdapter, sde: DiffusionProcess, shape: tuple[int, ...], trace: str, probes: Tensor | None
) -> Any:
    """The vector field of ``[x, int div h]`` on flat states ``(B, D + 1)``."""
    drift = reverse_sde_drift(adapter, sde, 0.5)
    d = math.prod(shape[1:])

    def field(t: Tensor, y: Tensor) -> Tensor:
        differentiable = torch.is_grad_enabled() and y.requires_grad
        with torch.enable_grad():
            x = y[:, :d].reshape(shape)
            if not differentiable:
                x = x.detach().requires_grad_(True)
            h = drift(t, x)
            if trace == "exact":
                vs = _basis(shape, x.dtype, x.device)
                div = (_vjps(h, x, vs, differentiable).flatten(2) * vs.flatten(2)).sum(dim=2).sum(dim=0)
            else:
                assert probes is not None
                div = (_vjps(h, x, probes, differentiable) * probes).flatten(2).sum(dim=2).mean(dim=0)
        out = torch.cat([h.flatten(1), div.unsqueeze(1)], dim=1)
        return out if differentiable else out.detach()

    return field


def log_likelihood(
    model: Any,
    sde: DiffusionProcess,
    x0: Tensor,
    parameterization: str = "eps",
    alg: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    t_end: float = 1e-5,
    trace: str = "exact",
    seed: int = 0,
    n_probes: int = 1,
    probe: str = "rademacher",
    **options: Any,
) -> tuple[Tensor, Solution]:
    """``log p_{t_end}(x0)`` in nats by the probability-flow ODE (see the module docstring).

    Args:
        model, sde, parameterization: as :func:`dd.sample <diffeqbridge.diffusion.sample>`.
        x0: ``(B, *state_shape)`` data points.
        alg: any deb ODE solver (default ``Tsit5()``); ``atol``/``rtol``: its tolerances.
        t_end: the time the data sit at (score_sde's likelihood uses ``1e-5``).
        trace: ``"exact"`` | ``"hutchinson"``.
        seed, n_probes, probe: Hutchinson probes (``"rademacher"`` | ``"gaussian"``),
            ``n_probes`` per sample, fixed for the whole solve.
        **options: passed to :func:`diffeqbridge.solve` (``max_steps``, ``sensealg`` ...).

    Returns:
        ``(logp, sol)``: ``logp`` ``(B,)``; ``sol`` the augmented solve from ``t_end`` to ``T``
        (``sol.ys[-1][:, :D]`` the latents ``x_T``, ``sol.stats.nf`` model evaluations).
        Gradients flow to ``x0`` and (with ``sensealg``) the model's parameters.
    """
    sde = check_sde(sde)
    check_model(model)
    if not isinstance(model, ModelAdapter):
        check_parameterization(parameterization)
    x0 = check_x("x0", x0)
    check_model_dtype(model, x0, "x0")
    t_end = check_t_end(t_end, sde.T)
    check_seed(seed)
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}; got {trace!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}; got {probe!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int; got {n_probes!r}")
    adapter = as_adapter(model, sde, parameterization)
    shape = tuple(x0.shape)
    probes = _probes(shape, n_probes, probe, seed, x0.dtype, x0.device) if trace == "hutchinson" else None
    y0 = torch.cat([x0.flatten(1), torch.zeros_like(x0[:, :1].flatten(1)[:, :1])], dim=1)
    prob = ODEProblem(augmented_flow(adapter, sde, shape, trace, probes), y0, tspan=(t_end, sde.T), params=adapter.parameters())
    sol = solve(prob, alg if alg is not None else Tsit5(), atol=atol, rtol=rtol, **options)
    d = math.prod(shape[1:])
    end = sol.ys[-1]
    x_T = end[:, :d].reshape(shape)
    return sde.prior_logp(x_T) + end[:, d], sol


def bits_per_dim(logp: Tensor, dim: int, offset: float = 0.0) -> Tensor:
    """Bits per dimension ``-logp / (dim ln 2) + offset`` for ``logp`` ``(B,)`` nats.

    For 8-bit data rescaled from ``{0, ..., 255}`` (dequantized to ``[0, 256)``) onto an
    interval of width ``w`` the density changes by ``(256 / w)^dim``: pass
    ``offset = 8 - log2(w)`` (7 for data in ``[-1, 1]``, as score_sde's ``bpd``).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int; got {dim!r}")
    return -logp / (dim * math.log(2.0)) + offset
