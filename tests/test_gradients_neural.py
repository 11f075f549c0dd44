"""A small neural SDE (float64): every sensealg against each other and against central
finite differences of a fixed-path loss (same Brownian tree, fixed step so the loss is a
smooth function of the parameters); gradients with respect to ``y0`` included.  Also a
``deb.NeuralSDE`` training loop.

Discrete/interpolating/checkpointed gradients are exact gradients of the computed loss, so
they match finite differences to ≤ 1e-5 relative (measured ~1e-9).  ``BacksolveAdjoint`` is
the continuous (Li et al. 2020) adjoint: it matches the discrete gradient only up to the
backward solve's discretisation error, O(dt) here (measured ~5e-3 at dt = 2^-5); the test
checks that bound and that it shrinks with dt.  (Its exact agreement with torchsde's
``sdeint_adjoint`` is in test_gradients_torchsde.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffeqbridge as deb

D, B, T = 3, 8, 1.0


class Diagonal(nn.Module):
    """Diagonal diffusion sigma_i(y_i) = softplus(a_i y_i + b_i) + 0.1 (commutative noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-0.5, 0.5, D, dtype=torch.float64))
        self.b = nn.Parameter(torch.full((D,), -1.0, dtype=torch.float64))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.a * y + self.b) + 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.drift = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, D)).double()
    model.diffusion = Diagonal()
    return model


def loss_and_grads(model: nn.Module, y0: torch.Tensor, sensealg, dt: float = 2**-5, grads: bool = True):
    tree = deb.VirtualBrownianTree(0.0, T, (B, D), seed=11)
    prob = deb.SDEProblem(
        lambda t, y: model.drift(y), lambda t, y: model.diffusion(y), y0, (0.0, T), interpretation="stratonovich", params=model
    )
    ys = deb.solve(prob, deb.EulerHeun(), dt=dt, saveat=[0.0, 0.5, T], brownian=tree, sensealg=sensealg).ys
    loss = (ys[1] ** 2).mean() + torch.sin(ys[2]).sum()
    if not grads:
        return float(loss.detach())
    params = [y0, *model.parameters()]
    g = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([x.reshape(-1) for x in g])


SENSEALGS = {
    "none": lambda: None,
    "discrete_ckpt": lambda: deb.DiscreteAdjoint(checkpoints=4),  # 0.25, 0.75: on the dt grid
    "interpolating": lambda: deb.InterpolatingAdjoint(),
    "interpolating_ckpt": lambda: deb.InterpolatingAdjoint(checkpoints=4),
    "backsolve": lambda: deb.BacksolveAdjoint(),
}


def _y0() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, B * D, dtype=torch.float64).reshape(B, D).requires_grad_(True)


def test_neural_sde_finite_differences() -> None:
    model = make_model()
    _, g_ref = loss_and_grads(model, _y0(), None)
    # central differences along 4 random directions in (y0, theta)-space
    params = [_y0(), *model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gen = torch.Generator().manual_seed(1)
    eps = 1e-5
    for _ in range(4):
        v = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        vals = []
        for sign in (1.0, -1.0):
            shifted = flat + sign * eps * v
            offset = 0
            with torch.no_grad():
                y0 = shifted[: B * D].reshape(B, D).clone()
                offset = B * D
                for p in model.parameters():
                    p.copy_(shifted[offset : offset + p.numel()].reshape(p.shape))
                    offset += p.numel()
            vals.append(loss_and_grads(model, y0, None, grads=False))
        fd = (vals[0] - vals[1]) / (2 * eps)
        with torch.no_grad():  # restore
            offset = B * D
            for p in model.parameters():
                p.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
        exact = float(g_ref @ v)
        assert abs(fd - exact) <= 1e-5 * abs(exact), (fd, exact)


@pytest.mark.parametrize("name", [n for n in SENSEALGS if n not in ("none", "backsolve")])
def test_neural_sde_sensealgs_agree(name: str) -> None:
    model = make_model()
    loss_ref, g_ref = loss_and_grads(model, _y0(), None)
    loss, g = loss_and_grads(model, _y0(), SENSEALGS[name]())
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref)
    rel = float((g - g_ref).norm() / g_ref.norm())
    assert rel <= 1e-10, rel
    # y0 part separately
    n = B * D
    assert float((g[:n] - g_ref[:n]).norm() / g_ref[:n].norm()) <= 1e-10


def test_neural_sde_backsolve_converges_to_discrete() -> None:
    model = make_model()
    errs = []
    for dt in (2**-3, 2**-5):
        _, g_ref = loss_and_grads(model, _y0(), None, dt=dt)
        _, g = loss_and_grads(model, _y0(), deb.BacksolveAdjoint(), dt=dt)
        errs.append(float((g - g_ref).norm() / g_ref.norm()))
    assert errs[1] < errs[0]
    assert errs[1] < 2e-2, errs


@pytest.mark.parametrize("sensealg", [None, "backsolve"])
def test_neural_sde_module_trains(sensealg) -> None:
    torch.manual_seed(0)
    drift = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    diffusion = nn.Sequential(nn.Linear(2, 2), nn.Softplus()).double()
    sde = deb.NeuralSDE(
        drift,
        diffusion,
        noise="diagonal",
        interpretation="stratonovich",
        alg=deb.EulerHeun(),
        sensealg=deb.BacksolveAdjoint() if sensealg else None,
        dt=0.1,
    )
    assert {id(p) for p in sde.parameters()} == {id(p) for p in [*drift.parameters(), *diffusion.parameters()]}
    y0 = torch.ones(8, 2, dtype=torch.float64)
    target = torch.tensor([0.5, -0.5], dtype=torch.float64)
    opt = torch.optim.Adam(sde.parameters(), lr=3e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        ys = sde(y0, [0.0, 0.5, 1.0], seed=0)
        assert ys.shape == (3, 8, 2)
        loss = ((ys[-1] - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_neural_ode_module() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    ode = deb.NeuralODE(net, alg=deb.Tsit5(), sensealg=deb.BacksolveAdjoint(), atol=1e-8, rtol=1e-8)
    y0 = torch.ones(4, 2, dtype=torch.float64)
    ys = ode(y0, [0.0, 1.0])
    g1 = torch.autograd.grad(ys[-1].sum(), list(net.parameters()))
    ys = deb.NeuralODE(net, alg=deb.Tsit5(), atol=1e-8, rtol=1e-8)(y0, [0.0, 1.0])
    g2 = torch.autograd.grad(ys[-1].sum(), list(net.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
