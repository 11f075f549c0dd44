"""Batched nonlinear solves for implicit stages: per-sample Jacobians, Newton, Newton–Krylov.

Every sample of the batch is independent, so every sample gets its own Jacobian, its own
LU factorisation, its own convergence flag.  All tensors keep the batch axis; no sample
waits for or perturbs another.

Jacobians (:func:`batched_jacobian`), ``(B, n, n)`` with ``n = prod(state_shape)``:

* ``"autodiff"`` (default): ``torch.func.jacrev`` of ``z -> f(t, z).sum(0)``.  Because the
  samples are independent, the Jacobian of the batch-sum with respect to the batch is
  ``(*S, B, *S)`` and holds each sample's Jacobian in its diagonal block; one reverse pass
  per state component (vmapped), not per sample.
* ``"fd"``: forward differences, ``n + 1`` calls of ``f`` on the batch (column ``j`` of
  every sample's Jacobian from one call; batch-size and per-sample parameters preserved).
* a callable ``jac(t, y) -> (B, n, n)`` (or ``(B, *S, *S)``): used as given.

The stage equation of a (diagonally) implicit method is ``z = base + gh * f(t1, z)`` with
a per-sample ``gh = gamma * dt``.  :func:`newton_stage` solves it by simplified Newton
(``W = I - gh J`` factorised once with ``torch.linalg.lu_factor_ex``, batched) or, with
``linsolve="krylov"``, by Jacobian-free Newton–Krylov (JVPs through ``torch.func.jvp``
and a fixed number of batched GMRES iterations), so image-sized states never build a
dense Jacobian.

Convergence is per sample: a sample has converged when the RMS of its scaled residual
``(z - base - gh f(t1, z)) / (atol + rtol |z|)`` or of its scaled update ``dz / (...)`` is
at most 1 (tolerances from :func:`newton_tolerances`: by default ``κ = 1/100`` times the
adaptive solve's ``atol``/``rtol``, as OrdinaryDiffEq's ``κ·tol`` stopping, never below what
the dtype can resolve); converged flags are sticky (masked), and converged samples keep taking their
(tiny) Newton updates so that gradients through ``z`` are the implicit-function ones;
the loop ends with one more correction from the converged iterate for the same reason.
With ``early_exit=True`` (default) the loop stops once every sample has converged — one
host synchronisation per Newton iteration; with ``early_exit=False`` it runs exactly
``max_iters`` iterations and never synchronises.  Samples not converged after
``max_iters`` (or whose iterates became non-finite) are reported in ``converged``; the
solvers turn them into NaN proposals and pass the flags on (``StepOutput.converged``); the
engine rejects those steps (adaptive: retried with a smaller ``dt``, and after 10
consecutive failures the sample stops with ``ReturnCode.ConvergenceFailure``; fixed step:
it stops with ``ConvergenceFailure`` at once, as SciML).

The Newton matrix is not differentiated (it only steers the iteration): gradients flow
through the residual evaluations, which is exact at convergence for the fixed point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .problem import expand_to

Field = Callable[[Tensor, Tensor], Tensor]
JacSpec = str | Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "NewtonOptions",
    "NewtonResult",
    "batched_gmres",
    "batched_jacobian",
    "krylov_calls",
    "krylov_solve",
    "lu_factor",
    "lu_solve",
    "mark_failed",
    "newton_matrix",
    "newton_stage",
    "newton_tolerances",
    "resolve_options",
    "time_derivative",
]


@dataclass(frozen=True)
class NewtonOptions:
    """How an implicit solver solves its stage equations.

    Attributes:
        jac: ``"autodiff"`` | ``"fd"`` | a callable ``jac(t, y)`` returning ``(B, n, n)``.
        linsolve: ``"lu"`` (dense per-sample LU) or ``"krylov"`` (matrix-free GMRES).
        max_iters: Newton iterations at most.
        atol / rtol: a sample has converged when ``rms(dz / (atol + rtol |z|)) <= 1``.  None
            (default): ``kappa`` times the solve's ``atol``/``rtol`` for adaptive solves,
            ``1e-10``/``1e-8`` for fixed-step ones; see :func:`newton_tolerances`.
        kappa: the factor on the solve's tolerances (OrdinaryDiffEq's ``κ``, default 1/100).
        krylov_dim: GMRES iterations per Newton step (``linsolve="krylov"``).
        early_exit: stop when all samples converged (one host sync per iteration).
        full_newton: re-evaluate and re-factorise ``I - gh J(z)`` at every iterate
            (quadratic convergence; one Jacobian per iteration) instead of simplified
            Newton with the matrix given (linear convergence, cheaper per iteration).
    """

    jac: JacSpec = "autodiff"
    linsolve: str = "lu"
    max_iters: int = 10
    atol: float | None = None
    rtol: float | None = None
    krylov_dim: int = 20
    early_exit: bool = True
    full_newton: bool = False
    kappa: float = 0.01

    def __post_init__(self) -> None:
        if not (callable(self.jac) or self.jac in ("autodiff", "fd")):
            raise ValueError(f"jac must be 'autodiff', 'fd' or a callable jac(t, y); got {self.jac!r}")
        if self.linsolve not in ("lu", "krylov"):
            raise ValueError(f"linsolve must be 'lu' or 'krylov'; got {self.linsolve!r}")
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"max_iters must be a positive int; got {self.max_iters!r}")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"Newton {name} must be None or a non-negative number; got {v!r}")
        if self.atol is not None and self.rtol is not None and self.atol + self.rtol == 0:
            raise ValueError("Newton atol/rtol must not both be zero")
        if isinstance(self.kappa, bool) or not isinstance(self.kappa, (int, float)) or not 0 < self.kappa <= 1:
            raise ValueError(f"Newton kappa must lie in (0, 1]; got {self.kappa!r}")
        if not isinstance(self.krylov_dim, int) or self.krylov_dim < 1:
            raise ValueError(f"krylov_dim must be a positive int; got {self.krylov_dim!r}")


@dataclass
class NewtonResult:
    """``z``: the solution ``(B, *S)``; ``converged``: ``(B,)`` bool; ``iterations``: Newton
    iterations run (int); ``nf``: drift evaluations per sample (int, Jacobians' included);
    ``njac``: Jacobians built by ``full_newton`` (int)."""

    z: Tensor
    converged: Tensor
    iterations: int
    nf: int
    njac: int = 0


def _n(y: Tensor) -> int:
    return math.prod(y.shape[1:])


def batched_jacobian(
    f: Field, t: Tensor, y: Tensor, jac: JacSpec = "autodiff", differentiable: bool = False
) -> tuple[Tensor, int]:
    """Per-sample Jacobians ``d f(t, y)_b / d y_b``: ``(B, n, n)`` and the drift calls per
    sample it cost: ``n + 1`` for finite differences, 1 for ``"autodiff"`` (one traced call of
    ``f`` on the batch; each sample counts every batched call once), 0 for a user ``jac``.

    Detached unless ``differentiable``: then ``"autodiff"`` keeps the graph of ``J`` with
    respect to ``y`` and every tensor ``f`` uses (second derivatives of ``f`` in the backward;
    a Rosenbrock step's result depends on ``J``), and a callable's output is kept as it is.
    Finite differences are never differentiated."""
    batch, n = y.shape[0], _n(y)
    y_in = y
    y = y.detach()
    if callable(jac):
        J = jac(t, y_in if differentiable else y)
        if not isinstance(J, Tensor):
            raise TypeError(f"jac(t, y) must return a tensor; got {type(J).__name__}")
        if J.numel() != batch * n * n:
            raise ValueError(f"jac(t, y) returned shape {tuple(J.shape)}; expected (B, n, n) = ({batch}, {n}, {n})")
        J = J.reshape(batch, n, n).to(y.dtype)
        return (J if differentiable else J.detach()), 0
    if jac == "autodiff":
        full = torch.func.jacrev(lambda z: f(t, z).sum(0))(y_in if differentiable else y)  # (*S, B, *S)
        J = full.reshape(n, batch, n).permute(1, 0, 2)
        return (J if differentiable else J.detach()), 1
    # forward differences: column j of every sample in one call on the batch (n + 1 calls)
    with torch.no_grad():
        f0 = f(t, y)
        eps = torch.finfo(y.dtype).eps ** 0.5 * torch.clamp(y.reshape(batch, n).abs(), min=1.0)  # (B, n)
        flat = y.reshape(batch, n)
        cols = []
        for j in range(n):
            yj = flat.clone()
            yj[:, j] += eps[:, j]
            cols.append((f(t, yj.reshape(y.shape)) - f0).reshape(batch, n) / eps[:, j : j + 1])
        return torch.stack(cols, dim=2), n + 1


def time_derivative(
    f: Field, t: Tensor, y: Tensor, jac: JacSpec = "autodiff", differentiable: bool = False
) -> tuple[Tensor, int]:
    """``∂f/∂t (t, y)`` per sample, ``(B, *S)``: forward-mode AD, or a forward difference
    when ``jac`` is ``"fd"`` or a user Jacobian (user functions need not be differentiable),
    and the drift calls per sample it cost (1 traced call, or 2 for the difference).
    ``differentiable``: keep the AD result's graph (as :func:`batched_jacobian`)."""
    if jac == "autodiff":
        y_in = y if differentiable else y.detach()
        _, dt = torch.func.jvp(lambda s: f(s, y_in), (t.detach(),), (torch.ones_like(t),))
        return (dt if differentiable else dt.detach()), 1
    y = y.detach()
    with torch.no_grad():
        h = torch.finfo(y.dtype).eps ** 0.5 * torch.clamp(t.abs(), min=1.0)
        return ((f(t + h, y) - f(t, y)) / expand_to(h, y).to(y.dtype)), 2


def lu_factor(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Batched LU without raising on singular samples (they come out non-finite)."""
    lu, piv, _ = torch.linalg.lu_factor_ex(matrix)
    return lu, piv


def lu_solve(factors: tuple[Tensor, Tensor], rhs: Tensor) -> Tensor:
    """Solve ``W x = rhs`` per sample; ``rhs`` is ``(B, *S)``."""
    lu, piv = factors
    x = torch.linalg.lu_solve(lu, piv, rhs.reshape(rhs.shape[0], -1, 1))
    return x.reshape(rhs.shape)


def newton_matrix(J: Tensor, gh: Tensor) -> Tensor:
    """``W = I - gh J`` per sample (``gh``: ``(B,)``)."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    return eye - gh.to(J.dtype).reshape(-1, 1, 1) * J


def batched_gmres(matvec: Callable[[Tensor], Tensor], rhs: Tensor, iters: int) -> Tensor:
    """``iters`` steps of unrestarted GMRES from ``x0 = 0`` for every sample at once.

    ``matvec`` maps ``(B, n)`` to ``(B, n)`` sample by sample; ``rhs`` is ``(B, n)``.
    Arnoldi with modified Gram–Schmidt, then a per-sample least-squares solve of the
    small Hessenberg system.  A sample whose Krylov space is exhausted early (happy
    breakdown) keeps the exact solution: its later basis vectors are zero.
    """
    batch, n = rhs.shape
    m = min(iters, n)
    tiny = torch.finfo(rhs.dtype).tiny ** 0.5
    beta = rhs.norm(dim=1)
    V = [rhs / beta.clamp_min(tiny).unsqueeze(1)]
    H = rhs.new_zeros(batch, m + 1, m)
    for j in range(m):
        w = matvec(V[j])
        for i in range(j + 1):
            hij = (w * V[i]).sum(dim=1)
            H[:, i, j] = hij
            w = w - hij.unsqueeze(1) * V[i]
        hnext = w.norm(dim=1)
        H[:, j + 1, j] = hnext
        alive = hnext > tiny * (1 + beta)
        V.append(torch.where(alive.unsqueeze(1), w / hnext.clamp_min(tiny).unsqueeze(1), torch.zeros_like(w)))
    e1 = rhs.new_zeros(batch, m + 1, 1)
    e1[:, 0, 0] = beta
    # normal equations of the small (m+1) x m system, regularised for broken-down samples
    Ht = H.transpose(1, 2)
    gram = Ht @ H
    # columns of a broken-down sample are zero: put 1 on their diagonal (their coefficient
    # solves to 0), and a relative ridge on the rest so LU never sees an exact zero pivot
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    dead = diagonal <= tiny * (1 + beta.unsqueeze(1) ** 2)
    ridge = torch.finfo(rhs.dtype).eps * diagonal.amax(dim=-1, keepdim=True)
    gram = gram + torch.diag_embed(torch.where(dead, torch.ones_like(diagonal), ridge.expand_as(diagonal)))
    coef = torch.linalg.solve(gram, Ht @ e1).squeeze(-1)  # (B, m)
    basis = torch.stack(V[:m], dim=1)  # (B, m, n)
    return (coef.unsqueeze(-1) * basis).sum(dim=1)


#: Newton tolerances of fixed-step solves (and of direct calls without the solve's tolerances)
FIXED_STEP_ATOL, FIXED_STEP_RTOL = 1e-10, 1e-8
#: the smallest Newton rtol, in units of the dtype's machine epsilon: an update below a few
#: ulps of z is rounding noise (float32: 6e-6; float64: 1e-14, below every default)
RTOL_FLOOR_EPS = 50.0


def newton_tolerances(
    options: NewtonOptions, dtype: torch.dtype, solve_tolerances: tuple[float | Tensor, float | Tensor] | None = None
) -> tuple[float | Tensor, float | Tensor]:
    """``(atol, rtol)`` of the Newton convergence test (per-component tensors when the solve's are).

    Explicit ``options.atol``/``rtol`` are used as given; None means ``options.kappa`` times
    the adaptive solve's ``solve_tolerances`` (OrdinaryDiffEq stops Newton at ``κ·tol`` in the
    solve's own error norm), or ``1e-10``/``1e-8`` for fixed-step solves.  Either way ``rtol``
    is at least ``50 eps(dtype)``: float32 cannot resolve ``1e-8`` relative updates, and a
    tolerance below rounding makes Newton "fail" on trivial problems.
    """
    if solve_tolerances is not None:
        auto_atol, auto_rtol = options.kappa * solve_tolerances[0], options.kappa * solve_tolerances[1]
    else:
        auto_atol, auto_rtol = FIXED_STEP_ATOL, FIXED_STEP_RTOL
    atol = auto_atol if options.atol is None else float(options.atol)
    rtol = auto_rtol if options.rtol is None else float(options.rtol)
    floor = RTOL_FLOOR_EPS * torch.finfo(dtype).eps
    return atol, rtol.clamp(min=floor) if isinstance(rtol, Tensor) else max(rtol, floor)


def _scaled_rms(dz: Tensor, z: Tensor, atol: float | Tensor, rtol: float | Tensor) -> Tensor:
    return (dz / (atol + rtol * z.abs())).square().flatten(1).mean(dim=1).sqrt()


def newton_stage(
    f: Field,
    t1: Tensor,
    base: Tensor,
    gh: Tensor,
    z0: Tensor,
    options: NewtonOptions,
    factors: tuple[Tensor, Tensor] | None = None,
    t_jac: Tensor | None = None,
    tolerances: tuple[float | Tensor, float | Tensor] | None = None,
) -> NewtonResult:
    """Solve ``z = base + gh * f(t1, z)`` for every sample (``gh``: ``(B,)``).

    ``factors``: the LU factors of ``W = I - gh J`` (from :func:`lu_factor` of
    :func:`newton_matrix`), reused across the iterations (simplified Newton) and across
    stages sharing ``gh``.  Required for ``linsolve="lu"``; ignored for ``"krylov"``,
    which applies the exact Jacobian at the current iterate through JVPs.  With
    ``options.full_newton`` the matrix is rebuilt at every iterate (``factors`` may then
    be None); ``t_jac`` is the time the Jacobian is taken at (default ``t1``).
    ``tolerances``: the adaptive solve's ``(atol, rtol)`` (``Terms.tolerances``), from which
    the convergence test's tolerances are derived (:func:`newton_tolerances`).
    """
    atol, rtol = newton_tolerances(options, base.dtype, tolerances)
    gh_b = expand_to(gh, base).to(base.dtype)
    z = z0
    converged = torch.zeros(base.shape[0], dtype=torch.bool, device=base.device)
    nf = njac = 0
    it = 0
    for it in range(1, options.max_iters + 1):
        fz = f(t1, z)
        nf += 1
        residual = z - base - gh_b * fz
        # a residual already within tolerance converges the sample with this iteration's
        # correction (no further Jacobian refresh or evaluation for it)
        res_small = _scaled_rms(residual.detach(), z.detach(), atol, rtol) <= 1.0
        if options.linsolve == "krylov":
            dz = -krylov_solve(f, t1, z, gh_b, residual, options.krylov_dim)
            nf += krylov_calls(options.krylov_dim, z)
        else:
            if options.full_newton and (it > 1 or factors is None):
                J, nj = batched_jacobian(f, t1 if t_jac is None else t_jac, z, options.jac)
                factors = lu_factor(newton_matrix(J, gh))
                nf, njac = nf + nj, njac + 1
            assert factors is not None, "linsolve='lu' needs the LU factors of I - gh J"
            dz = -lu_solve(factors, residual)
        z_new = z + dz
        small = _scaled_rms(dz.detach(), z_new.detach(), atol, rtol) <= 1.0
        finite = _all_finite(z_new)
        z = _newton_update(z, z_new, converged, finite)
        converged = converged | ((small | res_small) & finite)
        if options.early_exit and bool(converged.all()):
            break
    return NewtonResult(z=z, converged=converged & _all_finite(z), iterations=it, nf=nf, njac=njac)


def _newton_update(z: Tensor, z_new: Tensor, converged: Tensor, finite: Tensor) -> Tensor:
    """The next iterate, per sample: running samples take ``z_new`` (a non-finite one too, so
    the failure shows); a sample that converged earlier keeps its value bit for bit, so how
    many more iterations the rest of the batch needs cannot change it (batch-composition
    invariance), while its graph is the Newton map at the solution (``z + (z_new - z_new)``
    in value, ``z_new``'s derivatives: the implicit-function gradient ``W^-1 (d base + gh
    df)``).  A running sample whose update is not finite keeps ``z_new`` and fails."""
    frozen = z.detach() + (z_new - z_new.detach()) if z_new.requires_grad else z
    take_new = expand_to(~converged, z)
    return torch.where(take_new, z_new, torch.where(expand_to(finite, z), frozen, z))


def shampine_filter(
    error: Tensor, factors: tuple[Tensor, Tensor] | None, f: Field, t1: Tensor, z: Tensor, gh_b: Tensor, krylov_dim: int
) -> tuple[Tensor, int]:
    """Shampine's filter of an error estimate, ``(I - gh J)^-1 error`` (``(B, ...)``): by the
    step's LU factors when given, else by GMRES with JVPs of ``f`` at ``z``; returns the
    filtered estimate and the drift evaluations it took."""
    if factors is not None:
        return lu_solve(factors, error), 0
    return krylov_solve(f, t1, z, gh_b, error, krylov_dim), krylov_calls(krylov_dim, z)


def krylov_calls(iters: int, z: Tensor) -> int:
    """Drift calls per sample of :func:`krylov_solve` with ``iters`` on a state like ``z``
    (``(B, *S)``): one JVP per GMRES step, and GMRES stops after ``n`` steps."""
    return min(iters, _n(z))


def krylov_solve(f: Field, t1: Tensor, z: Tensor, gh_b: Tensor, rhs: Tensor, iters: int) -> Tensor:
    """GMRES for ``(I - gh J(z)) x = rhs`` with JVPs at ``z`` (linear in ``rhs``, so
    gradients flow through ``rhs`` only: the operator itself is not differentiated)."""
    shape = z.shape
    zd = z.detach()

    def matvec(v: Tensor) -> Tensor:
        vv = v.reshape(shape)
        _, jv = torch.func.jvp(lambda x: f(t1, x), (zd,), (vv,))
        return (vv - gh_b.detach() * jv.detach()).reshape(shape[0], -1)

    return batched_gmres(matvec, rhs.reshape(shape[0], -1), iters).reshape(shape)


def _all_finite(x: Tensor) -> Tensor:
    return torch.isfinite(x.detach()).flatten(1).all(dim=1)


def mark_failed(y1: Tensor, converged: Tensor) -> Tensor:
    """NaN out the proposals of samples whose Newton iteration failed (the engine rejects them)."""
    return torch.where(expand_to(converged, y1), y1, torch.full_like(y1, float("nan")))


def resolve_options(options: NewtonOptions | None, **overrides: Any) -> NewtonOptions:
    """``options`` with the non-None ``overrides`` applied."""
    base = options if options is not None else NewtonOptions()
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return base
    fields = {**base.__dict__, **changes}
    return NewtonOptions(**fields)
