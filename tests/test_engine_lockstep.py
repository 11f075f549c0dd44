"""The lockstep fixed-step path (``Integrator._run_lockstep``) against the per-iteration loop.

A fixed-step SDE solve whose samples share one time grid skips the loop's masks, merges and
stop checks and queries the Brownian tree for the whole grid at once.  Its forward must be
the loop's bit for bit (``ys``, every ``stats`` counter, return codes, the final loop state),
its gradients equal up to the order autograd accumulates them in (a few ulps), and where the
loop would stop a sample (a non-finite or blown-up step, Newton failures) it must hand the
solve back to the loop unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import engine

F64 = torch.float64
B, D = 6, 3


def _fields(p: torch.Tensor) -> tuple[Any, Any]:
    def drift(t, y):
        return -p * y + torch.sin(t)[:, None] * torch.tanh(y)

    def diffusion(t, y):
        return 0.3 * torch.sigmoid(p * y) + 0.05 * t[:, None]

    return drift, diffusion


def _solve(alg, fast: bool, monkeypatch, dtype=F64, tspan=(0.0, 1.0), sensealg=None, saveat=None, additive=False):
    """Solve with the lockstep path on or off; returns the solution, d(loss)/dp and the
    lockstep path's results (True: it ran; False: it handed back to the loop)."""
    monkeypatch.setattr(engine, "LOCKSTEP_FAST_PATH", fast)
    ran: list[bool] = []
    original = engine.Integrator._run_lockstep

    def spy(self, s):
        ran.append(original(self, s))
        return ran[-1]

    monkeypatch.setattr(engine.Integrator, "_run_lockstep", spy)
    p = torch.linspace(0.5, 1.5, D, dtype=dtype).requires_grad_(True)
    drift, diffusion = _fields(p)
    if additive:
        diffusion = lambda t, y: (0.2 + 0.1 * t[:, None] * p).expand(y.shape[0], D)  # noqa: E731
    y0 = torch.linspace(-1.0, 1.0, B * D, dtype=dtype).reshape(B, D)
    interpretation = sorted(alg.interpretations)[-1]
    noise = "additive" if additive else "diagonal"
    prob = deb.SDEProblem(drift, diffusion, y0, tspan, noise=noise, interpretation=interpretation, params=[p])
    lo, hi = min(tspan), max(tspan)
    tree = deb.VirtualBrownianTree(lo, hi, (B, D), seed=4, tol=2.0**-9, dtype=dtype)
    sol = deb.solve(prob, alg, dt=0.03, brownian=tree, sensealg=sensealg, saveat=saveat, adaptive=False)
    (grad,) = torch.autograd.grad(sol.ys.pow(2).sum(), [p])
    return sol, grad, ran


def _assert_same(a, b) -> None:
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=0, equal_nan=True)  # bit for bit
    assert torch.equal(a.retcodes, b.retcodes)
    for name in ("nf", "ng", "naccept", "nreject"):
        assert torch.equal(getattr(a.stats, name), getattr(b.stats, name)), name
    assert a.stats.extra.keys() == b.stats.extra.keys()
    for name in ("eigen_est", "max_eigen_est"):  # stiffness reports (SRI, ShARK)
        if name in b.stats.extra:
            assert torch.equal(a.stats.extra[name], b.stats.extra[name]), name


CASES = [
    ("EulerHeun", lambda: deb.EulerHeun(), {}),
    ("ReversibleHeun", lambda: deb.ReversibleHeun(), {"sensealg": deb.DiscreteAdjoint()}),
    ("EulerHeun backwards", lambda: deb.EulerHeun(), {"tspan": (1.0, 0.0)}),
    ("EulerHeun float32", lambda: deb.EulerHeun(), {"dtype": torch.float32}),
    ("SRA1 (Levy area)", lambda: deb.SRA1(), {"additive": True}),
    ("SRIW1 (stiffness estimate)", lambda: deb.SRIW1(), {}),
    ("ShARK (stiffness estimate)", lambda: deb.ShARK(), {"additive": True}),
    ("AutoSOSRI (composite)", lambda: deb.AutoSOSRI(), {}),
    ("EM save times off the grid", lambda: deb.EM(), {"saveat": torch.tensor([0.0, 0.1, 0.45, 0.7, 1.0], dtype=F64)}),
    ("InterpolatingAdjoint segments", lambda: deb.EulerHeun(), {"sensealg": deb.InterpolatingAdjoint(checkpoints=3)}),
]


@pytest.mark.parametrize("name, make, kwargs", CASES, ids=[c[0] for c in CASES])
def test_lockstep_path_equals_the_loop(name, make, kwargs, monkeypatch):
    fast, grad_fast, ran = _solve(make(), True, monkeypatch, **kwargs)
    slow, grad_slow, ran_slow = _solve(make(), False, monkeypatch, **kwargs)
    assert ran and all(ran) and not ran_slow
    _assert_same(fast, slow)
    assert bool((fast.retcodes == int(deb.ReturnCode.Success)).all())
    eps = torch.finfo(grad_slow.dtype).eps
    torch.testing.assert_close(grad_fast, grad_slow, rtol=64 * eps, atol=64 * eps * float(grad_slow.abs().max()))


def test_final_loop_state_is_the_loops(monkeypatch):
    """Every field of the loop state after ``run`` (what checkpoints and the reversible
    backsolve read) equals the per-iteration loop's."""
    states = []
    for fast in (True, False):
        monkeypatch.setattr(engine, "LOCKSTEP_FAST_PATH", fast)
        p = torch.linspace(0.5, 1.5, D, dtype=F64)
        drift, diffusion = _fields(p)
        y0 = torch.linspace(-1.0, 1.0, B * D, dtype=F64).reshape(B, D)
        prob = deb.SDEProblem(drift, diffusion, y0, (0.0, 1.0), noise="diagonal", interpretation="stratonovich")
        terms = engine.Terms(prob)
        tree = deb.VirtualBrownianTree(0.0, 1.0, (B, D), seed=4, tol=2.0**-9)
        options = engine.EngineOptions(adaptive=False, atol=1e-2, rtol=1e-2, max_steps=1000, dtmin=0.0, check_every=1)
        save_times = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
        dt = torch.full((B,), 0.03, dtype=F64)
        loop = engine.Integrator(terms, deb.ReversibleHeun(), save_times, dt, options, tree)
        state = loop.init(y0, dt, drift(torch.zeros(B, dtype=F64), y0), (1, 1))
        loop.run(state)
        states.append(loop.snapshot(state))
    fast, slow = states
    for field, value in vars(slow).items():
        other = getattr(fast, field)
        leaves = (
            zip(value, other) if isinstance(value, tuple) else [(value, other)]
        )  # carry, tree_state: tuples of tensors or None
        for a, b in leaves:
            assert (a is None and b is None) or (isinstance(a, int) and a == b) or torch.equal(a, b), field


def test_a_blow_up_hands_the_solve_back_to_the_loop(monkeypatch):
    """du = u^2 dt + 0.1 u dW from u0 = 3 blows up before t = 1 for some samples: the loop
    stops them (Unstable / non-finite), so the lockstep path must decline and the numbers be
    the loop's."""

    declined: list[bool] = []
    original = engine.Integrator._run_lockstep
    monkeypatch.setattr(engine.Integrator, "_run_lockstep", lambda self, s: declined.append(not original(self, s)) or False)

    def run(fast: bool):
        monkeypatch.setattr(engine, "LOCKSTEP_FAST_PATH", fast)
        y0 = torch.tensor([[0.1], [3.0], [0.5], [30.0]], dtype=F64)
        prob = deb.SDEProblem(lambda t, y: y * y, lambda t, y: 0.1 * y, y0, (0.0, 1.0), noise="diagonal")
        return deb.solve(prob, deb.EM(), dt=0.01, seed=1)

    fast, slow = run(True), run(False)
    assert declined == [True]
    _assert_same(fast, slow)
    assert int(deb.ReturnCode.Success) in fast.retcodes.tolist()
    assert int(deb.ReturnCode.Unstable) in fast.retcodes.tolist()


def test_max_steps_and_newton_solvers_take_the_loop(monkeypatch):
    """Too few ``max_steps`` for the grid: MaxIters from the loop, as before.  A fixed-step
    implicit solver (Newton convergence flags): the loop's numbers."""
    monkeypatch.setattr(engine, "LOCKSTEP_FAST_PATH", True)
    y0 = torch.ones(3, 1, dtype=F64)
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.2 * y, y0, (0.0, 1.0), noise="diagonal")
    short = deb.solve(prob, deb.EM(), dt=0.01, seed=1, max_steps=50)
    assert bool((short.retcodes == int(deb.ReturnCode.MaxIters)).all())
    implicit = deb.solve(prob, deb.ImplicitEM(), dt=0.05, seed=1, adaptive=False)
    monkeypatch.setattr(engine, "LOCKSTEP_FAST_PATH", False)
    _assert_same(implicit, deb.solve(prob, deb.ImplicitEM(), dt=0.05, seed=1, adaptive=False))
