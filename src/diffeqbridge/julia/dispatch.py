"""Which backend a ``deb.solve`` call runs on (no juliacall import unless Julia is ready).

``backend="native"``: always native.  ``backend="julia"``: Julia, or a fast
:class:`~diffeqbridge.julia.JuliaUnavailableError` / :class:`~.mapping.UnsupportedOnJulia`.
``backend="auto"``: Julia only when it is *already installed* — juliacall importable, a Julia
executable on disk, and juliapkg's environment already resolved (so loading never downloads)
— and it loads, and the request is one the julia backend supports; otherwise native, with a
one-line notice the first time (``logging`` at INFO; additionally a
:class:`JuliaFallbackWarning` when juliacall is installed, i.e. the user asked for Julia).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from typing import Any

from . import _juliapkg_project, find_julia_executables
from .mapping import UnsupportedOnJulia, algorithm_spec

logger = logging.getLogger("diffeqbridge")

_NOTICE_GIVEN: list[bool] = []


class JuliaFallbackWarning(UserWarning):
    """``backend='auto'`` fell back to the native backend although juliacall is installed."""


@functools.lru_cache(maxsize=1)
def julia_installed() -> tuple[bool, str]:
    """Cheap check (file lookups only, nothing imported or run; cached): is Julia ready to load?"""
    if importlib.util.find_spec("juliacall") is None:
        return False, "juliacall is not installed"
    if not find_julia_executables():
        return False, "no Julia executable found (set PYTHON_JULIAPKG_EXE)"
    if not (_juliapkg_project() / "pyjuliapkg" / "meta.json").is_file():
        return False, "the Julia environment is not resolved yet (run once with backend='julia')"
    return True, "installed"


def check_supported(prob: Any, solver: Any, brownian: Any, sensealg: Any, regularize: Any = None) -> None:
    """Raise :class:`UnsupportedOnJulia` for requests the julia backend cannot honour."""
    if regularize is not None:
        raise UnsupportedOnJulia(
            "regularize=... is native-only for now (the regularization terms come from the native "
            "engine's steps); use backend='native'"
        )
    if brownian is not None:
        raise UnsupportedOnJulia(
            "brownian=VirtualBrownianTree is native-only (SciML draws its own noise from seed=); "
            "use backend='native' to replay a given Brownian path"
        )
    algorithm_spec(solver, getattr(prob, "interpretation", "ito"))
    from .mapping import sensealg_spec

    if sensealg is not None:
        sensealg_spec(sensealg, prob.is_sde, getattr(prob, "noise", None))


def _notice(reason: str) -> None:
    if _NOTICE_GIVEN:
        return
    _NOTICE_GIVEN.append(True)
    message = f"diffeqbridge: backend='auto' uses the native backend ({reason})"
    logger.info(message)
    if importlib.util.find_spec("juliacall") is not None:
        warnings.warn(message, JuliaFallbackWarning, stacklevel=4)


def choose_backend(backend: str, prob: Any, solver: Any, brownian: Any = None, sensealg: Any = None,
                   regularize: Any = None) -> str:
    """``"native"`` or ``"julia"`` for this request (see module docstring)."""
    if backend == "native":
        return "native"
    if backend == "julia":
        check_supported(prob, solver, brownian, sensealg, regularize)
        return "julia"
    from .bridge import is_loaded, load

    if not is_loaded():
        ok, reason = julia_installed()
        if not ok:
            _notice(reason)
            return "native"
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - any failure to start Julia means native
            _notice(f"Julia failed to load: {exc}")
            return "native"
    try:
        check_supported(prob, solver, brownian, sensealg, regularize)
    except UnsupportedOnJulia as exc:
        _notice(str(exc))
        return "native"
    return "julia"
