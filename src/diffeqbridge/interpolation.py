"""Control paths for neural CDEs: interpolations of irregularly sampled, NaN-padded data.

The definitions are torchcde's (Kidger, Morrill, Foster, Lyons, "Neural Controlled
Differential Equations for Irregular Time Series", NeurIPS 2020; Morrill, Kidger, Yang,
Lyons, "Neural CDEs for Online Prediction Tasks", 2021, for rectilinear and the cubic
Hermite splines with backward differences), so coefficients and paths agree with torchcde
on the same data:

* ``linear_interpolation_coeffs(x, t)``: the data with missing values (NaN) filled by linear
  interpolation in time between the neighbouring observations of the same channel; leading
  (trailing) NaNs take the first (last) observation; an all-NaN channel becomes 0.
* ``linear_interpolation_coeffs(x, rectilinear=k)``: time is channel ``k``; the data are
  forward-filled and every step is split in two (first time moves, then the features), a
  causal path on the index grid ``0, 1, ..., 2L - 2``.
* ``hermite_cubic_coefficients_with_backward_differences(x, t)``: on ``[t_k, t_{k+1}]`` the
  cubic with values ``x_k, x_{k+1}`` and slopes ``d_{k-1}, d_k`` (``d_k`` the slope of the
  linear interpolation on interval ``k``, ``d_{-1} = d_0``): C¹ and causal up to one step.
* ``natural_cubic_coeffs(x, t)``: the natural cubic spline through each channel's observations
  (C², not causal), in the same ``[a, b, 2c, 3d]`` layout.

Beyond torchcde, observation grids may differ per sample: ``t`` of shape ``(B, L)``, NaN
after a sample's last observation (its values NaN there too).  Padded times are replaced by
``t_last + 1, t_last + 2, ...`` (values forward-filled, as torchcde fills trailing NaNs), and
the path classes hold each sample's path constant outside its own observation window
``[t_first, t_last]`` (derivative zero there), so a sample that ends early stops driving its
CDE instead of extrapolating.  A shared grid ``(L,)`` keeps torchcde's behaviour (the first and
last pieces are extended beyond the grid).  Everything is vectorised over samples and channels (torchcde
loops over them in Python for missing values).

Shapes: data ``x (B, L, C)`` (or torchcde's ``(..., L, C)``, any batch axes, kept by the
coefficients and by ``evaluate``/``derivative``); times ``t`` ``None`` (``0..L-1``), ``(L,)`` or ``(B, L)``;
``evaluate(t)``/``derivative(t)`` take a scalar or a ``(B,)`` tensor (each sample at its own
time, as the engine calls vector fields) and return ``(B, C)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CubicSpline",
    "Interpolation",
    "LinearInterpolation",
    "hermite_cubic_coefficients_with_backward_differences",
    "linear_interpolation_coeffs",
    "natural_cubic_coeffs",
]


# ---------------------------------------------------------------------------- validation
def _check_data(x: Any) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3:
        raise ValueError(f"x must be a floating tensor of shape (B, L, C); got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] < 2:
        raise ValueError(f"x needs at least two observations along its length axis; got shape {tuple(x.shape)}")
    return x


def _flat_batch(x: Any, t: Any) -> tuple[Any, Any, tuple[int, ...]]:
    """torchcde's ``(..., L, C)`` data (any number of batch axes, none included) as ``(B, L, C)``;
    per-sample times ``(..., L)`` as ``(B, L)``; and the batch shape to restore."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a floating tensor of shape (..., L, C); got {getattr(x, 'shape', type(x).__name__)}")
    batch = tuple(x.shape[:-2])
    if isinstance(t, Tensor) and t.ndim >= 2 and tuple(t.shape[:-1]) == batch:
        t = t.reshape(-1, t.shape[-1])
    return x.reshape(-1, *x.shape[-2:]), t, batch


def _grid(x: Tensor, t: Any) -> Tensor:
    """``t`` as a ``(B, L)`` (per-sample) or ``(L,)`` strictly increasing grid; padded NaN times filled."""
    length = x.shape[1]
    if t is None:
        return torch.arange(length, dtype=x.dtype, device=x.device)
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.to(dtype=x.dtype, device=x.device)
    if t.shape not in ((length,), (x.shape[0], length)):
        raise ValueError(f"t must have shape (L,) = ({length},) or (B, L) = {(x.shape[0], length)}; got {tuple(t.shape)}")
    observed = ~torch.isnan(t)
    if not bool(observed[..., 0].all()) or not bool(observed[..., 1].all()):
        raise ValueError("t: every sample needs at least two observation times (NaN only as trailing padding)")
    if bool((observed[..., 1:] & ~observed[..., :-1]).any()):
        raise ValueError("t: NaN times are allowed only as trailing padding")
    if not bool(observed.all()):
        # padded times: t_last + 1, t_last + 2, ... (the path is held constant there)
        count = observed.sum(dim=-1, keepdim=True)
        index = torch.arange(length, device=x.device).expand_as(t)
        last = t.gather(-1, count - 1)
        t = torch.where(observed, t, last + (index - count + 1).to(t.dtype))
    if not bool((t[..., 1:] > t[..., :-1]).all()):
        raise ValueError("t must be strictly increasing (along its last axis)")
    return t


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """The grid broadcast against data ``(B, L, C)``."""
    return (t.unsqueeze(-1) if t.ndim == 2 else t.reshape(1, -1, 1)).expand_as(x)


# ---------------------------------------------------------------------------- coefficients
def fill_missing(x: Tensor, t: Tensor) -> Tensor:
    """NaNs replaced as torchcde's linear interpolation does, vectorised: ``(B, L, C)``."""
    observed = ~torch.isnan(x)
    if bool(observed.all()):
        return x
    length = x.shape[1]
    index = torch.arange(length, device=x.device).reshape(1, -1, 1).expand_as(x)
    prev = torch.where(observed, index, -1).cummax(dim=1).values
    nxt = torch.where(observed, index, length).flip(1).cummin(dim=1).values.flip(1)
    has_prev, has_next = prev >= 0, nxt < length
    prev_c, next_c = prev.clamp(min=0), nxt.clamp(max=length - 1)
    x0 = torch.where(observed, x, torch.zeros_like(x))
    x_prev, x_next = x0.gather(1, prev_c), x0.gather(1, next_c)
    tt = _per_channel(t, x)
    t_prev, t_next = tt.gather(1, prev_c), tt.gather(1, next_c)
    # observed entries have prev == next (a zero gap): a finite ratio there keeps d/dx free of 0 * NaN
    gap = t_next - t_prev
    ratio = (tt - t_prev) / torch.where(has_prev & has_next & (gap > 0), gap, torch.ones_like(tt))
    between = x_prev + ratio * (x_next - x_prev)
    filled = torch.where(has_prev & has_next, between, torch.where(has_prev, x_prev, x_next))
    filled = torch.where(has_prev | has_next, filled, torch.zeros_like(x))  # an all-NaN channel -> 0
    return torch.where(observed, x, filled)


def _forward_fill(x: Tensor) -> Tensor:
    observed = ~torch.isnan(x)
    index = torch.arange(x.shape[1], device=x.device).reshape(1, -1, 1).expand_as(x)
    prev = torch.where(observed, index, 0).cummax(dim=1).values
    return x.gather(1, prev)


def linear_interpolation_coeffs(x: Tensor, t: Tensor | None = None, rectilinear: int | None = None) -> Tensor:
    """Knots of the linear interpolation of ``x (B, L, C)`` (NaN = missing): ``(B, L', C)``.

    ``rectilinear=k`` (time in channel ``k``, ``t`` must be None): the rectilinear path, on
    ``L' = 2L - 1`` knots at the index grid.  Otherwise ``L' = L`` at the grid ``t``.
    As torchcde, ``x`` may have any batch axes ``(..., L, C)``; the result keeps them.
    """
    x, t, batch = _flat_batch(x, t)
    x = _check_data(x)
    if rectilinear is not None:
        if t is not None:
            raise ValueError("rectilinear interpolation runs on the index grid: pass t=None (time is a channel of x)")
        if isinstance(rectilinear, bool) or not isinstance(rectilinear, int) or not 0 <= rectilinear < x.shape[-1]:
            raise ValueError(f"rectilinear must be the index of the time channel in [0, {x.shape[-1] - 1}]; got {rectilinear!r}")
        if bool(torch.isnan(x[..., rectilinear]).any()):
            raise ValueError("rectilinear: the time channel of x must not contain NaN")
        filled = _forward_fill(x)
        doubled = filled.repeat_interleave(2, dim=1)
        doubled[:, :-1, rectilinear] = doubled[:, 1:, rectilinear]
        x = doubled[:, :-1]
        t = None
    return fill_missing(x, _grid(x, t)).reshape(*batch, *x.shape[1:])


def _slopes(coeffs: Tensor, t: Tensor) -> Tensor:
    dt = t[..., 1:] - t[..., :-1]
    return (coeffs[:, 1:] - coeffs[:, :-1]) / dt.unsqueeze(-1)


def hermite_cubic_coefficients_with_backward_differences(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Cubic Hermite coefficients with backward differences: ``(B, L - 1, 4C)`` = ``[a, b, 2c, 3d]``.

    On interval ``k`` with ``s = τ - t_k``: ``X(τ) = a + b s + c s² + d s³`` with ``a = x_k``,
    ``b = d_{k-1}`` and ``X(t_{k+1}) = x_{k+1}``, ``X'(t_{k+1}) = d_k`` (torchcde's layout).
    Any batch axes ``(..., L, C)`` as torchcde; the result keeps them.
    """
    x, t, batch = _flat_batch(x, t)
    x = _check_data(x)
    grid = _grid(x, t)
    coeffs = fill_missing(x, grid)
    slopes = _slopes(coeffs, grid)
    prev = torch.cat([slopes[:, :1], slopes[:, :-1]], dim=1)
    h = (grid[..., 1:] - grid[..., :-1]).unsqueeze(-1)
    if h.ndim == 2:
        h = h.unsqueeze(0)
    a, b = coeffs[:, :-1], prev
    two_c = 2 * (3 * (slopes - b) - slopes + prev) / h
    three_d = (slopes - b) / h**2 - two_c / h
    return torch.cat([a, b, two_c, three_d], dim=-1).reshape(*batch, x.shape[1] - 1, 4 * x.shape[2])


def _tridiagonal_solve(rhs: Tensor, diag: Tensor, off: Tensor) -> Tensor:
    """Symmetric tridiagonal systems ``(N, L)`` (``off (N, L - 1)``) by the Thomas algorithm,
    vectorised over ``N`` (the loop runs along the length)."""
    length = rhs.shape[-1]
    d, r = [diag[:, 0]], [rhs[:, 0]]
    for i in range(1, length):
        w = off[:, i - 1] / d[-1]
        d.append(diag[:, i] - w * off[:, i - 1])
        r.append(rhs[:, i] - w * r[-1])
    out = [r[-1] / d[-1]]
    for i in range(length - 2, -1, -1):
        out.append((r[i] - off[:, i] * out[-1]) / d[i])
    return torch.stack(out[::-1], dim=-1)


def natural_cubic_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Natural cubic spline coefficients (torchcde's ``natural_cubic_coeffs``): ``(..., L - 1, 4C)``.

    Per channel, the C² cubic through the observed values with zero second derivative at the
    first and last observation; leading (trailing) NaNs take the first (last) observation, an
    all-NaN channel is 0, and interior NaNs are not knots (the spline runs through the observed
    values only, re-expressed on every interval of the grid).  Knot slopes solve the usual
    tridiagonal system (e.g. de Boor, *A Practical Guide to Splines*, ch. IV).  Read by
    :class:`CubicSpline`; not causal (each piece depends on all the data).
    """
    x, t, batch = _flat_batch(x, t)
    x = _check_data(x)
    grid = _grid(x, t)
    n_b, length, n_c = x.shape
    series = x.transpose(1, 2).reshape(-1, length)  # (N, L), N = B C
    times = (grid.unsqueeze(1) if grid.ndim == 2 else grid.expand(n_b, 1, length)).expand(n_b, n_c, length)
    times = times.reshape(-1, length)
    observed = ~torch.isnan(series)
    series = torch.where(observed.any(-1, keepdim=True), series, torch.zeros_like(series))  # all-NaN -> 0
    index = torch.arange(length, device=x.device).expand_as(series)
    first = torch.where(~torch.isnan(series), index, length).amin(-1, keepdim=True)
    last = torch.where(~torch.isnan(series), index, -1).amax(-1, keepdim=True)
    series = torch.where(index < first, series.gather(1, first.clamp(max=length - 1)), series)
    # per-sample grids: a padded time is no knot (the spline ends at the sample's last observation)
    padded = torch.isnan(torch.as_tensor(t, dtype=x.dtype, device=x.device)) if grid.ndim == 2 else None
    after = index > last
    if padded is not None:
        after = after & ~padded.unsqueeze(1).expand(n_b, n_c, length).reshape(-1, length)
    series = torch.where(after, series.gather(1, last.clamp(min=0)), series)
    observed = ~torch.isnan(series)
    # pack each series' observations to the front (stable); padding: times past the end, last value
    count = observed.sum(-1, keepdim=True)
    order = torch.sort((~observed).to(torch.int8), dim=-1, stable=True).indices
    tp, xp = times.gather(1, order), torch.nan_to_num(series.gather(1, order))
    live = index < count
    t_end, x_end = tp.gather(1, count - 1), xp.gather(1, count - 1)
    tp = torch.where(live, tp, t_end + (index - count + 1).to(tp.dtype))
    xp = torch.where(live, xp, x_end)
    h, delta = tp[:, 1:] - tp[:, :-1], xp[:, 1:] - xp[:, :-1]
    valid = live[:, 1:].to(h.dtype)  # interval j joins two observations
    recip = valid / h
    scaled = 3 * delta * recip / h
    zero = torch.zeros_like(recip[:, :1])
    diag = 2 * (torch.cat([zero, recip], -1) + torch.cat([recip, zero], -1))
    diag = torch.where(live, diag, torch.ones_like(diag))  # padding rows: k = 0, decoupled
    rhs = torch.cat([zero, scaled], -1) + torch.cat([scaled, zero], -1)
    k = _tridiagonal_solve(rhs, diag, recip)
    a_j, b_j = xp[:, :-1], k[:, :-1]
    two_c_j = (6 * delta / h - 4 * k[:, :-1] - 2 * k[:, 1:]) / h
    three_d_j = (-6 * delta / h + 3 * (k[:, :-1] + k[:, 1:])) / h**2
    # grid interval k lies in observed piece j (the last observation at or before t_k): the cubic shifted
    piece = (observed.cumsum(-1)[:, :-1] - 1).clamp(min=0)
    piece = torch.minimum(piece, (count - 2).clamp(min=0))
    a_j, b_j, two_c_j, three_d_j = (v.gather(1, piece) for v in (a_j, b_j, two_c_j, three_d_j))
    offset = tp[:, :-1].gather(1, piece) - times[:, :-1]
    a = a_j + ((0.5 * two_c_j - three_d_j * offset / 3) * offset - b_j) * offset
    b = b_j + (three_d_j * offset - two_c_j) * offset
    two_c = two_c_j - 2 * three_d_j * offset
    parts = [v.reshape(n_b, n_c, length - 1).transpose(1, 2) for v in (a, b, two_c, three_d_j)]
    return torch.cat(parts, dim=-1).reshape(*batch, length - 1, 4 * n_c)


# ---------------------------------------------------------------------------- paths
class Interpolation:
    """A control path ``X(t)`` on a (per-sample) grid; see the module docstring for shapes."""

    coeffs: Tensor  # (B, L, C): batch axes flattened
    t: Tensor  # (L,) or (B, L), strictly increasing
    batch_shape: tuple[int, ...]  # the coefficients' batch axes as given

    def __init__(self, coeffs: Tensor, t: Tensor | None = None):
        coeffs, t = self._flatten(coeffs, t, "(..., L, C)")
        self._set_grid(coeffs, coeffs, t)

    def _flatten(self, coeffs: Any, t: Any, expected: str) -> tuple[Tensor, Any]:
        """torchcde's batch axes ``(..., L, C)`` (none included) as one: ``coeffs (B, L, C)``, per-sample
        ``t (B, L)``; ``evaluate``/``derivative`` return ``(..., C)``."""
        if not isinstance(coeffs, Tensor) or coeffs.ndim < 2:
            raise ValueError(f"coeffs must be a tensor of shape {expected}; got {getattr(coeffs, 'shape', coeffs)}")
        flat, t, self.batch_shape = _flat_batch(coeffs, t)
        return flat, t

    def _set_grid(self, coeffs: Tensor, knots: Tensor, t: Any) -> None:
        """``knots (B, L, ·)`` gives the grid's length; per-sample grids also get their windows ``(B,)``."""
        self.coeffs, self._t_given = coeffs, t
        self.t = _grid(knots, t)
        self.window: tuple[Tensor, Tensor] | None = None
        if self.t.ndim == 2:
            raw = torch.as_tensor(t, dtype=self.t.dtype, device=self.t.device)
            last = (~torch.isnan(raw)).sum(dim=-1, keepdim=True) - 1
            self.window = (self.t[:, 0], self.t.gather(1, last).squeeze(1))

    def with_coeffs(self, coeffs: Tensor) -> Interpolation:
        """The same kind of path on the same grid with other coefficients (e.g. a detached leaf)."""
        return type(self)(coeffs, self._t_given)

    @property
    def batch_size(self) -> int:
        return self.coeffs.shape[0]

    @property
    def interval(self) -> tuple[float, float]:
        """``(first, last)`` observation time over all samples (per-sample grids: earliest start, latest end)."""
        if self.window is not None:
            return float(self.window[0].min()), float(self.window[1].max())
        return float(self.t[0]), float(self.t[-1])

    def _times(self, t: Tensor | float) -> Tensor:
        return torch.as_tensor(t, dtype=self.coeffs.dtype, device=self.coeffs.device).reshape(-1).expand(self.batch_size)

    def _outside(self, t: Tensor | float) -> Tensor | None:
        """``(B, 1)`` mask of samples queried outside their own window (per-sample grids), else None."""
        if self.window is None:
            return None
        tt = self._times(t)
        return ((tt < self.window[0]) | (tt > self.window[1])).unsqueeze(1)

    def _held(self, derivative: Tensor, t: Tensor | float) -> Tensor:
        outside = self._outside(t)
        return derivative if outside is None else torch.where(outside, torch.zeros_like(derivative), derivative)

    def _locate(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Interval index ``(B,)`` (torchcde's: a knot belongs to the interval on its left) and ``s = t - t_k`` ``(B, 1)``."""
        batch, grid = self.batch_size, self.t
        tt = self._times(t)
        if self.window is not None:  # held constant outside the sample's own window
            tt = torch.minimum(torch.maximum(tt, self.window[0]), self.window[1])
        sorted_grid = grid if grid.ndim == 2 else grid.unsqueeze(0).expand(batch, -1)
        index = torch.searchsorted(sorted_grid.detach().contiguous(), tt.detach().unsqueeze(1).contiguous())
        index = (index.squeeze(1) - 1).clamp(0, grid.shape[-1] - 2)
        knot = sorted_grid.gather(1, index.unsqueeze(1))
        return index, tt.unsqueeze(1) - knot

    def _rows(self, values: Tensor, index: Tensor) -> Tensor:
        return values[torch.arange(values.shape[0], device=values.device), index]

    def evaluate(self, t: Tensor | float) -> Tensor:
        """``X(t)``: ``(B, C)`` (``(..., C)`` for coefficients with other batch axes)."""
        out = self._evaluate(t)
        return out.reshape(*self.batch_shape, out.shape[-1])

    def derivative(self, t: Tensor | float) -> Tensor:
        """``X'(t)``: ``(B, C)`` (``(..., C)``); at a knot the slope on its left (torchcde's convention)."""
        out = self._derivative(t)
        return out.reshape(*self.batch_shape, out.shape[-1])

    def _evaluate(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def _derivative(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError


class LinearInterpolation(Interpolation):
    """Piecewise-linear path through the knots ``coeffs (B, L, C)`` from :func:`linear_interpolation_coeffs`."""

    def _piece(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Left knot ``(B, C)``, slope ``(B, C)`` and ``s (B, 1)`` of each sample's piece.  The slope is
        formed per call (no graph shared between calls: an adjoint's repeated vector-Jacobian
        products with coefficients that require grad each free their own)."""
        index, s = self._locate(t)
        grid = self.t if self.t.ndim == 2 else self.t.unsqueeze(0).expand(self.batch_size, -1)
        gap = grid.gather(1, index.unsqueeze(1) + 1) - grid.gather(1, index.unsqueeze(1))
        prev = self._rows(self.coeffs, index)
        return prev, (self._rows(self.coeffs, index + 1) - prev) / gap, s

    def _evaluate(self, t: Tensor | float) -> Tensor:
        prev, slope, s = self._piece(t)
        return prev + s * slope

    def _derivative(self, t: Tensor | float) -> Tensor:
        _, slope, _ = self._piece(t)
        return self._held(slope, t)


class CubicSpline(Interpolation):
    """Piecewise-cubic path from ``[a, b, 2c, 3d]`` coefficients ``(B, L - 1, 4C)``
    (:func:`hermite_cubic_coefficients_with_backward_differences`; torchcde's ``CubicSpline``)."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None):
        coeffs, t = self._flatten(coeffs, t, "(..., L - 1, 4C)")
        if coeffs.shape[-1] % 4:
            raise ValueError(f"coeffs must have shape (..., L - 1, 4C); got {tuple(coeffs.shape)}")
        self._set_grid(coeffs, torch.cat([coeffs, coeffs[:, -1:]], dim=1), t)  # L - 1 pieces, L knots
        self._a, self._b, self._two_c, self._three_d = coeffs.chunk(4, dim=-1)

    def _evaluate(self, t: Tensor | float) -> Tensor:
        index, s = self._locate(t)
        inner = 0.5 * self._rows(self._two_c, index) + self._rows(self._three_d, index) * s / 3
        inner = self._rows(self._b, index) + inner * s
        return self._rows(self._a, index) + inner * s

    def _derivative(self, t: Tensor | float) -> Tensor:
        index, s = self._locate(t)
        inner = self._rows(self._two_c, index) + self._rows(self._three_d, index) * s
        return self._held(self._rows(self._b, index) + inner * s, t)
