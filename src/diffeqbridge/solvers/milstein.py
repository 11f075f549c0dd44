"""Derivative-free Milstein (Runge–Kutta Milstein, Kloeden & Platen 1992, §11.1).

For diagonal or scalar noise, with ``y~ = y + f dt + g sqrt(dt)``::

    y1 = y + f dt + g dW + (g(y~) - g(y)) / (2 sqrt(dt)) * (dW^2 - dt)    (Itô)
    y1 = y + f dt + g dW + (g(y~) - g(y)) / (2 sqrt(dt)) * dW^2           (Stratonovich)

Strong order 1.0, weak order 1.0, fixed step.  The interpretation is the problem's.
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

    def step(self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None) -> StepOutput:
        assert terms.diffusion is not None and dw is not None
        dt_b = expand_to(dt, y)
        sqrt_dt = torch.sqrt(dt_b)
        drift = terms.drift(t, y)
        diff = terms.diffusion(t, y)
        euler = y + drift * dt_b
        diff_shifted = terms.diffusion(t, euler + diff * sqrt_dt)
        dw_state = terms.noise_like_state(dw, y)
        iterated = dw_state * dw_state
        if terms.interpretation == "ito":
            iterated = iterated - dt_b
        correction = (diff_shifted - diff) / (2 * sqrt_dt) * iterated
        return StepOutput(euler + diff * dw_state + correction, None, nf=1, ng=2)
