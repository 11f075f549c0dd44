"""Rößler's SRI methods: adaptive strong order 1.5 for Itô SDEs with diagonal/scalar noise.

One generic step (:func:`sri_step`) runs any explicit SRI tableau (:class:`SRITableau`);
:class:`SRIW1` and :class:`SOSRI` only carry a tableau and their metadata.

The scheme (Rößler 2010, diagonal noise, written per component)::

    H0_i = y + dt Σ_j A0[i][j] f_j + I10/dt · Σ_j B0[i][j] g_j          (drift stages)
    H1_i = y + dt Σ_j A1[i][j] f_j + √dt   · Σ_j B1[i][j] g_j          (diffusion stages)
    f_i  = drift(t + c0_i dt, H0_i),   g_i = diffusion(t + c1_i dt, H1_i)
    y1   = y + dt Σ α_i f_i + Σ (β1_i ΔW + β2_i χ1) g_i + E2
    E2   = Σ (β3_i χ2 + β4_i χ3) g_i

with the iterated-integral ratios (StochasticDiffEq.jl's ``chi1``, ``chi2``, ``chi3``)::

    χ1 = I_(1,1)/√dt   = (ΔW² − dt) / (2√dt)
    χ2 = I_(1,0)/dt    = ΔW/2 + H
    χ3 = I_(1,1,1)/dt  = (ΔW³ − 3 dt ΔW) / (6 dt)

Lévy area mapping.  StochasticDiffEq.jl draws an auxiliary ``ΔZ ~ N(0, dt)`` independent
of ``ΔW`` and uses ``I_(1,0) = dt/2 · (ΔW + ΔZ/√3)``.  Here the engine supplies the
space-time Lévy area ``H`` (``Var H = dt/12``, independent of ``ΔW``) with
``I_(1,0) = ∫_t^{t+dt} (W_u − W_t) du = dt (H + ΔW/2)``.  Equating the two gives
``ΔZ = 2√3 H`` (``Var = 12 · dt/12 = dt``, as required) and hence ``χ2 = ΔW/2 + H``.
Check: ``Var I_(1,0) = dt² (dt/12 + dt/4) = dt³/3`` and ``Cov(I_(1,0), ΔW) = dt²/2``,
the Kloeden–Platen moments.

Error estimate (StochasticDiffEq.jl ``src/perform_step/sri.jl``; combined by DiffEqBase's
``calculate_residuals(E₁, E₂, u₀, u₁, α, ρ, δ, ...) = (δ E₁ + E₂) / (α + max(|u₀|,|u₁|) ρ)``)::

    E1 = dt Σ_{i < n_drift} f_i,      error = δ · E1 + E2      (signed, no absolute values)

``δ`` defaults to StochasticDiffEq's ``delta_default``: ``1/6`` for SRIW1, ``1`` otherwise.

Sources (coefficients only; the implementation is our own):

* A. Rößler, "Runge–Kutta methods for the strong approximation of solutions of stochastic
  differential equations", SIAM J. Numer. Anal. 48(3) (2010) 922–952 (SRI schemes, SRI1 =
  SRIW1).
* C. Rackauckas, Q. Nie, "Adaptive methods for stochastic differential equations via
  natural embeddings and rejection sampling with memory", DCDS-B 22(7) (2017) 2731–2761
  (the embedded error estimate ``δ E1 + E2``).
* C. Rackauckas, Q. Nie, "Stability-optimized high order methods and stiffness detection
  for pathwise stiff stochastic differential equations"
  (SOSRI).
* SciML/StochasticDiffEq.jl: ``src/perform_step/sri.jl`` (``SRIW1ConstantCache`` and
  ``FourStageSRIConstantCache`` steps), ``src/tableaus.jl`` (``constructSRIW1``),
  ``src/caches/rossler_caches.jl`` (``SOSRIConstantCache``), ``src/alg_utils.jl``
  (``alg_order = 3//2``, ``delta_default``, ``qmax_default = 9//8``, ``qmin_default = 1//5``,
  ``gamma_default = 9//10``, ``beta1 = 7//(10 q)``, ``beta2 = 2//(5 q)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import StepOutput, StochasticRungeKutta, drift_error_terms, fused_sum, hairer_eigen_estimate, levy_inputs, stage_time

Matrix = tuple[tuple[float, ...], ...]


def _check_lower(name: str, m: Matrix, s: int) -> None:
    if len(m) != s or any(len(row) != s for row in m):
        raise ValueError(f"{name} must be {s}x{s}")
    for i, row in enumerate(m):
        if any(v != 0.0 for v in row[i:]):
            raise ValueError(f"{name} must be strictly lower triangular (explicit scheme)")


@dataclass(frozen=True)
class SRITableau:
    """An explicit SRI tableau with ``s`` stages.

    Matrices are indexed ``M[i][j]`` = weight of stage ``j``'s evaluation in stage ``i``
    (strictly lower triangular).  Only the first ``n_drift`` drift stages are evaluated:
    every coefficient that multiplies ``f_j`` for ``j >= n_drift`` must be zero.  A
    diffusion stage whose ``g`` has no non-zero coefficient anywhere is not evaluated.

    Attributes:
        c0 / c1: drift / diffusion stage times (fractions of ``dt``), length ``s``.
        a0 / b0: weights of ``dt·f_j`` / ``χ2·g_j`` in the drift stages ``H0_i``.
        a1 / b1: weights of ``dt·f_j`` / ``√dt·g_j`` in the diffusion stages ``H1_i``.
        alpha: drift weights; beta1..beta4: weights of ``ΔW``, ``χ1``, ``χ2``, ``χ3``.
        n_drift: number of drift stages evaluated (and summed in ``E1``).
    """

    c0: tuple[float, ...]
    c1: tuple[float, ...]
    a0: Matrix
    a1: Matrix
    b0: Matrix
    b1: Matrix
    alpha: tuple[float, ...]
    beta1: tuple[float, ...]
    beta2: tuple[float, ...]
    beta3: tuple[float, ...]
    beta4: tuple[float, ...]
    n_drift: int

    def __post_init__(self) -> None:
        s = self.stages
        for name in ("c0", "c1", "alpha", "beta1", "beta2", "beta3", "beta4"):
            if len(getattr(self, name)) != s:
                raise ValueError(f"{name} must have {s} entries")
        for name in ("a0", "a1", "b0", "b1"):
            _check_lower(name, getattr(self, name), s)
        if not 1 <= self.n_drift <= s:
            raise ValueError("n_drift must be in [1, stages]")
        for j in range(self.n_drift, s):
            if self.alpha[j] != 0.0 or any(self.a0[i][j] != 0.0 or self.a1[i][j] != 0.0 for i in range(s)):
                raise ValueError(f"drift stage {j} is not evaluated but has a non-zero weight")

    @property
    def stages(self) -> int:
        return len(self.c0)

    @cached_property
    def plan(self) -> _SRIPlan:
        """The non-zero weights :func:`sri_step` sums (computed once per tableau)."""
        return _SRIPlan.of(self)

    @cached_property
    def diffusion_stages(self) -> tuple[bool, ...]:
        """:meth:`diffusion_used` for every stage (computed once per tableau)."""
        return tuple(self.diffusion_used(j) for j in range(self.stages))

    def diffusion_used(self, j: int) -> bool:
        """Whether diffusion stage ``j`` enters the step at all."""
        s = self.stages
        return any(
            v != 0.0
            for v in (
                self.beta1[j],
                self.beta2[j],
                self.beta3[j],
                self.beta4[j],
                *(self.b0[i][j] for i in range(s)),
                *(self.b1[i][j] for i in range(s)),
            )
        )


def _nonzero(row: tuple[float, ...]) -> tuple[tuple[int, float], ...]:
    return tuple((j, c) for j, c in enumerate(row) if c != 0.0)


@dataclass(frozen=True)
class _SRIPlan:
    """A tableau's non-zero weights as ``(stage, weight)`` pairs, with the constants of the
    iterated integrals folded in (``beta2 / 2``, ``beta4 / 6``: :func:`sri_step` forms
    ``2 χ1`` and ``6 χ3``), so the step spends one fused op per non-zero weight."""

    a0: tuple[tuple[tuple[int, float], ...], ...]
    b0: tuple[tuple[tuple[int, float], ...], ...]
    a1: tuple[tuple[tuple[int, float], ...], ...]
    b1: tuple[tuple[tuple[int, float], ...], ...]
    alpha: tuple[tuple[int, float], ...]
    beta1: tuple[tuple[int, float], ...]
    beta2_half: tuple[tuple[int, float], ...]
    beta3: tuple[tuple[int, float], ...]
    beta4_sixth: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, tab: SRITableau) -> _SRIPlan:
        return cls(
            a0=tuple(_nonzero(row) for row in tab.a0),
            b0=tuple(_nonzero(row) for row in tab.b0),
            a1=tuple(_nonzero(row) for row in tab.a1),
            b1=tuple(_nonzero(row) for row in tab.b1),
            alpha=_nonzero(tab.alpha),
            beta1=_nonzero(tab.beta1),
            beta2_half=_nonzero(tuple(b / 2 for b in tab.beta2)),
            beta3=_nonzero(tab.beta3),
            beta4_sixth=_nonzero(tuple(b / 6 for b in tab.beta4)),
        )


def sri_step(
    tab: SRITableau,
    terms: Terms,
    t: Tensor,
    y: Tensor,
    dt: Tensor,
    dw: Tensor,
    levy_h: Tensor,
    delta: float | None,
) -> StepOutput:
    """One SRI step for every sample.

    Args:
        tab: the tableau.
        terms: the problem's vector fields; ``terms.noise`` is ``"diagonal"``, ``"scalar"``
            or ``"additive"`` (diagonal-shaped).
        t: ``(B,)`` times.  y: ``(B, *state_shape)`` states.  dt: ``(B,)`` step sizes.
        dw: ``(B, *noise_shape)`` Brownian increments (``noise_shape`` is the state's
            shape, or ``(1,)`` for scalar noise).
        levy_h: ``(B, *noise_shape)`` space-time Lévy area, ``Var = dt/12``.
        delta: weight of ``E1`` in StochasticDiffEq's ``error = delta*E1 + E2``; None for the
            embedded estimate ``dt (Σ α_i f_i − f_1) + E2`` (see :class:`StochasticRungeKutta`).

    Returns:
        :class:`StepOutput` with ``y1`` and ``error`` of shape ``(B, *state_shape)``.

    Every stage and output sum is :func:`fused_sum` over the plan's non-zero weights (one
    fused multiply-add per weight).
    """
    diffusion, dw, levy_h = levy_inputs(terms, dw, levy_h, "SRI methods need")
    drift = terms.drift
    plan = tab.plan

    dt_y = expand_to(dt, y)
    dt_abs = dt.abs()  # noise scale: |dt| when time runs backwards
    dt_w = expand_to(dt_abs, dw)
    sq = torch.sqrt(dt_abs)
    sqdt_y = expand_to(sq, y)
    # Iterated-integral ratios, noise-shaped, then broadcast against the state; 2 χ1 and 6 χ3
    # (the plan's beta2 / 2 and beta4 / 6 carry the constants).
    dw2 = dw * dw
    chi1 = terms.noise_like_state((dw2 - dt_w) / expand_to(sq, dw), y)  # 2 I_(1,1)/sqrt(dt)
    chi2 = terms.noise_like_state(torch.add(levy_h, dw, alpha=0.5), y)  # I_(1,0)/dt
    chi3 = terms.noise_like_state(torch.sub(dw2, dt_w, alpha=3.0) * dw / dt_w, y)  # 6 I_(1,1,1)/dt
    dw_y = terms.noise_like_state(dw, y)

    s = tab.stages
    fs: list[Tensor | None] = [None] * s
    gs: list[Tensor | None] = [None] * s
    h0s: list[Tensor] = []
    nf = ng = 0
    diffusion_stages = tab.diffusion_stages
    for i in range(s):
        if i < tab.n_drift:
            h0 = fused_sum(y, [(a, dt_y, fs[j]) for j, a in plan.a0[i]] + [(b, chi2, gs[j]) for j, b in plan.b0[i]])
            assert h0 is not None
            fs[i] = drift(stage_time(t, dt, tab.c0[i]), h0)
            h0s.append(h0)
            nf += 1
        if diffusion_stages[i]:
            h1 = fused_sum(y, [(a, dt_y, fs[j]) for j, a in plan.a1[i]] + [(b, sqdt_y, gs[j]) for j, b in plan.b1[i]])
            assert h1 is not None
            gs[i] = diffusion(stage_time(t, dt, tab.c1[i]), h1)
            ng += 1

    e2 = fused_sum(None, [(b, chi2, gs[j]) for j, b in plan.beta3] + [(b, chi3, gs[j]) for j, b in plan.beta4_sixth])
    if e2 is None:
        e2 = torch.zeros_like(y)
    y1 = fused_sum(
        y,
        [(a, dt_y, fs[j]) for j, a in plan.alpha]
        + [(b, dw_y, gs[j]) for j, b in plan.beta1]
        + [(b, chi1, gs[j]) for j, b in plan.beta2_half],
    )
    assert y1 is not None
    y1 = y1 + e2
    weights = drift_error_terms(tab.alpha, tab.n_drift, delta)
    error = fused_sum(e2, [(w, dt_y, f) for w, f in zip(weights, fs)])
    assert error is not None
    # StochasticDiffEq's eigen_est for SOSRI2/SOSRA2: the last two drift stages
    last = tab.n_drift - 1
    fl, fp = fs[last], fs[last - 1]
    assert fl is not None and fp is not None
    stiffness = hairer_eigen_estimate(fl - fp, h0s[last] - h0s[last - 1])
    return StepOutput(y1=y1, error=error, nf=nf, ng=ng, stiffness=stiffness)


class _SRIBase(StochasticRungeKutta):
    """Shared metadata of the SRI family (StochasticDiffEq.jl ``src/alg_utils.jl``)."""

    tableau: ClassVar[SRITableau]
    default_delta: ClassVar[float] = 1.0

    strong_order: ClassVar[float] = 1.5
    weak_order: ClassVar[float] = 2.0
    noise_types: ClassVar[frozenset[str]] = frozenset({"diagonal", "scalar", "additive"})
    interpretations: ClassVar[frozenset[str]] = frozenset({"ito"})
    is_sde: ClassVar[bool] = True
    controller_order: ClassVar[float] = 1.5  # alg_order(SRIW1) = alg_order(SOSRI) = 3//2
    step_function = staticmethod(sri_step)


# SRIW1 = Rößler's SRI1 (weak order 2).  Coefficients as in StochasticDiffEq.jl's
# SRIW1ConstantCache perform_step (src/perform_step/sri.jl), which evaluates the drift
# only at two stages; its generic tableau (src/tableaus.jl, constructSRIW1) writes the
# weight 1/4 of the last diffusion stage on drift stage 3, whose state equals y, i.e. on
# f(t, y) = f_1 as below.
_Z4 = (0.0, 0.0, 0.0, 0.0)
SRIW1_TABLEAU = SRITableau(
    c0=(0.0, 3 / 4, 0.0, 0.0),
    c1=(0.0, 1 / 4, 1.0, 1 / 4),
    a0=(_Z4, (3 / 4, 0.0, 0.0, 0.0), _Z4, _Z4),
    a1=(_Z4, (1 / 4, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), (1 / 4, 0.0, 0.0, 0.0)),
    b0=(_Z4, (3 / 2, 0.0, 0.0, 0.0), _Z4, _Z4),
    b1=(_Z4, (1 / 2, 0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0), (-5.0, 3.0, 1 / 2, 0.0)),
    alpha=(1 / 3, 2 / 3, 0.0, 0.0),
    beta1=(-1.0, 4 / 3, 2 / 3, 0.0),
    beta2=(-1.0, 4 / 3, -1 / 3, 0.0),
    beta3=(2.0, -4 / 3, -2 / 3, 0.0),
    beta4=(-2.0, 5 / 3, -2 / 3, 1.0),
    n_drift=2,
)

# SOSRI (stability-optimized SRI, Rackauckas & Nie).  Coefficients from StochasticDiffEq.jl
# src/caches/rossler_caches.jl, SOSRIConstantCache (a0ij -> a0[i-1][j-1], c0i, c1i, betaki).
SOSRI_TABLEAU = SRITableau(
    c0=(0.0, -0.04199224421316468, 0.7898405466170333, 3.7504010171562823),
    c1=(0.0, 0.26204282091330466, 0.05879875232001766, 0.758661169101175),
    a0=(
        _Z4,
        (-0.04199224421316468, 0.0, 0.0, 0.0),
        (2.842612915017106, -2.0527723684000727, 0.0, 0.0),
        (4.338237071435815, -2.8895936137439793, 2.3017575594644466, 0.0),
    ),
    a1=(
        _Z4,
        (0.26204282091330466, 0.0, 0.0, 0.0),
        (0.20903646383505375, -0.1502377115150361, 0.0, 0.0),
        (0.05836595312746999, 0.6149440396332373, 0.08535117634046772, 0.0),
    ),
    b0=(
        _Z4,
        (-0.21641093549612528, 0.0, 0.0, 0.0),
        (1.5336352863679572, 0.26066223492647056, 0.0, 0.0),
        (-1.0536037558179159, 1.7015284721089472, -0.20725685784180017, 0.0),
    ),
    b1=(
        _Z4,
        (-0.5119011827621657, 0.0, 0.0, 0.0),
        (2.67767339866713, -4.9395031322250995, 0.0, 0.0),
        (0.15580956238299215, 3.2361551006624674, -1.4223118283355949, 0.0),
    ),
    alpha=(1.140099274172029, -0.6401334255743456, 0.4736296532772559, 0.026404498125060714),
    beta1=(-1.8453464565104432, 2.688764531100726, -0.2523866501071323, 0.40896857551684956),
    beta2=(0.4969658141589478, -0.5771202869753592, -0.12919702470322217, 0.2093514975196336),
    beta3=(2.8453464565104425, -2.688764531100725, 0.2523866501071322, -0.40896857551684945),
    beta4=(0.11522663875443433, -0.57877086147738, 0.2857851028163886, 0.17775911990655704),
    n_drift=4,
)


class SRIW1(_SRIBase):
    """Rößler's SRIW1 (SRI1): adaptive, strong order 1.5 / weak order 2.0, Itô SDEs with
    diagonal or scalar noise.  2 drift + 4 diffusion evaluations per step.
    Error: ``delta*E1 + E2`` with ``delta = 1/6`` by default (StochasticDiffEq's
    ``delta_default(::SRIW1)``)."""

    tableau: ClassVar[SRITableau] = SRIW1_TABLEAU
    default_delta: ClassVar[float] = 1 / 6
    # drift-stability interval on the negative real axis, measured (|R(z)| <= 1 for z >= -2.0004)
    stability_size: ClassVar[float | None] = 2.0
    weak_order: ClassVar[float] = 2.0


class SOSRI(_SRIBase):
    """Stability-optimized SRI (Rackauckas & Nie): adaptive, strong order 1.5 / weak order
    2.0, Itô SDEs with diagonal or scalar noise.  4 drift + 4 diffusion evaluations per
    step.  Error: ``delta*E1 + E2`` with ``delta = 1`` by default (StochasticDiffEq's
    ``delta_default``)."""

    tableau: ClassVar[SRITableau] = SOSRI_TABLEAU
    default_delta: ClassVar[float] = 1.0
    # drift-stability interval on the negative real axis, measured with zero noise
    # (|R(z)| <= 1 for z >= -9.840); StochasticDiffEq lists 10.6 for SOSRI2 and has no value
    # for SOSRI.  The same measurement gives 3.5069 for Tsit5 (OrdinaryDiffEq: 3.5068).
    stability_size: ClassVar[float | None] = 9.84
    weak_order: ClassVar[float] = 2.0


__all__ = ["SRITableau", "sri_step", "SRIW1", "SOSRI", "SRIW1_TABLEAU", "SOSRI_TABLEAU"]
