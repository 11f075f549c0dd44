"""diffeqbridge.jax: same values and gradients as the torch path on the same problem and seed."""

from __future__ import annotations

import pytest
import torch

import diffeqbridge as deb

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from diffeqbridge.jax import solve as jsolve  # noqa: E402

B, T = 4, 1.0
SAVEAT = [0.0, 0.5, 1.0]


def _torch_grads(sensealg):
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    y0 = torch.linspace(0.5, 1.5, B, dtype=torch.float64).reshape(B, 1).requires_grad_(True)
    prob = deb.SDEProblem(
        lambda t, y: mu * y - y**3 / 10,
        lambda t, y: sigma * torch.cos(y),
        y0,
        (0.0, T),
        interpretation="stratonovich",
        params=[mu, sigma],
    )
    ys = deb.solve(prob, deb.EulerHeun(), dt=2**-5, saveat=SAVEAT, seed=5, sensealg=sensealg).ys
    loss = (ys[1] ** 2).sum() + ys[2].sum()
    g = torch.autograd.grad(loss, [y0, mu, sigma])
    return ys.detach().numpy(), float(loss.detach()), [x.detach().numpy() for x in g]


def _jax_loss(y0, p, sensealg):
    ys = jsolve(
        lambda t, y, p: p["mu"] * y - y**3 / 10,
        lambda t, y, p: p["sigma"] * jnp.cos(y),
        y0,
        (0.0, T),
        saveat=SAVEAT,
        params=p,
        interpretation="stratonovich",
        alg="EulerHeun",
        dt=2**-5,
        seed=5,
        sensealg=sensealg,
    )
    return (ys[1] ** 2).sum() + ys[2].sum(), ys


@pytest.mark.parametrize("sensealg", [None, "backsolve"])
def test_jax_matches_torch(sensealg) -> None:
    sa = deb.BacksolveAdjoint() if sensealg else None
    ys_t, loss_t, (gy_t, gmu_t, gsig_t) = _torch_grads(sa)
    y0 = jnp.linspace(0.5, 1.5, B, dtype=jnp.float64).reshape(B, 1)
    p = {"mu": jnp.float64(0.5), "sigma": jnp.float64(0.6)}
    (loss_j, ys_j), (gy_j, gp_j) = jax.value_and_grad(lambda y, p: _jax_loss(y, p, sa), argnums=(0, 1), has_aux=True)(y0, p)
    assert abs(float(loss_j) - loss_t) <= 1e-12
    assert jnp.allclose(ys_j, ys_t, rtol=0, atol=1e-13)
    assert jnp.allclose(gy_j, gy_t, rtol=1e-10, atol=1e-12)
    assert abs(float(gp_j["mu"]) - float(gmu_t)) <= 1e-10 * abs(float(gmu_t))
    assert abs(float(gp_j["sigma"]) - float(gsig_t)) <= 1e-10 * abs(float(gsig_t))


def test_jax_jit_and_ode() -> None:
    """jax.jit of the solve and of its gradient (pure_callback), and an ODE (diffusion=None)."""
    y0 = jnp.ones((2, 1), dtype=jnp.float64)

    def loss(theta):
        ys = jsolve(lambda t, y, th: -th * y, None, y0, (0.0, 2.0), params=theta, alg="Tsit5", atol=1e-9, rtol=1e-9)
        return ys[-1].sum()

    g = jax.jit(jax.grad(loss))(jnp.float64(0.7))
    want = -2.0 * 2.0 * jnp.exp(-1.4)
    assert abs(float(g) - float(want)) <= 1e-6 * abs(float(want))
    assert abs(float(jax.jit(loss)(jnp.float64(0.7))) - 2 * float(jnp.exp(-1.4))) <= 1e-7
