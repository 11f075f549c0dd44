"""SPaRK (splitting path Runge–Kutta, Foster 2023): strong orders, error estimate, metadata.

Fixed-step strong errors at T = 1 on the same Brownian path per problem (float64, 200 paths,
dt = 2^-3 ... 2^-8), slope fitted by ``problems.fitted_order``.  Theory: 1.0 for commutative
noise (diagonal, scalar, commuting general), both interpretations (Itô through the
finite-difference drift correction); 1.5 for additive noise, where SciML's problems show the
drift's order 2 (small noise), as for SRA1/ShARK.  Measured (seed 3): linear Itô 0.95,
linear Stratonovich 0.96, wave 0.96, cubic 0.96, tan(u) Stratonovich 0.93, commuting general
noise 0.95, additive 2.0.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import additive_system, cubic, fitted_order, linear, strong_error, tangent_stratonovich, tree_for, wave

import diffeqbridge as deb
from diffeqbridge.problem import Terms
from diffeqbridge.solvers.spark import X1, X2, ito_correction, spark_step

F64 = torch.float64
PATHS = 200
KS = range(3, 9)

SIGMA = ((0.4, 0.3), (0.2, 0.5))  # g_ij = SIGMA[i][j] y_i: the columns commute
MU = (0.6, -0.3)


def commuting_general(batch: int):
    """``dy_i = μ_i y_i dt + Σ_j σ_ij y_i dW_j`` (Itô, general noise, m = 2, commuting
    columns): ``y_i = y0_i exp((μ_i − Σ_j σ_ij²/2) t + Σ_j σ_ij W_j)``."""
    sigma = torch.tensor(SIGMA, dtype=F64)
    mu = torch.tensor(MU, dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    prob = deb.SDEProblem(
        lambda t, y: mu * y,
        lambda t, y: sigma * y.unsqueeze(-1),
        y0.expand(batch, 2).clone(),
        (0.0, 1.0),
        noise="general",
        noise_dim=2,
    )
    rate = mu - 0.5 * (sigma**2).sum(1)

    def exact(t: float, w: torch.Tensor) -> torch.Tensor:
        return y0 * torch.exp(rate * t + w @ sigma.T)

    return prob, exact


PROBLEMS = {
    "linear-ito": lambda b: linear(b),
    "linear-stratonovich": lambda b: linear(b, "stratonovich"),
    "wave": wave,
    "cubic": cubic,
    "tangent-stratonovich": tangent_stratonovich,
    "general-commuting": commuting_general,
}


def _order(builder, ks=KS, seed=3):
    prob, exact = builder(PATHS)
    bm = tree_for(prob, seed, tol=2.0**-10)
    dts, errors = [], []
    for k in ks:
        sol = deb.solve(prob, deb.SPaRK(), dt=2.0**-k, adaptive=False, brownian=bm)
        assert sol.success
        dts.append(2.0**-k)
        errors.append(strong_error(sol, exact, bm))
    return fitted_order(dts, errors), errors


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_strong_order_commutative_noise(name):
    order, errors = _order(PROBLEMS[name])
    assert abs(order - 1.0) <= 0.25, (order, errors)


def test_strong_order_additive():
    order, errors = _order(additive_system, ks=range(1, 6))
    assert order >= 1.75, (order, errors)


def test_tableau_conditions():
    """Drift and ΔW weights sum to 1; Σ b c = 1/2 (order-2 drift); the embedded Heun weights
    (1/2, 0, 1/2) differ from the method's by the error weights."""
    assert 2 * X1 + X2 == pytest.approx(1.0)
    assert X2 * 0.5 + X1 * 1.0 == pytest.approx(0.5)
    assert X1 == pytest.approx((3 - math.sqrt(3)) / 6)


def test_error_estimate_is_embedded_heun():
    """``y1 − error`` is the stochastic Heun step from the same stages (Stratonovich)."""
    torch.manual_seed(0)
    B = 5
    y = torch.rand(B, 3, dtype=F64) + 0.5
    prob = deb.SDEProblem(
        lambda t, y: torch.sin(y) * (1 + t[:, None]),
        lambda t, y: 0.3 * torch.cos(y),
        y,
        noise="diagonal",
        interpretation="stratonovich",
    )
    terms = Terms(prob)
    t = torch.zeros(B, dtype=F64)
    dt = torch.full((B,), 0.1, dtype=F64)
    dw, hh = 0.3 * torch.randn(B, 3, dtype=F64), 0.1 * torch.randn(B, 3, dtype=F64)
    out = spark_step(terms, t, y, dt, dw, hh)
    f, g = terms.drift, terms.diffusion
    z2 = y + 0.05 * f(t, y) + g(t, y) * (0.5 * dw + math.sqrt(3) * hh)
    z3 = y + 0.1 * f(t + 0.05, z2) + g(t + 0.05, z2) * dw
    heun = y + 0.05 * (f(t, y) + f(t + 0.1, z3)) + 0.5 * (g(t, y) + g(t + 0.1, z3)) * dw
    torch.testing.assert_close(out.y1 - out.error, heun, rtol=1e-13, atol=1e-13)
    assert (out.nf, out.ng) == (3, 3)


def test_ito_correction():
    """The Itô → Stratonovich drift ``−½ Σ_j (∂g_j/∂y) g_j`` by forward differences: GBM
    ``−σ²/2 y`` (one diffusion evaluation), commuting general noise ``−½ Σ_j σ_ij² y_i``
    (``m = 2`` evaluations); and an Itô step costs one diffusion evaluation more."""
    prob, _ = linear(4)
    y = torch.tensor([[0.5], [2.0], [-1.0], [0.0]], dtype=F64)
    t = torch.zeros(4, dtype=F64)
    terms = Terms(prob)
    c, ng = ito_correction(terms, t, y, terms.diffusion(t, y))
    torch.testing.assert_close(c, -(0.87**2) / 2 * y, rtol=1e-7, atol=1e-300)
    assert ng == 1
    prob_g, _ = commuting_general(4)
    terms_g = Terms(prob_g)
    yg = torch.rand(4, 2, dtype=F64) + 0.5
    c, ng = ito_correction(terms_g, t, yg, terms_g.diffusion(t, yg))
    torch.testing.assert_close(c, -0.5 * (torch.tensor(SIGMA, dtype=F64) ** 2).sum(1) * yg, rtol=1e-7, atol=0)
    assert ng == 2
    dt = torch.full((4,), 0.25, dtype=F64)
    dw = hh = torch.zeros(4, 1, dtype=F64)
    assert (
        spark_step(terms, t, y, dt, dw, hh).ng,
        spark_step(terms_g, t, yg, dt, torch.zeros(4, 2, dtype=F64), torch.zeros(4, 2, dtype=F64)).ng,
    ) == (4, 5)


def test_adaptive_error_follows_tolerance():
    """Adaptive SPaRK on GBM (Itô): the error decreases with the tolerance and stays below
    10·tol·|u| (B = 64, seed 7)."""
    prob, exact = linear(64)
    bm = tree_for(prob, seed=7)
    errors = []
    for tol in (1e-2, 1e-3, 1e-4):
        sol = deb.solve(prob, deb.SPaRK(), atol=tol, rtol=tol, brownian=bm)
        assert sol.success
        errors.append(strong_error(sol, exact, bm))
        assert errors[-1] <= 10 * tol * max(float(sol.ys[-1].abs().mean()), 1.0), errors
    assert errors[0] > errors[1] > errors[2]


def test_metadata_and_validation():
    assert deb.SPaRK.adaptive and deb.SPaRK.needs_levy_area and deb.SPaRK.is_sde
    assert deb.SPaRK.noise_types == frozenset({"diagonal", "scalar", "additive", "general"})
    assert deb.SPaRK.interpretations == frozenset({"ito", "stratonovich"})
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match="SPaRK"):
        deb.solve(prob, deb.SPaRK())


def test_unit_step_power_argument():
    """``θ`` of the per-unit-step weighting: SPaRK/SRI default 0.2, SRA 0, AutoSOSRI's SOSRI 0
    (its switching thresholds were measured unweighted); the step's error scales by
    ``(T/|dt|)^θ`` (T = 1, dt = 1/4: 4^0.2)."""
    assert deb.SPaRK().unit_step_power == deb.SRIW1().unit_step_power == 0.2
    assert deb.SRA1().unit_step_power == 0.0 and deb.AutoSOSRI().nonstiff.unit_step_power == 0.0
    assert repr(deb.SOSRI(unit_step_power=0.0)) == "SOSRI(unit_step_power=0.0)"
    for bad in (-0.1, 2.0, "x"):
        with pytest.raises(ValueError, match="unit_step_power"):
            deb.SPaRK(unit_step_power=bad)
    prob, _ = linear(3)
    t = torch.zeros(3, dtype=F64)
    dt = torch.full((3,), 0.25, dtype=F64)
    dw, hh = torch.tensor([[0.3], [-0.2], [0.1]], dtype=F64), torch.tensor([[0.05], [0.0], [-0.1]], dtype=F64)
    plain = deb.SPaRK(unit_step_power=0.0).step(Terms(prob), t, prob.y0, dt, dw, hh).error
    weighted = deb.SPaRK().step(Terms(prob), t, prob.y0, dt, dw, hh).error
    torch.testing.assert_close(weighted, plain * 4**0.2)
