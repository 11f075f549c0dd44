"""Explicit embedded Runge–Kutta ODE solvers: ``Tsit5`` and ``Dopri5``.

Both are 7-stage, 5th-order pairs with an embedded 4th-order solution and the FSAL
("first same as last") property: the last stage is evaluated at ``(t + dt, y1)``, so an
accepted step reuses it as the next step's first stage and costs 6 new drift
evaluations.

One generic step (:func:`explicit_rk_step`) runs any explicit tableau
(:class:`ButcherTableau`); the solver classes only carry a tableau and metadata.

Sources:

* Tsit5 — Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first
  column simplifying assumption", Computers & Mathematics with Applications 62 (2011)
  770–775.  Coefficients (to double precision, from the high-precision literals) as in
  OrdinaryDiffEq.jl, ``src/tableaus/low_order_rk_tableaus.jl`` (``Tsit5ConstantCache``).
* Dopri5 — J. R. Dormand and P. J. Prince, "A family of embedded Runge–Kutta formulae",
  J. Comput. Appl. Math. 6 (1980) 19–26; tableau as in E. Hairer, S. P. Nørsett,
  G. Wanner, *Solving Ordinary Differential Equations I*, 2nd ed., Springer 1993,
  Table II.5.2 (the classical embedded 4th-order weights ``b̂``, as OrdinaryDiffEq.jl's
  ``DP5ConstantCache`` and Hairer's DOPRI5 code).
* Controller constants — OrdinaryDiffEq.jl ``src/alg_utils.jl``:
  ``beta2_default(alg) = 2//(5 alg_order)``, ``beta1_default(alg, beta2) = 7//(10 alg_order)``,
  overridden for DP5 by ``beta2 = 4//100``, ``beta1 = 1//alg_order - 3 beta2/4``;
  ``qmax_default = 10``, ``qmin_default = 1//5``, ``gamma_default = 9//10``.
* Initial step — Hairer, Nørsett, Wanner (1993), Sec. II.4 ("Starting step size"), in the
  variant of OrdinaryDiffEq.jl's ``ode_determine_initdt`` (``src/initdt.jl``).

Sign convention: OrdinaryDiffEq's ``btilde`` is ``b̂ - b``; here ``b_error = b - b̂``.  The
error norm is insensitive to the sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from torch import Tensor

from ..problem import Terms, expand_to
from .base import AbstractSolver, StepOutput, hairer_eigen_estimate

__all__ = [
    "ButcherTableau",
    "TSIT5_TABLEAU",
    "DOPRI5_TABLEAU",
    "explicit_rk_step",
    "ExplicitRK",
    "Tsit5",
    "Dopri5",
]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta tableau with an embedded error estimator.

    Attributes:
        c: ``(s,)`` nodes, ``c[0] == 0``.
        a: ``s`` rows; row ``i`` holds ``a[i][0..i-1]`` (row 0 is empty).
        b: ``(s,)`` weights of the propagated solution.
        b_error: ``(s,)`` ``b - b̂``, the difference with the embedded solution's weights.
        order: order of the propagated solution.
        embedded_order: order of the embedded solution.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    order: int
    embedded_order: int

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or len(self.b) != s or len(self.b_error) != s:
            raise ValueError("ButcherTableau: c, a, b, b_error must all have s entries")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"ButcherTableau: row {i} of a must have {i} entries; got {len(row)}")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def fsal(self) -> bool:
        """True when the last stage is evaluated at ``(t + dt, y1)`` (last row of ``a`` is ``b``)."""
        return self.c[-1] == 1.0 and self.b[-1] == 0.0 and tuple(self.a[-1]) == tuple(self.b[:-1])


def _f(x: str | Fraction | int) -> float:
    return float(Fraction(x)) if not isinstance(x, str) else float(x)


# --- Tsit5 (Tsitouras 2011), OrdinaryDiffEq.jl Tsit5ConstantCache high-precision literals ---
_T_A = (
    (),
    ("0.161",),
    (
        "-.8480655492356988544426874250230774675121177393430391537369234245294192976164141156943e-2",
        ".3354806554923569885444268742502307746751211773934303915373692342452941929761641411569",
    ),
    (
        "2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289",
        "-6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366",
        "4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077",
    ),
    (
        "5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791",
        "-11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589",
        "7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753",
        "-.9249506636175524925650207933207191611349983406029535244034750452930469056411389539635e-1",
    ),
    (
        "5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748",
        "-12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452",
        "8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986",
        "-.7158497328140099722453054252582973869127213147363544882721139659546372402303777878835e-1",
        "-.2826905039406838290900305721271224146717633626879770007617876201276764571291579142206e-1",
    ),
    (
        ".9646076681806522951816731316512876333711995238157997181903319145764851595234062815396e-1",
        "0.01",
        ".4798896504144995747752495322905965199130404621990332488332634944254542060153074523509",
        "1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331",
        "-3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677",
        "2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841",
    ),
)
# OrdinaryDiffEq's btilde = b̂ - b; negated here.
_T_BTILDE = (
    "-1.780011052225771443378550607539534775944678804333659557637450799792588061629796e-03",
    "-8.164344596567469032236360633546862401862537590159047610940604670770447527463931e-04",
    "7.880878010261996010314727672526304238628733777103128603258129604952959142646516e-03",
    "-1.44711007173262907537165147972635116720922712343167677619514233896760819649515e-01",
    "5.823571654525552250199376106520421794260781239567387797673045438803694038950012e-01",
    "-4.580821059291869466616365188325542974428047279788398179474684434732070620889539e-01",
    Fraction(1, 66),
)

TSIT5_TABLEAU = ButcherTableau(
    c=(
        0.0,
        _f("0.161"),
        _f("0.327"),
        _f("0.9"),
        _f(".9800255409045096857298102862870245954942137979563024768854764293221195950761080302604"),
        1.0,
        1.0,
    ),
    a=tuple(tuple(_f(x) for x in row) for row in _T_A),
    b=tuple(_f(x) for x in _T_A[-1]) + (0.0,),
    b_error=tuple(-_f(x) for x in _T_BTILDE),
    order=5,
    embedded_order=4,
)

# --- Dormand–Prince 5(4) (Hairer–Nørsett–Wanner I, Table II.5.2) ---
_F = Fraction
_DP_A = (
    (),
    (_F(1, 5),),
    (_F(3, 40), _F(9, 40)),
    (_F(44, 45), _F(-56, 15), _F(32, 9)),
    (_F(19372, 6561), _F(-25360, 2187), _F(64448, 6561), _F(-212, 729)),
    (_F(9017, 3168), _F(-355, 33), _F(46732, 5247), _F(49, 176), _F(-5103, 18656)),
    (_F(35, 384), _F(0), _F(500, 1113), _F(125, 192), _F(-2187, 6784), _F(11, 84)),
)
_DP_B = _DP_A[-1] + (_F(0),)
_DP_BHAT = (
    _F(5179, 57600),
    _F(0),
    _F(7571, 16695),
    _F(393, 640),
    _F(-92097, 339200),
    _F(187, 2100),
    _F(1, 40),
)

DOPRI5_TABLEAU = ButcherTableau(
    c=tuple(float(x) for x in (_F(0), _F(1, 5), _F(3, 10), _F(4, 5), _F(8, 9), _F(1), _F(1))),
    a=tuple(tuple(float(x) for x in row) for row in _DP_A),
    b=tuple(float(x) for x in _DP_B),
    b_error=tuple(float(b - bh) for b, bh in zip(_DP_B, _DP_BHAT)),  # exact, then rounded
    order=5,
    embedded_order=4,
)


def _lincomb(coeffs: tuple[float, ...], ks: list[Tensor]) -> Tensor | None:
    """``Σ coeffs[j] * ks[j]`` skipping zero coefficients (None if all are zero)."""
    acc: Tensor | None = None
    for cj, kj in zip(coeffs, ks):
        if cj == 0.0:
            continue
        term = kj * cj
        acc = term if acc is None else acc + term
    return acc


def explicit_rk_step(
    tableau: ButcherTableau,
    drift: Callable[[Tensor, Tensor], Tensor],
    t: Tensor,
    y: Tensor,
    dt: Tensor,
    f0: Tensor | None = None,
    stiffness_out: list[Tensor] | None = None,
    stages_out: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """One explicit RK step of every sample by its own ``dt``.

    Args:
        tableau: the method.
        drift: ``drift(t (B,), y (B, *state))``.
        t, dt: ``(B,)``; y: ``(B, *state)``.
        f0: ``drift(t, y)`` if already known (FSAL), else it is evaluated.
        stiffness_out: when a list, the per-sample stiffness estimate ``ρ`` ``(B,)`` of the
            last two stages is appended to it.
        stages_out: when a list, the stage derivatives ``k_1..k_s`` are appended to it
            (dense output).

    Returns:
        ``(y1, error, f1, nf)``: the 5th-order state, the embedded error
        ``dt * Σ (b_i - b̂_i) k_i`` (state shape), ``drift(t + dt, y1)`` for FSAL tableaus
        (None otherwise), and the number of drift evaluations made.
    """
    nf = 0
    if f0 is None:
        f0 = drift(t, y)
        nf += 1
    dt_e = expand_to(dt, y)
    t1 = t + dt
    ks = [f0]
    fsal = tableau.fsal
    y_stage = y
    y_prev = y
    for i in range(1, tableau.stages):
        y_prev = y_stage
        incr = _lincomb(tableau.a[i], ks)
        y_stage = y if incr is None else y + dt_e * incr
        ci = tableau.c[i]
        t_stage = t1 if ci == 1.0 else t + ci * dt
        ks.append(drift(t_stage, y_stage))
        nf += 1
    if fsal:
        y1 = y_stage
        f1: Tensor | None = ks[-1]
    else:
        incr = _lincomb(tableau.b, ks)
        y1 = y if incr is None else y + dt_e * incr
        f1 = None
    err_comb = _lincomb(tableau.b_error, ks)
    error = None if err_comb is None else dt_e * err_comb
    if stiffness_out is not None:
        # Hairer–Wanner II, Sec. IV.2 (OrdinaryDiffEq's DP5/Tsit5 eigen_est): the last two
        # stages, both at t + dt for these FSAL pairs
        stiffness_out.append(hairer_eigen_estimate(ks[-1] - ks[-2], y_stage - y_prev))
    if stages_out is not None:
        stages_out.extend(ks)
    return y1, error, f1, nf


class ExplicitRK(AbstractSolver):
    """Generic explicit embedded RK ODE solver over :attr:`tableau`."""

    tableau: ClassVar[ButcherTableau]
    is_sde: ClassVar[bool] = False
    noise_types: ClassVar[frozenset[str]] = frozenset()
    adaptive: ClassVar[bool] = True
    needs_levy_area: ClassVar[bool] = False
    fsal: ClassVar[bool] = True
    qmax: ClassVar[float | None] = 10.0
    qmin: ClassVar[float | None] = 1.0 / 5.0
    gamma: ClassVar[float | None] = 9.0 / 10.0

    def step(
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None = None,
        levy_h: Tensor | None = None,
        f0: Tensor | None = None,
    ) -> StepOutput:
        """Advance every sample from ``t`` to ``t + dt`` (``dw``/``levy_h`` are ignored).

        With ``f0 = drift(t, y)`` given, costs ``stages - 1`` (= 6) drift evaluations and
        returns ``f1 = drift(t + dt, y1)``; without it, one more.
        """
        rho: list[Tensor] = []
        ks: list[Tensor] = []
        y1, error, f1, nf = explicit_rk_step(self.tableau, terms.drift, t, y, dt, f0, stiffness_out=rho, stages_out=ks)
        return StepOutput(y1=y1, error=error, nf=nf, ng=0, f1=f1, stiffness=rho[0], stages=ks)


class Tsit5(ExplicitRK):
    """Tsitouras' 5(4) pair (2011), FSAL, 7 stages; SciML's default non-stiff ODE method.

    PI controller: OrdinaryDiffEq defaults for ``alg_order = 5``:
    ``beta2 = 2/(5*5) = 0.08``, ``beta1 = 7/(10*5) = 0.14``, ``qmax = 10``, ``qmin = 1/5``,
    ``gamma = 0.9``.
    """

    tableau = TSIT5_TABLEAU
    stability_size: ClassVar[float | None] = 3.5068  # OrdinaryDiffEq alg_stability_size(Tsit5)
    strong_order: ClassVar[float] = 5.0
    weak_order: ClassVar[float] = 5.0
    controller_order: ClassVar[float] = 5.0
    beta2: ClassVar[float | None] = 2.0 / (5.0 * 5.0)
    beta1: ClassVar[float | None] = 7.0 / (10.0 * 5.0)


class Dopri5(ExplicitRK):
    """Dormand–Prince 5(4) pair (1980), FSAL, 7 stages (OrdinaryDiffEq's ``DP5``).

    PI controller: OrdinaryDiffEq's DP5 override ``beta2 = 4/100``,
    ``beta1 = 1/5 - 3/4 * beta2 = 0.17``; ``qmax = 10``, ``qmin = 1/5``, ``gamma = 0.9``.
    """

    tableau = DOPRI5_TABLEAU
    stability_size: ClassVar[float | None] = 3.3066  # OrdinaryDiffEq alg_stability_size(DP5)
    strong_order: ClassVar[float] = 5.0
    weak_order: ClassVar[float] = 5.0
    controller_order: ClassVar[float] = 5.0
    beta2: ClassVar[float | None] = 4.0 / 100.0
    beta1: ClassVar[float | None] = 1.0 / 5.0 - 3.0 / 4.0 * (4.0 / 100.0)
