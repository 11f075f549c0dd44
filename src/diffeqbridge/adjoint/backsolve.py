"""``BacksolveAdjoint``: the continuous adjoint, solved backwards in time together with the
state on the engine's loop.

The augmented system ``z = [y, a]`` (``(B, 2, *state)``) is stepped by :class:`AugmentedRK`,
an explicit Runge–Kutta solver object (Dormand–Prince 5(4) for ODEs, the Stratonovich Heun
scheme with its embedded Euler estimate for SDEs) that the engine's
:class:`~diffeqbridge.engine.Integrator` drives like any other solver, time running
backwards from each save time to the previous one: per-sample step sizes, error norms,
accept decisions, Brownian queries and return codes are the engine's.  The parameter
adjoint is accumulated outside the state by :class:`ParamAdjoint`, the loop's observer.
After an algebraically reversible solver the exact reversible backward
(:mod:`.reversible`) runs instead.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..controller import tolerance_bound
from ..engine import Integrator
from ..problem import ODEProblem, Terms, expand_to
from ..solution import ReturnCode
from ..solvers.base import AbstractSolver, StepOutput
from ..solvers.runge_kutta import DOPRI5_TABLEAU
from .common import SensitivityAlgorithm, _Ctx, _flat_params, _flatten_grads
from .reversible import reversible_backward, reversible_forward

__all__ = ["BacksolveAdjoint", "AugmentedRK", "ParamAdjoint", "backsolve_backward"]

SUCCESS = int(ReturnCode.Success)
UNSTABLE = int(ReturnCode.Unstable)


class BacksolveAdjoint(SensitivityAlgorithm):
    """The continuous adjoint, solved backwards in time together with the state.

    ODEs: the augmented system ``[y, a]`` with ``y' = f``, ``a' = -a ∂f/∂y`` is integrated
    from ``t1`` to ``t0`` with Dormand–Prince 5(4) on the engine's loop
    (:class:`~diffeqbridge.engine.Integrator`, time running backwards): every sample has its
    own step size, error norm (RMS over its ``[y, a]``), accept decision and return code.
    The parameter adjoint ``dL/dθ = ∫ a ∂f/∂θ dt`` is not part of the state: it is summed
    over the batch outside it, ``Σ_b accepted_b Σ_i b_i a_{b,i} ∂(f_b dt_b)/∂θ`` at stage
    ``i``, by one VJP over the step's stage graphs after the accept decision (memory ``P``,
    not ``B × P``; it is never in the error norm, the seminorm of Kidger, Chen, Lyons 2021).

    SDEs: the stochastic adjoint of Li, Wong, Chen, Duvenaud (2020).  In Stratonovich form
    ``dy = b dt + σ∘dW``, backwards from ``t1``::

        dy = b dt + σ∘dW,   da = -a ∂b/∂y dt - a ∂σ/∂y ∘dW,   dg = -a ∂b/∂θ dt - a ∂σ/∂θ ∘dW

    solved with the Stratonovich Heun scheme on the SAME Brownian path (the tree is queried
    at the backward step's ends: no noise is stored).  Itô problems are converted: the
    backward uses the Stratonovich drift ``b - ½ (∂σ/∂y) σ`` (``(∂σ/∂y)σ`` is one JVP).  That
    correction is exact for scalar noise, additive noise (zero) and diagonal noise whose
    ``σ_i`` depends on ``y_i`` only (commutative diagonal noise, as SciML's diagonal-noise
    Milstein schemes assume); Itô general noise is rejected (use
    ``interpretation="stratonovich"`` or another sensealg).

    Args:
        dt: backward step.  Default: a fixed-step forward's ``dt`` (the backward grid runs
            from each save time down to the previous one); for adaptive solves the backward
            is adaptive per sample, starting from that sample's mean forward step and
            carrying its step size across save times.
        adaptive: force (True) or forbid (False) backward step control; default follows
            the forward solve.
        atol, rtol: backward tolerances (default: the forward's).
        seminorm: must be True (the default): the parameter adjoint lives outside the
            per-sample state and is never in the error norm.
        checkpointing: reset ``y`` to the forward's stored state at every save time (as
            SciMLSensitivity's ``BacksolveAdjoint(checkpointing=true)`` and torchsde do);
            False backsolves ``y`` all the way (less accurate for unstable reverse flows).

    Memory O(1) in the number of steps (the states at the save times, the augmented state,
    one step's stage graphs); compute: per backward step, one VJP per stage (plus one JVP
    for Itô diagonal/scalar); adaptive backward solves add one VJP over the step's stages
    for the parameters (fixed steps take it in the stage VJPs).  The gradient is consistent
    (error → 0 with dt / tolerance, O(dt)) but not the exact gradient of the forward's
    numbers.  Needs ``prob.params`` (checked).

    Failures are reported, not raised: a sample whose backward solve stops (``MaxIters``,
    ``DtLessThanMin``, ``Unstable``) gets a NaN ``dL/dy0`` and makes ``dL/dθ`` NaN (its
    share is missing), with a ``RuntimeWarning``; the per-sample backward return codes and
    counters are added to the forward solution's ``stats.extra`` (``adjoint_retcodes``,
    ``adjoint_naccept``, ``adjoint_nreject``, ``adjoint_nf``).  A sample that failed in
    the forward solve and that the loss does not use is skipped: it adds exactly zero.

    Reversible solvers (``alg=deb.ReversibleHeun()``): the backward instead undoes the
    forward's steps one by one with the solver's algebraic inverse (no stored states, no
    backward SDE), re-evaluates the drift and diffusion at each reconstructed ``z_n`` with the
    graph on and pulls the cotangents back through them: the exact gradient of the returned numbers in
    O(1) memory (one drift + one diffusion evaluation with graph and one backward pass through
    them per step, the work of backprop through the steps).  ``dt``,
    ``adaptive``, tolerances and ``checkpointing`` are ignored there.
    """

    uses_boundary = True

    def __init__(
        self,
        dt: float | None = None,
        adaptive: bool | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        seminorm: bool = True,
        checkpointing: bool = True,
    ):
        if dt is not None and (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0):
            raise ValueError(f"BacksolveAdjoint(dt=...) must be a positive number or None; got {dt!r}")
        if adaptive is not None and not isinstance(adaptive, bool):
            raise TypeError(f"BacksolveAdjoint(adaptive=...) must be a bool or None; got {adaptive!r}")
        for name, v in (("atol", atol), ("rtol", rtol)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"BacksolveAdjoint({name}=...) must be a non-negative number or None; got {v!r}")
        self.dt = None if dt is None else float(dt)
        self.adaptive = adaptive
        self.atol, self.rtol = atol, rtol
        if seminorm is not True:
            raise ValueError(
                "BacksolveAdjoint(seminorm=False) is not supported: the parameter adjoint is summed over the batch "
                "outside the per-sample state, so it cannot enter a per-sample error norm"
            )
        self.seminorm = True
        self.checkpointing = bool(checkpointing)

    def check(self, prob: ODEProblem, solver: AbstractSolver, adaptive: bool) -> None:
        if prob.is_sde and prob.interpretation == "ito" and prob.noise == "general":
            raise ValueError(
                f"sensealg=BacksolveAdjoint needs the Itô→Stratonovich drift correction, which is implemented for "
                f"diagonal/scalar/additive noise only; this problem is {prob!r}. Use interpretation='stratonovich' "
                f"(with e.g. EulerHeun) or sensealg=InterpolatingAdjoint()/DiscreteAdjoint()"
            )
        if self.adaptive is False and self.dt is None and adaptive:
            raise ValueError("sensealg=BacksolveAdjoint(adaptive=False) after an adaptive solve needs dt=...")

    def __repr__(self) -> str:
        return (
            f"BacksolveAdjoint(dt={self.dt}, adaptive={self.adaptive}, seminorm={self.seminorm}, "
            f"checkpointing={self.checkpointing})"
        )

    def forward_pass(self, c: _Ctx, y0: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Any]:
        if getattr(c.solver, "reversible", False):
            return reversible_forward(c, y0)
        return super().forward_pass(c, y0)

    def backward_pass(self, c: _Ctx, saved: tuple[Tensor, ...], extra: Any, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
        if getattr(c.solver, "reversible", False):
            y_end, z_end = saved
            return reversible_backward(c, y_end, z_end, grad_ys)
        (ys,) = saved
        return backsolve_backward(c, ys, grad_ys)


# ---------------------------------------------------------------- the augmented system
#: (c, a, b, b - b_embedded): the Stratonovich Heun scheme with Euler as the embedded method
HEUN_SCHEME = ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5), (-0.5, 0.5))
DOPRI5_SCHEME = (DOPRI5_TABLEAU.c, DOPRI5_TABLEAU.a, DOPRI5_TABLEAU.b, DOPRI5_TABLEAU.b_error)


class AdjointField:
    """One stage of the augmented system: the state increment ``inc = b dt + σ∘dW`` at
    ``(t, y)`` (``b`` the Stratonovich drift) and ``a ∂inc/∂y``, by one VJP.

    ``y' = b``, ``a' = -a ∂b/∂y`` (``-a ∂σ/∂y ∘dW`` for the noise): the stage's ``Δy = inc``,
    ``Δa = -a ∂inc/∂y`` for a signed step ``dt`` (negative when the backward runs from
    ``t1`` down to ``t0`` after a forward solve).
    """

    def __init__(self, c: _Ctx):
        self.terms = c.terms
        self.params = c.theta
        self.stochastic = c.tree is not None
        prob = c.prob
        self.ito_correction = bool(prob.is_sde and prob.interpretation == "ito" and prob.noise in ("diagonal", "scalar"))
        # a solve with t1 < t0 is Itô in reversed time: its Stratonovich drift is b + ½(∂σ/∂y)σ
        self.direction = 1.0 if float(c.save_times[-1]) >= float(c.save_times[0]) else -1.0

    def strat_drift(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        terms = self.terms
        b = terms.drift(t, y)
        if not self.stochastic:
            return b, None
        assert terms.diffusion is not None
        g = terms.diffusion(t, y)
        if self.ito_correction and g.requires_grad:
            # (∂σ/∂y) σ by the double-vjp trick: v = J^T w (linear in w), J σ = d<v, σ>/dw;
            # none when σ does not depend on y (torchsde's BasicSDE2: σ(θ) only)
            w = torch.zeros_like(g, requires_grad=True)
            (v,) = torch.autograd.grad(g, y, grad_outputs=w, create_graph=True, allow_unused=True)
            if v is not None:
                (jg,) = torch.autograd.grad(v, w, grad_outputs=g, create_graph=True, allow_unused=True)
                if jg is not None:
                    b = b - (0.5 * self.direction) * jg
        return b, g

    def __call__(
        self, t: Tensor, y: Tensor, a: Tensor, dt_y: Tensor, dw: Tensor | None, with_params: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(inc, a ∂inc/∂y, a ∂inc/∂θ or None, inc with its graph or None)``.

        ``t``: ``(B,)``; ``y``, ``a``: ``(B, *state)``; ``dt_y``: the signed step broadcast
        over the state.  ``with_params``: the parameter VJP is taken now (flat ``(P,)``,
        summed over the batch) and no graph is kept; otherwise ``inc`` keeps its graph for
        :class:`ParamAdjoint`.
        """
        params = self.params
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            b, g = self.strat_drift(t, y_)
            inc = b * dt_y
            if g is not None and dw is not None:
                inc = inc + self.terms.g_dw(g, dw)
            if not inc.requires_grad:  # the fields depend on neither y nor θ
                zero = torch.zeros_like(a)
                return inc, zero, _flat_params(params, a) * 0 if with_params else None, None
            inputs = [y_, *params] if with_params else [y_]
            keep = not with_params and bool(params)  # the stage graph, for ParamAdjoint
            grads = torch.autograd.grad(inc, inputs, grad_outputs=a, allow_unused=True, retain_graph=keep)
        da = grads[0] if grads[0] is not None else torch.zeros_like(a)
        if with_params:
            return inc.detach(), da, _flatten_grads(tuple(grads[1:]), params, a), None
        return inc.detach(), da, None, inc if keep else None


@dataclass
class AdjointStepOutput(StepOutput):
    """:class:`~diffeqbridge.solvers.base.StepOutput` plus the step's parameter adjoint:
    ``param_grad`` (``(P,)``, already weighted) or ``pending`` (stage increments with their
    graphs and their ``(B, *state)`` cotangents, for the VJP after the accept decision)."""

    param_grad: Tensor | None = None
    pending: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class AugmentedRK(AbstractSolver):
    """An explicit Runge–Kutta step of the augmented system ``z = [y, a]`` (``(B, 2, *state)``).

    ``scheme = (c, a, b, b - b̂)`` as in :class:`~diffeqbridge.solvers.runge_kutta.ButcherTableau`;
    for SDEs every stage increment carries its noise term ``σ(z_i) dW`` (Stratonovich Heun).
    A stage input that is not finite is replaced by the step's start (so no ``0 · inf``
    reaches the parameters' gradient) and the sample's step is made non-finite (rejected,
    or ``Unstable`` for fixed steps).  ``param_now``: take the parameter VJP inside the
    stage VJPs with the cotangent of every lane not yet at the segment's end ``t_end``
    (fixed steps: such a lane is accepted unless its step fails, which fails the gradient
    anyway); otherwise return the stage graphs for :class:`ParamAdjoint`, which weights
    them by the accept decision.
    """

    fsal = False
    adaptive = True
    needs_levy_area = False

    def __init__(self, adjoint_field: AdjointField, scheme: Any, sde: bool, order: float, param_now: bool, t_end: float):
        self.adjoint_field = adjoint_field
        self.t_end = t_end  # the segment's end, where finished samples are held
        self.nodes, self.rows, self.weights, self.error_weights = scheme
        self.is_sde = sde  # type: ignore[misc]  # the engine's controller defaults follow it
        self.controller_order = order  # type: ignore[misc]
        if sde:
            # an I controller, dt ← dt · clamp(0.9 err^(-1/2), 1/5, 2): the Heun estimate of
            # the backward SDE is noisy, and StochasticDiffEq's PI controller with qmax = 9/8
            # let its spikes pin the step (GBM at tol 1e-2: ~400 steps per sample, ~50 with this)
            self.beta1, self.beta2, self.qmax = 0.5, 0.0, 2.0  # type: ignore[misc]
        else:  # OrdinaryDiffEq's DP5 controller
            self.beta2 = 4.0 / 100.0  # type: ignore[misc]
            self.beta1 = 1.0 / 5.0 - 3.0 / 4.0 * self.beta2  # type: ignore[misc]
        self.param_now = param_now

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        z = y
        state = z[:, 0]
        dt_y = expand_to(dt, state)
        dt64 = dt.to(torch.float64)
        ks: list[Tensor] = []
        bad = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        param_grad: Tensor | None = None
        pending: list[tuple[Tensor, Tensor]] = []
        # param_now: lanes held at the segment's end (finished, in the iterations before the
        # loop's next stop check) must add nothing: their cotangent is zeroed
        running = expand_to(t != self.t_end, state).to(state.dtype) if self.param_now else None
        for i, ci in enumerate(self.nodes):
            zi = z
            for j, aij in enumerate(self.rows[i]):
                if aij != 0.0:
                    zi = zi + aij * ks[j]
            ok = torch.isfinite(zi).flatten(1).all(dim=1)
            bad = bad | ~ok
            zi = torch.where(expand_to(ok, zi), zi, z)
            cot = zi[:, 1] if running is None else zi[:, 1] * running
            inc, da, pg, graph = self.adjoint_field(t + ci * dt64, zi[:, 0], cot, dt_y, dw, self.param_now)
            ks.append(torch.stack([inc, -da], dim=1))
            bi = self.weights[i]
            if bi != 0.0:
                if pg is not None:
                    param_grad = -bi * pg if param_grad is None else param_grad - bi * pg
                elif graph is not None:
                    pending.append((graph, -bi * zi[:, 1]))
        y1 = z + sum(bi * k for bi, k in zip(self.weights, ks) if bi != 0.0)
        y1 = torch.where(expand_to(bad, y1), torch.full_like(y1, float("nan")), y1)
        error = sum(ei * k for ei, k in zip(self.error_weights, ks) if ei != 0.0)
        n = len(self.nodes)
        return AdjointStepOutput(
            y1,
            error,
            nf=n,
            ng=n if self.is_sde else 0,
            param_grad=param_grad,
            pending=pending,  # type: ignore[arg-type]
        )


class ParamAdjoint:
    """The loop's observer that sums the parameter adjoint over accepted steps: ``gp`` ``(P,)``.

    Carrying it per sample in the state would cost ``B × P`` memory and put it in the error
    norm; here each step adds ``Σ_b accepted_b Σ_i b_i (-a_{b,i} ∂inc_{b,i}/∂θ)`` with one VJP
    over the step's stage graphs (cotangents zero for rejected and finished samples).
    """

    lockstep = True

    def __init__(self, params: list[Tensor], like: Tensor):
        self.params = params
        self.gp = torch.zeros_like(_flat_params(params, like))

    def observe(
        self, t_prev: Any, y_prev: Any, t_new: Any, step_dt: Any, out: Any, attempted: Any, accepted: Tensor, *rest: Any
    ) -> None:
        assert isinstance(out, AdjointStepOutput)
        if out.param_grad is not None:
            self.gp = self.gp + out.param_grad
        elif out.pending and self.params:
            keep = expand_to(accepted, out.pending[0][1]).to(out.pending[0][1].dtype)
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    [g for g, _ in out.pending],
                    self.params,
                    grad_outputs=[cot * keep for _, cot in out.pending],
                    allow_unused=True,
                )
            self.gp = self.gp + _flatten_grads(tuple(grads), self.params, self.gp)
        out.pending.clear()  # release the stage graphs


def _backward_settings(c: _Ctx, sensealg: BacksolveAdjoint) -> tuple[bool, float, float, Tensor]:
    """``(adaptive, atol, rtol, dt)`` of the backward solve; ``dt`` ``(B,)`` float64 starting steps."""
    adaptive = c.options.adaptive if sensealg.adaptive is None else sensealg.adaptive
    if sensealg.dt is not None and sensealg.adaptive is None:
        adaptive = False
    # the backward state (y, adjoint, parameters) has no per-component forward tolerance: the tightest one
    atol = tolerance_bound(c.options.atol) if sensealg.atol is None else float(sensealg.atol)
    rtol = tolerance_bound(c.options.rtol) if sensealg.rtol is None else float(sensealg.rtol)
    batch, device = c.prob.batch_size, c.save_times.device
    if sensealg.dt is not None:
        dt = torch.full((batch,), sensealg.dt, dtype=torch.float64, device=device)
    elif not c.options.adaptive:
        dt = c.dt_initial.to(torch.float64).expand(batch).clone()
    else:  # each sample's mean forward step
        assert c.stats is not None
        span = abs(float(c.save_times[-1]) - float(c.save_times[0]))
        dt = span / c.stats[0].stats.naccept.to(torch.float64).clamp(min=1.0)
    return adaptive, atol, rtol, dt


#: why an adaptive SDE backsolve runs out of steps at tight tolerances, and what to do
_SDE_HINT = (
    ". The backward SDE is solved with Heun's scheme and its embedded Euler estimate, whose error "
    "estimate is first order: its steps grow like 1/tol (GBM: ~10x per decade of tolerance, against "
    "~5x for SRIW1's forward). Loosen the backward tolerances only (e.g. BacksolveAdjoint(atol=1e-4, "
    "rtol=1e-4); the gradient error follows them), raise max_steps, or use DiscreteAdjoint()/"
    "InterpolatingAdjoint(); see docs/guides/gradients.md"
)


def _all_finite(x: Tensor) -> Tensor:
    return torch.isfinite(x).flatten(1).all(dim=1)


def backsolve_backward(c: _Ctx, ys: Tensor, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dy0, dL/dθ_flat)`` by solving the augmented system backwards from each save time
    to the previous one on the engine's loop, adding ``dL/dys[k]`` to ``a`` at save time ``k``.

    ``ys``, ``grad_ys``: ``(T, B, *state)``.  Per sample: the step size is carried across save
    times; a sample that failed in the forward and whose adjoint is zero is skipped (zero
    contribution); a sample whose backward fails stops there (NaN ``dL/dy0``, NaN ``dL/dθ``).
    """
    sensealg = c.sensealg
    assert isinstance(sensealg, BacksolveAdjoint) and c.stats is not None
    adaptive, atol, rtol, dt = _backward_settings(c, sensealg)
    sde = c.tree is not None
    adjoint_field = AdjointField(c)
    options = dataclasses.replace(c.options, adaptive=adaptive, atol=atol, rtol=rtol, progress=False, compile=False, compact=0.0)
    accumulate = ParamAdjoint(c.theta, ys)
    times = [float(x) for x in c.save_times]
    batch, device = ys.shape[1], ys.device
    valid = torch.isfinite(ys).flatten(2).all(dim=2)  # (T, B)
    failed_forward = c.stats[0].retcodes != SUCCESS
    y_safe = torch.nan_to_num(ys[0])
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    counts = {"naccept": zeros, "nreject": zeros, "nf": zeros, "ng": zeros}
    retcodes = torch.full((batch,), SUCCESS, dtype=torch.long, device=device)
    y, adj = ys[-1], grad_ys[-1]
    for k in range(len(times) - 1, 0, -1):
        if sensealg.checkpointing:
            y = torch.where(expand_to(valid[k], y), ys[k], y)
        z = torch.stack([y, adj], dim=1)
        dead = failed_forward & (adj == 0).flatten(1).all(dim=1)  # not differentiated: adds exactly 0
        bad_start = ~dead & (retcodes == SUCCESS) & ~_all_finite(z)
        retcodes = torch.where(bad_start, UNSTABLE, retcodes)
        skip = dead | (retcodes != SUCCESS)
        z = torch.where(expand_to(skip, z), torch.stack([y_safe, torch.zeros_like(y_safe)], dim=1), z)
        segment = torch.tensor([times[k], times[k - 1]], dtype=torch.float64, device=device)
        scheme, order = (HEUN_SCHEME, 1.0) if sde else (DOPRI5_SCHEME, 5.0)
        solver = AugmentedRK(adjoint_field, scheme, sde, order, not adaptive, times[k - 1])
        loop = Integrator(c.terms, solver, segment, dt, options, c.tree, accumulate)
        state = loop.init(z, dt, None, (0, 0))
        state.active = state.active & ~skip
        state.retcodes = torch.where(skip, SUCCESS, state.retcodes)
        for name, value in counts.items():  # max_steps bounds the whole backward solve
            setattr(state, name, value)
        loop.run(state)
        retcodes = torch.where(~skip & (state.retcodes != SUCCESS), state.retcodes, retcodes)
        counts = {name: getattr(state, name) for name in counts}
        y = torch.where(expand_to(skip, y), y, state.y[:, 0])
        adj = torch.where(expand_to(skip, adj), adj, state.y[:, 1]) + grad_ys[k - 1]
        dt = torch.where(skip, dt, state.dt)
    failed = retcodes != SUCCESS
    gy0 = torch.where(expand_to(failed, adj), torch.full_like(adj, float("nan")), adj)
    gp = torch.where(failed.any(), torch.full_like(accumulate.gp, float("nan")), accumulate.gp)
    stats = c.stats[0].stats
    stats.extra["adjoint_retcodes"] = retcodes
    stats.extra.update({f"adjoint_{name}": counts[name] for name in ("naccept", "nreject", "nf")})
    n_failed = int(failed.sum())
    if n_failed:
        codes = sorted({ReturnCode(int(r)).name for r in retcodes[failed].tolist()})
        warnings.warn(
            f"sensealg=BacksolveAdjoint: the backward solve failed for {n_failed} of {batch} sample(s) "
            f"({', '.join(codes)}): their dL/dy0 and dL/dθ are NaN; see stats.extra['adjoint_retcodes']"
            + (_SDE_HINT if sde and int(ReturnCode.MaxIters) in retcodes[failed].tolist() else ""),
            RuntimeWarning,
            stacklevel=2,
        )
    return gy0, gp
