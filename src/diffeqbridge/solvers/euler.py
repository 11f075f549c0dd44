"""Euler-type SDE solvers: Euler–Maruyama, Euler–Heun and Lamba's adaptive Euler–Maruyama.

* ``EM``: Itô, all noise types, strong 0.5 (1.0 for additive noise), weak 1.0, fixed step.
* ``EulerHeun``: Stratonovich predictor–corrector on drift and diffusion (as
  StochasticDiffEq's ``EulerHeun``), all noise types, strong 0.5 (1.0 for commutative
  noise), weak 1.0, fixed step.
* ``LambaEM``: Euler–Maruyama with the heuristic drift/diffusion error estimate of
  Lamba (2003) as used by StochasticDiffEq's ``LambaEM``:
  ``E_d = dt (f(t+dt, y + f dt) - f(t, y)) / 2`` and
  ``E_n = (g(y + sqrt(dt) g) - g) / (2 sqrt(dt)) * sqrt(2) |dt|``, combined as
  ``delta * E_d + E_n`` with ``delta = 1/6``.  StochasticDiffEq multiplies by the realized
  ``dW^2 - dt`` instead, whose RMS is ``sqrt(2) |dt|``; that makes accepting a step depend on
  its own increment, so the accepted partition anticipates the path and Euler–Maruyama
  sums along it converge to the wrong limit (Gaines & Lyons 1997): on GBM
  (``du = 0.3 u dt + 0.67 u dW``, 64 paths) the mean strong error stalled at 1.5e-2 from
  tol 1e-3 (1.3e3 steps) to tol 1e-5 (1.1e5 steps), where fixed-step EM with 1e4 steps
  gets 4.5e-3.  With the RMS the step choice uses only the past and the error falls as
  ``steps^-1/2`` (tests/test_peer_problems.py).
* ``LambaEulerHeun``: Euler–Heun (Stratonovich) with the same kind of estimate, the
  diffusion part using ``dW^2`` in place of ``dW^2 - dt`` (StochasticDiffEq's
  ``LambaEulerHeun``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import ALL_NOISE, AbstractSolver, StepOutput

SDE_QMAX = 9 / 8  # StochasticDiffEq's qmax for SDE algorithms
SDE_QMIN = 1 / 5
SDE_GAMMA = 9 / 10
ITO_SQUARE_RMS = math.sqrt(2.0)  # RMS of dW^2 - |dt| in units of |dt|


def _rms_over_noise(x: Tensor) -> Tensor:
    """Root-mean-square over the last (noise) axis of a general-noise diffusion."""
    return torch.sqrt(torch.mean(x * x, dim=-1))


class EM(AbstractSolver):
    """Euler–Maruyama: ``y1 = y + f(t, y) dt + g(t, y) dW``."""

    strong_order = 0.5
    weak_order = 1.0
    noise_types = ALL_NOISE
    interpretations = frozenset({"ito"})

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        assert terms.diffusion is not None and dw is not None
        drift = terms.drift(t, y)
        noise = terms.g_dw(terms.diffusion(t, y), dw)
        return StepOutput(y + drift * expand_to(dt, y) + noise, None, nf=1, ng=1)


class EulerHeun(AbstractSolver):
    """Stratonovich Euler–Heun: an Euler predictor, then the trapezoidal average of
    drift and diffusion at both ends."""

    strong_order = 0.5
    weak_order = 1.0
    noise_types = ALL_NOISE
    interpretations = frozenset({"stratonovich"})

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        assert dw is not None
        y1, _, _ = _euler_heun_update(terms, t, y, dt, dw)
        return StepOutput(y1, None, nf=2, ng=2)


def _euler_heun_update(terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Euler–Heun step; returns ``(y1, drift(t, y), diffusion(t, y))``."""
    assert terms.diffusion is not None
    dt_b = expand_to(dt, y)
    t1 = t + dt
    drift0, diff0 = terms.drift(t, y), terms.diffusion(t, y)
    predictor = y + drift0 * dt_b + terms.g_dw(diff0, dw)
    drift1, diff1 = terms.drift(t1, predictor), terms.diffusion(t1, predictor)
    # halving dt and dW rather than the sums: the same products bit for bit (a power of two),
    # two fewer operations on the autograd graph
    y1 = y + (drift0 + drift1) * (0.5 * dt_b) + terms.g_dw(diff0 + diff1, 0.5 * dw)
    return y1, drift0, diff0


def _lamba_noise_error(
    terms: Terms, t: Tensor, base: Tensor, y: Tensor, dt: Tensor, diff0: Tensor, dw: Tensor, ito: bool
) -> Tensor:
    """Lamba's diffusion error ``(g(base + sqrt(dt) g) - g) / (2 sqrt(dt)) * S``.

    ``S``: Itô, ``sqrt(2) |dt|``, the RMS of ``dW^2 - dt`` (not its realized value: see the
    module docstring); Stratonovich, the realized ``dW^2``.
    """
    assert terms.diffusion is not None
    dt_b = expand_to(dt.abs(), y)  # noise scale: |dt| when time runs backwards
    sqrt_dt = torch.sqrt(dt_b)
    if terms.noise == "general":
        g_size = _rms_over_noise(diff0)
        g_size_shifted = _rms_over_noise(terms.diffusion(t, base + sqrt_dt * g_size))
        dw_term = ITO_SQUARE_RMS * dt_b if ito else expand_to(torch.sqrt(torch.mean((dw * dw) ** 2, dim=-1)), y)
        return (g_size_shifted - g_size) / (2 * sqrt_dt) * dw_term
    g_shifted = terms.diffusion(t, base + sqrt_dt * diff0)
    if ito:
        squares = ITO_SQUARE_RMS * dt_b
    else:
        dw_state = terms.noise_like_state(dw, y)
        squares = dw_state * dw_state
    return (g_shifted - diff0) / (2 * sqrt_dt) * squares


class LambaEM(AbstractSolver):
    """Adaptive Euler–Maruyama with Lamba's error estimate (StochasticDiffEq's ``LambaEM``)."""

    strong_order = 0.5
    weak_order = 1.0
    noise_types = ALL_NOISE
    interpretations = frozenset({"ito"})
    adaptive = True
    controller_order = 0.5  # StochasticDiffEq's alg_order(LambaEM)
    qmax, qmin, gamma = SDE_QMAX, SDE_QMIN, SDE_GAMMA

    def __init__(self, delta: float = 1 / 6):
        self.delta = float(delta)

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        assert terms.diffusion is not None and dw is not None
        dt_b = expand_to(dt, y)
        drift0 = terms.drift(t, y)
        euler = y + drift0 * dt_b
        diff0 = terms.diffusion(t, y)
        y1 = euler + terms.g_dw(diff0, dw)

        drift_error = dt_b * (terms.drift(t + dt, euler) - drift0) / 2
        noise_error = _lamba_noise_error(terms, t, euler, y, dt, diff0, dw, ito=True)
        return StepOutput(y1, self.delta * drift_error + noise_error, nf=2, ng=2)

    def __repr__(self) -> str:
        return f"LambaEM(delta={self.delta:.4g})"


class LambaEulerHeun(AbstractSolver):
    """Adaptive Stratonovich Euler–Heun with Lamba's error estimate
    (StochasticDiffEq's ``LambaEulerHeun``)."""

    strong_order = 0.5
    weak_order = 1.0
    noise_types = ALL_NOISE
    interpretations = frozenset({"stratonovich"})
    adaptive = True
    controller_order = 0.5
    qmax, qmin, gamma = SDE_QMAX, SDE_QMIN, SDE_GAMMA

    def __init__(self, delta: float = 1 / 6):
        self.delta = float(delta)

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        assert dw is not None
        y1, drift0, diff0 = _euler_heun_update(terms, t, y, dt, dw)
        euler = y + drift0 * expand_to(dt, y)
        drift_error = expand_to(dt, y) * (terms.drift(t + dt, euler) - drift0) / 2
        noise_error = _lamba_noise_error(terms, t, y, y, dt, diff0, dw, ito=False)
        return StepOutput(y1, self.delta * drift_error + noise_error, nf=3, ng=3)

    def __repr__(self) -> str:
        return f"LambaEulerHeun(delta={self.delta:.4g})"
