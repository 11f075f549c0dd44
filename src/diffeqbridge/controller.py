"""Per-sample step-size control: error norms, the PI controller and initial step sizes.

Everything works on ``(B,)`` tensors; nothing synchronises with the host.

PI controller as OrdinaryDiffEq/StochasticDiffEq (``stepsize_controller!`` for
``PIController``)::

    q11 = EEst^beta1;  q = q11 / qold^beta2;  q = clamp(q / gamma, 1/qmax, 1/qmin)
    accept (EEst <= 1): dt_new = dt / q,  qold = max(EEst, 1e-4)
    reject:             dt_new = dt / min(1/qmin, q11 / gamma)

with ``beta1 = 7/(10 q_alg)``, ``beta2 = 2/(5 q_alg)`` unless the solver overrides them;
``qmax = 9/8`` for SDE solvers and 10 for ODE solvers, ``qmin = 1/5``, ``gamma = 0.9``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .problem import expand_to
from .solvers.base import AbstractSolver

QOLD_INIT = 1e-4


def layout_free_pow(x: Tensor, b: float) -> Tensor:
    """``x ** b`` for ``x >= 0`` (``(B,)``), as ``exp(b log x)``: ``torch.pow`` rounds
    differently in its vectorised blocks and its scalar tail (AVX-512), so a sample's step
    size would depend on the batch length; ``exp``/``log`` are the same in both (tested in
    ``tests/test_batch_invariance.py``).  ``0 -> 0``, ``inf -> inf``, NaN stays NaN (``b > 0``)."""
    return torch.exp(b * torch.log(x))


def scaled_error_norm(error: Tensor, y0: Tensor, y1: Tensor, atol: float | Tensor, rtol: float | Tensor) -> Tensor:
    """RMS over the state of ``error / (atol + rtol * max(|y0|, |y1|))``: ``(B, ...) -> (B,)``."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return (error / scale).square().flatten(1).mean(dim=1).sqrt()


@dataclass(frozen=True)
class PIController:
    beta1: float
    beta2: float
    qmin: float
    qmax: float
    gamma: float

    @classmethod
    def for_solver(cls, solver: AbstractSolver) -> PIController:
        order = solver.controller_order
        sde_default_qmax = 9 / 8 if solver.is_sde else 10.0
        return cls(
            beta1=solver.beta1 if solver.beta1 is not None else 7 / (10 * order),
            beta2=solver.beta2 if solver.beta2 is not None else 2 / (5 * order),
            qmin=solver.qmin if solver.qmin is not None else 1 / 5,
            qmax=solver.qmax if solver.qmax is not None else sde_default_qmax,
            gamma=solver.gamma if solver.gamma is not None else 9 / 10,
        )

    def propose(self, dt: Tensor, err: Tensor, qold: Tensor, accepted: Tensor) -> tuple[Tensor, Tensor]:
        """Next ``dt`` and ``qold`` for every sample (``(B,)`` each).

        ``err`` may hold ``inf`` for a non-finite step: that sample shrinks by ``qmin``.
        """
        q11 = layout_free_pow(err, self.beta1)
        q = q11 / layout_free_pow(qold, self.beta2)
        # clamped, so NaN is the only non-finite value left: nan_to_num touches nothing else
        q = torch.clamp(q / self.gamma, 1 / self.qmax, 1 / self.qmin).nan_to_num(nan=1 / self.qmin)
        dt_accept = dt / q
        shrink = torch.clamp(q11 / self.gamma, max=1 / self.qmin).nan_to_num(nan=1 / self.qmin)  # q11 >= 0: no -inf
        dt_reject = dt / shrink
        new_dt = torch.where(accepted, dt_accept, dt_reject)
        new_qold = torch.where(accepted, torch.clamp(err, min=QOLD_INIT), qold)
        return new_dt, new_qold


def _rms(x: Tensor) -> Tensor:
    return x.square().flatten(1).mean(dim=1).sqrt()


def sde_initial_dt(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Callable[[Tensor, Tensor], Tensor],
    g_size: Callable[[Tensor], Tensor],
    t0: Tensor,
    y0: Tensor,
    f0: Tensor,
    g0: Tensor,
    order: float,
    atol: float,
    rtol: float,
    dtmax: float,
    direction: float = 1.0,
) -> tuple[Tensor, int, int]:
    """Per-sample starting step for SDEs, after StochasticDiffEq's ``sde_determine_initdt``.

    ``g_size(g)`` maps a diffusion value to the state's shape (identity for diagonal
    noise, a row norm for general noise).  ``direction = -1.0`` when time runs backwards
    (the probe is at ``t0 - dt0``).  Returns ``(dt (B,), nf, ng)``, step magnitudes.
    """
    with torch.no_grad():
        y0, f0 = y0.detach(), f0.detach()
        gs0 = 3 * g_size(g0.detach())
        scale = atol + rtol * y0.abs()
        d0 = _rms(y0 / scale)
        d1 = _rms(torch.maximum((f0 + gs0).abs(), (f0 - gs0).abs()) / scale)
        small = torch.full_like(t0, 1e-6)
        dt0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), small, (0.01 * d0 / d1.clamp_min(1e-300)).to(t0.dtype))
        dt0 = dt0.clamp(max=dtmax)
        y1 = y0 + expand_to(direction * dt0, y0).to(y0.dtype) * f0
        f1 = drift(t0 + direction * dt0, y1)
        gs1 = 3 * g_size(diffusion(t0 + direction * dt0, y1))
        dg_max = (gs0 - gs1).abs()
        df = f1 - f0
        d2 = _rms(torch.maximum((df + dg_max).abs(), (df - dg_max).abs()) / scale) / dt0.to(y0.dtype)
        m = torch.maximum(d1, d2).to(t0.dtype)
        dt1 = torch.where(
            m <= 1e-15,
            torch.maximum(small, dt0 * 1e-3),
            # 10^(-(2 + log10 m) / order) = exp(-(log 100 + log m) / order): layout-free
            torch.exp(-(math.log(100.0) + torch.log(m.clamp_min(1e-300))) / order),
        )
        dt = torch.minimum(torch.minimum(100 * dt0, dt1), torch.full_like(dt0, dtmax))
        dt = torch.where(torch.isfinite(dt) & (dt > 0), dt, small)
    return dt, 1, 1


def fixed_dt(dt: float, batch: int, device: torch.device) -> Tensor:
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive finite number; got {dt!r}")
    return torch.full((batch,), float(dt), dtype=torch.float64, device=device)
