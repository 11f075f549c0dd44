"""Rößler's SRA methods: adaptive strong order 1.5 for SDEs with additive noise.

One generic step (:func:`sra_step`) runs any explicit SRA tableau (:class:`SRATableau`);
:class:`SRA1`, :class:`SRA3`, :class:`SRA4`, :class:`SRA5` and :class:`SOSRA` only carry a tableau and their metadata.

For additive noise (``diffusion`` independent of the state) the Itô and Stratonovich
interpretations coincide, so these methods accept both.  The scheme (Rößler 2010)::

    H0_i = y + dt Σ_j A0[i][j] f_j + Σ_j B0[i][j] g_j · χ2
    f_i  = drift(t + c0_i dt, H0_i),   g_i = diffusion(t + c1_i dt, H0_i)
    y1   = y + dt Σ α_i f_i + Σ β1_i g_i · ΔW + E2,     E2 = Σ β2_i g_i · χ2

where ``g · x`` is ``terms.g_dw(g, x)`` (elementwise for diagonal-shaped noise) and
``χ2 = I_(1,0)/dt = ΔW/2 + H``.  StochasticDiffEq.jl draws ``ΔZ ~ N(0, dt)`` independent
of ``ΔW`` with ``I_(1,0) = dt/2 (ΔW + ΔZ/√3)``; with the engine's space-time Lévy area
``H`` (``∫_t^{t+dt}(W_u − W_t) du = dt (H + ΔW/2)``, ``Var H = dt/12``) this is
``ΔZ = 2√3 H``.  The diffusion is evaluated at the drift stage states, as in
StochasticDiffEq.jl (irrelevant for truly additive noise).

Error estimate (StochasticDiffEq.jl ``src/perform_step/sra.jl`` combined by DiffEqBase's
``calculate_residuals(E₁, E₂, ...)``)::

    E1 = dt Σ_i f_i,      error = δ · E1 + E2      (signed), δ = 1 by default.

Sources (coefficients only; the implementation is our own):

* A. Rößler, "Runge–Kutta methods for the strong approximation of solutions of stochastic
  differential equations", SIAM J. Numer. Anal. 48(3) (2010) 922–952 (SRA1).
* C. Rackauckas, Q. Nie, "Adaptive methods for stochastic differential equations via
  natural embeddings and rejection sampling with memory", DCDS-B 22(7) (2017) 2731–2761.
* C. Rackauckas, Q. Nie, "Stability-optimized high order methods and stiffness detection
  for pathwise stiff stochastic differential equations" (SOSRA).
* SRA4 and SRA5 are our own tableaus (Kutta's 3/8 rule and Butcher's six-stage fifth-order
  method as the drift parts, stage shifts solved from Rößler's conditions above; see the
  comments at :data:`SRA4_TABLEAU` and :data:`SRA5_TABLEAU`).
* SciML/StochasticDiffEq.jl: ``src/tableaus.jl`` (``constructSRA1``),
  ``src/perform_step/sra.jl`` (``SRA1ConstantCache``, ``ThreeStageSRAConstantCache``),
  ``src/caches/sra_caches.jl`` (``SOSRAConstantCache``), ``src/alg_utils.jl``
  (``alg_order(SRA1) = alg_order(SOSRA) = 2//1``, ``delta_default = 1``, ``qmax = 9//8``,
  ``qmin = 1//5``, ``gamma = 9//10``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import (
    BOTH_INTERPRETATIONS,
    Startup,
    StepOutput,
    StochasticRungeKutta,
    carried_diffusion_init,
    drift_error_terms,
    fused_sum,
    levy_inputs,
    noise_terms,
    stage_time,
)

Matrix = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class SRATableau:
    """An explicit SRA tableau with ``s`` stages (``M[i][j]``: weight of stage ``j`` in
    stage ``i``, strictly lower triangular).

    Attributes:
        c0 / c1: drift / diffusion stage times (fractions of ``dt``).
        a0 / b0: weights of ``dt·f_j`` / ``g_j·χ2`` in the stages ``H0_i``.
        alpha: drift weights; beta1 / beta2: weights of ``g_i·ΔW`` / ``g_i·χ2``.
    """

    c0: tuple[float, ...]
    c1: tuple[float, ...]
    a0: Matrix
    b0: Matrix
    alpha: tuple[float, ...]
    beta1: tuple[float, ...]
    beta2: tuple[float, ...]

    def __post_init__(self) -> None:
        s = self.stages
        for name in ("c1", "alpha", "beta1", "beta2"):
            if len(getattr(self, name)) != s:
                raise ValueError(f"{name} must have {s} entries")
        for name in ("a0", "b0"):
            m = getattr(self, name)
            if len(m) != s or any(len(row) != s for row in m):
                raise ValueError(f"{name} must be {s}x{s}")
            if any(v != 0.0 for i, row in enumerate(m) for v in row[i:]):
                raise ValueError(f"{name} must be strictly lower triangular (explicit scheme)")

    @property
    def stages(self) -> int:
        return len(self.c0)

    def diffusion_used(self, j: int) -> bool:
        return any(v != 0.0 for v in (self.beta1[j], self.beta2[j], *(row[j] for row in self.b0)))

    @property
    def carried_stages(self) -> tuple[int, int] | None:
        """``(start, end)``: the first used diffusion stages at ``c1 = 0`` (``g(t)``) and at
        ``c1 = 1`` (``g(t + dt)``), whose values for additive noise a step can take from /
        hand to the next step; None when the tableau lacks one of them."""
        used = [j for j in range(self.stages) if self.diffusion_used(j)]
        start = next((j for j in used if self.c1[j] == 0.0), None)
        end = next((j for j in used if self.c1[j] == 1.0), None)
        return None if start is None or end is None else (start, end)


def sra_step(
    tab: SRATableau,
    terms: Terms,
    t: Tensor,
    y: Tensor,
    dt: Tensor,
    dw: Tensor,
    levy_h: Tensor,
    delta: float | None,
    g_start: Tensor | None = None,
) -> StepOutput:
    """One SRA step for every sample.

    Args:
        tab: the tableau.
        terms: the problem's vector fields.  The diffusion is applied to noise with
            ``terms.g_dw``, so any noise layout works (diagonal-shaped additive noise,
            and also scalar ``(B, 1)`` or general ``(B, m)`` noise when the diffusion is
            state-independent).
        t: ``(B,)`` times.  y: ``(B, *state_shape)`` states.  dt: ``(B,)`` step sizes.
        dw: ``(B, *noise_shape)`` Brownian increments.
        levy_h: ``(B, *noise_shape)`` space-time Lévy area, ``Var = dt/12``.
        delta: weight of ``E1`` in StochasticDiffEq's ``error = delta*E1 + E2``; None for the
            embedded estimate ``dt (Σ α_i f_i − f_1) + E2``.
        g_start: ``diffusion(t, ·)`` carried from the previous step (additive noise; used for
            every stage at ``c1 = 0``, :attr:`SRATableau.carried_stages`), None: evaluated.

    Returns:
        :class:`StepOutput` with ``y1`` and ``error`` of shape ``(B, *state_shape)``; with
        ``g_start``, ``state = (g(t + dt),)`` for the next step.
    """
    diffusion, dw, levy_h = levy_inputs(terms, dw, levy_h, "SRA methods need")
    drift = terms.drift

    dt_y = expand_to(dt, y)
    chi2 = torch.add(levy_h, dw, alpha=0.5)  # I_(1,0)/dt, noise-shaped

    s = tab.stages
    fs: list[Tensor | None] = [None] * s
    gs: list[Tensor | None] = [None] * s
    ng = 0
    for i in range(s):
        fa = [(a, dt_y, fs[j]) for j, a in enumerate(tab.a0[i][:i])]
        h0 = fused_sum(y, fa + noise_terms(terms, zip(tab.b0[i][:i], gs[:i]), chi2, y))
        assert h0 is not None
        fs[i] = drift(stage_time(t, dt, tab.c0[i]), h0)
        if tab.diffusion_used(i):
            if g_start is not None and tab.c1[i] == 0.0:
                gs[i] = g_start
            else:
                gs[i] = diffusion(stage_time(t, dt, tab.c1[i]), h0)
                ng += 1

    e2 = fused_sum(None, noise_terms(terms, zip(tab.beta2, gs), chi2, y))
    if e2 is None:
        e2 = y.new_zeros(y.shape)
    y1 = fused_sum(y, [(a, dt_y, f) for a, f in zip(tab.alpha, fs)] + noise_terms(terms, zip(tab.beta1, gs), dw, y))
    assert y1 is not None
    y1 = y1 + e2
    error = fused_sum(e2, [(w, dt_y, f) for w, f in zip(drift_error_terms(tab.alpha, s, delta), fs)])
    assert error is not None
    carried = tab.carried_stages
    state = None if g_start is None or carried is None else (gs[carried[1]],)
    return StepOutput(y1=y1, error=error, nf=s, ng=ng, state=state)


class _SRABase(StochasticRungeKutta):
    """Shared metadata of the SRA family (StochasticDiffEq.jl ``src/alg_utils.jl``)."""

    tableau: ClassVar[SRATableau]
    default_delta: ClassVar[float] = 1.0

    strong_order: ClassVar[float] = 1.5
    weak_order: ClassVar[float] = 2.0
    noise_types: ClassVar[frozenset[str]] = frozenset({"additive"})
    interpretations: ClassVar[frozenset[str]] = BOTH_INTERPRETATIONS
    is_sde: ClassVar[bool] = True
    controller_order: ClassVar[float] = 2.0  # alg_order(SRA1) = alg_order(SOSRA) = 2//1
    embedded_controller_order: ClassVar[float] = 2.0  # additive noise: the estimate is O(dt^2)
    default_unit_step_power: ClassVar[float] = 0.0  # the error sits far below tol already (base.UNIT_STEP_POWER)
    embedded_first_step_factor: ClassVar[float] = 1.0  # StochasticDiffEq's first step (base.SDE_FIRST_STEP_FACTOR)
    step_function = staticmethod(sra_step)
    # (g(t),) where the engine's times allow it (carried_diffusion_init), else None
    carries_state: ClassVar[bool] = True
    carries_diffusion: ClassVar[bool] = True

    def init(self, terms: Terms, t: Tensor, y0: Tensor, startup: Startup | None = None) -> tuple[Tensor] | None:
        """``(g(t0),)`` when the tableau evaluates the diffusion at both ends of the step
        (:attr:`SRATableau.carried_stages`) and :func:`carried_diffusion_init` allows it."""
        return carried_diffusion_init(terms, startup) if self.tableau.carried_stages is not None else None


# SRA1 (Rößler 2010): StochasticDiffEq.jl src/tableaus.jl, constructSRA1.
SRA1_TABLEAU = SRATableau(
    c0=(0.0, 3 / 4),
    c1=(1.0, 0.0),
    a0=((0.0, 0.0), (3 / 4, 0.0)),
    b0=((0.0, 0.0), (3 / 2, 0.0)),
    alpha=(1 / 3, 2 / 3),
    beta1=(1.0, 0.0),
    beta2=(-1.0, 1.0),
)

# SOSRA (Rackauckas & Nie): StochasticDiffEq.jl src/caches/sra_caches.jl, SOSRAConstantCache
# (aij -> a0[i-1][j-1], bij -> b0[i-1][j-1], c0i, c1i, beta1i, beta2i).
SOSRA_TABLEAU = SRATableau(
    c0=(0.0, 0.6923962376159507, 1.0),
    c1=(0.0, 0.041248171110700504, 1.0),
    a0=(
        (0.0, 0.0, 0.0),
        (0.6923962376159507, 0.0, 0.0),
        (-3.1609142252828395, 4.1609142252828395, 0.0),
    ),
    b0=(
        (0.0, 0.0, 0.0),
        (1.3371632704399763, 0.0, 0.0),
        (1.442371048468624, 1.8632741501139225, 0.0),
    ),
    alpha=(0.2889874966892885, 0.6859880440839937, 0.025024459226717772),
    beta1=(-16.792534242221663, 17.514995785380226, 0.27753845684143835),
    beta2=(0.4237535769069274, 0.6010381474428539, -1.0247917243497813),
)


# SRA3 (Rößler 2010; StochasticDiffEq.jl src/tableaus.jl, constructSRA3): the drift
# part is Kutta's third-order method (c0 = 0, 1, 1/2; weights 1/6, 1/6, 2/3), so the
# deterministic order is 3 (weak order 3 for additive noise); the third stage's diffusion
# is never used, so 3 drift + 2 diffusion evaluations per step (3 + 1 with g(t + dt) carried).
SRA3_TABLEAU = SRATableau(
    c0=(0.0, 1.0, 1 / 2),
    c1=(1.0, 0.0, 0.0),
    a0=((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1 / 4, 1 / 4, 0.0)),
    b0=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1 / 2, 0.0)),
    alpha=(1 / 6, 1 / 6, 2 / 3),
    beta1=(1.0, 0.0, 0.0),
    beta2=(-1.0, 1.0, 0.0),
)


# SRA4 (ours): an SRA whose drift part is Kutta's 3/8 rule (c0 = 0, 1/3, 2/3, 1; weights
# 1/8, 3/8, 3/8, 1/8), a fourth-order Runge-Kutta method, so the deterministic order is 4.
# The stage shifts s = B0 e (all on g(t), the first diffusion stage) satisfy Rößler's (2010)
# strong-order-1.5 conditions for additive noise, α·s = 1 and α·(s²) = 3/2, and also
# α·(c0∘s) = 1/2 and α·(A0 s) = 1/2, which match the χ2 terms of a linear, time-dependent
# drift (f_t g, f_y f_y g) to one order more: on SciML's additive problems, whose solution is a
# function of W(T), the noise part's error then falls like h^3 instead of h^2.  The three linear
# conditions leave s = (0, x, 4 − 2x, 3x − 4); α·(s²) = 3/2 gives 6x² − 18x + 13 = 0, and of
# its roots x = 3/2 ∓ √3/6 the smaller shifts are taken (the other one, x = 3/2 + √3/6,
# diverged on a cubic drift with growing noise at dt = 1/4).  The diffusion is evaluated at
# t (stage 1) and t + dt (stage 2): 4 drift + 1 diffusion evaluations per step with g(t + dt)
# carried, as SRA1/SRA3.
_SRA4_X = 3 / 2 - math.sqrt(3) / 6
SRA4_TABLEAU = SRATableau(
    c0=(0.0, 1 / 3, 2 / 3, 1.0),
    c1=(0.0, 1.0, 0.0, 0.0),
    a0=((0.0, 0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0, 0.0), (-1 / 3, 1.0, 0.0, 0.0), (1.0, -1.0, 1.0, 0.0)),
    b0=((0.0, 0.0, 0.0, 0.0), (_SRA4_X, 0.0, 0.0, 0.0), (4 - 2 * _SRA4_X, 0.0, 0.0, 0.0), (3 * _SRA4_X - 4, 0.0, 0.0, 0.0)),
    alpha=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    beta1=(0.0, 1.0, 0.0, 0.0),
    beta2=(1.0, -1.0, 0.0, 0.0),
)


# SRA5 (ours): the same construction on a six-stage fifth-order method of Butcher's (J. C.
# Butcher, "Numerical Methods for Ordinary Differential Equations", Wiley; c0 = 0, 1/4, 1/4,
# 1/2, 3/4, 1; weights 7/90, 0, 32/90, 12/90, 32/90, 7/90; its order 5 is measured in
# tests/test_sra4.py), deterministic order 5.  With
# the shifts on stages 3-5 (s6 = 0) the four conditions above leave s3 = s5 = 45/38 ± 9√5/76,
# s4 = 45/38 ∓ 12√5/19; the upper signs (s = 1.449, -0.228, 1.449) are taken, the smaller
# shifts.  6 drift + 1 diffusion evaluations per step with g(t + dt) carried.
_SRA5_S = 45 / 38 + 9 * math.sqrt(5) / 76
SRA5_TABLEAU = SRATableau(
    c0=(0.0, 1 / 4, 1 / 4, 1 / 2, 3 / 4, 1.0),
    c1=(0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    a0=(
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        (1 / 4, 0.0, 0.0, 0.0, 0.0, 0.0),
        (1 / 8, 1 / 8, 0.0, 0.0, 0.0, 0.0),
        (0.0, -1 / 2, 1.0, 0.0, 0.0, 0.0),
        (3 / 16, 0.0, 0.0, 9 / 16, 0.0, 0.0),
        (-3 / 7, 2 / 7, 12 / 7, -12 / 7, 8 / 7, 0.0),
    ),
    b0=(
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        (_SRA5_S, 0.0, 0.0, 0.0, 0.0, 0.0),
        (45 / 38 - 12 * math.sqrt(5) / 19, 0.0, 0.0, 0.0, 0.0, 0.0),
        (_SRA5_S, 0.0, 0.0, 0.0, 0.0, 0.0),
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ),
    alpha=(7 / 90, 0.0, 32 / 90, 12 / 90, 32 / 90, 7 / 90),
    beta1=(0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    beta2=(1.0, -1.0, 0.0, 0.0, 0.0, 0.0),
)


class SRA1(_SRABase):
    """Rößler's SRA1: adaptive, strong order 1.5 / weak order 2.0 for additive noise (Itô
    or Stratonovich).  2 drift + 1 diffusion evaluations per step (``g(t + dt)`` carried into
    the next step as its ``g(t)``, as :class:`~diffeqbridge.ShARK` does; 2 + 2 where the
    engine's times do not allow it)."""

    tableau: ClassVar[SRATableau] = SRA1_TABLEAU


class SOSRA(_SRABase):
    """Stability-optimized SRA (Rackauckas & Nie): adaptive, strong order 1.5 / weak order
    2.0 for additive noise (Itô or Stratonovich).  3 drift + 2 diffusion evaluations per
    step (``g(t + dt)`` carried into the next step, as :class:`SRA1`; 3 + 3 without)."""

    tableau: ClassVar[SRATableau] = SOSRA_TABLEAU


class SRA3(_SRABase):
    """Rößler's SRA3: strong order 1.5, weak order 3 for additive noise (Itô or
    Stratonovich); its drift part is Kutta's third-order method, so small-noise problems
    see a deterministic error of order 3.  3 drift + 1 diffusion evaluations per step
    (``g(t + dt)`` carried into the next step, as :class:`SRA1`; 3 + 2 without)."""

    tableau: ClassVar[SRATableau] = SRA3_TABLEAU
    weak_order: ClassVar[float] = 3.0


class SRA4(_SRABase):
    """An SRA with a fourth-order drift part (our tableau, :data:`SRA4_TABLEAU`: Kutta's 3/8
    rule with stage shifts solved from Rößler's 2010 strong-order-1.5 conditions for additive
    noise): strong order 1.5 for additive noise (Itô or Stratonovich), deterministic order 4,
    so on small-noise problems whose error is mostly the drift's truncation it needs fewer
    steps than SRA3 (order 3) or ShARK (order 2).  4 drift + 1 diffusion evaluations per step
    (``g(t + dt)`` carried into the next step, as :class:`SRA1`; 4 + 2 without); where the
    noise dominates the error (e.g. reverse-time diffusion SDEs) :class:`~diffeqbridge.ShARK`
    reaches the same error for 3 per step.  Embedded estimate: the Euler–Maruyama solution
    from the same first stage (:class:`~diffeqbridge.solvers.base.StochasticRungeKutta`).
    Weak order 2 is the SRA family's metadata (SRA1's, whose conditions up to second order
    it shares); not in the test suite (a coupled Monte Carlo check, 5·10^4 paths, dt 1/4 ...
    1/32, gave E[y(1)²] slopes 2.0 and 1.85 on two nonlinear problems, SRA1 2.0 and 3.3)."""

    tableau: ClassVar[SRATableau] = SRA4_TABLEAU


class SRA5(_SRABase):
    """:class:`SRA4`'s construction on Butcher's six-stage fifth-order method (our tableau,
    :data:`SRA5_TABLEAU`): strong order 1.5 for additive noise (Itô or Stratonovich),
    deterministic order 5.  6 drift + 1 diffusion evaluations per step (``g(t + dt)`` carried;
    6 + 2 without): for small-noise problems at tight errors, where the drift's truncation
    error decides the step; where the noise dominates, :class:`~diffeqbridge.ShARK` (3 per
    step) reaches the same error per step, and with large noise and a fast nonlinear drift
    at coarse steps SRA4 is the more robust (on ``-y³`` with ``g`` up to 2 SRA5 overflowed at
    ``dt = 1/2`` where SRA4 did not).  Weak order 2 as :class:`SRA4` (metadata)."""

    tableau: ClassVar[SRATableau] = SRA5_TABLEAU


__all__ = [
    "SRATableau",
    "sra_step",
    "SRA1",
    "SRA3",
    "SRA4",
    "SRA5",
    "SOSRA",
    "SRA1_TABLEAU",
    "SRA3_TABLEAU",
    "SRA4_TABLEAU",
    "SRA5_TABLEAU",
    "SOSRA_TABLEAU",
]
