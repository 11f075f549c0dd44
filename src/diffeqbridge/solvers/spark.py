"""SPaRK: the splitting path Runge–Kutta method (three stages, Lévy area, embedded estimate).

For a Stratonovich SDE ``dy = f(t, y) dt + g(t, y) ∘ dW`` with the engine's increment ``ΔW``
and space-time Lévy area ``H`` over ``[t, t + h]`` (``Var H = h/12``)::

    z1 = y                                              f1, g1 at (t,       z1)
    z2 = y + h/2 f1 + g1·(ΔW/2 + √3 H)                  f2, g2 at (t + h/2, z2)
    z3 = y + h f2 + g2·ΔW                               f3, g3 at (t + h,   z3)
    y1 = y + h (x1 f1 + x2 f2 + x1 f3) + (x1 g1 + x2 g2 + x1 g3)·ΔW + (g1 − g3)·H

with ``x1 = (3 − √3)/6``, ``x2 = √3/3`` (``g·x`` is ``terms.g_dw``: elementwise for
diagonal/scalar noise, a matrix–vector product for general noise).  Strong order 1.5 for
additive noise, 1.0 for commutative noise (scalar, diagonal, commuting general), 0.5 for
general noise.  The embedded solution is the stochastic Heun step from the same stages,
``y + h (f1 + f3)/2 + (g1 + g3)/2·ΔW``, so the error estimate is
``h ((x1 − ½) f1 + x2 f2 + (x1 − ½) f3) + ((x1 − ½) g1 + x2 g2 + (x1 − ½) g3)·ΔW + (g1 − g3)·H``.

Itô problems are solved as the equivalent Stratonovich SDE, whose drift adds
``c = −½ Σ_j (∂g_j/∂y) g_j`` (``g_j`` the ``j``-th noise column).  ``c`` is evaluated once per
step at ``(t, y)`` and added to every drift stage (an Euler-accurate drift correction keeps
strong order 1 for commutative noise; it cancels in the error estimate).  The directional
derivatives are forward differences ``(g(y + ε v) − g(y))/ε`` along ``v = g_j`` with
``ε ‖v‖_∞ = √eps (1 + ‖y‖_∞)`` per sample: one more diffusion evaluation per step for
diagonal/scalar noise (diagonal noise: ``g_i`` depends on ``y_i`` only, as for ``RKMil``),
``m`` for general noise with ``m`` Brownian components; none for additive noise.

Source (coefficients only; the implementation is our own): J. Foster, "On the convergence
of adaptive approximations for stochastic differential equations", arXiv preprint (2023),
Definition 1.6 (the tableau diffrax ships as ``SPaRK``, per its documentation); J. Foster, G. dos Reis,
C. Strange, "High order splitting methods for SDEs satisfying a commutativity condition",
SIAM J. Numer. Anal. (2024), arXiv:2210.17543 (the splitting-path construction).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import (
    ALL_NOISE,
    BOTH_INTERPRETATIONS,
    EMBEDDED_QMAX,
    SDE_FIRST_STEP_FACTOR,
    UNIT_STEP_POWER,
    AbstractSolver,
    StepOutput,
    check_unit_step_power,
    fused_sum,
    levy_inputs,
    noise_terms,
    stage_time,
    weighted_per_unit_step,
)

X1 = (3 - math.sqrt(3)) / 6  # weights of stages 1 and 3 (drift and ΔW)
X2 = math.sqrt(3) / 3  # weight of stage 2
SQRT3 = math.sqrt(3)


def directional_derivative(diffusion, t: Tensor, y: Tensor, g_y: Tensor, v: Tensor) -> Tensor:
    """Forward difference of ``g`` along ``v``: ``(g(t, y + ε v) − g(t, y)) / ε ≈ (∂g/∂y) v``.

    Args:
        diffusion: ``(t, y) -> g``.  t: ``(B,)``.  y, v: ``(B, *state_shape)``.
        g_y: ``diffusion(t, y)`` (any shape ``(B, ...)``).

    Returns:
        ``(B, ...)`` like ``g_y``; 0 where ``v = 0``.
    """
    eps = math.sqrt(torch.finfo(y.dtype).eps)
    v_norm = v.detach().abs().flatten(1).amax(dim=1)
    y_norm = y.detach().abs().flatten(1).amax(dim=1)
    scale = eps * (1 + y_norm) / v_norm.clamp_min(torch.finfo(y.dtype).tiny)  # (B,) ε
    scale = torch.where(v_norm > 0, scale, torch.zeros_like(scale))
    shifted = diffusion(t, y + expand_to(scale, y) * v)
    inv = torch.where(scale > 0, 1 / scale.clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(scale))
    return (shifted - g_y) * expand_to(inv, g_y)


def ito_correction(terms: Terms, t: Tensor, y: Tensor, g_y: Tensor) -> tuple[Tensor, int]:
    """The Itô → Stratonovich drift correction ``−½ Σ_j (∂g_j/∂y) g_j`` at ``(t, y)``
    (``(B, *state_shape)``) and the diffusion evaluations it cost."""
    assert terms.diffusion is not None
    if terms.noise == "general":  # g_y: (B, *state_shape, m)
        m = g_y.shape[-1]
        total = torch.zeros_like(y)
        for j in range(m):  # one directional derivative per noise column (m is small)
            total = total + directional_derivative(terms.diffusion, t, y, g_y, g_y[..., j])[..., j]
        return -0.5 * total, m
    return -0.5 * directional_derivative(terms.diffusion, t, y, g_y, g_y), 1


def spark_step(terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None) -> StepOutput:
    """One SPaRK step for every sample.

    Args:
        terms: the problem's vector fields (``terms.interpretation`` ``"ito"`` adds the
            correction drift, except for additive noise).
        t: ``(B,)`` times.  y: ``(B, *state_shape)`` states.  dt: ``(B,)`` signed step sizes.
        dw / levy_h: ``(B, *noise_shape)`` increment and space-time Lévy area (``Var |h|/12``).

    Returns:
        :class:`StepOutput` with ``y1`` and ``error`` of shape ``(B, *state_shape)``.
    """
    diffusion, dw, levy_h = levy_inputs(terms, dw, levy_h, "SPaRK needs")
    drift = terms.drift
    dt_y = expand_to(dt, y)
    t2, t3 = stage_time(t, dt, 0.5), stage_time(t, dt, 1.0)

    g1 = diffusion(t, y)
    correction, ng_extra = None, 0
    if terms.interpretation == "ito" and terms.noise != "additive":
        correction, ng_extra = ito_correction(terms, t, y, g1)

    def f(tt: Tensor, z: Tensor) -> Tensor:
        out = drift(tt, z)
        return out if correction is None else out + correction

    f1 = f(t, y)
    z2 = fused_sum(y, [(0.5, dt_y, f1)] + noise_terms(terms, [(1.0, g1)], torch.add(0.5 * dw, levy_h, alpha=SQRT3), y))
    assert z2 is not None
    f2, g2 = f(t2, z2), diffusion(t2, z2)
    z3 = fused_sum(y, [(1.0, dt_y, f2)] + noise_terms(terms, [(1.0, g2)], dw, y))
    assert z3 is not None
    f3, g3 = f(t3, z3), diffusion(t3, z3)

    # the Lévy-area term (g1 − g3)·H is shared by the step and its error estimate
    g_h = fused_sum(None, noise_terms(terms, [(1.0, g1), (-1.0, g3)], levy_h, y))
    assert g_h is not None
    y1 = fused_sum(
        g_h + y,
        [(X1, dt_y, f1), (X2, dt_y, f2), (X1, dt_y, f3)] + noise_terms(terms, [(X1, g1), (X2, g2), (X1, g3)], dw, y),
    )
    error = fused_sum(
        g_h,
        [(X1 - 0.5, dt_y, f1), (X2, dt_y, f2), (X1 - 0.5, dt_y, f3)]
        + noise_terms(terms, [(X1 - 0.5, g1), (X2, g2), (X1 - 0.5, g3)], dw, y),
    )
    assert y1 is not None and error is not None
    return StepOutput(y1=y1, error=error, nf=3, ng=3 + ng_extra)


class SPaRK(AbstractSolver):
    """SPaRK (Foster 2023): adaptive splitting path Runge–Kutta method with an embedded error
    estimate, for every noise type, Stratonovich (Itô through the drift correction).  Strong
    order 1.5 additive / 1.0 commutative (diagonal, scalar) / 0.5 general noise; 3 drift + 3
    diffusion evaluations per step (+1 for Itô diagonal/scalar noise, +m for Itô general
    noise); uses the space-time Lévy area."""

    strong_order: ClassVar[float] = 1.0
    weak_order: ClassVar[float] = 1.0
    noise_types: ClassVar[frozenset[str]] = ALL_NOISE
    interpretations: ClassVar[frozenset[str]] = BOTH_INTERPRETATIONS
    adaptive: ClassVar[bool] = True
    needs_levy_area: ClassVar[bool] = True
    is_sde: ClassVar[bool] = True
    controller_order: ClassVar[float] = 1.5  # local error (and its estimate) O(h^1.5) for commutative noise
    qmax: ClassVar[float | None] = EMBEDDED_QMAX
    qmin: ClassVar[float | None] = 1 / 5
    gamma: ClassVar[float | None] = 9 / 10
    first_step_factor: float = SDE_FIRST_STEP_FACTOR

    def __init__(self, unit_step_power: float | None = None):
        """``unit_step_power``: ``θ`` of the per-unit-step weighting of the error estimate
        (:func:`~diffeqbridge.solvers.base.per_unit_step`; default ``UNIT_STEP_POWER``, as the
        SRI methods'; never applied for additive noise)."""
        self.unit_step_power = check_unit_step_power(unit_step_power, UNIT_STEP_POWER)

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        """See :meth:`AbstractSolver.step`."""
        return weighted_per_unit_step(spark_step(terms, t, y, dt, dw, levy_h), self.unit_step_power, terms, dt)

    def __repr__(self) -> str:
        return "SPaRK()" if self.unit_step_power == UNIT_STEP_POWER else f"SPaRK(unit_step_power={self.unit_step_power!r})"


__all__ = ["SPaRK", "spark_step", "ito_correction", "directional_derivative"]
