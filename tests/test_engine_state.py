"""The explicit integrator state: checkpointed sensealgs save and restore the whole loop
state, so their forward is the plain solve's (bit-identical ``ys``, the same steps and
stats, ``stats.extra`` included) and their gradient is the discrete one (issue 12 items 1-2)."""

from __future__ import annotations

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.engine import EngineOptions, Integrator
from diffeqbridge.problem import Terms

DT = torch.float64
CHECKPOINTED = [deb.DiscreteAdjoint(checkpoints=3), deb.InterpolatingAdjoint(), deb.InterpolatingAdjoint(checkpoints=4)]


def _pendulum(theta: torch.Tensor, y0: torch.Tensor) -> deb.ODEProblem:
    return deb.ODEProblem(lambda t, y: torch.stack([y[:, 1], -theta * torch.sin(y[:, 0])], 1), y0, (0.0, 6.0), params=[theta])


def _stiff(theta: torch.Tensor, y0: torch.Tensor) -> deb.ODEProblem:
    """y' = λ (y - cos t) with λ = -1e4 (stiff: AutoTsit5 switches) and λ = -θ (not)."""
    lam = torch.stack([torch.tensor(-1e4, dtype=DT), -theta]).reshape(2, 1)
    return deb.ODEProblem(lambda t, y: lam * (y - torch.cos(t)[:, None]), y0, (0.0, 0.5), params=[theta])


def _sde(theta: torch.Tensor, y0: torch.Tensor) -> deb.SDEProblem:
    return deb.SDEProblem(
        lambda t, y: torch.stack([y[:, 1], -theta * torch.sin(y[:, 0])], 1),
        lambda t, y: 0.1 * torch.cos(y),
        y0,
        (0.0, 2.0),
        params=[theta],
    )


CASES = {
    "Tsit5-pendulum": (_pendulum, deb.Tsit5, torch.tensor([[1.0, 0.0], [0.3, 0.2], [2.0, -1.0]]), 1e-6),
    "AutoTsit5(Rodas4)-stiff": (_stiff, lambda: deb.AutoTsit5(deb.Rodas4()), torch.tensor([[0.0], [1.0]]), 1e-4),
    "SOSRI-sde": (_sde, deb.SOSRI, torch.tensor([[1.0, 0.0], [0.3, 0.2]]), 1e-3),
}


def _solve(case: str, sensealg):
    make, alg, y0, tol = CASES[case]
    theta = torch.tensor(0.9, dtype=DT, requires_grad=True)
    y0 = y0.to(DT).requires_grad_(True)
    prob = make(theta, y0)
    t1 = prob.tspan[1]
    sol = deb.solve(prob, alg(), atol=tol, rtol=tol, saveat=torch.linspace(0.0, t1, 5, dtype=DT), seed=3, sensealg=sensealg)
    grads = torch.autograd.grad((sol.ys[1:] ** 2).sum(), [y0, theta])
    return sol, grads


@pytest.mark.parametrize("sensealg", CHECKPOINTED, ids=repr)
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_forward_is_the_plain_solve(case, sensealg):
    plain, g_plain = _solve(case, deb.DiscreteAdjoint())
    ck, g_ck = _solve(case, sensealg)
    assert plain.success and ck.success
    assert torch.equal(plain.ys, ck.ys)
    for name in ("nf", "ng", "naccept", "nreject"):
        assert torch.equal(getattr(plain.stats, name), getattr(ck.stats, name)), name
    assert plain.stats.extra.keys() == ck.stats.extra.keys()
    for key, value in plain.stats.extra.items():
        assert torch.equal(torch.nan_to_num(value), torch.nan_to_num(ck.stats.extra[key])), key
    if case.startswith("AutoTsit5"):
        assert int(plain.stats.extra["nswitch"][0]) >= 1  # the stiff sample switched
    for a, b in zip(g_plain, g_ck):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)


def test_snapshot_restore_resumes_bit_identically():
    """Run to iteration 17, snapshot, finish; restore the snapshot and finish again."""
    y0 = torch.tensor([[1.0, 0.0], [0.3, 0.2]], dtype=DT)
    prob = _pendulum(torch.tensor(0.9, dtype=DT), y0)
    terms, solver = Terms(prob), deb.AutoTsit5(deb.Rodas4())
    save_times = torch.linspace(0.0, 10.0, 4, dtype=DT)
    dt0 = torch.full((2,), 1e-3, dtype=DT)
    options = EngineOptions(adaptive=True, atol=1e-6, rtol=1e-6, max_steps=10_000, dtmin=1e-15, check_every=1)
    loop = Integrator(terms, solver, save_times, dt0, options, None)
    f0 = terms.drift(save_times[0].expand(2), y0)
    state = loop.init(y0, dt0, f0, (1, 0))
    loop.run(state, stop_at=17)
    snap = loop.snapshot(state)
    loop.run(state)
    first = loop.solution(state)
    again = loop.restore(snap, snap.y, snap.carry)
    loop.run(again)
    second = loop.solution(again)
    assert torch.equal(first.ys[2:], second.ys[2:])  # the restored ys starts empty: saves after the snapshot
    assert torch.equal(first.stats.naccept, second.stats.naccept)
    assert torch.equal(first.retcodes, second.retcodes)


@pytest.mark.parametrize("sensealg", [None, *CHECKPOINTED, deb.BacksolveAdjoint()], ids=repr)
def test_failed_sample_leaves_the_shared_gradient_finite(sensealg):
    """u' = p u^2 from u0 = 10 blows up (Unstable); the loss over the healthy samples has the
    same gradient as without it (issue 15 item 1's reproducer)."""

    def grad(u0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.tensor(1.0, dtype=DT, requires_grad=True)
        sol = deb.solve(
            deb.ODEProblem(lambda t, y: p * y * y, u0, (0.0, 1.0), params=[p]),
            deb.Tsit5(),
            atol=1e-8,
            rtol=1e-8,
            sensealg=sensealg,
        )
        ok = sol.retcodes == int(deb.ReturnCode.Success)
        (g,) = torch.autograd.grad(sol.ys[-1][ok].sum(), [p])
        return g, ok

    g, ok = grad(torch.tensor([[10.0], [0.1], [0.5], [-1.0]], dtype=DT))
    assert ok.tolist() == [False, True, True, True]
    ref, _ = grad(torch.tensor([[0.1], [0.5], [-1.0]], dtype=DT))
    tol = 1e-5 if isinstance(sensealg, deb.BacksolveAdjoint) else 1e-10
    assert torch.isfinite(g) and abs(float(g) - float(ref)) < tol * abs(float(ref))
