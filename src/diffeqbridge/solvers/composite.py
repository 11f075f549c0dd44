"""Composite algorithms: stiffness detection and automatic switching, per sample.

``AutoSwitch(nonstiff, stiff)`` holds a non-stiff solver that reports a stiffness
estimate ``ρ`` (``StepOutput.stiffness``: Hairer's ``‖f(y_s) - f(y_{s-1})‖ / ‖y_s - y_{s-1}‖``
from its last two stages) and a stiff solver (which reports ``‖J‖_∞`` of the Jacobian it
builds, as OrdinaryDiffEq's ``calc_J`` does under a ``CompositeAlgorithm``).  Every sample
carries its own method choice and its own counter; after each accepted step (the test of
OrdinaryDiffEq's ``AutoSwitch``/``is_stiff``, ``lib/OrdinaryDiffEqCore/src/composite_algs.jl``)::

    stiff_test = ρ dt / stability_size(nonstiff) > (stifftol if on the stiff method else nonstifftol)
    count      = stiff_test ? (count < 0 ? 1 : count + 1) : (count > 0 ? -1 : count - 1)
    non-stiff and count >  maxstiffstep     -> switch to the stiff method,     dt *= dtfac
    stiff     and count < -maxnonstiffstep  -> switch to the non-stiff method, dt /= dtfac

with OrdinaryDiffEq's defaults ``maxstiffstep = 10``, ``maxnonstiffstep = 3``,
``nonstifftol = stifftol = 9/10``, ``dtfac = 2``, ``stiffalgfirst = false`` (StochasticDiffEq's
``AutoSwitch`` for ``AutoSOSRI2`` uses the same logic and defaults).  OrdinaryDiffEq's
``switch_max`` (which only re-enables error checks after many successive non-stiff tests)
has no counterpart here.

Batching and state: a solver object never changes during a solve; every sample's method,
counter and statistics live in a :class:`SwitchState` (``LoopState.solver_state``), threaded
through ``step`` and ``update``.  Both solvers run on the whole batch when it holds samples
of both kinds, and the outputs are selected per sample (``torch.where``); when every live
sample uses one method only that method runs.  Which methods run is fixed at the loop's host
checks (:meth:`AutoSwitch.plan`, every ``check_every`` iterations, where the loop
synchronises anyway) for the next ``check_every`` steps: a method runs if some active sample
uses it or could switch to it within that many steps (the counter moves by one per
accepted step), so a step makes no host synchronisation and every sample follows the rule
above exactly, whatever the batch (a switch is only held back when the loop is driven past
the planned horizon without a check).  A non-stiff partner that carries the diffusion
(ShARK, SRA: ``carries_diffusion``) keeps carrying it: its ``g(t + h)``, computed for the whole
batch, is kept per sample where a step is accepted (whichever method the sample used) and
evaluated again after steps it did not run (:class:`SwitchState`).  Statistics
(``Stats.extra``): ``nswitch`` (switches), ``stiff_steps`` (accepted steps taken by the stiff
method), ``first_switch_t`` / ``last_switch_t`` (NaN when the sample never switched),
``is_stiff`` (1 when the sample ended on the stiff method); the engine adds ``eigen_est``
(the last accepted ``ρ``) and ``max_eigen_est``.  ``nf``/``ng`` count, per sample, the
evaluations of every method that ran on it (a step running both methods, on a mixed batch or
ahead of a possible switch, evaluates every sample with both), and ``extra["njac"]`` the
stiff method's Jacobians.

Dense output and saves: when both methods have their own interpolant (``AutoTsit5(Rodas4())``,
``interpolant_stages``), a step's ``StepOutput`` carries both methods' interpolant stages and
the per-sample ``method`` mask, so each sample's ``saveat`` values and ``sol(t)`` come from
the method it used (:func:`diffeqbridge.dense.step_coefficients`); with other partners
(``Kvaerno5``) the loop lands on every save time.

Controller: the non-stiff method's PI constants are used for every sample (OrdinaryDiffEq
also keeps one controller for a composite algorithm).

Limitation: when a batch is mixed, the non-stiff method's proposal for a stiff sample may
overflow; it is discarded by ``torch.where`` in the forward pass, but backpropagating
through such a step can produce NaN gradients (``0 · inf``).  Differentiate through
single-method batches, or use the stiff solver alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import AbstractSolver, Startup, StepOutput, call_step
from .implicit import ImplicitRKMil
from .runge_kutta import Dopri5, Tsit5
from .sri import SOSRI


def _as_solver(alg: Any, name: str) -> AbstractSolver:
    if isinstance(alg, type) and issubclass(alg, AbstractSolver):
        alg = alg()
    if not isinstance(alg, AbstractSolver):
        raise TypeError(f"{name} must be a diffeqbridge solver; got {alg!r}")
    return alg


def _pick(mask: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a`` where ``mask`` else ``b`` (``mask``: ``(B,)``); None-tolerant."""
    if a is None or b is None:
        return a if b is None else b
    return torch.where(expand_to(mask, a), a, b)


class SwitchState(NamedTuple):
    """:class:`AutoSwitch`'s per-solve state, ``(B,)`` tensors unless noted.

    ``stiff``: the method of the sample's next step; ``counter``: OrdinaryDiffEq's stiffness
    counter; ``nswitch``, ``stiff_steps``, ``first_switch_t``, ``last_switch_t``: statistics;
    ``run``: ``(nonstiff, stiff)`` Python bools, the methods the steps until the next host
    check compute (:meth:`AutoSwitch.plan`); ``nonstiff_state``, ``stiff_state``: the two
    solvers' own states (None when stateless).  A non-stiff partner that carries the diffusion
    (``carries_diffusion``: ShARK, SRA) has ``nonstiff_state = (g(t),)`` for every sample, or
    ``(None,)`` after steps it did not run (evaluated again when it next runs);
    ``carried_start``: between :meth:`AutoSwitch.step` and :meth:`AutoSwitch.update`, the
    ``(g(t),)`` the step started from (kept where the step is not accepted), else None.
    """

    stiff: Tensor
    counter: Tensor
    nswitch: Tensor
    stiff_steps: Tensor
    first_switch_t: Tensor
    last_switch_t: Tensor
    run: tuple[bool, bool]
    nonstiff_state: Any
    stiff_state: Any
    carried_start: Any = None


class AutoSwitch(AbstractSolver):
    """Per-sample automatic switching between a non-stiff and a stiff solver.

    Args:
        nonstiff: a solver with ``stability_size`` that reports ``StepOutput.stiffness``
            (``Tsit5``, ``Dopri5``, ``SOSRI``, ``SRIW1``).
        stiff: a stiff solver of the same kind (ODE: ``Rodas4``, ``Kvaerno5``; SDE:
            ``ImplicitRKMil``, ``ImplicitEM``, ``SKenCarp``...).
        maxstiffstep, maxnonstiffstep, nonstifftol, stifftol, dtfac, stiffalgfirst: as
            OrdinaryDiffEq's ``AutoSwitch`` (module docstring).
    """

    per_sample_counts = True  # start-up values only where one method runs (one_method)

    def __init__(
        self,
        nonstiff: AbstractSolver,
        stiff: AbstractSolver,
        *,
        maxstiffstep: int = 10,
        maxnonstiffstep: int = 3,
        nonstifftol: float = 0.9,
        stifftol: float = 0.9,
        dtfac: float = 2.0,
        stiffalgfirst: bool = False,
    ):
        nonstiff = _as_solver(nonstiff, "nonstiff")
        stiff = _as_solver(stiff, "stiff")
        if nonstiff.is_sde != stiff.is_sde:
            raise ValueError(f"AutoSwitch needs two ODE or two SDE solvers; got {nonstiff!r} and {stiff!r}")
        if nonstiff.stability_size is None:
            raise ValueError(
                f"nonstiff={type(nonstiff).__name__} has no stiffness estimate (stability_size); "
                "use Tsit5, Dopri5, SOSRI or SRIW1"
            )
        for name, value in (("maxstiffstep", maxstiffstep), ("maxnonstiffstep", maxnonstiffstep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        for name, value in (("nonstifftol", nonstifftol), ("stifftol", stifftol), ("dtfac", dtfac)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        self.nonstiff, self.stiff = nonstiff, stiff
        self.maxstiffstep, self.maxnonstiffstep = maxstiffstep, maxnonstiffstep
        self.nonstifftol, self.stifftol, self.dtfac = float(nonstifftol), float(stifftol), float(dtfac)
        self.stiffalgfirst = bool(stiffalgfirst)
        # metadata: what both can do; controller and FSAL from the non-stiff method
        self.is_sde = nonstiff.is_sde
        self.noise_types = nonstiff.noise_types & stiff.noise_types
        self.interpretations = nonstiff.interpretations & stiff.interpretations
        self.adaptive = nonstiff.adaptive and stiff.adaptive
        self.needs_levy_area = nonstiff.needs_levy_area or stiff.needs_levy_area
        self.strong_order = min(nonstiff.strong_order, stiff.strong_order)
        self.weak_order = min(nonstiff.weak_order, stiff.weak_order)
        self.fsal = nonstiff.fsal
        for name in ("controller_order", "beta1", "beta2", "qmax", "qmin", "gamma", "first_step_factor"):
            setattr(self, name, getattr(nonstiff, name))
        from ..dense import OWN_STAGES, interpolant_kind  # dense imports the solvers

        kind = interpolant_kind(self)
        #: per method, the stages its own interpolant reads; None: no per-sample interpolant
        self.interpolant_stages = tuple(OWN_STAGES[part] for part in kind.split("|")) if "|" in kind else None

    # ------------------------------------------------------------------ per-solve state
    def init(self, terms: Terms, t: Tensor, y0: Tensor, startup: Startup | None = None) -> SwitchState:
        batch, device = y0.shape[0], y0.device
        nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return SwitchState(
            stiff=torch.full((batch,), self.stiffalgfirst, dtype=torch.bool, device=device),
            counter=zeros,
            nswitch=zeros,
            stiff_steps=zeros,
            first_switch_t=nan,
            last_switch_t=nan.clone(),
            run=(not self.stiffalgfirst, self.stiffalgfirst),
            nonstiff_state=self.nonstiff.init(terms, t, y0, startup if self.nonstiff.carries_diffusion else None),
            stiff_state=self.stiff.init(terms, t, y0),
        )

    @property
    def graph_state(self) -> bool:
        """The partners' carried values are differentiated through (:attr:`AbstractSolver.graph_state`)."""
        return self.nonstiff.graph_state or self.stiff.graph_state

    def plan(self, state: SwitchState, active: Tensor, horizon: int) -> SwitchState:
        """The methods the next ``horizon`` steps run (one host synchronisation): those some
        active sample uses, or could switch to within ``horizon`` accepted steps."""
        stiff, count = state.stiff, state.counter
        may_stiffen = ~stiff & (count > self.maxstiffstep - horizon)
        may_relax = stiff & (count < horizon - self.maxnonstiffstep)
        uses_nonstiff, uses_stiff = active & (~stiff | may_relax), active & (stiff | may_stiffen)
        run_nonstiff, run_stiff = torch.stack([uses_nonstiff.any(), uses_stiff.any()]).tolist()
        if not (run_nonstiff or run_stiff):
            run_nonstiff = True  # nothing live: any cheap proposal will do
        return state._replace(run=(bool(run_nonstiff), bool(run_stiff)))

    def implicit_next(self, state: Any) -> bool:
        """The stiff method runs in the next step (:attr:`SwitchState.run`) and is implicit."""
        return state is not None and state.run[1] and self.stiff.implicit

    def one_method(self, state: Any) -> bool:
        """One partner runs in the next step (:attr:`SwitchState.run`): its own counts."""
        return state is not None and state.run.count(True) == 1

    def step(
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None,
        levy_h: Tensor | None,
        f0: Tensor | None = None,
        state: Any = None,
    ) -> StepOutput:
        if state is None:  # a step outside a solve (e.g. a regularizer's probe): a fresh state
            state = self.init(terms, t, y)
        stiff = state.stiff
        run_nonstiff, run_stiff = state.run
        a = b = None
        ns_state = state.nonstiff_state
        carried = self.nonstiff.carries_diffusion and ns_state is not None
        if run_nonstiff:
            ns = self.nonstiff
            levy = levy_h if ns.needs_levy_area else None
            fresh = carried and ns_state[0] is None  # the stiff method took the last steps
            if fresh:
                assert terms.diffusion is not None  # carries_diffusion: an SDE partner
                ns_state = (terms.diffusion(t, y),)
            a = call_step(ns, terms, t, y, dt, dw, levy, f0 if ns.fsal else None, ns_state)
            if fresh:
                a.ng = a.ng + 1
        if run_stiff:
            levy = levy_h if self.stiff.needs_levy_area else None
            b = call_step(self.stiff, terms, t, y, dt, dw, levy, f0 if self.fsal else None, state.stiff_state)
            if self.fsal and b.f1 is None:  # keep f0 valid for samples switching back
                b.f1 = terms.drift(t + dt, b.y1)
                b.nf = b.nf + 1
            if b.stiffness is None:  # no Jacobian (matrix-free): never judged non-stiff
                b.stiffness = torch.full((y.shape[0],), float("inf"), dtype=torch.float64, device=y.device)
        if carried:  # g(t + dt) of every sample, kept in update where the step is accepted
            state = state._replace(
                nonstiff_state=(None,) if a is None else a.state, carried_start=None if a is None else ns_state
            )
        elif a is not None and a.state is not None:
            state = state._replace(nonstiff_state=a.state)
        state = state._replace(stiff_state=state.stiff_state if b is None or b.state is None else b.state)
        if a is None or b is None:
            out = a if b is None else b
            assert out is not None
            out.state = state
            if self.interpolant_stages is not None:
                out.stages = self._interpolant_stages(y, a, b)
                out.method = torch.full_like(stiff, b is not None)
            return out
        ones = torch.ones_like(stiff)
        converged = None if b.converged is None else torch.where(stiff, b.converged, ones)
        y1 = _pick(stiff, b.y1, a.y1)
        assert y1 is not None
        # both methods evaluated every sample of the batch: each counts both's calls
        return StepOutput(
            y1=y1,
            error=_pick(stiff, b.error, a.error),
            nf=a.nf + b.nf,
            ng=a.ng + b.ng,
            f1=_pick(stiff, b.f1, a.f1),
            converged=converged,
            stiffness=_pick(stiff, b.stiffness, a.stiffness),
            njac=b.njac,
            state=state,
            stages=None if self.interpolant_stages is None else self._interpolant_stages(y, a, b),
            method=None if self.interpolant_stages is None else stiff,
        )

    def _interpolant_stages(self, y: Tensor, a: StepOutput | None, b: StepOutput | None) -> list[Tensor]:
        """Both methods' interpolant stages (:data:`diffeqbridge.dense.OWN_STAGES`), the
        non-stiff method's first; a method that did not run gives (unallocated) zeros."""
        assert self.interpolant_stages is not None
        zero = torch.zeros((), dtype=y.dtype, device=y.device).expand_as(y)
        stages: list[Tensor] = []
        for out, n in zip((a, b), self.interpolant_stages):
            stages += [zero] * n if out is None or out.stages is None else list(out.stages[:n])
        return stages

    def update(
        self, state: SwitchState, accepted: Tensor, active: Tensor, t: Tensor, dt: Tensor, out: StepOutput
    ) -> tuple[SwitchState, Tensor | None]:
        """The switching test after an accepted step; returns the new state and the ``dtfac``
        factor for samples that switched."""
        if out.state is not None:
            state = out.state
        if state.carried_start is not None:
            kept = zip(state.nonstiff_state, state.carried_start)
            state = state._replace(nonstiff_state=tuple(_pick(accepted, g1, g0) for g1, g0 in kept), carried_start=None)
        if out.stiffness is None:
            return state, None
        stiff, count = state.stiff, state.counter
        ratio = out.stiffness.to(torch.float64) * dt.to(torch.float64).abs() / float(self.nonstiff.stability_size or 1.0)
        tol = torch.where(stiff, torch.full_like(ratio, self.stifftol), torch.full_like(ratio, self.nonstifftol))
        test = ratio > tol
        up = torch.where(count < 0, torch.ones_like(count), count + 1)
        down = torch.where(count > 0, -torch.ones_like(count), count - 1)
        count = torch.where(accepted, torch.where(test, up, down), count)
        run_nonstiff, run_stiff = state.run
        # only to a method the planned steps compute (always, when the loop checks on time)
        to_stiff = accepted & ~stiff & (count > self.maxstiffstep) & run_stiff
        to_nonstiff = accepted & stiff & (count < -self.maxnonstiffstep) & run_nonstiff
        switched = to_stiff | to_nonstiff
        t64 = t.to(torch.float64)
        state = state._replace(
            stiff=(stiff | to_stiff) & ~to_nonstiff,
            counter=count,
            nswitch=state.nswitch + switched,
            stiff_steps=state.stiff_steps + (accepted & stiff),
            first_switch_t=torch.where(switched & torch.isnan(state.first_switch_t), t64, state.first_switch_t),
            last_switch_t=torch.where(switched, t64, state.last_switch_t),
        )
        one = torch.ones_like(ratio)
        return state, torch.where(to_stiff, one * self.dtfac, torch.where(to_nonstiff, one / self.dtfac, one))

    def extra_stats(self, state: SwitchState) -> dict[str, Tensor]:
        return {
            "nswitch": state.nswitch,
            "stiff_steps": state.stiff_steps,
            "first_switch_t": state.first_switch_t,
            "last_switch_t": state.last_switch_t,
            "is_stiff": state.stiff.long(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.nonstiff!r}, {self.stiff!r})"


class AutoTsit5(AutoSwitch):
    """``Tsit5`` with per-sample switching to ``stiffalg`` (OrdinaryDiffEq's ``AutoTsit5(stiffalg)``)."""

    def __init__(self, stiffalg: AbstractSolver, **kwargs: Any):
        super().__init__(Tsit5(), stiffalg, **kwargs)

    def __repr__(self) -> str:
        return f"AutoTsit5({self.stiff!r})"


class AutoDP5(AutoSwitch):
    """``Dopri5`` with per-sample switching to ``stiffalg`` (OrdinaryDiffEq's ``AutoDP5(stiffalg)``)."""

    def __init__(self, stiffalg: AbstractSolver, **kwargs: Any):
        super().__init__(Dopri5(), stiffalg, **kwargs)

    def __repr__(self) -> str:
        return f"AutoDP5({self.stiff!r})"


# SOSRI's stiffness thresholds: switch when rho dt > 0.1 x 9.84 ~ 1 (SciML's 0.9 x 9.84 is
# never reached: SOSRI's error control, not its stability, limits dt on stiff problems; on
# dX = -1e4 (X - cos t) dt + 0.1 X dW it keeps rho dt ~ 2-5).  Measured (tol 1e-1 ... 1e-3) on
# prob_sde_linear/wave/cubic/additive(system) with diagonal noise: rho dt < 0.5, no switch.
# The same value back (SciML: nonstifftol = stifftol): with stifftol 0.9 the implicit method's
# steps at tol 1e-3 (rho dt ~ 5) switched it back and forth 265 times (22,776 evaluations per
# path on the problem above, SOSRI alone 28,648); with 0.1 once (4,872).
SOSRI_NONSTIFFTOL = 0.1


class AutoSOSRI(AutoSwitch):
    """``SOSRI`` with per-sample switching to ``stiffalg`` (default
    ``ImplicitRKMil(smooth_est=True)``), StochasticDiffEq's ``AutoSOSRI2`` with the SOSRI
    tableau we have (SOSRI's measured drift-stability interval 9.84 in place of SOSRI2's
    10.6) and ``nonstifftol = stifftol = 0.1`` (:data:`SOSRI_NONSTIFFTOL`; SciML: 0.9)."""

    def __init__(self, stiffalg: AbstractSolver | None = None, **kwargs: Any):
        kwargs.setdefault("nonstifftol", SOSRI_NONSTIFFTOL)
        kwargs.setdefault("stifftol", SOSRI_NONSTIFFTOL)
        stiff = stiffalg if stiffalg is not None else ImplicitRKMil(smooth_est=True)
        # θ = 0: the switching thresholds were measured with the unweighted SOSRI controller
        super().__init__(SOSRI(unit_step_power=0.0), stiff, **kwargs)

    def __repr__(self) -> str:
        return f"AutoSOSRI({self.stiff!r})"


__all__ = ["AutoDP5", "AutoSOSRI", "AutoSwitch", "AutoTsit5", "SwitchState"]
