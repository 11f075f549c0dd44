"""Train a small score network on 2-D Gaussian-mixture data and sample it with every method.

    python examples/diffusion_2d.py            # ~3 CPU minutes: 4000 training steps
    python examples/diffusion_2d.py --quick    # seconds: 300 steps (rough samples)

Data: the CLI demo's mixture (weights 0.5/0.3/0.2, means (-3,0), (3,0), (0,3), std 0.5).
Model: an MLP ``eps_theta(x, t)`` trained by denoising score matching on the VP SDE
(Ho et al. 2020's loss, continuous ``t``; Song et al. 2021).  Every method of ``dd.sample``
then samples the trained network; the script prints NFE per sample, component weights and
stds and the sliced Wasserstein distance to the data law, and writes ``--out`` (PNG).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from diffeqbridge import diffusion as dd
from diffeqbridge.diffusion.demo import DEMO_METHODS, demo_mixture, plot


class ScoreNet(nn.Module):
    """``eps_theta(x, t)``: an MLP on ``[x, sin/cos features of t]`` (``x`` ``(B, 2)``, ``t`` ``(B,)``)."""

    def __init__(self, width: int = 128, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 2)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * n_freq, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = t.to(x.dtype)[:, None] * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, phase.sin(), phase.cos()], dim=1))


def train(sde: dd.VPSDE, steps: int, batch: int = 512, seed: int = 0, t_min: float = 1e-3) -> ScoreNet:
    """Denoising score matching: ``E |eps_theta(alpha x0 + sigma eps, t) - eps|^2``, ``t ~ U(t_min, 1)``."""
    torch.manual_seed(seed)
    gm = demo_mixture()
    data = gm.sample(50_000, seed=seed).float()
    net = ScoreNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,))]
        t = t_min + (sde.T - t_min) * torch.rand(batch)
        alpha, sigma = sde.marginal(t)
        eps = torch.randn_like(x0)
        loss = (net(alpha[:, None] * x0 + sigma[:, None] * eps, t) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 training steps, 500 samples (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 4000; --quick 300)")
    parser.add_argument("--n", type=int, default=None, help="samples per method (default 2000; --quick 500)")
    parser.add_argument("--out", default="diffusion_2d.png", help="PNG of samples vs the data law")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (300 if args.quick else 4000)
    n = args.n or (500 if args.quick else 2000)
    sde = dd.VPSDE()
    start = time.perf_counter()
    net = train(sde, steps)
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")
    gm = demo_mixture()
    x_T = sde.prior_sample((n, 2), seed=1, dtype=torch.float32)
    results = []
    print(f"{'method':<11} {'NFE/sample':>10} {'weights':>16} {'stds':>16} {'SW':>6} {'wall s':>7}")
    for method, options in DEMO_METHODS.items():
        try:
            begin = time.perf_counter()
            with torch.no_grad():
                sol = dd.sample(net, sde, x_T, method=method, parameterization="eps", seed=1, **options)
        except ImportError as exc:
            print(f"{method:<11} unavailable: {exc}")
            continue
        x = sol.ys[-1].double()
        frac, stds = gm.component_stats(x)
        r = {
            "method": method,
            "nfe": float(sol.stats.nf.double().mean()),
            "sw": dd.sliced_wasserstein(x, gm.sample(n, seed=2)),
            "samples": x,
        }
        results.append(r)
        print(
            f"{method:<11} {r['nfe']:10.1f} {' '.join(f'{v:.2f}' for v in frac.tolist()):>16} "
            f"{' '.join(f'{v:.2f}' for v in stds.tolist()):>16} {r['sw']:6.3f} {time.perf_counter() - begin:7.2f}"
        )
    plot(args.out, results, n, 1, title=f"MLP eps-network trained {steps} steps, VP SDE")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
