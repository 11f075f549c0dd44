"""``solve(..., compile=True)``: the iteration's tensor math through ``torch.compile``.

The compiled loop must take the same steps as the eager loop and agree with it to the last
bits that fused kernels may change: the controller's ``exp``/``log`` run inside the compiled
region (inductor's vectorised versions round differently from ATen's), so step sizes differ
in the last bits and the solution by a small multiple of that (measured: 8.9e-14 on the
Lotka–Volterra test below, same steps; the bound allows 1e-12 relative).  Compiling costs
10-60 seconds per (solver, shape, dtype, device) on the CPU, so the problems are tiny.
"""

import importlib.util
import shutil
import warnings

import pytest
import torch
from problems import linear, strong_error, tree_for
from test_cuda_graph_path import ReplayGraph

import diffeqbridge as deb
from diffeqbridge import _cuda_graph, _tree_kernel, engine

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.skipif(
        importlib.util.find_spec("torch._inductor") is None or shutil.which("cc") is None,
        reason="torch.compile's inductor backend (and a C compiler) unavailable",
    ),
]

#: compiled vs eager: relative difference allowed (fused kernels may reassociate sums, the
#: controller's exp/log round differently, and the step sizes carry that into the solution)
RTOL = 1e-12


def lotka_volterra(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = y[:, 0], y[:, 1]
    return torch.stack([1.5 * a - a * b, -3.0 * b + a * b], dim=1)


def assert_compiled(prob: deb.ODEProblem) -> None:
    failed = {k: v for k, v in engine._COMPILE_FAILED.items() if k[-2] == id(prob.drift)}
    assert not failed, failed


def assert_same_solve(eager: deb.Solution, compiled: deb.Solution) -> None:
    for name in ("naccept", "nreject", "nf", "ng"):
        assert torch.equal(getattr(eager.stats, name), getattr(compiled.stats, name)), name
    assert torch.equal(eager.retcodes, compiled.retcodes)
    scale = eager.ys.abs().clamp(min=1.0)
    assert ((compiled.ys - eager.ys).abs() <= RTOL * scale).all(), (compiled.ys - eager.ys).abs().max()


def test_compiled_ode_takes_the_eager_steps():
    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.5, 3.0], [1.2, 1.7]])
    prob = deb.ODEProblem(lotka_volterra, y0, (0.0, 5.0))
    kwargs = dict(alg=deb.Tsit5(), atol=1e-6, rtol=1e-6, saveat=torch.linspace(0.0, 5.0, 6), backend="native")
    eager = deb.solve(prob, **kwargs)
    compiled = deb.solve(prob, compile=True, **kwargs)
    assert_compiled(prob)
    assert (eager.stats.naccept > 20).all() and (eager.stats.naccept != eager.stats.naccept[0]).any()
    assert_same_solve(eager, compiled)


def test_compiled_sde_fixed_step():
    prob, _ = linear(4)
    kwargs = dict(alg=deb.EM(), dt=1 / 64, backend="native")
    eager = deb.solve(prob, brownian=tree_for(prob, seed=3), **kwargs)
    compiled = deb.solve(prob, brownian=tree_for(prob, seed=3), compile=True, **kwargs)
    assert_compiled(prob)
    assert_same_solve(eager, compiled)


def test_untraceable_drift_falls_back_with_one_warning():
    def drift(t, y):  # a data-dependent Python branch: cannot be traced into one graph
        return -y if bool((y > 0).all()) else y

    prob = deb.ODEProblem(drift, torch.tensor([[1.0], [2.0]]), (0.0, 1.0))
    eager = deb.solve(prob, deb.Tsit5(), backend="native")
    with pytest.warns(RuntimeWarning, match="compile=True: torch.compile failed for Tsit5"):
        compiled = deb.solve(prob, deb.Tsit5(), compile=True, backend="native")
    assert_same_solve(eager, compiled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the key stays eager
        deb.solve(prob, deb.Tsit5(), compile=True, backend="native")


def test_compile_must_be_bool():
    prob = deb.ODEProblem(lotka_volterra, torch.ones(1, 2), (0.0, 1.0))
    with pytest.raises(TypeError, match="compile must be a bool"):
        deb.solve(prob, deb.Tsit5(), compile=1)
    with pytest.raises(ValueError, match="native backend only"):
        deb.solve(prob, deb.Tsit5(), compile=True, backend="julia")


def test_compiled_gradients_match_eager():
    """Backprop through compiled iterations, plain and checkpointed (retain_graph segments)."""
    p = torch.tensor([1.5, 3.0], requires_grad=True)

    def drift(t, y):
        a, b = y[:, 0], y[:, 1]
        return torch.stack([p[0] * a - a * b, -p[1] * b + a * b], dim=1)

    prob = deb.ODEProblem(drift, torch.tensor([[1.0, 1.0], [2.0, 0.5]]), (0.0, 2.0))
    grads = {}
    for compile in (False, True):
        for sensealg in (None, deb.DiscreteAdjoint(checkpoints=3)):
            sol = deb.solve(prob, deb.Tsit5(), atol=1e-8, rtol=1e-8, sensealg=sensealg, compile=compile, backend="native")
            grads[compile, sensealg is None] = torch.autograd.grad(sol.ys[-1].sum(), p)[0]
    assert_compiled(prob)
    reference = grads[False, True]
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference, rtol=RTOL * 16, atol=0.0, msg=str(key))


def test_compiled_adaptive_sde_is_as_accurate_as_eager(monkeypatch):
    """SOSRI on GBM through one compiled graph per iteration, the tree's C kernel inside it as
    a custom op.  A last-bit change of ``dt`` may flip an accept/reject decision
    near ``err = 1``, so the step sequences may differ; both solves must succeed with the same
    work (evaluations within 5 %) and the same accuracy against the closed form (the mean over
    64 paths: one path's error moves by a factor of 4 when its step sequence changes; measured
    with B = 8: the first difference is one ulp of one sample's ``dt`` at iteration 12).

    The tree query is in the graph: after the initial state the eager entry point
    ``evaluate`` is never called (a graph break there would fail ``fullgraph=True`` and fall
    back with a warning), while every iteration runs the C kernel (``run_c``, from the custom
    op); each of its results equals a fresh tree's eager ``evaluate`` bit for bit."""
    prob, exact = linear(64)
    bm = tree_for(prob, seed=5)
    if bm.kernel != "fused":
        pytest.skip("no C compiler for the tree's fused CPU kernel")
    kwargs = dict(alg=deb.SOSRI(), atol=1e-3, rtol=1e-3, brownian=bm, backend="native")
    eager = deb.solve(prob, **kwargs)
    queries: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    evaluates = []
    run_c, evaluate = _tree_kernel.run_c, deb.VirtualBrownianTree.evaluate

    def recording_run_c(kernel, t, *args, **kwargs):
        out = run_c(kernel, t, *args, **kwargs)
        queries.append((t.clone(), tuple(x.clone() for x in out)))
        return out

    def counting_evaluate(self, t):
        evaluates.append(t)
        return evaluate(self, t)

    monkeypatch.setattr(_tree_kernel, "run_c", recording_run_c)
    monkeypatch.setattr(deb.VirtualBrownianTree, "evaluate", counting_evaluate)
    compiled = deb.solve(prob, compile=True, **kwargs)
    monkeypatch.undo()
    assert_compiled(prob)
    iterations = int((compiled.stats.naccept + compiled.stats.nreject).max())
    assert len(evaluates) == 1  # the initial state; every iteration queries through the custom op
    assert len(queries) == 1 + iterations  # the initial state, then one query per iteration
    fresh = tree_for(prob, seed=5)
    for t, values in queries[::7]:
        for a, b in zip(values, fresh.evaluate(t)):
            assert torch.equal(a, b)
    assert (compiled.retcodes == int(deb.ReturnCode.Success)).all()
    work = [float((s.stats.nf + s.stats.ng).sum()) for s in (eager, compiled)]
    assert abs(work[1] - work[0]) <= 0.05 * work[0], work
    errors = [strong_error(s, exact, bm) for s in (eager, compiled)]
    assert errors[1] <= 1.5 * errors[0] and errors[0] <= 1.5 * errors[1], errors


def test_compiled_iterations_unrolled_by_check_every(monkeypatch):
    """``check_every=k`` with ``compile=True``: after each check one compiled call runs ``k``
    iterations (the save at ``t1`` inside the graph); the checks are at iterations 1, 1 + k,
    ...  Stopped samples are frozen, so the steps are the per-iteration compiled loop's and
    the states agree to the last bits (the unrolled graph may fuse across iterations).  The
    CUDA-graph bookkeeping (``_cuda_graph``, a replaying stand-in graph on the CPU) takes the
    compiled call's real outputs and gives the same bits."""
    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.5, 3.0]])
    prob = deb.ODEProblem(lotka_volterra, y0, (0.0, 3.0))
    kwargs = dict(alg=deb.Tsit5(), atol=1e-6, rtol=1e-6, backend="native")
    eager = deb.solve(prob, **kwargs)
    repeats = []
    original = engine.Integrator._repeat

    def recording(self, s):
        repeats.append(original(self, s))
        return repeats[-1]

    monkeypatch.setattr(engine.Integrator, "_repeat", recording)
    unrolled = deb.solve(prob, compile=True, check_every=2, **kwargs)
    assert_compiled(prob)
    # the check right after the eager first iteration: every later call is an unrolled one
    assert repeats[0] == 1 and set(repeats[1:]) == {2} and len(repeats) >= 10, repeats
    assert_same_solve(eager, unrolled)

    monkeypatch.setattr(_cuda_graph, "wanted", lambda device: True)
    monkeypatch.setattr(engine, "_new_graph", ReplayGraph)
    ReplayGraph.made = []
    graphed = deb.solve(prob, compile=True, check_every=2, **kwargs)
    assert len(ReplayGraph.made) == 1 and ReplayGraph.made[0].replays >= 8
    assert torch.equal(graphed.ys, unrolled.ys) and torch.equal(graphed.stats.naccept, unrolled.stats.naccept)
