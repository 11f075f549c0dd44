"""A neural CDE classifier on irregularly sampled synthetic series, with ``deb.NeuralCDE``.

Data (generated on the fly): spirals ``(cos, sin)(ω t + φ)`` scaled by ``e^{-t/4}`` turning
clockwise (class 0) or anticlockwise (class 1), observed at random times on ``[0, 4π]``, each
series with its own number of observations (10 to 40: a per-sample grid, NaN-padded) and
30% of the values missing at random; time is a channel, as Kidger et al. (2020) recommend.
Model: ``z0 = Linear(X(t_0))``, ``dz = f(z) dX`` with ``f = Linear·tanh·Linear`` (hidden 16),
cubic Hermite control with backward differences, Tsit5 at ``atol = rtol = 1e-3``; a
linear read-out of ``z(t_end)`` and binary cross-entropy.

    python examples/neural_cde_classifier.py [--quick] [--out bench_out]

writes ``neural_cde_classifier.png`` (sample series, loss and test accuracy, steps per sample)
and ``.json``.  About a CPU minute (``--quick``: seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

import diffeqbridge as deb
from diffeqbridge import interpolation


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t (n, L), x (n, L, 3) with time as channel 0, labels (n,))``, NaN-padded per sample."""
    g = torch.Generator().manual_seed(seed)
    L = 40
    lengths = torch.randint(10, L + 1, (n,), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    t = torch.sort(torch.rand(n, L, generator=g) * 4 * math.pi, dim=1).values
    pad = torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)
    t = t.masked_fill(pad, float("nan"))
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    direction = (2 * labels - 1).unsqueeze(1).float()
    angle = direction * 0.5 * t + phase
    decay = torch.exp(-t / 4)
    x = torch.stack([t / (4 * math.pi), decay * torch.cos(angle), decay * torch.sin(angle)], dim=-1)
    drop = torch.rand(n, L, 2, generator=g) < 0.3
    drop[:, 0] = False
    x[..., 1:] = x[..., 1:].masked_fill(drop, float("nan"))
    return t.double(), x.double(), labels


class Field(nn.Module):
    def __init__(self, hidden: int, channels: int, width: int = 32):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, hidden * channels), nn.Tanh())

    def forward(self, t, z):
        return self.net(z).reshape(z.shape[0], self.hidden, self.channels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n_train, n_test, epochs, batch = (64, 64, 2, 32) if args.quick else (256, 256, 10, 32)
    hidden = 16
    data = {}
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        t, x, y = spirals(n, seed)
        data[name] = (t, interpolation.hermite_cubic_coefficients_with_backward_differences(x, t), x, y)
    initial = nn.Linear(3, hidden).double()
    model = deb.NeuralCDE(Field(hidden, 3).double(), alg=deb.Tsit5(), atol=1e-3, rtol=1e-3)
    readout = nn.Linear(hidden, 1).double()
    params = [*initial.parameters(), *model.parameters(), *readout.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def logits(t, coeffs, x) -> torch.Tensor:
        X = interpolation.CubicSpline(coeffs, t)
        z0 = initial(X.evaluate(t[:, 0]))
        zs = model(X, z0, ts=torch.tensor(X.interval))
        return readout(zs[-1]).squeeze(-1)

    history = []
    start = time.perf_counter()
    t_tr, c_tr, x_tr, y_tr = data["train"]
    for epoch in range(epochs):
        perm = torch.randperm(n_train)
        losses = []
        for i in range(0, n_train, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(logits(t_tr[idx], c_tr[idx], x_tr[idx]), y_tr[idx].double())
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        t_te, c_te, x_te, y_te = data["test"]
        with torch.no_grad():
            acc = float(((logits(t_te, c_te, x_te) > 0).long() == y_te).double().mean())
        steps = model.stats.naccept.double()
        history.append(
            {
                "epoch": epoch,
                "loss": sum(losses) / len(losses),
                "test_accuracy": acc,
                "steps_mean": float(steps.mean()),
                "steps_min": float(steps.min()),
                "steps_max": float(steps.max()),
            }
        )
        print(
            f"epoch {epoch:3d}  loss {history[-1]['loss']:.4f}  test acc {acc:.3f}  "
            f"steps/sample {steps.mean():.1f} [{steps.min():.0f}, {steps.max():.0f}]"
        )
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "neural_cde_classifier.json"), "w") as fh:
        json.dump({"seconds": seconds, "history": history}, fh, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    t_te, c_te, x_te, y_te = data["test"]
    for b in range(6):
        ok = ~torch.isnan(x_te[b, :, 1])
        axes[0].plot(x_te[b, ok, 1], x_te[b, ok, 2], "o-" if y_te[b] else "s--", ms=3, lw=0.7)
    axes[0].set_title("test series (observed values)")
    axes[1].plot([h["loss"] for h in history])
    axes[1].set_title("training loss")
    axes[2].plot([h["test_accuracy"] for h in history])
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title(f"test accuracy ({seconds:.0f} s)")
    axes[3].hist(model.stats.naccept.numpy(), bins=15)
    axes[3].set_title("accepted steps per sample (last test pass)")
    for ax in axes[1:3]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "neural_cde_classifier.png"), dpi=110)
    print("wrote", os.path.join(args.out, "neural_cde_classifier.png"), f"({seconds:.1f} s)")


if __name__ == "__main__":
    main()
