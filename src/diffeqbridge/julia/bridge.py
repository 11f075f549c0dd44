"""Loading Julia (juliacall) and moving arrays and callables across the boundary.

Nothing here runs at import time: :func:`load` imports juliacall on first use.

Hazards handled (PythonCall/juliacall documentation, "JuliaCall" and "FAQ"):

* **Import order.**  torch is imported before juliacall (``diffeqbridge`` imports torch;
  :func:`load` re-imports it first): loading juliacall first can make torch pick up Julia's
  bundled libraries (libstdc++/OpenMP) and juliacall warns about it.
* **Signals.**  ``PYTHON_JULIACALL_HANDLE_SIGNALS=yes`` is set (unless the user set it) before
  juliacall starts Julia: without it, multithreaded Julia code (``EnsembleThreads``) can
  segfault when the GC runs.  Julia's thread count is juliacall's ``PYTHON_JULIACALL_THREADS``
  (``N`` or ``auto``; otherwise Julia's default, normally 1); it must be set before :func:`load`.
* **The GIL.**  Python drift/diffusion callbacks run on the thread that holds the GIL, so
  problems with Python callbacks are solved with ``EnsembleSerial()``; only Julia-source
  problems (``diffeqbridge.julia.SDEProblem``) use Julia threads.
* **First-call latency.**  The first :func:`load` in an environment resolves and precompiles
  the Julia packages (minutes, once); later processes load in seconds, and the first solve
  of each problem/algorithm type compiles it (seconds).

Copies.  ``y0`` goes to Julia as a Fortran-ordered ``(n, B)`` NumPy view of the tensor (no
copy; Julia sees a ``PyArray``), and each trajectory's ``u0`` is copied once into a Julia
``Vector``.  A callback receives ``u`` as a juliacall array wrapper, read by NumPy/torch
without a copy; its result is copied once into a Julia array by ``pyconvert``.  The
``n x B x T`` result array comes back without a copy (:func:`from_julia`); on the gradient
path it is cloned once, so that autograd owns the tensor it returns.  Threaded and GPU
ensembles of Julia-source problems copy ``u0s`` into a Julia ``Matrix`` first (worker threads
never read Python-owned memory).
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import JuliaUnavailableError, julia_package_dir, require_julia

__all__ = ["enable_gpu", "from_julia", "is_loaded", "load", "to_julia_matrix"]

_STATE: dict[str, Any] = {}
_LOCK = threading.Lock()


def prepare_environment(env: dict[str, str] | None = None) -> list[str]:
    """Set juliacall's environment defaults (in ``env``, default ``os.environ``) before Julia
    starts; returns warnings about settings that will cause trouble."""
    env = os.environ if env is None else env
    notes = []
    handle = env.get("PYTHON_JULIACALL_HANDLE_SIGNALS")
    if handle is None:
        env["PYTHON_JULIACALL_HANDLE_SIGNALS"] = "yes"
    elif handle.lower() != "yes":
        notes.append(
            f"PYTHON_JULIACALL_HANDLE_SIGNALS={handle}: multithreaded Julia code (EnsembleThreads) may "
            "segfault; set it to 'yes' before diffeqbridge loads Julia"
        )
    return notes


def is_loaded() -> bool:
    """True when Julia and DiffEqBridge are loaded in this process (never loads anything)."""
    return "module" in _STATE


def load() -> Any:
    """Import juliacall (resolving the Julia environment on first use) and ``using DiffEqBridge``.

    Returns the Julia module ``DiffEqBridge``.  Raises :class:`JuliaUnavailableError` fast (no
    download attempted) when :func:`diffeqbridge.julia.julia_status` says Julia cannot run.
    """
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        require_julia()
        for note in prepare_environment():
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        import torch as _torch  # noqa: F401  (torch before juliacall; see module docstring)

        if sys.modules.get("juliacall") is not None and "jl" not in _STATE:
            warnings.warn("juliacall was imported before diffeqbridge configured it; "
                          "PYTHON_JULIACALL_HANDLE_SIGNALS may not be set", RuntimeWarning, stacklevel=2)
        try:
            from juliacall import Main as jl  # type: ignore[import-not-found]
        except Exception as exc:  # juliapkg resolve errors, missing Julia, ...
            raise JuliaUnavailableError(
                f"the julia backend failed to start: {exc}. Install Julia >= 1.10 and set "
                "PYTHON_JULIAPKG_EXE, or use backend='native'"
            ) from exc
        _STATE["jl"] = jl
        jl.seval("using DiffEqBridge")
        _STATE["module"] = jl.DiffEqBridge
        return _STATE["module"]


def julia_main() -> Any:
    load()
    return _STATE["jl"]


# ------------------------------------------------------------------------- arrays
def to_julia_matrix(y: Tensor) -> np.ndarray:
    """``(B, *state)`` tensor -> ``(n, B)`` Fortran-ordered float64 NumPy array.

    No copy for a contiguous float64 CPU tensor (the transpose of a C-ordered ``(B, n)``
    view); other dtypes/devices are converted (one copy).
    """
    flat = y.detach().reshape(y.shape[0], -1).to(device="cpu", dtype=torch.float64)
    return flat.numpy().T


def from_julia(ys: Any, batch_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Julia ``n x B x T`` Float64 array -> tensor ``(T, B, *state_shape)``.

    A column-major ``n x B x T`` array is, byte for byte, a C-ordered ``(T, B, n)`` array:
    ``np.asarray`` reads it through the array interface and ``.T`` reverses the axes, both
    without copying.  The tensor shares Julia's memory until moved to another dtype/device.
    """
    arr = np.asarray(ys).T
    out = torch.from_numpy(arr)
    out = out.reshape(arr.shape[0], *batch_shape)
    return out.to(dtype=dtype, device=device)


# ------------------------------------------------------------------------- GPU
#: General-registry UUIDs of the on-demand GPU packages (julia/DiffEqBridge/Project.toml weakdeps).
GPU_PACKAGES = {
    "DiffEqGPU": ("071ae1c0-96b5-11e9-1965-c90190d839ea", "3.4"),
    "CUDA": ("052768ef-5323-5732-b1bb-66c8b64840ba", "5"),
    "StaticArrays": ("90137ffa-7385-5640-81b9-e52037218182", "1.9"),
}


def enable_gpu() -> Any:
    """Add DiffEqGPU, CUDA and StaticArrays to the Julia environment (``juliapkg.add``; a
    download and precompilation the first time), load them, and return DiffEqBridge with its
    GPU extension active.  Raises :class:`JuliaUnavailableError` when CUDA is not functional."""
    mod = load()
    if not bool(mod.gpu_available()):
        import juliapkg  # type: ignore[import-not-found]

        for name, (uuid, version) in GPU_PACKAGES.items():
            juliapkg.add(name, uuid, version=version)
        juliapkg.resolve()
        jl = julia_main()
        jl.seval("using DiffEqGPU, CUDA, StaticArrays")
        if not bool(jl.seval("CUDA.functional()")):
            raise JuliaUnavailableError("CUDA.jl reports no functional GPU: use ensemble='threads'")
    return mod


def package_dir() -> str:
    return str(julia_package_dir())
