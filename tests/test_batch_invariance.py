"""A sample's result does not depend on the batch it sits in (issue 12 item 4, issue 15 item 6).

Every reduction in the step, the error norm, the controller and the initial-step heuristics
is per sample, and the powers of the PI controller and the initial-dt heuristics are
computed as ``exp(b log x)``: ``torch.pow`` rounds differently in its vectorised blocks and
its scalar tail (AVX-512), which gave samples 6-7 of a 16-sample batch other step counts
than the same samples solved as a batch of 8.
"""

from __future__ import annotations

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.controller import layout_free_pow
from diffeqbridge.solvers.base import fused_sum

DT = torch.float64
RATES = torch.logspace(-1, 2, 16, dtype=DT)


def _ou(n: int, noise: str) -> deb.SDEProblem:
    r = RATES[:n].reshape(n, 1)
    if noise == "additive":
        return deb.SDEProblem(
            lambda t, y: -r * y, lambda t, y: 0.5 * torch.ones_like(y), torch.ones(n, 1, dtype=DT), (0.0, 1.0), noise="additive"
        )
    return deb.SDEProblem(lambda t, y: -r * y, lambda t, y: 0.3 * y, torch.ones(n, 1, dtype=DT), (0.0, 1.0))


def _assert_same(big: deb.Solution, small: deb.Solution, n: int) -> None:
    assert torch.equal(big.stats.naccept[:n], small.stats.naccept)
    assert torch.equal(big.stats.nreject[:n], small.stats.nreject)
    assert torch.equal(big.stats.nf[:n], small.stats.nf)
    assert torch.equal(big.ys[:, :n], small.ys)


@pytest.mark.parametrize(
    "alg,noise,tol", [(deb.SOSRA(), "additive", 1e-4), (deb.SRIW1(), "diagonal", 1e-3)], ids=["SOSRA", "SRIW1"]
)
def test_sde_batch_and_sub_batch_identical(alg, noise, tol):
    trees = {n: deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=11, dtype=DT) for n in (16, 8)}
    big = deb.solve(_ou(16, noise), alg, atol=tol, rtol=tol, brownian=trees[16])
    small = deb.solve(_ou(8, noise), alg, atol=tol, rtol=tol, brownian=trees[8])
    assert big.success and small.success
    assert int(big.stats.naccept[:8].max()) > 2 * int(big.stats.naccept[:8].min())  # very different steps
    _assert_same(big, small, 8)


@pytest.mark.parametrize("alg", [deb.Tsit5(), deb.Rodas4()], ids=repr)
def test_ode_batch_and_sub_batch_identical(alg):
    def make(n: int) -> deb.ODEProblem:
        r = RATES[:n].reshape(n, 1)
        return deb.ODEProblem(
            lambda t, y: torch.cat([-r * y[:, :1] + y[:, 1:], -y[:, :1] * torch.cos(t)[:, None]], 1),
            torch.ones(n, 2, dtype=DT),
            (0.0, 3.0),
        )

    big = deb.solve(make(16), alg, atol=1e-8, rtol=1e-8)
    for n in (8, 5, 1):
        _assert_same(big, deb.solve(make(n), alg, atol=1e-8, rtol=1e-8), n)


def test_layout_free_pow_does_not_depend_on_length_or_offset():
    """``exp(b log x)`` gives the same bits for an element whatever the tensor's length and the
    element's position (vectorised block or scalar tail); and it is ``x ** b`` to rounding."""
    x = torch.rand(600, dtype=DT, generator=torch.Generator().manual_seed(0)) * 10 + 1e-6
    full = layout_free_pow(x, 0.35)
    for n in range(1, 40):
        for off in range(0, 17):
            assert torch.equal(layout_free_pow(x[off : off + n].clone(), 0.35), full[off : off + n])
    assert torch.allclose(full, x**0.35, rtol=4e-16 * 8, atol=0)
    special = torch.tensor([0.0, float("inf"), float("nan")], dtype=DT)
    out = layout_free_pow(special, 0.35)
    assert out[0] == 0 and out[1] == float("inf") and torch.isnan(out[2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_sum_does_not_depend_on_length_or_offset(dtype):
    """The fused multiply-adds of the stage sums (``torch.addcmul``, ``torch.add``/``rsub`` with
    ``alpha``: :func:`~diffeqbridge.solvers.base.fused_sum`, ``per_unit_step``) round once in
    the vectorised blocks and in the scalar tail alike: an element's bits do not depend on the
    tensor's length or its position; and they are the unfused sums to one rounding."""
    gen = torch.Generator().manual_seed(1)
    y, f, g = (torch.randn(300, 2, dtype=dtype, generator=gen) for _ in range(3))
    dt, chi = (torch.rand(300, 1, dtype=dtype, generator=gen) for _ in range(2))

    def stage(rows: slice) -> torch.Tensor:
        terms = [(0.75, dt[rows], f[rows]), (-1.5, chi[rows], g[rows]), (1.0, chi[rows], f[rows]), (0.3, None, g[rows])]
        out = fused_sum(y[rows].clone(), terms)
        assert out is not None
        return torch.rsub(out, 2.5, alpha=0.2)

    full = stage(slice(None))
    for n in range(1, 40):
        for off in range(0, 17):
            assert torch.equal(stage(slice(off, off + n)), full[off : off + n])
    plain = 2.5 - 0.2 * (y + 0.75 * dt * f - 1.5 * chi * g + chi * f + 0.3 * g)
    assert torch.allclose(full, plain, rtol=0, atol=64 * torch.finfo(dtype).eps * float(plain.abs().max()))


@pytest.mark.parametrize("alg", [deb.Kvaerno5()], ids=repr)
def test_newton_solvers_batch_and_sub_batch_identical(alg):
    """Newton iterations run until the whole batch has converged (early exit); a sample that
    converged earlier keeps its value bit for bit, so its steps and results do not depend on the
    batch (the evaluation counts do: the batch iterates as long as its slowest sample)."""

    def make(n: int) -> deb.ODEProblem:
        r = (10.0 * RATES[:n]).reshape(n, 1)
        return deb.ODEProblem(
            lambda t, y: -r * (y + y**3 - torch.cos(t)[:, None]) + torch.sin(3 * t)[:, None] * y**2,
            torch.full((n, 1), 2.0, dtype=DT),
            (0.0, 2.0),
        )

    big = deb.solve(make(16), alg, atol=1e-7, rtol=1e-7)
    assert bool(big.success.all()) if isinstance(big.success, torch.Tensor) else big.success
    for n in (8, 3, 1):
        small = deb.solve(make(n), alg, atol=1e-7, rtol=1e-7)
        assert torch.equal(big.stats.naccept[:n], small.stats.naccept)
        assert torch.equal(big.stats.nreject[:n], small.stats.nreject)
        assert torch.equal(big.ys[:, :n], small.ys)


def test_implicit_sde_batch_and_sub_batch_identical():
    trees = {n: deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=5, dtype=DT) for n in (16, 4)}
    sols = {n: deb.solve(_ou(n, "diagonal"), deb.ImplicitEM(), dt=1e-2, adaptive=False, brownian=trees[n]) for n in (16, 4)}
    assert torch.equal(sols[16].ys[:, :4], sols[4].ys)
