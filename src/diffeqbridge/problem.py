"""Problem definitions and their validation.

Shapes: ``y0`` is ``(B, *state_shape)``; user functions receive ``t`` of shape ``(B,)``
(each sample has its own time) and ``y`` of shape ``(B, *state_shape)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
INTERPRETATIONS = ("ito", "stratonovich")

VectorField = Callable[[Tensor, Tensor], Tensor]


def _check_tspan(tspan: Any) -> tuple[float, float]:
    if isinstance(tspan, (str, bytes)):  # "01" would otherwise unpack as (0, 1)
        raise TypeError(f"tspan must be a pair of numbers (t0, t1); got {tspan!r}")
    try:
        t0, t1 = (float(v) for v in tspan)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tspan must be a pair of numbers (t0, t1); got {tspan!r}") from exc
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"tspan must be finite; got ({t0}, {t1})")
    if t1 == t0:  # t1 < t0: time runs backwards
        raise ValueError(f"tspan must satisfy t1 != t0; got t0={t0}, t1={t1}")
    return t0, t1


#: state dtypes the solvers support; float16/bfloat16 are refused: their 3-4 significant
#: digits are below every default tolerance, and the batched LU/linear algebra of the
#: implicit solvers has no half-precision CPU kernels
STATE_DTYPES = (torch.float32, torch.float64)


def _check_y0(y0: Any) -> Tensor:
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a torch.Tensor of shape (B, *state_shape); got {type(y0).__name__}")
    if y0.is_complex():
        raise TypeError(
            f"y0 must be real (float32 or float64): complex states are not supported; got {y0.dtype} "
            "(solve for the real and imaginary parts, torch.view_as_real(y0), with a real field)"
        )
    if y0.dtype not in STATE_DTYPES:
        raise TypeError(f"y0 must have dtype float32 or float64 (half precision is not supported); got {y0.dtype}")
    if y0.ndim < 2 or y0.shape[0] < 1:
        hint = f" (a batch of scalars is y0.reshape({y0.shape[0]}, 1))" if y0.ndim == 1 else ""
        raise ValueError(
            f"y0 must have shape (B, *state_shape) with B >= 1 and at least one state axis; got {tuple(y0.shape)}{hint}"
        )
    if not bool(torch.isfinite(y0).all()):
        raise ValueError("y0 contains NaN or Inf")
    return y0


def _check_params(params: Any) -> list[Tensor]:
    if params is None:
        return []
    if isinstance(params, nn.Module):
        return list(params.parameters())
    if isinstance(params, Tensor):
        return [params]
    try:
        out = list(params)
    except TypeError as exc:
        raise TypeError("params must be an nn.Module, a tensor or an iterable of tensors") from exc
    for p in out:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must contain tensors only; got {type(p).__name__}")
    return out


def _check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable as {name}(t, y); got {type(fn).__name__}")


class ODEProblem:
    """``dy/dt = f(t, y)`` on ``tspan`` for a batch ``y0`` of shape ``(B, *state_shape)``."""

    is_sde = False
    noise = None
    interpretation = "ito"
    noise_dim = None

    def __init__(self, f: VectorField, y0: Tensor, tspan: tuple[float, float], params: Any = None):
        _check_callable("f", f)
        self.drift = f
        self.y0 = _check_y0(y0)
        self.tspan = _check_tspan(tspan)
        self.params = _check_params(params)

    f = property(lambda self: self.drift)

    @property
    def batch_size(self) -> int:
        return self.y0.shape[0]

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.y0.shape[1:])

    def __repr__(self) -> str:
        return f"ODEProblem(y0={tuple(self.y0.shape)}, tspan={self.tspan})"


class SDEProblem(ODEProblem):
    """``dy = drift(t, y) dt + diffusion(t, y) dW`` on ``tspan``.

    Noise types (shape of ``diffusion(t, y)`` / of the Brownian motion):

    * ``"diagonal"``: ``(B, *state_shape)`` / ``(B, *state_shape)``, one Wiener process per component;
    * ``"scalar"``: ``(B, *state_shape)`` / ``(B, 1)``, one Wiener process shared by all components;
    * ``"additive"``: like diagonal, but ``diffusion`` does not depend on ``y``;
    * ``"general"``: ``(B, *state_shape, m)`` / ``(B, m)`` with ``m = noise_dim``.
    """

    is_sde = True

    def __init__(
        self,
        drift: VectorField,
        diffusion: VectorField,
        y0: Tensor,
        tspan: tuple[float, float] = (0.0, 1.0),
        noise: str = "diagonal",
        interpretation: str = "ito",
        noise_dim: int | None = None,
        params: Any = None,
    ):
        _check_callable("drift", drift)
        _check_callable("diffusion", diffusion)
        super().__init__(drift, y0, tspan, params)
        self.diffusion = diffusion
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}; got {noise!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"interpretation must be one of {INTERPRETATIONS}; got {interpretation!r}")
        if noise == "general":
            if not isinstance(noise_dim, int) or isinstance(noise_dim, bool) or noise_dim < 1:
                raise ValueError(f"noise='general' needs noise_dim, a positive int; got {noise_dim!r}")
        elif noise_dim is not None:
            expected = 1 if noise == "scalar" else math.prod(self.state_shape)
            if noise_dim != expected:
                raise ValueError(f"noise_dim={noise_dim!r} contradicts noise={noise!r} (expected {expected} or None)")
        self.noise = noise
        self.interpretation = interpretation
        self.noise_dim = noise_dim

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the Brownian motion without the batch axis."""
        if self.noise == "scalar":
            return (1,)
        if self.noise == "general":
            return (int(self.noise_dim),)  # type: ignore[arg-type]
        return self.state_shape

    def diffusion_shape(self) -> tuple[int, ...]:
        """Expected shape of ``diffusion(t, y)`` including the batch axis."""
        base = (self.batch_size, *self.state_shape)
        return (*base, int(self.noise_dim)) if self.noise == "general" else base

    def __repr__(self) -> str:
        return (
            f"SDEProblem(y0={tuple(self.y0.shape)}, tspan={self.tspan}, noise={self.noise!r}, "
            f"interpretation={self.interpretation!r})"
        )


def expand_to(x: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample ``(B,)`` tensor so that it broadcasts against ``like`` ``(B, ...)``."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def _field(
    name: str, user: VectorField, out_shape: Callable[[Tensor], tuple[int, ...]], span: tuple[float, float], what: str
) -> VectorField:
    """``user`` as the solvers call it: time reaches it in float64 whatever the state's dtype
    (a float32 state at ``t0 = 1e9`` must not see quantized time) and clamped to the span
    ``[lo, hi]`` (stage nodes outside ``[0, 1]``, e.g. SOSRI's ``c = 3.75``, would otherwise
    ask for times past ``tspan`` near its ends, where a user's model may be undefined), its
    output is cast to the state's dtype (a float64 time promotes ``cos(t) * y``), and a wrong
    type, shape or dtype is an error (:func:`check_field_output`; ``what``: where the expected
    shape comes from) instead of a silent broadcast, also where ``solve``'s start-up did not
    evaluate the field at ``t0`` (the first step's call is then the first check)."""
    lo, hi = span
    context = f" during the solve; expected {what}"

    def call(t: Tensor, y: Tensor) -> Tensor:
        out = user((t if t.dtype == torch.float64 else t.to(torch.float64)).clamp(lo, hi), y)
        check_field_output(name, out, out_shape(y), y.dtype, context)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    return call


class Terms:
    """The vector fields of a problem as the solvers see them.

    ``drift(t, y)`` / ``diffusion(t, y)``: ``t`` ``(B,)`` (any float dtype; the user's function
    gets it as float64), ``y`` ``(B, *state_shape)``; outputs in ``y``'s dtype.
    ``g_dw(g, dw)`` applies the diffusion ``g`` to a Brownian increment ``dw`` (shape
    ``(B, *noise_shape)``) and returns the state's shape ``(B, *state_shape)``.
    """

    def __init__(self, problem: ODEProblem):
        self.problem = problem
        user_diffusion = getattr(problem, "diffusion", None)
        span = (min(problem.tspan), max(problem.tspan))
        self.drift: VectorField = _field(
            "drift" if problem.is_sde else "f", problem.drift, lambda y: y.shape, span, "the state's shape"
        )
        noise_dim = getattr(problem, "noise_dim", None)
        extra: tuple[int, ...] = (int(noise_dim),) if problem.noise == "general" and noise_dim is not None else ()
        self.diffusion: VectorField | None = (
            None
            if user_diffusion is None
            else _field("diffusion", user_diffusion, lambda y: (*y.shape, *extra), span, f"noise={problem.noise!r}'s shape")
        )
        self.span: float = abs(float(problem.tspan[1]) - float(problem.tspan[0]))  # |t1 - t0|
        self.noise: str | None = problem.noise
        self.interpretation: str = problem.interpretation
        # the adaptive solve's (atol, rtol), set by solve(): implicit solvers derive their
        # Newton tolerances from it (nonlinear.newton_tolerances); None for fixed-step solves
        self.tolerances: tuple[float | Tensor, float | Tensor] | None = None

    def g_dw(self, g: Tensor, dw: Tensor) -> Tensor:
        if self.noise == "general":
            return torch.einsum("b...m,bm->b...", g, dw)
        if self.noise == "scalar":
            return g * dw.reshape(dw.shape[:1] + (1,) * (g.ndim - 1))
        return g * dw

    def noise_like_state(self, x: Tensor, y: Tensor) -> Tensor:
        """Broadcast a noise-shaped quantity (diagonal/scalar noise) against the state ``y``."""
        if self.noise == "scalar":
            return x.reshape(x.shape[:1] + (1,) * (y.ndim - 1))
        return x


def _output_dtypes(state: torch.dtype) -> tuple[torch.dtype, ...]:
    """Dtypes a field may return for a state of dtype ``state``: the state's own, or its
    promotion with the float64 time the field receives (cast back by :class:`Terms`)."""
    return (state, torch.promote_types(state, torch.float64))


def check_additive(problem: ODEProblem, t0: Tensor, g0: Tensor) -> int:
    """``noise="additive"`` is a claim that ``diffusion`` does not depend on ``y``: check it
    with one more evaluation at a different state at ``t0`` (``y0 + 1 + |y0|``, which differs
    from ``y0`` in every component).  Returns the diffusion evaluations spent (0 or 1)."""
    if not isinstance(problem, SDEProblem) or problem.noise != "additive":
        return 0
    y0 = problem.y0.detach()
    with torch.no_grad():
        g1 = problem.diffusion(t0, y0 + 1 + y0.abs())
        g0 = g0.detach()
        tol = 64 * torch.finfo(y0.dtype).eps * (1 + g0.abs())
        same = isinstance(g1, Tensor) and g1.shape == g0.shape and bool(((g1.to(g0.dtype) - g0).abs() <= tol).all())
    if not same:
        raise ValueError(
            "noise='additive' requires diffusion(t, y) independent of y, but diffusion(t0, y0) and "
            "diffusion(t0, y0 + 1 + |y0|) differ; use noise='diagonal' (or 'scalar'/'general') for "
            "state-dependent noise"
        )
    return 1


def check_field_output(name: str, out: Any, expected: tuple[int, ...], state: torch.dtype, context: str) -> None:
    """TypeError/ValueError naming the field ``name`` (``"drift"``, ``"f"``, ``"diffusion"``)
    when its output ``out`` is not a tensor of shape ``expected`` in the state's dtype
    ``state`` (or its promotion with float64 time); ``context`` follows the returned shape in
    the message (e.g. ``"; expected y0's shape"``, then the shape)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name}(t, y) must return a tensor; got {type(out).__name__}")
    if out.shape != expected:
        raise ValueError(f"{name}(t, y) returned shape {tuple(out.shape)}{context} {tuple(expected)}")
    if out.dtype not in _output_dtypes(state):
        raise ValueError(f"{name}(t, y) returned dtype {out.dtype}; expected the state's dtype {state}")


def check_field_shapes(problem: ODEProblem, f0: Tensor | None, g0: Tensor | None) -> None:
    """Raise TypeError/ValueError naming the function whose output at ``t0`` (``f0``/``g0``;
    None: not evaluated by the start-up, checked at the first step's call instead) has the
    wrong type, shape or dtype."""
    expected = tuple(problem.y0.shape)
    if f0 is not None:
        check_field_output("drift" if problem.is_sde else "f", f0, expected, problem.y0.dtype, "; expected y0's shape")
    if g0 is not None:
        assert isinstance(problem, SDEProblem)
        context = f"; noise={problem.noise!r} expects"
        check_field_output("diffusion", g0, problem.diffusion_shape(), problem.y0.dtype, context)
