"""EDM sampler: Karras, Aittala, Aila, Laine, "Elucidating the Design Space of
Diffusion-Based Generative Models" (NeurIPS 2022), Algorithm 2.

Any process ``x_t = alpha(t) x_0 + sigma(t) eps`` is sampled in the scaled variables of the
paper's Sec. 2 / Eq. 4, ``x~ = x / alpha`` at noise level ``s = sigma / alpha = exp(-lambda)``,
whose probability-flow ODE is ``dx~/ds = (x~ - D(x~, s)) / s`` with the denoiser
``D(x~, s) = x0-prediction(alpha(t) x~, t)`` at the time ``t`` where ``sigma/alpha = s``
(found with the process's ``t_from_log_snr(-log s)``).  For the VE process ``alpha = 1``:
nothing is scaled.

The noise levels are ``s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``,
``i < N`` (Eq. 5, ``rho = 7``), with ``s_max = sigma(T)/alpha(T)`` and
``s_min = sigma(t_end)/alpha(t_end)`` by default.  Each step is Heun's method (second order)
after an optional churn ``s^ = s (1 + gamma)``, ``x^ = x + sqrt(s^^2 - s^2) S_noise z``,
``gamma = min(S_churn / n_steps, sqrt(2) - 1)`` for ``S_tmin <= s <= S_tmax``; ``z`` is
per-sample noise from ``(seed, step)``.

``denoise_to_zero=False`` (default) stops at ``s_min`` (time ``t_end``, as every sampler of
``dd.sample``): ``steps // 2`` Heun steps, ``2 (steps // 2)`` model calls, output
``alpha(t_end) x~``.  ``denoise_to_zero=True`` is Algorithm 2 as published: ``N = (steps + 1)
// 2`` levels followed by ``s_N = 0`` reached by one Euler step (``2 N - 1`` calls); the output is
``x~`` at ``s = 0`` (reported at ``t = 0``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..problem import expand_to
from ..solution import Solution
from .common import STREAMS, grid_solution, per_sample_normal
from .grids import at_time, evaluations_per_call


def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str | None = None
) -> Tensor:
    """``n`` decreasing float64 noise levels from ``sigma_max`` to ``sigma_min`` (Karras et al. Eq. 5)."""
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64, device=device)
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    sig[0], sig[-1] = sigma_max, sigma_min
    return sig


def _number(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < lo or (lo_open and value == lo) or value > hi:
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}]; got {value}")
    return value


class _Denoiser:
    """``D(x~, s)`` in the scaled variables for per-sample noise levels ``s`` ``(B,)``."""

    def __init__(self, adapter: Any, sde: Any, t_lo: float):
        self.adapter, self.sde, self.t_lo = adapter, sde, t_lo

    def time(self, s: Tensor) -> Tensor:
        """Times ``(B,)`` float64 with ``sigma/alpha = s`` (not capped at ``T``: churn may exceed it)."""
        return self.sde.t_from_log_snr(-torch.log(s)).to(torch.float64).clamp_min(self.t_lo)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """``D(x~, s)`` for states ``x`` ``(B, ...)`` at the time ``t`` (``(B,)`` or ``(1,)``) of level ``s``."""
        alpha = self.sde.marginal(t)[0].to(torch.float64)
        return self.adapter.x0(expand_to(alpha.to(x.dtype), x) * x, t.to(x.dtype).expand(x.shape[0]))


def sample_edm(
    adapter: Any,
    sde: Any,
    x_T: Tensor,
    *,
    t_end: float,
    steps: int | None,
    seed: int = 0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    denoise_to_zero: bool = False,
    save_trajectory: bool = False,
    sensealg: Any = None,
) -> Solution:
    """Karras et al. (2022) Algorithm 2 on any process (module docstring).

    Args:
        adapter: a :class:`~diffeqbridge.diffusion.ModelAdapter` (``.x0`` is the denoiser).
        sde: the forward process; ``x_T`` ``(B, *shape)`` is the state at noise level ``sigma_max``.
        t_end: the time of ``sigma_min``'s default.
        steps: model evaluations per sample (default 36); see the module docstring.
        seed: churn noise seed (sample ``i`` depends on ``(seed, i)`` only).
        sigma_min, sigma_max: noise levels ``sigma/alpha`` of the grid's ends (defaults from the
            process at ``t_end`` and ``T``; the grid must stay inside the process's ``[t_end, T]``:
            the model never sees a time outside it).
        rho, S_churn, S_tmin, S_tmax, S_noise: as the paper.
        denoise_to_zero: finish with the paper's Euler step to ``sigma = 0``.
        save_trajectory: save every grid state (scaled back to ``x`` except at ``sigma = 0``).
        sensealg: must be ``None``: gradients flow by autograd through the loop.

    Returns:
        :class:`~diffeqbridge.Solution` with ``ts`` the grid's times (0 for ``sigma = 0``).
    """
    steps = 36 if steps is None else steps
    if sensealg is not None:
        raise ValueError("method='edm' is differentiated by autograd through its loop; pass sensealg=None")
    rho = _number("rho", rho, 0.0, lo_open=True)
    S_churn = _number("S_churn", S_churn, 0.0)
    S_tmin = _number("S_tmin", S_tmin, 0.0)
    S_tmax = _number("S_tmax", S_tmax, 0.0)
    S_noise = _number("S_noise", S_noise, 0.0)
    if not isinstance(denoise_to_zero, bool):
        raise TypeError(f"denoise_to_zero must be a bool; got {type(denoise_to_zero).__name__}")
    levels = (steps + 1) // 2 if denoise_to_zero else steps // 2 + 1
    if levels < (1 if denoise_to_zero else 2):
        raise ValueError(f"steps={steps} buys no Heun step; give at least 2 model evaluations")
    batch, device = x_T.shape[0], x_T.device
    den = _Denoiser(adapter, sde, float(t_end))
    bounds = torch.tensor([float(t_end), float(sde.T)], dtype=torch.float64, device=device)
    s_lo, s_hi = (float(v) for v in torch.exp(-sde.log_snr(bounds).to(torch.float64)))
    sig_max = s_hi if sigma_max is None else _number("sigma_max", sigma_max, 0.0, s_hi * (1 + 1e-12), lo_open=True)
    sig_min = s_lo if sigma_min is None else _number("sigma_min", sigma_min, s_lo * (1 - 1e-12), sig_max)
    if sig_min >= sig_max:
        raise ValueError(f"sigma_min ({sig_min}) must be below sigma_max ({sig_max})")

    sig = karras_sigmas(levels, sig_min, sig_max, rho, device=device)
    ts = den.time(sig).clamp_max(float(sde.T))
    if sigma_max is None:
        ts[0] = float(sde.T)
    if sigma_min is None:
        ts[-1] = float(t_end)
    sig = torch.exp(-sde.log_snr(ts).to(torch.float64))  # the levels the model really sees
    n_steps = levels if denoise_to_zero else levels - 1
    gamma_max = min(S_churn / n_steps, math.sqrt(2.0) - 1.0)

    alpha0 = sde.marginal(ts[:1])[0].to(torch.float64)
    x = x_T / alpha0.to(x_T.dtype)
    saved, nf = [x_T], 0
    for i in range(n_steps):
        s_cur = float(sig[i])
        s_next = float(sig[i + 1]) if i + 1 < levels else 0.0
        gamma = gamma_max if S_tmin <= s_cur <= S_tmax else 0.0
        s_hat = s_cur * (1.0 + gamma)
        t_hat = at_time(ts[i], 1, device)
        if gamma > 0:
            z = per_sample_normal(tuple(x.shape), seed, STREAMS["churn"] + i, dtype=x.dtype, device=device)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * z
            t_hat = den.time(at_time(s_hat, 1, device))
        d = (x - den(x, t_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        nf += 1
        if s_next > 0:
            d2 = (x_next - den(x_next, at_time(ts[i + 1], 1, device))) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d2)
            nf += 1
        x = x_next
        if save_trajectory:
            saved.append(x if s_next == 0 else x * sde.marginal(ts[i + 1 : i + 2])[0].to(x.dtype))
    out_ts = torch.cat([ts, ts.new_zeros(1)]) if denoise_to_zero else ts
    if not save_trajectory:
        alpha_end = 1.0 if denoise_to_zero else sde.marginal(ts[-1:])[0].to(x.dtype)
        saved.append(x * alpha_end)
        out_ts = out_ts[[0, -1]]
    nf_t = torch.full((batch,), nf * evaluations_per_call(adapter), dtype=torch.long, device=device)
    return grid_solution(out_ts, torch.stack(saved), nf_t, n_steps, alg="edm")
