"""Solver families, one file each: Euler-type, Milstein, Rößler SRI/SRA, explicit RK (ODE),
drift-implicit SDE (implicit.py), additive-noise IMEX SRK (kencarp.py), Rosenbrock ODE (rosenbrock.py),
ESDIRK ODE (sdirk.py), reversible Heun (reversible_heun.py), stiffness-switching composites
(composite.py), stabilized explicit S-ROCK (srock.py)."""

from .base import AbstractSolver, StepOutput
from .composite import AutoDP5, AutoSOSRI, AutoSwitch, AutoTsit5
from .euler import EM, EulerHeun, LambaEM, LambaEulerHeun
from .implicit import ISSEM, ImplicitEM, ImplicitRKMil
from .kencarp import SKenCarp
from .milstein import RKMil
from .reversible_heun import ReversibleHeun
from .rosenbrock import Rodas4
from .runge_kutta import Dopri5, Tsit5
from .sdirk import Kvaerno5
from .shark import ShARK
from .spark import SPaRK
from .sra import SOSRA, SRA1, SRA3, SRA4, SRA5
from .sri import SOSRI, SRIW1
from .srock import SROCK1

ALL_SOLVERS: tuple[type[AbstractSolver], ...] = (
    EM,
    EulerHeun,
    RKMil,
    LambaEM,
    LambaEulerHeun,
    SRIW1,
    SOSRI,
    SRA1,
    SRA3,
    SRA4,
    SRA5,
    SOSRA,
    Tsit5,
    Dopri5,
    ImplicitEM,
    ImplicitRKMil,
    ISSEM,
    SKenCarp,
    SROCK1,
    Rodas4,
    Kvaerno5,
    ReversibleHeun,
    ShARK,
    SPaRK,
)

COMPOSITE_SOLVERS = (AutoSwitch, AutoTsit5, AutoDP5, AutoSOSRI)

__all__ = [
    "AbstractSolver",
    "StepOutput",
    "ALL_SOLVERS",
    "COMPOSITE_SOLVERS",
    *(cls.__name__ for cls in ALL_SOLVERS),
    *(cls.__name__ for cls in COMPOSITE_SOLVERS),
]
