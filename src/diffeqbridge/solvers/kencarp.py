"""``SKenCarp``: StochasticDiffEq.jl's implicit (ESDIRK) stochastic Runge–Kutta method for
additive noise, strong order 1.5 (2.0 on SciML's ``prob_sde_additive``), adaptive.

The drift part is Kennedy & Carpenter's 4-stage, stiffly accurate ESDIRK (the implicit half
of KenCarp3, diagonal ``γ``); the noise part is an SRA-type tableau with two non-zero
noise couplings ``nb021``, ``nb043``.  With ``z_i = dt f(t + c_i dt, Y_i)`` (the whole drift
is treated implicitly, as StochasticDiffEq does for a plain, non-split ``f``) and
``χ2 = I_(1,0)/dt = ΔW/2 + H`` (see :mod:`.sra`: ``ΔZ = 2√3 H``)::

    g1 = g(t, y)
    z1 = dt f(t, y)
    Y2 = y + γ z1 + nb021 g1·χ2 + γ z2,            z2 = dt f(t + 2γ dt, Y2)
    Y3 = y + a31 z1 + a32 z2 + γ z3,               z3 = dt f(t + c3 dt, Y3)
    Y4 = y + a41 z1 + a42 z2 + a43 z3 + nb043 g1·χ2 + γ z4,   z4 = dt f(t + dt, Y4)
    g4 = g(t + dt, Y4)
    E2 = (g1 - g4)·χ2
    y1 = y + a41 z1 + a42 z2 + a43 z3 + γ z4 + g4·ΔW + E2

Error estimate ``error = delta E1 + E2``, ``delta = delta_default = 1``, with ``E1`` one of:

* ``error_estimate="embedded"`` (default; StochasticDiffEq's default ``ode_error_est = true``,
  ``smooth_est = true``): KenCarp3's embedded second-order ESDIRK solution from the same
  stages, ``btilde_i = bhat_i - b_i`` (``b = (a41, a42, a43, γ)``, stiffly accurate), smoothed
  by Shampine's filter ``(I - γ dt J)^-1`` with ``J`` the step's Jacobian at ``(t, y)``::

      E1 = (I - γ dt J)^-1 (btilde1 z1 + btilde2 z2 + btilde3 z3 + btilde4 z4)

  This is the in-place ``SKenCarpCache`` form (the out-of-place ``SKenCarpConstantCache`` also
  passes ``E2`` through the filter and then adds it again).  The drift part is ``O(dt^3)``
  (a difference of the order-3 and order-2 ESDIRK solutions), and the filter keeps it
  ``O(1/(dt |λ|))`` small on stiff components, so stiff problems take large steps.
* ``error_estimate="sciml_noode"`` (StochasticDiffEq's ``ode_error_est = false``):
  ``E1 = z1 + z2 + z3 + z4``, the size of the drift increment (``O(dt)``): it forces
  ``dt ~ tol`` and on stiff problems ``dt ~ tol / |λ|``.

Controller: StochasticDiffEq's PI controller (``alg_order = 2``, ``qmax = 9/8``,
``qmin = 1/5``, ``gamma = 9/10``).  ``SKenCarp(controller = :Predictive)`` is a stored field
there, but ``ispredictive`` is ``false`` for every SDE algorithm (``src/alg_utils.jl``) and the
SDE integrator's controller is the ``PIController`` of ``src/integrators/
stepsize_controllers.jl``, so no Gustafsson controller is involved.  With the embedded
estimate the step may grow by ``qmax = 3/2`` per step (:data:`~.base.EMBEDDED_QMAX`, as the
embedded SRI/SRA estimates here): on ``prob_sde_additivesystem`` at the default tolerances
9.5 steps per path, strong error 2.1e-4 (``qmax = 9/8``: 18.0 steps, 4.0e-5;
``"sciml_noode"``: 80.5 steps, 1.4e-6; StochasticDiffEq's test asks for < 50).

At ``dt |λ| ≫ 1`` the scheme does not damp its noise: ``g4 ΔW`` and ``-nb043 g1 χ2`` are
added after the implicit stages, so ``y1 ≈ Y4 + g (ΔW - nb043 χ2)`` scatters by
``~14 |g| √(dt/3)`` around the slow manifold, which neither estimate measures (the embedded
one filters the stages, ``Σ z_i`` forces ``dt ~ tol/|λ|`` instead).  On
``dX = -1e4 (X - cos t) dt + 0.1 dW`` at tol 1e-2: 18 steps, strong error 0.23 (the
Ornstein–Uhlenbeck fluctuation is 8e-4); ``alg=None`` pairs ``ShARK`` with
``ImplicitRKMil(smooth_est=True)`` instead (docs/guides/stiff.md).

Each implicit stage ``Y_i = base_i + γ dt f(t_i, Y_i)`` is solved per sample by
:func:`diffeqbridge.nonlinear.newton_stage`; the Newton matrix ``I - γ dt J`` is factorised
once per step at ``(t, y)`` and shared by the three stages (all have the same ``γ dt``),
refreshed per iterate when ``NewtonOptions.full_newton``.  ``z_i`` is recovered as
``(Y_i - base_i)/γ`` (no extra drift evaluation; exact at the Newton solution).  A sample
whose Newton iteration fails in any stage gets a NaN proposal (the engine rejects it).

Deviations from StochasticDiffEq: the Newton tolerance is κ·tol
(``nonlinear.newton_tolerances``) on the update's RMS, without SciML's η-based rate estimate; the initial
Newton guess of each stage is
the previous stage's ``z`` (SciML: ``:min_correct``, i.e. ``z = 0``, by default); the
Jacobian is recomputed every step.

Sources (coefficients only; the implementation is our own):

* SciML/StochasticDiffEq.jl ``src/perform_step/kencarp.jl`` (``SKenCarpConstantCache`` /
  ``SKenCarpCache`` ``perform_step!``), ``src/caches/kencarp_caches.jl``, the
  ``SKenCarpTableau`` constructor (``src/tableaus.jl``; ``γ``, ``a31 .. a43``, ``c3 = 3/5``,
  ``nb021``, ``nb043``, ``btilde1 .. btilde4`` as exact rationals, "bhat - b"), the
  ``SKenCarp`` constructor (``ode_error_est = true``, ``smooth_est = true``), ``src/alg_utils.jl``
  (``alg_order(SKenCarp) = 2//1``, ``delta_default = 1``, ``qmax = 9//8``, ``qmin = 1//5``,
  ``gamma = 9//10``, ``ispredictive = false``); SciML/OrdinaryDiffEq.jl's ``KenCarp3Tableau``
  (the same ``btilde``) and its ``smooth_est`` filter ``W \\ tmp`` (L. F. Shampine, "Numerical
  Solution of Ordinary Differential Equations", 1994, the filtered error estimate of stiff solvers).
* C. A. Kennedy, M. H. Carpenter, "Additive Runge–Kutta schemes for convection–diffusion–
  reaction equations", Appl. Numer. Math. 44 (2003) 139–181 (ARK3(2)4L[2]SA, ESDIRK part).
* C. Rackauckas, Q. Nie, "Stability-optimized high order methods and stiffness detection for
  pathwise stiff stochastic differential equations", HPEC 2020 (the SKenCarp noise tableau).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nonlinear import (
    JacSpec,
    NewtonOptions,
    batched_jacobian,
    lu_factor,
    mark_failed,
    newton_matrix,
    newton_stage,
    shampine_filter,
)
from ..problem import Terms, expand_to
from .base import (
    BOTH_INTERPRETATIONS,
    EMBEDDED_QMAX,
    AbstractSolver,
    StepOutput,
    check_delta,
    check_error_estimate,
    jacobian_inf_norm,
    levy_inputs,
    linear_combination,
)

# SKenCarpTableau (StochasticDiffEq.jl), exact rationals of KenCarp3's ESDIRK part.
GAMMA = 1767732205903 / 4055673282236
A31 = 2746238789719 / 10658868560708
A32 = -640167445237 / 6845629431997
A41 = 1471266399579 / 7840856788654
A42 = -4482444167858 / 7529755066697
A43 = 11266239266428 / 11593286722821
C2 = 2 * GAMMA
ERROR_ESTIMATES = ("embedded", "sciml_noode")
C3 = 3 / 5
# embedded weights btilde_i = bhat_i - b_i of KenCarp3 (SKenCarpTableau's exact rationals)
BTILDE = (
    681815649026867975666107 / 25159934323302256049469295,
    18411887981491912264464127 / 167175311446532472108584143,
    -12719313754959329011138489 / 123410692144842870217698057,
    -47289384293135913063989 / 1383962894467812063558225,
)
# noise tableau (B0[2][1] and B0[4][3]; printed to 80 digits there)
NB021 = -12.246764387585055918338744103409192607986567514699471403397969732723452087723101
NB043 = -14.432096958608752822047165680776748797565142459789556194474191884258734697161106


class SKenCarp(AbstractSolver):
    """Implicit (ESDIRK drift) SRA method of StochasticDiffEq.jl for additive noise: strong
    order 1.5, weak 2.0, Itô or Stratonovich (identical for additive noise), adaptive.
    Per step: 1 explicit + Newton drift evaluations, 2 diffusion evaluations, one Jacobian
    at ``(t, y)`` and one per further full Newton iteration (each one drift call with
    ``"autodiff"``; ``linsolve="krylov"``: JVPs instead, plus ``min(krylov_dim, n)`` for the
    embedded estimate's filter)."""

    strong_order = 1.5
    weak_order = 2.0
    noise_types = frozenset({"additive"})
    interpretations = BOTH_INTERPRETATIONS
    adaptive = True
    needs_levy_area = True
    implicit = True
    controller_order = 2.0  # alg_order(SKenCarp) = 2//1
    qmax = 9 / 8
    qmin = 1 / 5
    gamma = 9 / 10

    def __init__(
        self,
        *,
        jac: JacSpec = "autodiff",
        linsolve: str = "lu",
        newton: NewtonOptions | None = None,
        delta: float | None = None,
        error_estimate: str = "embedded",
        smooth_est: bool = True,
    ):
        """``jac``: ``"autodiff"`` | ``"fd"`` | ``jac(t, y) -> (B, n, n)``; ``linsolve``:
        ``"lu"`` | ``"krylov"``; ``newton``: full :class:`~diffeqbridge.nonlinear.NewtonOptions`
        (overrides ``jac``/``linsolve``; default: full Newton, at most 10 iterations);
        ``delta``: weight of ``E1`` in ``error = delta*E1 + E2`` (default 1);
        ``error_estimate``: ``"embedded"`` (StochasticDiffEq's default) or ``"sciml_noode"``
        (its ``ode_error_est = false``), see the module docstring; ``smooth_est``: apply
        Shampine's filter ``(I - γ dt J)^-1`` to the embedded estimate (SciML's default)."""
        self.delta = check_delta(delta, 1.0)
        self.error_estimate = check_error_estimate(error_estimate, ERROR_ESTIMATES)
        if not isinstance(smooth_est, bool):
            raise TypeError(f"smooth_est must be a bool; got {smooth_est!r}")
        self.smooth_est = smooth_est
        if self.error_estimate == "embedded":
            self.qmax = EMBEDDED_QMAX  # type: ignore[misc]  # instance override of the class constant
        if newton is None:
            newton = NewtonOptions(jac=jac, linsolve=linsolve, full_newton=True)
        self.newton = newton

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        diffusion, dw, levy_h = levy_inputs(terms, dw, levy_h, "SKenCarp needs")
        drift = terms.drift
        opts = self.newton
        dt_y = expand_to(dt, y)
        gh = GAMMA * dt
        chi2 = 0.5 * dw + levy_h  # I_(1,0)/dt

        g1 = diffusion(t, y)
        g1chi = terms.g_dw(g1, chi2)
        z1 = dt_y * drift(t, y)
        nf = 1

        factors, J, njac = None, None, 0
        if opts.linsolve == "lu":
            J, nj = batched_jacobian(drift, t, y, opts.jac)
            factors = lu_factor(newton_matrix(J, gh))
            nf, njac = nf + nj, 1

        converged = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)

        def stage(base: Tensor, c: float, z_guess: Tensor) -> Tensor:
            nonlocal converged, nf, njac
            res = newton_stage(drift, t + c * dt, base, gh, base + GAMMA * z_guess, opts, factors, tolerances=terms.tolerances)
            converged = converged & res.converged
            nf, njac = nf + res.nf, njac + res.njac
            return res.z

        base2 = y + GAMMA * z1 + NB021 * g1chi
        y2 = stage(base2, C2, z1)
        z2 = (y2 - base2) / GAMMA
        base3 = y + A31 * z1 + A32 * z2
        y3 = stage(base3, C3, z2)
        z3 = (y3 - base3) / GAMMA
        drift4 = y + A41 * z1 + A42 * z2 + A43 * z3
        base4 = drift4 + NB043 * g1chi
        y4 = stage(base4, 1.0, z3)
        z4 = (y4 - base4) / GAMMA

        g4 = diffusion(t + dt, y4)
        e2 = terms.g_dw(g1 - g4, chi2)
        y1 = drift4 + GAMMA * z4 + terms.g_dw(g4, dw) + e2
        if self.delta == 0.0:
            error = e2
        elif self.error_estimate == "sciml_noode":
            error = self.delta * (z1 + z2 + z3 + z4) + e2
        else:
            e1 = linear_combination(BTILDE, [z1, z2, z3, z4])
            assert e1 is not None
            if self.smooth_est:
                e1, n_filter = shampine_filter(e1, factors, drift, t, y, expand_to(gh, y).to(y.dtype), opts.krylov_dim)
                nf += n_filter
            error = self.delta * e1 + e2
        return StepOutput(
            mark_failed(y1, converged),
            error,
            nf=nf,
            ng=2,
            converged=converged,
            stiffness=None if J is None else jacobian_inf_norm(J),
            njac=None if J is None else njac,
        )

    def __repr__(self) -> str:
        args = []
        if self.error_estimate != "embedded":
            args.append(f"error_estimate={self.error_estimate!r}")
        if not self.smooth_est:
            args.append("smooth_est=False")
        if self.delta != 1.0:
            args.append(f"delta={self.delta!r}")
        return f"SKenCarp({', '.join(args)})"


__all__ = ["SKenCarp"]
