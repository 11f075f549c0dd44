"""A latent SDE (Li et al. 2020) fit to a stochastic Lorenz time series, with ``deb.LatentSDE``.

Data: ``n`` paths of the stochastic Lorenz system (σ = 10, ρ = 28, β = 8/3, diagonal
multiplicative noise 0.15·x; torchsde's ``latent_sde_lorenz`` example), normalised and
observed at 25 times on ``[0, 1]`` with Gaussian noise 0.01, generated on the fly with
``deb.solve``.  Model: 4-D latent; a GRU encoder run backwards in time gives the context;
posterior drift ``h(t, z, ctx)``, prior drift ``f(t, z)``, diffusion ``σ(z)`` (per-dimension
sigmoid nets), a linear decoder; trained on the ELBO (KL annealed) with fixed-step
``EulerHeun`` (Stratonovich) and ``sensealg=BacksolveAdjoint()`` (the stochastic adjoint).

    python examples/latent_sde_lorenz.py [--quick] [--out bench_out]

writes ``latent_sde_lorenz.png`` (data, posterior reconstructions and prior samples) and
``latent_sde_lorenz.json`` (ELBO, KL and MSE per iteration).  A few CPU minutes (``--quick``:
seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

import diffeqbridge as deb


def lorenz_data(n: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised stochastic Lorenz paths ``(T, n, 3)`` at ``T = steps`` times on ``[0, 1]``."""
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(n, 3, generator=g)
    sigma, rho, beta = 10.0, 28.0, 8.0 / 3.0

    def drift(t, y):
        x1, x2, x3 = y.unbind(1)
        return torch.stack([sigma * (x2 - x1), x1 * (rho - x3) - x2, x1 * x2 - beta * x3], dim=1)

    ts = torch.linspace(0, 1, steps, dtype=torch.float64)
    prob = deb.SDEProblem(drift, lambda t, y: 0.15 * y, y0.double(), (0.0, 1.0))
    ys = deb.solve(prob, deb.SOSRI(), saveat=ts, seed=seed).ys
    ys = (ys - ys.mean((0, 1))) / ys.std((0, 1))
    return ts.float(), (ys + 0.01 * torch.randn(ys.shape, generator=g, dtype=ys.dtype)).float()


class Encoder(nn.Module):
    def __init__(self, obs: int, ctx: int):
        super().__init__()
        self.gru = nn.GRU(obs, ctx)

    def forward(self, xs):  # (T, B, obs) -> (T, B, ctx), run backwards in time
        out, _ = self.gru(xs.flip(0))
        return out.flip(0)


class PosteriorDrift(nn.Module):
    def __init__(self, latent: int, ctx: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent + ctx, width), nn.Softplus(), nn.Linear(width, latent))

    def forward(self, t, z, ctx):
        return self.net(torch.cat([z, ctx], dim=1))


class Diffusion(nn.Module):
    """Per-dimension networks (diagonal noise), as Li et al.'s example."""

    def __init__(self, latent: int, width: int):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(1, width), nn.Softplus(), nn.Linear(width, 1), nn.Sigmoid()) for _ in range(latent)
        )

    def forward(self, z):
        return torch.cat([net(z[:, i : i + 1]) for i, net in enumerate(self.nets)], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, iters = (16, 15) if args.quick else (32, 200)
    latent, ctx, width, obs_std = 4, 16, 64, 0.01
    ts, xs = lorenz_data(n, 25)
    encoder = Encoder(3, ctx)
    model = deb.LatentSDE(
        PosteriorDrift(latent, ctx, width),
        nn.Sequential(nn.Linear(latent, width), nn.Softplus(), nn.Linear(width, latent)),
        Diffusion(latent, width // 4),
        encoder=encoder,
        interpretation="stratonovich",
        alg=deb.EulerHeun(),
        sensealg=deb.BacksolveAdjoint(),
        dt=1.0 / 48,
    )
    qz0 = nn.Linear(ctx, 2 * latent)
    decoder = nn.Linear(latent, 3)
    pz0_mean, pz0_logstd = nn.Parameter(torch.zeros(latent)), nn.Parameter(torch.zeros(latent))
    params = [*model.parameters(), *qz0.parameters(), *decoder.parameters(), pz0_mean, pz0_logstd]
    opt = torch.optim.Adam(params, lr=1e-2)
    history = []
    start = time.perf_counter()
    for it in range(iters):
        opt.zero_grad()
        context = encoder(xs)
        mean, logstd = qz0(context[0]).chunk(2, dim=1)
        z0 = mean + logstd.exp() * torch.randn_like(mean)
        zs, kl_path = model(z0, ts, context=context, seed=it)
        log_px = torch.distributions.Normal(decoder(zs), obs_std).log_prob(xs).sum((0, 2))
        kl0 = deb.LatentSDE.gaussian_kl(mean, logstd.exp(), pz0_mean.expand_as(mean), pz0_logstd.exp().expand_as(mean))
        beta = min(1.0, (it + 1) / max(1, iters // 2))
        elbo = deb.LatentSDE.elbo(log_px, kl_path, kl0, beta=beta)
        (-elbo.mean()).backward()
        opt.step()
        mse = float(((decoder(zs) - xs) ** 2).mean().detach())
        history.append({"iter": it, "elbo": float(elbo.mean()), "kl_path": float(kl_path.mean()), "mse": mse})
        if it % max(1, iters // 10) == 0 or it == iters - 1:
            print(f"iter {it:4d}  elbo {history[-1]['elbo']:12.1f}  kl {history[-1]['kl_path']:8.2f}  mse {mse:.4f}")
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        z0_prior = pz0_mean + pz0_logstd.exp() * torch.randn(n, latent)
        prior = decoder(model.forward_prior(z0_prior, ts, seed=123))
    with open(os.path.join(args.out, "latent_sde_lorenz.json"), "w") as fh:
        json.dump({"iters": iters, "seconds": seconds, "history": history}, fh, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = plt.figure(figsize=(13, 4))
    for k, (title, data) in enumerate(
        [("data", xs), ("posterior reconstruction", decoder(zs).detach()), ("prior samples", prior)]
    ):
        ax = fig.add_subplot(1, 4, k + 1, projection="3d")
        for b in range(min(8, n)):
            ax.plot(*data[:, b].T.numpy(), lw=0.8)
        ax.set_title(title)
    ax = fig.add_subplot(1, 4, 4)
    ax.plot([h["mse"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_title(f"reconstruction MSE ({seconds:.0f} s)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latent_sde_lorenz.png"), dpi=110)
    print("wrote", os.path.join(args.out, "latent_sde_lorenz.png"), f"({seconds:.1f} s)")


if __name__ == "__main__":
    main()
