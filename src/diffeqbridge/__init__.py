"""diffeqbridge: SciML-grade SDE/ODE solving for PyTorch (and JAX).

Public names only; see DESIGN.md for the contract.
"""
from .adjoint import BacksolveAdjoint, DiscreteAdjoint, InterpolatingAdjoint
from . import julia  # light: julia_status etc.; juliacall is imported only on use
from .brownian import VirtualBrownianTree
from . import interpolation, noise
from .cde import NeuralCDE
from .latent import LatentSDE
from .neural import NeuralODE, NeuralSDE
from .problem import ODEProblem, SDEProblem
from .regularization import Regularization
from .solution import ReturnCode, Solution, Stats
from .solve import solve
from .solvers import (
    EM,
    AutoDP5,
    AutoSOSRI,
    AutoSwitch,
    AutoTsit5,
    ISSEM,
    SOSRA,
    SOSRI,
    SRA1,
    SRIW1,
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
    SKenCarp,
    SROCK1,
    Tsit5,
)

__version__ = "0.1.0"

__all__ = [
    "SDEProblem", "ODEProblem", "solve", "Solution", "ReturnCode", "Stats", "VirtualBrownianTree",
    "DiscreteAdjoint", "BacksolveAdjoint", "InterpolatingAdjoint", "NeuralSDE", "NeuralODE",
    "LatentSDE", "NeuralCDE", "interpolation", "noise",
    "Regularization",
    "EM", "EulerHeun", "RKMil", "LambaEM", "LambaEulerHeun", "SRIW1", "SOSRI", "SRA1", "SOSRA", "Tsit5", "Dopri5",
    "ImplicitEM", "ImplicitRKMil", "ISSEM", "SKenCarp", "SROCK1", "Rodas4", "Kvaerno5",
    "ReversibleHeun", "AutoSwitch", "AutoTsit5", "AutoDP5", "AutoSOSRI",
]
