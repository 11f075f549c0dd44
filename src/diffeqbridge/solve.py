"""``solve``: validates the inputs, picks the backend and algorithm, runs the engine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._tree_kernel import check_seed
from .adjoint import DiscreteAdjoint
from .brownian import VirtualBrownianTree, solve_tol
from .controller import initial_dt
from .engine import EngineOptions, integrate
from .problem import ODEProblem, SDEProblem, Terms, check_additive, check_field_shapes
from .solution import Solution
from .solvers import (
    SOSRA,
    SOSRI,
    SRIW1,
    AutoSOSRI,
    AutoSwitch,
    AutoTsit5,
    ImplicitRKMil,
    LambaEM,
    LambaEulerHeun,
    RKMil,
    ShARK,
    SPaRK,
)
from .solvers.base import AbstractSolver

BACKENDS = ("auto", "native", "julia")
ALG_HINTS = ("auto", "nonstiff", "stiff")


def _check_alg_hints(alg_hints: Any) -> frozenset[str]:
    if alg_hints is None:
        return frozenset()
    if isinstance(alg_hints, str) or not isinstance(alg_hints, (list, tuple, set, frozenset)):
        raise TypeError(f"alg_hints must be a list of strings such as ['stiff']; got {alg_hints!r}")
    hints = frozenset(alg_hints)
    bad = sorted(str(h) for h in hints if h not in ALG_HINTS)
    if bad:
        raise ValueError(
            f"alg_hints: unknown hint(s) {bad}; expected any of {list(ALG_HINTS)} (noise type and "
            "interpretation come from the SDEProblem's noise= and interpretation=)"
        )
    if {"stiff", "nonstiff"} <= hints:
        raise ValueError("alg_hints cannot contain both 'stiff' and 'nonstiff'")
    return hints


def _stiff_algorithm(problem: ODEProblem) -> AbstractSolver:
    """``alg_hints=["stiff"]``: SciML's choices among the solvers that exist here.

    SDE (StochasticDiffEq ``default_sde_alg.jl``): additive -> ``SKenCarp``; diagonal/scalar
    (Itô or Stratonovich) -> ``ImplicitRKMil``; general Itô -> ``ISSEM``; general
    Stratonovich (SciML: ``ImplicitEulerHeun``) has no native counterpart yet.  ODE
    (OrdinaryDiffEq's default for stiff problems picks Rosenbrock for small systems,
    ESDIRK/BDF with Krylov for large ones): ``Rodas4`` up to 50 states, ``Kvaerno5`` up to 500,
    ``Kvaerno5(linsolve="krylov")`` beyond.
    """
    from .solvers import ISSEM, ImplicitRKMil, Kvaerno5, Rodas4, SKenCarp

    if not problem.is_sde:
        n = math.prod(problem.y0.shape[1:])
        return Rodas4() if n <= 50 else Kvaerno5() if n <= 500 else Kvaerno5(linsolve="krylov")
    if problem.noise == "additive":
        return SKenCarp()
    if problem.noise != "general":
        return ImplicitRKMil()
    if problem.interpretation == "ito":
        return ISSEM()
    raise ValueError(
        "alg_hints=['stiff'] with general Stratonovich noise needs ImplicitEulerHeun, which the native "
        "backend does not have; convert to Itô or pass alg explicitly"
    )


def _start_up_fields(prob: ODEProblem, t0: Tensor, drift: bool, diffusion: bool) -> tuple[Tensor | None, Tensor | None]:
    """``(drift(t0, y0), diffusion(t0, y0))`` in the state's dtype (``(B, *state_shape)``, the
    diffusion ``(B, *state_shape, m)`` for general noise), each only where asked for (else
    None; the diffusion also None for an ODE); ``t0``: ``(B,)`` float64.  The raw user
    functions, so that a wrong type, shape or dtype is reported as the start-up's error
    (:func:`~diffeqbridge.problem.check_field_shapes`)."""
    f0 = prob.drift(t0, prob.y0) if drift else None
    g0 = prob.diffusion(t0, prob.y0) if diffusion and isinstance(prob, SDEProblem) else None
    check_field_shapes(prob, f0, g0)
    return (None if f0 is None else f0.to(prob.y0.dtype)), (None if g0 is None else g0.to(prob.y0.dtype))


def default_algorithm(problem: ODEProblem, dt: float | None = None, alg_hints: Any = None) -> AbstractSolver:
    """The automatic choice, following SciML's ``default_sde_alg`` for the solvers that exist.

    ODE: ``AutoTsit5(stiff)`` with ``stiff`` as :func:`_stiff_algorithm` picks it (Rodas4 up
    to 50 states): per-sample stiffness switching (OrdinaryDiffEq's default for unhinted
    problems); on a non-stiff problem it takes exactly Tsit5's steps.  SDE: additive noise ->
    ``AutoSwitch(ShARK(), ImplicitRKMil(smooth_est=True))`` (ShARK: fewest evaluations at
    matched strong error on the additive work-precision problems, where SciML picks ``SOSRA``);
    diagonal/scalar Itô -> ``AutoSOSRI()`` (SOSRI, switching to
    ``ImplicitRKMil(smooth_est=True)`` at ``ρ dt ≳ 1``).  Both take the non-stiff method's exact
    steps where nothing is stiff.  The implicit partner was measured on
    ``dX = -1e4 (X - cos t) dt + 0.1 dW`` (and ``+ 0.1 X dW``) at the default tolerances
    (docs/guides/stiff.md): the filtered drift estimate takes ~590 drift evaluations per path
    at strong error 7e-4 (StochasticDiffEq's unfiltered ``dt² J f / 2``: ~8,400); ``SKenCarp``
    takes fewer steps but adds ``g ΔW`` after its implicit stages, so at ``dt |λ| ≫ 1`` its
    noise is not damped (strong error 0.2).  General Itô -> ``LambaEM``; Stratonovich
    (any noise) -> ``SPaRK`` (adaptive, Lévy area, embedded estimate; SciML picks ``RKMil``
    with ``dt`` / ``LambaEulerHeun``; RKMil needs 5-6x SPaRK's evaluations at strong errors
    1e-2 ... 3e-2 on rot2d).  With ``alg_hints=["stiff"]``: see :func:`_stiff_algorithm`; with
    ``["nonstiff"]`` an SDE gets the non-stiff winner alone: ``ShARK``, and ``SRIW1`` for
    diagonal/scalar Itô noise (fewest evaluations at matched strong error on GBM, wave and
    rot2d in ``benchmarks/sde_work_precision.py``; SOSRI, the non-stiff half of
    ``AutoSOSRI``, needs 1.3-1.5x as many there but has the larger stability region the
    switching relies on).
    """
    hints = _check_alg_hints(alg_hints)
    if "stiff" in hints:
        return _stiff_algorithm(problem)
    if not problem.is_sde:
        return AutoTsit5(_stiff_algorithm(problem))
    nonstiff = "nonstiff" in hints
    if problem.noise == "additive":
        return ShARK() if nonstiff else AutoSwitch(ShARK(), ImplicitRKMil(smooth_est=True))
    if problem.interpretation == "stratonovich":
        return SPaRK()
    if problem.noise == "general":
        return LambaEM()
    return SRIW1() if nonstiff else AutoSOSRI()


def _sciml_default_sde(problem: ODEProblem, dt: float | None) -> AbstractSolver:
    """``alg=None`` with ``backend="julia"``: SciML's own ``default_sde_alg`` for unhinted
    problems (``SOSRA`` for additive, ``SOSRI`` for diagonal/scalar Itô noise, ``RKMil`` with
    ``dt`` / ``LambaEulerHeun`` for Stratonovich noise), which the julia
    backend can run; the native composites (``AutoSwitch``, ``AutoSOSRI``) have no SciML
    counterpart."""
    if problem.noise == "additive":
        return SOSRA()
    if problem.interpretation == "ito" and problem.noise != "general":
        return SOSRI()
    if problem.interpretation == "stratonovich":  # SciML's choice (the native one is SPaRK)
        return RKMil() if problem.noise != "general" and dt is not None else LambaEulerHeun()
    return default_algorithm(problem, dt, ("nonstiff",))


def _check_every(value: int | None, device: torch.device) -> int:
    if value is None:
        return 1 if device.type == "cpu" else 8
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"check_every must be a positive int or None; got {value!r}")
    return value


def _check_solver(problem: ODEProblem, alg: Any) -> AbstractSolver:
    if isinstance(alg, type) and issubclass(alg, AbstractSolver):
        alg = alg()
    if not isinstance(alg, AbstractSolver):
        raise TypeError(f"alg must be a diffeqbridge solver (e.g. deb.SOSRI()) or None; got {alg!r}")
    name = type(alg).__name__
    if problem.is_sde and not alg.is_sde:
        raise ValueError(f"alg={name} is an ODE solver; this SDEProblem needs an SDE solver (e.g. SOSRI, EM)")
    if not problem.is_sde and alg.is_sde:
        raise ValueError(f"alg={name} is an SDE solver; this ODEProblem needs an ODE solver (Tsit5, Dopri5)")
    if problem.is_sde:
        if problem.noise not in alg.noise_types:
            raise ValueError(f"alg={name} does not support noise={problem.noise!r} (supports {sorted(alg.noise_types)})")
        if problem.noise != "additive" and problem.interpretation not in alg.interpretations:
            raise ValueError(
                f"alg={name} solves {'/'.join(sorted(alg.interpretations))} SDEs; the problem is "
                f"interpretation={problem.interpretation!r}"
            )
    return alg


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() and not value.requires_grad:
        value = value.item()  # torchdiffeq-style torch.tensor(1e-6)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite; got {value}")
    return value


def _check_tolerance(name: str, value: Any, y0: Tensor) -> float | Tensor:
    """A number, or per-component tolerances (SciML's vector ``abstol``, torchdiffeq's tensor
    ``atol``): a real tensor/sequence broadcastable to the state shape ``y0.shape[1:]``,
    returned as a ``(1, *state_shape)`` tensor of ``y0``'s dtype and device (one tolerance per
    component, the same for every sample)."""
    if isinstance(value, (list, tuple)) and not isinstance(value, bool):
        try:
            value = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a number or a sequence/tensor of numbers; got {value!r}") from e
    if not isinstance(value, Tensor) or value.numel() == 1:
        return _check_positive(name, value, allow_zero=True)
    if value.is_complex() or value.dtype == torch.bool or value.requires_grad:
        raise TypeError(f"{name} must be a real tensor without gradient; got dtype {value.dtype}")
    state_shape = tuple(y0.shape[1:])
    try:
        tol = torch.broadcast_to(value, state_shape)
    except RuntimeError as e:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to the state shape {state_shape} "
            "(per-component tolerances are one per state component, the same for every sample)"
        ) from e
    tol = tol.detach().to(dtype=y0.dtype, device=y0.device)
    if not bool(torch.isfinite(tol).all()) or bool((tol < 0).any()):
        raise ValueError(f"{name} must be non-negative and finite in every component; got {value.tolist()}")
    return tol.unsqueeze(0)


def _as_times(value: Any, name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """``value`` (a 1-D sequence/tensor of finite times) as ``(given, float64 times)``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise TypeError(f"{name} must be a 1-D sequence/tensor of times (use [t] for one time)")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D sequence/tensor of times; got {value!r}")
    try:
        given = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence/tensor of times; got {type(value).__name__}") from exc
    if not (given.is_floating_point() or given.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers; got dtype {given.dtype}")
    times = given.to(device=device, dtype=torch.float64)
    if times.ndim != 1 or times.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of times; got shape {tuple(times.shape)}")
    if not bool(torch.isfinite(times).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return given, times


def _check_tstops(tstops: Any, t0: float, t1: float) -> tuple[float, ...]:
    """``tstops`` as floats inside tspan (any order; the engine sorts them)."""
    if tstops is None:
        return ()
    _, times = _as_times(tstops, "tstops", torch.device("cpu"))
    a, b = min(t0, t1), max(t0, t1)
    lo, hi = float(times.min()), float(times.max())
    if lo < a or hi > b:
        raise ValueError(f"tstops must lie inside tspan [{a}, {b}]; got times in [{lo}, {hi}]")
    return tuple(times.tolist())


def _check_saveat(saveat: Any, t0: float, t1: float, device: torch.device) -> Tensor:
    if saveat is None:
        return torch.tensor([t0, t1], dtype=torch.float64, device=device)
    given, times = _as_times(saveat, "saveat", device)
    a, b = min(t0, t1), max(t0, t1)
    span = b - a
    # times given in a lower precision (float32 saveat on a float32 problem) are compared
    # with the span's ends to within their own rounding: |t| * eps of their dtype
    eps = torch.finfo(given.dtype).eps if given.is_floating_point() else 0.0
    slack = max(1e-12 * span, 2 * eps * max(abs(t0), abs(t1)))
    lo, hi = float(times.min()), float(times.max())
    if lo < a - slack or hi > b + slack:
        raise ValueError(f"saveat must lie inside tspan [{a}, {b}]; got times in [{lo}, {hi}]")
    sign = 1.0 if t1 > t0 else -1.0
    if times.numel() > 1 and not bool((sign * (times[1:] - times[:-1]) > 0).all()):
        raise ValueError(
            "saveat must be strictly increasing"
            if sign > 0
            else "saveat must be strictly decreasing when time runs backwards (t1 < t0)"
        )
    times = times.clamp(a, b)
    if float(times[0]) != t0:
        # integration starts at t0; the caller gets only the requested times back
        times = torch.cat([torch.tensor([t0], dtype=torch.float64, device=device), times])
    return times


def _check_brownian(
    brownian: Any, problem: SDEProblem, seed: int, dtmin: float | None = None, sample_offset: int = 0
) -> VirtualBrownianTree:
    t0, t1 = problem.tspan
    shape = (problem.batch_size, *problem.noise_shape)
    t0, t1 = min(t0, t1), max(t0, t1)  # the tree covers the span whichever way time runs
    if brownian is None:  # resolution: solve_tol (exact for every step >= dtmin when dtmin is given)
        return VirtualBrownianTree(
            t0,
            t1,
            shape,
            seed=seed,
            tol=solve_tol(t0, t1, dtmin),
            dtype=problem.y0.dtype,
            device=problem.y0.device,
            sample_offset=sample_offset,
        )
    if not isinstance(brownian, VirtualBrownianTree):
        raise TypeError(f"brownian must be a deb.VirtualBrownianTree; got {type(brownian).__name__}")
    if sample_offset != 0:
        raise ValueError("sample_offset is for the tree solve() makes; pass it to the VirtualBrownianTree given as brownian")
    if tuple(brownian.shape) != shape:
        raise ValueError(f"brownian has shape {tuple(brownian.shape)}; this problem needs (B, *noise_shape) = {shape}")
    if torch.finfo(brownian.dtype).eps > torch.finfo(problem.y0.dtype).eps:
        raise ValueError(
            f"brownian has dtype {brownian.dtype}, less precise than this problem's y0 ({problem.y0.dtype}); "
            f"pass dtype={problem.y0.dtype} to VirtualBrownianTree"
        )
    if brownian.device != problem.y0.device:
        raise ValueError(f"brownian is on {brownian.device}; this problem's y0 is on {problem.y0.device}")
    if brownian.t0 > t0 or brownian.t1 < t1:
        raise ValueError(f"brownian covers [{brownian.t0}, {brownian.t1}], which does not contain tspan {problem.tspan}")
    return brownian


def _wants_time_gradients(prob: ODEProblem, saveat: Any) -> bool:
    """Whether an ODE solve was given times that require grad (tspan entries or ``saveat``)."""
    if not torch.is_grad_enabled():
        return False
    given = getattr(prob, "time_tensors", (None, None))
    return any(t is not None for t in given) or (isinstance(saveat, Tensor) and saveat.requires_grad)


def _solve_with_time_gradients(given: dict[str, Any]) -> Solution:
    """:func:`solve` for an ODE whose times require grad: solve with detached times, with
    ``y0`` shifted by ``-(t0 - stop_grad(t0)) f(t0, y0)`` (zero in value; ``dy(t)/dt0 =
    -(dy(t)/dy0) f(t0, y0)``), then add ``(t_k - stop_grad(t_k)) f(t_k, y_k)`` to each save
    (``dy(t_k)/dt_k = f(t_k, y_k)``).  Costs one evaluation of ``f`` for ``t0`` and one per
    differentiable save time (not counted in ``stats.nf``)."""
    import copy

    prob, saveat = given["prob"], given["saveat"]
    t0_grad, t1_grad = prob.time_tensors
    y0, batch = prob.y0, prob.batch_size

    def field_at(t: Tensor, y: Tensor) -> Tensor:
        tt = torch.full((batch,), float(t.detach()), dtype=torch.float64, device=y.device)
        return prob.drift(tt, y).to(y.dtype)

    def zero_with_grad(t: Tensor, like: Tensor) -> Tensor:
        return (t - t.detach()).to(device=like.device, dtype=like.dtype)

    shifted = copy.copy(prob)
    shifted.time_tensors = (None, None)
    if t0_grad is not None:
        shifted.y0 = y0 - zero_with_grad(t0_grad, y0) * field_at(t0_grad, y0)
    detached_saveat = saveat.detach() if isinstance(saveat, Tensor) else saveat
    sol = solve(**{**given, "prob": shifted, "saveat": detached_saveat})
    if isinstance(saveat, Tensor) and saveat.requires_grad:
        save_grads: list[Tensor | None] = list(saveat.reshape(-1).unbind())
    elif saveat is None:
        save_grads = [t0_grad, t1_grad]
    else:
        save_grads = [None] * sol.ts.shape[0]
    if len(save_grads) == sol.ys.shape[0] and any(t is not None for t in save_grads):
        sol.ys = torch.stack(
            [y if t is None else y + zero_with_grad(t, y) * field_at(t, y) for t, y in zip(save_grads, sol.ys.unbind())]
        )
    return sol


def solve(
    prob: ODEProblem,
    alg: AbstractSolver | None = None,
    dt: float | None = None,
    adaptive: bool | None = None,
    atol: float | Tensor | Sequence[float] | None = None,
    rtol: float | Tensor | Sequence[float] | None = None,
    saveat: Sequence[float] | Tensor | None = None,
    seed: int = 0,
    brownian: VirtualBrownianTree | None = None,
    max_steps: int = 100_000,
    dtmin: float | None = None,
    backend: str = "auto",
    sensealg: Any = None,
    progress: bool = False,
    check_every: int | None = None,
    regularize: Any = None,
    alg_hints: Sequence[str] | None = None,
    sample_offset: int = 0,
    dense: bool = False,
    events: Any = None,
    compile: bool = False,
    compact: float = 0.0,
    tstops: Sequence[float] | Tensor | None = None,
) -> Solution:
    """Solve an SDE or ODE problem for every sample of the batch.

    Args:
        prob: :class:`SDEProblem` or :class:`ODEProblem` with ``y0`` of shape ``(B, *state_shape)``.
        alg: a solver instance (``deb.SOSRI()``...); ``None``: :func:`default_algorithm` (the measured winner per noise type).
        dt: initial step for adaptive solvers, the step for fixed-step ones.
        adaptive: defaults to True for solvers with an error estimate.
        atol, rtol: tolerances (SDE default ``1e-2``/``1e-2``, ODE ``1e-6``/``1e-3``): numbers, or
            per-component tensors/lists broadcastable to the state shape ``y0.shape[1:]`` (one
            tolerance per component, the same for every sample; native backend only).
        saveat: 1-D times every sample is saved at; ``None`` -> ``(t0, t1)``.  Adaptive ODE
            solves step freely and fill the save times from the solver's interpolant
            (:mod:`diffeqbridge.dense`; Tsit5/Dopri5 4th order, Rodas4 3rd, cubic Hermite for
            the other ODE solvers); SDE and fixed-step solves step onto every save time, a
            fixed-step one saving at its grid point when that lies within rounding
            (:func:`diffeqbridge.engine.snap_tolerance`) of the save time (docs/engine.md, "Saving").
        tstops: times every sample's steps land on (SciML's ``tstops``: discontinuities of the
            fields; pass ``tstops=saveat`` to have an adaptive ODE solve step onto its save
            times rather than interpolate them); exactly, except that a fixed-step solve snaps
            a time within rounding of its grid point as it does save times.  Times outside
            tspan are refused; ones past the last save time are not reached.  ODEs (not
            ``compile=True``): a stop strictly inside the span is a jump of ``f``, as
            torchdiffeq's ``jump_t``: the step lands one float64 spacing before it and the next
            starts one spacing after it with ``f`` re-evaluated there, so no stage sees the
            stop itself (:meth:`diffeqbridge.engine.Integrator._one_sided_stops`; one more ``f`` per stop).
        seed: seed of the Brownian tree made when ``brownian`` is None.
        brownian: a :class:`VirtualBrownianTree` of shape ``(B, *noise_shape)``.
        max_steps: per-sample limit on attempted steps (-> ``ReturnCode.MaxIters``).
        dtmin: smallest step before ``ReturnCode.DtLessThanMin`` (default, as SciML: the
            float64 spacing at ``max(|t0|, 1)``; a step below the spacing at the sample's own
            time also stops it).
            Given explicitly, it is also the resolution of the Brownian tree made when
            ``brownian`` is None, so its law is exact for every step the solve can take
            (:func:`diffeqbridge.brownian.solve_tol`).
        backend: ``"auto"`` | ``"native"`` | ``"julia"``.
        sensealg: how gradients are computed: ``deb.DiscreteAdjoint(checkpoints=k)``,
            ``deb.BacksolveAdjoint()``, ``deb.InterpolatingAdjoint(checkpoints=k)`` (see
            :mod:`diffeqbridge.adjoint`), or ``None``: chosen by problem size as
            SciMLSensitivity does (``ForwardDiffSensitivity`` for ``length(u0) + length(p) <= 100``,
            an adjoint above), by :func:`diffeqbridge.adjoint.default_sensealg`:
            ``DiscreteAdjoint()`` (backprop through the steps) when ``y0.numel()`` plus the
            parameters' size is at most 100, and above that too unless the autograd graph of a
            fixed-step solve is estimated above ``GRAPH_BUDGET_BYTES`` (1 GiB) -- then
            ``InterpolatingAdjoint(checkpoints=k)``, or ``BacksolveAdjoint()`` (exact, O(1)
            memory) for a reversible solver (``ReversibleHeun``).  No gradient wanted
            (``torch.no_grad``): a plain solve.
        progress: show a progress bar.
        check_every: the engine checks whether every sample has finished once per this many
            loop iterations (a host synchronisation).  Default: 1 on the CPU (a check is
            free there, and the loop stops right after the slowest sample's last step), 8 on
            accelerators (fewer stalls; up to 7 masked iterations at the end).  With
            ``compile=True`` one compiled call runs this many iterations where the loop saves
            inside the graph (docs/engine.md; e.g. 8: fewer calls' overhead, more compile time).
        regularize: ``None`` or a solver-heuristic regularizer, ``deb.Regularization(...)`` or
            its kind as a string (``"error"``, ``"stiffness"``, ``"local_error"``,
            ``"local_stiffness"``); the solution then carries ``sol.regularization``, a
            differentiable ``(B,)`` tensor (see :mod:`diffeqbridge.regularization`).
        alg_hints: SciML's hints for ``alg=None``: ``["stiff"]`` picks an implicit solver as
            SciML's ``default_sde_alg``/``default_ode_alg`` would (see :func:`default_algorithm`);
            ``"auto"`` keeps the default choice; ``"nonstiff"`` drops the SDE default's stiff partner.
        sample_offset: global index of the batch's first sample in the Brownian tree made when
            ``brownian`` is None: sample ``i`` of this batch draws the path of sample
            ``sample_offset + i`` (how :func:`diffeqbridge.solve_ensemble` splits an ensemble
            into batches that reproduce one big batch bit for bit).
        dense: record every accepted step's interpolant: ``sol(t)`` / ``sol.evaluate(t)``
            anywhere in the span (:mod:`diffeqbridge.dense`: the solvers' interpolants and
            their orders, shapes, memory).  Gradients: plain backprop / ``DiscreteAdjoint()``
            only (other sensealgs are refused when ``y0``, the parameters or the times require
            grad: ``sol(t)`` would carry none).
        events: a list of ``deb.ContinuousEvent`` / ``deb.DiscreteEvent``
            (:mod:`diffeqbridge.events`): per-sample root location, ``affect``, termination with
            ``ReturnCode.Terminated``; ``sol.events`` and ``sol.stats.extra["nevents"]``,
            ``["event_time"]``.  Gradients: plain backprop / ``DiscreteAdjoint()`` only.
        compile: run each iteration's tensor math (solver step with the user's functions,
            error norm, accept decision) through ``torch.compile``, compiled once per
            (solver type, state shape, dtype, device); native backend only.  A solver that
            cannot be traced runs eagerly after a one-time warning.  Costs a compilation per
            new key and may change results in the last bits (docs/engine.md, "compile=True").
        compact: when the fraction of samples still running falls below this (checked every
            ``check_every`` iterations), the loop continues on the running samples only
            (``0``: never; ``0.8`` measured best for B >= 1024, docs/engine.md).  ODEs and
            SDEs (each sample keeps its Brownian path); results, stats and gradients are
            bit-identical to the masked loop.  Requires that row ``i`` of ``drift``/``diffusion``
            depend only on row ``i`` of ``t`` and ``y``: checked at each compaction (two calls
            of each field); fields that capture per-sample tensors or couple samples, events,
            dense output, regularizers, solvers whose step couples samples (Newton iterations
            until the whole batch converged) and ``compile=True`` keep the masked loop, with a
            ``RuntimeWarning`` naming the reason.

    Returns:
        :class:`Solution` with ``ts (T,)``, ``ys (T, B, *state_shape)``, per-sample stats/retcodes.
        ODEs: where ``tspan``'s entries or ``saveat`` are tensors that require grad, ``ys`` is
        differentiable in them too (as torchdiffeq's ``odeint`` in ``t``): ``dy(t_k)/dt_k =
        f(t_k, y(t_k))`` and ``dy(t)/dt0 = -(dy(t)/dy0) f(t0, y0)``.
    """
    given = dict(locals())
    if isinstance(prob, ODEProblem) and not prob.is_sde and _wants_time_gradients(prob, saveat):
        return _solve_with_time_gradients(given)
    if not isinstance(prob, ODEProblem):
        raise TypeError(f"prob must be a deb.SDEProblem or deb.ODEProblem; got {type(prob).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool; got {compile!r}")
    if compile and backend == "julia":
        raise ValueError("compile=True runs on the native backend only; use backend='native' or 'auto'")
    if isinstance(compact, bool) or not isinstance(compact, (int, float)) or not 0 <= compact < 1:
        raise ValueError(f"compact must be a number in [0, 1); got {compact!r}")
    if backend == "julia":
        from .julia import require_julia

        require_julia()
    if dt is not None:
        dt = _check_positive("dt", dt)
    hints = _check_alg_hints(alg_hints)
    if alg is not None:
        solver = _check_solver(prob, alg)
    elif backend == "julia" and prob.is_sde and "stiff" not in hints:
        solver = _sciml_default_sde(prob, dt)
    else:
        solver = default_algorithm(prob, dt, hints)
    if adaptive is None:
        adaptive = solver.adaptive
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be a bool or None; got {adaptive!r}")
    if adaptive and not solver.adaptive:
        raise ValueError(f"adaptive=True but alg={type(solver).__name__} has no error estimate; pass dt and adaptive=None")
    # --- sensealg (gradients): validated here, run by adjoint.solve_with_sensealg below
    from .adjoint import check_sensealg

    sensealg = check_sensealg(sensealg, prob, solver, adaptive)
    from .regularization import Recorder, check_regularize

    seed = check_seed(seed)
    sample_offset = check_seed(sample_offset, "sample_offset")
    # --- dense output / events (diffeqbridge.dense, diffeqbridge.events): native engine observers
    from .events import check_events

    if not isinstance(dense, bool):
        raise TypeError(f"dense must be a bool; got {dense!r}")
    event_list = check_events(events, solver)
    hooked = dense or bool(event_list)
    if (hooked or sample_offset) and backend == "julia":
        raise ValueError("dense=True, events= and sample_offset= run on the native backend only; use backend='native' or 'auto'")
    if tstops is not None and backend == "julia":
        raise ValueError("tstops= runs on the native backend only; use backend='native' or 'auto'")
    hooked_or_offset = (
        hooked or sample_offset != 0 or compile or compact > 0 or tstops is not None
    )  # native only: the julia backend has none of them
    backprop = sensealg is None or (isinstance(sensealg, DiscreteAdjoint) and sensealg.checkpoints is None)
    if event_list and not backprop:
        raise ValueError(
            f"events= supports gradients by backprop through the steps only (sensealg=None or "
            f"deb.DiscreteAdjoint()); got sensealg={sensealg!r}"
        )
    wants_gradients = torch.is_grad_enabled() and (
        prob.y0.requires_grad or any(p.requires_grad for p in prob.params) or _wants_time_gradients(prob, saveat)
    )
    if dense and not backprop and wants_gradients:
        # the other sensealgs solve the forward without a graph: sol(t) would carry no gradient
        raise ValueError(
            f"dense=True: sol(t) is differentiable by backprop through the steps only (sensealg=None or "
            f"deb.DiscreteAdjoint()); got sensealg={sensealg!r} with y0/params that require grad. Solve "
            f"under torch.no_grad() (or with detached inputs) for a dense output without gradients"
        )
    regularize = check_regularize(regularize, prob, solver, adaptive, sensealg, seed)
    if regularize is not None and prob.tspan[1] < prob.tspan[0]:
        raise ValueError("regularize= needs time running forwards (tspan with t1 > t0)")
    atol = _check_tolerance("atol", atol if atol is not None else (1e-2 if prob.is_sde else 1e-6), prob.y0)
    rtol = _check_tolerance("rtol", rtol if rtol is not None else (1e-2 if prob.is_sde else 1e-3), prob.y0)
    if adaptive and bool((torch.as_tensor(atol) + torch.as_tensor(rtol) == 0).any()):
        raise ValueError("atol and rtol cannot both be zero (in any component) for an adaptive solve")
    per_component_tolerances = isinstance(atol, Tensor) or isinstance(rtol, Tensor)
    if per_component_tolerances and backend == "julia":
        raise ValueError("per-component atol/rtol run on the native backend only; use backend='native' or 'auto'")
    if not adaptive and dt is None:
        raise ValueError(f"alg={type(solver).__name__} is a fixed-step solver (or adaptive=False): pass dt")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int; got {max_steps!r}")
    t0, t1 = prob.tspan
    span = abs(t1 - t0)
    # SciML's default (DiffEqBase.prob2dtmin(prob; use_end_time=false)): the spacing of
    # float64 at max(|t0|, 1); the engine also stops a sample whose step falls below the
    # spacing at its own time (timedepentdtmin), so long spans (Robertson to 1e11) work
    dtmin_value = math.ulp(max(abs(t0), 1.0)) if dtmin is None else _check_positive("dtmin", dtmin, allow_zero=True)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool; got {progress!r}")
    device = prob.y0.device
    save_times = _check_saveat(saveat, t0, t1, device)
    stop_times = _check_tstops(tstops, t0, t1)
    requested_first = saveat is None or save_times.numel() == torch.as_tensor(saveat).numel()
    if not prob.is_sde and brownian is not None:
        raise ValueError("brownian= was given for an ODEProblem, which has no noise; drop it (or make an SDEProblem)")
    tree = _check_brownian(brownian, prob, seed, dtmin, sample_offset) if prob.is_sde else None

    terms = Terms(prob)
    batch = prob.batch_size
    t_start = torch.full((batch,), t0, dtype=torch.float64, device=device)
    # the fields at (t0, y0) where the start-up needs them: the first step size, FSAL's f0, the
    # additive-noise check (whose g0 the carrying solvers start from), a solver's init; else the
    # first step evaluates them where its tableau does (ShARK never does) and Terms checks them
    need_start = dt is None or solver.init_uses_start
    f0, g0 = _start_up_fields(prob, t_start, need_start or solver.fsal, need_start or getattr(prob, "noise", None) == "additive")
    extra_g = check_additive(prob, t_start, g0) if g0 is not None else 0
    if (
        backend != "native" and not hooked_or_offset and not per_component_tolerances
    ):  # julia backend (diffeqbridge/julia/); "auto" picks it only if installed
        from .julia.dispatch import choose_backend

        if choose_backend(backend, prob, solver, brownian, sensealg, regularize) == "julia":
            from .julia.backend import solve_julia

            _start_up_fields(prob, t_start, f0 is None, g0 is None)  # the shape checks before julia runs

            sol = solve_julia(
                prob,
                solver,
                dt=dt,
                adaptive=adaptive,
                atol=float(atol),
                rtol=float(rtol),
                save_times=save_times,
                seed=seed,
                max_steps=max_steps,
                dtmin=dtmin_value,
                sensealg=sensealg,
            )
            if not requested_first:
                sol.ts, sol.ys = sol.ts[1:], sol.ys[1:]
            return sol
    counts = (int(f0 is not None), int(g0 is not None) + extra_g)

    dt_initial, extra_f, extra_g = initial_dt(
        terms, solver, t_start, prob.y0, f0, g0, atol, rtol, span, 1.0 if t1 > t0 else -1.0, dt, dtmin_value
    )
    counts = (counts[0] + extra_f, counts[1] + extra_g)
    terms.tolerances = (atol, rtol) if adaptive else None
    options = EngineOptions(
        adaptive=adaptive,
        atol=atol,
        rtol=rtol,
        max_steps=max_steps,
        dtmin=dtmin_value,
        progress=progress,
        check_every=_check_every(check_every, device),
        compile=compile,
        compact=float(compact),
        tstops=stop_times,
    )
    if sensealg is None and (regularize is None or regularize.is_local):
        # a global regularizer needs the graph of every step: keep plain backprop
        from .adjoint import default_sensealg

        sensealg = default_sensealg(prob, solver, adaptive, dt)
        if (event_list or dense) and sensealg is not None:
            # events move samples inside steps, sol(t) keeps the steps' graph: backprop through them
            sensealg = DiscreteAdjoint()
    recorder = None if regularize is None else Recorder(regularize, terms, solver, prob.y0, t0, t1, atol, rtol)
    observer: Any = recorder
    handler = dense_recorder = None
    if hooked:
        from .dense import DenseRecorder
        from .events import EventHandler, Hooks

        handler = EventHandler(event_list, terms, solver, prob.y0, t0, prob.is_sde) if event_list else None
        dense_recorder = DenseRecorder(solver, prob.y0, t0, t1) if dense else None
        observer = Hooks([recorder], handler, dense_recorder)
    if sensealg is not None:
        from .adjoint import solve_with_sensealg

        sol = solve_with_sensealg(
            sensealg,
            prob,
            terms,
            solver,
            save_times,
            dt_initial,
            options,
            tree,
            f0=f0 if solver.fsal else None,
            initial_counts=counts,
            observer=observer,
            start_values=(f0, g0),
        )
    else:
        sol = integrate(
            terms,
            solver,
            prob.y0,
            save_times,
            dt_initial,
            options,
            tree,
            f0=f0 if solver.fsal else None,
            initial_counts=counts,
            observer=observer,
            start_values=(f0, g0),
        )
    if dense_recorder is not None:
        sol.interpolation = dense_recorder.finish()
    if handler is not None:
        sol.events, extra_events = handler.finish(prob.y0)
        sol.stats.extra.update(extra_events)
        sol.stats.nf = sol.stats.nf + handler.nf
    if recorder is not None:
        sol.regularization, extra = recorder.finish(tree)
        sol.stats.extra.update(extra)
    if not requested_first:
        sol.ts, sol.ys = sol.ts[1:], sol.ys[1:]
    return sol
