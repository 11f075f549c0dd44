"""Evaluations the engine no longer repeats: the start-up ``drift(t0, y0)``/``diffusion(t0, y0)``
reused by the first step, and the additive-noise solvers' ``g(t + h)`` carried into the next
step as its ``g(t)`` (ShARK, SRA1, SRA3, SOSRA).

Both must leave every number unchanged: each solve is compared bit for bit (``ys``, accepted
and rejected steps) with the same solve with both features switched off, and the counts must
drop by exactly the evaluations saved.  Gradients through the carried diffusion (a learnable
``σ`` in a time-dependent ``g(t) = σ (1 + t)``) are checked against central finite
differences of the same fixed-step solve, for plain backprop and the checkpointed sensealgs
(whose segments restore the carried value as an autograd leaf).
"""

from __future__ import annotations

import sys

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import engine

solve_module = sys.modules["diffeqbridge.solve"]  # the module (``deb.solve`` is the function)

B = 5


@pytest.fixture
def disabled(monkeypatch: pytest.MonkeyPatch):
    """A context in which ``solve`` evaluates ``drift(t0, y0)`` and ``diffusion(t0, y0)`` at the
    start-up whether or not anything uses them, the engine does not reuse them and solvers do
    not carry the diffusion (the behaviour before all three)."""
    start_up = solve_module._start_up_fields

    class _Off:
        def __enter__(self) -> None:
            monkeypatch.setattr(engine.Integrator, "exact_step_ends", lambda self, y0: False)
            monkeypatch.setattr(engine, "_start_terms", lambda terms, t, y, values: (terms, [0, 0]))
            monkeypatch.setattr(solve_module, "_start_up_fields", lambda prob, t0, f, g: start_up(prob, t0, True, True))

        def __exit__(self, *exc: object) -> None:
            monkeypatch.undo()

    return _Off()


def _additive(span: tuple[float, float], sigma: torch.Tensor | float = 0.4) -> deb.SDEProblem:
    """``dy = (sin t - y) dt + σ (1 + t²) dW``: additive, time-dependent diffusion."""
    y0 = torch.linspace(-1.0, 1.0, B, dtype=torch.float64).reshape(B, 1).repeat(1, 2)
    return deb.SDEProblem(
        lambda t, y: torch.sin(t)[:, None] - y,
        lambda t, y: (sigma * (1 + t * t)[:, None]).expand(y.shape[0], 2),
        y0,
        span,
        noise="additive",
        params=[sigma] if isinstance(sigma, torch.Tensor) else [],
    )


def _diagonal(span: tuple[float, float]) -> deb.SDEProblem:
    y0 = torch.linspace(0.5, 1.5, B, dtype=torch.float64).reshape(B, 1).repeat(1, 2)
    return deb.SDEProblem(lambda t, y: torch.cos(t)[:, None] * y, lambda t, y: 0.5 * y, y0, span)


def _compare(prob: deb.SDEProblem, alg: deb.solvers.AbstractSolver, disabled, **kw) -> tuple[deb.Solution, deb.Solution]:
    new = deb.solve(prob, alg, seed=11, **kw)
    with disabled:
        old = deb.solve(prob, alg, seed=11, **kw)
    assert torch.equal(new.ys, old.ys)
    assert torch.equal(new.stats.naccept, old.stats.naccept)
    assert torch.equal(new.stats.nreject, old.stats.nreject)
    return new, old


# drift evaluations saved per solve (adaptive, fixed steps): the SRA tableaus' first stage is
# drift(t0, y0), the start-up's; ShARK's first stage is shifted by g·H, so its fixed-step solves
# (no initial step size to choose) no longer evaluate drift(t0, y0) at all
CARRYING = {
    "ShARK": (deb.ShARK, (0, 1)),
    "SRA1": (deb.SRA1, (1, 1)),
    "SRA3": (deb.SRA3, (1, 1)),
    "SRA4": (deb.SRA4, (1, 1)),
    "SOSRA": (deb.SOSRA, (1, 1)),
}
SPANS = [(0.0, 1.0), (1.0, 0.1)]


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
@pytest.mark.parametrize("name", list(CARRYING))
def test_carried_diffusion_is_exact(name: str, mode: str, span: tuple[float, float], disabled) -> None:
    """One diffusion evaluation fewer per step (accepted or rejected), the same numbers, and
    the drift evaluations saved at the start (:data:`CARRYING`)."""
    solver, saved_drift = CARRYING[name]
    first_drift = saved_drift[mode == "fixed"]
    kw = {"atol": 1e-4, "rtol": 1e-4} if mode == "adaptive" else {"adaptive": False, "dt": 0.07}
    new, old = _compare(_additive(span), solver(), disabled, **kw)
    steps = new.stats.naccept + new.stats.nreject
    assert int(steps.min()) > 5
    assert torch.equal(old.stats.ng - new.stats.ng, steps)
    assert torch.equal(old.stats.nf - new.stats.nf, torch.full_like(steps, first_drift))


@pytest.mark.parametrize("name", ["ShARK", "SRA3"])
def test_no_carry_without_exact_step_ends(name: str, disabled) -> None:
    """Adaptive steps landing on an intermediate save time and a float32 state keep evaluating
    ``g(t)`` every step; only the first step's reuse remains."""
    solver, _ = CARRYING[name]
    prob = _additive((0.0, 1.0))
    new, old = _compare(prob, solver(), disabled, saveat=[0.0, 0.37, 1.0])
    assert int((old.stats.ng - new.stats.ng).max()) <= 1
    prob32 = deb.SDEProblem(prob.drift, prob.diffusion, prob.y0.float(), prob.tspan, noise="additive")
    new, old = _compare(prob32, solver(), disabled)
    assert int((old.stats.ng - new.stats.ng).max()) <= 1


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize(
    ("alg", "saved"),
    [
        (deb.SRIW1, (1, 1)),
        (deb.SOSRI, (1, 1)),
        (deb.EM, (1, 1)),
        (deb.RKMil, (1, 1)),
        (deb.SPaRK, (1, 1)),
        (deb.AutoSOSRI, (1, 1)),
        (lambda: deb.AutoSOSRI(stiffalgfirst=True), (1, 1)),
    ],
)
def test_first_step_reuses_start_up(alg, saved: tuple[int, int], span: tuple[float, float], disabled) -> None:
    """Solvers whose first stage is ``drift(t, y)``/``diffusion(t, y)`` take them from the
    start-up (adaptive and the lockstep fixed-step path), the same numbers; ``alg=None``'s
    ``AutoSOSRI`` too, where only SOSRI runs the first step (its counts are then SOSRI's);
    starting with both methods (``stiffalgfirst``) it reuses nothing."""
    for kw in ({"atol": 1e-3, "rtol": 1e-3}, {"adaptive": False, "dt": 0.1}):
        if "dt" not in kw and not alg().adaptive:
            continue
        new, old = _compare(_diagonal(span), alg(), disabled, **kw)
        assert torch.equal(old.stats.nf - new.stats.nf, torch.full_like(new.stats.nf, saved[0]))
        assert torch.equal(old.stats.ng - new.stats.ng, torch.full_like(new.stats.ng, saved[1]))


def _stiff_additive(span: tuple[float, float], lam: list[float]) -> deb.SDEProblem:
    """``dy = -λ(t) (y - cos t) dt + 0.1 (1 + t) dW`` with a per-sample ``λ`` (``(B,)``) over the
    first 40 % of the span and ``λ = 1`` after it (so stiff samples switch back), the sign
    turned for a backward ``span`` (so that the solution is stable in its direction)."""
    sign = 1.0 if span[1] > span[0] else -1.0
    rate = torch.tensor(lam, dtype=torch.float64)[:, None]
    end = span[0] + 0.4 * (span[1] - span[0])
    y0 = torch.linspace(-1.0, 1.0, B, dtype=torch.float64).reshape(B, 1).repeat(1, 2)
    return deb.SDEProblem(
        lambda t, y: -sign * torch.where((sign * (end - t) > 0)[:, None], rate, 1.0) * (y - torch.cos(t)[:, None]),
        lambda t, y: (0.1 * (1 + t)[:, None]).expand(y.shape[0], 2),
        y0,
        span,
        noise="additive",
    )


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_composite_carries_shark_diffusion(mode: str, span: tuple[float, float], disabled) -> None:
    """``alg=None`` (``AutoSwitch(ShARK, ImplicitRKMil)``) on a non-stiff additive problem: ShARK
    takes every step and carries ``g(t + h)``, one diffusion evaluation fewer per step; fixed
    steps do not evaluate the unused ``drift(t0, y0)``."""
    kw = {"atol": 1e-4, "rtol": 1e-4} if mode == "adaptive" else {"adaptive": False, "dt": 0.07}
    new, old = _compare(_additive(span), None, disabled, **kw)
    assert isinstance(new.alg, deb.AutoSwitch)
    assert int(new.stats.extra["stiff_steps"].max()) == 0
    steps = new.stats.naccept + new.stats.nreject
    assert int(steps.min()) > 5
    assert torch.equal(old.stats.ng - new.stats.ng, steps)
    assert torch.equal(old.stats.nf - new.stats.nf, torch.full_like(steps, int(mode == "fixed")))


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("lam", [[1e4] * B, [1.0, 1e4, 10.0, 1e4, 1.0]])
def test_composite_carry_across_switches(lam: list[float], span: tuple[float, float], disabled) -> None:
    """Stiff samples switch to ImplicitRKMil (alone, or in a batch mixed with non-stiff ones,
    where both methods run every step): the carried ``g`` is kept per sample where a step is
    accepted and evaluated again after steps ShARK did not take; the same numbers, fewer
    diffusion evaluations, never more."""
    new, old = _compare(_stiff_additive(span, lam), None, disabled, atol=1e-2, rtol=1e-2)
    stiff = torch.tensor(lam) > 100
    assert bool((new.stats.extra["stiff_steps"][stiff] > 10).all())
    assert bool((new.stats.extra["nswitch"][stiff] >= 2).all())  # and back
    assert int(new.stats.extra["stiff_steps"][~stiff].sum()) == 0
    saved = old.stats.ng - new.stats.ng
    steps = new.stats.naccept + new.stats.nreject
    assert bool((saved > 0).all()) and bool((saved <= steps).all())
    assert torch.equal(saved[~stiff], steps[~stiff])
    assert torch.equal(old.stats.nf, new.stats.nf)


SENSEALGS = {
    "backprop": lambda: None,
    "discrete_ckpt": lambda: deb.DiscreteAdjoint(checkpoints=3),
    "interpolating_ckpt": lambda: deb.InterpolatingAdjoint(checkpoints=3),
}


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("sensealg", list(SENSEALGS))
@pytest.mark.parametrize("alg", ["ShARK", "default"])
def test_carried_diffusion_gradient(alg: str, sensealg: str, span: tuple[float, float]) -> None:
    """``d Σ y_T / dσ`` through ShARK's carried ``g(t) = σ (1 + t²)``, alone and inside
    ``alg=None``'s composite (fixed steps: the map
    ``σ -> y_T`` is the same discrete map at every σ) against central finite differences."""
    bm = deb.VirtualBrownianTree(min(span), max(span), (B, 2), seed=5)

    def loss(sigma: torch.Tensor, sens: object = None) -> torch.Tensor:
        sol = deb.solve(
            _additive(span, sigma), deb.ShARK() if alg == "ShARK" else None, dt=0.05, adaptive=False, brownian=bm, sensealg=sens
        )
        assert sol.success
        return (sol.ys[-1] * torch.arange(1, 3, dtype=torch.float64)).sum()

    sigma = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(sigma, SENSEALGS[sensealg]()), [sigma])
    h = 1e-5
    with torch.no_grad():
        fd = (loss(torch.tensor(0.4 + h, dtype=torch.float64)) - loss(torch.tensor(0.4 - h, dtype=torch.float64))) / (2 * h)
    assert abs(float(grad) - float(fd)) <= 1e-7 * abs(float(fd)), (float(grad), float(fd))
    assert abs(float(fd)) > 1e-2


def _counted(noise: str, calls: list[int], drift_shape: bool = True, diffusion_shape: bool = True) -> deb.SDEProblem:
    """``dy = (sin t - y) dt + g dW`` whose fields count their calls in ``calls`` (``[drift,
    diffusion]``); ``*_shape=False``: that field returns one column too few."""
    y0 = torch.linspace(0.5, 1.5, B, dtype=torch.float64).reshape(B, 1).repeat(1, 2)

    def drift(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = torch.sin(t)[:, None] - y
        return out if drift_shape else out[:, :1]

    def diffusion(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[1] += 1
        out = (0.4 * (1 + t * t)[:, None]).expand(y.shape[0], 2) if noise == "additive" else 0.3 * y
        return out if diffusion_shape else out[:, :1]

    interpretation = "stratonovich" if noise == "strat" else "ito"
    return deb.SDEProblem(
        drift, diffusion, y0, (0.0, 1.0), noise="additive" if noise == "additive" else "diagonal", interpretation=interpretation
    )


# evaluations of a fixed-step solve of n steps = (a_f + b_f n, a_g + b_g n); a_g = 2 for
# additive noise is the start-up g(t0), carried, plus check_additive's probe at another state
OVERHEAD = {
    "ShARK": (deb.ShARK, "additive", (0, 2, 2, 1)),
    "SRA1": (deb.SRA1, "additive", (0, 2, 2, 1)),
    "SRA3": (deb.SRA3, "additive", (0, 3, 2, 1)),
    "SRA4": (deb.SRA4, "additive", (0, 4, 2, 1)),
    "SOSRA": (deb.SOSRA, "additive", (0, 3, 2, 2)),
    "default-additive": (lambda: None, "additive", (0, 2, 2, 1)),
    "SRIW1": (deb.SRIW1, "diagonal", (0, 2, 0, 4)),
    "SOSRI": (deb.SOSRI, "diagonal", (0, 4, 0, 4)),
    "default-diagonal": (lambda: None, "diagonal", (0, 4, 0, 4)),
    "EM": (deb.EM, "diagonal", (0, 1, 0, 1)),
    "RKMil": (deb.RKMil, "diagonal", (0, 1, 0, 2)),
    "SPaRK": (deb.SPaRK, "diagonal", (0, 3, 0, 4)),
    "ReversibleHeun": (deb.ReversibleHeun, "strat", (1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", list(OVERHEAD))
def test_fixed_step_evaluations_per_solve(name: str) -> None:
    """Counting closures over 1, 2 and 5 fixed steps: the calls are ``a + b n`` with the
    per-solve overhead ``a`` the tableau needs (no start-up value nobody uses) and the counts
    in ``stats`` equal the calls."""
    make, noise, (a_f, b_f, a_g, b_g) = OVERHEAD[name]
    for n in (1, 2, 5):
        calls = [0, 0]
        sol = deb.solve(_counted(noise, calls), make(), dt=1.0 / n, adaptive=False, seed=3)
        assert sol.success
        assert calls == [a_f + b_f * n, a_g + b_g * n], (n, calls)
        assert torch.equal(sol.stats.nf, torch.full_like(sol.stats.nf, calls[0]))
        assert torch.equal(sol.stats.ng, torch.full_like(sol.stats.ng, calls[1]))


@pytest.mark.parametrize("alg", [deb.ImplicitEM, deb.ImplicitRKMil, deb.SKenCarp])
def test_implicit_fixed_steps_take_one_pass(alg) -> None:
    """A fixed-step implicit solve goes to the per-iteration loop at once (the lockstep path
    used to run its first step, see the Newton flags and hand the solve back): the calls of
    ``n`` steps are ``n`` times those of one, and ``nf``/``ng`` are the calls (the Jacobians'
    traced drift calls included, tests/test_stats_counts.py)."""
    noise = "additive" if alg is deb.SKenCarp else "diagonal"
    per_step = []
    for n in (1, 3):
        calls = [0, 0]
        sol = deb.solve(_counted(noise, calls), alg(), dt=1.0 / n, adaptive=False, seed=3)
        assert sol.success
        assert calls[1] == int(sol.stats.ng.max())
        assert calls[0] == int(sol.stats.nf.max())
        per_step.append(calls)
    extra_g = int(noise == "additive")  # check_additive's probe
    assert per_step[1] == [3 * per_step[0][0], 3 * (per_step[0][1] - extra_g) + extra_g]


@pytest.mark.parametrize(
    ("alg", "noise", "bad", "match"),
    [
        (
            deb.ShARK,
            "additive",
            "drift",
            r"drift\(t, y\) returned shape \(5, 1\) during the solve; expected the state's shape \(5, 2\)",
        ),
        (
            deb.EM,
            "diagonal",
            "drift",
            r"drift\(t, y\) returned shape \(5, 1\) during the solve; expected the state's shape \(5, 2\)",
        ),
        (
            deb.SRIW1,
            "diagonal",
            "diffusion",
            r"diffusion\(t, y\) returned shape \(5, 1\) during the solve; expected noise='diagonal'",
        ),
        (deb.ShARK, "additive", "diffusion", r"diffusion\(t, y\) returned shape \(5, 1\); noise='additive' expects \(5, 2\)"),
        (deb.ShARK, "adaptive", "drift", r"drift\(t, y\) returned shape \(5, 1\); expected y0's shape \(5, 2\)"),
    ],
)
def test_wrong_shape_named_without_start_up_values(alg, noise: str, bad: str, match: str) -> None:
    """Where the start-up no longer evaluates a field (fixed steps), its first call in the
    first step checks it: the same ValueError naming the field and both shapes, before any
    state is advanced with it (adaptive solves and additive noise still check at ``t0``)."""
    calls = [0, 0]
    prob = _counted("additive" if noise == "adaptive" else noise, calls, bad != "drift", bad != "diffusion")
    kw = {} if noise == "adaptive" else {"dt": 0.1, "adaptive": False}
    with pytest.raises(ValueError, match=match):
        deb.solve(prob, alg(), seed=0, **kw)


def test_wrong_type_named_during_the_solve() -> None:
    """A drift returning a non-tensor is a TypeError naming it at its first call."""
    prob = deb.SDEProblem(lambda t, y: [0.0], lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=torch.float64), (0.0, 1.0))
    with pytest.raises(TypeError, match=r"drift\(t, y\) must return a tensor; got list"):
        deb.solve(prob, deb.EM(), dt=0.1, seed=0)


def test_composite_running_both_methods_reuses_nothing(disabled) -> None:
    """``AutoSOSRI`` whose first step runs both methods (a host check every 16 steps: a sample
    may stiffen before the next one, so ImplicitRKMil runs along): the counts are per sample
    of either method and cannot say whose evaluation the start-up saved, so none is reused;
    the same numbers."""
    alg, runs = deb.AutoSOSRI(), []
    one_method = alg.one_method
    alg.one_method = lambda state: runs.append(state.run) or one_method(state)  # type: ignore[method-assign]
    new, old = _compare(_diagonal((0.0, 1.0)), alg, disabled, atol=1e-3, rtol=1e-3, check_every=16)
    assert runs[0] == (True, True)
    assert torch.equal(old.stats.nf, new.stats.nf)
    assert torch.equal(old.stats.ng, new.stats.ng)


@pytest.mark.parametrize("noise", ["diagonal", "additive"])
def test_lockstep_hands_composites_over_once(noise: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed steps of ``alg=None`` on a problem stiff until t = 0.5: the lockstep path takes
    the non-stiff steps, hands the solve to the loop at the stiff method's first step and the
    loop goes on from there, so every call is made once (the lockstep path used to throw its
    steps away and the loop to take them again): the calls and every number equal the loop's."""
    y0 = torch.linspace(0.5, 1.5, B, dtype=torch.float64).reshape(B, 1).repeat(1, 2)

    def run(fast: bool) -> tuple[deb.Solution, list[int], list[int]]:
        monkeypatch.setattr(engine, "LOCKSTEP_FAST_PATH", fast)
        committed: list[int] = []
        commit = engine.Integrator._lockstep_commit
        monkeypatch.setattr(
            engine.Integrator,
            "_lockstep_commit",
            lambda self, s, first, k, *a: committed.append(k) or commit(self, s, first, k, *a),
        )
        calls = [0, 0]

        def drift(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return -torch.where((t < 0.5)[:, None], 1e3, 1.0) * (y - torch.cos(t)[:, None])

        def diffusion(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls[1] += 1
            return (0.1 * (1 + t))[:, None].expand(y.shape[0], 2) if noise == "additive" else 0.1 * y

        prob = deb.SDEProblem(drift, diffusion, y0, (0.0, 1.0), noise=noise)
        sol = deb.solve(prob, None, dt=1 / 64, adaptive=False, seed=2, saveat=torch.linspace(0, 1, 9))
        return sol, calls, committed

    (fast, fast_calls, committed), (slow, slow_calls, _) = run(True), run(False)
    assert committed and committed[0] > 0  # the lockstep path took the first steps
    assert int(fast.stats.extra["stiff_steps"].min()) > 10
    assert fast_calls == slow_calls
    assert torch.equal(fast.ys, slow.ys)
    for name in ("nf", "ng", "naccept", "nreject"):
        assert torch.equal(getattr(fast.stats, name), getattr(slow.stats, name)), name
    for key, value in slow.stats.extra.items():
        assert torch.equal(fast.stats.extra[key], value), key
