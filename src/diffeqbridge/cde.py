"""``NeuralCDE``: ``dz = f_θ(t, z) dX(t)`` driven by an interpolated control path.

Kidger, Morrill, Foster, Lyons, "Neural Controlled Differential Equations for Irregular
Time Series" (NeurIPS 2020): with a differentiable control ``X`` (see
:mod:`diffeqbridge.interpolation`), the CDE is the ODE ``dz/dt = f(t, z) · dX/dt`` and is
solved as one on the engine: every sample takes its own steps (its own path, its own
observation grid), and every ODE sensealg differentiates it.

Shapes: ``func(t, z)`` (or ``func(z)``) maps ``t (B,)``, ``z (B, H)`` to ``(B, H, C)``; the
control has ``C`` channels; ``z0 (B, H)``; the output ``(T, B, H)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._leaves import through_leaves
from .interpolation import CubicSpline, Interpolation, LinearInterpolation
from .neural import _caller
from .problem import ODEProblem
from .solve import solve

__all__ = ["NeuralCDE"]

_KINDS = {"linear": LinearInterpolation, "rectilinear": LinearInterpolation, "cubic": CubicSpline}


class NeuralCDE(nn.Module):
    """``dz = func(t, z) dX(t)`` as an ``nn.Module``.

    Args:
        func: ``nn.Module``, ``(t, z) -> (B, H, C)`` (or ``z -> ...``).
        interpolation: how a coefficient tensor passed to ``forward`` is read: ``"cubic"``
            (``[a, b, 2c, 3d]``: Hermite with backward differences or natural), ``"linear"`` or
            ``"rectilinear"``.
        alg, sensealg, **solve_kwargs: passed to :func:`diffeqbridge.solve` (default ``Tsit5``,
            ``atol=1e-6``, ``rtol=1e-3``).

    ``forward(control, z0, ts=None, t=None) -> zs (T, B, H)``: ``control`` is an
    :class:`~diffeqbridge.interpolation.Interpolation` or its coefficients (on the grid
    ``t``, default ``0..L-1``); ``ts`` the output times (default: the control's interval).
    Coefficients that require grad get their gradient under every sensealg.
    ``self.stats`` holds the solve's per-sample statistics.
    """

    def __init__(self, func: nn.Module, interpolation: str = "cubic", alg: Any = None, sensealg: Any = None, **solve_kwargs: Any):
        super().__init__()
        if interpolation not in _KINDS:
            raise ValueError(f"interpolation must be one of {sorted(_KINDS)}; got {interpolation!r}")
        for key in ("saveat", "sensealg", "alg"):
            if key in solve_kwargs:
                raise TypeError(f"NeuralCDE: pass {key} to forward()/the constructor argument, not in **solve_kwargs")
        self.func = func
        self._func = _caller(func, "func")
        self.interpolation, self.alg, self.sensealg, self.solve_kwargs = interpolation, alg, sensealg, solve_kwargs
        self.stats: Any = None

    def _control(self, control: Interpolation | Tensor, t: Tensor | None) -> Interpolation:
        if isinstance(control, Interpolation):
            if t is not None:
                raise ValueError("t is read from the Interpolation; pass it only with raw coefficients")
            return control
        if isinstance(control, Tensor):
            return _KINDS[self.interpolation](control, t)
        raise TypeError(
            f"control must be a deb.interpolation.Interpolation or a coefficient tensor; got {type(control).__name__}"
        )

    def vector_field(self, X: Interpolation) -> Any:
        """``(t, z) -> func(t, z) @ X'(t)``: ``(B, H)``."""

        def field(t: Tensor, z: Tensor) -> Tensor:
            out = self._func(t, z)
            if out.ndim != 3 or out.shape[:2] != z.shape or out.shape[2] != X.coeffs.shape[-1] // self._width(X):
                raise ValueError(
                    f"func(t, z) must return (B, H, C) = {(*z.shape, X.coeffs.shape[-1] // self._width(X))}; "
                    f"got {tuple(out.shape)}"
                )
            return torch.einsum("bhc,bc->bh", out, X.derivative(t).reshape(z.shape[0], -1))

        return field

    @staticmethod
    def _width(X: Interpolation) -> int:
        return 4 if isinstance(X, CubicSpline) else 1

    def forward(
        self, control: Interpolation | Tensor, z0: Tensor, ts: Sequence[float] | Tensor | None = None, t: Tensor | None = None
    ) -> Tensor:
        X = self._control(control, t)
        if not isinstance(z0, Tensor) or z0.ndim != 2 or z0.shape[0] != X.batch_size:
            raise ValueError(
                f"z0 must have shape (B, H) with B = {X.batch_size} (the control's batch); "
                f"got {getattr(z0, 'shape', type(z0).__name__)}"
            )
        times = (
            torch.tensor(X.interval, dtype=torch.float64)
            if ts is None
            else torch.as_tensor(ts, dtype=torch.float64).detach().flatten()
        )
        if times.numel() < 2:
            raise ValueError("NeuralCDE.forward: ts needs at least two times")
        tspan = (float(times[0]), float(times[-1]))
        params = list(self.parameters())

        def run(z0_: Tensor, coeffs: Tensor) -> tuple[Tensor, ...]:
            path = X if coeffs is X.coeffs else X.with_coeffs(coeffs)
            extra = [coeffs] if coeffs.requires_grad else []
            prob = ODEProblem(self.vector_field(path), z0_, tspan, params=params + extra)
            kwargs = dict(self.solve_kwargs)
            tstops = _knots_inside(X, tspan) + [float(x) for x in kwargs.pop("tstops", None) or []]
            sol = solve(prob, self.alg, saveat=times, tstops=tstops or None, sensealg=self.sensealg, **kwargs)
            self.stats = sol.stats
            return (sol.ys,)

        if X.coeffs.requires_grad and torch.is_grad_enabled():
            # coefficients computed by a network: the solve sees a leaf copy (listed in params)
            (zs,) = through_leaves(run, [z0, X.coeffs], params)
        else:
            (zs,) = run(z0, X.coeffs)
        return zs


def _knots_inside(X: Interpolation, tspan: tuple[float, float]) -> list[float]:
    """The control's knots strictly inside ``tspan`` (all samples' grids): the path's derivative
    jumps there, so steps land on them rather than crossing them.

    A linear control's slope itself jumps at a knot, where ``X'`` is the left piece's (torchcde).
    One evaluation there serves both the step ending at the knot (its last, FSAL stage) and,
    reused, the next step's first stage, which needs the slope ahead.  A second stop a few ulps
    right of each knot gives each side its own evaluation, in either direction of integration
    (the step between the two moves ``z`` by ~1e-16): the effect of torchdiffeq's ``jump_t``."""
    knots = X.t[torch.isfinite(X.t)].unique()
    lo, hi = min(tspan), max(tspan)
    inside = [float(k) for k in knots.tolist() if lo < k < hi]
    if isinstance(X, LinearInterpolation):
        delta = math.ulp(max(abs(lo), abs(hi), 1.0))  # >= the spacing at every knot inside, >= dtmin
        inside += [k + delta for k in inside if k + delta < hi]
    return inside
