"""``solve(..., compact=f)``: finished samples leave the batch, with the masked loop's bits.

Samples of ``y' = -k y`` with rates ``k`` spread over three decades (the rate rides along as
a constant second state component, so the drift is row-independent) take 8 to several
hundred steps; compaction at several thresholds must reproduce the masked loop exactly:
states, step counts, retcodes, and gradients.
"""

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import engine
from diffeqbridge.nonlinear import NewtonOptions

pytestmark = pytest.mark.usefixtures("float64_default")


def decay(t, y):
    return torch.stack([-y[:, 1] * y[:, 0] * (1 + 0.5 * torch.sin(t)), torch.zeros_like(y[:, 1])], dim=1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN (a NaN statistic: a sample that never switched)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.fixture
def compactions(monkeypatch):
    """The batch sizes the loop compacted to, so a test sees that compaction happened."""
    sizes: list[int] = []
    original = engine.Integrator._compact

    def counting(self, full, part, idx):
        small, new_idx = original(self, full, part, idx)
        sizes.append(int(new_idx.numel()))
        return small, new_idx

    monkeypatch.setattr(engine.Integrator, "_compact", counting)
    return sizes


def problem(batch: int = 16) -> deb.ODEProblem:
    rates = torch.logspace(-1, 2.5, batch)
    return deb.ODEProblem(decay, torch.stack([torch.ones(batch), rates], dim=1), (0.0, 3.0))


@pytest.mark.parametrize(
    "alg",
    [deb.Tsit5(), deb.Dopri5(), deb.Rodas4(), deb.Kvaerno5(newton=NewtonOptions(early_exit=False)), deb.AutoTsit5(deb.Rodas4())],
    ids=lambda a: type(a).__name__,
)
def test_compacted_equals_masked(alg, compactions):
    prob = problem()
    kwargs = dict(alg=alg, atol=1e-6, rtol=1e-6, saveat=torch.linspace(0, 3, 7), backend="native")
    masked = deb.solve(prob, **kwargs)
    steps = masked.stats.naccept
    assert int(steps.max()) > 2 * int(steps.min())  # samples finish at very different iterations
    for threshold in (0.3, 0.9):
        compactions.clear()
        compacted = deb.solve(prob, compact=threshold, **kwargs)
        assert compactions and compactions[-1] < prob.batch_size, compactions
        assert torch.equal(compacted.ys, masked.ys)
        assert torch.equal(compacted.retcodes, masked.retcodes)
        for name in ("naccept", "nreject", "nf"):
            assert torch.equal(getattr(compacted.stats, name), getattr(masked.stats, name)), name
        assert compacted.stats.extra.keys() == masked.stats.extra.keys()
        for key, value in masked.stats.extra.items():
            assert same_bits(compacted.stats.extra[key], value), key


def test_compacted_gradients_equal_masked(compactions):
    y0 = torch.stack([torch.ones(8), torch.logspace(-1, 2, 8)], dim=1).requires_grad_()
    prob = deb.ODEProblem(decay, y0, (0.0, 2.0))
    grads = []
    for compact in (0.0, 0.6):
        sol = deb.solve(prob, deb.Tsit5(), atol=1e-8, rtol=1e-8, compact=compact, backend="native")
        grads.append(torch.autograd.grad(sol.ys[-1, :, 0].sum(), y0)[0])
    assert compactions
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.5"])
def test_compact_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="compact must be a number in"):
        deb.solve(problem(2), deb.Tsit5(), compact=bad)


# ----------------------------------------------------------------------------- SDEs
# The per-sample parameter rides along as a constant last state component (zero drift and
# diffusion there), so every field is row-independent; its spread over decades makes samples
# finish at very different iterations.  A compacted batch queries the Brownian tree through
# VirtualBrownianTree.select, so every sample keeps its own path.


def _carried(rate: torch.Tensor, x0: float) -> torch.Tensor:
    return torch.stack([torch.full_like(rate, x0), rate], dim=1)


def _gbm_drift(t, y):
    return torch.stack([1.01 * y[:, 0], torch.zeros_like(y[:, 0])], dim=1)


def _gbm_diffusion(t, y):  # diagonal: sigma_i u
    return torch.stack([y[:, 1] * y[:, 0], torch.zeros_like(y[:, 0])], dim=1)


def _stiff_drift(t, y):  # dX = -k_i (X - cos t) dt + 0.5 dW, k_i over 2.5 decades
    return torch.stack([-y[:, 1] * (y[:, 0] - torch.cos(t)), torch.zeros_like(y[:, 0])], dim=1)


def _additive(t, y):
    return torch.stack([torch.full_like(y[:, 0], 0.5), torch.zeros_like(y[:, 0])], dim=1)


def _scalar_diffusion(t, y):  # one Brownian motion per sample driving (sigma_i u, 0)
    return torch.stack([y[:, 1] * y[:, 0], torch.zeros_like(y[:, 0])], dim=1)


def _general_diffusion(t, y):  # (B, 2, 2): two Brownian motions
    g = torch.zeros(y.shape[0], 2, 2, dtype=y.dtype)
    g[:, 0, 0] = y[:, 1] * y[:, 0]
    g[:, 0, 1] = 0.3 * y[:, 0]
    return g


def _blowup_drift(t, y):  # u' = u^2 from u0_i: blows up at t = 1/u0_i
    return torch.stack([y[:, 0] ** 2, torch.zeros_like(y[:, 0])], dim=1)


def _small_noise(t, y):
    return torch.stack([0.1 * y[:, 1], torch.zeros_like(y[:, 0])], dim=1)


def sde_problem(kind: str, batch: int = 24, dtype=torch.float64, tspan=(0.0, 1.0)) -> deb.SDEProblem:
    if kind == "gbm":
        return deb.SDEProblem(_gbm_drift, _gbm_diffusion, _carried(torch.logspace(-1.3, 0.3, batch), 0.5).to(dtype), tspan)
    if kind == "stiff":
        # rates of the sign that contracts in the direction time runs (t1 < t0: negative)
        rates = torch.logspace(-1, 1.5, batch) * (1.0 if tspan[1] > tspan[0] else -1.0)
        y0 = _carried(rates, 1.0).to(dtype)
        return deb.SDEProblem(_stiff_drift, _additive, y0, tspan, noise="additive")
    if kind == "scalar":
        y0 = _carried(torch.logspace(-1.3, 0.3, batch), 0.5).to(dtype)
        return deb.SDEProblem(_gbm_drift, _scalar_diffusion, y0, tspan, noise="scalar")
    if kind == "general":
        y0 = _carried(torch.logspace(-1.3, 0.3, batch), 0.5).to(dtype)
        return deb.SDEProblem(_gbm_drift, _general_diffusion, y0, tspan, noise="general", noise_dim=2)
    assert kind == "blowup"  # u0 from 0.5 to 6.3: about 70 % of the samples blow up inside [0, 1]
    y0 = torch.stack([torch.logspace(-0.3, 0.8, batch), torch.ones(batch)], dim=1).to(dtype)
    return deb.SDEProblem(_blowup_drift, _small_noise, y0, tspan)


def assert_same_solution(compacted, masked):
    assert torch.equal(compacted.retcodes, masked.retcodes)
    assert same_bits(compacted.ys, masked.ys)
    for name in ("naccept", "nreject", "nf", "ng"):
        assert torch.equal(getattr(compacted.stats, name), getattr(masked.stats, name)), name
    assert compacted.stats.extra.keys() == masked.stats.extra.keys()
    for key, value in masked.stats.extra.items():
        assert same_bits(compacted.stats.extra[key], value), key


SDE_CASES = [
    ("gbm", deb.SOSRI, {}),
    ("gbm", deb.SRIW1, {}),
    ("scalar", deb.SOSRI, {}),
    ("general", deb.LambaEM, {}),
    ("stiff", deb.SOSRA, {}),
    ("stiff", deb.SRA1, {}),
    ("stiff", deb.ShARK, {}),
    ("blowup", deb.EM, {"dt": 1e-3}),
    ("blowup", deb.RKMil, {"dt": 1e-3}),
]


@pytest.mark.parametrize(("kind", "alg", "extra"), SDE_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_sde_compacted_equals_masked(kind, alg, extra, compactions):
    prob = sde_problem(kind)
    kwargs = dict(alg=alg(), atol=1e-3, rtol=1e-3, seed=7, saveat=torch.linspace(0, 1, 6), backend="native") | extra
    masked = deb.solve(prob, **kwargs)
    if "dt" in extra:  # fixed step: samples leave the batch by blowing up at very different times
        unstable = masked.retcodes == int(deb.ReturnCode.Unstable)
        assert 3 < int(unstable.sum()) < prob.batch_size - 3, masked.retcodes
    else:  # samples finish at very different iterations
        assert int(masked.stats.naccept.max()) > 2 * int(masked.stats.naccept.min()), masked.stats.naccept
    compacted = deb.solve(prob, compact=0.7, **kwargs)
    assert compactions and compactions[-1] < 0.7 * prob.batch_size, compactions
    assert_same_solution(compacted, masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alg", [deb.SOSRI, deb.SOSRA])
def test_sde_compacted_backward_time_and_dtypes(alg, dtype, compactions):
    """Time running backwards (t1 < t0: the tree queried on the reversed interval), a
    decreasing saveat, float32 states with their float32 tree."""
    prob = sde_problem("gbm" if alg is deb.SOSRI else "stiff", dtype=dtype, tspan=(1.0, 0.0))
    kwargs = dict(alg=alg(), atol=1e-3, rtol=1e-3, seed=5, saveat=torch.linspace(1, 0, 5), backend="native")
    masked = deb.solve(prob, **kwargs)
    compactions.clear()
    compacted = deb.solve(prob, compact=0.7, **kwargs)
    assert compactions
    assert compacted.ys.dtype == dtype
    assert_same_solution(compacted, masked)


def test_sde_compacted_gradients_equal_masked(compactions):
    y0 = _carried(torch.logspace(-1.3, 0.3, 12), 0.5).requires_grad_()
    prob = deb.SDEProblem(_gbm_drift, _gbm_diffusion, y0, (0.0, 1.0))
    grads = []
    for compact in (0.0, 0.7):
        sol = deb.solve(prob, deb.SOSRI(), atol=1e-3, rtol=1e-3, seed=2, compact=compact, backend="native")
        grads.append(torch.autograd.grad((sol.ys[-1, :, 0] ** 2).sum(), y0)[0])
    assert compactions
    assert torch.equal(grads[0], grads[1])
    # and the gradient is the pathwise one: d u(1)^2 / d u0 = 2 u(1)^2 / u0 for GBM
    sol = deb.solve(prob, deb.SOSRI(), atol=1e-3, rtol=1e-3, seed=2, compact=0.7, backend="native")
    u1 = sol.ys[-1, :, 0].detach()
    torch.testing.assert_close(grads[1][:, 0], 2 * u1**2 / 0.5, rtol=1e-9, atol=0)


def test_sde_compacted_sample_independent_of_batch(compactions):
    """A sample's result does not depend on the batch it sits in, compacted or not: the
    first 8 samples alone equal those rows of the 24-sample compacted solve."""
    kwargs = dict(alg=deb.SOSRA(), atol=1e-3, rtol=1e-3, seed=11, backend="native")
    big = deb.solve(sde_problem("stiff", 24), compact=0.7, **kwargs)
    assert compactions
    small = sde_problem("stiff", 24)
    small = deb.SDEProblem(small.drift, small.diffusion, small.y0[:8], small.tspan, noise="additive")
    alone = deb.solve(small, **kwargs)
    assert torch.equal(alone.ys, big.ys[:, :8])
    assert torch.equal(alone.stats.naccept, big.stats.naccept[:8])


def test_compact_refusal_is_stated():
    """Where the loop cannot compact (here: a regularizer observes the full batch), the
    masked loop runs and a warning names the reason."""
    prob = sde_problem("gbm", 8)
    with pytest.warns(RuntimeWarning, match="compact=0.5 not applied: events, dense output"):
        deb.solve(prob, deb.SOSRI(), seed=1, compact=0.5, dense=True, backend="native")


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_checkpointed_forward_compacts_with_the_same_solution_and_gradients(sde, compactions):
    """DiscreteAdjoint(checkpoints=3): the forward compacts (its snapshots are of the full
    batch), the backward re-runs each segment masked; solution and gradients as masked."""
    if sde:
        y0 = _carried(torch.logspace(-1.3, 0.3, 12), 0.5).requires_grad_()
        prob = deb.SDEProblem(_gbm_drift, _gbm_diffusion, y0, (0.0, 1.0))
        kwargs = dict(alg=deb.SOSRI(), atol=1e-3, rtol=1e-3, seed=4)
    else:
        y0 = torch.stack([torch.ones(12), torch.logspace(-1, 2, 12)], dim=1).requires_grad_()
        prob = deb.ODEProblem(decay, y0, (0.0, 2.0))
        kwargs = dict(alg=deb.Tsit5(), atol=1e-8, rtol=1e-8)
    sols, grads = [], []
    for compact in (0.0, 0.7):
        sol = deb.solve(prob, compact=compact, sensealg=deb.DiscreteAdjoint(checkpoints=3), backend="native", **kwargs)
        sols.append(sol)
        grads.append(torch.autograd.grad((sol.ys[-1, :, 0] ** 2).sum(), y0)[0])
    assert compactions
    assert_same_solution(sols[1], sols[0])
    assert torch.equal(grads[0], grads[1])


def test_fields_that_are_not_row_independent_are_refused_with_a_reason(compactions):
    """A drift that captures a per-sample tensor of the batch's shape, or couples samples
    (a batch mean), cannot run on the running samples alone: the loop checks it at the
    compaction point, keeps the masked loop (the same solution) and says why."""
    rates = torch.logspace(-1, 2.5, 16).unsqueeze(1)
    y0 = torch.ones(16, 1)

    def captured(t, y):
        return -rates * y

    def coupled(t, y):  # the rate carried as a second component, plus a mean field
        return decay(t, y) + 1e-3 * y.mean(0, keepdim=True) * torch.tensor([1.0, 0.0])

    cases = ((captured, y0, "fails on the running samples alone"), (coupled, problem().y0, "differs from those rows"))
    for drift, start, match in cases:
        prob = deb.ODEProblem(drift, start, (0.0, 3.0))
        kwargs = dict(alg=deb.Tsit5(), atol=1e-5, rtol=1e-5, backend="native")
        masked = deb.solve(prob, **kwargs)
        with pytest.warns(RuntimeWarning, match=match):
            compacted = deb.solve(prob, compact=0.5, **kwargs)
        assert not compactions
        assert_same_solution(compacted, masked)


def test_gather_scatter_are_generic_over_batch_first_state():
    """The loop state's solver state may be any nesting of batch-first tensors (and shared
    non-tensor values): gathered by rows and written back; a tensor that is not batch-first
    is named as the reason not to compact."""
    batch, rows = 6, torch.tensor([4, 1])
    state = {"stiff": torch.arange(6), "pair": (torch.ones(6, 2), None), "name": "SOSRI", "k": [torch.zeros(6, 1, 3)]}
    assert engine._not_batch_first(state, batch, "solver_state") is None
    part = engine._gather(state, rows)
    assert torch.equal(part["stiff"], torch.tensor([4, 1])) and part["name"] == "SOSRI"
    assert part["pair"][0].shape == (2, 2) and part["k"][0].shape == (2, 1, 3) and part["pair"][1] is None
    part["stiff"] = part["stiff"] * 10
    part["new"] = torch.ones(2)  # started after the compaction: zeros elsewhere
    full = engine._scatter(state, part, rows, batch)
    assert torch.equal(full["stiff"], torch.tensor([0, 10, 2, 3, 40, 5]))
    assert torch.equal(full["new"], torch.tensor([0.0, 1, 0, 0, 1, 0]))
    assert torch.equal(state["stiff"], torch.arange(6))  # out of place
    bad = {"J": torch.eye(3)}
    assert "solver_state['J'] has shape (3, 3)" in engine._not_batch_first(bad, batch, "solver_state")
    assert "not batch-first" in engine._not_batch_first((torch.tensor(1.0),), batch, "carry")


def test_solver_state_is_gathered_and_batch_coupled_solvers_refused(compactions):
    """AutoTsit5's per-sample switching state (LoopState.solver_state, a NamedTuple of (B,)
    tensors) is gathered with the rest: stiff samples switch to Rodas4 as in the masked loop.
    Newton iterations that stop when the whole batch converged (the default) and
    ESDIRK(reuse_jacobian=True) (one Jacobian refresh for the whole batch) make a sample's
    step depend on the others: refused, with the reason."""
    prob = problem(12)
    kwargs = dict(atol=1e-6, rtol=1e-6, backend="native")
    auto = deb.AutoTsit5(deb.Rodas4())
    masked = deb.solve(prob, alg=auto, **kwargs)
    assert int(masked.stats.extra["stiff_steps"].max()) > 0  # some samples did switch
    compacted = deb.solve(prob, alg=auto, compact=0.7, **kwargs)
    assert compactions
    assert_same_solution(compacted, masked)
    compactions.clear()
    fixed_newton = NewtonOptions(early_exit=False)
    cases = (
        (deb.Kvaerno5(reuse_jacobian=True, newton=fixed_newton), "Kvaerno5: reuse_jacobian refreshes"),
        (deb.Kvaerno5(), "Kvaerno5: its Newton iterations run until every sample"),
        (deb.AutoTsit5(deb.Kvaerno5()), "Kvaerno5: its Newton iterations"),
    )
    for alg, match in cases:
        with pytest.warns(RuntimeWarning, match=match):
            refused = deb.solve(prob, alg=alg, compact=0.7, **kwargs)
        assert not compactions
        assert_same_solution(refused, deb.solve(prob, alg=alg, **kwargs))
