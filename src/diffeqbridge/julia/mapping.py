"""Pure mapping from diffeqbridge objects to *descriptions* of SciML calls (no Julia needed).

Every function here returns plain data (dataclasses of Julia names and keyword arguments) that
``bridge``/``solve`` hand to the Julia side (``julia/DiffEqBridge``), so the whole translation
is unit-tested without Julia:

* :func:`algorithm_spec`: solver object -> SciML algorithm name + keywords
  (``deb.SOSRI()`` -> ``SOSRI()``, ``deb.RKMil()`` on a Stratonovich problem ->
  ``RKMil(interpretation = SciMLBase.AlgorithmInterpretation.Stratonovich)``, ...);
* :func:`noise_spec`: noise type -> how the ``SDEProblem`` is built (scalar noise:
  ``noise = WienerProcess(t0, 0.0, 0.0)``; general noise: ``noise_rate_prototype = zeros(n, m)``);
* :func:`solve_kwargs`: tolerances, ``saveat``, ``dt``/``adaptive``, ``maxiters``, ``dtmin``;
* :func:`sensealg_spec`: ``deb.InterpolatingAdjoint``/``deb.BacksolveAdjoint`` -> SciMLSensitivity's
  ``InterpolatingAdjoint(autojacvec = ZygoteVJP(), ...)``/``BacksolveAdjoint(...)``; never ``nothing``;
* :func:`retcode_from_julia`: ``SciMLBase.ReturnCode`` name -> :class:`diffeqbridge.ReturnCode`;
* :func:`trajectory_seed`: the per-trajectory seed of an ensemble.

Names and keywords were taken from the sources: StochasticDiffEq ``src/algorithms.jl``
(``RKMil(; interpretation = SciMLBase.AlgorithmInterpretation.Ito)``), SciMLSensitivity
``src/sensitivity_algorithms.jl`` (``InterpolatingAdjoint(; autojacvec, checkpointing,
noisemixing)``, ``BacksolveAdjoint(; autojacvec, checkpointing = true, noisemixing = false)``,
``ZygoteVJP(; allow_nothing = false)``), SciMLBase ``src/retcodes.jl`` (the ``ReturnCode`` enum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..solution import ReturnCode

__all__ = [
    "ALGORITHMS",
    "RETCODES",
    "AlgorithmSpec",
    "NoiseSpec",
    "SensealgSpec",
    "UnsupportedOnJulia",
    "algorithm_spec",
    "noise_spec",
    "retcode_from_julia",
    "sensealg_spec",
    "solve_kwargs",
    "trajectory_seed",
]


class UnsupportedOnJulia(ValueError):
    """The request has no counterpart on the julia backend (raised before Julia is touched)."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """A SciML algorithm: ``name(; kwargs...)`` exported by ``package``."""

    name: str
    package: str
    is_sde: bool
    kwargs: dict[str, Any] = field(default_factory=dict)

    def julia_source(self) -> str:
        """The Julia expression this spec stands for (for messages and docs)."""
        args = ", ".join(f"{k} = {_julia_literal(v)}" for k, v in sorted(self.kwargs.items()))
        return f"{self.name}({'; ' + args if args else ''})"


def _julia_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if value in ("ito", "stratonovich"):
            return "SciMLBase.AlgorithmInterpretation." + value.capitalize()
        if value == "finitediff":
            return "AutoFiniteDiff()"
        return repr(value)
    return repr(value)


# diffeqbridge class name -> (SciML name, Julia package).  Dopri5 is OrdinaryDiffEq's DP5.
ALGORITHMS: dict[str, tuple[str, str]] = {
    "EM": ("EM", "StochasticDiffEq"),
    "EulerHeun": ("EulerHeun", "StochasticDiffEq"),
    "LambaEM": ("LambaEM", "StochasticDiffEq"),
    "LambaEulerHeun": ("LambaEulerHeun", "StochasticDiffEq"),
    "RKMil": ("RKMil", "StochasticDiffEq"),
    "SRIW1": ("SRIW1", "StochasticDiffEq"),
    "SOSRI": ("SOSRI", "StochasticDiffEq"),
    "SRA1": ("SRA1", "StochasticDiffEq"),
    "SRA3": ("SRA3", "StochasticDiffEq"),
    "SOSRA": ("SOSRA", "StochasticDiffEq"),
    "ImplicitEM": ("ImplicitEM", "StochasticDiffEq"),
    "ImplicitRKMil": ("ImplicitRKMil", "StochasticDiffEq"),
    "ISSEM": ("ISSEM", "StochasticDiffEq"),
    "SKenCarp": ("SKenCarp", "StochasticDiffEq"),
    "SROCK1": ("SROCK1", "StochasticDiffEq"),  # Itô (SciML's default interpretation); stages chosen by SciML
    "Tsit5": ("Tsit5", "OrdinaryDiffEqTsit5"),
    "Dopri5": ("DP5", "OrdinaryDiffEqLowOrderRK"),
    "Rodas4": ("Rodas4", "OrdinaryDiffEqRosenbrock"),
    "Kvaerno5": ("Kvaerno5", "OrdinaryDiffEqSDIRK"),
}

#: Native solvers without a SciML counterpart, with the reason given when one is sent to Julia.
NATIVE_ONLY: dict[str, str] = {
    "ReversibleHeun": "StochasticDiffEq has no reversible Heun method (it is diffrax's / Kidger et al. 2021)",
    "ShARK": "StochasticDiffEq has no ShARK (Foster, dos Reis, Strange 2023; use SRA1/SOSRA)",
    "SRA4": "StochasticDiffEq has no SRA4 (diffeqbridge's own tableau; use SRA3 or SOSRA)",
    "SRA5": "StochasticDiffEq has no SRA5 (diffeqbridge's own tableau; use SRA3 or SOSRA)",
    "SPaRK": "StochasticDiffEq has no SPaRK (Foster 2023; use RKMil/LambaEulerHeun for Stratonovich, SRIW1/SOSRI for Itô)",
}

#: Methods that build a Jacobian: with Python callbacks they must not use ForwardDiff
#: (dual numbers would be pushed into Python), so they get ``autodiff = AutoFiniteDiff()``.
_JACOBIAN_METHODS = frozenset({"ImplicitEM", "ImplicitRKMil", "ISSEM", "SKenCarp", "Rodas4", "Kvaerno5"})


def algorithm_spec(solver: Any, interpretation: str = "ito", python_callbacks: bool = True) -> AlgorithmSpec:
    """The SciML algorithm for a diffeqbridge solver object.

    ``interpretation`` is the problem's (``RKMil``/``ImplicitRKMil`` take it as a keyword; the
    other methods have a fixed calculus that ``solve`` already checked).  Raises
    :class:`UnsupportedOnJulia` for solvers without a SciML counterpart here.
    """
    cls = type(solver).__name__
    if cls not in ALGORITHMS:
        why = f" ({NATIVE_ONLY[cls]})" if cls in NATIVE_ONLY else ""
        raise UnsupportedOnJulia(
            f"alg={cls} has no SciML counterpart in the julia backend{why}; supported: {', '.join(ALGORITHMS)}; "
            f"or use backend='native'"
        )
    name, package = ALGORITHMS[cls]
    kwargs: dict[str, Any] = {}
    if cls in ("RKMil", "ImplicitRKMil"):
        kwargs["interpretation"] = interpretation
    theta = getattr(solver, "theta", None)
    if cls in ("ImplicitEM", "ImplicitRKMil", "ISSEM") and theta is not None:
        kwargs["theta"] = float(theta)
    if cls == "SKenCarp":  # StochasticDiffEq's ode_error_est / smooth_est switches
        kwargs["ode_error_est"] = getattr(solver, "error_estimate", "embedded") == "embedded"
        kwargs["smooth_est"] = bool(getattr(solver, "smooth_est", True))
    if python_callbacks and cls in _JACOBIAN_METHODS:
        kwargs["autodiff"] = "finitediff"
    return AlgorithmSpec(name=name, package=package, is_sde=bool(getattr(solver, "is_sde", True)), kwargs=kwargs)


@dataclass(frozen=True)
class NoiseSpec:
    """How the ``SDEProblem`` is built for a noise type (state flattened to ``n`` components).

    ``prototype``: ``(n, m)`` for general noise (``noise_rate_prototype = zeros(n, m)``);
    ``scalar_wiener``: pass ``noise = WienerProcess(t0, 0.0, 0.0)`` (one Wiener process shared
    by all components; ``g`` returns ``u``'s shape).  Diagonal and additive noise need neither.
    """

    kind: str
    prototype: tuple[int, int] | None = None
    scalar_wiener: bool = False


def noise_spec(noise: str, n: int, noise_dim: int | None = None) -> NoiseSpec:
    if noise == "general":
        if noise_dim is None or noise_dim < 1:
            raise ValueError("noise='general' needs noise_dim")
        return NoiseSpec("general", prototype=(int(n), int(noise_dim)))
    if noise == "scalar":
        return NoiseSpec("scalar", scalar_wiener=True)
    if noise in ("diagonal", "additive"):
        return NoiseSpec(noise)
    raise ValueError(f"unknown noise type {noise!r}")


def solve_kwargs(
    *, atol: float, rtol: float, saveat: list[float], max_steps: int, dtmin: float, dt: float | None, adaptive: bool
) -> dict[str, Any]:
    """Common solve keywords (SciML names): ``abstol``, ``reltol``, ``saveat``, ``maxiters``,
    ``dtmin``, ``adaptive`` and ``dt`` (only when given).  ``save_start``/``save_end`` are
    implied by ``saveat`` containing ``t0``/``t1``."""
    kwargs: dict[str, Any] = {
        "abstol": float(atol),
        "reltol": float(rtol),
        "saveat": [float(t) for t in saveat],
        "maxiters": int(max_steps),
        "dtmin": float(dtmin),
        "adaptive": bool(adaptive),
    }
    if dt is not None:
        kwargs["dt"] = float(dt)
    return kwargs


@dataclass(frozen=True)
class SensealgSpec:
    """A SciMLSensitivity adjoint, always with an explicit ``autojacvec`` (never ``nothing``)."""

    name: str
    autojacvec: str = "ZygoteVJP"
    checkpointing: bool = False
    noisemixing: bool = False

    def julia_source(self) -> str:
        kw = f"autojacvec = {self.autojacvec}(), checkpointing = {str(self.checkpointing).lower()}"
        if self.noisemixing:
            kw += ", noisemixing = true"
        return f"{self.name}({kw})"


def sensealg_spec(sensealg: Any, is_sde: bool, noise: str | None) -> SensealgSpec:
    """SciMLSensitivity adjoint for a diffeqbridge sensealg (``None`` -> the julia default).

    Default: ``InterpolatingAdjoint(autojacvec = ZygoteVJP())`` for ODEs,
    ``BacksolveAdjoint(autojacvec = ZygoteVJP(), checkpointing = true)`` for SDEs.
    ``noisemixing = true`` whenever ``g`` may couple components (every non-additive noise
    type: diagonal ``g_i`` may read other components, scalar and general noise mix by
    construction); it costs extra VJPs and is never wrong.  ``deb.DiscreteAdjoint`` has no
    counterpart that keeps Python out of the AD trace (ReverseDiff/Tracker would send tracked
    numbers into the callbacks): refused.
    """
    from ..adjoint import BacksolveAdjoint, DiscreteAdjoint, InterpolatingAdjoint

    mixing = bool(is_sde and noise != "additive")
    if sensealg is None:
        if is_sde:
            return SensealgSpec("BacksolveAdjoint", checkpointing=True, noisemixing=mixing)
        return SensealgSpec("InterpolatingAdjoint")
    if isinstance(sensealg, InterpolatingAdjoint):
        return SensealgSpec("InterpolatingAdjoint", checkpointing=sensealg.checkpoints is not None, noisemixing=mixing)
    if isinstance(sensealg, BacksolveAdjoint):
        return SensealgSpec("BacksolveAdjoint", checkpointing=bool(sensealg.checkpointing), noisemixing=mixing)
    if isinstance(sensealg, DiscreteAdjoint):
        raise UnsupportedOnJulia(
            "sensealg=DiscreteAdjoint is native-only: on the julia backend use deb.InterpolatingAdjoint() "
            "or deb.BacksolveAdjoint() (SciMLSensitivity adjoints with ZygoteVJP), or backend='native'"
        )
    raise UnsupportedOnJulia(f"sensealg={sensealg!r} has no julia counterpart")


#: SciMLBase.ReturnCode name -> diffeqbridge ReturnCode.  Terminated keeps its name; other successful codes (Success,
#: ExactSolution*, FloatingPointLimit) map to Success; DtNaN (the step became
#: NaN) to Unstable; anything unknown to Failure.
RETCODES: dict[str, ReturnCode] = {
    "Default": ReturnCode.Default,
    "Success": ReturnCode.Success,
    "Terminated": ReturnCode.Terminated,
    "ExactSolutionLeft": ReturnCode.Success,
    "ExactSolutionRight": ReturnCode.Success,
    "FloatingPointLimit": ReturnCode.Success,
    "MaxIters": ReturnCode.MaxIters,
    "DtLessThanMin": ReturnCode.DtLessThanMin,
    "Unstable": ReturnCode.Unstable,
    "DtNaN": ReturnCode.Unstable,
    "ConvergenceFailure": ReturnCode.ConvergenceFailure,
    "InitialFailure": ReturnCode.Failure,
    "Failure": ReturnCode.Failure,
    "MaxTime": ReturnCode.Failure,
}


def retcode_from_julia(name: str) -> ReturnCode:
    """Map ``String(Symbol(sol.retcode))`` (e.g. ``"MaxIters"``) to :class:`ReturnCode`."""
    key = str(name).rsplit(".", 1)[-1]
    return RETCODES.get(key, ReturnCode.Failure)


def trajectory_seed(seed: int, i: int) -> int:
    """SciML seed of trajectory ``i`` (1-based) for ``deb.solve(seed=seed)``: ``seed * 2**32 + i``.

    Never 0 (StochasticDiffEq treats ``seed = 0`` as "draw a random seed"), distinct for every
    ``(seed, i)`` with ``i < 2**32``, and a sample's path does not depend on the batch size.
    """
    if seed < 0 or i < 1:
        raise ValueError("seed must be >= 0 and i >= 1")
    return (int(seed) * 2**32 + int(i)) % 2**64 or 1
