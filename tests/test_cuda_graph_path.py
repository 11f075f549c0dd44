"""``compile=True`` on CUDA: the compiled call captured as a graph (``diffeqbridge._cuda_graph``).

No GPU here, so the selection and the static-buffer bookkeeping are tested on the CPU: a
stand-in graph records the captured body without running it and runs it at each replay
(what a CUDA graph does with the recorded kernels), and the compiled iteration is replaced by
the eager one (the bookkeeping is the same; no compilation in this file).  The graphed loop
must equal the plain loop bit for bit, and a failed capture must fall back with one warning.
"""

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import _cuda_graph, engine

pytestmark = pytest.mark.usefixtures("float64_default")


class ReplayGraph:
    """Stand-in for :class:`_cuda_graph.CudaGraph`: capture records, replay runs."""

    made: list["ReplayGraph"] = []

    def __init__(self) -> None:
        self.body: Any = None
        self.replays = 0
        ReplayGraph.made.append(self)

    def capture(self, body: Any) -> None:
        self.body = body

    def replay(self) -> None:
        self.replays += 1
        self.body()


class FailingGraph(ReplayGraph):
    def capture(self, body: Any) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")


def lotka_volterra(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = y[:, 0], y[:, 1]
    return torch.stack([1.5 * a - a * b, -3.0 * b + a * b], dim=1)


@pytest.fixture
def eager_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True's call path with the eager iteration in place of the compiled one."""
    monkeypatch.setattr(engine, "_FUSED_ITERATION", engine.Integrator._iteration)
    monkeypatch.setattr(engine, "_FUSED_SDE", engine.Integrator._sde_advance)
    monkeypatch.setattr(engine, "_FUSED_UNROLLED", engine.Integrator._iteration)
    monkeypatch.setattr(engine, "_GRAPH_FAILED", {})
    ReplayGraph.made = []


def solve(graphs: bool, monkeypatch: pytest.MonkeyPatch, check_every: int = 4) -> deb.Solution:
    monkeypatch.setattr(_cuda_graph, "wanted", lambda device: graphs)
    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.5, 3.0]])
    prob = deb.ODEProblem(lotka_volterra, y0, (0.0, 4.0))
    # saves at forced times only (interpolated saves are queued in Python: no graph then)
    kwargs = dict(atol=1e-6, rtol=1e-6, tstops=[2.0], backend="native", check_every=check_every)
    return deb.solve(prob, deb.Tsit5(), compile=True, **kwargs)


def test_selection_by_device(monkeypatch: pytest.MonkeyPatch):
    assert not _cuda_graph.wanted(torch.device("cpu"))
    assert _cuda_graph.wanted(torch.device("cuda"))
    assert _cuda_graph.wanted(torch.device("cuda", 1))
    monkeypatch.setenv("DIFFEQBRIDGE_CUDA_GRAPHS", "0")
    assert not _cuda_graph.wanted(torch.device("cuda"))


def test_layout_refuses_gradients_and_opaque_leaves():
    @dataclass
    class State:
        a: Any
        b: Any

    x = torch.zeros(3, 2)
    key, leaves = _cuda_graph.layout(State(x, (None, 1.5)), ["a", "b"])
    assert _cuda_graph.layout(State(torch.ones(3, 2), (None, 1.5)), ["a", "b"])[0] == key
    assert _cuda_graph.layout(State(x, (None, 2.5)), ["a", "b"])[0] != key  # a plain leaf is part of it
    assert _cuda_graph.layout(State(torch.zeros(3, 3), (None, 1.5)), ["a", "b"])[0] != key
    assert _cuda_graph.layout(State(x.t(), (None, 1.5)), ["a", "b"])[0] != key  # strides
    assert _cuda_graph.layout(State(x.requires_grad_(), None), ["a", "b"]) is None
    assert _cuda_graph.layout(State(torch.zeros(2), object()), ["a", "b"]) is None


def test_replay_updates_the_state_in_place_and_takes_replaced_fields():
    @dataclass
    class State:
        x: torch.Tensor
        n: torch.Tensor

    def fn(work: State) -> None:
        work.x, work.n = 2.0 * work.x + 1.0, work.n + 1

    state = State(torch.tensor([1.0, 2.0]), torch.tensor(0))
    graph = ReplayGraph()
    graphed = _cuda_graph.capture(fn, state, ["x", "n"], graph)
    assert graph.replays == 0 and torch.equal(state.x, torch.tensor([1.0, 2.0]))  # nothing ran
    graphed.replay(state, _cuda_graph.layout(state, ["x", "n"])[1])
    static_x = state.x
    graphed.replay(state, _cuda_graph.layout(state, ["x", "n"])[1])
    assert state.x is static_x and torch.equal(state.x, torch.tensor([7.0, 11.0])) and int(state.n) == 2
    state.x = torch.tensor([0.0, -1.0])  # the loop replaced a field between calls
    graphed.replay(state, _cuda_graph.layout(state, ["x", "n"])[1])
    assert state.x is static_x and torch.equal(state.x, torch.tensor([1.0, -1.0])) and int(state.n) == 3


def test_capture_refuses_a_changed_layout():
    @dataclass
    class State:
        x: torch.Tensor

    def fn(work: State) -> None:
        work.x = torch.cat([work.x, work.x])

    graphed = _cuda_graph.capture(fn, State(torch.zeros(2)), ["x"], ReplayGraph())
    with pytest.raises(RuntimeError, match="changed the loop state's layout"):
        graphed.replay(State(torch.zeros(2)), [torch.zeros(2)])


@pytest.mark.usefixtures("eager_fused")
def test_graphed_loop_equals_the_plain_loop(monkeypatch: pytest.MonkeyPatch):
    plain = solve(False, monkeypatch)
    assert not ReplayGraph.made
    monkeypatch.setattr(engine, "_new_graph", ReplayGraph)
    graphed = solve(True, monkeypatch)
    # one graph (the 4-iteration call), captured at its second call and replayed from then on
    (graph,) = ReplayGraph.made
    calls = int(plain.stats.naccept.max() + plain.stats.nreject.max()) // 4
    assert calls - 2 <= graph.replays <= calls + 1 and graph.replays > 3
    assert torch.equal(graphed.ys, plain.ys)
    assert torch.equal(graphed.retcodes, plain.retcodes)
    for name in ("naccept", "nreject", "nf"):
        assert torch.equal(getattr(graphed.stats, name), getattr(plain.stats, name)), name


@pytest.mark.usefixtures("eager_fused")
def test_failed_capture_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch):
    plain = solve(False, monkeypatch)
    monkeypatch.setattr(engine, "_new_graph", FailingGraph)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed for Tsit5") as record:
        fallback = solve(True, monkeypatch)
    assert sum("CUDA graph" in str(w.message) for w in record) == 1
    assert torch.equal(fallback.ys, plain.ys)
    with warnings_as_errors():
        again = solve(True, monkeypatch)  # the failure is remembered: no second capture, no warning
    assert torch.equal(again.ys, plain.ys)


@pytest.mark.usefixtures("eager_fused")
def test_no_graph_and_no_cpp_wrapper_with_gradients(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_cuda_graph, "wanted", lambda device: True)
    monkeypatch.setattr(engine, "_new_graph", ReplayGraph)
    monkeypatch.setattr(engine, "_FUSED_UNROLLED", lambda *args: pytest.fail("C++ wrapper with gradients"))
    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5]], requires_grad=True)
    prob = deb.ODEProblem(lotka_volterra, y0, (0.0, 2.0))
    sol = deb.solve(prob, deb.Tsit5(), atol=1e-6, rtol=1e-6, backend="native", compile=True, check_every=4)
    sol.ys[-1].sum().backward()
    assert not ReplayGraph.made and y0.grad is not None and torch.isfinite(y0.grad).all()


def warnings_as_errors() -> Any:
    import warnings

    class Context:
        def __enter__(self) -> None:
            self.catch = warnings.catch_warnings()
            self.catch.__enter__()
            warnings.simplefilter("error", RuntimeWarning)

        def __exit__(self, *exc: Any) -> None:
            self.catch.__exit__(*exc)

    return Context()


@pytest.mark.usefixtures("eager_fused")
def test_unrolled_cpu_calls_take_the_cpp_wrapper_and_fall_back(monkeypatch: pytest.MonkeyPatch):
    """On the CPU the unrolled ODE calls go through the C++-wrapper compilation; if that fails,
    one warning and the Python-wrapper one (same kernels, same bits)."""
    used: list[int] = []

    def unrolled(self: Any, s: Any, direct: bool, save: bool, repeat: int) -> Any:
        used.append(repeat)
        return engine.Integrator._iteration(self, s, direct, save, repeat)

    monkeypatch.setattr(engine, "_FUSED_UNROLLED", unrolled)
    monkeypatch.setattr(engine, "_CPP_WRAPPER_UNROLLED", True)
    plain = solve(False, monkeypatch)
    assert used and set(used) == {4}

    def failing(*args: Any) -> Any:
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(engine, "_FUSED_UNROLLED", failing)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ wrapper failed"):
        fallback = solve(False, monkeypatch)
    assert not engine._CPP_WRAPPER_UNROLLED and torch.equal(fallback.ys, plain.ys)
