"""Per-component tolerances (SciML's vector ``abstol``, torchdiffeq's tensor ``atol``/``rtol``):
one tolerance per state component, the same for every sample, through the public ``solve``."""

from __future__ import annotations

import math

import pytest
import torch

import diffeqbridge as deb

F64 = torch.float64
RATES = torch.tensor([-1.0, -10.0], dtype=F64)
SMALL = 1e-8  # the second component's scale: invisible to one absolute tolerance of 1e-6


def _decay(batch: int = 3) -> deb.ODEProblem:
    y0 = torch.tensor([1.0, SMALL], dtype=F64).expand(batch, 2).clone()
    return deb.ODEProblem(lambda t, y: RATES * y, y0, (0.0, 1.0))


def _relative_errors(sol: deb.Solution) -> torch.Tensor:
    exact = torch.tensor([1.0, SMALL], dtype=F64) * torch.exp(RATES)
    return ((sol.ys[-1] - exact).abs() / exact).max(dim=0).values


@pytest.mark.parametrize("alg", [deb.Tsit5, deb.Dopri5, deb.Rodas4, deb.Kvaerno5], ids=lambda a: a.__name__)
def test_a_tight_component_tolerance_resolves_a_small_component(alg):
    loose = deb.solve(_decay(), alg(), atol=1e-6, rtol=0.0)
    per_component = deb.solve(_decay(), alg(), atol=torch.tensor([1e-6, 1e-6 * SMALL], dtype=F64), rtol=0.0)
    assert loose.success and per_component.success
    rel_loose, rel_tight = _relative_errors(loose), _relative_errors(per_component)
    # the small component (4.5e-13 at t = 1) is unresolved by atol = 1e-6, resolved by its own 1e-14
    assert float(rel_loose[1]) > 3e-3
    assert float(rel_tight[1]) < 3e-3 and float(rel_tight[1]) < float(rel_loose[1]) / 10
    assert bool((per_component.stats.naccept > loose.stats.naccept).all())


def test_constant_tensor_tolerances_equal_the_number_bit_for_bit():
    prob = _decay()
    as_number = deb.solve(prob, deb.Tsit5(), atol=1e-7, rtol=1e-5)
    as_tensor = deb.solve(prob, deb.Tsit5(), atol=torch.full((2,), 1e-7, dtype=F64), rtol=[1e-5, 1e-5])
    assert torch.equal(as_number.ys, as_tensor.ys) and torch.equal(as_number.stats.naccept, as_tensor.stats.naccept)


def test_state_shaped_tolerances_broadcast_over_matrix_states():
    y0 = torch.ones(2, 2, 3, dtype=F64)
    prob = deb.ODEProblem(lambda t, y: -y, y0, (0.0, 1.0))
    row = deb.solve(prob, deb.Tsit5(), atol=torch.tensor([[1e-9], [1e-3]], dtype=F64), rtol=0.0)  # (2, 1) -> (2, 3)
    assert row.success
    err = (row.ys[-1] - math.exp(-1)).abs()
    assert float(err[:, 0].max()) < 1e-7


def test_sde_and_backsolve_gradient_with_per_component_tolerances():
    mu = torch.tensor([0.5, 1.0], dtype=F64, requires_grad=True)

    def f(t, y):
        return mu * y

    def g(t, y):
        return 0.2 * y

    y0 = torch.ones(8, 2, dtype=F64)
    atol = torch.tensor([1e-3, 1e-4], dtype=F64)
    prob = deb.SDEProblem(f, g, y0, (0.0, 1.0), params=[mu])
    sol = deb.solve(prob, deb.SRIW1(), atol=atol, rtol=1e-3, seed=3)
    assert sol.success
    ref = deb.solve(prob, deb.SRIW1(), atol=1e-4, rtol=1e-3, seed=3)
    # the same path: both within their tolerances of each other on this smooth problem
    assert float((sol.ys[-1] - ref.ys[-1]).detach().abs().max()) < 5e-2
    grad = torch.autograd.grad(sol.ys[-1].sum(), mu)[0]
    back = deb.solve(prob, deb.SRIW1(), atol=atol, rtol=1e-3, seed=3, sensealg=deb.BacksolveAdjoint())
    grad_back = torch.autograd.grad(back.ys[-1].sum(), mu)[0]
    # d/dmu_i sum_b y_i(1) = sum_b y_i(1) for GBM (y_i(1) = exp((mu_i - 0.02) + 0.2 W_i))
    exact = sol.ys[-1].detach().sum(0)
    assert torch.allclose(grad, exact, rtol=5e-2) and torch.allclose(grad_back, exact, rtol=5e-2)


@pytest.mark.parametrize("alg", [deb.Kvaerno5, deb.ImplicitEM, deb.SKenCarp], ids=lambda a: a.__name__)
def test_implicit_solvers_take_per_component_tolerances_into_newton(alg):
    """Newton's stopping test is kappa times the solve's tolerances: per component too."""
    rates = torch.tensor([-50.0, -1.0], dtype=F64)
    y0 = torch.ones(4, 2, dtype=F64)
    tol = torch.tensor([1e-3, 1e-5], dtype=F64)
    if alg is deb.Kvaerno5:
        prob = deb.ODEProblem(lambda t, y: rates * y, y0, (0.0, 1.0))
        kwargs = {}
    else:
        prob = deb.SDEProblem(lambda t, y: rates * y, lambda t, y: 0.01 * torch.ones_like(y), y0, (0.0, 1.0), noise="additive")
        kwargs = {"seed": 0}
    sol = deb.solve(prob, alg(), atol=tol, rtol=tol, **kwargs)
    ref = deb.solve(prob, alg(), atol=1e-5, rtol=1e-5, **kwargs)
    assert sol.success and ref.success
    assert float((sol.ys[-1] - ref.ys[-1]).abs().max()) < 5e-2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"atol": torch.ones(3)}, ValueError, r"^atol of shape \(3,\) does not broadcast to the state shape \(2,\)"),
        ({"rtol": [1e-3, -1e-3]}, ValueError, r"^rtol must be non-negative and finite in every component"),
        ({"atol": [1e-3, float("nan")]}, ValueError, r"^atol must be non-negative and finite"),
        ({"atol": [0.0, 1e-3], "rtol": [0.0, 1e-3]}, ValueError, r"^atol and rtol cannot both be zero \(in any component\)"),
        ({"atol": ["a", "b"]}, TypeError, r"^atol must be a number or a sequence/tensor of numbers"),
        ({"atol": torch.tensor([1e-3, 1e-3], dtype=torch.complex128)}, TypeError, r"^atol must be a real tensor"),
    ],
)
def test_bad_per_component_tolerances_are_refused_before_integration(kwargs, error, message):
    calls = []
    y0 = torch.ones(2, 2, dtype=F64)
    prob = deb.ODEProblem(lambda t, y: calls.append(t) or -y, y0, (0.0, 1.0))
    with pytest.raises(error, match=message):
        deb.solve(prob, deb.Tsit5(), **kwargs)
    assert len(calls) == 0
