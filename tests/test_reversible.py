"""Reversible Heun and the exact O(1)-memory backsolve; the batch-shared Brownian-tree query;
``DiscreteAdjoint(checkpoints)`` through the autograd boundary (closure parameters).

* ``ReversibleHeun`` (Kidger et al. 2021): strong order 1.0 on Stratonovich GBM (commutative
  noise; measured 1.00) and at least 1.0 on SciML's additive problem (measured 2.0: the
  drift dominates there, as for SRA).
* ``BacksolveAdjoint`` after ``ReversibleHeun`` reconstructs the states backwards with the
  algebraic inverse: its gradient is the discrete gradient (measured ~2e-16 relative; asserted
  ≤ 1e-8) and matches central finite differences of the fixed-path loss to ≤ 1e-5.
* ``VirtualBrownianTree.evaluate_scalar`` gives bit-identical numbers to ``evaluate``.
"""

from __future__ import annotations

import random

import torch
from problems import additive, fitted_order, linear, strong_error, tree_for
from torch import nn

import diffeqbridge as deb

D, B, T = 3, 6, 1.0


def _strong_order(builder, ks, **kwargs):
    prob, exact = builder(200, **kwargs)
    bm = tree_for(prob, 1, tol=2.0**-10)
    dts, errors = [], []
    for k in ks:
        sol = deb.solve(prob, deb.ReversibleHeun(), dt=2.0**-k, brownian=bm)
        assert sol.success
        dts.append(2.0**-k)
        errors.append(strong_error(sol, exact, bm))
    return fitted_order(dts, errors), errors


def test_reversible_heun_strong_order_gbm_stratonovich() -> None:
    order, errors = _strong_order(linear, range(3, 8), interpretation="stratonovich")
    assert abs(order - 1.0) < 0.25, (order, errors)


def test_reversible_heun_strong_order_additive() -> None:
    order, errors = _strong_order(additive, range(2, 7))
    assert order > 0.9, (order, errors)


def test_reversible_heun_one_evaluation_per_step() -> None:
    prob, _ = linear(4, interpretation="stratonovich")
    sol = deb.solve(prob, deb.ReversibleHeun(), dt=0.1)
    assert int(sol.stats.naccept[0]) == 10
    assert int(sol.stats.nf[0]) == 11 and int(sol.stats.ng[0]) == 11  # + the evaluation at t0


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.drift = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, D)).double()
        self.diffusion = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, D), nn.Sigmoid()).double()


def _y0() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, B * D, dtype=torch.float64).reshape(B, D).requires_grad_(True)


def _loss(model: Model, y0: torch.Tensor, sensealg, params=True):
    prob = deb.SDEProblem(
        lambda t, y: model.drift(y),
        lambda t, y: 0.5 * model.diffusion(y),
        y0,
        (0.0, T),
        interpretation="stratonovich",
        params=model if params else None,
    )
    sol = deb.solve(prob, deb.ReversibleHeun(), dt=2**-5, saveat=[0.0, 0.3, 0.5, T], seed=11, sensealg=sensealg)
    return (sol.ys[1] ** 2).mean() + torch.sin(sol.ys[3]).sum() + sol.ys[2].sum() + 0.1 * (sol.ys[0] ** 2).sum(), sol


def _grads(model: Model, sensealg, params=True):
    y0 = _y0()
    loss, sol = _loss(model, y0, sensealg, params)
    g = torch.autograd.grad(loss, [y0, *model.parameters()])
    return float(loss.detach()), torch.cat([x.reshape(-1) for x in g]), sol


def test_reversible_backsolve_is_the_discrete_gradient() -> None:
    model = Model()
    _, g_ref, sol_ref = _grads(model, deb.DiscreteAdjoint())
    _, g, sol = _grads(model, deb.BacksolveAdjoint())
    assert torch.equal(sol.ys, sol_ref.ys)  # the same forward numbers as the engine
    assert torch.equal(sol.stats.nf, sol_ref.stats.nf) and torch.equal(sol.stats.naccept, sol_ref.stats.naccept)
    rel = float((g - g_ref).norm() / g_ref.norm())
    assert rel <= 1e-8, rel
    n = B * D  # the y0 part on its own
    assert float((g[:n] - g_ref[:n]).norm() / g_ref[:n].norm()) <= 1e-8


def test_checkpointed_gradients_pass_through_the_solver_state() -> None:
    """ReversibleHeun's ``(z, f(z), g(z))`` lives in ``LoopState.solver_state``
    (``carries_state``), not the FSAL slot: checkpointed sensealgs restore it as autograd
    leaves and pull its adjoint back across segments, so their gradients equal plain backprop
    (dropping the state's adjoint at a boundary would miss the ``z`` path: a wrong gradient)."""
    model = Model()
    _, g_ref, sol_ref = _grads(model, deb.DiscreteAdjoint())
    for sensealg in (deb.DiscreteAdjoint(checkpoints=4), deb.InterpolatingAdjoint(checkpoints=3)):
        _, g, sol = _grads(model, sensealg)
        assert torch.equal(sol.ys, sol_ref.ys)
        assert float((g - g_ref).norm() / g_ref.norm()) <= 1e-12, sensealg
    assert deb.ReversibleHeun.carries_state and not deb.ReversibleHeun.fsal


def test_reversible_backsolve_matches_finite_differences() -> None:
    model = Model()
    _, g, _ = _grads(model, deb.BacksolveAdjoint())
    params = [_y0(), *model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gen = torch.Generator().manual_seed(1)
    eps = 1e-5

    def loss_at(vector: torch.Tensor) -> float:
        with torch.no_grad():
            offset = B * D
            for p in model.parameters():
                p.copy_(vector[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
            return float(_loss(model, vector[: B * D].reshape(B, D).clone(), None)[0])

    for _ in range(3):
        v = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        fd = (loss_at(flat + eps * v) - loss_at(flat - eps * v)) / (2 * eps)
        exact = float(g @ v)
        assert abs(fd - exact) <= 1e-5 * abs(exact), (fd, exact)
    loss_at(flat)  # restore


def test_discrete_checkpoints_reach_closure_parameters() -> None:
    """DiscreteAdjoint(checkpoints) needs no params: the leaves the closures use are found."""
    torch.manual_seed(3)
    w = torch.randn(D, D, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    derived = 2.0 * scale  # a non-leaf computed outside the solve

    def run(sensealg):
        y0 = _y0()
        prob = deb.SDEProblem(
            lambda t, y: torch.tanh(y @ w), lambda t, y: derived * torch.cos(y), y0, (0.0, T), interpretation="stratonovich"
        )
        ys = deb.solve(prob, deb.EulerHeun(), dt=2**-5, saveat=[0.0, 0.5, T], seed=2, sensealg=sensealg).ys
        loss = (ys**2).sum()
        return torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, [y0, w, scale], retain_graph=True)])

    g_ref = run(None)
    g = run(deb.DiscreteAdjoint(checkpoints=4))  # boundaries 0.25/0.75 on the dt grid: same steps
    assert float((g - g_ref).norm() / g_ref.norm()) <= 1e-10


def test_evaluate_scalar_is_bit_identical_to_evaluate() -> None:
    rng = random.Random(0)
    for shape, tol in (((64, 5), 2.0**-7), ((3, 2), None), ((2, 1), 1e-13)):
        tree = deb.VirtualBrownianTree(-1.0, 2.0, shape, seed=4, tol=tol)
        times = [-1.0, 2.0, 0.5] + [rng.uniform(-1.0, 2.0) for _ in range(20)] + [-1.0 + 3 * i / 37 for i in range(38)]
        for t in times:
            a = tree.evaluate(torch.full((shape[0],), t, dtype=torch.float64))
            b = tree.evaluate_scalar(t)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), t


# --------------------------------------------------------------- the default sensealg
def _big_problem(alg_reversible: bool = False, batch: int = 40):
    model = Model()
    y0 = _y0().detach()[:1].repeat(batch, 1).requires_grad_(True)  # 120 state elements > 100
    prob = deb.SDEProblem(
        lambda t, y: model.drift(y), lambda t, y: 0.5 * model.diffusion(y), y0, (0.0, T), interpretation="stratonovich"
    )  # no params: closures only
    return model, y0, prob


def test_default_sensealg_follows_problem_size(monkeypatch) -> None:
    from diffeqbridge import adjoint

    small = deb.SDEProblem(
        lambda t, y: -y,
        lambda t, y: 0.1 * y,
        torch.ones(4, 2, dtype=torch.float64),
        (0.0, 1.0),
        interpretation="stratonovich",
        params=[torch.ones(3, requires_grad=True)],
    )
    assert type(adjoint.default_sensealg(small, deb.EulerHeun(), False, 0.1)) is deb.DiscreteAdjoint
    with torch.no_grad():
        assert adjoint.default_sensealg(small, deb.EulerHeun(), False, 0.1) is None
    _, _, big = _big_problem()
    assert type(adjoint.default_sensealg(big, deb.EulerHeun(), False, 2**-5)) is deb.DiscreteAdjoint  # graph fits
    assert type(adjoint.default_sensealg(big, deb.ReversibleHeun(), False, 2**-5)) is deb.DiscreteAdjoint
    assert type(adjoint.default_sensealg(big, deb.LambaEulerHeun(), True, None)) is deb.DiscreteAdjoint
    monkeypatch.setattr(adjoint, "GRAPH_BUDGET_BYTES", 2**16)  # now the graph does not fit
    frozen = deb.SDEProblem(
        lambda t, y: -y, lambda t, y: 0.1 * y, torch.ones(40, 3, dtype=torch.float64), (0.0, T), interpretation="stratonovich"
    )
    assert adjoint.default_sensealg(frozen, deb.EulerHeun(), False, 2**-5) is None  # nothing requires grad
    chosen = adjoint.default_sensealg(big, deb.EulerHeun(), False, 2**-5)
    assert type(chosen) is deb.InterpolatingAdjoint and chosen.checkpoints > 1
    assert type(adjoint.default_sensealg(big, deb.ReversibleHeun(), False, 2**-5)) is deb.BacksolveAdjoint
    assert type(adjoint.default_sensealg(big, deb.LambaEulerHeun(), True, None)) is deb.DiscreteAdjoint


def test_default_sensealg_gradients_are_the_discrete_ones(monkeypatch) -> None:
    """Above the graph budget the default re-solves segments (boundaries on the step grid),
    reaching closure parameters: same forward numbers (to rounding) and gradient as
    DiscreteAdjoint(); with ReversibleHeun it is the exact reversible backsolve."""
    from diffeqbridge import adjoint

    for alg in (deb.EulerHeun(), deb.ReversibleHeun()):
        results = []
        for budget in (2**40, 2**16):
            monkeypatch.setattr(adjoint, "GRAPH_BUDGET_BYTES", budget)
            model, y0, prob = _big_problem()
            sensealg = deb.DiscreteAdjoint() if budget == 2**40 else None
            ys = deb.solve(prob, alg, dt=2**-5 * 0.93, saveat=[0.0, 0.5, T], seed=1, sensealg=sensealg).ys
            loss = (ys**2).sum() + ys[1].sum()
            g = torch.autograd.grad(loss, [y0, *model.parameters()])
            results.append((ys.detach(), torch.cat([x.reshape(-1) for x in g])))
        (ys_ref, g_ref), (ys, g) = results
        assert float((ys - ys_ref).abs().max()) <= 1e-12
        assert float((g - g_ref).norm() / g_ref.norm()) <= 1e-9


def test_evaluate_scalar_without_levy_area_gives_the_same_w() -> None:
    tree = deb.VirtualBrownianTree(0.0, 1.0, (32, 3), seed=9, tol=2.0**-9)
    times = [i / 37 for i in range(38)] + [0.5, 0.25, 0.999]
    for k, t in enumerate(times):  # alternate the two modes: the cache must not mix them
        w, j = tree.evaluate_scalar(t, levy=bool(k % 3 == 0))
        ref_w, ref_j = tree.evaluate(torch.full((32,), t, dtype=torch.float64))
        assert torch.equal(w, ref_w)
        assert j is None or torch.equal(j, ref_j)
    assert torch.equal(tree.increment_scalar(0.2, 0.7), tree(0.2, 0.7)[0])


def test_reversible_heun_unstep_inverts_step() -> None:
    from diffeqbridge.problem import Terms
    from diffeqbridge.solvers.reversible_heun import reversible_heun_step, reversible_heun_unstep

    torch.manual_seed(5)
    model = Model()
    y = torch.randn(B, D, dtype=torch.float64)
    prob = deb.SDEProblem(
        lambda t, y: model.drift(y), lambda t, y: model.diffusion(y), y, (0.0, 1.0), interpretation="stratonovich"
    )
    terms = Terms(prob)
    t, dt = torch.full((B,), 0.2, dtype=torch.float64), torch.full((B,), 0.05, dtype=torch.float64)
    dw = 0.2 * torch.randn(B, D, dtype=torch.float64)
    z = y + 0.1  # z != y
    carry = (z, terms.drift(t, z), terms.diffusion(t, z))
    with torch.no_grad():
        y1, carry1 = reversible_heun_step(terms, t, y, dt, dw, carry)
        y_back, carry_back = reversible_heun_unstep(terms, t + dt, y1, dt, dw, carry1)
    assert float((y_back - y).abs().max()) < 1e-13
    assert float((carry_back[0] - carry[0]).abs().max()) < 1e-13


def test_finished_samples_keep_their_solver_state() -> None:
    """Per-sample ``dt`` (the masked loop, not the lockstep path): samples finish after 5 to 40
    steps, and a finished sample's ``(z, f, g)`` is not advanced by the masked steps the loop
    still computes for it (``carries_state``: kept where a step is not accepted), so every
    sample's ``ys`` and final ``z`` equal its solve alone (which takes the lockstep path)."""
    from diffeqbridge import engine
    from diffeqbridge.problem import Terms

    batch = 4
    y0 = torch.linspace(-1, 1, batch * 2, dtype=torch.float64).reshape(batch, 2)
    dts = torch.tensor([0.1, 0.05, 0.025, 0.2], dtype=torch.float64)
    save = torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = engine.EngineOptions(adaptive=False, atol=1e-2, rtol=1e-2, max_steps=1000, dtmin=0.0, check_every=1)

    def run(rows: slice) -> engine.LoopState:
        prob = deb.SDEProblem(
            lambda t, y: -y + torch.sin(t)[:, None],
            lambda t, y: 0.3 * torch.tanh(y),
            y0[rows],
            (0.0, T),
            interpretation="stratonovich",
        )
        n = y0[rows].shape[0]
        tree = deb.VirtualBrownianTree(0.0, T, (n, 2), seed=2, tol=2.0**-10, sample_offset=rows.start or 0)
        loop = engine.Integrator(Terms(prob), deb.ReversibleHeun(), save, dts[rows], options, tree)
        assert (loop.grid is None) == (n > 1)  # per-sample dt: the masked loop; one sample: lockstep
        state = loop.init(y0[rows], dts[rows], None, (0, 0))
        loop.run(state)
        return state

    whole = run(slice(0, batch))
    assert whole.naccept.tolist() == [10, 20, 40, 5]
    for b in range(batch):
        alone = run(slice(b, b + 1))
        assert torch.equal(whole.ys[:, b], alone.ys[:, 0])
        assert torch.equal(whole.solver_state[0][b], alone.solver_state[0][0])
