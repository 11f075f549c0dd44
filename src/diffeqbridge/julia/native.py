"""Problems whose drift/diffusion are Julia source, compiled and solved entirely in Julia.

>>> import torch, diffeqbridge as deb
>>> prob = deb.julia.SDEProblem("p[1] .* u", "p[2] .* u", torch.full((10_000, 1), 0.5),
...                             tspan=(0.0, 1.0), p=[1.01, 0.87])          # doctest: +SKIP
>>> sol = deb.julia.solve(prob, deb.SOSRI(), ensemble="threads")         # doctest: +SKIP
>>> sol = deb.julia.solve(prob, "GPUEM", ensemble="gpu", dt=1e-3)       # doctest: +SKIP

A body is the expression of an out-of-place function of ``(u, p, t)`` (``u``: the state as a
flat vector, ``p``: the parameter vector, ``t``: time) whose last value is the derivative,
e.g. ``"1.01 .* u"`` or ``"[u[2], -u[1]]"``.  Write it with broadcasting (``.*``) so it
works for both ``Vector`` (CPU) and ``SVector`` (GPU kernels) states.  No Python runs during
the solve, so ensembles use ``EnsembleThreads()`` (Julia threads: set
``PYTHON_JULIACALL_THREADS=auto`` before loading) or DiffEqGPU's
``EnsembleGPUKernel(CUDA.CUDABackend())`` with ``GPUEM``/``GPUSIEA``/``GPUTsit5``.
No gradients on this path (use ``deb.SDEProblem`` with ``backend="julia"`` for those).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..problem import INTERPRETATIONS, NOISE_TYPES, _check_tspan, _check_y0
from ..solution import Solution, Stats
from .mapping import algorithm_spec, retcode_from_julia, solve_kwargs

__all__ = ["ENSEMBLES", "GPU_ALGORITHMS", "ODEProblem", "SDEProblem", "solve"]

#: DiffEqGPU kernel methods (``EnsembleGPUKernel``): fixed step; GPUEM/GPUSIEA for SDEs.
GPU_ALGORITHMS = {"GPUEM": True, "GPUSIEA": True, "GPUTsit5": False}
ENSEMBLES = ("threads", "serial", "gpu")


def _check_body(name: str, body: Any) -> str:
    if not isinstance(body, str) or not body.strip():
        raise TypeError(f"{name} must be a non-empty string of Julia source (a body in u, p, t); got {body!r}")
    return body


class ODEProblem:
    """``du/dt = f(u, p, t)`` with ``f`` given as Julia source; ``y0`` is ``(B, *state)``."""

    is_sde = False
    noise: str | None = None
    interpretation = "ito"
    noise_dim: int | None = None

    def __init__(self, f: str, y0: Tensor, tspan: tuple[float, float], p: Any = None):
        self.f = _check_body("f", f)
        self.y0 = _check_y0(y0)
        self.tspan = _check_tspan(tspan)
        self.p = np.asarray([] if p is None else p, dtype=np.float64).reshape(-1)

    def __repr__(self) -> str:
        return f"julia.ODEProblem(f={self.f!r}, y0={tuple(self.y0.shape)}, tspan={self.tspan})"


class SDEProblem(ODEProblem):
    """``du = f(u, p, t) dt + g(u, p, t) dW`` with ``f``, ``g`` Julia source (``noise`` as in
    :class:`diffeqbridge.SDEProblem`; general noise: ``g`` returns an ``n x noise_dim`` matrix)."""

    is_sde = True

    def __init__(self, f: str, g: str, y0: Tensor, tspan: tuple[float, float] = (0.0, 1.0), p: Any = None,
                 noise: str = "diagonal", interpretation: str = "ito", noise_dim: int | None = None):
        super().__init__(f, y0, tspan, p)
        self.g = _check_body("g", g)
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}; got {noise!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"interpretation must be one of {INTERPRETATIONS}; got {interpretation!r}")
        if noise == "general" and (not isinstance(noise_dim, int) or noise_dim < 1):
            raise ValueError(f"noise='general' needs noise_dim, a positive int; got {noise_dim!r}")
        self.noise, self.interpretation = noise, interpretation
        self.noise_dim = noise_dim if noise == "general" else None

    def __repr__(self) -> str:
        return (f"julia.SDEProblem(f={self.f!r}, g={self.g!r}, y0={tuple(self.y0.shape)}, tspan={self.tspan}, "
                f"noise={self.noise!r})")


def gpu_request(prob: ODEProblem, alg: Any, ensemble: str, dt: float | None) -> str:
    """Validate a GPU ensemble request; returns the DiffEqGPU method name."""
    name = alg if isinstance(alg, str) else type(alg).__name__
    if name not in GPU_ALGORITHMS:
        raise ValueError(f"ensemble='gpu' supports alg in {sorted(GPU_ALGORITHMS)} (DiffEqGPU kernels); got {name!r}")
    if GPU_ALGORITHMS[name] != prob.is_sde:
        raise ValueError(f"alg={name} is for {'SDEs' if GPU_ALGORITHMS[name] else 'ODEs'}")
    if prob.is_sde and prob.noise not in ("diagonal", "additive"):
        raise ValueError("GPU SDE kernels (GPUEM/GPUSIEA) support diagonal noise only")
    if dt is None:
        raise ValueError("ensemble='gpu' uses fixed steps: pass dt")
    return name


def solve(prob: ODEProblem, alg: Any, *, ensemble: str = "threads", dt: float | None = None,
          adaptive: bool | None = None, atol: float | None = None, rtol: float | None = None,
          saveat: Any = None, seed: int = 0, max_steps: int = 100_000, dtmin: float | None = None,
          precision: str = "float32") -> Solution:
    """Ensemble solve of a Julia-source problem; returns a :class:`diffeqbridge.Solution`.

    ``alg``: a diffeqbridge solver object (CPU ensembles) or ``"GPUEM"``/``"GPUSIEA"``/
    ``"GPUTsit5"`` (``ensemble="gpu"``, fixed ``dt``, states in ``precision``).
    ``stats.nf``/``ng`` are not counted on this path (zeros).
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}; got {ensemble!r}")
    if not isinstance(prob, ODEProblem):
        raise TypeError(f"prob must be a diffeqbridge.julia.SDEProblem/ODEProblem; got {type(prob).__name__}")
    t0, t1 = prob.tspan
    times = [t0, t1] if saveat is None else [float(t) for t in torch.as_tensor(saveat, dtype=torch.float64).tolist()]
    if ensemble == "gpu":
        gpu_alg = gpu_request(prob, alg, ensemble, dt)
    else:
        spec = algorithm_spec(alg, prob.interpretation, python_callbacks=False)
        adaptive = bool(getattr(alg, "adaptive", False)) if adaptive is None else bool(adaptive)
        if not adaptive and dt is None:
            raise ValueError(f"alg={type(alg).__name__} is fixed-step (or adaptive=False): pass dt")
    from .bridge import enable_gpu, from_julia, load, to_julia_matrix

    mod = enable_gpu() if ensemble == "gpu" else load()
    f = mod.compile_field(prob.f)
    g = mod.compile_field(prob.g) if prob.is_sde else None  # type: ignore[attr-defined]
    u0s = to_julia_matrix(prob.y0)
    if ensemble == "gpu":
        ys, codes, nacc, nrej, _ = mod.gpu_ensemble(f, g, u0s, prob.tspan, prob.p, alg=gpu_alg, seed=int(seed),
                                                 saveat=np.asarray(times), dt=float(dt), precision=precision)
    else:
        kw = solve_kwargs(atol=atol if atol is not None else (1e-2 if prob.is_sde else 1e-6),
                          rtol=rtol if rtol is not None else (1e-2 if prob.is_sde else 1e-3),
                          saveat=times, max_steps=max_steps,
                          dtmin=1e-14 * (t1 - t0) if dtmin is None else float(dtmin), dt=dt, adaptive=adaptive)
        kw["saveat"] = np.asarray(kw["saveat"])
        ys, codes, nacc, nrej, _ = mod.solve_native(
            f, g, u0s, prob.tspan, prob.p, alg=spec.name, ensemble=ensemble,
            interpretation=spec.kwargs.get("interpretation", "ito"), theta=spec.kwargs.get("theta"),
            noise=prob.noise or "diagonal", noise_dim=prob.noise_dim, seed=int(seed), **kw,
        )
    out = from_julia(ys, tuple(prob.y0.shape), prob.y0.dtype, prob.y0.device)
    batch = prob.y0.shape[0]
    zeros = torch.zeros(batch, dtype=torch.int64)
    stats = Stats(nf=zeros, ng=zeros.clone(), naccept=torch.as_tensor(np.asarray(nacc, dtype=np.int64)),
                  nreject=torch.as_tensor(np.asarray(nrej, dtype=np.int64)))
    codes_t = torch.tensor([int(retcode_from_julia(str(c))) for c in codes], dtype=torch.int64)
    return Solution(ts=torch.tensor(times, dtype=prob.y0.dtype), ys=out, stats=stats, retcodes=codes_t, alg=alg)
