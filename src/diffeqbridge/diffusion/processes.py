"""Forward diffusion processes ``x_t = alpha(t) x_0 + sigma(t) eps``, ``t in [0, T]``.

Every process is the linear SDE with additive noise (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations")::

    dx = f(t) x dt + g(t) dW,    f = d log(alpha)/dt,    g^2 = d(sigma^2)/dt - 2 f sigma^2,

whose transition from ``x_0`` is ``N(alpha(t) x_0, sigma(t)^2 I)``.  Shapes: times ``t``
are ``(B,)`` tensors (or Python floats); ``marginal(t)``, ``f(t)``, ``g2(t)``, ``log_snr(t)``
return ``(B,)`` tensors in ``t``'s dtype; ``drift(t, x)``/``diffusion(t, x)`` return ``x``'s
shape ``(B, *state_shape)``.

=====================  =================================================  =====================
process                ``alpha(t)``, ``sigma(t)``                         prior at ``T``
=====================  =================================================  =====================
``VPSDE``              ``exp(-t^2 (b1-b0)/4 - t b0/2)``, ``sqrt(1-a^2)``  ``N(0, I)``
``SubVPSDE``           same ``alpha``, ``1 - alpha^2``                    ``N(0, I)``
``VESDE``              ``1``, ``s_min (s_max/s_min)^t``                   ``N(0, s_max^2 I)``
``DiscreteVPSDE``      piecewise-linear ``log alpha`` through a DDPM      ``N(0, I)``
                       table (DPM-Solver's ``NoiseScheduleVP('discrete')``)
``ScheduleSDE``        user callables                                     ``N(0, alpha^2+sigma^2)``
=====================  =================================================  =====================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..problem import expand_to
from .common import STREAMS, _check_shape, check_seed, per_sample_normal

TimeFn = Callable[[Tensor], Tensor]


def _times(t: Any) -> Tensor:
    """Times as a tensor (Python floats become float64 0-d tensors)."""
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.double()
    return torch.as_tensor(t, dtype=torch.float64)


def _check_number(name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or value < 0:
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'} and finite; got {value}")
    return value


class DiffusionProcess:
    """Base class: subclasses define :meth:`marginal` (and, for speed, the closed forms).

    Attributes:
        T: the end of the forward process (the sampler's start time).
    """

    T: float = 1.0

    # ------------------------------------------------------------------ marginals
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))``, each ``(B,)`` for ``t`` of shape ``(B,)``."""
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha(t) / sigma(t))``, ``(B,)``; decreasing in ``t``."""
        alpha, sigma = self.marginal(_times(t))
        return torch.log(alpha) - torch.log(sigma)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """The inverse of :meth:`log_snr`: times ``(B,)`` in ``[0, T]`` (bisection, 100 halvings).

        Subclasses with a closed form override this.  Values of ``lam`` outside
        ``log_snr([0, T])`` give the nearer end of ``[0, T]``.
        """
        lam = _times(lam)
        lo, hi = torch.zeros_like(lam), torch.full_like(lam, self.T)
        for _ in range(100):  # halvings of [0, T], not a loop over samples
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # lambda decreases: the root is to the right
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def sigma_over_alpha(self, t: Tensor) -> Tensor:
        """``sigma(t) / alpha(t) = exp(-lambda(t))``: the EDM noise level of the scaled state."""
        alpha, sigma = self.marginal(_times(t))
        return sigma / alpha

    # ------------------------------------------------------------------ forward SDE
    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient ``f(t) = d log(alpha)/dt``, ``(B,)`` (autograd of :meth:`marginal`)."""
        return _time_derivative(lambda s: torch.log(self.marginal(s)[0]), _times(t))

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2``, ``(B,)``."""
        t = _times(t)
        sigma = self.marginal(t)[1]
        dsigma2 = _time_derivative(lambda s: self.marginal(s)[1].square(), t)
        return (dsigma2 - 2.0 * self.f(t) * sigma.square()).clamp_min(0.0)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """Forward drift ``f(t) x``: ``x``'s shape ``(B, *state_shape)``."""
        return expand_to(self.f(_times(t)).to(x.dtype), x) * x

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        """Forward diffusion ``g(t)`` broadcast to ``x``'s shape (additive noise)."""
        g = torch.sqrt(self.g2(_times(t))).to(x.dtype)
        return expand_to(g, x).expand_as(x)

    # ------------------------------------------------------------------ prior
    @property
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior at ``T``."""
        alpha, sigma = self.marginal(torch.tensor([self.T], dtype=torch.float64))
        return float(torch.sqrt(alpha.square() + sigma.square()))

    def prior_sample(
        self, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> Tensor:
        """``N(0, prior_std^2 I)`` draws of shape ``(B, *state_shape)``; row ``i`` depends on
        ``(seed, i)`` only (a larger batch extends a smaller one)."""
        shape = _check_shape(shape)
        check_seed(seed)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype; got {dtype!r}")
        z = per_sample_normal(shape, seed, STREAMS["prior"], dtype=torch.float64, device=device)
        return (self.prior_std * z).to(dtype)

    def prior_logp(self, x: Tensor) -> Tensor:
        """Log-density of the prior at ``x`` ``(B, *state_shape)`` -> ``(B,)`` nats."""
        s2 = self.prior_std**2
        d = x[0].numel()
        return -0.5 * d * math.log(2 * math.pi * s2) - x.flatten(1).square().sum(dim=1) / (2 * s2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


def _time_derivative(fn: TimeFn, t: Tensor) -> Tensor:
    """``d fn(t) / dt`` elementwise for an elementwise ``fn``: ``(B,)`` -> ``(B,)``."""
    with torch.enable_grad():
        s = t.detach().requires_grad_(True)
        out = fn(s)
        if not out.requires_grad:  # constant in t (VE's alpha)
            return torch.zeros_like(t)
        (d,) = torch.autograd.grad(out.sum(), s)
    return d


def _check_T(T: Any) -> float:
    return _check_number("T", T)


class VPSDE(DiffusionProcess):
    """Variance preserving SDE (DDPM's continuous limit): ``beta(t) = b0 + t (b1 - b0)``,
    ``f = -beta/2``, ``g^2 = beta``, ``alpha^2 + sigma^2 = 1``.

    Args:
        beta_min, beta_max: ``b0``, ``b1`` (Song et al. 2021: 0.1, 20).
        T: end time (1).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        self.beta_min = _check_number("beta_min", beta_min, positive=False)
        self.beta_max = _check_number("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min; got beta_min={beta_min}, beta_max={beta_max}")
        self.T = _check_T(T)

    @classmethod
    def from_ddpm_betas(cls, betas: Any) -> DiscreteVPSDE:
        """A DDPM beta table as a continuous schedule: :class:`DiscreteVPSDE` ``(betas)``."""
        return DiscreteVPSDE(betas)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + _times(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _times(t)
        return -0.25 * t.square() * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = self.log_alpha(t)
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # root of (b1-b0)/4 t^2 + b0/2 t + log_alpha = 0, in the cancellation-free form
        # t = -4 log_alpha / (b0 + sqrt(b0^2 - 4 (b1-b0) log_alpha))  (also for b1 = b0)
        delta = self.beta_max - self.beta_min
        return -4.0 * log_alpha / (self.beta_min + torch.sqrt(self.beta_min**2 - 4.0 * delta * log_alpha))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # alpha^2 = sigmoid(2 lambda) when alpha^2 + sigma^2 = 1
        return self._t_from_log_alpha(-0.5 * F.softplus(-2.0 * _times(lam)))

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021): VP's ``alpha``, ``sigma = 1 - alpha^2``,
    ``g^2 = beta(t) (1 - alpha^4)``; prior ``N(0, I)``."""

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = self.log_alpha(t)
        return torch.exp(log_alpha), -torch.expm1(2.0 * log_alpha)

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - torch.log(-torch.expm1(2.0 * log_alpha))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # e^lam alpha^2 + alpha - e^lam = 0  ->  alpha = 2 / (e^-lam + sqrt(e^-2lam + 4))
        lam = _times(lam)
        log_alpha = math.log(2.0) - torch.log(torch.exp(-lam) + torch.sqrt(torch.exp(-2.0 * lam) + 4.0))
        small = lam < 0  # the same root written without overflow for very negative lambda
        log_alpha_small = math.log(2.0) + lam - torch.log1p(torch.sqrt(1.0 + 4.0 * torch.exp(2.0 * lam)))
        return self._t_from_log_alpha(torch.where(small, log_alpha_small, log_alpha))

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(4.0 * self.log_alpha(t))

    def __repr__(self) -> str:
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class VESDE(DiffusionProcess):
    """Variance exploding SDE (SMLD): ``alpha = 1``, ``sigma(t) = s_min (s_max/s_min)^t``,
    ``f = 0``, ``g^2 = 2 sigma^2 log(s_max/s_min)``; prior ``N(0, s_max^2 I)`` as score_sde.

    Args:
        sigma_min, sigma_max: 0.01 and 50 (Song et al. 2021's CIFAR-10 values).
        T: end time (1); the schedule is ``sigma(t) = s_min (s_max/s_min)^(t/T)``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        self.sigma_min = _check_number("sigma_min", sigma_min)
        self.sigma_max = _check_number("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min; got {sigma_min}, {sigma_max}")
        self.T = _check_T(T)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _times(t)
        sigma = self.sigma_min * torch.exp(t / self.T * self._log_ratio)
        return torch.ones_like(sigma), sigma

    def log_snr(self, t: Tensor) -> Tensor:
        return -math.log(self.sigma_min) - _times(t) / self.T * self._log_ratio

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return (-_times(lam) - math.log(self.sigma_min)) * self.T / self._log_ratio

    def f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_times(t))

    def g2(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_ratio / self.T * self.marginal(t)[1].square()

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"


class ScheduleSDE(DiffusionProcess):
    """A user schedule: ``alpha_fn(t)``, ``sigma_fn(t)`` map ``(B,)`` times to ``(B,)``.

    ``f = d log(alpha)/dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2`` come from autograd of the
    callables (which must be differentiable torch functions of ``t``) unless ``f_fn`` /
    ``g2_fn`` give them.  ``log_snr`` must decrease in ``t`` (checked on a grid of 65 points).
    :meth:`t_from_log_snr` bisects.  The prior is ``N(0, (alpha(T)^2 + sigma(T)^2) I)``.
    """

    def __init__(
        self, alpha_fn: TimeFn, sigma_fn: TimeFn, T: float = 1.0, f_fn: TimeFn | None = None, g2_fn: TimeFn | None = None
    ):
        for name, fn in (("alpha_fn", alpha_fn), ("sigma_fn", sigma_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable as {name}(t) with t of shape (B,); got {type(fn).__name__}")
        for name, given in (("f_fn", f_fn), ("g2_fn", g2_fn)):
            if given is not None and not callable(given):
                raise TypeError(f"{name} must be None or callable; got {type(given).__name__}")
        self.alpha_fn: TimeFn = alpha_fn
        self.sigma_fn: TimeFn = sigma_fn
        self.f_fn: TimeFn | None = f_fn
        self.g2_fn: TimeFn | None = g2_fn
        self.T = _check_T(T)
        grid = torch.linspace(0.0, self.T, 65, dtype=torch.float64)
        alpha, sigma = self.marginal(grid)
        if alpha.shape != grid.shape or sigma.shape != grid.shape:
            raise ValueError(f"alpha_fn/sigma_fn must map times (B,) to (B,); got {tuple(alpha.shape)}, {tuple(sigma.shape)}")
        if not bool((alpha[1:] > 0).all() & (sigma[1:] > 0).all()):
            raise ValueError("alpha_fn and sigma_fn must be positive on (0, T]")
        lam = torch.log(alpha[1:]) - torch.log(sigma[1:])
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError("log(alpha/sigma) must decrease strictly on [0, T]")

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _times(t)
        return self.alpha_fn(t), self.sigma_fn(t)

    def f(self, t: Tensor) -> Tensor:
        return self.f_fn(_times(t)) if self.f_fn is not None else super().f(t)

    def g2(self, t: Tensor) -> Tensor:
        return self.g2_fn(_times(t)) if self.g2_fn is not None else super().g2(t)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation through increasing ``xp``, extrapolated linearly beyond
    the ends with the end segments (as DPM-Solver's ``interpolate_fn``)."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class DiscreteVPSDE(DiffusionProcess):
    """A DDPM beta table ``betas`` ``(N,)`` as a continuous VP schedule on ``[0, 1]``.

    As DPM-Solver's ``NoiseScheduleVP('discrete')`` (Lu et al. 2022): step ``n`` (0-based)
    sits at ``t_n = (n + 1) / N`` with ``log alpha_n = 1/2 sum_{m<=n} log(1 - beta_m)``;
    ``log alpha`` is piecewise linear in ``t`` between these points and the data point
    ``log alpha(0) = 0`` (DPM-Solver extends the first segment below ``1/N`` instead, which
    gives ``alpha > 1`` near 0), ``sigma = sqrt(1 - alpha^2)``, ``f = d log(alpha)/dt``
    (piecewise constant), ``g^2 = -2 f``.  A network trained on DDPM's integer steps expects
    :meth:`ddpm_timestep` ``(t) = N t - 1`` (DPM-Solver's ``(t - 1/N) 1000`` for ``N = 1000``);
    the natural ``t_end`` is ``1/N``.
    """

    def __init__(self, betas: Any):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D table with at least 2 entries; got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.N = betas.numel()
        self.T = 1.0
        # knots t = 0, 1/N, ..., 1: the data (log alpha = 0) and DDPM's N steps
        self._t = torch.linspace(0.0, 1.0, self.N + 1, dtype=torch.float64)
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.cumsum(torch.log1p(-betas), dim=0)])

    def _tables(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._t.to(device=like.device, dtype=like.dtype), self._log_alpha.to(device=like.device, dtype=like.dtype)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _times(t)
        tp, la = self._tables(t)
        return _interp(t, tp, la)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = self.log_alpha(t)
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        lam = _times(lam)
        log_alpha = -0.5 * F.softplus(-2.0 * lam)
        tp, la = self._tables(lam)
        return _interp(log_alpha, la.flip(0), tp.flip(0))

    def f(self, t: Tensor) -> Tensor:
        t = _times(t)
        tp, la = self._tables(t)
        idx = torch.searchsorted(tp, t.contiguous()).clamp(1, self.N)
        return (la[idx] - la[idx - 1]) / (tp[idx] - tp[idx - 1])

    def g2(self, t: Tensor) -> Tensor:
        return -2.0 * self.f(t)

    def ddpm_timestep(self, t: Tensor) -> Tensor:
        """The DDPM step index a discrete-time network expects at continuous ``t``: ``N t - 1``."""
        return _times(t) * self.N - 1.0

    @property
    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"DiscreteVPSDE(N={self.N})"
