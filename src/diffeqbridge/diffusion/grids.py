"""Time grids and per-sample schedule values shared by the fixed-grid samplers.

The fixed-grid samplers (DPM-Solver, EDM, BDIA, EDICT) work in the half log-SNR
``lambda(t) = log(alpha(t) / sigma(t))`` of the forward process
``x_t = alpha(t) x_0 + sigma(t) eps``.  Schedule values are computed in float64 whatever the
state's dtype (they are ``(B,)`` vectors: cheap) and cast where they meet the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")


@dataclass(frozen=True)
class Point:
    """Schedule values at per-sample times: ``t``, ``alpha``, ``sigma``, ``lam``, each ``(B,)`` float64."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor

    def select(self, idx: Tensor) -> Point:
        """The rows ``idx`` (a 1-D index tensor) of every field."""
        return Point(self.t[idx], self.alpha[idx], self.sigma[idx], self.lam[idx])


def point(sde: Any, t: Tensor) -> Point:
    """:class:`Point` at times ``t`` ``(B,)`` (cast to float64)."""
    t = t.to(torch.float64)
    alpha, sigma = sde.marginal(t)
    return Point(t, alpha.to(torch.float64), sigma.to(torch.float64), sde.log_snr(t).to(torch.float64))


def t_of_lam(sde: Any, lam: Tensor, t_lo: float, t_hi: float) -> Tensor:
    """Times ``(B,)`` with ``lambda(t) = lam``, clamped to ``[t_lo, t_hi]`` against rounding."""
    return sde.t_from_log_snr(lam.to(torch.float64)).to(torch.float64).clamp(t_lo, t_hi)


def check_skip_type(skip_type: Any) -> str:
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}; got {skip_type!r}")
    return skip_type


def time_grid(sde: Any, t_start: float, t_end: float, n: int, skip_type: str, device: torch.device | str | None = None) -> Tensor:
    """``n + 1`` decreasing float64 times from ``t_start`` to ``t_end`` (both exact).

    ``"logSNR"``: uniform in ``lambda`` (DPM-Solver's recommendation for few steps, Lu et al.
    2022, Sec. 3.3); ``"time_uniform"``: uniform in ``t``; ``"time_quadratic"``: uniform in
    ``sqrt(t)`` (DDIM's quadratic skip, Song et al. 2021a).
    """
    s = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64, device=device)
    if skip_type == "time_uniform":
        ts = t_start + s * (t_end - t_start)
    elif skip_type == "time_quadratic":
        ts = (math.sqrt(t_start) + s * (math.sqrt(t_end) - math.sqrt(t_start))).square()
    else:
        ends = sde.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64, device=device)).to(torch.float64)
        ts = t_of_lam(sde, ends[0] + s * (ends[1] - ends[0]), t_end, t_start)
    ts = ts.clone()
    ts[0], ts[-1] = t_start, t_end
    return ts


def at_time(t: float | Tensor, batch: int, device: torch.device | str | None = None) -> Tensor:
    """A grid time as a ``(B,)`` float64 vector (every sample at the same time)."""
    return torch.as_tensor(t, dtype=torch.float64, device=device).reshape(()).expand(batch).clone()


def evaluations_per_call(adapter: Any) -> int:
    """Network evaluations one model call costs (2 for classifier-free guidance, else 1)."""
    return int(getattr(getattr(adapter, "model", None), "evaluations_per_call", 1))
