"""Solvers hold no per-solve state (issue 12 item 1): what a solver carries between steps lives
in ``LoopState.solver_state`` (``init`` -> ``step``/``update``), so

* one solver instance driving two interleaved solves gives each the bits of a solve with its
  own instance (states, step counts, retcodes, ``stats.extra``);
* no attribute of the solver object changes during a solve;
* a step of the non-stiff/composite methods makes no host synchronisation (the composites fix
  which methods run at the loop's host checks, ``AutoSwitch.plan``).

Every solver class of the package (``solvers.ALL_SOLVERS`` and ``COMPOSITE_SOLVERS``) is
covered, plus ``Kvaerno5(reuse_jacobian=True)`` (the stateful ESDIRK variant).
"""

from __future__ import annotations

import collections
import dataclasses
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import engine
from diffeqbridge.solvers import ALL_SOLVERS, COMPOSITE_SOLVERS, AbstractSolver

pytestmark = pytest.mark.usefixtures("float64_default")

COMPOSITES: dict[str, Callable[..., AbstractSolver]] = {
    "AutoSwitch": lambda **kw: deb.AutoSwitch(deb.ShARK(), deb.SKenCarp(), **kw),
    "AutoTsit5": lambda **kw: deb.AutoTsit5(deb.Rodas4(), **kw),
    "AutoDP5": lambda **kw: deb.AutoDP5(deb.Kvaerno5(reuse_jacobian=True), **kw),
    "AutoSOSRI": lambda **kw: deb.AutoSOSRI(**kw),
}
SOLVERS: dict[str, Callable[[], AbstractSolver]] = {
    **{cls.__name__: cls for cls in ALL_SOLVERS},
    "Kvaerno5(reuse_jacobian)": lambda: deb.Kvaerno5(reuse_jacobian=True),
    **COMPOSITES,
}
assert {cls.__name__ for cls in COMPOSITE_SOLVERS} == set(COMPOSITES)
#: stiff rates for the composites (they switch on them), a mild one for the rest
STIFF_RATE, STIFF_SDE_RATE, MILD_RATE = -3000.0, -300.0, -3.0


def _rate(name: str, solver: AbstractSolver) -> float:
    if name not in COMPOSITES:
        return MILD_RATE
    return STIFF_SDE_RATE if solver.is_sde else STIFF_RATE


def _problem(solver: AbstractSolver, y0: torch.Tensor, rate: float, t1: float | None = None) -> Any:
    """``dX = λ (X - cos t) dt [+ σ dW]`` with ``λ = (-1/2, rate)`` per sample: an ODE for ODE
    solvers; diagonal noise ``0.3 (1 + sin(X)/2)`` where the solver takes it, else additive
    ``0.2 (1 + t)``; the solver's first interpretation."""
    lam = torch.tensor([[-0.5], [rate]])
    if t1 is None:
        t1 = 0.25 if solver.is_sde else 1.5

    def drift(t, y):
        return lam * (y - torch.cos(t)[:, None])

    if not solver.is_sde:
        return deb.ODEProblem(drift, y0, (0.0, t1))
    interpretation = sorted(solver.interpretations)[0]
    if "diagonal" in solver.noise_types:
        return deb.SDEProblem(
            drift, lambda t, y: 0.3 * (1 + 0.5 * torch.sin(y)), y0, (0.0, t1), noise="diagonal", interpretation=interpretation
        )
    return deb.SDEProblem(
        drift, lambda t, y: 0.2 * (1 + t)[:, None].expand_as(y), y0, (0.0, t1), noise="additive", interpretation=interpretation
    )


def _options(solver: AbstractSolver, t1: float) -> dict[str, Any]:
    tol = 1e-2 if solver.is_sde else 1e-5
    kwargs: dict[str, Any] = dict(atol=tol, rtol=tol, saveat=torch.linspace(0.0, t1, 4), backend="native")
    if not solver.adaptive:
        kwargs["dt"] = 2.0**-7
    return kwargs


@contextmanager
def _captured() -> Iterator[list[tuple[engine.Integrator, engine.LoopState]]]:
    """``deb.solve`` sets up its loop (tree, initial step, ``solver.init``) but does not run it:
    the ``(Integrator, LoopState)`` pairs are handed to the test, which drives them."""
    loops: list[tuple[engine.Integrator, engine.LoopState]] = []
    run = engine.Integrator.run

    def hold(self, s, stop_at=None, boundaries=None, progress=False):
        loops.append((self, s))
        return []

    engine.Integrator.run = hold  # type: ignore[method-assign]
    try:
        yield loops
    finally:
        engine.Integrator.run = run  # type: ignore[method-assign]


def _loop(prob: Any, solver: AbstractSolver, seed: int) -> tuple[engine.Integrator, engine.LoopState]:
    with _captured() as loops:
        deb.solve(prob, solver, seed=seed, **_options(solver, prob.tspan[1]))
    ((loop, state),) = loops
    return loop, state


def _fingerprint(x: Any) -> Any:
    """Everything reachable from a solver's attributes, as comparable values."""
    if isinstance(x, AbstractSolver) or hasattr(x, "__dataclass_fields__"):
        return (type(x).__name__, tuple((k, _fingerprint(v)) for k, v in sorted(vars(x).items())))
    if isinstance(x, torch.Tensor):
        return ("tensor", x.shape, x.dtype, tuple(x.flatten().tolist()))
    if isinstance(x, (list, tuple)):
        return tuple(_fingerprint(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _fingerprint(v)) for k, v in sorted(x.items()))
    return repr(x)


def _assert_same(a: deb.Solution, b: deb.Solution) -> None:
    assert torch.equal(a.ys, b.ys)
    assert torch.equal(a.retcodes, b.retcodes)
    for name in ("nf", "ng", "naccept", "nreject"):
        assert torch.equal(getattr(a.stats, name), getattr(b.stats, name)), name
    assert a.stats.extra.keys() == b.stats.extra.keys()
    for key, value in a.stats.extra.items():
        assert torch.equal(torch.nan_to_num(value), torch.nan_to_num(b.stats.extra[key])), key


@pytest.mark.parametrize("name", list(SOLVERS))
def test_one_instance_in_two_interleaved_solves(name):
    make = SOLVERS[name]
    shared = make()
    rate = _rate(name, shared)
    y0s = (torch.tensor([[1.0], [0.5]]), torch.tensor([[-0.3], [2.0]]))
    refs = []
    for seed, y0 in enumerate(y0s):
        loop, state = _loop(_problem(shared, y0, rate), make(), seed)
        loop.run(state)
        refs.append(loop.solution(state))
    before = _fingerprint(shared)
    # both loops initialised on the shared instance before either steps; then 3 and 5
    # iterations in turn (neither a multiple of the host-check period, 8)
    (la, sa), (lb, sb) = (_loop(_problem(shared, y0, rate), shared, seed) for seed, y0 in enumerate(y0s))
    assert _fingerprint(shared) == before
    for _ in range(400):
        if not (bool(sa.active.any()) or bool(sb.active.any())):
            break
        la.run(sa, stop_at=sa.iteration + 3)
        assert _fingerprint(shared) == before
        lb.run(sb, stop_at=sb.iteration + 5)
        assert _fingerprint(shared) == before
    la.run(sa)
    lb.run(sb)
    assert _fingerprint(shared) == before
    _assert_same(la.solution(sa), refs[0])
    _assert_same(lb.solution(sb), refs[1])
    assert all(bool((r.retcodes == int(deb.ReturnCode.Success)).all()) for r in refs)
    if name in ("AutoTsit5", "AutoDP5"):  # the stiff sample switched (so the state mattered)
        assert int(refs[0].stats.extra["nswitch"][1]) >= 1, refs[0].stats.extra["nswitch"]


def test_solvers_keep_no_private_state():
    """No solver instance has ``_``-prefixed attributes a solve could use as hidden state."""
    for name, make in SOLVERS.items():
        solver = make()
        stack = [solver]
        while stack:
            s = stack.pop()
            assert not [k for k in vars(s) if k.startswith("_")], name
            stack += [v for v in vars(s).values() if isinstance(v, AbstractSolver)]


SYNCS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextmanager
def _counting_syncs() -> Iterator[collections.Counter]:
    """Counts Python-level reads of tensor values on the host, by caller (file, line)."""
    seen: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def counted(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            seen[(name, caller.filename.rsplit("/", 1)[-1], caller.lineno)] += 1
            return original(self, *args, **kwargs)

        return counted

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, wrap(name))
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize(
    "name", ["Tsit5", "SOSRI", "AutoTsit5", "AutoSOSRI", "AutoSwitch"], ids=lambda n: f"{n}-no-sync-per-step"
)
def test_steps_make_no_host_sync(name):
    """After ``init``, ``Integrator.step`` reads nothing back to the host.  The composites are
    taken on a mixed batch (sample 1 on the stiff method, sample 0 not: both methods run), their
    implicit partners with a fixed number of Newton iterations (``early_exit=False``; the
    default early exit reads the convergence mask once per Newton iteration,
    ``nonlinear.newton_stage``)."""
    solver = SOLVERS[name]()
    newton = getattr(getattr(solver, "stiff", None), "newton", None)
    if newton is not None:
        solver.stiff.newton = dataclasses.replace(newton, early_exit=False)  # type: ignore[attr-defined]
    loop, state = _loop(_problem(solver, torch.tensor([[1.0], [0.5]]), _rate(name, solver), t1=30.0), solver, seed=0)
    if name in COMPOSITES:
        mixed = state.solver_state._replace(stiff=torch.tensor([False, True]))
        state.solver_state = solver.plan(mixed, state.active, 16)  # the loop's host check
        assert state.solver_state.run == (True, True)
    with _counting_syncs() as seen:
        for _ in range(16):
            loop.step(state)
    assert not seen, dict(seen)
    assert bool(state.active.all()) and int(state.naccept.min()) >= 8


def test_plan_covers_every_switch():
    """``AutoSwitch.plan`` runs a method when some active sample uses it or could reach its
    switching threshold within the horizon, and only then."""
    solver = deb.AutoTsit5(deb.Rodas4())  # maxstiffstep 10, maxnonstiffstep 3
    prob = deb.ODEProblem(lambda t, y: -y, torch.ones(4, 1), (0.0, 1.0))
    state = solver.init(None, torch.zeros(4), prob.y0)  # type: ignore[arg-type]
    active = torch.ones(4, dtype=torch.bool)

    def plan(stiff, count, horizon, act=active):
        s = state._replace(stiff=torch.tensor(stiff), counter=torch.tensor(count))
        return solver.plan(s, act, horizon).run

    assert plan([False] * 4, [0, 2, -5, 1], 8) == (True, False)  # 2 + 8 = 10: not > 10
    assert plan([False] * 4, [0, 3, -5, 1], 8) == (True, True)  # 3 + 8 = 11 > 10
    assert plan([False] * 4, [0, 3, -5, 1], 1) == (True, False)
    assert plan([True] * 4, [0, 0, 0, 0], 3) == (False, True)  # 0 - 3 = -3: not < -3
    assert plan([True] * 4, [0, 0, 0, 0], 4) == (True, True)
    assert plan([True, False, False, False], [20, 0, 0, 0], 1) == (True, True)
    idle = torch.tensor([True, False, False, False])
    assert plan([False, True, True, True], [0, 0, 0, 0], 1, idle) == (True, False)
    assert plan([False] * 4, [0] * 4, 1, torch.zeros(4, dtype=torch.bool)) == (True, False)
