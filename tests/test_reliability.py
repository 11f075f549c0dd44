"""Issue 15: no silent wrong answers, no NaN leaking into healthy gradients, float32 that
works, bad input refused up front.  One section per numbered item of the issue; the
reproducers of the issue are the assertions.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.nonlinear import NewtonOptions, newton_tolerances

F64, F32 = torch.float64, torch.float32


# ------------------------------------------------ 1. a failed sample and shared gradients
def _blowup_gradient(sensealg, alg):
    """p y² from u0 = 10 blows up before t = 1 (retcode != Success); the loss uses only the
    healthy samples.  Returns ``(p.grad, retcodes)``."""
    p = torch.tensor(1.0, dtype=F64, requires_grad=True)
    u0 = torch.tensor([[10.0], [0.1], [0.5], [-1.0]], dtype=F64)
    prob = deb.ODEProblem(lambda t, y: p * y * y, u0, (0.0, 1.0), params=[p])
    sol = deb.solve(prob, alg, atol=1e-8, rtol=1e-8, sensealg=sensealg)
    sol.ys[-1][sol.retcodes == int(deb.ReturnCode.Success)].sum().backward()
    return p.grad, sol.retcodes


@pytest.mark.parametrize(
    "sensealg, alg",
    [
        (deb.BacksolveAdjoint(), deb.Tsit5()),
        (deb.BacksolveAdjoint(), deb.Rodas4()),
        (deb.DiscreteAdjoint(checkpoints=2), deb.Tsit5()),
        (deb.DiscreteAdjoint(checkpoints=2), deb.Rodas4()),
        (deb.InterpolatingAdjoint(checkpoints=2), deb.Tsit5()),
    ],
    ids=lambda x: repr(x) if isinstance(x, deb.DiscreteAdjoint | deb.InterpolatingAdjoint) else type(x).__name__,
)
def test_failed_sample_does_not_nan_the_shared_gradient(sensealg, alg):
    grad, retcodes = _blowup_gradient(sensealg, alg)
    assert int(retcodes[0]) != int(deb.ReturnCode.Success) and bool((retcodes[1:] == 1).all())
    # d/dp of Σ u(1) over the healthy samples, u = u0 / (1 - p u0 t): Σ u0² / (1 - u0)²
    exact = sum(u0 * u0 / (1 - u0) ** 2 for u0 in (0.1, 0.5, -1.0))
    assert torch.isfinite(grad)
    assert abs(float(grad) - exact) < 1e-5 * exact  # the default sensealg gives 1.262346


def test_a_loss_on_the_failed_sample_still_reports_nan():
    """No nan_to_num: a loss on the failed sample's unreached save time is NaN.  Its gradient
    is the one of the returned numbers: the checkpointed forward is the plain solve (engine
    snapshots), and the NaN fill of a save time never reached carries no gradient, exactly
    as with ``DiscreteAdjoint()``."""
    grads = []
    for sensealg in (deb.DiscreteAdjoint(), deb.InterpolatingAdjoint(checkpoints=2)):
        p = torch.tensor(1.0, dtype=F64, requires_grad=True)
        u0 = torch.tensor([[10.0], [0.1]], dtype=F64)
        prob = deb.ODEProblem(lambda t, y: p * y * y, u0, (0.0, 1.0), params=[p])
        sol = deb.solve(prob, deb.Tsit5(), atol=1e-8, rtol=1e-8, sensealg=sensealg)
        loss = sol.ys[-1].sum()
        assert torch.isnan(loss)
        loss.backward()
        grads.append(p.grad)
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------ 2. detached parameters are reported
@pytest.mark.parametrize(
    "sensealg", [deb.InterpolatingAdjoint(), deb.DiscreteAdjoint(checkpoints=2), deb.BacksolveAdjoint()], ids=repr
)
@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_detached_parameter_warns(sensealg, how):
    p = torch.tensor(1.0, dtype=F64, requires_grad=True)
    q = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def f(t, y):
        if how == "detach":
            return -p.detach() * y + q * y
        with torch.no_grad():
            a = -p * y
        return a + q * y

    prob = deb.ODEProblem(f, torch.ones(2, 1, dtype=F64), (0.0, 1.0), params=[q, p])
    with pytest.warns(UserWarning, match=r"params\[1\] \(shape \(\)\).*not through autograd"):
        deb.solve(prob, deb.Tsit5(), sensealg=sensealg)


def test_used_and_unused_parameters_do_not_warn():
    """A parameter used through autograd, or not touched at all (an encoder living in the
    same module), gives no warning."""
    p = torch.tensor(1.0, dtype=F64, requires_grad=True)
    unused = torch.zeros(3, dtype=F64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -p * y, torch.ones(2, 1, dtype=F64), (0.0, 1.0), params=[p, unused])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = deb.solve(prob, deb.Tsit5(), sensealg=deb.InterpolatingAdjoint())
    sol.ys[-1].sum().backward()
    torch.testing.assert_close(p.grad, torch.tensor(-2 * math.exp(-1), dtype=F64), rtol=1e-4, atol=0)


# ------------------------------------------------ 3. time is float64 whatever the state
def _late_start(t0: float):
    """y' = cos(t - t0) from t0: y(t0 + 1) = sin(1), float32 state."""
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return torch.cos(t - t0)[:, None] * torch.ones_like(y)

    prob = deb.ODEProblem(f, torch.zeros(2, 1, dtype=F32), (t0, t0 + 1.0))
    return deb.solve(prob, deb.Tsit5(), atol=1e-6, rtol=1e-6), seen


def test_fields_receive_float64_time_for_a_float32_state():
    sol, seen = _late_start(0.0)
    assert set(seen) == {F64}
    assert sol.ys.dtype == F32
    assert abs(float(sol.ys[-1, 0, 0]) - math.sin(1.0)) < 1e-5


@pytest.mark.parametrize("t0", [1e6, 1e9])
def test_float32_state_at_a_large_start_time(t0):
    sol, _ = _late_start(t0)
    assert sol.success
    assert abs(float(sol.ys[-1, 0, 0]) - math.sin(1.0)) < 1e-5


# ------------------------------------------------ 4. additive noise and field shapes
def test_state_dependent_diffusion_claimed_additive_is_refused():
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.5 * y, torch.ones(3, 1, dtype=F64), noise="additive")
    with pytest.raises(ValueError, match="noise='additive'"):
        deb.solve(prob, deb.SOSRA())


def test_additive_diffusion_depending_on_time_is_accepted():
    prob = deb.SDEProblem(
        lambda t, y: -y, lambda t, y: (0.1 * (1 + t))[:, None].expand(-1, 2), torch.ones(3, 2, dtype=F64), noise="additive"
    )
    sol = deb.solve(prob, deb.SOSRA())
    assert sol.success
    assert int(sol.stats.ng[0]) >= 2  # the probe is counted


def test_drift_changing_shape_during_the_solve_is_an_error():
    calls = []

    def f(t, y):
        calls.append(1)
        return -y if len(calls) < 3 else -y[:, :1]  # broadcasts silently against y

    prob = deb.ODEProblem(f, torch.ones(2, 3, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"f\(t, y\) returned shape \(2, 1\) during the solve"):
        deb.solve(prob, deb.Tsit5())


# ------------------------------------------------ 5. Rosenbrock gradients
def _logistic_gradient(jac):
    y0 = torch.tensor([[0.5]], dtype=F64, requires_grad=True)
    sol = deb.solve(deb.ODEProblem(lambda t, y: y * (1 - y), y0, (0.0, 1.0)), deb.Rodas4(jac=jac), atol=1e-10, rtol=1e-10)
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    exact = math.e / (0.5 + 0.5 * math.e) ** 2  # y = y0 e^t / (1 - y0 + y0 e^t)
    return float(grad), exact


def test_rodas4_gradient_is_exact_with_autodiff_jacobian():
    grad, exact = _logistic_gradient("autodiff")
    assert abs(grad / exact - 1) < 1e-8  # was 2.2e-4 with the Jacobian detached


def test_rodas4_gradient_with_finite_difference_jacobian_is_documented_accuracy():
    grad, exact = _logistic_gradient("fd")
    assert 1e-5 < abs(grad / exact - 1) < 1e-3  # J is a constant to autograd (module docstring)


def test_rodas4_parameter_gradient_matches_finite_differences():
    def final(lam):
        prob = deb.ODEProblem(lambda t, y: lam * y * (1 - y), torch.tensor([[0.2]], dtype=F64), (0.0, 2.0))
        return deb.solve(prob, deb.Rodas4(), atol=1e-10, rtol=1e-10).ys[-1].sum()

    lam = torch.tensor(1.5, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(final(lam), lam)
    # exact: y = y0 / (y0 + (1 - y0) e^{-λT});  dy/dλ = y0 (1 - y0) T e^{-λT} / (...)²
    e = math.exp(-1.5 * 2.0)
    exact = 0.2 * 0.8 * 2.0 * e / (0.2 + 0.8 * e) ** 2
    assert abs(float(grad) / exact - 1) < 1e-7


# ------------------------------------------------ 6. step sizes independent of the batch
def test_sub_batch_takes_the_same_steps():
    y0 = torch.linspace(0.5, 2.0, 37, dtype=F64).reshape(37, 1)

    def prob(y):
        return deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.3 * y, y, noise="diagonal")

    full = deb.solve(prob(y0), deb.SOSRI(), atol=1e-2, rtol=1e-2, seed=1)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (37, 1), seed=1)
    assert torch.equal(full.ys, deb.solve(prob(y0), deb.SOSRI(), atol=1e-2, rtol=1e-2, brownian=bm).ys)
    # the first 5 samples alone: their own tree keys are the same (per-sample hashing)
    sub = deb.solve(prob(y0[:5]), deb.SOSRI(), atol=1e-2, rtol=1e-2, seed=1)
    assert torch.equal(sub.stats.naccept, full.stats.naccept[:5])
    assert torch.equal(sub.ys, full.ys[:, :5])


# ------------------------------------------------ 7. Newton in float32
def test_newton_tolerances_follow_the_solve_and_the_dtype():
    opts = NewtonOptions()
    assert newton_tolerances(opts, F64, (1e-6, 1e-4)) == pytest.approx((1e-8, 1e-6))
    assert newton_tolerances(opts, F64, None) == (1e-10, 1e-8)  # fixed step
    _, rtol = newton_tolerances(opts, F32, None)
    assert rtol == pytest.approx(50 * torch.finfo(F32).eps)  # 1e-8 is below float32's resolution
    assert newton_tolerances(NewtonOptions(atol=1e-3, rtol=1e-3), F64, (1e-6, 1e-6)) == (1e-3, 1e-3)


def test_kvaerno5_float32_converges():
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=F32), (0.0, 1.0))
    sol = deb.solve(prob, deb.Kvaerno5(), atol=1e-4, rtol=1e-4)
    assert sol.success
    assert int(sol.stats.naccept.max()) < 30 and int(sol.stats.nreject.max()) <= 2
    assert abs(float(sol.ys[-1, 0, 0]) - math.exp(-1)) < 1e-3


@pytest.mark.parametrize(
    "alg", [deb.ImplicitEM(), deb.ImplicitRKMil(), deb.ISSEM(), deb.SKenCarp()], ids=lambda a: type(a).__name__
)
def test_implicit_sde_solvers_float32_converge(alg):
    noise = "additive" if isinstance(alg, deb.SKenCarp) else "diagonal"

    def make(dtype):
        return deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * torch.ones_like(y), torch.ones(2, 1, dtype=dtype), noise=noise)

    sol = deb.solve(make(F32), alg, seed=3)
    ref = deb.solve(make(F64), alg, seed=3)
    assert sol.success
    assert int(sol.stats.nreject.max()) <= int(ref.stats.nreject.max()) + 2
    assert int(sol.stats.naccept.max()) <= 2 * int(ref.stats.naccept.max()) + 5
    torch.testing.assert_close(sol.ys[-1].double(), ref.ys[-1], rtol=0, atol=0.05)


# ------------------------------------------------ 8. a diverging sample stops early
# unstable_check: stop a blowing-up sample with ReturnCode.Unstable
def test_diverging_sample_stops_early_with_unstable():
    y0 = torch.tensor([[10.0], [0.1], [0.2], [0.3]], dtype=F64)
    prob = deb.SDEProblem(lambda t, y: y * y, lambda t, y: 0.01 * torch.ones_like(y), y0)
    sol = deb.solve(prob, deb.SOSRI(), max_steps=1500)
    assert int(sol.retcodes[0]) == int(deb.ReturnCode.Unstable)
    assert bool((sol.retcodes[1:] == int(deb.ReturnCode.Success)).all())
    assert int(sol.stats.naccept[0] + sol.stats.nreject[0]) < 1000


# ------------------------------------------------ 10. bad input refused up front
def _f(t, y):
    return -y


def test_one_dimensional_y0_is_refused():
    with pytest.raises(ValueError, match=r"y0.*\(4,\).*reshape\(4, 1\)"):
        deb.ODEProblem(_f, torch.ones(4, dtype=F64), (0.0, 1.0))


def test_string_tspan_is_refused():
    with pytest.raises(TypeError, match="tspan"):
        deb.ODEProblem(_f, torch.ones(2, 1, dtype=F64), "01")


@pytest.mark.parametrize("saveat", [[[0.0, 0.5], [0.7, 1.0]], torch.tensor([[0.0, 0.5], [0.7, 1.0]])], ids=["list", "tensor"])
def test_two_dimensional_saveat_is_refused(saveat):
    prob = deb.ODEProblem(_f, torch.ones(2, 1, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"saveat.*1-D.*\(2, 2\)"):
        deb.solve(prob, deb.Tsit5(), saveat=saveat)


def test_float32_saveat_on_a_float32_problem_is_accepted():
    t1 = 0.3  # not representable: float32(0.3) > 0.3
    prob = deb.ODEProblem(_f, torch.ones(2, 1, dtype=F32), (0.0, t1))
    saveat = torch.linspace(0.0, t1, 8, dtype=F32)
    assert float(saveat[-1]) > t1
    sol = deb.solve(prob, deb.Tsit5(), saveat=saveat)
    assert sol.success and sol.ys.shape == (8, 2, 1)
    torch.testing.assert_close(sol.ys[:, 0, 0].double(), torch.exp(-saveat.double()), rtol=1e-5, atol=1e-5)


def test_saveat_clearly_outside_the_span_is_still_refused_in_float32():
    prob = deb.ODEProblem(_f, torch.ones(2, 1, dtype=F32), (0.0, 0.7))
    with pytest.raises(ValueError, match="saveat"):
        deb.solve(prob, deb.Tsit5(), saveat=torch.tensor([0.0, 0.7001], dtype=F32))


def test_lower_precision_tree_is_refused():
    prob = deb.SDEProblem(_f, lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=F64))
    bm = deb.VirtualBrownianTree(0.0, 1.0, (2, 1), dtype=F32)
    with pytest.raises(ValueError, match=r"brownian.*float32"):
        deb.solve(prob, deb.EM(), dt=0.1, brownian=bm)


def test_brownian_for_an_ode_is_refused():
    prob = deb.ODEProblem(_f, torch.ones(2, 1, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match="brownian"):
        deb.solve(prob, deb.Tsit5(), brownian=deb.VirtualBrownianTree(0.0, 1.0, (2, 1)))


@pytest.mark.parametrize("seed", [2**64, 2**64 + 5, -1])
def test_seeds_outside_64_bits_are_refused(seed):
    """Decision: refuse (the tree hashes the seed as two 32-bit words, so 2**64 + s would
    collide with s)."""
    prob = deb.SDEProblem(_f, lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="seed"):
        deb.solve(prob, deb.EM(), dt=0.1, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        deb.VirtualBrownianTree(0.0, 1.0, (2, 1), seed=seed)


def test_largest_seed_is_accepted_and_distinct():
    bm = deb.VirtualBrownianTree(0.0, 1.0, (2, 1), seed=2**64 - 1)
    assert not torch.equal(bm.W(1.0), deb.VirtualBrownianTree(0.0, 1.0, (2, 1), seed=0).W(1.0))


def test_int_shape_tree_is_a_batch_of_scalars():
    bm = deb.VirtualBrownianTree(0, 1, 4)
    assert bm.shape == (4,) and bm.W(1.0).shape == (4,)
    with pytest.raises(TypeError, match="shape"):
        deb.VirtualBrownianTree(0, 1, "4x")


def test_neural_sde_dtype_mismatch_is_named():
    model = deb.NeuralSDE(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), dt=0.1, alg=deb.EM())
    with pytest.raises(TypeError, match=r"y0 has dtype torch.float64.*parameters are torch.float32"):
        model(torch.ones(3, 2, dtype=F64), [0.0, 1.0])
    assert model(torch.ones(3, 2), [0.0, 1.0]).dtype == F32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_are_refused(dtype):
    """Decision: refuse (3-4 significant digits, no half LU kernels on the CPU)."""
    with pytest.raises(TypeError, match=r"y0 must have dtype float32 or float64"):
        deb.ODEProblem(_f, torch.ones(2, 1, dtype=dtype), (0.0, 1.0))


# ------------------------------------------------ 11. user functions see times inside tspan
def test_user_functions_only_see_times_inside_tspan():
    seen = []

    def f(t, y):
        seen.append((float(t.min()), float(t.max())))
        return -y * torch.arange(1, y.shape[0] + 1, dtype=y.dtype)[:, None]

    prob = deb.SDEProblem(f, lambda t, y: 0.2 * y, torch.ones(4, 1, dtype=F64), tspan=(0.0, 1.0))
    deb.solve(prob, deb.SOSRI())
    assert min(lo for lo, _ in seen) >= 0.0 and max(hi for _, hi in seen) <= 1.0


# ------------------------------------------------ found by tests/test_fuzz.py
def test_srock1_with_a_nan_drift_sample_stops_only_that_sample():
    """A NaN drift made SROCK1's stage-count lookup index past its table (IndexError for the
    whole batch); now the sample stops (Unstable) and the others finish."""
    first = torch.tensor([True, False])

    def f(t, y):
        return torch.where((first & (t >= 0.125))[:, None], torch.full_like(y, float("nan")), -y)

    prob = deb.SDEProblem(f, lambda t, y: 0.1 * torch.ones_like(y), torch.ones(2, 1, dtype=F64), (0.0, 0.25), noise="additive")
    sol = deb.solve(prob, deb.SROCK1(), dt=0.125)
    assert sol.retcodes.tolist() == [int(deb.ReturnCode.Unstable), int(deb.ReturnCode.Success)]
    assert torch.isfinite(sol.ys[:, 1]).all()
