"""Derivative-free Milstein (Runge–Kutta Milstein, Kloeden & Platen 1992, §11.1).

For diagonal or scalar noise, with ``y~ = y + f dt + g sqrt(dt)`` and
``y± = y ± g sqrt(dt)``::

    y1 = y + f dt + g dW + (g(y~) - g(y)) / (2 sqrt(dt)) * (dW^2 - dt)        (Itô)
    y1 = y + f dt + g dW + (g(y+) - g(y-)) / (4 sqrt(dt)) * dW^2               (Stratonovich)

Strong order 1.0, weak order 1.0, fixed step.  The interpretation is the problem's.

The Stratonovich correction uses a central difference (one more diffusion call): the
one-sided quotient ``(g(y + g sqrt(dt)) - g) / sqrt(dt) = g g' + g'' g^2 sqrt(dt) / 2 + ...``
multiplies ``dW^2``, whose mean ``dt`` turns the ``sqrt(dt)`` term into an
``O(dt^1.5)`` biased local error, i.e. strong order 0.5 whenever ``g`` is nonlinear in
``y`` (StochasticDiffEq's and torchsde's grad-free Stratonovich Milstein use the one-sided
form).  The central quotient is ``g g' + O(dt)`` and keeps order 1.0.  For Itô the
multiplier ``dW^2 - dt`` has mean zero and the one-sided form is order 1.0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import BOTH_INTERPRETATIONS, AbstractSolver, StepOutput


class RKMil(AbstractSolver):
    """Derivative-free Milstein for diagonal/scalar noise, Itô or Stratonovich."""

    strong_order = 1.0
    weak_order = 1.0
    noise_types = frozenset({"diagonal", "scalar", "additive"})
    interpretations = BOTH_INTERPRETATIONS

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        assert terms.diffusion is not None and dw is not None
        dt_b = expand_to(dt, y)
        abs_dt = dt_b.abs()  # noise scale: |dt| when time runs backwards
        sqrt_dt = torch.sqrt(abs_dt)
        drift = terms.drift(t, y)
        diff = terms.diffusion(t, y)
        euler = y + drift * dt_b
        dw_state = terms.noise_like_state(dw, y)
        if terms.interpretation == "ito":
            diff_shifted = terms.diffusion(t, euler + diff * sqrt_dt)
            correction = (diff_shifted - diff) / (2 * sqrt_dt) * (dw_state * dw_state - abs_dt)
            return StepOutput(euler + diff * dw_state + correction, None, nf=1, ng=2)
        diff_plus = terms.diffusion(t, y + diff * sqrt_dt)
        diff_minus = terms.diffusion(t, y - diff * sqrt_dt)
        correction = (diff_plus - diff_minus) / (4 * sqrt_dt) * (dw_state * dw_state)
        return StepOutput(euler + diff * dw_state + correction, None, nf=1, ng=3)
