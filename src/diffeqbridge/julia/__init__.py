"""Python side of the julia backend (fail-fast part).

Nothing in this module imports :mod:`juliacall`.  :func:`julia_status` decides, in a
few seconds at most, whether the julia backend can plausibly work on this machine:

1. ``juliacall`` must be importable (checked with :func:`importlib.util.find_spec`, which
   does not import it): ``pip install "diffeqbridge[julia]"``.
2. A Julia executable (>= 1.10) must exist where ``juliapkg`` would look for one, in its
   order: the ``PYTHON_JULIAPKG_EXE`` environment variable (or ``-X juliapkg-exe``), the
   Julia that ``juliapkg`` already installed into its project (``{project}/pyjuliapkg/install``,
   or the executable recorded in ``{project}/pyjuliapkg/meta.json``), a Julia installed by
   JuliaUp, and ``julia`` on ``PATH``.
3. Failing that, ``juliapkg`` downloads Julia on first use, which needs the internet: we
   check, with a short timeout, that Julia's download host resolves (and that
   ``PYTHON_JULIAPKG_OFFLINE`` is not set).

The result is cached per process; ``julia_status(refresh=True)`` recomputes it.

The backend itself lives in submodules imported on first use (none imports juliacall at
import time): ``mapping`` (pure SciML name/keyword mapping), ``dispatch`` (which backend a
solve uses), ``bridge`` (loading Julia, arrays across the boundary), ``backend`` (the
``backend="julia"`` solve and its gradients) and ``native`` (Julia-source problems:
``diffeqbridge.julia.SDEProblem``/``ODEProblem``/``solve``, CPU-thread and GPU ensembles).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

__all__ = [
    "JuliaUnavailableError",
    "julia_status",
    "require_julia",
    "find_julia_executables",
    "julia_package_dir",
    "juliapkg_json_path",
    "MIN_JULIA_VERSION",
    "SDEProblem",
    "ODEProblem",
    "solve",
    "load",
    "is_loaded",
    "enable_gpu",
]

_LAZY = {
    "SDEProblem": ("native", "SDEProblem"),
    "ODEProblem": ("native", "ODEProblem"),
    "solve": ("native", "solve"),
    "load": ("bridge", "load"),
    "is_loaded": ("bridge", "is_loaded"),
    "enable_gpu": ("bridge", "enable_gpu"),
}


def __getattr__(name: str):  # PEP 562: the backend modules load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Oldest Julia the pinned SciML packages support.
MIN_JULIA_VERSION = (1, 10)

#: Host juliapkg downloads Julia from (checked with a DNS lookup only).
_JULIA_DOWNLOAD_HOST = "julialang-s3.julialang.org"

_NATIVE_HINT = "use backend='native' (the default when Julia is unavailable)"

_CACHE: tuple[bool, str] | None = None
_LOCK = threading.Lock()


class JuliaUnavailableError(RuntimeError):
    """The julia backend was requested but cannot run here; the message says why."""


# ----------------------------------------------------------------------------- paths


def julia_package_dir() -> Path:
    """The Julia side of the bridge.

    ``julia/DiffEqBridge`` in a source checkout; ``diffeqbridge/julia_package`` is a symlink
    to it that wheels ship as plain files, and ``juliapkg.json`` points juliapkg there.
    """
    return Path(__file__).resolve().parent.parent / "julia_package"


def juliapkg_json_path() -> Path:
    """The ``juliapkg.json`` that declares the Julia dependencies."""
    return Path(__file__).resolve().parent.parent / "juliapkg.json"


def _juliapkg_config(name: str) -> str | None:
    """juliapkg's own configuration lookup: ``-X juliapkg-NAME`` then ``PYTHON_JULIAPKG_NAME``."""
    key = "juliapkg-" + name.lower().replace("_", "-")
    value = sys._xoptions.get(key)  # type: ignore[attr-defined]
    if isinstance(value, str):
        return value
    return os.environ.get("PYTHON_JULIAPKG_" + name.upper()) or None


def _julia_depot() -> Path:
    depot_path = os.environ.get("JULIA_DEPOT_PATH")
    if depot_path:
        first = depot_path.split(";" if os.name == "nt" else ":")[0]
        if first:
            return Path(first).absolute()
    return Path.home() / ".julia"


def _juliapkg_project() -> Path:
    """Where juliapkg puts its Julia environment (mirrors juliapkg's state.py)."""
    project = _juliapkg_config("project")
    if project:
        return Path(project)
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix).absolute() / "julia_env"
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        return Path(conda).absolute() / "julia_env"
    return _julia_depot() / "environments" / "pyjuliapkg"


def _exe_name() -> str:
    return "julia.exe" if os.name == "nt" else "julia"


def find_julia_executables() -> list[tuple[str, str]]:
    """Candidate Julia executables as ``(path, where it came from)``, in juliapkg's order.

    Only existing files are returned; none of them has been run yet.
    """
    found: list[tuple[str, str]] = []

    def add(path: str | os.PathLike[str] | None, origin: str) -> None:
        if not path:
            return
        p = str(path)
        if os.path.isfile(p) and os.access(p, os.X_OK) and all(p != q for q, _ in found):
            found.append((p, origin))

    exe = _juliapkg_config("exe")
    if exe:
        add(shutil.which(exe) or exe, "PYTHON_JULIAPKG_EXE")
    prefix = _juliapkg_project() / "pyjuliapkg"
    add(prefix / "install" / "bin" / _exe_name(), "juliapkg's install")
    try:
        meta = json.loads((prefix / "meta.json").read_text())
        add(meta.get("executable"), "juliapkg's meta.json")
    except (OSError, ValueError, AttributeError):
        pass
    judir = _julia_depot() / "juliaup"
    try:
        meta = json.loads((judir / "juliaup.json").read_text())
        for info in (meta.get("InstalledVersions") or {}).values():
            if isinstance(info, dict) and "Path" in info:
                add((judir / info["Path"] / "bin" / _exe_name()).resolve(), "JuliaUp")
    except (OSError, ValueError, AttributeError):
        pass
    add(shutil.which("julia"), "PATH")
    return found


def _julia_version(exe: str, timeout: float) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [exe, "--startup-file=no", "--version"],
            capture_output=True, text=True, timeout=timeout, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"julia version (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in m.groups()) if m else None


def _resolves(host: str, timeout: float) -> bool:
    """DNS lookup of ``host`` in a daemon thread, giving up after ``timeout`` seconds."""
    result: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


# ----------------------------------------------------------------------------- status


def _compute_status() -> tuple[bool, str]:
    if importlib.util.find_spec("juliacall") is None:
        return False, (
            "juliacall is not installed: pip install 'diffeqbridge[julia]' "
            "(it also needs Julia >= 1.10, which juliapkg downloads on first use where the "
            f"internet is reachable); or {_NATIVE_HINT}"
        )
    need = ".".join(map(str, MIN_JULIA_VERSION))
    too_old: list[str] = []
    for exe, origin in find_julia_executables():
        version = _julia_version(exe, timeout=4.0)
        if version is None:
            too_old.append(f"{exe} ({origin}) did not answer `--version`")
            continue
        vstr = ".".join(map(str, version))
        if version[:2] >= MIN_JULIA_VERSION:
            return True, f"Julia {vstr} at {exe} ({origin})"
        too_old.append(f"{exe} ({origin}) is Julia {vstr}")
    if too_old:
        return False, (
            f"no usable Julia >= {need}: " + "; ".join(too_old)
            + f". Install Julia >= {need} and set PYTHON_JULIAPKG_EXE, or {_NATIVE_HINT}"
        )
    offline = (_juliapkg_config("offline") or "").lower() in ("yes", "true", "1")
    if offline:
        why = "PYTHON_JULIAPKG_OFFLINE is set"
    elif not _resolves(_JULIA_DOWNLOAD_HOST, timeout=2.0):
        why = f"{_JULIA_DOWNLOAD_HOST} does not resolve: no internet"
    else:
        return True, (
            "no Julia installed yet; juliapkg will download Julia and the SciML packages "
            "on first use (several minutes, once)"
        )
    return False, (
        f"no Julia executable found and it cannot be downloaded here ({why}); "
        f"install Julia >= {need} and set PYTHON_JULIAPKG_EXE, or {_NATIVE_HINT}"
    )


def julia_status(refresh: bool = False) -> tuple[bool, str]:
    """``(usable, reason)`` for the julia backend, without importing juliacall.

    Takes a few seconds at most (one ``julia --version`` per candidate, a 2 s DNS probe);
    the answer is cached for the process unless ``refresh``.
    """
    global _CACHE
    with _LOCK:
        if _CACHE is None or refresh:
            _CACHE = _compute_status()
        return _CACHE


def require_julia() -> None:
    """Raise :class:`JuliaUnavailableError` (a ``RuntimeError``) unless Julia is usable."""
    ok, reason = julia_status()
    if not ok:
        raise JuliaUnavailableError(f"the julia backend is unavailable: {reason}")
