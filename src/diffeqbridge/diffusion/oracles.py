"""Closed-form oracles: Gaussian mixtures whose diffused law and score are exact at every t.

For data ``x_0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = alpha x_0 + sigma eps`` the marginal
at ``t`` is again a mixture, component ``k`` being ``N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)``,
so ``log p_t`` and its score ``grad log p_t(x) = sum_k r_k(x) (alpha mu_k - x) / v_k``
(``r_k``: posterior responsibilities, ``v_k = alpha^2 s_k^2 + sigma^2``) are exact.
:meth:`GaussianMixture.score_model` turns that into a model in any parameterization: the
test, CLI-demo and benchmark oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..problem import expand_to
from .common import STREAMS, check_seed, per_sample_normal, per_sample_uniform
from .models import check_parameterization, check_sde
from .processes import DiffusionProcess


class GaussianMixture:
    """``sum_k weights[k] N(means[k], stds[k]^2 I)`` on states of shape ``state_shape``.

    Args:
        weights: ``(K,)`` positive (normalised here).
        means: ``(K, *state_shape)``.
        stds: ``(K,)`` positive (isotropic per component), or a number for all components.
        dtype: the dtype of the stored parameters and of what methods return (float64).
    """

    def __init__(
        self, weights: Any, means: Any, stds: Any, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ):
        means = torch.as_tensor(means, dtype=dtype, device=device)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *state_shape); got {tuple(means.shape)}")
        k = means.shape[0]
        weights = torch.as_tensor(weights, dtype=dtype, device=device).flatten()
        stds = torch.as_tensor(stds, dtype=dtype, device=device).flatten()
        if stds.numel() == 1:
            stds = stds.expand(k).clone()
        if weights.numel() != k or stds.numel() != k:
            raise ValueError(f"weights and stds need one entry per component ({k}); got {weights.numel()}, {stds.numel()}")
        if not bool((weights > 0).all()) or not bool((stds > 0).all()):
            raise ValueError("weights and stds must be positive")
        self.weights = weights / weights.sum()
        self.means, self.stds = means, stds
        self.state_shape = tuple(means.shape[1:])
        self.dim = math.prod(self.state_shape)

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` draws ``(n, *state_shape)``; draw ``i`` depends on ``(seed, i)`` only."""
        return self.sample_with_components(n, seed)[0]

    def sample_with_components(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """:meth:`sample` and the component index of each draw ``(n,)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int; got {n!r}")
        check_seed(seed)
        device = self.means.device
        u = per_sample_uniform((n, 1), seed, STREAMS["component"], dtype=torch.float64, device=device)[:, 0]
        cdf = torch.cumsum(self.weights.double(), 0)
        comp = torch.searchsorted(cdf, u.contiguous()).clamp(max=self.n_components - 1)
        z = per_sample_normal((n, *self.state_shape), seed, STREAMS["data"], dtype=self.means.dtype, device=device)
        return self.means[comp] + expand_to(self.stds[comp], z) * z, comp

    def _component_log_probs(self, x: Tensor, mean_scale: Tensor | float, var: Tensor) -> Tensor:
        """``log w_k + log N(x; c mu_k, v_k I)`` for every component: ``(B, K)``.

        ``mean_scale`` is ``(B,)`` or a number, ``var`` is ``(B, K)``."""
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.state_shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, *{self.state_shape}); got {shape}")
        xf = x.flatten(1).to(self.means.dtype)  # (B, D)
        mu = self.means.flatten(1)  # (K, D)
        c = mean_scale if isinstance(mean_scale, float) else mean_scale.to(xf.dtype).unsqueeze(1)
        sq = (
            xf.square().sum(1, keepdim=True)
            - 2 * c * (xf @ mu.T)  # (B, K): |x - c mu_k|^2
            + (c * c) * mu.square().sum(1).unsqueeze(0)
        )
        sq = sq.clamp_min(0.0)
        return torch.log(self.weights).unsqueeze(0) - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the data law at ``x`` ``(B, *state_shape)`` -> ``(B,)``."""
        var = self.stds.square().unsqueeze(0).expand(x.shape[0], -1)
        return torch.logsumexp(self._component_log_probs(x, 1.0, var), dim=1)

    def _marginal_terms(self, x: Tensor, t: Tensor | float, sde: DiffusionProcess) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=self.means.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t.to(self.means.dtype)
        alpha, sigma = sde.marginal(t)
        var = alpha.square().unsqueeze(1) * self.stds.square().unsqueeze(0) + sigma.square().unsqueeze(1)  # (B, K)
        return alpha, var, self._component_log_probs(x, alpha, var)

    def marginal_log_prob(self, x: Tensor, t: Tensor | float, sde: DiffusionProcess) -> Tensor:
        """``log p_t(x)`` of the diffused law under ``sde`` at times ``t`` ``(B,)`` -> ``(B,)``."""
        return torch.logsumexp(self._marginal_terms(x, t, check_sde(sde))[2], dim=1)

    def marginal_score(self, x: Tensor, t: Tensor | float, sde: DiffusionProcess) -> Tensor:
        """``grad_x log p_t(x)``, ``x``'s shape (closed form, differentiable in ``x``)."""
        alpha, var, logp = self._marginal_terms(x, t, check_sde(sde))
        resp = torch.softmax(logp, dim=1)  # (B, K)
        xf = x.flatten(1).to(self.means.dtype)
        mu = self.means.flatten(1)
        # sum_k r_k (alpha mu_k - x) / v_k
        score = alpha.unsqueeze(1) * ((resp / var) @ mu) - (resp / var).sum(1, keepdim=True) * xf
        return score.reshape(x.shape).to(x.dtype)

    def score_model(self, sde: DiffusionProcess, parameterization: str = "score") -> Callable[[Tensor, Tensor], Tensor]:
        """An exact model ``model(x, t)`` for ``sde`` predicting ``parameterization``
        (``"score"`` | ``"eps"`` | ``"x0"`` | ``"v"``), valid at every ``t`` in ``(0, T]``."""
        sde = check_sde(sde)
        kind = check_parameterization(parameterization)

        def model(x: Tensor, t: Tensor) -> Tensor:
            score = self.marginal_score(x, t, sde)
            tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
            alpha, sigma = sde.marginal(tt.expand(x.shape[0]) if tt.ndim == 0 else tt)
            alpha, sigma = expand_to(alpha.to(x.dtype), x), expand_to(sigma.to(x.dtype), x)
            if kind == "score":
                return score
            eps = -sigma * score
            if kind == "eps":
                return eps
            x0 = (x + sigma.square() * score) / alpha  # Tweedie
            return x0 if kind == "x0" else alpha * eps - sigma * x0

        model.__name__ = f"gaussian_mixture_{kind}"
        return model

    def component_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Assign samples ``x`` to the component of highest responsibility under the data law;
        return the fraction in each component ``(K,)`` and each component's empirical
        isotropic std ``(K,)`` (RMS distance to its mean over state elements; NaN if empty)."""
        logp = self._component_log_probs(x, 1.0, self.stds.square().unsqueeze(0).expand(x.shape[0], -1))
        comp = logp.argmax(dim=1)
        frac = torch.bincount(comp, minlength=self.n_components).to(self.means.dtype) / x.shape[0]
        diff = (x.flatten(1).to(self.means.dtype) - self.means.flatten(1)[comp]).square().mean(1)  # (B,)
        sums = torch.zeros(self.n_components, dtype=self.means.dtype, device=x.device).index_add_(0, comp, diff)
        counts = torch.bincount(comp, minlength=self.n_components).to(self.means.dtype)
        return frac, torch.sqrt(sums / counts)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, state_shape={self.state_shape})"


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equally sized samples ``(N, *shape)``.

    Averages ``W_2^2`` of the 1-D projections on ``n_projections`` random unit directions
    (fixed by ``seed``) and returns its square root."""
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int; got {n_projections!r}")
    xf, yf = x.flatten(1).double(), y.flatten(1).double()
    if xf.shape != yf.shape:
        raise ValueError(f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    dirs = per_sample_normal((n_projections, xf.shape[1]), seed, STREAMS["probe"], device=xf.device)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    px, _ = torch.sort(xf @ dirs.T, dim=0)
    py, _ = torch.sort(yf @ dirs.T, dim=0)
    return float(torch.sqrt((px - py).square().mean()))
