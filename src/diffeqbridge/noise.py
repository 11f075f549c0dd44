"""Fractional noise through its Markov approximation (``deb.noise.MarkovFBM``).

Daems, Opper, Crevecoeur, Birdal, "Variational Inference for SDEs Driven by Fractional Noise"
(ICLR 2024), building on Harms & Stefanovits ("Affine representations of fractional
processes with applications in mathematical finance", 2019): the (type II, Riemann–Liouville)
fractional Brownian motion

    B^H_t = 1/Γ(H + ½) ∫_0^t (t - s)^{H - ½} dW_s

has the kernel ``(t - s)^{H-½}`` = a mixture of exponentials ``e^{-γ (t - s)}``, so it is a
mixture of OU processes ``Y^γ_t = ∫_0^t e^{-γ (t - s)} dW_s`` driven by the SAME Brownian
motion.  With ``K`` speeds ``γ_1 < ... < γ_K`` (geometric in ``gamma_range``)

    B^H_t ≈ B̂_t = Σ_k ω_k Y_k(t),   dY_k = -γ_k Y_k dt + dW,   Y_k(0) = 0,

a ``K``-dimensional Markov process.  The optimal weights minimise ``E ∫_0^T (B̂_t - B^H_t)² dt``
(Daems et al., Prop. 1), a quadratic in ``ω``: ``A ω = b`` with

    A_ij = ∫_0^T E[Y_i Y_j] dt = T/(γ_i + γ_j) - (1 - e^{-(γ_i + γ_j) T})/(γ_i + γ_j)²,
    b_k  = ∫_0^T E[B^H_t Y_k(t)] dt = γ_k^{-a} (T P(a, γ_k T) - a/γ_k P(a + 1, γ_k T)),  a = H + ½,

(``E[B^H_t Y_k(t)] = γ_k^{-a} P(a, γ_k t)``, ``P`` the regularised lower incomplete gamma
function, and ``∫_0^X P(a, x) dx = X P(a, X) - a P(a + 1, X)``).  The remaining error is
``E∫(B̂ - B^H)² dt = c - bᵀω`` with ``c = ∫_0^T Var B^H_t dt = T^{2H+1} / (2H (2H+1) Γ(a)²)``.
``P`` is evaluated by its power series in log space (differentiable in ``a``, unlike
``torch.special.gammainc``), so the weights and everything built on them are differentiable
in the Hurst index.

An SDE ``dX = b(t, X) dt + σ(t, X) dB^H`` (componentwise fractional noise) becomes the
Markov system in ``(X, Y)`` with one Brownian motion per component::

    dX = (b - σ Σ_k ω_k γ_k Y_k) dt + σ (Σ_k ω_k) dW,      dY_k = -γ_k Y_k dt + dW.

Variational inference (Daems et al. §4): a posterior with control ``u(t, X, Y)`` replaces
``dW`` by ``u dt + dW`` in every equation; by Girsanov the path KL is ``½ E∫ ‖u‖² dt``,
carried as an extra state as in :class:`diffeqbridge.LatentSDE`: :meth:`MarkovFBM.elbo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .problem import SDEProblem
from .solve import solve

__all__ = ["MarkovFBM", "fractional_ou_log_evidence", "regularized_gammainc", "simulate_fractional_ou"]

#: series terms of P(a, x); arguments above SERIES_XMAX give P = 1 to double precision
SERIES_TERMS = 700
SERIES_XMAX = 500.0


def regularized_gammainc(a: Tensor, x: Tensor) -> Tensor:
    """``P(a, x) = γ(a, x)/Γ(a)`` by ``x^a e^{-x} Σ_n x^n / Γ(a + n + 1)`` (log space), differentiable in ``a`` and ``x``.

    Exact to double precision for ``0 < x <= 500`` and ``a`` in ``(0, 3)``; ``x > 500`` gives 1.
    ``a`` and ``x`` broadcast.
    """
    a, x = torch.broadcast_tensors(a, x)
    large = x > SERIES_XMAX
    xs = torch.where(large, torch.ones_like(x), x).clamp(min=1e-300)
    n = torch.arange(SERIES_TERMS, dtype=x.dtype, device=x.device)
    log_terms = (a.unsqueeze(-1) + n) * torch.log(xs).unsqueeze(-1) - xs.unsqueeze(-1) - torch.lgamma(a.unsqueeze(-1) + n + 1)
    p = torch.exp(torch.logsumexp(log_terms, dim=-1))
    return torch.where(large, torch.ones_like(p), torch.where(x > 0, p, torch.zeros_like(p)))


class MarkovFBM(nn.Module):
    """Markov approximation of type II fractional Brownian motion on ``[0, T]``.

    Args:
        hurst: initial Hurst index in ``(0, 1)``; trainable (``self.hurst`` is a property of the
            unconstrained parameter ``self.hurst_logit``) unless ``trainable=False``.
        n_processes: ``K``, the number of OU processes.
        gamma_range: ``(γ_min, γ_max)``, the speeds are geometrically spaced between them.
        T: the horizon the weights are optimised over.
    """

    def __init__(
        self,
        hurst: float = 0.5,
        n_processes: int = 5,
        gamma_range: tuple[float, float] = (0.1, 100.0),
        T: float = 1.0,
        trainable: bool = True,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if isinstance(hurst, bool) or not isinstance(hurst, (int, float)) or not 0 < hurst < 1:
            raise ValueError(f"hurst must be a number in (0, 1); got {hurst!r}")
        if isinstance(n_processes, bool) or not isinstance(n_processes, int) or n_processes < 1:
            raise ValueError(f"n_processes must be a positive int; got {n_processes!r}")
        try:
            lo, hi = (float(g) for g in gamma_range)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"gamma_range must be a pair (gamma_min, gamma_max); got {gamma_range!r}") from exc
        if not (0 < lo < hi < math.inf) and not (n_processes == 1 and 0 < lo <= hi):
            raise ValueError(f"gamma_range must satisfy 0 < gamma_min < gamma_max; got {gamma_range!r}")
        if not (isinstance(T, (int, float)) and T > 0):
            raise ValueError(f"T must be positive; got {T!r}")
        logit = torch.tensor(math.log(hurst / (1 - hurst)), dtype=dtype)
        self.hurst_logit = nn.Parameter(logit, requires_grad=trainable)
        self.register_buffer("gammas", torch.logspace(math.log10(lo), math.log10(hi), n_processes, dtype=dtype))
        self.n_processes, self.T = n_processes, float(T)

    @property
    def hurst(self) -> Tensor:
        return torch.sigmoid(self.hurst_logit)

    # ------------------------------------------------------------------ weights
    def _system(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A (K, K)``, ``b (K,)`` and ``c`` of the L2 objective (module docstring)."""
        g, T, H = self.gammas, self.T, self.hurst
        a = H + 0.5
        s = g.unsqueeze(0) + g.unsqueeze(1)
        A = T / s - (1 - torch.exp(-s * T)) / s**2
        b = g ** (-a) * (T * regularized_gammainc(a, g * T) - a / g * regularized_gammainc(a + 1, g * T))
        c = T ** (2 * H + 1) / (2 * H * (2 * H + 1) * torch.exp(2 * torch.lgamma(a)))
        return A, b, c

    def weights(self) -> Tensor:
        """The optimal ``ω (K,)`` (differentiable in the Hurst index)."""
        A, b, _ = self._system()
        return torch.linalg.solve(A, b)

    def approximation_error(self) -> Tensor:
        """Relative L2 error ``(E∫(B̂ - B^H)² dt / E∫(B^H)² dt)^½`` over ``[0, T]`` at the optimal weights."""
        A, b, c = self._system()
        return torch.sqrt((c - b @ torch.linalg.solve(A, b)).clamp(min=0) / c)

    def variance(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(Var B̂_t, Var B^H_t)`` at times ``t`` (any shape): approximate and exact.

        ``Var B̂_t = Σ ω_i ω_j (1 - e^{-(γ_i+γ_j) t})/(γ_i+γ_j)``; ``Var B^H_t = t^{2H}/(2H Γ(H+½)²)``.
        """
        w, g, H = self.weights(), self.gammas, self.hurst
        s = g.unsqueeze(0) + g.unsqueeze(1)
        tt = t.unsqueeze(-1).unsqueeze(-1)
        approx = (w.unsqueeze(0) * w.unsqueeze(1) * (1 - torch.exp(-s * tt)) / s).sum(dim=(-1, -2))
        exact = t ** (2 * H) / (2 * H * torch.exp(2 * torch.lgamma(H + 0.5)))
        return approx, exact

    # ------------------------------------------------------------------ the Markov system
    def augmented_fields(
        self,
        drift: Callable[[Tensor, Tensor], Tensor],
        diffusion: Callable[[Tensor, Tensor], Tensor],
        dim: int,
        control: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
        """Drift and (general-noise) diffusion of the state ``[X (D), Y (D·K) (, KL)]``: ``(B, D(K+1)[+1])``.

        ``control(t, state) -> u (B, D)`` adds ``u dt`` to the noise and appends the KL ``½‖u‖²``.
        The diffusion has shape ``(B, n_state, D)``: component ``d`` of the Brownian motion
        drives ``X_d`` (by ``σ_d Σω``) and every ``Y_{d,k}`` (by 1).
        """
        K = self.n_processes
        w, g = self.weights(), self.gammas
        ones_k = torch.ones(K, dtype=g.dtype, device=g.device)

        def split(state: Tensor) -> tuple[Tensor, Tensor]:
            return state[:, :dim], state[:, dim : dim + dim * K].reshape(-1, dim, K)

        def f(t: Tensor, state: Tensor) -> Tensor:
            x, y = split(state)
            sigma = diffusion(t, x)
            dx = drift(t, x) - sigma * (y * (w * g)).sum(-1)
            dy = -g * y
            if control is None:
                return torch.cat([dx, dy.reshape(x.shape[0], -1)], dim=1)
            u = control(t, state)
            dx = dx + sigma * w.sum() * u
            dy = dy + u.unsqueeze(-1)
            kl = 0.5 * (u * u).sum(dim=1, keepdim=True)
            return torch.cat([dx, dy.reshape(x.shape[0], -1), kl], dim=1)

        def gfun(t: Tensor, state: Tensor) -> Tensor:
            x, _ = split(state)
            sigma = diffusion(t, x)  # (B, D)
            eye = torch.eye(dim, dtype=x.dtype, device=x.device)
            gx = torch.diag_embed(sigma * w.sum())  # (B, D, D)
            gy = (eye.unsqueeze(1) * ones_k.reshape(1, K, 1)).reshape(dim * K, dim).expand(x.shape[0], -1, -1)
            parts = [gx, gy]
            if control is not None:
                parts.append(torch.zeros(x.shape[0], 1, dim, dtype=x.dtype, device=x.device))
            return torch.cat(parts, dim=1)

        return f, gfun

    def problem(
        self,
        drift: Callable[[Tensor, Tensor], Tensor],
        diffusion: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        tspan: tuple[float, float] = (0.0, 1.0),
        params: Any = None,
        control: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> SDEProblem:
        """The Markov ``SDEProblem`` for ``dX = drift dt + diffusion dB^H`` (Itô, general noise), ``x0 (B, D)``.

        ``sol.ys[..., :D]`` is ``X``; with ``control`` the last component is the running KL.
        """
        if not isinstance(x0, Tensor) or x0.ndim != 2:
            raise ValueError(f"x0 must have shape (B, D); got {getattr(x0, 'shape', type(x0).__name__)}")
        batch, dim = x0.shape
        f, g = self.augmented_fields(drift, diffusion, dim, control)
        extra = 1 if control is not None else 0
        y0 = torch.cat([x0, x0.new_zeros(batch, dim * self.n_processes + extra)], dim=1)
        return SDEProblem(
            f,
            g,
            y0,
            tspan,
            noise="general",
            noise_dim=dim,
            params=[*self.parameters(), *([] if params is None else list(params))],
        )

    def elbo(
        self,
        drift: Callable[[Tensor, Tensor], Tensor],
        diffusion: Callable[[Tensor, Tensor], Tensor],
        control: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        ts: Sequence[float] | Tensor,
        log_likelihood: Callable[[Tensor], Tensor],
        params: Any = None,
        seed: int = 0,
        **solve_kwargs: Any,
    ) -> Tensor:
        """Per-sample ELBO ``log p(obs | X_{ts}) - ½∫‖u‖² dt`` on one posterior sample path: ``(B,)``.

        ``log_likelihood(xs (T, B, D)) -> (B,)`` scores the posterior path at ``ts``; ``control(t,
        state)`` is the posterior's control (Daems et al. §4); average over samples/seeds for
        the expectation.  ``solve_kwargs`` go to :func:`diffeqbridge.solve` (e.g. ``alg=deb.EM(), dt=...``).
        """
        times = torch.as_tensor(ts, dtype=torch.float64).detach().flatten()
        prob = self.problem(drift, diffusion, x0, (float(times[0]), float(times[-1])), params=params, control=control)
        sol = solve(prob, saveat=times, seed=seed, **solve_kwargs)
        dim = x0.shape[1]
        return log_likelihood(sol.ys[..., :dim]) - sol.ys[-1, :, -1]


def _fou_matrices(fbm: MarkovFBM, theta: Tensor, sigma: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """Exact transition ``Φ = e^{F dt}`` and noise covariance ``Q = Σ - Φ Σ Φᵀ`` over ``dt`` of the
    Markov fractional OU ``dX = -θ X dt + σ dB̂``, state ``[X, Y_1..Y_K]``, with ``Σ`` the stationary
    covariance (``F Σ + Σ Fᵀ + G Gᵀ = 0``, solved by Kronecker products; ``θ > 0``).  Van Loan's
    block exponential would overflow for fast speeds (``e^{γ dt}``)."""
    w, g = fbm.weights(), fbm.gammas
    K = fbm.n_processes
    F = torch.cat(
        [
            torch.cat([(-theta).reshape(1, 1), (-sigma * w * g).reshape(1, K)], dim=1),
            torch.cat([torch.zeros(K, 1, dtype=g.dtype), -torch.diag(g)], dim=1),
        ],
        dim=0,
    )
    G = torch.cat([(sigma * w.sum()).reshape(1), torch.ones(K, dtype=g.dtype)]).unsqueeze(1)
    eye = torch.eye(K + 1, dtype=g.dtype)
    lyap = torch.kron(eye, F) + torch.kron(F, eye)
    cov = torch.linalg.solve(lyap, -(G @ G.T).reshape(-1)).reshape(K + 1, K + 1)
    cov = 0.5 * (cov + cov.T)
    phi = torch.linalg.matrix_exp(F * dt)
    return phi, phi.new_tensor(0.0) + cov - phi @ cov @ phi.T


def fractional_ou_log_evidence(
    fbm: MarkovFBM, theta: Tensor, sigma: Tensor, x0: Tensor, dt: float, obs: Tensor, obs_std: float
) -> Tensor:
    """``log p(obs)`` of the Markov fractional OU observed every ``dt`` with Gaussian noise: ``(B,)``.

    ``obs (N, B)`` at times ``dt, 2dt, ..., N dt`` (``X_0 = x0 (B,)`` known).  The model is linear
    Gaussian, so the posterior over paths is Gauss–Markov and the ELBO's maximum over
    controls (affine in the state) equals this evidence; a Kalman filter computes it exactly
    and differentiably in ``hurst``, ``theta``, ``sigma``.
    """
    phi, Q = _fou_matrices(
        fbm, torch.as_tensor(theta, dtype=fbm.gammas.dtype), torch.as_tensor(sigma, dtype=fbm.gammas.dtype), dt
    )
    n = fbm.n_processes + 1
    m = torch.cat([x0.unsqueeze(1), x0.new_zeros(x0.shape[0], n - 1)], dim=1)  # (B, n)
    P = torch.zeros(n, n, dtype=x0.dtype, device=x0.device)  # shared by all samples
    total = x0.new_zeros(x0.shape[0])
    r2 = obs_std**2
    for y in obs:
        m = m @ phi.T
        P = phi @ P @ phi.T + Q
        S = P[0, 0] + r2
        v = y - m[:, 0]
        total = total - 0.5 * (torch.log(2 * math.pi * S) + v * v / S)
        gain = P[:, 0] / S
        m = m + v.unsqueeze(1) * gain
        P = P - S * torch.outer(gain, gain)
    return total


def simulate_fractional_ou(
    fbm: MarkovFBM, theta: float, sigma: float, x0: Tensor, dt: float, steps: int, seed: int = 0
) -> Tensor:
    """Exact samples of the Markov fractional OU at ``dt, ..., steps·dt``: ``(steps, B)``."""
    with torch.no_grad():
        phi, Q = _fou_matrices(fbm, torch.tensor(theta), torch.tensor(sigma), dt)
        evals, evecs = torch.linalg.eigh(0.5 * (Q + Q.T))
        chol = evecs * evals.clamp(min=0).sqrt()  # Q = chol cholᵀ (Q is nearly singular: one BM)
        gen = torch.Generator().manual_seed(seed)
        state = torch.cat([x0.unsqueeze(1), x0.new_zeros(x0.shape[0], fbm.n_processes)], dim=1)
        out = []
        for _ in range(steps):
            state = state @ phi.T + torch.randn(state.shape, generator=gen, dtype=state.dtype) @ chol.T
            out.append(state[:, 0])
        return torch.stack(out)
