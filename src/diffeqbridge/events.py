"""Events: ``solve(..., events=[deb.ContinuousEvent(...), deb.DiscreteEvent(...)])``.

* :class:`ContinuousEvent` ``(condition, affect=None, terminate=True, direction=0)``: an event
  happens where ``condition(t, y)`` (``(B,)`` real) changes sign inside an accepted step
  (SciML's ``ContinuousCallback``, diffrax's ``Event``, torchdiffeq's ``odeint_event``).  The
  crossing is located per sample on the step's interpolant (:mod:`diffeqbridge.dense`: the
  solver's own interpolant for ODEs; for SDEs the straight line between the step's end points,
  i.e. on the accepted step with the step's own noise, linearly interpolated) by bisection in
  ``θ`` down to ``2^-52`` of the step; sign changes are looked for at the step's ends and at
  ``interp_points`` (default 10, as SciML) equally spaced interior points, so a step that
  crosses and crosses back is seen.  ``direction``: ``+1`` only upcrossings (``g`` from
  ``< 0`` to ``>= 0``), ``-1`` only downcrossings, ``0`` both.  At the event the sample is
  moved back to the event time ``t*`` with the interpolated state ``y*``; then ``affect(t*,
  y*)`` (``(B,)``, ``(B, *state)`` -> new state, evaluated for the batch, applied to the samples
  that hit this event) replaces the state and the sample continues from ``t*``, or, with
  ``terminate=True``, the sample stops with ``ReturnCode.Terminated`` (success-like).
  After an event the condition is re-evaluated at the new state; where it is within ``1e-10``
  of the step's scale of ``|g|`` (the point the event just left, e.g. a bounce at height 0), it
  is set to exactly 0, and a crossing must start from a non-zero value: no re-trigger.
* :class:`DiscreteEvent` ``(condition, affect=None, terminate=False)``: ``condition(t, y)``
  (``(B,)`` bool) is checked after every accepted step, at the step's end (SciML's
  ``DiscreteCallback``) — for a step cut by a continuous event, at the event's time and new
  state.  Costs one host synchronisation per discrete event per step.

Where several continuous events cross in one step, the earliest wins.  A step cut by an event
saves nothing (save times after ``t*`` are reached by the next steps, or stay NaN for a
terminated sample).  Results: ``sol.events`` (:class:`EventRecord`: per-sample times of every
event in order, counts per event, the terminal time and state) and ``sol.stats.extra``
(``"nevents"``: events per sample, ``"event_time"``: the time of its last event, NaN if none).

Gradients (ODEs, ``DiscreteAdjoint``/plain backprop): the event time is differentiable where
``g`` is smooth, by the implicit function theorem as in torchdiffeq's ``odeint_event``:
``dt*/dp = -(∂g/∂p + ∂g/∂y ∂y*/∂p) / (dg/dt)`` with ``dg/dt = ∂g/∂t + ∂g/∂y ẏ`` along the
interpolant, implemented as ``t* + δ`` with ``δ = -(g - stop_grad(g)) / stop_grad(dg/dt)`` (zero
value, the right derivative).  The event state is ``y*(t* + δ)`` and a continuing sample's
state is shifted by ``-f(t*, y⁺) δ``, which carries the dependence of the rest of the path on
``t*`` (the engine's times themselves carry no gradient).  For SDEs the event time is
differentiable through the linear interpolant, the continuation is not corrected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .dense import DenseRecorder, horner, interpolant_kind, step_coefficients
from .problem import Terms, expand_to
from .solution import ReturnCode
from .solvers.base import AbstractSolver, StepOutput

__all__ = ["ContinuousEvent", "DiscreteEvent", "EventHandler", "EventRecord", "Hooks", "check_events"]

BISECTIONS = 52


@dataclass
class ContinuousEvent:
    """An event where ``condition(t (B,), y (B, *state)) -> (B,)`` crosses zero (module docstring)."""

    condition: Callable[[Tensor, Tensor], Tensor]
    affect: Callable[[Tensor, Tensor], Tensor] | None = None
    terminate: bool = True
    direction: int = 0
    interp_points: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.interp_points, bool) or not isinstance(self.interp_points, int) or self.interp_points < 0:
            raise ValueError(f"ContinuousEvent: interp_points must be an int >= 0; got {self.interp_points!r}")
        if not callable(self.condition):
            raise TypeError(f"ContinuousEvent: condition must be callable (t, y) -> (B,); got {self.condition!r}")
        if self.affect is not None and not callable(self.affect):
            raise TypeError(f"ContinuousEvent: affect must be callable (t, y) -> y or None; got {self.affect!r}")
        if not isinstance(self.terminate, bool):
            raise TypeError(f"ContinuousEvent: terminate must be a bool; got {self.terminate!r}")
        if self.direction not in (-1, 0, 1) or isinstance(self.direction, bool):
            raise ValueError(f"ContinuousEvent: direction must be -1, 0 or +1; got {self.direction!r}")
        if self.affect is None and not self.terminate:
            raise ValueError("ContinuousEvent: with terminate=False an affect is needed (else it does nothing)")


@dataclass
class DiscreteEvent:
    """An event checked at the end of every accepted step: ``condition(t, y) -> (B,) bool``."""

    condition: Callable[[Tensor, Tensor], Tensor]
    affect: Callable[[Tensor, Tensor], Tensor] | None = None
    terminate: bool = False

    def __post_init__(self) -> None:
        if not callable(self.condition):
            raise TypeError(f"DiscreteEvent: condition must be callable (t, y) -> (B,) bool; got {self.condition!r}")
        if self.affect is not None and not callable(self.affect):
            raise TypeError(f"DiscreteEvent: affect must be callable (t, y) -> y or None; got {self.affect!r}")
        if not isinstance(self.terminate, bool):
            raise TypeError(f"DiscreteEvent: terminate must be a bool; got {self.terminate!r}")
        if self.affect is None and not self.terminate:
            raise ValueError("DiscreteEvent: give an affect, or terminate=True")


def check_events(events: Any, solver: AbstractSolver) -> list[ContinuousEvent | DiscreteEvent]:
    """Validate ``solve(..., events=...)``: a list of events (one event alone is accepted)."""
    if events is None:
        return []
    if isinstance(events, (ContinuousEvent, DiscreteEvent)):
        events = [events]
    if not isinstance(events, (list, tuple)):
        raise TypeError(f"events must be a list of deb.ContinuousEvent / deb.DiscreteEvent; got {events!r}")
    for i, e in enumerate(events):
        if not isinstance(e, (ContinuousEvent, DiscreteEvent)):
            raise TypeError(f"events[{i}] must be a deb.ContinuousEvent or deb.DiscreteEvent; got {e!r}")
    if events and getattr(solver, "reversible", False):
        raise ValueError(
            f"events are not supported with alg={type(solver).__name__} (its carried state is not "
            "a function of (t, y) that an event could restart)"
        )
    return list(events)


@dataclass
class EventRecord:
    """``sol.events``: what the events did, per sample.

    Attributes:
        times: ``(B, K)`` float64 times of every event of each sample in order (NaN padding).
        which: ``(B, K)`` int64 index (into ``events``) of each of those events (-1 padding).
        counts: ``(B, n_events)`` int64 occurrences per event.
        terminated: ``(B,)`` bool: a terminating event stopped the sample.
        t: ``(B,)`` time of the terminating event (differentiable for ODEs), NaN where none.
        y: ``(B, *state)`` state at the terminating event (before any ``affect``), NaN where none.
    """

    times: Tensor
    which: Tensor
    counts: Tensor
    terminated: Tensor
    t: Tensor
    y: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)


class EventHandler:
    """The engine hook for events (``after_merge``): see the module docstring."""

    def __init__(
        self,
        events: Sequence[ContinuousEvent | DiscreteEvent],
        terms: Terms,
        solver: AbstractSolver,
        y0: Tensor,
        t0: float,
        is_sde: bool,
    ):
        self.events = list(events)
        self.continuous = [i for i, e in enumerate(self.events) if isinstance(e, ContinuousEvent)]
        self.discrete = [i for i, e in enumerate(self.events) if isinstance(e, DiscreteEvent)]
        self.terms, self.solver, self.is_sde = terms, solver, is_sde
        self.kind = interpolant_kind(solver)
        batch, device = y0.shape[0], y0.device
        t_start = torch.full((batch,), t0, dtype=torch.float64, device=device)
        self.g_prev = [self._condition(i, t_start, y0).detach() for i in self.continuous]
        self.g_scale = [g.abs() for g in self.g_prev]  # |g| at the last step's ends (re-trigger threshold)
        self.counts = torch.zeros(batch, len(self.events), dtype=torch.long, device=device)
        self.history: list[tuple[Tensor, Tensor]] = []  # (event time (B,), event index (B,), -1 = none)
        self.terminated = torch.zeros(batch, dtype=torch.bool, device=device)
        self.t_stop = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        self.t_stop_grad: Tensor | None = None
        self.y_stop = torch.full_like(y0, float("nan"))
        self.nf = torch.zeros(batch, dtype=torch.long, device=device)
        self.t_after: Tensor | None = None  # the engine's t after the hook (dense output's step ends)

    @property
    def lockstep(self) -> bool:
        """False when an event may move a sample back inside its step and let it continue (a
        fixed-step SDE solve then cannot share one Brownian query time per step)."""
        return all(isinstance(e, DiscreteEvent) or e.terminate for e in self.events)

    def _condition(self, i: int, t: Tensor, y: Tensor) -> Tensor:
        g = self.events[i].condition(t, y)
        if not isinstance(g, Tensor) or g.shape != (y.shape[0],):
            raise ValueError(
                f"events[{i}].condition must return a ({y.shape[0]},) tensor; got "
                f"{type(g).__name__} {tuple(getattr(g, 'shape', ()))}"
            )
        return g

    def _continuous_event(self, i: int) -> ContinuousEvent:
        event = self.events[i]
        assert isinstance(event, ContinuousEvent)
        return event

    def _crossed(self, i: int, before: Tensor, after: Tensor) -> Tensor:
        direction = self._continuous_event(i).direction
        up = (before < 0) & (after >= 0)
        down = (before > 0) & (after <= 0)
        return up if direction == 1 else down if direction == -1 else up | down

    # ------------------------------------------------------------------ engine hook
    def after_merge(
        self,
        t_prev: Tensor,
        y_prev: Tensor,
        t: Tensor,
        y: Tensor,
        f0: Any,
        tree_state: Any,
        accepted: Tensor,
        hits: Tensor,
        out: StepOutput,
        f_prev: Any,
        step_dt: Tensor,
        tree: Any,
        t_forced: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Any, Any, Tensor, Tensor]:
        """Called by the engine after an iteration's masked merge (``t``, ``y``: merged;
        ``step_dt``: the signed step the solver took, negative when time runs backwards;
        ``t_forced``: ``(B,)`` the forced time a sample's step reached, else ``t``, which the
        discrete conditions see).  Returns the updated ``(y, t, f0, tree_state, hits, stopped)``."""
        accepted = accepted & ~self.terminated
        batch = y.shape[0]
        stopped = torch.zeros_like(accepted)
        moved = torch.zeros_like(accepted)
        t_event = t
        which = torch.full((batch,), -1, dtype=torch.long, device=y.device)
        if self.continuous:
            y, t_event, which, moved, stopped = self._continuous(t_prev, y_prev, t, y, accepted, out, f_prev, step_dt)
        if self.continuous and bool((which >= 0).any()):
            hit = which >= 0
            self.counts = self.counts + torch.nn.functional.one_hot(which.clamp(min=0), len(self.events)) * hit.unsqueeze(1)
            self.history.append((torch.where(hit, t_event.detach(), torch.full_like(t, float("nan"))), which))
        happened = which >= 0
        if self.discrete:
            # a continuous event's time where one happened in this step, else the forced time
            # (tstops, save time) the step reached, exact where the step's t is off by rounding
            t_now = (t_event if t_forced is None else torch.where(which >= 0, t_event, t_forced)).detach()
            free = accepted & ~stopped  # also at a continuous event's new state (the cut step's end)
            for i in self.discrete:
                fire = free & self.events[i].condition(t_now, y).to(torch.bool)
                if not bool(fire.any()):
                    continue
                affect = self.events[i].affect
                if affect is not None:
                    y = _where(fire, affect(t_now, y), y)
                self.counts[:, i] += fire
                self.history.append(
                    (
                        torch.where(fire, t_now, torch.full_like(t_now, float("nan"))),
                        torch.where(fire, i, torch.full_like(which, -1)),
                    )
                )
                if self.events[i].terminate:
                    stopped = stopped | fire
                    self.t_stop = torch.where(fire, t_now, self.t_stop)
                    if self.t_stop_grad is not None:
                        self.t_stop_grad = torch.where(fire, t_now.to(self.t_stop_grad.dtype), self.t_stop_grad)
                    self.y_stop = _where(fire, y, self.y_stop)
                else:
                    moved = moved | fire
                happened = happened | fire
                free = free & ~fire
        if not bool(happened.any()):
            self.t_after = t
            return y, t, f0, tree_state, hits, stopped
        new_t = torch.where(happened, t_event.detach(), t)
        hits = hits & ~(happened & (new_t != t))
        go_on = moved & ~stopped
        if bool(go_on.any()):
            if isinstance(f0, Tensor):  # FSAL: the derivative at the new state
                f0 = _where(go_on, self.terms.drift(new_t.to(y.dtype), y), f0)
                self.nf = self.nf + go_on
            if tree_state is not None and bool((go_on & (new_t != t)).any()):
                fresh = tree.evaluate(new_t)
                tree_state = tuple(_where(go_on, a, b) for a, b in zip(fresh, tree_state))
            for k, i in enumerate(self.continuous):
                # the condition at the new state; where the event just left it at g ≈ 0 (within
                # 1e-10 of the step's scale), exactly 0, which a crossing must leave (no re-trigger)
                g = self._condition(i, new_t, y).detach()
                scale = self.g_scale[k]
                g = torch.where((which == i) & (g.abs() <= 1e-10 * scale), torch.zeros_like(g), g)
                self.g_prev[k] = torch.where(go_on, g, self.g_prev[k])
        self.terminated = self.terminated | stopped
        self.t_after = new_t
        return y, new_t, f0, tree_state, hits, stopped

    def _continuous(
        self,
        t_prev: Tensor,
        y_prev: Tensor,
        t: Tensor,
        y: Tensor,
        accepted: Tensor,
        out: StepOutput,
        f_prev: Any,
        step_dt: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Sign changes of every continuous event on the step's interpolant, sampled at
        ``interp_points`` interior points (as SciML's ``interp_points``: a step that crosses
        and crosses back is seen), then root location by bisection and the event's effect."""
        h = step_dt
        coeffs = step_coefficients(self.kind, y_prev, y, h, out, f_prev if isinstance(f_prev, Tensor) else None)
        batch = y.shape[0]
        none = torch.zeros_like(accepted)
        lo_all, hi_all, crossed = [], [], []
        with torch.no_grad():
            plain = [c.detach() for c in coeffs]
            y0d = y_prev.detach()
            for k, i in enumerate(self.continuous):
                m = self._continuous_event(i).interp_points
                thetas = [j / (m + 1) for j in range(1, m + 1)]
                values = [self.g_prev[k]]
                for th in thetas:
                    theta = torch.full_like(h, th)
                    values.append(self._condition(i, t_prev + theta * h, horner(y0d, plain, theta)).detach())
                g_new = self._condition(i, t, y).detach()
                values.append(g_new)
                grid = torch.tensor([0.0, *thetas, 1.0], dtype=h.dtype, device=h.device)
                vals = torch.stack(values, dim=1)  # (B, m + 2)
                cross = self._crossed(i, vals[:, :-1], vals[:, 1:]) & accepted.unsqueeze(1)  # (B, m + 1)
                first = torch.argmax(cross.to(torch.int8), dim=1)
                crossed.append(cross.any(dim=1))
                lo_all.append(grid[first])
                hi_all.append(grid[first + 1])
                self.g_scale[k] = torch.maximum(self.g_prev[k].abs(), g_new.abs())
                self.g_prev[k] = torch.where(accepted, g_new, self.g_prev[k])
        crossed_t = torch.stack(crossed, dim=1)
        if not bool(crossed_t.any()):  # one host sync per step when continuous events are given
            return y, t, torch.full((batch,), -1, dtype=torch.long, device=y.device), none, none
        return self._locate(t_prev, y_prev, y, t, crossed_t, lo_all, hi_all, coeffs, h)

    def _locate(
        self,
        t_prev: Tensor,
        y_prev: Tensor,
        y1: Tensor,
        t_new: Tensor,
        crossed: Tensor,
        lo_all: list[Tensor],
        hi_all: list[Tensor],
        coeffs: list[Tensor],
        h: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Bisection inside each crossing's bracket, the earliest event per sample, then affect/termination."""
        any_crossed = crossed.any(dim=1)
        theta = torch.ones_like(h)
        which = torch.full(h.shape, -1, dtype=torch.long, device=h.device)
        with torch.no_grad():
            plain = [c.detach() for c in coeffs]
            y0d = y_prev.detach()
            for k, i in enumerate(self.continuous):
                mask = crossed[:, k]
                lo, hi = lo_all[k], hi_all[k]
                g_lo = self._condition(i, t_prev + lo * h, horner(y0d, plain, lo)).detach()
                for _ in range(BISECTIONS):
                    mid = 0.5 * (lo + hi)
                    g_mid = self._condition(i, t_prev + mid * h, horner(y0d, plain, mid)).detach()
                    same = g_mid * g_lo > 0
                    lo = torch.where(same, mid, lo)
                    hi = torch.where(same, hi, mid)
                earlier = mask & (hi < theta)
                theta = torch.where(earlier, hi, theta)
                which = torch.where(earlier, i, which)
        t_star = t_prev + theta * h
        y_star = horner(y_prev, coeffs, theta)
        delta = self._time_correction(which, t_star, y_star, coeffs, h, theta)
        if delta is not None:  # differentiable event time (implicit function theorem)
            y_dot = _derivative(coeffs, theta) / expand_to(h, y_star).to(y_star.dtype)
            y_star = y_star + y_dot * expand_to(delta, y_star)
        y_event = y_star
        y_new = y_star
        stopped = torch.zeros_like(any_crossed)
        moved = torch.zeros_like(any_crossed)
        for i in self.continuous:
            hit = which == i
            event = self.events[i]
            assert isinstance(event, ContinuousEvent)
            if event.affect is not None:
                y_new = _where(hit, event.affect(t_star, y_new), y_new)
            if event.terminate:
                stopped = stopped | hit
            else:
                moved = moved | hit
        if delta is not None and not self.is_sde and bool(moved.any()):
            f_plus = self.terms.drift(t_star.to(y_new.dtype), y_new.detach()).detach()
            self.nf = self.nf + moved
            y_new = y_new - f_plus * expand_to(delta, y_new)
        self.t_stop = torch.where(stopped, t_star, self.t_stop)
        if delta is not None:
            t_diff = t_star.to(delta.dtype) + delta
            base = self.t_stop_grad if self.t_stop_grad is not None else self.t_stop.to(delta.dtype)
            self.t_stop_grad = torch.where(stopped, t_diff, base)
        self.y_stop = _where(stopped, y_event, self.y_stop)
        y_out = _where(which >= 0, y_new, y1)
        return y_out, torch.where(which >= 0, t_star, t_new), which, moved, stopped

    def _time_correction(
        self, which: Tensor, t_star: Tensor, y_star: Tensor, coeffs: list[Tensor], h: Tensor, theta: Tensor
    ) -> Tensor | None:
        """``δ = -(g - stop_grad(g)) / stop_grad(dg/dt)`` at the event (zero value), or None
        when nothing needs a gradient (neither the state nor parameters the condition closes over,
        as torchdiffeq's ``event_fn`` parameters)."""
        if not torch.is_grad_enabled():
            return None
        gs = {i: self._condition(i, t_star, y_star) for i in self.continuous}
        if not (y_star.requires_grad or any(g.requires_grad for g in gs.values())):
            return None
        y_dot = (_derivative(coeffs, theta) / expand_to(h, y_star).to(y_star.dtype)).detach()
        delta = torch.zeros_like(t_star, dtype=y_star.dtype)
        for i in self.continuous:
            hit = which == i
            g = gs[i]
            with torch.enable_grad():
                tt = t_star.detach().clone().requires_grad_(True)
                yy = y_star.detach().clone().requires_grad_(True)
                gg = self._condition(i, tt, yy)
                g_t, g_y = torch.autograd.grad(gg.sum(), [tt, yy], allow_unused=True)
            rate = (g_y * y_dot).flatten(1).sum(dim=1) if g_y is not None else torch.zeros_like(delta)
            if g_t is not None:
                rate = rate + g_t.to(rate.dtype)
            safe = torch.where(rate != 0, rate, torch.ones_like(rate))
            delta = torch.where(hit, -(g - g.detach()).to(delta.dtype) / safe, delta)
        return delta

    def finish(self, y0: Tensor) -> tuple[EventRecord, dict[str, Tensor]]:
        batch, device = y0.shape[0], y0.device
        if self.history:
            times = torch.stack([h[0] for h in self.history], dim=1)
            which = torch.stack([h[1] for h in self.history], dim=1)
            order = torch.sort((which < 0).to(torch.int8), dim=1, stable=True).indices
            width = max(int((which >= 0).sum(dim=1).max()), 1)
            times = torch.gather(times, 1, order)[:, :width]
            which = torch.gather(which, 1, order)[:, :width]
        else:
            times = torch.full((batch, 1), float("nan"), dtype=torch.float64, device=device)
            which = torch.full((batch, 1), -1, dtype=torch.long, device=device)
        t_stop = self.t_stop_grad if self.t_stop_grad is not None else self.t_stop
        record = EventRecord(times=times, which=which, counts=self.counts, terminated=self.terminated, t=t_stop, y=self.y_stop)
        n = (which >= 0).sum(dim=1)
        last = torch.gather(times, 1, (n - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        extra = {"nevents": n, "event_time": torch.where(n > 0, last, torch.full_like(last, float("nan")))}
        return record, extra


def _where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def _derivative(coeffs: list[Tensor], theta: Tensor) -> Tensor:
    """``d/dθ`` of ``y0 + θ(c_1 + θ(c_2 + ...))`` at ``θ``."""
    th = expand_to(theta, coeffs[0]).to(coeffs[0].dtype)
    acc = len(coeffs) * coeffs[-1]
    for p in range(len(coeffs) - 1, 0, -1):
        acc = p * coeffs[p - 1] + th * acc
    return acc


class Hooks:
    """The engine's ``observer`` when events/dense output/regularization are combined: ``observe``
    goes to every recorder, ``after_merge`` to the event handler."""

    def __init__(self, recorders: Sequence[Any], events: EventHandler | None, dense: DenseRecorder | None):
        self.recorders = [r for r in recorders if r is not None]
        self.handler, self.dense = events, dense
        if events is not None:
            self.after_merge = events.after_merge  # the engine looks for this attribute
            self.lockstep = events.lockstep

    def observe(
        self,
        t: Tensor,
        y: Tensor,
        t_new: Tensor,
        step_dt: Tensor,
        out: StepOutput,
        active: Tensor,
        accepted: Tensor,
        dt_next: Tensor,
        f0: Any,
    ) -> None:
        for r in self.recorders:
            r.observe(t, y, t_new, step_dt, out, active, accepted, dt_next, f0)
        if self.dense is not None:
            self.dense.observe(t, y, t_new, step_dt, out, active, accepted, dt_next, f0 if isinstance(f0, Tensor) else None)
            if self.handler is not None and self.handler.t_after is not None:
                self.dense.end = torch.where(accepted, self.handler.t_after, self.dense.end)

    @property
    def recording(self) -> bool:  # the adjoints switch recorders off after the forward pass
        return all(getattr(r, "recording", True) for r in self.recorders)

    @recording.setter
    def recording(self, value: bool) -> None:
        for r in self.recorders:
            if hasattr(r, "recording"):
                r.recording = value


TERMINATED = int(ReturnCode.Terminated)
