"""diffeqbridge: SciML-grade SDE/ODE solving for PyTorch (and JAX).

Public names only; see DESIGN.md for the contract.
"""
from .brownian import VirtualBrownianTree
from .problem import ODEProblem, SDEProblem
from .solution import ReturnCode, Solution, Stats
from .solve import solve
from .solvers import EM, SOSRA, SOSRI, SRA1, SRIW1, Dopri5, EulerHeun, LambaEM, RKMil, Tsit5

__version__ = "0.1.0"

__all__ = [
    "SDEProblem", "ODEProblem", "solve", "Solution", "ReturnCode", "Stats", "VirtualBrownianTree",
    "EM", "EulerHeun", "RKMil", "LambaEM", "SRIW1", "SOSRI", "SRA1", "SOSRA", "Tsit5", "Dopri5",
]
