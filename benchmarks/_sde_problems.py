"""SDE test problems shared by the benchmarks, written once per library.

Every problem gives, for ``B`` samples in float64 on ``[0, 1]``:

* ``ours(B)`` -> a ``deb.SDEProblem``;
* ``torchsde(B)`` -> a ``torchsde``-style module (``f``, ``g``, ``noise_type``, ``sde_type``)
  with the same drift/diffusion (Itô);
* ``diffrax_terms(strat)`` -> ``(drift, diffusion)`` jax functions for one sample
  (``strat=True``: the Stratonovich drift ``f - 1/2 g g'`` of the *same* SDE, for diffrax's
  Stratonovich Runge–Kutta solvers such as SPaRK, whose limit is the Stratonovich solution);
* ``exact(t, W)`` (torch) and ``exact_np(t, W)`` (numpy): the exact solution at time ``t``
  given the Brownian value ``W(t) - W(0)`` of shape ``(B, m)``.

Problems (SciML's SDEProblemLibrary where named):

* ``gbm`` (``prob_sde_linear``): du = 1.01 u dt + 0.87 u dW, u0 = 1/2.
* ``wave`` (``prob_sde_wave``): du = -0.01 sin u cos^3 u dt + 0.1 cos^2 u dW, u0 = 1.
* ``additive`` (``prob_sde_additive``): du = (b/sqrt(1+t) - u/(2(1+t))) dt + a b/sqrt(1+t) dW,
  a = 0.1, b = 0.05, u0 = 1.
* ``rot2d``: a 2-D nonlinear, coupled problem with scalar noise and a closed-form
  solution: ``x = asinh(y)`` componentwise, where ``y`` is the rotating complex GBM
  ``dz = lam z dt + mu z dW`` (``lam = 0.1 + 1i``, ``mu = 0.3 + 0.3i``, ``z0 = 1``), i.e.
  ``dy = A y dt + C y dW`` with ``A, C`` the 2x2 real forms of ``lam, mu``.  By Itô,
  ``dx_i = [(A sinh x)_i / cosh x_i - sinh x_i (C sinh x)_i^2 / (2 cosh^3 x_i)] dt
  + (C sinh x)_i / cosh x_i dW``, and ``x(t) = asinh(z0 exp((lam - mu^2/2) t + mu W))``.
* ``vp_gmm``: the reverse-time VP SDE (``beta`` 0.1 -> 20) of a 2-D Gaussian mixture
  (weights 0.5/0.3/0.2, means (-3,0), (3,0), (0,3), std 0.5) with the exact score
  (``diffeqbridge.diffusion``), from ``t = 1`` down to ``t = 1e-3``, additive noise, ``x_T``
  from the prior (the same ``B`` draws for every library).  Ours integrates backwards in
  ``t``; torchsde and diffrax integrate forwards in ``s = 1 - t`` (drift ``-F(1 - s, x)``,
  the same ``g``), torchsde on our tree's path (``torchsde_brownian_from(tree, reverse=True)``:
  ``dB = -dW``, the space-time Lévy area is unchanged by the reflection).  No pathwise
  closed form: ``exact`` is None and the reference is a fine fixed-step ShARK solve
  (``reference_dt``) on the same path — ours' for ours and torchsde, diffrax's own on its
  own path for diffrax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

T0, T1 = 0.0, 1.0

GBM_MU, GBM_SIGMA, GBM_U0 = 1.01, 0.87, 0.5
WAVE_U0 = 1.0
ADD_A, ADD_B, ADD_U0 = 0.1, 0.05, 1.0
ROT_LAM = complex(0.1, 1.0)
ROT_MU = complex(0.3, 0.3)


@dataclass
class Problem:
    name: str
    title: str
    dim: int
    noise: str  # ours: "diagonal" | "additive" | "scalar"
    noise_dim: int  # m: Brownian components
    ours: Callable[[int], Any]
    torchsde: Callable[[int], Any]
    diffrax_terms: Callable[[bool], tuple[Callable, Callable]]
    exact: Callable[[float, Any], Any]
    exact_np: Callable[[float, Any], Any] | None
    u0: tuple[float, ...]
    tspan: tuple[float, float] = (T0, T1)  # ours; torchsde/diffrax integrate s in (0, |t1 - t0|) when reversed
    y0_batch: Callable[[int], Any] | None = None  # (B, dim) float64 numpy initial states (else u0 for all)
    reference_dt: float | None = None  # fine fixed step of the reference solve when exact is None
    ours_strat: Callable[[int], Any] | None = None  # the same SDE in Stratonovich form (drift f - 1/2 g'g)

    @property
    def reversed(self) -> bool:
        return self.tspan[1] < self.tspan[0]


# ----------------------------------------------------------------------------- gbm
def _gbm() -> Problem:
    import numpy as np
    import torch

    import diffeqbridge as deb

    mu, sigma, u0 = GBM_MU, GBM_SIGMA, GBM_U0

    def ours(B):
        return deb.SDEProblem(
            lambda t, y: mu * y, lambda t, y: sigma * y, torch.full((B, 1), u0, dtype=torch.float64), (T0, T1), noise="diagonal"
        )

    def tsde(B):
        return torchsde_module(lambda t, y: mu * y, lambda t, y: sigma * y, "diagonal")

    def terms(strat):
        shift = 0.5 * sigma * sigma if strat else 0.0
        return (lambda t, y, a: (mu - shift) * y), (lambda t, y, a: sigma * y)

    rate = mu - 0.5 * sigma**2

    def ours_strat(B):
        return deb.SDEProblem(
            lambda t, y: rate * y,
            lambda t, y: sigma * y,
            torch.full((B, 1), u0, dtype=torch.float64),
            (T0, T1),
            noise="diagonal",
            interpretation="stratonovich",
        )

    return Problem(
        "gbm",
        "GBM du = 1.01u dt + 0.87u dW",
        1,
        "diagonal",
        1,
        ours,
        tsde,
        terms,
        lambda t, w: u0 * torch.exp(rate * t + sigma * w),
        lambda t, w: u0 * np.exp(rate * t + sigma * np.asarray(w)),
        (u0,),
        ours_strat=ours_strat,
    )


# ---------------------------------------------------------------------------- wave
def _wave() -> Problem:
    import numpy as np
    import torch

    import diffeqbridge as deb

    u0 = WAVE_U0

    def f_t(t, y):
        return -0.01 * torch.sin(y) * torch.cos(y) ** 3

    def g_t(t, y):
        return 0.1 * torch.cos(y) ** 2

    def ours(B):
        return deb.SDEProblem(f_t, g_t, torch.full((B, 1), u0, dtype=torch.float64), (T0, T1), noise="diagonal")

    def tsde(B):
        return torchsde_module(f_t, g_t, "diagonal")

    def f_strat(t, y):  # - 1/2 g g' with g = 0.1 cos^2, g' = -0.2 cos sin
        return f_t(t, y) + 0.01 * torch.cos(y) ** 3 * torch.sin(y)

    def ours_strat(B):
        y0 = torch.full((B, 1), u0, dtype=torch.float64)
        return deb.SDEProblem(f_strat, g_t, y0, (T0, T1), noise="diagonal", interpretation="stratonovich")

    def terms(strat):
        import jax.numpy as jnp

        def f(t, y, a):
            out = -0.01 * jnp.sin(y) * jnp.cos(y) ** 3
            if strat:  # - 1/2 g g' with g = 0.1 cos^2, g' = -0.2 cos sin
                out = out - 0.5 * (0.1 * jnp.cos(y) ** 2) * (-0.2 * jnp.cos(y) * jnp.sin(y))
            return out

        return f, (lambda t, y, a: 0.1 * jnp.cos(y) ** 2)

    return Problem(
        "wave",
        "wave (prob_sde_wave)",
        1,
        "diagonal",
        1,
        ours,
        tsde,
        terms,
        lambda t, w: torch.atan(0.1 * w + math.tan(u0)),
        lambda t, w: np.arctan(0.1 * np.asarray(w) + math.tan(u0)),
        (u0,),
        ours_strat=ours_strat,
    )


# ------------------------------------------------------------------------ additive
def _additive() -> Problem:
    import numpy as np
    import torch

    import diffeqbridge as deb

    a, b, u0 = ADD_A, ADD_B, ADD_U0

    def f_t(t, y):
        s = torch.sqrt(1 + t).reshape(-1, 1)
        return b / s - y / (2 * s * s)

    def g_t(t, y):
        s = torch.sqrt(1 + t).reshape(-1, 1)
        return (a * b / s).expand_as(y)

    def ours(B):
        return deb.SDEProblem(f_t, g_t, torch.full((B, 1), u0, dtype=torch.float64), (T0, T1), noise="additive")

    def tsde(B):
        # torchsde's additive noise wants g of shape (B, d, m)
        return torchsde_module(
            lambda t, y: b / torch.sqrt(1 + t) - y / (2 * (1 + t)),
            lambda t, y: (a * b / torch.sqrt(1 + t)).expand(y.shape[0], 1, 1),
            "additive",
        )

    def terms(strat):  # additive noise: Itô = Stratonovich
        import jax.numpy as jnp

        return (lambda t, y, _: b / jnp.sqrt(1 + t) - y / (2 * (1 + t))), (
            lambda t, y, _: a * b / jnp.sqrt(1 + t) * jnp.ones_like(y)
        )

    return Problem(
        "additive",
        "additive (prob_sde_additive)",
        1,
        "additive",
        1,
        ours,
        tsde,
        terms,
        lambda t, w: u0 / math.sqrt(1 + t) + b * (t + a * w) / math.sqrt(1 + t),
        lambda t, w: u0 / math.sqrt(1 + t) + b * (t + a * np.asarray(w)) / math.sqrt(1 + t),
        (u0,),
    )


# ---------------------------------------------------------------------------- rot2d
def _rot2d() -> Problem:
    import numpy as np
    import torch

    import diffeqbridge as deb

    la, lb = ROT_LAM.real, ROT_LAM.imag
    ca, cb = ROT_MU.real, ROT_MU.imag
    # Stratonovich form of the linear SDE: A - C^2/2, with C^2 <-> mu^2
    mu2 = ROT_MU * ROT_MU
    sa, sb = la - 0.5 * mu2.real, lb - 0.5 * mu2.imag

    def lin(x1, x2, p, q):  # (p + iq)(x1 + i x2) as a real pair
        return p * x1 - q * x2, q * x1 + p * x2

    def fields(lib):
        def f(y):
            y1, y2 = lib.sinh(y[..., 0]), lib.sinh(y[..., 1])
            c1, c2 = lib.cosh(y[..., 0]), lib.cosh(y[..., 1])
            a1, a2 = lin(y1, y2, la, lb)
            g1, g2 = lin(y1, y2, ca, cb)
            return lib.stack([a1 / c1 - y1 * g1**2 / (2 * c1**3), a2 / c2 - y2 * g2**2 / (2 * c2**3)], -1)

        def f_strat(y):
            y1, y2 = lib.sinh(y[..., 0]), lib.sinh(y[..., 1])
            c1, c2 = lib.cosh(y[..., 0]), lib.cosh(y[..., 1])
            a1, a2 = lin(y1, y2, sa, sb)
            return lib.stack([a1 / c1, a2 / c2], -1)

        def g(y):
            y1, y2 = lib.sinh(y[..., 0]), lib.sinh(y[..., 1])
            g1, g2 = lin(y1, y2, ca, cb)
            return lib.stack([g1 / lib.cosh(y[..., 0]), g2 / lib.cosh(y[..., 1])], -1)

        return f, f_strat, g

    tf, tfs, tg = fields(torch)

    def ours(B, strat=False):
        y0 = torch.zeros((B, 2), dtype=torch.float64)
        y0[:, 0] = math.asinh(1.0)
        f = tfs if strat else tf
        kind = "stratonovich" if strat else "ito"
        return deb.SDEProblem(lambda t, y: f(y), lambda t, y: tg(y), y0, (T0, T1), noise="scalar", interpretation=kind)

    def tsde(B):
        return torchsde_module(lambda t, y: tf(y), lambda t, y: tg(y).unsqueeze(-1), "scalar")

    def terms(strat):
        import jax.numpy as jnp

        jf, jfs, jg = fields(jnp)
        return (lambda t, y, _: (jfs if strat else jf)(y)), (lambda t, y, _: jg(y)[:, None])

    rate = ROT_LAM - 0.5 * mu2

    def exact_parts(t, w, exp, cos, sin, asinh, stack):
        mag = exp(rate.real * t + ROT_MU.real * w)
        ang = rate.imag * t + ROT_MU.imag * w
        return stack([asinh(mag * cos(ang)), asinh(mag * sin(ang))])

    def exact(t, w):  # w: (B, 1)
        w = w[:, 0]
        return exact_parts(t, w, torch.exp, torch.cos, torch.sin, torch.asinh, lambda xs: torch.stack(xs, -1))

    def exact_np(t, w):
        w = np.asarray(w)[:, 0]
        return exact_parts(t, w, np.exp, np.cos, np.sin, np.arcsinh, lambda xs: np.stack(xs, -1))

    return Problem(
        "rot2d",
        "2-D nonlinear asinh(rotating GBM), scalar noise",
        2,
        "scalar",
        1,
        ours,
        tsde,
        terms,
        exact,
        exact_np,
        (math.asinh(1.0), 0.0),
        ours_strat=lambda B: ours(B, strat=True),
    )


# --------------------------------------------------------------------------- vp_gmm
GMM_WEIGHTS = (0.5, 0.3, 0.2)
GMM_MEANS = ((-3.0, 0.0), (3.0, 0.0), (0.0, 3.0))
GMM_STD = 0.5
VP_T_END = 1e-3


def _vp_gmm() -> Problem:
    import torch

    import diffeqbridge as deb
    import diffeqbridge.diffusion as dd

    sde = dd.VPSDE()
    gmm = dd.GaussianMixture(GMM_WEIGHTS, GMM_MEANS, GMM_STD)
    score = gmm.score_model(sde, "score")
    b0, b1, T = sde.beta_min, sde.beta_max, float(sde.T)

    def drift_t(t, x):  # reverse-time drift F(t, x) = f(t) x - g(t)^2 score(x, t), t: (B,) or scalar
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        beta = (b0 + t * (b1 - b0)).unsqueeze(-1)
        return -0.5 * beta * x - beta * score(x, t)

    def g_t(t, x):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return torch.sqrt(b0 + t * (b1 - b0)).unsqueeze(-1).expand_as(x)

    def y0_batch(B):
        return sde.prior_sample((B, 2), seed=7).numpy()

    def ours(B):
        x_T = torch.as_tensor(y0_batch(B))
        return deb.SDEProblem(drift_t, g_t, x_T, (T, VP_T_END), noise="additive")

    def tsde(B):  # forward in s = T - t
        return torchsde_module(lambda s, x: -drift_t(T - s, x), lambda s, x: torch.diag_embed(g_t(T - s, x)), "additive")

    def terms(strat):  # one sample, forward in s; additive noise: Itô = Stratonovich
        import jax
        import jax.numpy as jnp

        w, mu = jnp.log(jnp.asarray(GMM_WEIGHTS)), jnp.asarray(GMM_MEANS)

        def jscore(x, t):
            log_alpha = -0.25 * t * t * (b1 - b0) - 0.5 * t * b0
            alpha = jnp.exp(log_alpha)
            var = alpha**2 * GMM_STD**2 - jnp.expm1(2 * log_alpha)  # (scalar) per component (same std)
            diff = alpha * mu - x  # (K, 2)
            logp = w - jnp.log(var) - jnp.sum(diff**2, -1) / (2 * var)
            r = jax.nn.softmax(logp)
            return r @ diff / var

        def f(s, x, _):
            t = T - s
            beta = b0 + t * (b1 - b0)
            return 0.5 * beta * x + beta * jscore(x, t)

        def g(s, x, _):
            return jnp.sqrt(b0 + (T - s) * (b1 - b0)) * jnp.ones_like(x)

        return f, g

    return Problem(
        "vp_gmm",
        "reverse VP SDE, 2-D Gaussian mixture (exact score)",
        2,
        "additive",
        2,
        ours,
        tsde,
        terms,
        None,
        None,
        (0.0, 0.0),
        tspan=(T, VP_T_END),
        y0_batch=y0_batch,
        reference_dt=2.0**-14,
    )


def problems() -> dict[str, Problem]:
    return {p.name: p for p in (_gbm(), _wave(), _additive(), _rot2d(), _vp_gmm())}


# --------------------------------------------------------------- torchsde Brownian
def torchsde_module(f, g, noise_type: str, sde_type: str = "ito"):
    """A torchsde SDE ``nn.Module`` with drift ``f(t, y)`` and diffusion ``g(t, y)``."""
    import torch

    class SDE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.noise_type, self.sde_type = noise_type, sde_type

        def f(self, t, y):
            return f(t, y)

        def g(self, t, y):
            return g(t, y)

    return SDE()


def torchsde_brownian_from(tree, reverse_from: float | None = None):
    """A ``torchsde.BaseBrownian`` that returns ``tree``'s increments (same path for torchsde).

    ``torchsde`` asks for ``(dW, U)`` with ``U = int_s^t (W_u - W_s) du = h (H + dW/2)``.
    ``reverse_from = T``: the reflected path ``B(s) = W(T - s) - W(T)`` that a backward solve
    from ``T`` sees: ``B(s2) - B(s1) = -(W(T - s1) - W(T - s2))`` and the space-time Lévy
    area ``H`` of ``[s1, s2]`` equals the one of ``[T - s2, T - s1]``.
    """
    import torch
    import torchsde

    class TreeBrownian(torchsde.BaseBrownian):
        __slots__ = ("tree",)

        def __init__(self, tree):
            self.tree = tree

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            if tb is None:
                w = (
                    self.tree.W(float(ta))
                    if reverse_from is None
                    else self.tree.W(reverse_from - float(ta)) - self.tree.W(reverse_from)
                )
                return (w, None) if return_U else w
            s, t = float(ta), float(tb)
            if reverse_from is None:
                dw, h = self.tree(s, t)
            else:
                dw, h = self.tree(reverse_from - t, reverse_from - s)
                dw = -dw
            if return_U:
                u = (t - s) * (h + 0.5 * dw)
                return (dw, u, None) if return_A else (dw, u)
            return (dw, None) if return_A else dw

        def __repr__(self):
            return f"TreeBrownian({self.tree!r})"

        @property
        def dtype(self):
            return torch.float64

        @property
        def device(self):
            return torch.device("cpu")

        @property
        def shape(self):
            return torch.Size(self.tree.shape)

        @property
        def levy_area_approximation(self):
            return "space-time"

    return TreeBrownian(tree)


class CountingSDE:
    """Wraps a torchsde SDE module, counting batch calls of ``f`` and ``g``."""

    def __init__(self, sde):
        import torch

        class Wrapped(torch.nn.Module):
            noise_type, sde_type = sde.noise_type, sde.sde_type

            def __init__(inner):
                super().__init__()
                inner.sde = sde
                inner.nf = 0
                inner.ng = 0

            def f(inner, t, y):
                inner.nf += 1
                return inner.sde.f(t, y)

            def g(inner, t, y):
                inner.ng += 1
                return inner.sde.g(t, y)

        self.module = Wrapped()

    def reset(self):
        self.module.nf = self.module.ng = 0

    @property
    def nfe(self) -> int:
        return self.module.nf + self.module.ng
