"""``deb.LatentSDE``: the path-space KL against a closed form, gradients against finite
differences for every sensealg, and torchsde's ``sdeint(..., logqp=True)`` on the same path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import diffeqbridge as deb
from diffeqbridge.latent import elbo, gaussian_kl

pytestmark = pytest.mark.usefixtures("float64_default")


class Linear(nn.Module):
    """``-rate * z`` (an OU drift)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(rate))

    def forward(self, t, z):
        return -self.rate * z


class Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, t, z):
        return self.value * torch.ones_like(z)


def ou_kl(a: float, b: float, sigma: float, x0: float, T: float) -> float:
    """KL between the laws of OU paths ``dX = -a X dt + σ dW`` (posterior) and ``-b X`` (prior), ``X_0 = x0``.

    Girsanov: ``½ (a - b)²/σ² ∫_0^T E[X_t²] dt`` with ``E[X_t²] = x0² e^{-2at} + σ²/(2a) (1 - e^{-2at})``.
    """
    decay = (1.0 - math.exp(-2 * a * T)) / (2 * a)
    integral = x0**2 * decay + sigma**2 / (2 * a) * (T - decay)
    return 0.5 * (a - b) ** 2 / sigma**2 * integral


def test_kl_matches_ou_closed_form():
    a, b, sigma, x0, T, B = 1.0, 2.5, 0.5, 1.0, 1.0, 4000
    model = deb.LatentSDE(Linear(a), Linear(b), Constant(sigma), noise="additive", alg=deb.SRA1(), dt=2**-7, adaptive=False)
    with torch.no_grad():
        zs, kl = model(torch.full((B, 1), x0), [0.0, 0.5, T], seed=3)
    exact = ou_kl(a, b, sigma, x0, T)
    stderr = float(kl.std()) / math.sqrt(B)
    assert abs(float(kl.mean()) - exact) < 4 * stderr + 2e-3 * exact, (float(kl.mean()), exact, stderr)
    assert stderr < 0.02 * exact  # the check has teeth: 4 standard errors are < 8% of the value
    # the running KL at the middle save time matches the closed form over [0, 0.5] too
    half = ou_kl(a, b, sigma, x0, 0.5)
    assert abs(float(model.kl_path[1].mean()) - half) < 4 * float(model.kl_path[1].std()) / math.sqrt(B) + 2e-3 * half
    assert zs.shape == (3, B, 1) and kl.shape == (B,)


class Posterior(nn.Module):
    def __init__(self, dim: int, ctx_dim: int = 0):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(dim + ctx_dim, 8), nn.Tanh(), nn.Linear(8, dim))
        self.ctx_dim = ctx_dim

    def forward(self, t, z, ctx=None):
        return self.net(z if ctx is None else torch.cat([z, ctx], dim=1))


class WithContext(Posterior):
    def forward(self, t, z, ctx):  # three positional arguments: the context is expected
        return self.net(torch.cat([z, ctx], dim=1))


class Prior(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, dim))

    def forward(self, t, z):
        return self.net(z)


class Diffusion(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.3, 0.6, dim))

    def forward(self, t, z):
        return 0.5 + torch.sigmoid(self.scale * z)


class Encoder(nn.Module):
    def __init__(self, obs: int, ctx: int):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(obs, ctx)

    def forward(self, xs):
        return torch.tanh(self.lin(xs))


B, D, C, DT = 3, 2, 2, 2**-5
TS = [0.0, 0.25, 0.5]
XS = torch.sin(torch.arange(len(TS) * B * 2, dtype=torch.float64)).reshape(len(TS), B, 2)


def _model(alg, sensealg, **kw) -> deb.LatentSDE:
    return deb.LatentSDE(
        WithContext(D, C),
        Prior(D),
        Diffusion(D),
        encoder=Encoder(2, C),
        interpretation="stratonovich" if alg.__class__.__name__ in ("EulerHeun", "ReversibleHeun") else "ito",
        alg=alg,
        sensealg=sensealg,
        dt=DT,
        **kw,
    )


def _loss(model: deb.LatentSDE, z0: torch.Tensor) -> torch.Tensor:
    tree = deb.VirtualBrownianTree(0.0, TS[-1], (B, D), seed=5, tol=2**-12)
    zs, kl = model(z0, TS, xs=XS, brownian=tree)
    return (zs[1:] ** 2).sum() + torch.sin(zs[-1]).sum() + kl.sum()


def _fd_check(model: deb.LatentSDE, rtol: float) -> None:
    z0 = torch.tensor([[0.1, -0.2], [0.3, 0.4], [1.0, 0.5]], requires_grad=True)
    params = [z0, *model.parameters()]
    grads = torch.autograd.grad(_loss(model, z0), params)
    torch.manual_seed(0)
    for _ in range(3):  # random directions through all parameters at once
        dirs = [torch.randn_like(p) for p in params]
        eps = 1e-6
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p += eps * d
            up = float(_loss(model, z0))
            for p, d in zip(params, dirs):
                p -= 2 * eps * d
            down = float(_loss(model, z0))
            for p, d in zip(params, dirs):
                p += eps * d
        fd = (up - down) / (2 * eps)
        ad = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
        assert abs(ad - fd) <= rtol * abs(fd) + 1e-7, (ad, fd)


@pytest.mark.parametrize(
    "alg,sensealg,rtol",
    [
        (deb.EM(), deb.DiscreteAdjoint(), 1e-6),
        (deb.EM(), deb.DiscreteAdjoint(checkpoints=3), 1e-6),
        (deb.EM(), deb.InterpolatingAdjoint(), 1e-6),
        (deb.EulerHeun(), deb.InterpolatingAdjoint(checkpoints=2), 1e-6),
        (deb.ReversibleHeun(), deb.BacksolveAdjoint(), 1e-6),  # algebraically reversible: exact
        (deb.EulerHeun(), deb.BacksolveAdjoint(), 3e-2),  # continuous adjoint: O(dt)
    ],
    ids=["discrete", "discrete-ckpt", "interpolating", "interpolating-heun", "backsolve-reversible", "backsolve-heun"],
)
def test_gradients_match_finite_differences(alg, sensealg, rtol):
    _fd_check(_model(alg, sensealg), rtol)


def test_kl_and_paths_match_torchsde_logqp():
    torchsde = pytest.importorskip("torchsde")
    from problems import torchsde_brownian

    post, prior, diff = Posterior(D), Prior(D), Diffusion(D)
    model = deb.LatentSDE(post, prior, diff, alg=deb.EM(), sensealg=deb.DiscreteAdjoint(), dt=DT)

    class TorchsdeLatent(nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return post(t, y)

        def h(self, t, y):
            return prior(t, y)

        def g(self, t, y):
            return diff(t, y)

    z0 = torch.tensor([[0.1, -0.2], [0.3, 0.4], [1.0, 0.5]], requires_grad=True)
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, D + 1), seed=7, tol=2**-12)
    ts = [0.0, 0.5, 1.0]
    zs, kl = model(z0, ts, brownian=tree)
    ys_ref, logqp = torchsde.sdeint(
        TorchsdeLatent(), z0, torch.tensor(ts), bm=torchsde_brownian(tree), dt=DT, method="euler", logqp=True
    )
    assert torch.allclose(zs, ys_ref, rtol=0, atol=1e-12)
    assert torch.allclose(kl, logqp.sum(0), rtol=1e-12, atol=1e-14)
    assert torch.allclose(model.kl_path[1:] - model.kl_path[:-1], logqp, rtol=1e-12, atol=1e-14)
    params = [z0, *model.parameters()]
    ours = torch.autograd.grad((zs**2).sum() + kl.sum(), params)
    ref = torch.autograd.grad((ys_ref**2).sum() + logqp.sum(), params)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # a (B, D) tree of the same seed is widened to exactly the same path
    narrow = deb.VirtualBrownianTree(0.0, 1.0, (B, D), seed=7, tol=2**-12)
    zs2, kl2 = model(z0, ts, brownian=narrow)
    assert torch.equal(zs2, zs) and torch.equal(kl2, kl)


def test_elbo_and_gaussian_kl():
    mq, sq = torch.tensor([[0.3, -1.0]]), torch.tensor([[0.5, 2.0]])
    mp, sp = torch.zeros(1, 2), torch.ones(1, 2)
    expected = sum(math.log(p / q) + (q**2 + m**2) / (2 * p**2) - 0.5 for m, q, p in [(0.3, 0.5, 1.0), (-1.0, 2.0, 1.0)])
    assert math.isclose(float(gaussian_kl(mq, sq, mp, sp)), expected, rel_tol=1e-12)
    assert torch.equal(elbo(torch.tensor([1.0]), torch.tensor([0.25]), torch.tensor([0.5]), beta=2.0), torch.tensor([-0.5]))


def test_bad_inputs_are_named():
    model = deb.LatentSDE(Linear(1.0), Linear(2.0), Constant(0.5), dt=0.1, alg=deb.EM())
    with pytest.raises(ValueError, match="z0"):
        model(torch.zeros(3), [0.0, 1.0])
    with pytest.raises(ValueError, match="ts"):
        model(torch.zeros(3, 1), [0.0])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(3, 1), [0.0, 1.0], context=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="encoder"):
        model(torch.zeros(3, 1), [0.0, 1.0], xs=torch.zeros(2, 3, 1))
    ctx_model = deb.LatentSDE(WithContext(1, 1), Linear(2.0), Constant(0.5), dt=0.1, alg=deb.EM())
    with pytest.raises(ValueError, match="context"):
        ctx_model(torch.zeros(3, 1), [0.0, 1.0])
