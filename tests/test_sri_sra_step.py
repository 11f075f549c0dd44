"""Step-level tests of the SRI (SRIW1, SOSRI) and SRA (SRA1, SOSRA) solvers.

These tests do not use the engine: a fixed-step loop below drives ``solver.step`` with
exact Gaussian increments ``dW ~ N(0, dt)`` and space-time Lévy areas ``H ~ N(0, dt/12)``
drawn on the finest grid and aggregated exactly to coarser grids, so every step size sees
the same Brownian path.

Problems (SciML SDEProblemLibrary, ``lib/SDEProblemLibrary/src/SDEProblemLibrary.jl``):

* ``prob_sde_linear``: du = 1.01 u dt + 0.87 u dW, u0 = 1/2,
  u = u0 exp((1.01 − 0.87²/2) t + 0.87 W).
* ``prob_sde_wave``: du = −0.01 sin(u) cos³(u) dt + 0.1 cos²(u) dW, u0 = 1,
  u = atan(0.1 W + tan(u0)).
* ``prob_sde_additive``: du = (β/√(1+t) − u/(2(1+t))) dt + αβ/√(1+t) dW, α = 0.1,
  β = 0.05, u0 = 1, u = u0/√(1+t) + β(t + αW)/√(1+t).

The solutions of these three depend on the path only through ``W_t`` (and the additive
noise is tiny), so they cannot detect a wrong Lévy area.  Two further tests do:
integrated Brownian motion (``dy1 = dW, dy2 = y1 dt``), which every consistent SRI/SRA
scheme integrates exactly when ``I_(1,0)`` is right, and nonlinear problems against a
fine-step reference, where dropping ``H`` lowers the observed order from ~1.5 to ~1.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

try:  # the package may not be installed in the venv yet
    import diffeqbridge.problem  # noqa: F401
except ModuleNotFoundError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffeqbridge.problem import SDEProblem, Terms
from diffeqbridge.solvers.base import AbstractSolver
from diffeqbridge.solvers.sra import SOSRA, SRA1, SRA3, SRA4, SRA5
from diffeqbridge.solvers.sri import SOSRI, SRIW1

DT = torch.float64
PATHS = 2000


# ----------------------------------------------------------------------------- helpers
def brownian_levels(paths: int, k_fine: int, n_levels: int, T: float, seed: int, dim: int = 1):
    """[(dW, H)] for N = 2**k_fine, 2**(k_fine-1), ...: each (N, paths, dim)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2**k_fine
    h = T / n
    dw = torch.randn(n, paths, dim, generator=gen, dtype=DT) * math.sqrt(h)
    hh = torch.randn(n, paths, dim, generator=gen, dtype=DT) * math.sqrt(h / 12)
    levels = [(dw, hh)]
    for _ in range(n_levels - 1):
        w1, w2 = dw[0::2], dw[1::2]
        h1, h2 = hh[0::2], hh[1::2]
        # int_0^{2h} W du = h(H1 + W1/2) + h W1 + h(H2 + W2/2) = 2h(H + (W1+W2)/2)
        dw, hh = w1 + w2, 0.5 * (h1 + h2) + 0.25 * (w1 - w2)
        levels.append((dw, hh))
    return levels


def integrate(
    solver: AbstractSolver, prob: SDEProblem, T: float, dw: torch.Tensor, hh: torch.Tensor, h_scale: float = 1.0
) -> torch.Tensor:
    terms = Terms(prob)
    n, b = dw.shape[0], dw.shape[1]
    dt = torch.full((b,), T / n, dtype=DT)
    t = torch.zeros(b, dtype=DT)
    y = prob.y0
    for k in range(n):
        y = solver.step(terms, t, y, dt, dw[k], h_scale * hh[k]).y1
        t = t + dt
    return y


def fitted_slope(dts: list[float], errs: list[float]) -> float:
    lx = torch.log(torch.tensor(dts, dtype=DT))
    ly = torch.log(torch.tensor(errs, dtype=DT))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def _col(t: torch.Tensor) -> torch.Tensor:
    return t[:, None]


PROBLEMS = {
    "linear": dict(
        f=lambda t, y: 1.01 * y,
        g=lambda t, y: 0.87 * y,
        u0=0.5,
        exact=lambda u0, T, W: u0 * torch.exp((1.01 - 0.87**2 / 2) * T + 0.87 * W),
        noise="diagonal",
    ),
    "wave": dict(
        f=lambda t, y: -0.01 * torch.sin(y) * torch.cos(y) ** 3,
        g=lambda t, y: 0.1 * torch.cos(y) ** 2,
        u0=1.0,
        exact=lambda u0, T, W: torch.atan(0.1 * W + math.tan(u0)),
        noise="diagonal",
    ),
    "additive": dict(
        f=lambda t, y: 0.05 / torch.sqrt(1 + _col(t)) - y / (2 * (1 + _col(t))),
        g=lambda t, y: (0.1 * 0.05 / torch.sqrt(1 + _col(t))).expand_as(y),
        u0=1.0,
        exact=lambda u0, T, W: u0 / math.sqrt(1 + T) + 0.05 * (T + 0.1 * W) / math.sqrt(1 + T),
        noise="additive",
    ),
}


def strong_order(solver: AbstractSolver, name: str, k_fine: int = 9, n_levels: int = 6) -> tuple[float, list[float]]:
    p = PROBLEMS[name]
    T = 1.0
    prob = SDEProblem(p["f"], p["g"], torch.full((PATHS, 1), p["u0"], dtype=DT), (0.0, T), noise=p["noise"])
    levels = brownian_levels(PATHS, k_fine, n_levels, T, seed=2024)
    w_T = levels[0][0].sum(0)
    exact = p["exact"](p["u0"], T, w_T)
    errs, dts = [], []
    for dw, hh in levels:
        y = integrate(solver, prob, T, dw, hh)
        errs.append(float((y - exact).abs().mean()))
        dts.append(T / dw.shape[0])
    return fitted_slope(dts, errs), errs


# ----------------------------------------------------------------------------- metadata
def test_metadata():
    for cls in (SRIW1, SOSRI):
        assert cls.strong_order == 1.5 and cls.weak_order == 2.0
        assert cls.noise_types == frozenset({"diagonal", "scalar", "additive"})
        assert cls.interpretations == frozenset({"ito"})
        assert cls.adaptive and cls.needs_levy_area and cls.is_sde and not cls.fsal
        assert cls.controller_order == 1.5
    for cls in (SRA1, SOSRA, SRA3):
        assert cls.strong_order == 1.5 and cls.weak_order == (3.0 if cls is SRA3 else 2.0)
        assert cls.noise_types == frozenset({"additive"})
        assert cls.interpretations == frozenset({"ito", "stratonovich"})
        assert cls.adaptive and cls.needs_levy_area and cls.is_sde and not cls.fsal
        assert cls.controller_order == 2.0
    for cls in (SRIW1, SOSRI, SRA1, SOSRA, SRA3):
        assert (cls.qmax, cls.qmin, cls.gamma) == (9 / 8, 1 / 5, 9 / 10)
        assert cls.beta1 is None and cls.beta2 is None
    assert SRIW1().delta == pytest.approx(1 / 6)
    assert SOSRI().delta == SRA1().delta == SOSRA().delta == 1.0
    assert SRIW1(delta=0.5).delta == 0.5
    with pytest.raises(ValueError):
        SRIW1(delta=-1.0)


def test_tableau_order_conditions():
    """A few of Rößler's order conditions (sanity check against transcription errors)."""
    for cls in (SRIW1, SOSRI):
        tab = cls.tableau
        assert sum(tab.alpha) == pytest.approx(1.0)
        assert sum(tab.beta1) == pytest.approx(1.0)
        assert sum(tab.beta2) == pytest.approx(0.0, abs=1e-12)
        assert sum(tab.beta3) == pytest.approx(0.0, abs=1e-12)
        assert sum(tab.beta4) == pytest.approx(0.0, abs=1e-12)
        # sum_i alpha_i sum_j B0_ij = 1 (the I_(1,0) term of L^1 a)
        assert sum(a * sum(row) for a, row in zip(tab.alpha, tab.b0, strict=True)) == pytest.approx(1.0)
    for cls in (SRA1, SOSRA, SRA3):
        tab = cls.tableau
        assert sum(tab.alpha) == pytest.approx(1.0)
        assert sum(tab.beta1) == pytest.approx(1.0)
        assert sum(tab.beta2) == pytest.approx(0.0, abs=1e-12)
        assert sum(a * sum(row) for a, row in zip(tab.alpha, tab.b0, strict=True)) == pytest.approx(1.0)
    # SRA3's drift part is a third-order Runge-Kutta method (Butcher's conditions up to order 3)
    tab = SRA3.tableau
    c = [sum(row) for row in tab.a0]
    assert c == pytest.approx(list(tab.c0))
    assert sum(a * ci for a, ci in zip(tab.alpha, c, strict=True)) == pytest.approx(1 / 2)
    assert sum(a * ci * ci for a, ci in zip(tab.alpha, c, strict=True)) == pytest.approx(1 / 3)
    a_c = [sum(aij * cj for aij, cj in zip(row, c, strict=True)) for row in tab.a0]
    assert sum(a * x for a, x in zip(tab.alpha, a_c, strict=True)) == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------- strong order
@pytest.mark.parametrize("cls", [SRIW1, SOSRI])
@pytest.mark.parametrize("name", ["linear", "wave"])
def test_sri_strong_order(cls, name):
    slope, errs = strong_order(cls(), name)
    print(f"{cls.__name__} on prob_sde_{name}: strong order {slope:.3f}, errors {errs}")
    assert abs(slope - 1.5) <= 0.25, (slope, errs)


@pytest.mark.parametrize("cls", [SRA1, SOSRA, SRA3, SRIW1, SOSRI])
def test_additive_strong_order(cls):
    slope, errs = strong_order(cls(), "additive")
    print(f"{cls.__name__} on prob_sde_additive: strong order {slope:.3f} (SciML expects ~2), errors {errs}")
    assert slope >= 1.25, (slope, errs)


# ----------------------------------------------------------------------------- Lévy area
@pytest.mark.parametrize(
    "cls,noise",
    [
        (SRIW1, "diagonal"),
        (SRIW1, "scalar"),
        (SOSRI, "diagonal"),
        (SOSRI, "scalar"),
        (SRA1, "additive"),
        (SRA1, "scalar"),
        (SOSRA, "additive"),
        (SOSRA, "scalar"),
        (SRA3, "additive"),
        (SRA3, "scalar"),
        (SRA4, "additive"),
        (SRA4, "scalar"),
        (SRA5, "additive"),
    ],
)
def test_integrated_brownian_motion_is_exact(cls, noise):
    """dy1 = dW, dy2 = y1 dt: y2(T) = int_0^T W dt = sum_k dt (W_k + H_k + dW_k/2) exactly.

    Consistent SRI/SRA schemes reproduce this to round-off iff I_(1,0) = dt (H + dW/2),
    i.e. iff the Lévy-area mapping (ΔZ = 2√3 H) is right.  Dropping H breaks it.
    (SRA with a scalar-noise problem exercises ``terms.g_dw``; the diffusion is additive.)
    """
    paths, n, T = 64, 16, 1.0

    def f(t, y):
        return torch.stack([torch.zeros_like(y[:, 0]), y[:, 0]], dim=1)

    def g(t, y):
        return torch.stack([torch.ones_like(y[:, 0]), torch.zeros_like(y[:, 0])], dim=1)

    prob = SDEProblem(f, g, torch.zeros(paths, 2, dtype=DT), (0.0, T), noise=noise)
    dim = 1 if noise == "scalar" else 2
    ((dw, hh),) = brownian_levels(paths, 4, 1, T, seed=7, dim=dim)
    y = integrate(cls(), prob, T, dw, hh)
    w = torch.cumsum(dw[:, :, 0], 0)
    w_prev = w - dw[:, :, 0]
    h = T / n
    exact_y2 = (h * (w_prev + hh[:, :, 0] + 0.5 * dw[:, :, 0])).sum(0)
    torch.testing.assert_close(y[:, 0], w[-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(y[:, 1], exact_y2, rtol=0, atol=1e-12)
    y_no_h = integrate(cls(), prob, T, dw, hh, h_scale=0.0)
    assert float((y_no_h[:, 1] - exact_y2).abs().max()) > 1e-3


REF_PROBLEMS = {
    # L^1 a != L^0 b: the I_(1,0) terms matter
    "nl_diagonal": (lambda t, y: 2 * torch.sin(y) - y, lambda t, y: 0.5 * torch.cos(y) + 0.3 * y, "diagonal", (SRIW1, SOSRI)),
    "nl_additive": (lambda t, y: 2 * torch.sin(y) - y, lambda t, y: torch.ones_like(y), "additive", (SRA1, SOSRA, SRA3, SRA4)),
}


@pytest.mark.parametrize(
    "name,cls",
    [(n, c) for n, spec in REF_PROBLEMS.items() for c in spec[3]],
)
def test_strong_order_needs_levy_area(name, cls):
    """Against a fine-step reference (same path): order ~1.5 with H, ~1 without."""
    f, g, noise, _ = REF_PROBLEMS[name]
    paths, T = 1000, 1.0
    prob = SDEProblem(f, g, torch.full((paths, 1), 0.5, dtype=DT), (0.0, T), noise=noise)
    levels = brownian_levels(paths, 11, 10, T, seed=11)
    ref = integrate(cls(), prob, T, *levels[0])
    slopes = {}
    for scale in (1.0, 0.0):
        errs, dts = [], []
        for dw, hh in levels[5:10]:  # N = 64 ... 4
            errs.append(float((integrate(cls(), prob, T, dw, hh, h_scale=scale) - ref).abs().mean()))
            dts.append(T / dw.shape[0])
        slopes[scale] = fitted_slope(dts, errs)
    print(f"{cls.__name__} on {name}: order {slopes[1.0]:.3f} with H, {slopes[0.0]:.3f} without")
    assert slopes[1.0] >= 1.3, slopes
    assert slopes[0.0] <= 1.15, slopes


# ----------------------------------------------------------------------------- error estimate
def _one_step_errors(solver: AbstractSolver, prob: SDEProblem, dts: list[float]) -> list[float]:
    terms = Terms(prob)
    b = prob.batch_size
    gen = torch.Generator().manual_seed(5)
    z1 = torch.randn(b, 1, generator=gen, dtype=DT)
    z2 = torch.randn(b, 1, generator=gen, dtype=DT)
    out = []
    for h in dts:
        step = solver.step(
            terms, torch.zeros(b, dtype=DT), prob.y0, torch.full((b,), h, dtype=DT), z1 * math.sqrt(h), z2 * math.sqrt(h / 12)
        )
        assert step.error is not None and step.error.shape == prob.y0.shape
        out.append(float(step.error.abs().mean()))
    return out


@pytest.mark.parametrize("cls,name", [(SRIW1, "linear"), (SOSRI, "linear"), (SRA1, "additive"), (SOSRA, "additive")])
def test_error_estimate_rate(cls, name):
    """SciML's error = delta*E1 + E2: E1 = dt*sum(f_i) is O(dt) (StochasticDiffEq's
    definition), so that estimate shrinks like dt; the stochastic part E2 shrinks like dt^1.5,
    and so does the default embedded estimate dt*(sum(alpha_i f_i) - f_1) + E2."""
    p = PROBLEMS[name]
    prob = SDEProblem(p["f"], p["g"], torch.full((4000, 1), p["u0"], dtype=DT), noise=p["noise"])
    dts = [2.0**-k for k in range(3, 11)]
    full = fitted_slope(dts, _one_step_errors(cls(error_estimate="sciml"), prob, dts))
    e2_only = fitted_slope(dts, _one_step_errors(cls(error_estimate="sciml", delta=0.0), prob, dts))
    embedded = fitted_slope(dts, _one_step_errors(cls(), prob, dts))
    print(
        f"{cls.__name__}: error-estimate slope {full:.3f} (sciml, delta default), {e2_only:.3f} (E2 only), "
        f"{embedded:.3f} (embedded)"
    )
    assert 0.8 <= full <= 1.2
    assert e2_only >= 1.3
    assert 1.3 <= embedded <= 2.2  # O(dt^1.5) with multiplicative noise, O(dt^2) additive


def test_error_is_delta_e1_plus_e2():
    p = PROBLEMS["linear"]
    prob = SDEProblem(p["f"], p["g"], torch.full((16, 1), p["u0"], dtype=DT), noise="diagonal")
    terms = Terms(prob)
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.zeros(16, dtype=DT),
        prob.y0,
        torch.full((16,), 0.1, dtype=DT),
        torch.randn(16, 1, generator=gen, dtype=DT) * 0.1**0.5,
        torch.randn(16, 1, generator=gen, dtype=DT) * (0.1 / 12) ** 0.5,
    )
    for cls in (SRIW1, SOSRI):
        e2 = cls(error_estimate="sciml", delta=0.0).step(terms, *args).error
        e_1 = cls(error_estimate="sciml", delta=1.0).step(terms, *args).error
        e_d = cls(error_estimate="sciml").step(terms, *args).error
        e1 = e_1 - e2
        torch.testing.assert_close(e_d, cls.default_delta * e1 + e2)
    # SRIW1: E1 = dt (f(t, y) + f(t + 3dt/4, H0_2)), H0_2 = y + 3/4 dt f(t, y) + 3/2 chi2 g(t, y)
    _, y, dt, dw, hh = args
    h = dt[:, None]
    f1 = 1.01 * y
    h02 = y + 0.75 * h * f1 + 1.5 * (0.5 * dw + hh) * (0.87 * y)
    e1_expected = h * (f1 + 1.01 * h02)
    e2 = SRIW1(error_estimate="sciml", delta=0.0).step(terms, *args).error
    torch.testing.assert_close(SRIW1(error_estimate="sciml").step(terms, *args).error, e1_expected / 6 + e2)
    # embedded: dt (alpha_1 f_1 + alpha_2 f_2 - f_1) + E2 = dt (2/3)(f_2 - f_1) + E2, weighted per
    # unit step by (T/|dt|)^0.2 = 10^0.2 (base.UNIT_STEP_POWER)
    embedded = (h * (2 / 3) * (1.01 * h02 - f1) + e2) * 10**0.2
    torch.testing.assert_close(SRIW1().step(terms, *args).error, embedded)


# ----------------------------------------------------------------------------- counts, shapes, batching
class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, t, y):
        assert t.shape == (y.shape[0],)
        self.calls += 1
        return self.fn(t, y)


@pytest.mark.parametrize(
    "cls,nf,ng", [(SRIW1, 2, 4), (SOSRI, 4, 4), (SRA1, 2, 2), (SOSRA, 3, 3), (SRA3, 3, 2), (SRA4, 4, 2), (SRA5, 6, 2)]
)
def test_evaluation_counts(cls, nf, ng):
    f, g = _Counting(lambda t, y: -y), _Counting(lambda t, y: 0.3 * torch.ones_like(y))
    noise = "additive" if cls in (SRA1, SOSRA, SRA3, SRA4, SRA5) else "diagonal"
    prob = SDEProblem(f, g, torch.ones(5, 3, dtype=DT), noise=noise)
    b = 5
    out = cls().step(
        Terms(prob),
        torch.zeros(b, dtype=DT),
        prob.y0,
        torch.full((b,), 0.01, dtype=DT),
        torch.zeros(b, 3, dtype=DT),
        torch.zeros(b, 3, dtype=DT),
    )
    assert (out.nf, out.ng) == (nf, ng)
    assert (f.calls, g.calls) == (nf, ng)
    assert out.y1.shape == (b, 3) and out.error.shape == (b, 3) and out.f1 is None


@pytest.mark.parametrize("cls", [SRIW1, SOSRI, SRA1, SOSRA, SRA3, SRA4])
def test_per_sample_dt_and_state_shape(cls):
    """Each sample uses its own t and dt; trailing state shapes (here 2x3) are supported."""
    noise = "additive" if cls in (SRA1, SOSRA, SRA3, SRA4, SRA5) else "diagonal"

    def f(t, y):
        return -y * (1 + t.reshape(-1, 1, 1))

    def g(t, y):
        return (0.2 + 0.1 * t.reshape(-1, 1, 1)).expand_as(y) if noise == "additive" else 0.3 * torch.cos(y)

    b = 4
    gen = torch.Generator().manual_seed(1)
    y0 = torch.rand(b, 2, 3, generator=gen, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=DT)
    dt = torch.tensor([0.1, 0.01, 0.05, 0.2], dtype=DT)
    dw = torch.randn(b, 2, 3, generator=gen, dtype=DT) * dt.sqrt().reshape(-1, 1, 1)
    hh = torch.randn(b, 2, 3, generator=gen, dtype=DT) * (dt / 12).sqrt().reshape(-1, 1, 1)
    prob = SDEProblem(f, g, y0, noise=noise)
    batched = cls().step(Terms(prob), t, y0, dt, dw, hh)
    for i in range(b):
        pi = SDEProblem(f, g, y0[i : i + 1], noise=noise)
        single = cls().step(Terms(pi), t[i : i + 1], y0[i : i + 1], dt[i : i + 1], dw[i : i + 1], hh[i : i + 1])
        torch.testing.assert_close(batched.y1[i : i + 1], single.y1)
        torch.testing.assert_close(batched.error[i : i + 1], single.error)


def test_sri_scalar_noise_matches_diagonal_for_one_component():
    """Scalar noise (dW of shape (B,1)) on a 1-component state equals diagonal noise."""

    def f(t, y):
        return torch.sin(y)

    def g(t, y):
        return 0.5 * y

    b = 8
    gen = torch.Generator().manual_seed(2)
    y0 = torch.rand(b, 1, generator=gen, dtype=DT)
    dt = torch.full((b,), 0.05, dtype=DT)
    dw = torch.randn(b, 1, generator=gen, dtype=DT) * 0.05**0.5
    hh = torch.randn(b, 1, generator=gen, dtype=DT) * (0.05 / 12) ** 0.5
    t = torch.zeros(b, dtype=DT)
    for cls in (SRIW1, SOSRI):
        a = cls().step(Terms(SDEProblem(f, g, y0, noise="scalar")), t, y0, dt, dw, hh)
        d = cls().step(Terms(SDEProblem(f, g, y0, noise="diagonal")), t, y0, dt, dw, hh)
        torch.testing.assert_close(a.y1, d.y1)
        torch.testing.assert_close(a.error, d.error)


@pytest.mark.parametrize("cls", [SRIW1, SOSRI, SRA1, SOSRA, SRA3, SRA4])
def test_differentiable(cls):
    """Pure torch: gradcheck through one step w.r.t. the state and a drift parameter."""
    noise = "additive" if cls in (SRA1, SOSRA, SRA3, SRA4, SRA5) else "diagonal"
    theta = torch.tensor(0.7, dtype=DT, requires_grad=True)
    b = 3
    gen = torch.Generator().manual_seed(4)
    y0 = torch.rand(b, 2, generator=gen, dtype=DT, requires_grad=True)
    dt = torch.full((b,), 0.1, dtype=DT)
    dw = torch.randn(b, 2, generator=gen, dtype=DT) * 0.1**0.5
    hh = torch.randn(b, 2, generator=gen, dtype=DT) * (0.1 / 12) ** 0.5
    t = torch.zeros(b, dtype=DT)

    def fn(y, th):
        def f(t, y):
            return -th * torch.sin(y)

        def g(t, y):
            return 0.2 * torch.ones_like(y) if noise == "additive" else 0.4 * torch.cos(y) * th

        prob = SDEProblem(f, g, y.detach(), noise=noise)
        out = cls().step(Terms(prob), t, y, dt, dw, hh)
        return out.y1, out.error

    assert torch.autograd.gradcheck(fn, (y0, theta))


def test_float32_runs():
    p = PROBLEMS["linear"]
    prob = SDEProblem(p["f"], p["g"], torch.full((4, 1), 0.5), noise="diagonal")
    for cls in (SRIW1, SOSRI):
        z = torch.zeros(4, 1)
        out = cls().step(Terms(prob), torch.zeros(4), prob.y0, torch.full((4,), 0.1), z, z)
        assert out.y1.dtype == torch.float32 and out.error.dtype == torch.float32


def test_matches_written_out_sriw1_and_sra1():
    """The generic tableau steps equal SRIW1 / SRA1 written out stage by stage, with
    StochasticDiffEq's auxiliary ΔZ ~ N(0, dt) recovered as ΔZ = 2√3 H."""
    b = 6
    gen = torch.Generator().manual_seed(9)
    y = torch.rand(b, 2, generator=gen, dtype=DT) + 0.5
    t = torch.rand(b, generator=gen, dtype=DT)
    dt = torch.rand(b, generator=gen, dtype=DT) * 0.2 + 0.01
    h = dt[:, None]
    dw = torch.randn(b, 2, generator=gen, dtype=DT) * h.sqrt()
    hh = torch.randn(b, 2, generator=gen, dtype=DT) * (h / 12).sqrt()
    dz = 2 * math.sqrt(3) * hh
    chi1 = (dw**2 - h) / (2 * h.sqrt())
    chi2 = (dw + dz / math.sqrt(3)) / 2
    chi3 = (dw**3 - 3 * dw * h) / (6 * h)

    def f(t, y):
        return torch.sin(y) * (1 + t[:, None])

    def g(t, y):
        return 0.4 * y * torch.cos(t[:, None])

    sq = h.sqrt()
    k1 = h * f(t, y)
    g1 = g(t, y)
    h0 = y + 0.75 * k1 + 1.5 * chi2 * g1
    g2 = g(t + dt / 4, y + k1 / 4 + sq * g1 / 2)
    g3 = g(t + dt, y + k1 - sq * g1)
    g4 = g(t + dt / 4, y + k1 / 4 + sq * (-5 * g1 + 3 * g2 + g3 / 2))
    k2 = h * f(t + 0.75 * dt, h0)
    e2 = chi2 * (2 * g1 - 4 * g2 / 3 - 2 * g3 / 3) + chi3 * (-2 * g1 + 5 * g2 / 3 - 2 * g3 / 3 + g4)
    y1 = y + (k1 + 2 * k2) / 3 + dw * (-g1 + 4 * g2 / 3 + 2 * g3 / 3) + chi1 * (-g1 + 4 * g2 / 3 - g3 / 3) + e2
    out = SRIW1().step(Terms(SDEProblem(f, g, y, noise="diagonal")), t, y, dt, dw, hh)
    torch.testing.assert_close(out.y1, y1)
    torch.testing.assert_close(
        SRIW1(error_estimate="sciml").step(Terms(SDEProblem(f, g, y, noise="diagonal")), t, y, dt, dw, hh).error,
        (k1 + k2) / 6 + e2,
    )
    # embedded: y1 minus the order-1 solution, weighted per unit step by (T/|dt|)^0.2 (T = 1)
    torch.testing.assert_close(out.error, (2 * (k2 - k1) / 3 + e2) * h ** (-0.2))

    def sig(t, y):
        return (0.3 + t[:, None] ** 2).expand_as(y)

    gt, gpdt = sig(t, y), sig(t + dt, y)
    k1 = h * f(t, y)
    k2 = h * f(t + 0.75 * dt, y + 0.75 * k1 + 1.5 * chi2 * gpdt)
    e2 = chi2 * (gt - gpdt)
    y1 = y + k1 / 3 + 2 * k2 / 3 + e2 + dw * gpdt
    out = SRA1(error_estimate="sciml").step(Terms(SDEProblem(f, sig, y, noise="additive")), t, y, dt, dw, hh)
    torch.testing.assert_close(out.y1, y1)
    torch.testing.assert_close(out.error, (k1 + k2) + e2)
    out = SRA1().step(Terms(SDEProblem(f, sig, y, noise="additive")), t, y, dt, dw, hh)
    torch.testing.assert_close(out.error, 2 * (k2 - k1) / 3 + e2)
