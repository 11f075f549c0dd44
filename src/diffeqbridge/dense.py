"""Dense output: ``solve(..., dense=True)`` then ``sol(t)`` / ``sol.evaluate(t)`` anywhere in the span.

Every accepted step ``[t_n, t_n + h]`` of every sample is stored as a polynomial in
``θ = (t - t_n) / h``::

    y(t_n + θ h) = y_n + θ (c_1 + θ (c_2 + ... + θ c_K))

with the coefficients of the solver's interpolant:

* ``Tsit5`` — its free 4th-order interpolant, ``y_n + h Σ_i b_i(θ) k_i`` with
  ``b_i(θ) = Σ_p r_ip θ^p`` (Tsitouras 2011; the expanded coefficients as OrdinaryDiffEq.jl's
  ``Tsit5Interp``).  K = 4.
* ``Dopri5`` — Shampine's (1986) 4th-order continuous extension in the form of Hairer's DOPRI5
  code (Hairer, Nørsett, Wanner I, Sec. II.6, p. 192; ``d_1 ... d_7``):
  ``y_n + θ(Δ + (1-θ)(B + θ(C + (1-θ) D)))`` with ``Δ = y_{n+1} - y_n``, ``B = h k_1 - Δ``,
  ``C = Δ - h k_7 - B``, ``D = h Σ d_i k_i``.  K = 4.
* ``Rodas4`` — Hairer–Wanner's 3rd-order Rosenbrock interpolant (RODAS; coefficients
  ``h_21 ... h_35`` as OrdinaryDiffEq.jl's ``Rodas4Tableau``):
  ``(1-θ) y_n + θ (y_{n+1} + (1-θ)(κ_1 + θ κ_2))`` with ``κ_j = Σ_i h_{j+1,i} k_i``.  K = 3.
* ``AutoTsit5(Rodas4())`` (``alg=None``'s default for small systems) and the other composites
  of two methods above — per sample the interpolant of the method that sample took the step
  with (``StepOutput.method``), selected with ``torch.where``; the cubic terms of a Rodas4
  step are padded with a zero 4th coefficient.  K = 4 (order 3 when Rodas4 is one of them).
* other ODE solvers that carry ``f(t, y)`` across steps (``Kvaerno5`` and the other FSAL
  methods) — the cubic Hermite interpolant on ``(y_n, f_n, y_{n+1}, f_{n+1})`` (3rd order:
  local error ``O(h^4)``).  K = 3.
* SDE solvers — linear interpolation between the accepted steps (K = 1).  Why not the
  Brownian bridge: between two accepted points the solution given its endpoints is not a
  Brownian bridge unless the diffusion is constant, the bridge would add noise the solver
  never saw, and a linear interpolant keeps ``sol(t)`` a deterministic function of the solve
  (first-passage events located on it, :mod:`diffeqbridge.events`, match it).  Query a save
  time (``saveat``) for the exact value of the path there.

Memory: while solving, ``(K + 1) · B · state_size`` numbers per loop iteration (5 state-sized
tensors per step for Tsit5/Dopri5, 2 for SDEs), plus three ``(B,)`` vectors; at the end the
accepted steps are compacted to ``(K + 1) · B · max_steps_accepted · state_size``.  Under
autograd the coefficients keep their graph (``sol(t)`` is differentiable, as the steps are):
``sensealg=None`` then backprops through the steps, and the sensealgs that solve without a graph
(checkpointed, interpolating, backsolve) are refused with ``dense=True`` when ``y0``, the parameters or the times require grad.

Evaluation: ``sol(t)`` with a float -> ``(B, *state)``; a 1-D tensor/sequence of ``T'`` times
shared by every sample -> ``(T', B, *state)``; per-sample times: ``sol.evaluate(t,
per_sample=True)`` with ``t`` of shape ``(B,)`` -> ``(B, *state)``, or any ``t`` of shape
``(T', B)`` -> ``(T', B, *state)``.  Times outside a sample's ``[t0, t_end]`` (``t_end`` its last
accepted time, or its termination time) give NaN.  The solution is right-continuous at event
times where ``affect`` changed the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from .problem import expand_to
from .solvers.base import AbstractSolver, StepOutput

__all__ = ["DenseInterpolation", "DenseRecorder", "interpolant_kind"]

# Tsit5: b_i(θ) = Σ_p r_ip θ^p, rows i = 1..7, columns p = 1..4 (OrdinaryDiffEq.jl Tsit5Interp)
_TSIT5_R = (
    (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
    (0.0, 0.13169999999999998, -0.2234, 0.1017),
    (0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253),
    (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
    (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
    (0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661),
    (0.0, 1.5, -4.0, 2.5),
)
_TSIT5_T = tuple(tuple(row[p] for row in _TSIT5_R) for p in range(4))  # (4, 7): θ^p's weights
# Dopri5: Shampine's dense-output weights d_1, d_3..d_7 (d_2 = 0), as in Hairer's DOPRI5
_DOPRI5_D = tuple(
    float(x)
    for x in (
        Fraction(-12715105075, 11282082432),
        Fraction(0),
        Fraction(87487479700, 32700410799),
        Fraction(-10690763975, 1880347072),
        Fraction(701980252875, 199316789632),
        Fraction(-1453857185, 822651844),
        Fraction(69997945, 29380423),
    )
)
# Rodas4 (RODAS4 coefficients of Hairer-Wanner; OrdinaryDiffEq.jl Rodas4Tableau h21..h35)
_RODAS4_H = (
    (10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823, 1.025137723295662),
    (-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386, -6.594389125716872),
)

#: interpolant -> (degree K, order of the interpolant)
KINDS = {"tsit5": (4, 4), "dopri5": (4, 4), "rodas4": (3, 3), "hermite": (3, 3), "linear": (1, 1)}
#: the stages ``StepOutput.stages`` of each solver's own interpolant reads (``k_1 ... k_S``)
OWN_STAGES = {"tsit5": 7, "dopri5": 7, "rodas4": 5}


def _kind_info(kind: str) -> tuple[int, int]:
    """``(degree K, order)`` of an interpolant, a composite ``"a|b"`` included."""
    if "|" in kind:
        (ka, oa), (kb, ob) = (KINDS[part] for part in kind.split("|"))
        return max(ka, kb), min(oa, ob)
    return KINDS[kind]


def interpolant_kind(solver: AbstractSolver) -> str:
    """Which interpolant ``solve(..., dense=True)`` uses for ``solver`` (see the module docstring)."""
    from .solvers import AutoSwitch, Dopri5, Rodas4, Tsit5

    if solver.is_sde:
        return "linear"
    if isinstance(solver, AutoSwitch):
        parts = interpolant_kind(solver.nonstiff), interpolant_kind(solver.stiff)
        if all(part in OWN_STAGES for part in parts):
            return "|".join(parts)  # per sample, the method's own interpolant
    if type(solver) is Tsit5:
        return "tsit5"
    if type(solver) is Dopri5:
        return "dopri5"
    if type(solver) is Rodas4:
        return "rodas4"
    if solver.fsal:
        return "hermite"
    return "linear"


def _combine(weights: Sequence[Sequence[float]], ks: Sequence[Tensor]) -> list[Tensor]:
    """``[Σ_i w[j][i] k_i for each row j]``, as one contraction over the stacked stages."""
    stacked = torch.stack(list(ks[: len(weights[0])]))  # (S, B, *state)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)  # (J, S)
    return list(torch.tensordot(w, stacked, dims=1).unbind(0))


def step_coefficients(kind: str, y0: Tensor, y1: Tensor, h: Tensor, out: StepOutput, f0: Tensor | None) -> list[Tensor]:
    """``[c_1, ..., c_K]`` of one step (each ``y0``'s shape); ``h`` is ``(B,)``.

    A composite kind ``"a|b"``: ``out.stages`` holds ``a``'s :data:`OWN_STAGES` stages then
    ``b``'s, ``out.method`` ``(B,)`` is True where the sample took ``b``'s step; each
    sample gets its own method's coefficients (the other method's, possibly non-finite on a
    stiff sample, are discarded by ``torch.where``)."""
    if "|" in kind:
        first, second = kind.split("|")
        assert out.stages is not None and out.method is not None
        n = OWN_STAGES[first]
        ca = step_coefficients(first, y0, y1, h, StepOutput(y1, None, 0, 0, stages=out.stages[:n]), f0)
        cb = step_coefficients(second, y0, y1, h, StepOutput(y1, None, 0, 0, stages=out.stages[n:]), f0)
        zero = torch.zeros_like(y0)
        ca += [zero] * (len(cb) - len(ca))
        cb += [zero] * (len(ca) - len(cb))
        use_b = expand_to(out.method, y0)
        return [torch.where(use_b, q, p) for p, q in zip(ca, cb)]
    hb = expand_to(h, y0).to(y0.dtype)
    delta = y1 - y0
    if kind == "tsit5":
        assert out.stages is not None
        return [hb * c for c in _combine(_TSIT5_T, out.stages)]
    if kind == "dopri5":
        assert out.stages is not None
        ks = out.stages
        b = hb * ks[0] - delta
        c = delta - hb * ks[-1] - b
        d = hb * _combine([_DOPRI5_D], ks)[0]
        # y0 + θ(Δ + (1-θ)(B + θ(C + (1-θ)D))) expanded in powers of θ
        return [delta + b, c + d - b, -c - 2.0 * d, d]
    if kind == "rodas4":
        assert out.stages is not None
        k1, k2 = _combine(_RODAS4_H, out.stages)
        # (1-θ) y0 + θ(y1 + (1-θ)(k1 + θ k2)) expanded
        return [delta + k1, k2 - k1, -k2]
    if kind == "hermite":
        assert f0 is not None and out.f1 is not None
        hf0, hf1 = hb * f0, hb * out.f1
        return [hf0, 3.0 * delta - 2.0 * hf0 - hf1, hf0 + hf1 - 2.0 * delta]
    return [delta]


def horner(y0: Tensor, coeffs: Sequence[Tensor], theta: Tensor) -> Tensor:
    """``y0 + θ(c_1 + θ(c_2 + ...))`` with ``θ`` broadcast over the state axes."""
    th = theta.reshape(theta.shape + (1,) * (y0.ndim - theta.ndim)).to(y0.dtype)
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = c + th * acc
    return y0 + th * acc


class DenseRecorder:
    """Engine observer for ``dense=True``: keeps every iteration's step polynomial with the
    ``(B,)`` accepted mask, compacts them in :meth:`finish`.  No host synchronisation."""

    def __init__(self, solver: AbstractSolver, y0: Tensor, t0: float, t1: float | None = None):
        self.direction = -1.0 if t1 is not None and t1 < t0 else 1.0
        self.kind = interpolant_kind(solver)
        self.degree, self.order = _kind_info(self.kind)
        self.t0 = t0
        self.y0 = y0
        self.records: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (start, h, accepted, (K+1, B, *state))
        self.end = torch.full((y0.shape[0],), t0, dtype=torch.float64, device=y0.device)
        self.recording = True

    def record(
        self,
        t: Tensor,
        y: Tensor,
        h: Tensor,
        out: StepOutput,
        f0: Tensor | None,
        accepted: Tensor,
        y1: Tensor | None = None,
        h_used: Tensor | None = None,
    ) -> None:
        """One step from ``(t, y)`` of size ``h`` (``(B,)``); ``h_used`` (``(B,)``, default ``h``)
        shortens the part of the step that is kept (an event cut it)."""
        y_end = out.y1 if y1 is None else y1
        coeffs = step_coefficients(self.kind, y, y_end, h, out, f0)
        self.records.append((t, h, accepted, torch.stack([y, *coeffs])))
        reach = t + (h if h_used is None else h_used)
        self.end = torch.where(accepted, reach, self.end)

    def observe(
        self,
        t: Tensor,
        y: Tensor,
        t_new: Tensor,
        step_dt: Tensor,
        out: StepOutput,
        active: Tensor,
        accepted: Tensor,
        dt_next: Tensor,
        f0: Tensor | None,
    ) -> None:
        if not self.recording:  # finished: an adjoint's backward recomputation adds nothing
            return
        # the engine passes |dt|; the solver stepped by -|dt| when time runs backwards
        self.record(t, y, step_dt * self.direction, out, f0, accepted)

    def finish(self) -> DenseInterpolation:
        self.recording = False
        batch, device = self.y0.shape[0], self.y0.device
        if not self.records:
            starts = torch.full((batch, 1), self.t0, dtype=torch.float64, device=device)
            coeffs = torch.stack([self.y0] + [torch.zeros_like(self.y0)] * self.degree).unsqueeze(2)
            return DenseInterpolation(
                starts, torch.ones_like(starts), coeffs, self.end.clone(), self.kind, self.order, self.direction
            )
        starts = torch.stack([r[0] for r in self.records], dim=1)  # (B, I)
        hs = torch.stack([r[1] for r in self.records], dim=1)
        accepted = torch.stack([r[2] for r in self.records], dim=1)
        coeffs = torch.stack([r[3] for r in self.records], dim=2)  # (K+1, B, I, *state)
        self.records = []
        # compact: the accepted steps of each sample first, in order (stable sort on ~accepted)
        order = torch.sort((~accepted).to(torch.int8), dim=1, stable=True).indices
        n_keep = max(int(accepted.sum(dim=1).max()), 1)
        order = order[:, :n_keep]
        kept = torch.gather(accepted, 1, order)
        pad = float("inf") * self.direction  # past the last step in the time direction
        starts = torch.where(kept, torch.gather(starts, 1, order), torch.full_like(starts[:, :n_keep], pad))
        hs = torch.where(kept, torch.gather(hs, 1, order), torch.ones_like(hs[:, :n_keep]))
        index = order.reshape(1, *order.shape, *([1] * (coeffs.ndim - 3))).expand(coeffs.shape[0], -1, -1, *coeffs.shape[3:])
        coeffs = torch.gather(coeffs, 2, index)
        return DenseInterpolation(starts, hs, coeffs, self.end.clone(), self.kind, self.order, self.direction)


class DenseInterpolation:
    """``sol.interpolation``: the step polynomials of every sample (see the module docstring).

    Attributes:
        starts, h: ``(B, M)`` start times and sizes of each sample's accepted steps
            (``+inf`` padding past a sample's last step).
        coeffs: ``(K + 1, B, M, *state)``: ``y_n, c_1, ..., c_K``.
        t0, t_end: the span; ``t_end`` is ``(B,)``.
        kind, order: the interpolant and its order.
    """

    def __init__(self, starts: Tensor, h: Tensor, coeffs: Tensor, t_end: Tensor, kind: str, order: int, direction: float = 1.0):
        self.starts, self.h, self.coeffs, self.t_end = starts, h, coeffs, t_end
        self.kind, self.order, self.direction = kind, order, direction
        self.t0 = starts[:, :1]

    @property
    def batch_size(self) -> int:
        return self.starts.shape[0]

    def _query(self, q: Tensor) -> Tensor:
        """``q``: ``(B, T')`` float64 -> ``(B, T', *state)``."""
        m = self.starts.shape[1]
        d = self.direction  # backwards in time: search the negated (ascending) times
        idx = (torch.searchsorted((d * self.starts).contiguous(), (d * q).contiguous(), right=True) - 1).clamp(0, m - 1)
        start = torch.gather(self.starts, 1, idx)
        h = torch.gather(self.h, 1, idx)
        theta = (q - start) / h
        state = self.coeffs.shape[3:]
        gather_idx = idx.reshape(1, *idx.shape, *([1] * len(state))).expand(self.coeffs.shape[0], -1, -1, *state)
        c = torch.gather(self.coeffs, 2, gather_idx)  # (K+1, B, T', *state)
        y = horner(c[0], list(c[1:]), theta)
        end = self.t_end.unsqueeze(1)
        inside = (d * q >= d * self.t0 - 1e-12 * (1 + self.t0.abs())) & (d * q <= d * end + 1e-12 * (1 + end.abs()))
        return torch.where(inside.reshape(inside.shape + (1,) * len(state)), y, torch.full_like(y, float("nan")))

    def evaluate(self, t: Any, per_sample: bool = False) -> Tensor:
        """See the module docstring for the shapes."""
        batch = self.batch_size
        device = self.starts.device
        tt = torch.as_tensor(t, dtype=torch.float64, device=device)
        if tt.ndim == 0:
            return self._query(tt.expand(batch, 1))[:, 0]
        if tt.ndim == 1 and per_sample:
            if tt.shape[0] != batch:
                raise ValueError(f"per-sample times must have shape ({batch},); got {tuple(tt.shape)}")
            return self._query(tt.unsqueeze(1))[:, 0]
        if tt.ndim == 1:
            return self._query(tt.unsqueeze(0).expand(batch, -1)).transpose(0, 1)
        if tt.ndim == 2 and tt.shape[1] == batch:
            return self._query(tt.T).transpose(0, 1)
        raise ValueError(
            f"t must be a float, (T',) shared times, (B,) with per_sample=True or (T', B); "
            f"got shape {tuple(tt.shape)} for B={batch}"
        )
