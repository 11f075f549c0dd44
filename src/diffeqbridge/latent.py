"""``LatentSDE``: a posterior and a prior SDE sharing a diffusion, with the path-space KL.

Li, Wong, Chen, Duvenaud, "Scalable Gradients for Stochastic Differential Equations"
(AISTATS 2020), section 5: the posterior ``dZ = h_φ(t, Z, ctx) dt + σ(t, Z) dW`` and the prior
``dZ = f_θ(t, Z) dt + σ(t, Z) dW`` share the diffusion, so by Girsanov's theorem

    KL(posterior path law || prior path law) = E ∫ ½ ‖u(t, Z_t)‖² dt,   u = (h - f) / σ

(componentwise division: diagonal noise).  The integrand is carried as one extra state
component with zero diffusion on the same solve (torchsde's ``sdeint(..., logqp=True)``), so
the KL comes out of the forward pass itself and every sensealg differentiates it.

The augmented state ``[Z, L]`` has diagonal noise of size ``D + 1``; the Brownian tree's
components are keyed by element index, so its first ``D`` components are exactly the path a
``(B, D)`` tree of the same seed gives (a ``(B, D)`` ``brownian`` is widened accordingly).

The ELBO (Li et al. eq. 13) for observations ``x_{t_i}`` is
``Σ_i log p(x_{t_i} | Z_{t_i}) - KL(q(Z_0) || p(Z_0)) - KL_path``: :func:`elbo`, with
:func:`gaussian_kl` for the initial state.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._leaves import through_leaves
from .brownian import VirtualBrownianTree
from .neural import _caller
from .problem import SDEProblem
from .solve import solve

__all__ = ["LatentSDE", "elbo", "gaussian_kl"]

#: |σ| below this is replaced by ±this in u = (h - f) / σ (torchsde's ``stable_division``)
DIVISION_EPS = 1e-7


def _positional_arity(net: nn.Module, required: bool = False) -> int:
    """Number of positional parameters of ``net.forward`` (only those without a default if ``required``)."""
    try:
        params = inspect.signature(net.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and not (required and p.default is not p.empty) for p in params
    )


def stable_divide(a: Tensor, b: Tensor, eps: float = DIVISION_EPS) -> Tensor:
    """``a / b`` with ``|b| < eps`` replaced by ``eps * sign(b)`` (``sign(0) -> +1``)."""
    sign = torch.where(b >= 0, 1.0, -1.0).to(b.dtype)
    return a / torch.where(b.abs().detach() > eps, b, eps * sign)


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(N(mean_q, std_q²) || N(mean_p, std_p²)) for diagonal Gaussians, summed over all axes but the first: ``(B,)``."""
    var_ratio = (std_q / std_p) ** 2
    kl = 0.5 * (var_ratio + ((mean_q - mean_p) / std_p) ** 2 - 1.0 - torch.log(var_ratio))
    return kl.reshape(kl.shape[0], -1).sum(dim=1)


def elbo(log_likelihood: Tensor, kl_path: Tensor, kl_initial: Tensor | None = None, beta: float = 1.0) -> Tensor:
    """Per-sample evidence lower bound ``log p(x|Z) - β (KL_path + KL_0)``; all inputs ``(B,)``.

    ``beta`` < 1 anneals the KL terms (Li et al.'s ``kl_anneal_iters``); ``beta = 1`` is the bound.
    """
    kl = kl_path if kl_initial is None else kl_path + kl_initial
    return log_likelihood - beta * kl


def _context_at(context: Tensor, context_ts: Tensor, t: Tensor) -> Tensor:
    """Piecewise-constant context: for ``t`` in ``[ts[k], ts[k+1])`` the context of ``ts[k+1]``.

    As torchsde's ``latent_sde_lorenz`` example: the posterior at ``t`` sees the encoding of the
    next observation (an encoder run backwards in time summarises the future).
    ``context (T, B, C)``, ``context_ts (T,)``, ``t (B,)`` -> ``(B, C)``.
    """
    index = torch.searchsorted(context_ts.to(t.dtype), t.detach().contiguous(), right=True)
    index = index.clamp(max=context.shape[0] - 1)
    return context[index, torch.arange(context.shape[1], device=context.device)]


class LatentSDE(nn.Module):
    """Posterior SDE, prior SDE and shared (diagonal) diffusion over a latent ``Z`` of shape ``(B, D)``.

    Args:
        posterior_drift: ``h(t, z)`` / ``h(z)``, or ``h(t, z, ctx)`` when a context is used
            (``t (B,)``, ``z (B, D)``, ``ctx (B, C)`` -> ``(B, D)``).
        prior_drift: ``f(t, z)`` or ``f(z)`` -> ``(B, D)``.
        diffusion: ``σ(t, z)`` or ``σ(z)`` -> ``(B, D)`` (diagonal noise, shared by both SDEs).
        noise: ``"diagonal"``, or ``"additive"`` when ``σ`` does not depend on ``z`` (the
            augmented system is then additive too: ``SOSRA``/``SRA1`` apply).
        encoder: optional ``nn.Module`` mapping observations ``xs (T, B, ...)`` to the context
            ``(T, B, C)`` at the same times (e.g. a GRU run backwards in time).
        interpretation: ``"ito"`` | ``"stratonovich"`` (the KL formula holds for both: the
            shared diffusion gives both drifts the same Itô correction).
        alg, sensealg, **solve_kwargs: as :class:`diffeqbridge.NeuralSDE` (``dt``, tolerances...).

    ``forward(z0, ts, xs=None, context=None, seed=0, brownian=None) -> (zs, kl)``: posterior
    samples ``zs (T, B, D)`` at ``ts`` and the path KL ``kl (B,)`` over ``[ts[0], ts[-1]]``;
    ``self.kl_path (T, B)`` holds the running KL at every save time, ``self.stats`` the
    solve's statistics.  ``forward_prior(z0, ts, seed)`` samples the prior.
    """

    def __init__(
        self,
        posterior_drift: nn.Module,
        prior_drift: nn.Module,
        diffusion: nn.Module,
        encoder: nn.Module | None = None,
        noise: str = "diagonal",
        interpretation: str = "ito",
        alg: Any = None,
        sensealg: Any = None,
        **solve_kwargs: Any,
    ):
        super().__init__()
        for key in ("saveat", "brownian", "seed", "sensealg", "alg"):
            if key in solve_kwargs:
                raise TypeError(f"LatentSDE: pass {key} to forward()/the constructor argument, not in **solve_kwargs")
        if noise not in ("diagonal", "additive"):
            raise ValueError(f"noise must be 'diagonal' or 'additive' (σ independent of z); got {noise!r}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module or None; got {type(encoder).__name__}")
        self.posterior_drift, self.prior_drift, self.diffusion, self.encoder = (posterior_drift, prior_drift, diffusion, encoder)
        self._h = _caller(posterior_drift, "posterior_drift")
        self._h_takes_ctx = _positional_arity(posterior_drift) >= 3
        self._h_needs_ctx = _positional_arity(posterior_drift, required=True) >= 3
        self._f = _caller(prior_drift, "prior_drift")
        self._g = _caller(diffusion, "diffusion")
        self.noise, self.interpretation, self.alg, self.sensealg, self.solve_kwargs = (
            noise,
            interpretation,
            alg,
            sensealg,
            solve_kwargs,
        )
        self.kl_path: Tensor | None = None
        self.stats: Any = None

    elbo = staticmethod(elbo)
    gaussian_kl = staticmethod(gaussian_kl)

    # ------------------------------------------------------------------ fields
    def _posterior(self, t: Tensor, z: Tensor, ctx: tuple[Tensor, Tensor] | None) -> Tensor:
        if ctx is None:
            return self._h(t, z)
        return self.posterior_drift(t, z, _context_at(ctx[0], ctx[1], t))

    def augmented_drift(self, t: Tensor, y: Tensor, ctx: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``[h, ½‖(h - f)/σ‖²]`` for the augmented state ``y = [z, L]`` of shape ``(B, D + 1)``."""
        z = y[:, :-1]
        h, f, g = self._posterior(t, z, ctx), self._f(t, z), self._g(t, z)
        u = stable_divide(h - f, g)
        return torch.cat([h, 0.5 * (u * u).sum(dim=1, keepdim=True)], dim=1)

    def augmented_diffusion(self, t: Tensor, y: Tensor) -> Tensor:
        """``[σ, 0]``: the KL component has no noise."""
        g = self._g(t, y[:, :-1])
        return torch.cat([g, torch.zeros_like(g[:, :1])], dim=1)

    # ------------------------------------------------------------------ solving
    def _tree(self, brownian: VirtualBrownianTree | None, batch: int, dim: int) -> VirtualBrownianTree | None:
        if brownian is None or tuple(brownian.shape) == (batch, dim + 1):
            return brownian
        if not isinstance(brownian, VirtualBrownianTree):
            raise TypeError(f"brownian must be a deb.VirtualBrownianTree or None; got {type(brownian).__name__}")
        if tuple(brownian.shape) != (batch, dim):
            raise ValueError(
                f"brownian has shape {tuple(brownian.shape)}; LatentSDE needs (B, D) = {(batch, dim)} "
                f"(or the augmented (B, D + 1))"
            )
        # same seed and resolution: the first D components are exactly this tree's path
        return VirtualBrownianTree(
            brownian.t0,
            brownian.t1,
            (batch, dim + 1),
            seed=brownian.seed,
            tol=brownian.tol,
            dtype=brownian.dtype,
            device=brownian.device,
        )

    def _check(self, z0: Tensor, ts: Any) -> Tensor:
        if not isinstance(z0, Tensor) or z0.ndim != 2:
            raise ValueError(f"z0 must be a tensor of shape (B, D); got {getattr(z0, 'shape', type(z0).__name__)}")
        times = torch.as_tensor(ts, dtype=torch.float64).detach().flatten()
        if times.numel() < 2:
            raise ValueError("LatentSDE.forward: ts needs at least two times (t0 and t1)")
        return times

    def _context(self, xs: Tensor | None, context: Tensor | None, times: Tensor, batch: int) -> Tensor | None:
        if xs is not None and context is not None:
            raise ValueError("pass either xs (encoded by the encoder) or context, not both")
        if xs is not None:
            if self.encoder is None:
                raise ValueError("xs was given but this LatentSDE has no encoder")
            context = self.encoder(xs)
        if context is None:
            if self._h_needs_ctx:
                raise ValueError("posterior_drift takes a context (t, z, ctx): pass xs= or context=")
            return None
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[:2] != (times.numel(), batch):
            raise ValueError(
                f"context must have shape (T, B, C) = ({times.numel()}, {batch}, C) matching ts and z0; "
                f"got {getattr(context, 'shape', type(context).__name__)}"
            )
        if not self._h_takes_ctx:
            raise ValueError("a context was given but posterior_drift does not take one: define forward(t, z, ctx)")
        return context

    def forward(
        self,
        z0: Tensor,
        ts: Sequence[float] | Tensor,
        xs: Tensor | None = None,
        context: Tensor | None = None,
        seed: int = 0,
        brownian: VirtualBrownianTree | None = None,
    ) -> tuple[Tensor, Tensor]:
        times = self._check(z0, ts)
        batch, dim = z0.shape
        context = self._context(xs, context, times, batch)
        tspan = (float(times[0]), float(times[-1]))
        tree = self._tree(brownian, batch, dim)
        field_params = [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

        def run(z0_: Tensor, ctx_leaf: Tensor | None = None) -> tuple[Tensor, ...]:
            ctx = None if ctx_leaf is None else (ctx_leaf, times.to(ctx_leaf.device))
            y0 = torch.cat([z0_, torch.zeros_like(z0_[:, :1])], dim=1)
            prob = SDEProblem(
                lambda t, y: self.augmented_drift(t, y, ctx),
                self.augmented_diffusion,
                y0,
                tspan,
                noise=self.noise,
                interpretation=self.interpretation,
                params=field_params + ([] if ctx_leaf is None else [ctx_leaf]),
            )
            sol = solve(prob, self.alg, saveat=times, seed=seed, brownian=tree, sensealg=self.sensealg, **self.solve_kwargs)
            self.stats = sol.stats
            return (sol.ys,)

        if context is not None and context.requires_grad and torch.is_grad_enabled():
            # the context comes from the encoder's graph: the solve sees a leaf copy (in params)
            (ys,) = through_leaves(run, [z0, context], field_params)
        else:
            (ys,) = run(z0, context)
        self.kl_path = ys[..., -1]
        return ys[..., :-1], ys[-1, :, -1]

    def forward_prior(
        self, z0: Tensor, ts: Sequence[float] | Tensor, seed: int = 0, brownian: VirtualBrownianTree | None = None
    ) -> Tensor:
        """Samples of the prior ``dZ = f dt + σ dW`` at ``ts``: ``(T, B, D)``."""
        times = self._check(z0, ts)
        prob = SDEProblem(
            self._f,
            self._g,
            z0,
            (float(times[0]), float(times[-1])),
            noise=self.noise,
            interpretation=self.interpretation,
            params=[*self.prior_drift.parameters(), *self.diffusion.parameters()],
        )
        return solve(prob, self.alg, saveat=times, seed=seed, brownian=brownian, sensealg=self.sensealg, **self.solve_kwargs).ys
