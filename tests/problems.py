"""SDE problems with known solutions, as SciML's SDEProblemLibrary defines them.

Source: SciML/DiffEqProblemLibrary.jl, ``lib/SDEProblemLibrary/src/SDEProblemLibrary.jl``.
Every builder returns ``(problem, exact)`` where ``problem`` is a ``deb.SDEProblem`` whose
``y0`` holds ``B`` copies of the library's initial condition, and ``exact(t, W)`` maps a
time ``t`` (float) and the Brownian value ``W(t) - W(t0)`` (shape ``(B, *noise_shape)``,
e.g. ``bm.W(t)`` of the tree passed to ``solve``) to the exact solution ``(B, *state_shape)``.

* ``linear`` (``prob_sde_linear``, GBM): du = 1.01 u dt + 0.87 u dW, u0 = 1/2,
  Itô: u = u0 exp((1.01 - 0.87²/2) t + 0.87 W)  (the library writes 0.63155 t);
  Stratonovich (``prob_sde_linear_stratonovich``): u = u0 exp(1.01 t + 0.87 W).
* ``wave`` (``prob_sde_wave``): du = -0.01 sin(u) cos³(u) dt + 0.1 cos²(u) dW, u0 = 1,
  u = atan(0.1 W + tan(u0)).
* ``cubic`` (``prob_sde_cubic``): du = -0.25 u (1 - u²) dt + 0.5 (1 - u²) dW, u0 = 1/2,
  u = ((1+u0) e^W + u0 - 1) / ((1+u0) e^W + 1 - u0).
* ``additive`` (``prob_sde_additive``): du = (β/√(1+t) - u/(2(1+t))) dt + αβ/√(1+t) dW,
  α = 0.1, β = 0.05, u0 = 1, u = u0/√(1+t) + β (t + α W)/√(1+t).
* ``additive_system`` (``prob_sde_additivesystem``): the same, componentwise, on 4
  components with α = (0.1, 0.1, 0.1, 0.1), β = (0.5, 0.25, 0.125, 0.1115), u0 = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

import diffeqbridge as deb
from diffeqbridge.solvers.base import AbstractSolver

Exact = Callable[[float, Tensor], Tensor]

LINEAR_MU = 1.01
LINEAR_SIGMA = 0.87
LINEAR_U0 = 0.5


def _column(value: float, batch: int, dtype: torch.dtype) -> Tensor:
    return torch.full((batch, 1), value, dtype=dtype)


def linear(
    batch: int, interpretation: str = "ito", dtype: torch.dtype = torch.float64, tspan: tuple[float, float] = (0.0, 1.0)
) -> tuple[deb.SDEProblem, Exact]:
    """``prob_sde_linear`` (GBM), state shape ``(1,)``, diagonal noise."""
    mu, sigma, u0 = LINEAR_MU, LINEAR_SIGMA, LINEAR_U0
    prob = deb.SDEProblem(
        lambda t, y: mu * y,
        lambda t, y: sigma * y,
        _column(u0, batch, dtype),
        tspan=tspan,
        noise="diagonal",
        interpretation=interpretation,
    )
    rate = mu - sigma**2 / 2 if interpretation == "ito" else mu

    def exact(t: float, w: Tensor) -> Tensor:
        return u0 * torch.exp(rate * (t - tspan[0]) + sigma * w)

    return prob, exact


def wave(batch: int, dtype: torch.dtype = torch.float64) -> tuple[deb.SDEProblem, Exact]:
    """``prob_sde_wave``, state shape ``(1,)``, diagonal Itô noise."""
    u0 = 1.0
    prob = deb.SDEProblem(
        lambda t, y: -0.01 * torch.sin(y) * torch.cos(y) ** 3,
        lambda t, y: 0.1 * torch.cos(y) ** 2,
        _column(u0, batch, dtype),
        tspan=(0.0, 1.0),
        noise="diagonal",
    )

    def exact(t: float, w: Tensor) -> Tensor:
        return torch.atan(0.1 * w + math.tan(u0))

    return prob, exact


def cubic(batch: int, dtype: torch.dtype = torch.float64) -> tuple[deb.SDEProblem, Exact]:
    """``prob_sde_cubic``, state shape ``(1,)``, diagonal Itô noise."""
    u0 = 0.5
    prob = deb.SDEProblem(
        lambda t, y: -0.25 * y * (1 - y**2),
        lambda t, y: 0.5 * (1 - y**2),
        _column(u0, batch, dtype),
        tspan=(0.0, 1.0),
        noise="diagonal",
    )

    def exact(t: float, w: Tensor) -> Tensor:
        e = (1 + u0) * torch.exp(w)
        return (e + u0 - 1) / (e + 1 - u0)

    return prob, exact


def _additive(alpha: Tensor, beta: Tensor, u0: float, batch: int, dtype: torch.dtype, noise: str) -> tuple[deb.SDEProblem, Exact]:
    alpha, beta = alpha.to(dtype), beta.to(dtype)
    n = alpha.numel()

    def drift(t: Tensor, y: Tensor) -> Tensor:
        s = torch.sqrt(1 + t).unsqueeze(1)
        return beta / s - y / (2 * s**2)

    def diffusion(t: Tensor, y: Tensor) -> Tensor:
        s = torch.sqrt(1 + t).unsqueeze(1)
        return (alpha * beta / s).expand_as(y)

    prob = deb.SDEProblem(drift, diffusion, torch.full((batch, n), u0, dtype=dtype), tspan=(0.0, 1.0), noise=noise)

    def exact(t: float, w: Tensor) -> Tensor:
        s = math.sqrt(1 + t)
        return u0 / s + beta * (t + alpha * w) / s

    return prob, exact


def additive(batch: int, dtype: torch.dtype = torch.float64, noise: str = "additive") -> tuple[deb.SDEProblem, Exact]:
    """``prob_sde_additive`` (α = 0.1, β = 0.05, u0 = 1), state shape ``(1,)``."""
    return _additive(torch.tensor([0.1]), torch.tensor([0.05]), 1.0, batch, dtype, noise)


def additive_system(batch: int, dtype: torch.dtype = torch.float64, noise: str = "additive") -> tuple[deb.SDEProblem, Exact]:
    """``prob_sde_additivesystem``: 4 components, state shape ``(4,)``."""
    return _additive(torch.tensor([0.1, 0.1, 0.1, 0.1]), torch.tensor([0.5, 0.25, 0.125, 0.1115]), 1.0, batch, dtype, noise)


def tree_for(
    prob: deb.SDEProblem, seed: int, dtype: torch.dtype = torch.float64, tol: float | None = None
) -> deb.VirtualBrownianTree:
    """A Brownian tree of the problem's shape ``(B, *noise_shape)`` on its ``tspan``."""
    t0, t1 = prob.tspan
    return deb.VirtualBrownianTree(t0, t1, (prob.batch_size, *prob.noise_shape), seed=seed, dtype=dtype, tol=tol)


def strong_error(sol: deb.Solution, exact: Exact, bm: deb.VirtualBrownianTree) -> float:
    """Mean over samples of the max-abs error at the final time."""
    t_end = float(sol.ts[-1])
    ref = exact(t_end, bm.W(t_end))
    return float((sol.ys[-1] - ref).abs().flatten(1).amax(dim=1).mean())


def fitted_order(dts: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(dt)."""
    x = torch.log(torch.tensor(dts, dtype=torch.float64))
    y = torch.log(torch.tensor(errors, dtype=torch.float64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def tangent_stratonovich(batch: int, dtype: torch.dtype = torch.float64) -> tuple[deb.SDEProblem, Exact]:
    """``du = cos(u)^2 ∘ dW`` (Stratonovich, nonlinear diffusion), u0 = 1/2.

    The Stratonovich chain rule gives ``d tan(u) = dW``, so ``u(t) = atan(tan(u0) + W(t))``.
    """
    u0 = 0.5
    prob = deb.SDEProblem(
        lambda t, y: torch.zeros_like(y),
        lambda t, y: torch.cos(y) ** 2,
        _column(u0, batch, dtype),
        tspan=(0.0, 1.0),
        noise="diagonal",
        interpretation="stratonovich",
    )

    def exact(t: float, w: Tensor) -> Tensor:
        return torch.atan(math.tan(u0) + w)

    return prob, exact


def torchsde_brownian(tree: deb.VirtualBrownianTree, levy_area: bool = False):
    """``tree`` seen through torchsde's ``BaseBrownian`` interface: torchsde then integrates on
    exactly the path our solves use.  With ``levy_area`` it also answers ``return_U`` (the
    space-time Lévy area torchsde's ``srk`` asks for) with ``U = int_s^t W_{s,r} dr =
    dt (H + dW / 2)`` from the tree's ``H``."""
    import torchsde

    class TreeBrownian(torchsde.BaseBrownian):
        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            if return_A or (return_U and not levy_area):
                raise NotImplementedError("increments only" if not levy_area else "no Davie/Foster area")
            if tb is None:
                return tree.W(float(ta))
            dw, h = tree(float(ta), float(tb))
            if not return_U:
                return dw
            return dw, (float(tb) - float(ta)) * (h + dw / 2)

        def __repr__(self) -> str:
            return f"TreeBrownian({tree!r})"

        dtype = property(lambda self: tree.dtype)
        device = property(lambda self: tree.device)
        shape = property(lambda self: torch.Size(tree.shape))
        levy_area_approximation = property(lambda self: "space-time" if levy_area else "none")

    return TreeBrownian()


def sine_exact(t: torch.Tensor) -> torch.Tensor:
    """torchdiffeq's ``SineODE`` (tests/problems.py there): the exact solution of
    ``y' = 2y/t + t^4 sin(2t) - t^2 + 4t^3`` with ``y(0.5)`` on it."""
    return (
        -0.5 * t**4 * torch.cos(2 * t)
        + 0.5 * t**3 * torch.sin(2 * t)
        + 0.25 * t**2 * torch.cos(2 * t)
        - t**3
        + 2 * t**4
        + (math.pi - 0.25) * t**2
    )


class Counting:
    """A vector field (drift, diffusion or ``jac(t, y)``) that counts its Python calls."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(t, y)


#: every public ODE solver, by name (the composites with their default stiff partner)
ODE_SOLVERS: dict[str, Callable[[], AbstractSolver]] = {
    "Tsit5": deb.Tsit5,
    "Dopri5": deb.Dopri5,
    "Rodas4": deb.Rodas4,
    "Kvaerno5": deb.Kvaerno5,
    "AutoTsit5": lambda: deb.AutoTsit5(deb.Rodas4()),
    "AutoDP5": lambda: deb.AutoDP5(deb.Kvaerno5()),
}
