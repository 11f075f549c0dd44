"""diffeqbridge: SciML-grade SDE/ODE solving for PyTorch (and JAX).

Public names only; see DESIGN.md for the contract.
"""

# public submodules (deb.julia is light: juliacall is imported only when the backend is used)
from . import diffusion, distributed, interpolation, julia, noise
from .adjoint import BacksolveAdjoint, DiscreteAdjoint, InterpolatingAdjoint
from .brownian import VirtualBrownianTree
from .cde import NeuralCDE
from .ensemble import Collect, EnsembleProblem, EnsembleSolution, Moments, Quantiles, Reduction, solve_ensemble
from .events import ContinuousEvent, DiscreteEvent
from .latent import LatentSDE
from .neural import NeuralODE, NeuralSDE
from .problem import ODEProblem, SDEProblem
from .regularization import Regularization
from .solution import ReturnCode, Solution, Stats
from .solve import solve
from .solvers import (
    EM,
    ISSEM,
    SOSRA,
    SOSRI,
    SRA1,
    SRA3,
    SRA4,
    SRA5,
    SRIW1,
    SROCK1,
    AutoDP5,
    AutoSOSRI,
    AutoSwitch,
    AutoTsit5,
    Dopri5,
    EulerHeun,
    ImplicitEM,
    ImplicitRKMil,
    Kvaerno5,
    LambaEM,
    LambaEulerHeun,
    ReversibleHeun,
    RKMil,
    Rodas4,
    ShARK,
    SKenCarp,
    SPaRK,
    Tsit5,
)

__version__ = "0.1.0"

__all__ = [
    "diffusion",
    "distributed",
    "julia",
    "SDEProblem",
    "ODEProblem",
    "solve",
    "Solution",
    "ReturnCode",
    "Stats",
    "VirtualBrownianTree",
    "DiscreteAdjoint",
    "BacksolveAdjoint",
    "InterpolatingAdjoint",
    "NeuralSDE",
    "NeuralODE",
    "LatentSDE",
    "NeuralCDE",
    "interpolation",
    "noise",
    "Regularization",
    "ContinuousEvent",
    "DiscreteEvent",
    "EnsembleProblem",
    "EnsembleSolution",
    "solve_ensemble",
    "Reduction",
    "Moments",
    "Quantiles",
    "Collect",
    "EM",
    "EulerHeun",
    "RKMil",
    "LambaEM",
    "LambaEulerHeun",
    "SRIW1",
    "SOSRI",
    "SRA1",
    "SRA3",
    "SRA4",
    "SRA5",
    "SOSRA",
    "ShARK",
    "SPaRK",
    "Tsit5",
    "Dopri5",
    "ImplicitEM",
    "ImplicitRKMil",
    "ISSEM",
    "SKenCarp",
    "SROCK1",
    "Rodas4",
    "Kvaerno5",
    "ReversibleHeun",
    "AutoSwitch",
    "AutoTsit5",
    "AutoDP5",
    "AutoSOSRI",
]
