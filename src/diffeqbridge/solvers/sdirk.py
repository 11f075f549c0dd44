"""ESDIRK (explicit-first-stage, singly diagonally implicit Runge–Kutta) ODE solvers: ``Kvaerno5``.

Stage ``i`` of an ESDIRK method with diagonal ``γ`` (stage 1 explicit)::

    tmp_i = y + Σ_{j<i} a_ij z_j,     z_i = h f(t + c_i h, tmp_i + γ z_i)

Every implicit stage is ``u = tmp_i + γ h f(t_i, u)``, solved per sample by
:func:`diffeqbridge.nonlinear.newton_stage` (simplified Newton: the per-sample Jacobian
at ``(t, y)`` and the LU of ``I - γ h J`` are computed once per step and shared by all
stages; with ``reuse_jacobian=True`` the Jacobian is kept across steps until Newton slows down
or fails).  Stiffly accurate: ``y1`` is the last stage.  Error estimate: the embedded
solution's difference ``Σ btilde_i z_i`` smoothed by ``(I - γ h J)^{-1}`` (Hairer–Wanner
II, Sec. IV.8; OrdinaryDiffEq's ``smooth_est = true``), so the estimate stays bounded on
stiff components.  A sample whose Newton iteration fails gets a NaN proposal, which the
engine rejects (retry with a smaller step).

Sources:

* A. Kværnø, "Singly diagonally implicit Runge–Kutta methods with an explicit first
  stage", BIT 44 (2004) 489–502 (the 5(4) method, γ = 0.26); coefficients as in
  OrdinaryDiffEq.jl ``lib/OrdinaryDiffEqSDIRK/src/sdirk_tableaus.jl``
  (``Kvaerno5Tableau``).
* Controller: OrdinaryDiffEq's PI defaults for ``alg_order = 5``: ``beta1 = 7/50``,
  ``beta2 = 2/25``, ``qmax = 10``, ``qmin = 1/5``, ``gamma = 0.9``.  (OrdinaryDiffEq's
  Newton-based methods may use its predictive controller and ``qsteady`` band; the
  native engine has neither.)
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..nonlinear import (
    JacSpec,
    NewtonOptions,
    batched_jacobian,
    lu_factor,
    lu_solve,
    mark_failed,
    newton_matrix,
    newton_stage,
)
from ..problem import Terms, expand_to
from .base import AbstractSolver, Startup, StepOutput, jacobian_inf_norm

_G = 0.26
_KV5_A = (
    (),
    (_G,),
    (0.13, 0.84033320996790809),
    (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
    (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
    (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676),
    (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403, 0.06962479448202728),
)
# embedded (stage 6) minus propagated (stage 7) weights, OrdinaryDiffEq's btilde
_KV5_BTILDE = (0.00195889053627933, 0.0, 0.01251571594786333, 0.06565284626324187, -0.01050265826535727, 0.19037520551797272, -_G)


class JacobianState(NamedTuple):
    """``ESDIRK(reuse_jacobian=True)``'s per-solve state: ``J`` ``(B, n, n)``, the Jacobian of the
    last step; ``refresh`` ``(B,)`` bool, take a fresh one at the next step (the same value for
    every sample: one Jacobian call serves the batch)."""

    J: Tensor
    refresh: Tensor


class ESDIRK(AbstractSolver):
    """Generic stiffly accurate ESDIRK step; subclasses set ``a`` (rows below the
    diagonal), ``gamma_diag``, ``btilde`` and the metadata."""

    is_sde = False
    adaptive = True
    implicit = True
    fsal = True  # the last stage is h f(t + h, y1): f1 = z_s / h
    a: ClassVar[tuple[tuple[float, ...], ...]] = ()
    btilde: ClassVar[tuple[float, ...]] = ()
    gamma_diag: ClassVar[float] = 0.0
    qmax: ClassVar[float | None] = 10.0
    qmin: ClassVar[float | None] = 1.0 / 5.0
    gamma: ClassVar[float | None] = 0.9

    def __init__(
        self,
        *,
        jac: JacSpec = "autodiff",
        linsolve: str = "lu",
        newton: NewtonOptions | None = None,
        smooth_est: bool = True,
        reuse_jacobian: bool = False,
        slow_iterations: int = 5,
    ):
        """``reuse_jacobian``: keep the batch's Jacobian across steps (the LU of ``I - γhJ`` is
        still refactorised every step, ``h`` changes) until a stage's Newton iteration fails or
        needs ``slow_iterations`` or more iterations; then the next step takes a fresh one (for
        the whole batch: one Jacobian call serves every sample).  ``Stats.extra["njac"]`` counts."""
        self.newton = newton if newton is not None else NewtonOptions(jac=jac, linsolve=linsolve)
        self.smooth_est = bool(smooth_est)
        if isinstance(slow_iterations, bool) or not isinstance(slow_iterations, int) or slow_iterations < 1:
            raise ValueError(f"slow_iterations must be a positive int; got {slow_iterations!r}")
        self.reuse_jacobian, self.slow_iterations = bool(reuse_jacobian), slow_iterations

    def init(self, terms: Terms, t: Tensor, y0: Tensor, startup: Startup | None = None) -> JacobianState | None:
        """A :class:`JacobianState` asking for a fresh Jacobian (``reuse_jacobian`` with an LU
        solve or a smoothed estimate), else None (stateless)."""
        if not (self.reuse_jacobian and (self.newton.linsolve == "lu" or self.smooth_est)):
            return None
        batch, n = y0.shape[0], y0[0].numel()
        J = y0.new_zeros((batch, n, n))
        return JacobianState(J, torch.ones(batch, dtype=torch.bool, device=y0.device))

    @property
    def batch_coupled(self) -> str | None:
        """Why a sample's step depends on the other samples of the batch (None: it does not;
        ``solve(..., compact=f)`` needs None)."""
        if self.reuse_jacobian and (self.newton.linsolve == "lu" or self.smooth_est):
            return "reuse_jacobian refreshes the Jacobian of the whole batch when any sample's Newton iteration struggles"
        return None

    @property
    def c(self) -> tuple[float, ...]:
        return tuple(sum(row) + (self.gamma_diag if i > 0 else 0.0) for i, row in enumerate(self.a))

    def step(
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None,
        levy_h: Tensor | None,
        f0: Tensor | None = None,
        state: Any = None,
    ) -> StepOutput:
        f = terms.drift
        g = self.gamma_diag
        h = expand_to(dt, y).to(y.dtype)
        gh = g * dt
        opts = self.newton
        factors, nf, J, njac = None, 0, None, 0
        if opts.linsolve == "lu" or self.smooth_est:
            # reuse: one host sync per step (the Newton iterations synchronise anyway)
            if state is not None and not bool(state.refresh.any()):
                J = state.J
            else:
                J, nf = batched_jacobian(f, t, y, opts.jac)
                njac = 1
            factors = lu_factor(newton_matrix(J, gh))
        if f0 is None:
            f0 = f(t, y)
            nf += 1
        zs = [h * f0]
        converged = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        most_iterations = 0
        u = y
        for i in range(1, len(self.a)):
            tmp = y
            for j, aij in enumerate(self.a[i]):
                if aij != 0.0:
                    tmp = tmp + aij * zs[j]
            ci = sum(self.a[i]) + g
            guess = tmp + g * zs[-1]
            res = newton_stage(
                f, t + ci * dt, tmp, gh, guess, opts, factors if opts.linsolve == "lu" else None, tolerances=terms.tolerances
            )
            nf, njac = nf + res.nf, njac + res.njac
            converged = converged & res.converged
            most_iterations = max(most_iterations, res.iterations)
            u = res.z
            zs.append((u - tmp) / g)
        err = zs[0] * 0.0
        for b, z in zip(self.btilde, zs):
            if b != 0.0:
                err = err + b * z
        if self.smooth_est and factors is not None:
            err = lu_solve(factors, err)
        new_state = None
        if state is not None:
            assert J is not None
            # convergence degraded with the old Jacobian: take a fresh one next step
            refresh = (~converged.all()) | (most_iterations >= self.slow_iterations) if njac == 0 else converged.new_zeros(())
            new_state = JacobianState(J, refresh.expand(y.shape[0]))
        return StepOutput(
            mark_failed(u, converged),
            err,
            nf=nf,
            ng=0,
            f1=zs[-1] / h,
            converged=converged,
            stiffness=None if J is None else jacobian_inf_norm(J),
            njac=njac if J is not None else None,
            state=new_state,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Kvaerno5(ESDIRK):
    """Kværnø's 7-stage ESDIRK 5(4), L-stable, stiffly accurate (OrdinaryDiffEq's ``Kvaerno5``)."""

    strong_order: ClassVar[float] = 5.0
    weak_order: ClassVar[float] = 5.0
    controller_order: ClassVar[float] = 5.0
    beta1: ClassVar[float | None] = 7.0 / 50.0
    beta2: ClassVar[float | None] = 2.0 / 25.0
    a = _KV5_A
    btilde = _KV5_BTILDE
    gamma_diag = _G
