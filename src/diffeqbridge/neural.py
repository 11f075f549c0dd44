"""``NeuralSDE`` / ``NeuralODE``: ``nn.Module`` conveniences that own their networks and call ``solve``.

A network is called as ``net(t, y)`` if its ``forward`` takes two positional arguments,
else as ``net(y)``; ``t`` has shape ``(B,)`` (every sample has its own time).  The module
passes itself as ``params`` so every sensealg (including the adjoints, which need the
parameters explicitly) differentiates with respect to all of its parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .brownian import VirtualBrownianTree
from .problem import ODEProblem, SDEProblem
from .regularization import as_regularization
from .solve import solve

__all__ = ["NeuralSDE", "NeuralODE"]


def _caller(net: nn.Module, name: str) -> Any:
    if not isinstance(net, nn.Module):
        raise TypeError(f"{name} must be an nn.Module; got {type(net).__name__}")
    try:
        params = [
            p
            for p in inspect.signature(net.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        takes_t = len(params) >= 2
    except (TypeError, ValueError):
        takes_t = False
    if takes_t:
        # solve passes float64 time; a network gets it in the state's dtype (its weights')
        return lambda t, y: net(t.to(y.dtype), y)
    return lambda t, y: net(y)


def _check_dtype(module: nn.Module, y0: Any) -> None:
    """A clear error for ``y0`` in another dtype than the networks' parameters (instead of
    ``nn.Linear``'s "mat1 and mat2 must have the same dtype" from inside the solve)."""
    if not isinstance(y0, Tensor):
        raise TypeError(f"{type(module).__name__}.forward: y0 must be a tensor; got {type(y0).__name__}")
    dtypes = sorted({str(p.dtype) for p in module.parameters() if p.is_floating_point()})
    if dtypes and dtypes != [str(y0.dtype)]:
        raise TypeError(
            f"{type(module).__name__}.forward: y0 has dtype {y0.dtype} but the networks' parameters are "
            f"{', '.join(dtypes)}; convert one of them (e.g. module.to({y0.dtype}) or y0.to(...))"
        )


class NeuralSDE(nn.Module):
    """``dy = drift_net(t, y) dt + diffusion_net(t, y) dW`` as an ``nn.Module``.

    Args:
        drift_net, diffusion_net: ``nn.Module`` s (called as ``net(t, y)`` or ``net(y)``).
        noise: ``"diagonal"`` | ``"scalar"`` | ``"additive"`` | ``"general"``.
        interpretation: ``"ito"`` | ``"stratonovich"``.
        noise_dim: ``m`` for general noise.
        alg: solver (default: SciML's automatic choice for the noise/interpretation).
        sensealg: how gradients are computed (see :mod:`diffeqbridge.adjoint`).
        regularize: solver-heuristic regularization (``"error"``, ``"local_error"``, ... or a
            ``deb.Regularization``; see :mod:`diffeqbridge.regularization`).  After each
            ``forward`` the ``(B,)`` term is ``self.regularization`` (None without it) and the
            solve's statistics ``self.stats``.  A string becomes one ``Regularization`` object
            here, so local times are drawn afresh at every ``forward``.
        **solve_kwargs: passed to :func:`diffeqbridge.solve` (``dt``, ``adaptive``, tolerances...).

    ``forward(y0, ts, seed=0, brownian=None) -> ys`` of shape ``(T, B, *state_shape)``;
    ``ts[0]`` is the initial time, ``ts[-1]`` the final time.
    """

    def __init__(
        self,
        drift_net: nn.Module,
        diffusion_net: nn.Module,
        noise: str = "diagonal",
        interpretation: str = "ito",
        noise_dim: int | None = None,
        alg: Any = None,
        sensealg: Any = None,
        regularize: Any = None,
        **solve_kwargs: Any,
    ):
        super().__init__()
        self.regularize, self.regularization, self.stats = as_regularization(regularize), None, None
        self.drift_net = drift_net
        self.diffusion_net = diffusion_net
        self._drift = _caller(drift_net, "drift_net")
        self._diffusion = _caller(diffusion_net, "diffusion_net")
        self.noise, self.interpretation, self.noise_dim = noise, interpretation, noise_dim
        self.alg, self.sensealg, self.solve_kwargs = alg, sensealg, solve_kwargs
        for key in ("saveat", "brownian", "seed", "sensealg", "alg"):
            if key in solve_kwargs:
                raise TypeError(f"NeuralSDE: pass {key} to forward()/the constructor argument, not in **solve_kwargs")

    def problem(self, y0: Tensor, tspan: tuple[float, float]) -> SDEProblem:
        return SDEProblem(
            self._drift,
            self._diffusion,
            y0,
            tspan,
            noise=self.noise,
            interpretation=self.interpretation,
            noise_dim=self.noise_dim,
            params=self,
        )

    def forward(
        self, y0: Tensor, ts: Sequence[float] | Tensor, seed: int = 0, brownian: VirtualBrownianTree | None = None
    ) -> Tensor:
        times = torch.as_tensor(ts, dtype=torch.float64).detach().flatten()
        if times.numel() < 2:
            raise ValueError("NeuralSDE.forward: ts needs at least two times (t0 and t1)")
        _check_dtype(self, y0)
        prob = self.problem(y0, (float(times[0]), float(times[-1])))
        sol = solve(
            prob,
            self.alg,
            saveat=times,
            seed=seed,
            brownian=brownian,
            sensealg=self.sensealg,
            regularize=self.regularize,
            **self.solve_kwargs,
        )
        self.regularization, self.stats = sol.regularization, sol.stats
        return sol.ys


class NeuralODE(nn.Module):
    """``dy/dt = net(t, y)`` as an ``nn.Module``; ``forward(y0, ts) -> ys (T, B, *state_shape)``.

    A ``ts`` tensor that requires grad gets gradients (as ``torchdiffeq.odeint``'s ``t``).

    ``regularize`` as for :class:`NeuralSDE` (``self.regularization``/``self.stats`` after ``forward``).
    """

    def __init__(self, net: nn.Module, alg: Any = None, sensealg: Any = None, regularize: Any = None, **solve_kwargs: Any):
        super().__init__()
        self.regularize, self.regularization, self.stats = as_regularization(regularize), None, None
        self.net = net
        self._f = _caller(net, "net")
        self.alg, self.sensealg, self.solve_kwargs = alg, sensealg, solve_kwargs

    def forward(self, y0: Tensor, ts: Sequence[float] | Tensor) -> Tensor:
        times = torch.as_tensor(ts, dtype=torch.float64).detach().flatten()
        if times.numel() < 2:
            raise ValueError("NeuralODE.forward: ts needs at least two times (t0 and t1)")
        _check_dtype(self, y0)
        # ts that requires grad keeps its graph (torchdiffeq's odeint differentiates its times)
        saveat, tspan = times, (float(times[0]), float(times[-1]))
        if isinstance(ts, Tensor) and ts.requires_grad and torch.is_grad_enabled():
            saveat = ts.flatten()
            tspan = (saveat[0], saveat[-1])  # type: ignore[assignment]
        prob = ODEProblem(self._f, y0, tspan, params=self)
        sol = solve(prob, self.alg, saveat=saveat, sensealg=self.sensealg, regularize=self.regularize, **self.solve_kwargs)
        self.regularization, self.stats = sol.regularization, sol.stats
        return sol.ys
