"""The solver interface shared by every family.

A solver is a small object with class-level metadata (orders, noise types,
interpretations, adaptivity, Lévy-area requirement) and one method, :meth:`step`, that
advances every sample of the batch by its own ``dt``.  The engine owns time, step-size
control, saving and masking; a solver only knows its tableau.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..problem import Terms

ALL_NOISE = frozenset({"diagonal", "scalar", "additive", "general"})
BOTH_INTERPRETATIONS = frozenset({"ito", "stratonovich"})


@dataclass
class StepOutput:
    """What one step returns.

    Attributes:
        y1: ``(B, *state_shape)`` proposed state at ``t + dt``.
        error: ``(B, *state_shape)`` local error estimate, already combined as the solver's
            error norm expects (e.g. ``delta * E1 + E2`` for Rößler's SRI), or ``None``
            for solvers without an error estimate.  The engine scales it by
            ``atol + rtol * max(|y0|, |y1|)`` and takes the RMS over the state.
        nf: drift evaluations per sample in this step.
        ng: diffusion evaluations per sample in this step.
        f1: ``drift(t + dt, y1)`` for FSAL methods (reused as the next step's ``f0``).
        converged: ``(B,)`` bool, implicit solvers only: False where the sample's Newton
            iteration failed (its ``y1`` is NaN).  The engine rejects those steps and, after
            repeated failures (or at once for fixed steps), stops the sample with
            ``ReturnCode.ConvergenceFailure``.
        stiffness: ``(B,)`` estimate of the dominant eigenvalue modulus ``ρ`` of the drift's
            Jacobian (Hairer's ``‖f(y_s) - f(y_{s-1})‖ / ‖y_s - y_{s-1}‖`` from the last two
            stages for explicit methods, ``‖J‖_∞`` for methods that build ``J``), as
            OrdinaryDiffEq's/StochasticDiffEq's ``eigen_est``; None when not computed.
        njac: Jacobian evaluations in this step (implicit solvers; summed into
            ``Stats.extra["njac"]``), None when the solver builds none.
        stages: the stage derivatives ``k_i`` of the step (``Tsit5``/``Dopri5``: ``drift`` at
            the stages; ``Rodas4``: its transformed stages), what the solver's free interpolant
            needs for dense output (:mod:`diffeqbridge.dense`); None for other solvers.  A
            composite of two such methods (``AutoTsit5(Rodas4())``) gives the non-stiff
            method's stages then the stiff one's (zeros for a method that did not run).
        method: ``(B,)`` bool, composites whose ``stages`` are set: True where the sample took
            the stiff method's step (selects the interpolant per sample).
        state: the solver's per-solve state after this step (stateful solvers only, see
            :meth:`AbstractSolver.init`); None: unchanged.
        nf / ng may also be ``(B,)`` int tensors (composite solvers count per sample).
    """

    y1: Tensor
    error: Tensor | None
    nf: int | Tensor
    ng: int | Tensor
    f1: Tensor | None = None
    converged: Tensor | None = None
    stiffness: Tensor | None = None
    njac: int | Tensor | None = None
    stages: list[Tensor] | None = None
    state: Any = None
    method: Tensor | None = None


@dataclass(frozen=True)
class Startup:
    """What the engine hands :meth:`AbstractSolver.init` at the start of a solve.

    Attributes:
        f0: ``drift(t0, y0)`` as already evaluated (and counted) by ``solve``'s start-up, or
            None when not available.
        g0: ``diffusion(t0, y0)`` (``(B, *state_shape)``, or ``(B, *state_shape, m)`` for
            general noise) as already evaluated (and counted) by ``solve``'s start-up checks,
            or None when not available (the solver evaluates it itself if it needs it).
        exact_times: every step starts at the time ``t + dt`` (``stage_time(t, dt, 1.0)``)
            that the sample's previous accepted step ended at, bit for bit: a float64 state
            (the solver's ``dt`` is not rounded), no forced time inside the span that a step
            lands on with ``t + (target - t) != target`` (fixed steps: the lockstep grid is
            checked; adaptive: no forced time between the start and the end) and no observer
            that moves samples (events).  Only then may a solver carry a value computed at
            a step's end time into the next step (:class:`~diffeqbridge.ShARK`'s ``g(t + h)``).
    """

    f0: Tensor | None = None
    g0: Tensor | None = None
    exact_times: bool = False


class AbstractSolver:
    """Base class.  Subclasses set the class variables and implement :meth:`step`.

    Class variables:
        strong_order / weak_order: convergence orders (for the noise types declared).
        noise_types: the ``SDEProblem.noise`` values it handles (empty for ODE solvers).
        interpretations: ``{"ito"}``, ``{"stratonovich"}`` or both.  Additive noise is
            accepted under either interpretation (they coincide).
        adaptive: True when :meth:`step` returns an error estimate.
        needs_levy_area: True when :meth:`step` uses the space-time Lévy area ``H``.
        is_sde: False for ODE solvers.
        controller_order: the order ``q`` used by the PI controller's exponents.
        fsal: True when the step reuses ``f0 = drift(t, y)`` and returns ``f1``.
        beta1 / beta2 / qmax / qmin / gamma: controller constants (None -> engine default).
        first_step_factor: multiplies StochasticDiffEq's first SDE step (``sde_initial_dt``);
            :data:`SDE_FIRST_STEP_FACTOR` for the embedded estimates of SRI and SPaRK, 1 otherwise.
        stability_size: length of the stability region along the negative real axis
            (OrdinaryDiffEq's/StochasticDiffEq's ``alg_stability_size``); set on the solvers
            that report ``StepOutput.stiffness`` and can be the non-stiff half of an
            :class:`~diffeqbridge.solvers.composite.AutoSwitch`.
    """

    strong_order: ClassVar[float] = 0.0
    weak_order: ClassVar[float] = 0.0
    noise_types: ClassVar[frozenset[str]] = frozenset()
    interpretations: ClassVar[frozenset[str]] = BOTH_INTERPRETATIONS
    adaptive: ClassVar[bool] = False
    needs_levy_area: ClassVar[bool] = False
    is_sde: ClassVar[bool] = True
    controller_order: ClassVar[float] = 1.0
    fsal: ClassVar[bool] = False
    beta1: ClassVar[float | None] = None
    beta2: ClassVar[float | None] = None
    qmax: ClassVar[float | None] = None
    qmin: ClassVar[float | None] = None
    gamma: ClassVar[float | None] = None
    first_step_factor: float = 1.0  # an instance value for StochasticRungeKutta(error_estimate=...)
    reversible: ClassVar[bool] = False  # algebraically reversible step (exact BacksolveAdjoint)
    #: the state (:meth:`init`, ``StepOutput.state``) is a tuple of per-sample values that advance
    #: exactly with an accepted step: the engine keeps a sample's previous state where its step
    #: was not accepted (as it keeps ``y``; no :meth:`update`), and the checkpointed sensealgs
    #: differentiate through it (restored as autograd leaves, like ``y``)
    carries_state: ClassVar[bool] = False
    #: the state is ``(g(t),)``, the diffusion at the step's start carried from the previous
    #: step's end (:func:`carried_diffusion_init`; ShARK, the SRA family); a composite keeps it
    #: per sample for such a partner (:class:`~diffeqbridge.AutoSwitch`)
    carries_diffusion: ClassVar[bool] = False
    #: ``StepOutput.nf``/``ng`` sum the methods that ran (composites): the engine hands the
    #: first step the start-up values only where :meth:`one_method` says that step's counts
    #: are one method's
    per_sample_counts: ClassVar[bool] = False
    #: :meth:`init` starts from the start-up's ``Startup.f0`` and ``Startup.g0`` (ReversibleHeun's
    #: ``(z, f(z), g(z))``): ``solve`` evaluates them even where nothing else needs them
    init_uses_start: ClassVar[bool] = False
    #: every step builds a Jacobian or solves a Newton system (``StepOutput.njac``/``converged``
    #: set): fixed steps take the engine's per-iteration loop, which handles both
    implicit: ClassVar[bool] = False
    stability_size: ClassVar[float | None] = None

    @property
    def graph_state(self) -> bool:
        """Whether the state holds values computed from ``y0`` and the parameters that the
        checkpointed sensealgs must differentiate through (restored as autograd leaves, built
        again by :meth:`init` at the start): ``carries_state`` unless a composite says otherwise."""
        return self.carries_state

    def initial_carry(self, terms: Terms, t: Tensor, y: Tensor, f0: Tensor | None) -> object:
        """What the engine carries between steps in the FSAL slot, at the start (``f0`` by
        default; solvers with more state, e.g. ``ReversibleHeun``, override this)."""
        return f0

    # --- per-solve state (diffrax's init/step): a solver object never changes during a solve;
    # what it carries between steps lives in the engine's LoopState.solver_state
    def init(self, terms: Terms, t: Tensor, y0: Tensor, startup: Startup | None = None) -> Any:
        """The solver's state at the start of a solve (``t``: ``(B,)``, ``y0``: ``(B, *state_shape)``;
        ``startup``: what the engine already evaluated and guarantees, :class:`Startup`; None
        outside the engine's own loop: no guarantee; a composite passes it on to a partner that
        ``carries_diffusion``).

        None for stateless solvers (the default).  Otherwise a tuple or NamedTuple whose
        tensors have the batch as their first axis (so the engine can gather, select and
        snapshot it per sample); plain Python values in it are plans fixed at the loop's host
        checks (:meth:`plan`).  The engine passes it to :meth:`step` as ``state`` and replaces
        it by :meth:`update`'s result after every step.
        """
        return None

    def one_method(self, state: Any) -> bool:
        """Whether the next step (``state``: after :meth:`plan`) runs one method for every
        sample, so that its ``StepOutput.nf``/``ng`` are that method's plain counts and the
        start-up values it reuses can be taken off them (``engine._start_terms``).  True unless
        ``per_sample_counts`` (composites say when)."""
        return not self.per_sample_counts

    def implicit_next(self, state: Any) -> bool:
        """Whether the next step (``state``: after :meth:`plan`) builds a Jacobian or solves a
        Newton system (``StepOutput.njac``/``converged`` set): ``implicit``; composites: when
        their stiff method runs.  The engine's lockstep path hands such a step to its loop."""
        return self.implicit

    def plan(self, state: Any, active: Tensor, horizon: int) -> Any:
        """Called at the loop's host checks (every ``horizon`` iterations, where the loop
        synchronises anyway) with the ``(B,)`` still-active mask: the place to read tensors on
        the host and fix Python-level branches for the next ``horizon`` steps, so that
        :meth:`step` itself never synchronises.  Returns the (new) state; default unchanged."""
        return state

    def update(
        self, state: Any, accepted: Tensor, active: Tensor, t: Tensor, dt: Tensor, out: StepOutput
    ) -> tuple[Any, Tensor | None]:
        """After the accept decision: the state for the next step and an optional ``(B,)``
        factor on the next step size (applied by the controller, None: none).

        ``accepted``/``active``: ``(B,)`` masks; ``t``: the samples' times after the step;
        ``dt``: the step magnitudes just tried.  Default: ``out.state`` (else ``state``), no factor.
        """
        return (state if out.state is None else out.state), None

    def extra_stats(self, state: Any) -> dict[str, Tensor]:
        """Per-sample ``(B,)`` statistics (from the final ``state``) added to ``Stats.extra``."""
        return {}

    def step(
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None,
        levy_h: Tensor | None,
        f0: Tensor | None = None,
    ) -> StepOutput:
        """Advance every sample from ``t`` to ``t + dt``.

        Args:
            terms: the problem's vector fields (:class:`~diffeqbridge.problem.Terms`).
            t: ``(B,)`` current times.
            y: ``(B, *state_shape)`` current states.
            dt: ``(B,)`` step sizes (strictly positive).
            dw: ``(B, *noise_shape)`` Brownian increments over the step (None for ODEs).
            levy_h: ``(B, *noise_shape)`` space-time Lévy area over the step, present when
                ``needs_levy_area``.  ``int_s^t (W_u - W_s) du = dt * (H + dW / 2)``.
            f0: ``drift(t, y)`` when ``fsal``.

        Stateful solvers (:meth:`init` not None) take an eighth argument, ``state``, and return
        the next state in ``StepOutput.state``; ``self`` never changes (:func:`call_step`).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @classmethod
    def describe(cls) -> dict[str, object]:
        """The metadata as a plain dict (used by the README table and `info`)."""
        return {
            "name": cls.__name__,
            "kind": "SDE" if cls.is_sde else "ODE",
            "strong_order": cls.strong_order,
            "weak_order": cls.weak_order,
            "noise": sorted(cls.noise_types),
            "interpretation": sorted(cls.interpretations),
            "adaptive": cls.adaptive,
            "levy_area": cls.needs_levy_area,
        }


def call_step(
    solver: AbstractSolver,
    terms: Terms,
    t: Tensor,
    y: Tensor,
    dt: Tensor,
    dw: Tensor | None,
    levy_h: Tensor | None,
    f0: Any,
    state: Any,
) -> StepOutput:
    """``solver.step(...)``, passing ``state`` only to stateful solvers (``state`` not None), so
    stateless solvers keep the seven-argument signature."""
    if state is None:
        return solver.step(terms, t, y, dt, dw, levy_h, f0)
    stateful: Any = solver.step  # the eight-argument signature of stateful solvers
    return stateful(terms, t, y, dt, dw, levy_h, f0, state)


def levy_inputs(
    terms: Terms, dw: Tensor | None, levy_h: Tensor | None, method: str
) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    """``(diffusion, dw, levy_h)`` for a step that needs the diffusion, the increment and the
    space-time Lévy area: ``TypeError`` for an ODE problem, ``ValueError`` without ``dW``/``H``
    (``method``: the subject of the message, e.g. ``"ShARK needs"``, ``"SRI methods need"``)."""
    if terms.diffusion is None:
        raise TypeError(f"{method} an SDE problem (a diffusion term)")
    if dw is None or levy_h is None:
        raise ValueError(f"{method} the Brownian increment dW and the Lévy area H")
    return terms.diffusion, dw, levy_h


def carried_diffusion_init(terms: Terms, startup: Startup | None) -> tuple[Tensor] | None:
    """The state ``(g(t0),)`` of the additive-noise solvers that carry the diffusion at a step's
    end, ``g(t + h)``, into the next step as its ``g(t)`` (ShARK, the SRA family): exact
    because the diffusion does not depend on the state and, under ``startup.exact_times``, the
    next step starts at that ``t + h`` bit for bit.  Starts from the start-up ``startup.g0``
    (already counted); None (stateless: ``g(t)`` evaluated every step) without that guarantee
    or without ``g0``."""
    if startup is None or not startup.exact_times or startup.g0 is None or terms.noise != "additive":
        return None
    return (startup.g0,)


def hairer_eigen_estimate(df: Tensor, dy: Tensor) -> Tensor:
    """Per-sample ``ρ = ‖df‖ / ‖dy‖`` (``(B, ...) -> (B,)``, detached, float64): the modulus of
    the dominant eigenvalue of ``∂f/∂y`` seen by two stages ``y_a, y_b`` with
    ``df = f(y_a) - f(y_b)``, ``dy = y_a - y_b`` (Hairer–Wanner II, Sec. IV.2; OrdinaryDiffEq's
    ``eigen_est`` for DP5/Tsit5, StochasticDiffEq's for SOSRI2/SOSRA2).  0 where ``dy = 0``."""
    dims = tuple(range(1, df.ndim))
    num = torch.linalg.vector_norm(df.detach(), dim=dims, dtype=torch.float64)
    den = torch.linalg.vector_norm(dy.detach(), dim=dims, dtype=torch.float64)
    return torch.where(den > 0, num / den, 0.0)


def jacobian_inf_norm(J: Tensor) -> Tensor:
    """``‖J‖_∞`` per sample (``(B, n, n) -> (B,)``, float64): OrdinaryDiffEq's ``eigen_est``
    for methods that build the Jacobian (``opnorm(J, Inf)`` in ``calc_J``)."""
    return J.detach().double().abs().sum(dim=-1).amax(dim=-1)


def fused_sum(base: Tensor | None, terms: Iterable[tuple[float, Tensor | None, Tensor | None]]) -> Tensor | None:
    """``base + Σ c · s · x`` over the terms ``(c, s, x)`` with ``c != 0`` (``s`` None: ``c · x``;
    ``s`` broadcasts against ``x``, e.g. a per-sample ``(B, 1)`` step), one ATen op per term:
    ``torch.addcmul`` / ``torch.add(..., alpha=c)``, each a fused multiply-add rounded once
    (the same bits in the vectorised blocks and the scalar tail, so a sample's value does not
    depend on its place in the batch: ``tests/test_batch_invariance.py``).  Without ``base``
    the first term costs two ops (one when ``c`` is 1).  None when ``base`` is None and every
    ``c`` is 0.  Shapes: those of ``base`` / the broadcast of ``s`` and ``x``."""
    acc = base
    for c, s, x in terms:
        if c == 0.0:
            continue
        assert x is not None
        if acc is None:
            prod = x if s is None else s * x
            acc = prod if c == 1.0 else prod * c
        elif s is None:
            acc = acc + x if c == 1.0 else torch.add(acc, x, alpha=c)
        else:
            acc = torch.addcmul(acc, s, x) if c == 1.0 else torch.addcmul(acc, s, x, value=c)
    return acc


def linear_combination(coeffs: Sequence[float], xs: Sequence[Tensor | None]) -> Tensor | None:
    """``sum_j c_j x_j`` over the non-zero coefficients (None when all are zero), one rounding
    per product and per sum (:func:`fused_sum` rounds each multiply-add once)."""
    out: Tensor | None = None
    for c, x in zip(coeffs, xs, strict=True):
        if c == 0.0:
            continue
        assert x is not None
        term = x if c == 1.0 else c * x
        out = term if out is None else out + term
    return out


def drift_error_terms(alpha: Sequence[float], n: int, delta: float | None) -> tuple[float, ...]:
    """The weights ``w_i`` of ``dt f_i`` (``i < n``) in the drift part of the error:
    ``α_i − [i = 0]`` (embedded, ``delta=None``: the method's drift minus the Euler drift from
    the same first stage) or StochasticDiffEq's ``delta`` for every stage (``delta · dt Σ_i f_i``)."""
    if delta is None:
        return tuple(a - (1.0 if i == 0 else 0.0) for i, a in enumerate(alpha[:n]))
    return (delta,) * n


def noise_terms(
    terms: Terms, weights: Iterable[tuple[float, Tensor | None]], x: Tensor, y: Tensor
) -> list[tuple[float, Tensor | None, Tensor | None]]:
    """:func:`fused_sum` terms of ``Σ_j c_j g_j·x`` (``g·x`` is ``terms.g_dw``; ``weights``:
    ``(c_j, g_j)``; ``x`` ``(B, *noise_shape)``, ``y`` the ``(B, *state_shape)`` state): one
    term per non-zero ``c_j`` for elementwise noise (diagonal, scalar, diagonal-shaped
    additive), else the single term ``g_dw(Σ_j c_j g_j, x)`` (general noise)."""
    pairs = [(c, g) for c, g in weights if c != 0.0]
    if terms.noise != "general":
        scale = terms.noise_like_state(x, y)
        return [(c, scale, g) for c, g in pairs]
    combined = linear_combination([c for c, _ in pairs], [g for _, g in pairs])
    return [] if combined is None else [(1.0, None, terms.g_dw(combined, x))]


def stage_time(t: Tensor, dt: Tensor, c: float) -> Tensor:
    """``t + c dt`` for a stage with node ``c`` (``(B,)`` tensors; one fused op)."""
    if c == 0.0:
        return t
    return t + dt if c == 1.0 else torch.add(t, dt, alpha=c)


def check_delta(delta: float | None, default: float) -> float:
    """The weight of the drift error ``E1`` in StochasticDiffEq's ``delta * E1 + E2``."""
    value = default if delta is None else float(delta)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"delta must be a finite number >= 0; got {delta!r}")
    return value


ERROR_ESTIMATES = ("embedded", "sciml")
# Largest step growth per accepted step with an embedded SDE estimate: 3/2 measured against
# StochasticDiffEq's 9/8 on GBM and SciML's additive system (benchmarks/sde_work_precision.py):
# the same error for about 10-50 % fewer evaluations at tol 1e-2 ... 1e-3, equal below.
EMBEDDED_QMAX = 3 / 2
# First SDE step of the embedded estimates for multiplicative noise (SRI, SPaRK): this many
# times StochasticDiffEq's sde_determine_initdt step (whose target is 1 % of the tolerance,
# reached after ~10 steps of growth at qmax 3/2).  Measured (B = 128, tol 1e-1 ... 1e-4, the
# problems of benchmarks/sde_work_precision.py): SRIW1/SOSRI/SPaRK take 0.27-0.84x the
# evaluations at tol 1e-1 ... 1e-2 on GBM, wave and rot2d, 0.49-0.98x at 1e-3 ... 1e-4, with the
# error within 1.4x of before on GBM and rot2d (wave's rises from 9e-7 to 5e-6 at tol 1e-1, still
# far below tol).  The additive-noise methods (ShARK, SRA) keep StochasticDiffEq's step:
# there it was mixed on prob_sde_additive, neutral on vp_gmm, and with alg=None on the stiff
# OU problem of tests/test_autoswitch.py the earlier switch damped X(1)'s spread 5x too much.
SDE_FIRST_STEP_FACTOR = 16.0


# Exponent θ of the per-unit-step weighting of the embedded estimates for multiplicative noise
# (SRI, SPaRK): the controller sees ``error · (T/|dt|)^θ`` (``T`` the span).  Mean-zero local
# errors add in quadrature (θ = 1/2 would keep the global strong error at tol); with θ = 0 the
# error of GBM/SOSRI grew from 1.2 to 15 times tol over tol 1e-2 ... 1e-5 (tests/
# test_error_estimates.py, B = 64, seed 7).  Measured there: θ = 0.2 -> 1.0 ... 5.6 times tol,
# work ~ tol^-0.62, NFE at matched error within +5 % of θ = 0; θ = 1/2 -> 0.5 ... 0.7 times
# tol but work ~ tol^-0.89 (1.5-2x the NFE at matched error).  Additive-noise methods (ShARK,
# SRA) keep θ = 0: their error already sits 20-100x below tol.
UNIT_STEP_POWER = 0.2
#: the largest ``T/|dt|`` the weighting follows (weight ≤ 6.3 at θ = 0.2): the error-tracks-tol
#: test (GBM down to tol 1e-5) is unchanged by it, while du = u² dt + 0.01 dW from 10 reaches
#: the unstable check in 886 steps (uncapped: > 1,500; θ = 0: 313)
UNIT_STEP_RATIO_MAX = 1e4


def per_unit_step(error: Tensor, dt: Tensor, span: float, power: float) -> Tensor:
    """``error · min(span/|dt|, UNIT_STEP_RATIO_MAX)^power`` per sample (``error`` ``(B, ...)``,
    ``dt`` ``(B,)``); ``exp``/``log`` rather than ``pow`` keeps it independent of the batch
    layout.  The cap keeps the weight from growing without bound where steps collapse (a
    blow-up towards a singularity would otherwise tighten its own tolerance step after step
    and crawl to ``max_steps`` instead of reaching the engine's unstable check)."""
    if power == 0.0 or span <= 0.0:
        return error
    # min(span/|dt|, R)^θ = exp(θ log span − θ log max(|dt|, span/R))
    log_step = torch.log(dt.abs().clamp_min(span / UNIT_STEP_RATIO_MAX))
    factor = torch.exp(torch.rsub(log_step, power * math.log(span), alpha=power))
    if factor.dtype != error.dtype:
        factor = factor.to(error.dtype)
    return error * factor.reshape(factor.shape + (1,) * (error.ndim - 1))


def check_unit_step_power(value: float | None, default: float) -> float:
    """``θ`` of :func:`per_unit_step`: a finite number in ``[0, 1]`` (None: ``default``)."""
    theta = default if value is None else value
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (0.0 <= float(theta) <= 1.0):
        raise ValueError(f"unit_step_power must be a number in [0, 1]; got {value!r}")
    return float(theta)


def weighted_per_unit_step(out: StepOutput, power: float, terms: Terms, dt: Tensor) -> StepOutput:
    """``out`` with its error weighted by :func:`per_unit_step` (not for additive noise, nor
    when ``power`` is 0); composites then merge the weighted errors per sample."""
    if power and out.error is not None and terms.noise not in (None, "additive"):
        out.error = per_unit_step(out.error, dt, terms.span, power)
    return out


def check_error_estimate(value: str, allowed: tuple[str, ...] = ERROR_ESTIMATES) -> str:
    """One of ``allowed``: by default ``"embedded"`` (difference to the embedded lower-order
    solution) or ``"sciml"`` (StochasticDiffEq's ``delta * E1 + E2``)."""
    if value not in allowed:
        raise ValueError(f"error_estimate must be one of {allowed}; got {value!r}")
    return value


class StochasticRungeKutta(AbstractSolver):
    """Adaptive stochastic Runge–Kutta family driven by a tableau, with SDE controller
    constants (``qmax = 9/8``, ``qmin = 1/5``, ``gamma = 9/10``; StochasticDiffEq
    ``src/alg_utils.jl``).

    Two error estimates:

    * ``"embedded"`` (default): ``y1 - ŷ1`` where ``ŷ1`` is the strong-order-1 solution
      built from the same stages and the same ``ΔW``, ``H``: the Euler drift ``dt f_1``
      and the order-1 noise terms.  It is ``dt (Σ α_i f_i − f_1) + E2``, which scales as the
      local error does (``O(dt^{3/2})``), so the work follows ``tol^{-2/3}``.
    * ``"sciml"``: StochasticDiffEq's ``delta * E1 + E2`` with ``E1 = dt Σ_i f_i``, the size of
      the drift increment (``O(dt)``): kept for parity with the julia backend and SciML.

    Subclasses set ``tableau``, ``default_delta`` and ``step_function``, a pure function
    ``step_function(tableau, terms, t, y, dt, dw, levy_h, delta) -> StepOutput`` where
    ``delta=None`` selects the embedded estimate.
    """

    tableau: ClassVar[object]
    default_delta: ClassVar[float] = 1.0
    step_function: ClassVar[Callable[..., StepOutput]]
    # exponent order of the PI controller with the embedded estimate (error ~ dt^{3/2})
    embedded_controller_order: ClassVar[float] = 1.5
    embedded_first_step_factor: ClassVar[float] = SDE_FIRST_STEP_FACTOR
    default_unit_step_power: ClassVar[float] = UNIT_STEP_POWER
    adaptive = True
    needs_levy_area = True
    qmax = 9 / 8
    qmin = 1 / 5
    gamma = 9 / 10

    def __init__(self, delta: float | None = None, error_estimate: str = "embedded", unit_step_power: float | None = None):
        """``error_estimate``: ``"embedded"`` (default) or ``"sciml"``; ``delta``: weight of
        the drift part ``E1`` in the ``"sciml"`` estimate ``delta*E1 + E2`` (default:
        StochasticDiffEq's ``delta_default`` for this method); ``unit_step_power``: ``θ`` of
        the per-unit-step weighting of the embedded estimate (:func:`per_unit_step`; default
        :data:`UNIT_STEP_POWER` for SRI, 0 for SRA)."""
        self.error_estimate = check_error_estimate(error_estimate)
        self.delta = check_delta(delta, type(self).default_delta)
        self.unit_step_power = check_unit_step_power(unit_step_power, type(self).default_unit_step_power)
        if self.error_estimate == "embedded":  # the class values are StochasticDiffEq's
            self.controller_order = type(self).embedded_controller_order
            self.qmax = EMBEDDED_QMAX
            self.first_step_factor = type(self).embedded_first_step_factor

    def step(
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None,
        levy_h: Tensor | None,
        f0: Tensor | None = None,
        state: tuple[Tensor] | None = None,
    ) -> StepOutput:
        """See :meth:`AbstractSolver.step` (``f0`` is unused; ``state``: ``(g(t),)`` of the
        solvers that carry the diffusion, :func:`carried_diffusion_init`, passed to
        ``step_function`` as ``g_start``)."""
        delta = None if self.error_estimate == "embedded" else self.delta
        if state is None:
            out = type(self).step_function(self.tableau, terms, t, y, dt, dw, levy_h, delta)
        else:
            out = type(self).step_function(self.tableau, terms, t, y, dt, dw, levy_h, delta, state[0])
        return weighted_per_unit_step(out, self.unit_step_power if delta is None else 0.0, terms, dt)

    def __repr__(self) -> str:
        name = type(self).__name__
        args = []
        if self.error_estimate != "embedded":
            args.append(f"error_estimate={self.error_estimate!r}")
        if self.delta != type(self).default_delta:
            args.append(f"delta={self.delta!r}")
        if self.unit_step_power != type(self).default_unit_step_power:
            args.append(f"unit_step_power={self.unit_step_power!r}")
        return f"{name}({', '.join(args)})"
