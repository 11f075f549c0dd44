"""Shared pieces of the diffusion samplers: per-sample noise, input validation, solutions.

Per-sample noise.  :func:`per_sample_normal` draws standard normals from a counter-based
hash of ``(seed, stream, sample index, element)`` -- the hash of
:class:`~diffeqbridge.VirtualBrownianTree` -- so what sample ``i`` gets depends on
``(seed, stream, i)`` only: not on the batch size, the other samples, or the order of
calls.  Samplers give each use its own ``stream`` (the prior, corrector step ``k``, a
Hutchinson probe ...), see :data:`STREAMS`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._tree_kernel import MASK32 as _MASK32
from .._tree_kernel import absorb as _absorb
from .._tree_kernel import check_seed as check_seed
from .._tree_kernel import fmix32 as _fmix32
from .._tree_kernel import standard_normal_pair as _standard_normal_pair
from ..solution import ReturnCode, Solution, Stats

# stream ids: distinct sources of per-sample randomness (any int in [0, 2^32) works; a
# sampler that needs one stream per step uses ``base + step``)
STREAMS = {
    "prior": 1,
    "data": 2,
    "component": 3,
    "probe": 1 << 20,
    "corrector": 1 << 24,
    "churn": 1 << 25,
    "sampler": 1 << 26,
}


def _words(shape: tuple[int, ...], seed: int, stream: int, device: torch.device | str | None) -> Tensor:
    """Two hashed 32-bit words per element: int64 ``(2, B, N)`` with values in ``[0, 2^32)``."""
    batch, n = shape[0], math.prod(shape[1:])
    sample = torch.arange(batch, device=device, dtype=torch.int64).unsqueeze(1)
    element = torch.arange(n, device=device, dtype=torch.int64).unsqueeze(0)
    h = torch.full((batch, n), 0x7F4A7C15, device=device, dtype=torch.int64)
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, stream & _MASK32, (stream >> 32) & _MASK32):
        h = _absorb(h, word)
    h = _absorb(_absorb(_absorb(h, sample & _MASK32), sample >> 32), element)
    return torch.stack([h, _fmix32(h ^ 0x5BD1E995)])


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise TypeError(f"shape must be a tuple of ints (B, *state_shape); got {shape!r}") from exc
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, *state_shape) with at least two positive sizes; got {shape}")
    return shape


def per_sample_normal(
    shape: tuple[int, ...],
    seed: int = 0,
    stream: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normals of shape ``(B, *state_shape)``; row ``i`` is a pure function of
    ``(seed, stream, i)`` (Box--Muller on the Brownian tree's MurmurHash3 mixing)."""
    shape = _check_shape(shape)
    words = _words(shape, check_seed(seed), int(stream), device)
    z, _ = _standard_normal_pair((words - (1 << 31)).to(torch.int32))
    return z.reshape(shape).to(dtype)


def per_sample_uniform(
    shape: tuple[int, ...],
    seed: int = 0,
    stream: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniforms in ``(0, 1)`` of shape ``(B, *state_shape)``, per sample as :func:`per_sample_normal`."""
    shape = _check_shape(shape)
    words = _words(shape, check_seed(seed), int(stream), device)
    hi, lo = words[0] >> 5, words[1] >> 6  # 27 + 26 bits: a float64 uniform
    return ((hi * 67108864.0 + lo + 0.5) / 9007199254740992.0).reshape(shape).to(dtype)


def per_sample_rademacher(
    shape: tuple[int, ...],
    seed: int = 0,
    stream: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random signs ``±1`` of shape ``(B, *state_shape)``, per sample as :func:`per_sample_normal`."""
    shape = _check_shape(shape)
    words = _words(shape, check_seed(seed), int(stream), device)
    return (1.0 - 2.0 * (words[0] & 1).double()).reshape(shape).to(dtype)


def check_x(name: str, x: Any) -> Tensor:
    """``x`` must be a finite floating tensor of shape ``(B, *state_shape)`` with a state axis."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, *state_shape); got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32/float64); got {x.dtype}")
    if x.ndim < 2 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(
            f"{name} must have shape (B, *state_shape) with B >= 1 and a state axis (a 1-D state is (B, 1)); got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def check_t_end(t_end: Any, T: float) -> float:
    """``t_end`` must be a number in the open interval ``(0, T)``."""
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)):
        raise TypeError(f"t_end must be a number in (0, T={T}); got {type(t_end).__name__}")
    t_end = float(t_end)
    if not (math.isfinite(t_end) and 0.0 < t_end < T):
        raise ValueError(f"t_end must lie in the open interval (0, T={T}); got {t_end}")
    return t_end


def check_steps(steps: Any, default: int | None = None, name: str = "steps") -> int:
    """``steps`` must be a positive int (``None`` -> ``default`` where a method has one)."""
    if steps is None:
        if default is None:
            raise ValueError(f"{name} is required for this method (a positive int)")
        return default
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive int; got {steps!r}")
    return steps


def check_model_dtype(model: Any, x: Tensor, name: str = "x_T") -> None:
    """An ``nn.Module`` model's floating parameters must share ``x``'s dtype and device."""
    inner = getattr(model, "model", model)
    params = getattr(inner, "parameters", None)
    if not callable(params):
        return
    for p in params():
        if p.is_floating_point():
            if p.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {p.dtype}")
            if p.device != x.device:
                raise ValueError(f"{name} is on {x.device} but the model's parameters are on {p.device}")
            return


def grid_solution(
    ts: Tensor, ys: Tensor, nf: Tensor, naccept: int | Tensor, alg: Any = None, nreject: Tensor | None = None
) -> Solution:
    """A :class:`~diffeqbridge.Solution` for a fixed-grid sampler's loop.

    Args:
        ts: ``(S,)`` save times (decreasing for a sampler, e.g. ``(T, t_end)``).
        ys: ``(S, B, *state_shape)`` saved states.
        nf: ``(B,)`` model evaluations per sample.
        naccept: steps taken (an int or ``(B,)``).
    Retcodes: ``Success`` where the final state is finite, ``Unstable`` where it is not.
    """
    batch = ys.shape[1]
    device = ys.device
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    finite = torch.isfinite(ys[-1].detach()).flatten(1).all(dim=1)
    retcodes = torch.where(
        finite, torch.full_like(zeros, int(ReturnCode.Success)), torch.full_like(zeros, int(ReturnCode.Unstable))
    )
    stats = Stats(
        nf=nf.to(torch.long).to(device) + zeros,
        ng=zeros.clone(),
        naccept=torch.as_tensor(naccept, dtype=torch.long, device=device) + zeros,
        nreject=nreject if nreject is not None else zeros.clone(),
    )
    return Solution(ts=ts.to(ys.dtype), ys=ys, stats=stats, retcodes=retcodes, alg=alg)
