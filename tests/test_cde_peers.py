"""Conformance with torchcde (Kidger et al.; ``torchcde`` 0.2.5 on ``torchdiffeq``): the same
data through torchcde's and our coefficient functions and paths, ``cdeint`` against
``deb.NeuralCDE`` step for step (a fixed-step Dormand–Prince on both sides: torchdiffeq's own
tableau in its fixed-grid loop) and adaptively, and torchcde's own test problems (Hermite with
unit times, exactness on linear data, derivative = autograd of evaluate, ``cdeint`` shapes and
output times) in our API.  Coefficient/path tolerances are 1e-12 in float64 where the maths is
the same; outputs and gradients of identical steps 1e-10."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import diffeqbridge as deb
from diffeqbridge import interpolation as interp

torchcde = pytest.importorskip("torchcde")
torchdiffeq = pytest.importorskip("torchdiffeq")
pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore:The data `x` begins with missing values"),
]

B, L, C, H = 3, 9, 2, 4


def _irregular(seed: int, batch: tuple[int, ...] = (B,), nan: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Irregular times ``(L,)`` in ``[-1, 4]`` and data ``(*batch, L, C)``, NaNs at the start, inside and at the end."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(L, generator=g) * 5 - 1).values
    x = torch.randn(*batch, L, C, generator=g)
    if nan:
        flat = x.view(-1, L, C)
        flat[0, 0, 0] = flat[0, 4, 1] = flat[0, 5, 1] = float("nan")
        flat[-1, -1, 0] = flat[-1, 2, 0] = float("nan")
    return t, x


def _queries(t: torch.Tensor, n: int = 97) -> list[float]:
    """Knots, a dense grid over and beyond ``[t_0, t_L]`` (the end pieces extend), and just-off-knot points."""
    dense = torch.linspace(float(t[0]) - 0.7, float(t[-1]) + 0.7, n).tolist()
    return [*t.tolist(), *dense, *(t + 1e-9).tolist(), *(t - 1e-9).tolist()]


PATHS = {
    "natural": (interp.natural_cubic_coeffs, interp.CubicSpline, "natural_cubic_coeffs", "CubicSpline"),
    "linear": (
        interp.linear_interpolation_coeffs,
        interp.LinearInterpolation,
        "linear_interpolation_coeffs",
        "LinearInterpolation",
    ),
    "hermite": (
        interp.hermite_cubic_coefficients_with_backward_differences,
        interp.CubicSpline,
        "hermite_cubic_coefficients_with_backward_differences",
        "CubicSpline",
    ),
}


# ------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("kind", sorted(PATHS))
def test_paths_on_irregular_nan_data_match_torchcde_everywhere(kind):
    ours_coeffs, ours_cls, ref_coeffs, ref_cls = PATHS[kind]
    t, x = _irregular(0)
    ours = ours_cls(ours_coeffs(x, t), t)
    ref = getattr(torchcde, ref_cls)(getattr(torchcde, ref_coeffs)(x, t), t)
    for s in _queries(t):
        assert torch.allclose(ours.evaluate(s), ref.evaluate(s), rtol=1e-12, atol=1e-12), s
        assert torch.allclose(ours.derivative(s), ref.derivative(s), rtol=1e-12, atol=1e-12), s


def test_natural_cubic_reproduces_a_natural_cubic_through_gaps():
    """torchcde's ``test_interp``: a cubic with one knot at 0, ``d = -c / (3 t_0)`` left of it and
    ``-c / (3 t_L)`` right of it, has zero second derivative at both ends (a natural spline) and
    is reproduced exactly from its values at irregular times (0 among them), interior values
    dropped per channel; also with two samples (torchcde's ``test_short``: then the line)."""
    g = torch.Generator().manual_seed(10)
    times = torch.sort(torch.cat([torch.rand(6, generator=g) - 1, torch.rand(6, generator=g), torch.zeros(1)])).values
    a, b, c = (torch.randn(B, C, generator=g) * 3 for _ in range(3))
    d_left, d_right = -c / (3 * times[0]), -c / (3 * times[-1])

    def cubic(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.reshape(-1, 1, 1)
        d = torch.where(s > 0, d_right, d_left)
        return a + b * s + c * s**2 + d * s**3, b + 2 * c * s + 3 * d * s**2

    values = cubic(times)[0].transpose(0, 1).clone()  # (B, L, C)
    values[0, 2, 0] = values[1, 3:5, 1] = values[2, -2, 0] = float("nan")  # never the knot t = 0 (index 6)
    X = interp.CubicSpline(interp.natural_cubic_coeffs(values, times), times)
    for s in torch.linspace(float(times[0]), float(times[-1]), 41):
        value, slope = cubic(s)
        assert torch.allclose(X.evaluate(s), value[0], rtol=1e-10, atol=1e-10), float(s)
        assert torch.allclose(X.derivative(s), slope[0], rtol=1e-10, atol=1e-10), float(s)
    short = interp.CubicSpline(interp.natural_cubic_coeffs(values[:, [0, -1]], times[[0, -1]]), times[[0, -1]])
    line = interp.LinearInterpolation(interp.linear_interpolation_coeffs(values[:, [0, -1]], times[[0, -1]]), times[[0, -1]])
    for s in (-1.5, 0.0, 0.3, 1.5):
        assert torch.allclose(short.evaluate(s), line.evaluate(s), atol=1e-12)
        assert torch.allclose(short.derivative(s), line.derivative(s), atol=1e-12)


def test_torchcde_natural_cubic_coefficients_evaluate_in_our_cubic_spline():
    """torchcde's natural cubic coefficients share the ``[a, b, 2c, 3d]`` layout: our ``CubicSpline`` reads them."""
    t, x = _irregular(1, nan=False)
    coeffs = torchcde.natural_cubic_coeffs(x, t)
    ours, ref = interp.CubicSpline(coeffs, t), torchcde.CubicSpline(coeffs, t)
    for s in _queries(t):
        assert torch.allclose(ours.evaluate(s), ref.evaluate(s), rtol=1e-12, atol=1e-12), s
        assert torch.allclose(ours.derivative(s), ref.derivative(s), rtol=1e-12, atol=1e-12), s


@pytest.mark.parametrize("kind", sorted(PATHS))
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["no-batch", "batch-2x3"])
def test_coefficients_with_any_batch_dims_match_torchcde(kind, batch):
    """torchcde's coefficient functions and paths take ``(..., L, C)``; ours too (``evaluate(s)`` ``(..., C)``)."""
    ours_coeffs, ours_cls, ref_coeffs, ref_cls = PATHS[kind]
    t, x = _irregular(2, batch)
    ours, ref = ours_coeffs(x, t), getattr(torchcde, ref_coeffs)(x, t)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    path, ref_path = ours_cls(ours, t), getattr(torchcde, ref_cls)(ref, t)
    for s in _queries(t, 11):
        assert path.evaluate(s).shape == path.derivative(s).shape == (*batch, C)
        assert torch.allclose(path.evaluate(s), ref_path.evaluate(s), rtol=1e-12, atol=1e-12)
        assert torch.allclose(path.derivative(s), ref_path.derivative(s), rtol=1e-12, atol=1e-12)
    flat = ours_cls(ours.reshape(-1, *ours.shape[-2:]), t)  # one batch axis: what NeuralCDE solves
    assert torch.equal(flat.evaluate(float(t[3]) + 0.1), path.evaluate(float(t[3]) + 0.1).reshape(-1, C))


def test_rectilinear_with_batch_dims_matches_torchcde():
    t, x = _irregular(3, (2, 2))
    data = torch.cat([t.expand(2, 2, L).unsqueeze(-1), x], dim=-1)
    assert torch.equal(
        interp.linear_interpolation_coeffs(data, rectilinear=0), torchcde.linear_interpolation_coeffs(data, rectilinear=0)
    )


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_gradients_to_data_and_query_time_match_torchcde(kind):
    """``d/dx`` of the path at many points (through the NaN filling) and ``d/ds`` of ``evaluate(s)``."""
    ours_coeffs, ours_cls, ref_coeffs, ref_cls = PATHS[kind]
    t, x = _irregular(4)
    s = torch.tensor(_queries(t, 31))
    w = torch.linspace(0.5, 1.5, C)

    def total(make_coeffs, cls, data):
        path = cls(make_coeffs(data, t), t)
        return sum((path.evaluate(q) * w).sum() + (path.derivative(q) ** 2).sum() for q in s)

    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (g_ours,) = torch.autograd.grad(total(ours_coeffs, ours_cls, x1), [x1])
    (g_ref,) = torch.autograd.grad(total(getattr(torchcde, ref_coeffs), getattr(torchcde, ref_cls), x2), [x2])
    nan = torch.isnan(x)
    assert torch.allclose(g_ours[~nan], g_ref[~nan], rtol=1e-11, atol=1e-11)

    path = ours_cls(ours_coeffs(x, t), t)
    inside = s[(s > t[0]) & (s < t[-1])][:B]  # one query time per sample, its own
    q = inside.clone().requires_grad_(True)
    (dq,) = torch.autograd.grad((path.evaluate(q) * w).sum(), [q])
    assert torch.allclose(dq, (path.derivative(inside) * w).sum(-1), rtol=1e-12, atol=1e-12)


def test_hermite_unit_times_closed_form():
    """torchcde's ``test_hermite_cubic_unit_time``: with ``t = 0..L-1`` the coefficients are
    ``a = x_k``, ``b = Δ_{k-1}``, ``2c = 4 (Δ_k - Δ_{k-1})``, ``3d = -3 (Δ_k - Δ_{k-1})`` (``Δ_{-1} = Δ_0``)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, L, C, generator=g)
    delta = x[:, 1:] - x[:, :-1]
    prev = torch.cat([delta[:, :1], delta[:, :-1]], dim=1)
    expected = torch.cat([x[:, :-1], prev, 4 * (delta - prev), -3 * (delta - prev)], dim=-1)
    coeffs = interp.hermite_cubic_coefficients_with_backward_differences(x)
    assert torch.allclose(coeffs, expected, rtol=1e-13, atol=1e-13)
    X = interp.CubicSpline(coeffs)  # default grid 0..L-1
    for k in range(L):
        assert torch.allclose(X.evaluate(float(k)), x[:, k], atol=1e-13)


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_linear_data_reproduced_exactly_with_interior_gaps(kind):
    """torchcde's ``test_random``/``test_small``: data ``m t + c`` with interior NaNs is reproduced
    exactly, derivative ``m`` everywhere (both paths), also outside the grid."""
    ours_coeffs, ours_cls, *_ = PATHS[kind]
    g = torch.Generator().manual_seed(6)
    t = torch.sort(torch.rand(L, generator=g) * 6 - 3).values
    m, c = torch.randn(C, generator=g), torch.randn(C, generator=g)
    x = (m * t.unsqueeze(-1) + c).expand(B, L, C).clone()
    x[0, 3, 0] = x[1, 1:4, 1] = x[2, -2, :] = float("nan")
    X = ours_cls(ours_coeffs(x, t), t)
    for s in _queries(t, 41):
        assert torch.allclose(X.evaluate(s), (m * s + c).expand(B, C), rtol=1e-12, atol=1e-12), s
        assert torch.allclose(X.derivative(s), m.expand(B, C), rtol=1e-12, atol=1e-12), s


# ------------------------------------------------------------------------------------------ cdeint
class Field(nn.Module):
    """``f(t, z) (B, H, C)``, time-dependent; ``t`` a scalar (torchcde) or ``(B,)`` (ours)."""

    def __init__(self, seed: int = 7):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(H, 16, generator=g) * 0.5)
        self.w2 = nn.Parameter(torch.randn(16, H * C, generator=g) * 0.5)
        self.freq = nn.Parameter(torch.tensor(0.8))

    def forward(self, t, z):
        t = torch.as_tensor(t, dtype=z.dtype).reshape(-1, 1)
        hidden = torch.tanh(z @ self.w1 + torch.sin(self.freq * t))
        return torch.tanh(hidden @ self.w2).reshape(z.shape[0], H, C)


class _FixedDopri5(torchdiffeq._impl.solvers.FixedGridODESolver):
    """torchdiffeq's Dormand–Prince tableau and RK step in its fixed-grid loop (``options=dict(step_size=h)``;
    ``perturb=True``: the first stage just right of ``t0``, the last just left of ``t1``, as torchdiffeq's RK4)."""

    order = 5

    def _step_func(self, func, t0, dt, t1, y0):
        from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU
        from torchdiffeq._impl.misc import Perturb
        from torchdiffeq._impl.rk_common import _runge_kutta_step

        f0 = func(t0, y0, perturb=Perturb.NEXT if self.perturb else Perturb.NONE)
        y1, *_ = _runge_kutta_step(func, y0, f0, t0, dt, t1, _DORMAND_PRINCE_SHAMPINE_TABLEAU)
        return y1 - y0, f0


@pytest.fixture
def fixed_dopri5(monkeypatch):
    monkeypatch.setitem(sys.modules["torchdiffeq._impl.odeint"].SOLVERS, "fixed_dopri5", _FixedDopri5)
    return "fixed_dopri5"


def _cde_data(seed: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots on the integer grid ``0..L-1`` (a fixed step ``1/4`` lands on them), data ``(B, L, C)`` with a NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cumsum(torch.randn(B, L, C, generator=g) * 0.6, dim=1)
    x[1, 4, 0] = float("nan")
    return torch.arange(L, dtype=torch.float64), x


Z0 = torch.linspace(-1, 1, B * H, dtype=torch.float64).reshape(B, H)
CDE_KINDS = {"linear": ("linear", "linear"), "hermite": ("cubic", "hermite")}


def _both(kind: str, x: torch.Tensor, t: torch.Tensor):
    ours_coeffs, ours_cls, ref_coeffs, ref_cls = PATHS[kind]
    return ours_cls(ours_coeffs(x, t), t), getattr(torchcde, ref_cls)(getattr(torchcde, ref_coeffs)(x, t), t)


def _loss(zs: torch.Tensor) -> torch.Tensor:
    """``zs (T, B, H)``."""
    return (zs[-1] ** 2).sum() + (zs[2] * torch.linspace(-1, 1, H)).sum()


def _ref_solve(kind, ts, **kwargs):
    """torchcde's ``cdeint`` output ``(T, B, H)`` and gradients to ``(z0, x, *params)``."""
    t, x = _cde_data()
    x = x.requires_grad_(True)
    func, z0 = Field(), Z0.clone().requires_grad_(True)
    _, X = _both(kind, x, t)
    zs = torchcde.cdeint(X=X, func=func, z0=z0, t=ts, adjoint=False, **kwargs).transpose(0, 1)
    grads = torch.autograd.grad(_loss(zs), [z0, x, *func.parameters()], allow_unused=True)
    return zs.detach(), grads


def _our_solve(kind, ts, **kwargs):
    t, x = _cde_data()
    x = x.requires_grad_(True)
    func, z0 = Field(), Z0.clone().requires_grad_(True)
    X, _ = _both(kind, x, t)
    model = deb.NeuralCDE(func, **kwargs)
    zs = model(X, z0, ts=ts)
    grads = torch.autograd.grad(_loss(zs), [z0, x, *func.parameters()])
    return zs.detach(), grads, model


def _assert_grads(ours, ref, tol):
    names = ["z0", "x", "w1", "w2", "freq"]
    for name, a, b in zip(names, ours, ref):
        keep = ~torch.isnan(a) & ~torch.isnan(b)
        assert torch.allclose(a[keep], b[keep], rtol=tol, atol=tol), (name, float((a - b)[keep].abs().max()))


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_fixed_step_dopri5_equals_torchcde_step_for_step(kind, fixed_dopri5):
    """Same tableau, same grid (``h = 1/4``, knots on it): outputs to 1e-12, gradients to
    ``(z0, data, parameters)`` (our DiscreteAdjoint vs backprop through torchdiffeq) to 1e-10."""
    ts = torch.tensor([0.0, 1.5, 3.0, 5.25, 8.0])
    ref, ref_grads = _ref_solve(kind, ts, method=fixed_dopri5, options=dict(step_size=0.25, perturb=True))
    zs, grads, model = _our_solve(kind, ts, alg=deb.Dopri5(), dt=0.25, adaptive=False, sensealg=deb.DiscreteAdjoint())
    assert zs.shape == (len(ts), B, H)
    assert torch.allclose(zs, ref, rtol=1e-12, atol=1e-12), float((zs - ref).abs().max())
    # a linear control also stops just right of each of its 7 interior knots (see the knot test below)
    assert torch.equal(model.stats.naccept, torch.full((B,), 32 + (7 if kind == "linear" else 0)))
    _assert_grads(grads, ref_grads, 1e-10)


KNOTS = torch.arange(1.0, L - 1, dtype=torch.float64)  # the interior knots of _cde_data: torchdiffeq's ``jump_t``


def test_adaptive_dopri5_matches_torchcde_inside_the_interval():
    """torchcde's ``t`` semantics: the solve starts at ``t[0]`` (here inside the data's interval,
    off the knots) and outputs at every ``t[i]``; both adaptive at tolerance 1e-10 (torchcde with
    ``jump_t`` at the knots, ours lands on them): outputs to 1e-8, gradients to 1e-6 (measured
    3e-9 and 1.2e-7 against a 1e-13 solve)."""
    ts = torch.tensor([0.7, 1.1, 2.35, 5.5, 7.9])
    ref, ref_grads = _ref_solve("hermite", ts, method="dopri5", rtol=1e-10, atol=1e-10, options=dict(jump_t=KNOTS))
    zs, grads, _ = _our_solve("hermite", ts, alg=deb.Dopri5(), rtol=1e-10, atol=1e-10)
    assert torch.equal(zs[0], Z0)
    assert torch.allclose(zs, ref, rtol=1e-8, atol=1e-8), float((zs - ref).abs().max())
    _assert_grads(grads, ref_grads, 1e-6)


@pytest.mark.parametrize(
    "kind,sensealg",
    [
        ("hermite", deb.InterpolatingAdjoint()),
        ("hermite", deb.BacksolveAdjoint()),
        ("linear", deb.BacksolveAdjoint()),
        ("linear", deb.InterpolatingAdjoint()),
    ],
    ids=["hermite-interpolating", "hermite-backsolve", "linear-backsolve", "linear-interpolating"],
)
def test_continuous_adjoints_gradient_to_data_match_torchcde(kind, sensealg):
    """Gradients to the raw data through the control under continuous adjoints (linear + backsolve
    raised "backward through the graph a second time": the path's slopes were one graph node shared
    by every vector-Jacobian product).  Ours at tolerance 1e-9; reference: torchcde, dopri5 with
    ``jump_t``, tolerance 1e-10, backprop.  Hermite and linear to 1e-6 (measured 1e-7)."""
    ts = torch.tensor([0.0, 1.1, 2.35, 4.5])
    ref, ref_grads = _ref_solve(kind, ts, method="dopri5", rtol=1e-10, atol=1e-10, options=dict(jump_t=KNOTS))
    zs, grads, _ = _our_solve(kind, ts, alg=deb.Dopri5(), rtol=1e-9, atol=1e-9, sensealg=sensealg)
    _assert_grads(grads, ref_grads, 1e-6)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_control_across_knots_within_tolerance(direction):
    """A linear control's slope jumps at each knot.  Steps used to land on the knot only, so its one
    (FSAL) evaluation, with the left slope, was also the next step's first stage: at tolerance 1e-6
    the error against torchcde with ``jump_t`` (1e-12) was 7.7e-4 forward, with 64-85 rejected
    steps per sample either way.  Now within 100x the tolerance (measured 6.8e-6 forward, 2.3e-5
    backward) and at most 10 rejections (measured 1-3)."""
    ts = torch.tensor([0.7, 1.1, 2.35, 5.5, 7.9])
    ts = ts if direction == "forward" else ts.flip(0)
    ref, _ = _ref_solve("linear", ts, method="dopri5", rtol=1e-12, atol=1e-12, options=dict(jump_t=KNOTS))
    zs, _, model = _our_solve("linear", ts, alg=deb.Dopri5(), rtol=1e-6, atol=1e-6)
    assert float((zs - ref).abs().max()) < 1e-4, float((zs - ref).abs().max())
    assert int(model.stats.nreject.max()) <= 10, model.stats.nreject.tolist()


def test_reversed_output_times_match_torchcde(fixed_dopri5):
    """Decreasing ``t`` (torchdiffeq integrates backwards): same steps backwards from ``t[0]``."""
    ts = torch.tensor([8.0, 6.0, 3.5, 1.0])
    ref, ref_grads = _ref_solve("hermite", ts, method=fixed_dopri5, options=dict(step_size=0.25, perturb=True))
    zs, grads, _ = _our_solve("hermite", ts, alg=deb.Dopri5(), dt=0.25, adaptive=False)
    assert torch.allclose(zs, ref, rtol=1e-12, atol=1e-12), float((zs - ref).abs().max())
    _assert_grads(grads, ref_grads, 1e-10)


@pytest.mark.parametrize("kind", ["hermite", "linear"])
def test_output_times_beyond_the_data_extrapolate_as_torchcde(kind, fixed_dopri5):
    """``t`` reaching before the first and after the last observation: on a shared grid the end pieces
    extend (torchcde's paths); step for step equal to 1e-12, gradients 1e-10."""
    ts = torch.tensor([-1.0, 0.5, 3.0, 9.5])
    ref, ref_grads = _ref_solve(kind, ts, method=fixed_dopri5, options=dict(step_size=0.25, perturb=True))
    zs, grads, _ = _our_solve(kind, ts, alg=deb.Dopri5(), dt=0.25, adaptive=False)
    assert torch.allclose(zs, ref, rtol=1e-12, atol=1e-12), float((zs - ref).abs().max())
    _assert_grads(grads, ref_grads, 1e-10)


@pytest.mark.parametrize("n_out", [2, 6])
def test_cdeint_shape_problem(n_out):
    """torchcde's ``test_shape``: ``func(t, z) = sigmoid(z)[..., None] + v`` (a parameter ``(1, 1, C)``),
    random output times inside the data's interval; ours ``(T, B, H)`` = torchcde's ``(B, T, H)`` transposed."""
    g = torch.Generator().manual_seed(9 + n_out)
    times = torch.sort(torch.rand(L, generator=g)).values
    x = torch.rand(B, L, C, generator=g)
    out_times = torch.sort(torch.rand(n_out, generator=g)).values * (times[-1] - times[0]) + times[0]

    class Sigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.variable = nn.Parameter(torch.linspace(0.1, 0.4, C).reshape(1, 1, C))

        def forward(self, t, z):
            return z.sigmoid().unsqueeze(-1) + self.variable

    coeffs = interp.hermite_cubic_coefficients_with_backward_differences(x, times)
    z0 = torch.rand(B, H, generator=g)
    ref = torchcde.cdeint(torchcde.CubicSpline(coeffs, times), Sigmoid(), z0, out_times, method="dopri5", rtol=1e-10, atol=1e-10)
    zs = deb.NeuralCDE(Sigmoid(), alg=deb.Tsit5(), rtol=1e-10, atol=1e-10)(coeffs, z0, ts=out_times, t=times)
    assert ref.shape == (B, n_out, H) and zs.shape == (n_out, B, H)
    assert torch.allclose(zs, ref.transpose(0, 1), rtol=1e-8, atol=1e-8), float((zs - ref.transpose(0, 1)).abs().max())


def test_natural_cubic_per_sample_grids_equal_one_sample_at_a_time():
    """Per-sample grids ``(B, L)`` NaN-padded at the end (beyond torchcde): each sample's natural spline
    is its own, as if computed alone on its observations (1e-12), and held after its last one."""
    g = torch.Generator().manual_seed(11)
    lengths = [L, 4, 6]
    t = torch.full((B, L), float("nan"))
    x = torch.full((B, L, C), float("nan"))
    for b, n in enumerate(lengths):
        t[b, :n] = torch.sort(torch.rand(n, generator=g) * 4).values
        x[b, :n] = torch.randn(n, C, generator=g)
    x[0, 3, 1] = float("nan")
    X = interp.CubicSpline(interp.natural_cubic_coeffs(x, t), t)
    for b, n in enumerate(lengths):
        alone = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x[b, :n], t[b, :n]), t[b, :n])
        for s in torch.linspace(float(t[b, 0]), float(t[b, n - 1]), 13):
            assert torch.allclose(X.evaluate(s)[b], alone.evaluate(s), rtol=1e-12, atol=1e-12), (b, float(s))
            assert torch.allclose(X.derivative(s)[b], alone.derivative(s), rtol=1e-12, atol=1e-12), (b, float(s))
        later = float(t[b, n - 1]) + 0.5
        assert torch.allclose(X.evaluate(later)[b], alone.evaluate(float(t[b, n - 1])), atol=1e-12)
        assert torch.equal(X.derivative(later)[b], torch.zeros(C))
