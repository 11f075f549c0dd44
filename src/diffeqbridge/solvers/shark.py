"""ShARK: the shifted additive-noise Runge–Kutta method (strong order 1.5, two drift stages).

For additive noise ``dy = f(t, y) dt + g(t) dW`` (Itô = Stratonovich) with the engine's
increment ``ΔW`` and space-time Lévy area ``H`` over ``[t, t + h]``::

    z1 = y + g0·H                                   f1 = f(t, z1)
    z2 = y + 5/6 h f1 + g0·(5/6 ΔW + H)             f2 = f(t + 5/6 h, z2)
    y1 = y + h (2/5 f1 + 3/5 f2) + g0·(ΔW/2 + H) + g1·(ΔW/2 − H)

with ``g0 = g(t)``, ``g1 = g(t + h)``.  The noise term is ``∫ g dW`` to the order needed
for a time-dependent ``g``: ``g0 ΔW + (g1 − g0)/h · ∫_t^{t+h} (s − t) dW_s`` with
``∫ (s − t) dW_s = h ΔW − ∫ (W_s − W_t) ds = h (ΔW/2 − H)``; for constant ``g`` it is
``g ΔW``, the method of the reference.  Error estimate: ``y1`` minus the embedded Euler
solution built from the first stage, ``3/5 h (f2 − f1)`` (``O(h^2)`` for additive noise).
Stiffness estimate (for :class:`~diffeqbridge.AutoSwitch`): Hairer's
``‖f2 − f1‖ / ‖z2 − z1‖`` from the two drift stages.  Drift stability: ``R(z) = 1 + z + z²/2``
(``b1 + b2 = 1``, ``b2 c2 = 1/2``), so the interval on the negative real axis is ``[-2, 0]``.

Source (coefficients only; the implementation is our own): J. Foster, G. dos Reis,
C. Strange, "High order splitting methods for SDEs satisfying a commutativity condition",
arXiv:2210.17543 (2023), eq. (6.1) (the tableau diffrax ships as ``ShARK``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import (
    BOTH_INTERPRETATIONS,
    EMBEDDED_QMAX,
    AbstractSolver,
    Startup,
    StepOutput,
    carried_diffusion_init,
    fused_sum,
    hairer_eigen_estimate,
    levy_inputs,
    noise_terms,
    stage_time,
)

C2 = 5 / 6  # second stage node (and weight of ΔW in it)
B1, B2 = 2 / 5, 3 / 5  # drift weights; the embedded solution uses (1, 0)


def shark_step(
    terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, g0: Tensor | None = None
) -> StepOutput:
    """One ShARK step for every sample.

    Args:
        terms: the problem's vector fields (additive noise: ``diffusion`` does not depend on
            the state; it is evaluated at ``y``).
        t: ``(B,)`` times.  y: ``(B, *state_shape)`` states.  dt: ``(B,)`` signed step sizes.
        dw / levy_h: ``(B, *noise_shape)`` increment and space-time Lévy area (``Var h/12``).
        g0: ``diffusion(t, ·)`` when already known (carried from the previous step's ``g1``);
            None: evaluated here.

    Returns:
        :class:`StepOutput` with ``y1`` and ``error`` of shape ``(B, *state_shape)``, the
        ``(B,)`` stiffness estimate and ``state = (g1,)``, ``g1 = diffusion(t + dt, ·)``.
    """
    diffusion, dw, levy_h = levy_inputs(terms, dw, levy_h, "ShARK needs")
    dt_y = expand_to(dt, y)
    ng = 1 if g0 is not None else 2
    if g0 is None:
        g0 = diffusion(t, y)
    g1 = diffusion(stage_time(t, dt, 1.0), y)
    z1 = fused_sum(y, noise_terms(terms, [(1.0, g0)], levy_h, y))
    assert z1 is not None
    f1 = terms.drift(t, z1)
    z2 = fused_sum(y, [(C2, dt_y, f1)] + noise_terms(terms, [(1.0, g0)], torch.add(levy_h, dw, alpha=C2), y))
    assert z2 is not None
    f2 = terms.drift(stage_time(t, dt, C2), z2)
    half_dw = 0.5 * dw
    y1 = fused_sum(
        y,
        [(B1, dt_y, f1), (B2, dt_y, f2)]
        + noise_terms(terms, [(1.0, g0)], half_dw + levy_h, y)
        + noise_terms(terms, [(1.0, g1)], half_dw - levy_h, y),
    )
    assert y1 is not None
    df = f2 - f1
    error = (B2 * dt_y) * df
    return StepOutput(y1=y1, error=error, nf=2, ng=ng, stiffness=hairer_eigen_estimate(df, z2 - z1), state=(g1,))


class ShARK(AbstractSolver):
    """ShARK (Foster, dos Reis, Strange 2023): adaptive, strong order 1.5 / weak order 2 for
    additive noise (Itô or Stratonovich), with an embedded error estimate; uses the
    space-time Lévy area.  2 drift + 1 diffusion evaluations per step: ``g(t + h)`` of an
    accepted step is the next step's ``g(t)`` (the diffusion does not depend on the state),
    carried in the solver's state (``carries_state``) and started from ``solve``'s start-up
    ``g(t0)``, where the engine guarantees that each step starts at the previous one's
    ``t + h`` bit for bit (:class:`~diffeqbridge.solvers.base.Startup`; inside ``alg=None``'s
    ``AutoSwitch`` too, :class:`~diffeqbridge.solvers.composite.SwitchState`); otherwise (a
    float32 state, adaptive steps landing on intermediate save times or ``tstops``, events)
    2 drift + 2 diffusion evaluations."""

    strong_order: ClassVar[float] = 1.5
    weak_order: ClassVar[float] = 2.0
    noise_types: ClassVar[frozenset[str]] = frozenset({"additive"})
    interpretations: ClassVar[frozenset[str]] = BOTH_INTERPRETATIONS
    adaptive: ClassVar[bool] = True
    needs_levy_area: ClassVar[bool] = True
    is_sde: ClassVar[bool] = True
    controller_order: ClassVar[float] = 2.0  # the estimate is O(h^2) for additive noise
    qmax: ClassVar[float | None] = EMBEDDED_QMAX
    qmin: ClassVar[float | None] = 1 / 5
    gamma: ClassVar[float | None] = 9 / 10
    # drift stability R(z) = 1 + z + z²/2: |R(-x)| <= 1 for x <= 2 (real_stability_interval gives 2.0)
    stability_size: ClassVar[float | None] = 2.0
    carries_state: ClassVar[bool] = True  # (g(t),) where the engine's times allow it, else None
    carries_diffusion: ClassVar[bool] = True

    def init(self, terms: Terms, t: Tensor, y0: Tensor, startup: Startup | None = None) -> tuple[Tensor] | None:
        """See :func:`carried_diffusion_init`."""
        return carried_diffusion_init(terms, startup)

    def step(
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None,
        levy_h: Tensor | None,
        f0: Tensor | None = None,
        state: tuple[Tensor] | None = None,
    ) -> StepOutput:
        """See :meth:`AbstractSolver.step`; ``state``: ``(g(t),)`` or None (stateless)."""
        out = shark_step(terms, t, y, dt, dw, levy_h, None if state is None else state[0])
        if state is None:
            out.state = None
        return out


__all__ = ["ShARK", "shark_step"]
