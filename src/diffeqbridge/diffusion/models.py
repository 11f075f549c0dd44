"""Model adapters: what a network predicts, converted to what a sampler needs.

A *model* is any callable ``model(x, t)``: ``x`` ``(B, *state_shape)``, ``t`` ``(B,)`` (every
sample may sit at its own time) -> ``x``'s shape; an ``nn.Module`` or a plain function.
``parameterization`` says what it predicts, with ``x_t = alpha x_0 + sigma eps``:

=================  =====================================================================
``"eps"``          the noise ``eps``
``"x0"``           the data ``x_0`` (DPM-Solver's ``"x_start"``)
``"score"``        ``grad log p_t(x) = -eps / sigma``
``"v"``            ``v = alpha eps - sigma x_0`` (Salimans & Ho 2022)
=================  =====================================================================

The conversions are those of DPM-Solver's ``model_wrapper`` (Lu et al. 2022), written
without assuming ``alpha^2 + sigma^2 = 1`` so they also hold for VE/sub-VP processes::

    eps = (x - alpha x0) / sigma = -sigma score = (alpha v + sigma x) / (alpha^2 + sigma^2)
    x0  = (x - sigma eps) / alpha                = (alpha x - sigma v) / (alpha^2 + sigma^2)

All four are affine in the model's output with coefficients that depend on ``(x, t)`` only,
so a guidance mix ``(1 - w) out_u + w out_c`` (:class:`ClassifierFreeGuidance`) commutes with
every conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..problem import expand_to
from .processes import DiffusionProcess

PARAMETERIZATIONS = ("eps", "x0", "score", "v")

Model = Callable[[Tensor, Tensor], Tensor]


def check_parameterization(parameterization: Any) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
    return parameterization


def check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t) (an nn.Module or a function); got {type(model).__name__}")


def check_sde(sde: Any) -> DiffusionProcess:
    if not isinstance(sde, DiffusionProcess):
        raise TypeError(f"sde must be a diffusion process (dd.VPSDE(), dd.VESDE(), ...); got {type(sde).__name__}")
    return sde


class ModelAdapter:
    """A model with a known parameterization, viewed in any parameterization.

    Args:
        model: ``model(x, t)`` (see the module docstring), or another ``ModelAdapter``.
        sde: the forward process whose ``marginal(t)`` gives ``alpha``, ``sigma``.
        parameterization: what ``model`` predicts: ``"eps"`` | ``"x0"`` | ``"score"`` | ``"v"``.

    Methods ``eps``, ``x0``, ``score``, ``v`` take ``x`` ``(B, *state_shape)`` and ``t``
    (``(B,)`` tensor or a number) and return ``x``'s shape; ``t`` reaches the model as a
    ``(B,)`` tensor in ``x``'s dtype.  Every call of the model is counted:

    * ``calls``: an int, model calls since the last :meth:`reset_counts`;
    * ``nfe``: ``(B,)`` int64, evaluations per sample -- a call adds 1 to every sample, or to
      the samples of ``active`` (a ``(B,)`` bool mask) when a sampler passes one.  A model
      that declares ``evaluations_per_call`` (e.g. :class:`ClassifierFreeGuidance`: 2) adds
      that many.
    """

    def __init__(self, model: Model, sde: DiffusionProcess, parameterization: str = "eps"):
        check_model(model)
        self.sde = check_sde(sde)
        self.parameterization = check_parameterization(parameterization)
        self.model = model
        self.calls = 0
        self.nfe: Tensor | None = None

    # ------------------------------------------------------------------ bookkeeping
    def reset_counts(self) -> None:
        self.calls, self.nfe = 0, None

    def nfe_for(self, batch: int, device: torch.device | None = None) -> Tensor:
        """``nfe`` as a ``(batch,)`` int64 tensor (zeros when nothing was counted)."""
        if self.nfe is None or self.nfe.shape[0] != batch:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.nfe

    def parameters(self) -> list[Tensor]:
        """Tensors a gradient may flow to: the model's parameters (nn.Module) and, for
        guidance wrappers, their conditioning tensors that require grad."""
        params: list[Tensor] = []
        inner = self.model
        if hasattr(inner, "grad_tensors"):
            params.extend(inner.grad_tensors())
        if isinstance(inner, nn.Module):
            params.extend(p for p in inner.parameters() if p.requires_grad)
        unique: dict[int, Tensor] = {}
        for p in params:
            unique.setdefault(id(p), p)
        return list(unique.values())

    def raw(self, x: Tensor, t: Tensor | float, active: Tensor | None = None) -> Tensor:
        """The model's own output at ``(x, t)`` (counted)."""
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = (t.expand(batch) if t.ndim == 0 else t).to(x.dtype)
        out = self.model(x, t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model(x, t) must return x's shape {tuple(x.shape)}; got {shape}")
        per_call = int(getattr(self.model, "evaluations_per_call", 1))
        self.calls += 1
        add = per_call if active is None else per_call * active.to(torch.long)
        self.nfe = self.nfe_for(batch, x.device) + add
        return out

    def _coefficients(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.as_tensor(t, device=x.device)
        t = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)
        alpha, sigma = self.sde.marginal(t)
        return t, expand_to(alpha.to(x.dtype), x), expand_to(sigma.to(x.dtype), x)

    # ------------------------------------------------------------------ conversions
    def eps(self, x: Tensor, t: Tensor | float, active: Tensor | None = None) -> Tensor:
        t, alpha, sigma = self._coefficients(x, t)
        out = self.raw(x, t, active)
        p = self.parameterization
        if p == "eps":
            return out
        if p == "x0":
            return (x - alpha * out) / sigma
        if p == "score":
            return -sigma * out
        return (alpha * out + sigma * x) / (alpha.square() + sigma.square())

    def x0(self, x: Tensor, t: Tensor | float, active: Tensor | None = None) -> Tensor:
        t, alpha, sigma = self._coefficients(x, t)
        out = self.raw(x, t, active)
        p = self.parameterization
        if p == "x0":
            return out
        if p == "eps":
            return (x - sigma * out) / alpha
        if p == "score":
            return (x + sigma.square() * out) / alpha
        return (alpha * x - sigma * out) / (alpha.square() + sigma.square())

    def score(self, x: Tensor, t: Tensor | float, active: Tensor | None = None) -> Tensor:
        t, alpha, sigma = self._coefficients(x, t)
        p = self.parameterization
        if p == "score":
            return self.raw(x, t, active)
        return -self.eps(x, t, active) / sigma

    def v(self, x: Tensor, t: Tensor | float, active: Tensor | None = None) -> Tensor:
        t, alpha, sigma = self._coefficients(x, t)
        out = self.raw(x, t, active)
        p = self.parameterization
        if p == "v":
            return out
        if p == "eps":
            return (alpha.square() + sigma.square()) * out / alpha - sigma * x / alpha
        if p == "x0":
            return (alpha * x - (alpha.square() + sigma.square()) * out) / sigma
        eps = -sigma * out
        return (alpha.square() + sigma.square()) * eps / alpha - sigma * x / alpha

    def predict(self, kind: str, x: Tensor, t: Tensor | float, active: Tensor | None = None) -> Tensor:
        """``getattr(self, kind)(x, t)`` for ``kind`` in ``("eps", "x0", "score", "v")``."""
        return getattr(self, check_parameterization(kind))(x, t, active)

    def __repr__(self) -> str:
        return f"ModelAdapter({type(self.model).__name__}, {self.sde!r}, parameterization={self.parameterization!r})"


def as_adapter(model: Any, sde: DiffusionProcess, parameterization: str) -> ModelAdapter:
    """``model`` wrapped in a fresh :class:`ModelAdapter` (an adapter's own model is reused)."""
    if isinstance(model, ModelAdapter):
        if model.sde is not sde:
            raise ValueError("the ModelAdapter was built for another sde; pass the bare model")
        return ModelAdapter(model.model, sde, model.parameterization)
    return ModelAdapter(model, sde, parameterization)


def _batched(c: Any, batch: int) -> Any:
    """A conditioning tensor with a leading axis of 1 or ``batch`` expanded to ``batch``."""
    if isinstance(c, Tensor) and c.ndim >= 1 and c.shape[0] == 1 and batch != 1:
        return c.expand(batch, *c.shape[1:])
    return c


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) as a model ``(x, t) -> out``.

    ``out = out_u + scale (out_c - out_u)`` with ``out_c = model(x, t, cond)`` and
    ``out_u = model(x, t, uncond)``: ``scale = 0`` is the unconditional model and
    ``scale = 1`` the conditional one (each then costs one call: the other branch is not
    evaluated).  The mix is affine with weights summing to one, so it commutes with the
    parameterization conversions of :class:`ModelAdapter`: guide an eps, x0, score or v
    network alike.  When ``cond`` and ``uncond`` are tensors with a batch axis (of size
    ``B`` or 1), both branches run as ONE call on a ``2B`` batch (``torch.cat``); otherwise
    as two calls.  ``uncond=None`` passes ``None`` to the model (a model with a learned null
    condition handles it).

    Args:
        model: ``model(x, t, c)``.
        cond, uncond: conditioning passed as ``c`` (tensors of shape ``(B, ...)``/``(1, ...)``,
            or anything the model accepts).  Conditioning tensors that require grad are
            reported by :meth:`grad_tensors`, so ``dd.sample(..., sensealg=...)``
            differentiates through them.
        scale: the guidance weight ``w`` (a float or a ``(B,)`` tensor).

    ``evaluations_per_call`` is 2 (1 at ``scale`` 0 or 1): :class:`ModelAdapter` counts NFE
    as network evaluations per sample.
    """

    def __init__(self, model: Callable[..., Tensor], cond: Any, uncond: Any = None, scale: float | Tensor = 1.0):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, cond); got {type(model).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
            raise TypeError(f"scale must be a number or a (B,) tensor; got {type(scale).__name__}")
        self.inner = model
        self.cond, self.uncond, self.scale = cond, uncond, scale

    def grad_tensors(self) -> list[Tensor]:
        out = [c for c in (self.cond, self.uncond, self.scale) if isinstance(c, Tensor) and c.requires_grad]
        if isinstance(self.inner, nn.Module):
            out.extend(p for p in self.inner.parameters() if p.requires_grad)
        return out

    def _plain_scale(self) -> float | None:
        return float(self.scale) if not isinstance(self.scale, Tensor) else None

    @property
    def evaluations_per_call(self) -> int:
        return 1 if self._plain_scale() in (0.0, 1.0) else 2

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        scale = self._plain_scale()
        if scale == 0.0:
            return self.inner(x, t, _batched(self.uncond, batch))
        if scale == 1.0:
            return self.inner(x, t, _batched(self.cond, batch))
        cond, uncond = _batched(self.cond, batch), _batched(self.uncond, batch)
        if (
            isinstance(cond, Tensor)
            and isinstance(uncond, Tensor)
            and cond.ndim >= 1
            and cond.shape == uncond.shape
            and cond.shape[0] == batch
        ):
            both = self.inner(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
            out_u, out_c = both[:batch], both[batch:]
        else:
            out_u, out_c = self.inner(x, t, uncond), self.inner(x, t, cond)
        w = self.scale if scale is None else scale
        if isinstance(w, Tensor):
            w = expand_to(w.to(x.dtype), x)
        return out_u + w * (out_c - out_u)
