"""Regularizing the solver's own heuristics (``solve(..., regularize=...)``).

Training a neural SDE/ODE with an extra loss term built from the adaptive solver's own
error and stiffness estimates makes the trained model cheaper to solve:

* Pal, Ma, Shah, Rackauckas, "Opening the Blackbox: Accelerating Neural Differential
  Equations by Regularizing Internal Solver Heuristics", ICML 2021 ("global": every
  accepted step of the solve contributes, differentiated through the solve);
* Pal, Edelman, Rackauckas, "Locally Regularized Neural Differential Equations: Some Black
  Boxes Were Meant to Remain Closed!", ICML 2023 ("local": one random time per sample,
  one differentiable solver step from the solved state there).

``deb.solve(prob, alg, regularize=...)`` returns ``sol.regularization``, a differentiable
``(B,)`` tensor (one value per sample); add ``weight * sol.regularization.mean()`` to the loss.

======================  =====================================================================
kind                    ``sol.regularization[b]``
======================  =====================================================================
``"error"``             ``Σ_j EEst_j · dt_j`` over sample ``b``'s accepted steps (2021)
``"stiffness"``         ``max_j`` (or ``mean_j``) ``λ_j / S`` over accepted steps (2021)
``"local_error"``       ``EEst · dt`` of one step from ``(t1, y(t1))`` (2023)
``"local_stiffness"``   ``λ / S`` of one step from ``(t1, y(t1))`` (2023)
======================  =====================================================================

``EEst`` is the engine's per-sample scaled error norm of the step (RMS of
``error / (atol + rtol max(|y0|, |y1|))``, the number the controller accepts when ``<= 1``),
computed with the autograd graph on; the step sizes ``dt`` and the controller carry no
gradient.  ``λ`` is the eigenvalue estimate :func:`eigen_estimate` between the step's
solution ``y1`` and its embedded solution ``ŷ = y1 - error``, and ``S`` the solver's
real-axis stability-region size (:func:`stability_size`).

Global kinds differentiate through every step: they need ``sensealg=None`` /
``deb.DiscreteAdjoint()`` (no checkpoints).  Local kinds are a separate differentiable
computation after the solve and work with every sensealg.  Sampling of ``t1``:

* ``"unbiased"``: ``t1 ~ U(t0, t_end)`` per sample; ``y(t1)`` is the solve's own
  interpolant on the accepted step that contains ``t1`` (cubic Hermite from the FSAL
  derivatives for ODE solvers, linear for SDEs as StochasticDiffEq's ``sol(t)``), and the
  step size is the one the controller proposed after that step (clipped at ``t_end``).
  SDE steps use the same Brownian path, queried from the tree at ``(t1, t1 + dt)``.
* ``"biased"``: ``t1`` is one of the sample's accepted step times, drawn uniformly
  (reservoir sampling during the forward: nothing per step is stored), and the step is the
  one the solve took from there: same state, same ``dt``, same noise, so the term equals the
  forward's ``EEst · dt`` of that step.

Cost of a local kind: exactly one extra solver step per sample (plus the extra drift
evaluations of the stiffness estimate), reported in ``sol.stats.extra``:
``"nsteps_regularization"``, ``"nf_regularization"``, ``"ng_regularization"``;
``sol.stats.nf``/``ng`` count the solve only.  Global stiffness evaluates the drift once
(FSAL solvers) or twice more per step, also counted in ``"nf_regularization"``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .brownian import VirtualBrownianTree
from .problem import ODEProblem, Terms, expand_to
from .solvers.base import AbstractSolver

__all__ = ["Regularization", "eigen_estimate", "real_stability_interval", "stability_size"]

KINDS = ("error", "stiffness", "local_error", "local_stiffness")
SAMPLINGS = ("unbiased", "biased")

# eigen_estimate: ||y_a - y_b|| must exceed this many ulps of the state to be a difference
_RESOLUTION = 64.0


class Regularization:
    """What ``solve(..., regularize=...)`` adds to the solution (see the module docstring).

    Args:
        kind: ``"error"`` | ``"stiffness"`` | ``"local_error"`` | ``"local_stiffness"``.
        aggregate: global stiffness over steps, ``"max"`` (default) or ``"mean"``; the
            global error is always the sum ``Σ EEst_j dt_j`` (``"sum"``, the default).
        sampling: local kinds: ``"unbiased"`` (default) or ``"biased"``.
        seed: seed of this object's own random stream for ``t1`` (default 0).  The stream
            advances at every solve, so successive training iterations draw new times; the
            global torch RNG is never touched.

    A plain string ``regularize="local_error"`` means ``Regularization("local_error")``.
    """

    def __init__(self, kind: str = "error", aggregate: str | None = None, sampling: str = "unbiased", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"Regularization(kind=...) must be one of {KINDS}; got {kind!r}")
        allowed = ("sum",) if kind == "error" else ("max", "mean")
        if kind.startswith("local"):
            allowed = (None,)  # one step per sample: nothing to aggregate
        if aggregate is not None and aggregate not in allowed:
            raise ValueError(
                f"Regularization(aggregate=...) for kind={kind!r} must be one of "
                f"{[a for a in allowed if a]} or None; got {aggregate!r}"
            )
        if sampling not in SAMPLINGS:
            raise ValueError(f"Regularization(sampling=...) must be one of {SAMPLINGS}; got {sampling!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Regularization(seed=...) must be a non-negative int; got {seed!r}")
        self.kind = kind
        self.aggregate = aggregate if aggregate is not None else {"error": "sum", "stiffness": "max"}.get(kind)
        self.sampling = sampling
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    @property
    def is_local(self) -> bool:
        return self.kind.startswith("local")

    @property
    def uses_stiffness(self) -> bool:
        return self.kind.endswith("stiffness")

    def generator(self, device: torch.device) -> torch.Generator:
        """This object's random stream on ``device`` (created on first use from ``seed``)."""
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def __repr__(self) -> str:
        extra = f", sampling={self.sampling!r}" if self.is_local else f", aggregate={self.aggregate!r}"
        return f"Regularization({self.kind!r}{extra}, seed={self.seed})"


def as_regularization(regularize: Any, seed: int = 0) -> Regularization | None:
    """``None``, a :class:`Regularization`, or a kind string (-> ``Regularization(kind, seed=seed)``)."""
    if regularize is None or isinstance(regularize, Regularization):
        return regularize
    if isinstance(regularize, str):
        if regularize not in KINDS:
            raise ValueError(f"regularize must be None, one of {KINDS} or a deb.Regularization; got {regularize!r}")
        return Regularization(regularize, seed=seed)
    raise TypeError(f"regularize must be None, a string {KINDS} or a deb.Regularization; got {type(regularize).__name__}")


def check_regularize(
    regularize: Any, prob: ODEProblem, solver: AbstractSolver, adaptive: bool, sensealg: Any, seed: int = 0
) -> Regularization | None:
    """Validate ``solve(..., regularize=...)`` before any integration starts.

    A string gets a fresh ``Regularization`` whose stream is seeded with the solve's ``seed``
    (so local times change with it); pass one ``deb.Regularization`` object to a training loop
    to draw new times at every call whatever the seed.
    """
    regularize = as_regularization(regularize, seed)
    if regularize is None:
        return None
    name = type(solver).__name__
    if not solver.adaptive or not adaptive:
        raise ValueError(
            f"regularize={regularize.kind!r} regularizes an adaptive solver's error/stiffness estimates; "
            f"alg={name} with adaptive={adaptive} has none. Use an adaptive solver (SOSRI, SOSRA, SRA1, LambaEM, "
            f"Tsit5, Dopri5) with adaptive=True"
        )
    if regularize.uses_stiffness:
        stability_size(solver)  # raises for solvers whose stability region is unknown
    if not regularize.is_local and sensealg is not None:
        from .adjoint import DiscreteAdjoint

        if not (isinstance(sensealg, DiscreteAdjoint) and sensealg.checkpoints is None):
            raise ValueError(
                f"regularize={regularize.kind!r} (global) is differentiated through every step of the solve and "
                f"needs sensealg=None or deb.DiscreteAdjoint() without checkpoints; got sensealg={sensealg!r}. "
                f"Use the local variant regularize='local_{regularize.kind}', which works with every sensealg"
            )
    return regularize


# ----------------------------------------------------------------- pure helpers
def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` with a zero (not NaN) gradient at 0."""
    return torch.sqrt(x.clamp_min(torch.finfo(x.dtype).tiny))


def error_estimate(error: Tensor, y0: Tensor, y1: Tensor, atol: float | Tensor, rtol: float | Tensor) -> Tensor:
    """The engine's scaled error norm ``EEst`` (``(B, ...) -> (B,)``), differentiable everywhere."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return _safe_sqrt((error / scale).square().flatten(1).mean(dim=1))


def eigen_estimate(f_a: Tensor, f_b: Tensor, y_a: Tensor, y_b: Tensor) -> Tensor:
    """Per-sample estimate of the Jacobian's spectral radius from two nearby points.

    ``|λ| ≈ ||f(t, y_a) - f(t, y_b)|| / ||y_a - y_b||`` (Euclidean norms over the state),
    the estimate of Hairer & Wanner (Solving ODEs II, Sec. IV.2, "automatic stiffness
    detection") that OrdinaryDiffEq computes from the last two stages of Tsit5/DP5.
    Shapes ``(B, *state_shape) -> (B,)``.  0 where ``||y_a - y_b||`` is not resolvable in
    the dtype (``<= 64 eps max(||y_a||, ||y_b||)``): there the quotient is rounding noise
    over rounding noise (in float32 at tight tolerances the embedded solution often equals
    the solution bit for bit while ``f(y1)`` from the step and a fresh ``f(ŷ)`` still differ
    by rounding, which gave estimates of ``1e11``).
    """
    num = _safe_sqrt((f_a - f_b).square().flatten(1).sum(dim=1))
    diff = (y_a - y_b).square().flatten(1).sum(dim=1)
    size = torch.maximum(y_a.square().flatten(1).sum(dim=1), y_b.square().flatten(1).sum(dim=1))
    info = torch.finfo(diff.dtype)
    resolved = (diff > (_RESOLUTION * info.eps) ** 2 * size) & (diff > info.tiny)
    den = torch.sqrt(torch.where(resolved, diff, torch.ones_like(diff)))  # no 1/0 in either branch's gradient
    return torch.where(resolved, num / den, torch.zeros_like(num))


def real_stability_interval(a: Any, b: Any, x_max: float = 50.0) -> float:
    """Length ``r`` of the stability interval ``[-r, 0]`` of the explicit RK ``(a, b)``.

    ``R(z) = 1 + z bᵀ (I - z A)⁻¹ 1``; the first ``x > 0`` with ``|R(-x)| > 1`` (scan, then
    bisection to ``1e-10``).
    """
    A = np.array([list(row) + [0.0] * (len(b) - len(row)) for row in a], dtype=float)
    bb = np.array(b, dtype=float)
    one = np.ones(len(bb))
    eye = np.eye(len(bb))

    def amp(x: float) -> float:
        z = -x
        return abs(1.0 + z * bb @ np.linalg.solve(eye - z * A, one))

    step, x = 1e-3, 1e-3
    while x < x_max and amp(x) <= 1.0 + 1e-12:
        x += step
    lo, hi = x - step, x
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if amp(mid) <= 1.0 + 1e-12 else (lo, mid)
    return lo


@functools.cache
def _tableau_stability(cls: type) -> float | None:
    tab = getattr(cls, "tableau", None)
    if tab is None:
        if cls.__name__ in ("LambaEM", "LambaEulerHeun"):
            # drift part: explicit Euler (|1 + z| <= 1) / Heun (|1 + z + z²/2| <= 1), both 2
            return 2.0
        return None
    if hasattr(tab, "alpha") and hasattr(tab, "a0"):  # SRI/SRA: the deterministic drift tableau
        n = getattr(tab, "n_drift", len(tab.alpha))
        a = [row[:n] for row in tab.a0[:n]]
        return real_stability_interval([r[:i] for i, r in enumerate(a)], tab.alpha[:n])
    if hasattr(tab, "b") and hasattr(tab, "a"):
        return real_stability_interval(tab.a, tab.b)
    return None


def stability_size(solver: AbstractSolver) -> float:
    """The solver's stability-region size ``S`` used to normalise stiffness estimates.

    The solver class's ``stability_size`` (e.g. Tsit5 3.5068, DP5 3.3066 as OrdinaryDiffEq's
    ``alg_stability_size``; SRIW1, SOSRI measured); else the real-axis stability interval of
    the solver's (drift) tableau, computed by :func:`real_stability_interval`.
    """
    declared = getattr(solver, "stability_size", None)
    if isinstance(declared, (int, float)) and declared > 0:
        return float(declared)
    name = type(solver).__name__
    size = _tableau_stability(type(solver))
    if size is None:
        raise ValueError(
            f"regularize=...stiffness: the stability region of alg={name} is unknown; "
            f"use an error kind ('error', 'local_error') or Tsit5/Dopri5/SOSRI/SOSRA/LambaEM"
        )
    return size


def _hermite(t0: Tensor, t1: Tensor, y0: Tensor, y1: Tensor, f0: Tensor, f1: Tensor, t: Tensor) -> Tensor:
    """Cubic Hermite interpolant on ``[t0, t1]`` at ``t`` (all per sample)."""
    h = (t1 - t0).to(y0.dtype)
    s = ((t - t0) / (t1 - t0)).to(y0.dtype)
    h, s = expand_to(h, y0), expand_to(s, y0)
    h00 = (1 + 2 * s) * (1 - s) ** 2
    h10 = s * (1 - s) ** 2
    h01 = s * s * (3 - 2 * s)
    h11 = s * s * (s - 1)
    return h00 * y0 + h10 * h * f0 + h01 * y1 + h11 * h * f1


def _where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


# ---------------------------------------------------------------- the recorder
class Recorder:
    """Engine hook for one solve: accumulates the global term, or records what the local
    step needs.  The engine calls :meth:`observe` once per loop iteration (after the
    controller); nothing here synchronises with the host."""

    def __init__(
        self,
        config: Regularization,
        terms: Terms,
        solver: AbstractSolver,
        y0: Tensor,
        t0: float,
        t_end: float,
        atol: float | Tensor,
        rtol: float | Tensor,
    ):
        self.config, self.terms, self.solver = config, terms, solver
        self.atol, self.rtol = atol, rtol
        self.t0, self.t_end = t0, t_end
        self.recording = True
        batch, device = y0.shape[0], y0.device
        self.size = stability_size(solver) if config.uses_stiffness else 1.0
        zeros = torch.zeros(batch, dtype=y0.dtype, device=device)
        self.total = zeros.clone()
        self.peak = torch.full_like(zeros, -math.inf)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.nf = torch.zeros(batch, dtype=torch.long, device=device)
        self.ng = torch.zeros(batch, dtype=torch.long, device=device)
        if config.is_local:
            gen = config.generator(device)
            self.gen = gen
            u = torch.rand(batch, dtype=torch.float64, device=device, generator=gen)
            self.t1 = t0 + (t_end - t0) * u.clamp(1e-9, 1 - 1e-9)  # (t0, t_end)
            self.found = torch.zeros(batch, dtype=torch.bool, device=device)
            self.ta = torch.full((batch,), t0, dtype=torch.float64, device=device)
            self.tb = self.ta.clone()
            self.dt = torch.full((batch,), t_end - t0, dtype=torch.float64, device=device)
            y0d = y0.detach()
            self.ya, self.yb = y0d.clone(), y0d.clone()
            self.fa: Tensor | None = None
            self.fb: Tensor | None = None

    # -- called by the engine
    def observe(
        self,
        t: Tensor,
        y: Tensor,
        t_new: Tensor,
        step_dt: Tensor,
        out: Any,
        active: Tensor,
        accepted: Tensor,
        dt_next: Tensor,
        f0: Tensor | None,
    ) -> None:
        """One engine iteration: ``t, y`` before the step, ``t_new`` its end, ``out`` the
        :class:`StepOutput`, ``active``/``accepted`` ``(B,)`` masks, ``dt_next`` the
        controller's next step, ``f0`` the FSAL derivative at ``(t, y)`` (or None)."""
        if not self.recording:
            return
        if self.config.is_local:
            self._observe_local(t, y, t_new, step_dt, out, accepted, dt_next, f0)
            return
        self.count = self.count + accepted
        if self.config.kind == "error":
            eest = error_estimate(out.error, y, out.y1, self.atol, self.rtol)
            value = eest * step_dt.to(eest.dtype)
        else:
            value, extra = self._stiffness(t_new, out)
            self.nf = self.nf + active * extra
        value = torch.where(accepted & torch.isfinite(value), value, torch.zeros_like(value))
        self.total = self.total + value
        if self.config.aggregate == "max":
            self.peak = torch.where(accepted, torch.maximum(self.peak, value), self.peak)

    def _stiffness(self, t_new: Tensor, out: Any) -> tuple[Tensor, int]:
        drift = self.terms.drift
        y1 = out.y1
        y_hat = y1 - out.error
        extra = 1
        f1 = out.f1
        if f1 is None:
            f1 = drift(t_new, y1)
            extra += 1
        lam = eigen_estimate(f1, drift(t_new, y_hat), y1, y_hat)
        return lam / self.size, extra

    def _observe_local(
        self, t: Tensor, y: Tensor, t_new: Tensor, step_dt: Tensor, out: Any, accepted: Tensor, dt_next: Tensor, f0: Tensor | None
    ) -> None:
        y, y1 = y.detach(), out.y1.detach()
        if self.config.sampling == "unbiased":
            take = accepted & ~self.found & (t < self.t1) & (self.t1 <= t_new)
            self.found = self.found | take
            self.dt = torch.where(take, dt_next, self.dt)
        else:  # reservoir sampling of one accepted step, uniform over the sample's steps
            self.count = self.count + accepted
            r = torch.rand(self.count.shape, dtype=torch.float64, device=self.count.device, generator=self.gen)
            take = accepted & (r * self.count.clamp(min=1) < 1.0)
            self.found = self.found | take
            self.dt = torch.where(take, step_dt, self.dt)
        self.ta = torch.where(take, t, self.ta)
        self.tb = torch.where(take, t_new, self.tb)
        self.ya = _where(take, y, self.ya)
        self.yb = _where(take, y1, self.yb)
        if self.config.sampling == "unbiased" and f0 is not None and out.f1 is not None:
            fa, fb = f0.detach(), out.f1.detach()
            self.fa = _where(take, fa, self.fa if self.fa is not None else torch.zeros_like(fa))
            self.fb = _where(take, fb, self.fb if self.fb is not None else torch.zeros_like(fb))

    # -- after the solve
    def finish(self, tree: VirtualBrownianTree | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(regularization (B,), extra stats)``; stops recording (backward recomputations
        of checkpointed/interpolating sensealgs re-run the engine and must not count)."""
        self.recording = False
        if not self.config.is_local:
            value = self.total
            if self.config.kind == "stiffness":
                if self.config.aggregate == "max":
                    value = torch.where(self.count > 0, self.peak, torch.zeros_like(self.peak))
                else:
                    value = self.total / self.count.clamp(min=1).to(self.total.dtype)
            return value, {"nf_regularization": self.nf}
        return self._local_step(tree)

    def _local_step(self, tree: VirtualBrownianTree | None) -> tuple[Tensor, dict[str, Tensor]]:
        found = self.found
        if self.config.sampling == "unbiased":
            t1 = torch.where(found, self.t1, self.ta)
            if self.fa is not None and self.fb is not None:
                y1 = _hermite(self.ta, self.tb, self.ya, self.yb, self.fa, self.fb, t1)
            else:
                s = ((t1 - self.ta) / (self.tb - self.ta).clamp_min(1e-300)).to(self.ya.dtype)
                y1 = self.ya + expand_to(s, self.ya) * (self.yb - self.ya)
            y1 = _where(found, y1, self.ya)
            dt = torch.minimum(self.dt, self.t_end - t1)
        else:
            t1, y1, dt = self.ta, self.ya, self.dt
        # samples that failed before t1 (never recorded): a harmless step, masked out below
        dt = torch.where(found & (dt > 0), dt, torch.full_like(dt, 1e-3 * (self.t_end - self.t0)))
        t1 = torch.where(found, t1, torch.full_like(t1, self.t0))
        y1 = y1.detach()
        dtype = y1.dtype
        if tree is not None:
            dw, levy = tree(t1, t1 + dt)
            dw, levy = dw.to(dtype), levy.to(dtype)
        else:
            dw, levy = None, None
        solver = self.solver
        out = solver.step(self.terms, t1.to(dtype), y1, dt.to(dtype), dw, levy if solver.needs_levy_area else None, None)
        nf = out.nf
        if self.config.kind == "local_error":
            value = error_estimate(out.error, y1, out.y1, self.atol, self.rtol) * dt.to(dtype)
        else:
            value, extra = self._stiffness(t1 + dt, out)
            nf += extra
        value = torch.where(found & torch.isfinite(value), value, torch.zeros_like(value))
        ones = found.long()
        extras = {"nsteps_regularization": ones, "nf_regularization": ones * nf, "ng_regularization": ones * out.ng}
        return value, extras
