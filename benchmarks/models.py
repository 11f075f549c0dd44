"""Models: a latent-SDE training step vs torchsde, a neural-CDE forward+backward vs torchcde.

Latent SDE (Li et al. 2020; torchsde's ``logqp=True``): latent 8, posterior/prior drifts MLP
8 -> 64 -> 64 -> 8 (softplus), diagonal diffusion 8 -> 64 -> 8 (sigmoid), Stratonovich,
fixed-step Euler–Heun with 50 steps on [0, 1], batch 256 (quick 64, tiny 8), float32; one
training step = forward (paths + path KL as an extra state) + backward of
``mean(z(T)²) + mean(KL)``.

* ours: ``deb.LatentSDE(..., alg=deb.EulerHeun(), dt=1/50)`` with ``DiscreteAdjoint()``
  (backprop through the steps) and ``BacksolveAdjoint()`` (stochastic adjoint), our tree;
* torchsde: ``sdeint(..., method="euler_heun", logqp=True)`` and ``sdeint_adjoint(...,
  adjoint_method="euler_heun", logqp=True)`` with a fresh ``BrownianInterval`` per call.

Neural CDE (Kidger et al. 2020; torchcde): 32 irregular observations of 4 channels (time one
of them) with 10% missing values, cubic Hermite control with backward differences, hidden 32,
vector field MLP 32 -> 64 -> 32·4 (tanh), batch 256 (quick 64, tiny 8), float32, adaptive
``atol = rtol = 1e-3``: ours ``deb.NeuralCDE`` with Tsit5 (per-sample steps) vs torchcde's
``cdeint`` with dopri5 (one step size for the batch), each by backprop through the solver and by
its continuous adjoint.  The loss is ``mean(z(t_end)²)``.

Time: median over interleaved repeats (``_harness.measure_interleaved``).  NFE: vector-field
evaluations per sample (ours from ``stats``; torchcde counted by a wrapper, whole batch per call).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "models"
LATENT, WIDTH, STEPS = 8, 64, 50
CDE_LEN, CDE_CH, CDE_HIDDEN = 32, 4, 32


def _mlp(sizes: list[int], act, last=None):
    from torch import nn

    layers: list[Any] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), act()]
    layers = layers[:-1] + ([last()] if last else [])
    return nn.Sequential(*layers)


def _latent_cases(B: int) -> dict[str, Any]:
    import torch
    import torchsde
    from torch import nn

    import diffeqbridge as deb

    torch.manual_seed(0)
    post = _mlp([LATENT, WIDTH, WIDTH, LATENT], nn.Softplus)
    prior = _mlp([LATENT, WIDTH, WIDTH, LATENT], nn.Softplus)
    diff = _mlp([LATENT, WIDTH, LATENT], nn.Softplus, nn.Sigmoid)
    z0 = torch.randn(B, LATENT)
    ts = torch.tensor([0.0, 1.0])
    dt = 1.0 / STEPS

    class Peer(nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.post, self.prior, self.diff = post, prior, diff

        def f(self, t, y):
            return self.post(y)

        def h(self, t, y):
            return self.prior(y)

        def g(self, t, y):
            return self.diff(y)

    peer = Peer()
    cases: dict[str, Any] = {}
    for label, sensealg in (("discrete", deb.DiscreteAdjoint()), ("backsolve", deb.BacksolveAdjoint())):
        model = deb.LatentSDE(post, prior, diff, interpretation="stratonovich", alg=deb.EulerHeun(), sensealg=sensealg, dt=dt)
        tree = deb.VirtualBrownianTree(0.0, 1.0, (B, LATENT + 1), seed=1, tol=dt / 4, dtype=torch.float32)

        def step(model=model, tree=tree):
            zs, kl = model(z0, ts, brownian=tree)
            loss = (zs[-1] ** 2).mean() + kl.mean()
            loss.backward()

        cases[f"ours LatentSDE {label}"] = step

    def peer_step(adjoint: bool):
        def step():
            bm = torchsde.BrownianInterval(0.0, 1.0, (B, LATENT + 1), dtype=torch.float32)
            if adjoint:
                ys, logqp = torchsde.sdeint_adjoint(
                    peer, z0, ts, bm=bm, dt=dt, method="euler_heun", adjoint_method="euler_heun", logqp=True
                )
            else:
                ys, logqp = torchsde.sdeint(peer, z0, ts, bm=bm, dt=dt, method="euler_heun", logqp=True)
            loss = (ys[-1] ** 2).mean() + logqp.sum(0).mean()
            loss.backward()

        return step

    cases["torchsde logqp sdeint"] = peer_step(False)
    cases["torchsde logqp sdeint_adjoint"] = peer_step(True)
    return cases


def _cde_data(B: int):
    import math

    import torch

    g = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(CDE_LEN, generator=g), dim=0).values * 4 * math.pi
    t[0] = 0.0
    x = torch.cumsum(torch.randn(B, CDE_LEN, CDE_CH - 1, generator=g) * 0.3, dim=1)
    x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.1, float("nan"))
    x[:, 0] = 0.0
    return t, torch.cat([t.expand(B, -1).unsqueeze(-1) / t[-1], x], dim=-1)


def _cde_cases(B: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    import torchcde
    from torch import nn

    import diffeqbridge as deb
    from diffeqbridge import interpolation

    torch.manual_seed(0)
    t, x = _cde_data(B)
    net = _mlp([CDE_HIDDEN, WIDTH, CDE_HIDDEN * CDE_CH], nn.Softplus, nn.Tanh)
    counter = {"n": 0}

    class Func(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, z):
            counter["n"] += 1
            return self.net(z).reshape(z.shape[0], CDE_HIDDEN, CDE_CH)

    func = Func()
    z0 = torch.randn(B, CDE_HIDDEN) * 0.1
    ours_X = interpolation.CubicSpline(interpolation.hermite_cubic_coefficients_with_backward_differences(x, t), t)
    peer_X = torchcde.CubicSpline(torchcde.hermite_cubic_coefficients_with_backward_differences(x, t), t)
    ts = torch.tensor([float(t[0]), float(t[-1])])
    cases: dict[str, Any] = {}
    nfe: dict[str, Any] = {}
    for label, sensealg in (("discrete", deb.DiscreteAdjoint()), ("backsolve", deb.BacksolveAdjoint())):
        model = deb.NeuralCDE(func, alg=deb.Tsit5(), sensealg=sensealg, atol=1e-3, rtol=1e-3)

        def step(model=model, name=f"ours NeuralCDE {label}"):
            zs = model(ours_X, z0, ts=ts)
            (zs[-1] ** 2).mean().backward()
            nfe[name] = float(model.stats.nf.double().mean())

        cases[f"ours NeuralCDE {label}"] = step
    for label, adjoint in (("backprop", False), ("adjoint", True)):

        def peer(adjoint=adjoint, name=f"torchcde cdeint {label}"):
            counter["n"] = 0
            zs = torchcde.cdeint(
                X=peer_X,
                func=func,
                z0=z0,
                t=ts,
                adjoint=adjoint,
                method="dopri5",
                atol=1e-3,
                rtol=1e-3,
                **({"adjoint_params": tuple(func.parameters())} if adjoint else {}),
            )
            forward_nfe = counter["n"]
            (zs[:, -1] ** 2).mean().backward()
            nfe[name] = float(forward_nfe)  # forward evaluations (the whole batch per call)

        cases[f"torchcde cdeint {label}"] = peer
    return cases, nfe


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None) -> dict:
    H.set_threads(threads)
    size = size or ("quick" if quick else "full")
    B = {"tiny": 8, "quick": 64, "full": 256}[size]
    repeats = {"tiny": 1, "quick": 3, "full": 7}[size]
    latent = _latent_cases(B)
    cde, nfe = _cde_cases(B)
    timings = H.measure_interleaved({**latent, **cde}, repeats=repeats, warmup=1, target_s=0.05)
    base = {
        "ours LatentSDE discrete": "torchsde logqp sdeint",
        "ours LatentSDE backsolve": "torchsde logqp sdeint_adjoint",
        "ours NeuralCDE discrete": "torchcde cdeint backprop",
        "ours NeuralCDE backsolve": "torchcde cdeint adjoint",
    }
    rows = [
        {
            "case": name,
            "seconds": t.median,
            "timing": t.as_dict(),
            "nfe_forward": nfe.get(name),
            "ours_over_peer_time": (t.median / timings[base[name]].median) if name in base else None,
        }
        for name, t in timings.items()
    ]
    payload = {
        "config": {
            "B": B,
            "size": size,
            "repeats": repeats,
            "latent": LATENT,
            "width": WIDTH,
            "steps": STEPS,
            "cde_length": CDE_LEN,
            "cde_channels": CDE_CH,
            "cde_hidden": CDE_HIDDEN,
            "dtype": "float32",
            "threads": threads,
        },
        "notes": [
            "seconds: one training step (forward + backward), median over interleaved repeats.",
            "ours_over_peer_time: ours / the like-for-like peer (< 1: ours faster).",
            (
                "nfe_forward: ours, vector-field evaluations per sample (mean; own steps per sample); "
                "torchcde, forward calls of the vector field on the whole batch (one step size)."
            ),
        ],
        "results": rows,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    print(
        H.markdown_table(
            ["case", "time", "ours/peer", "forward NFE"],
            [
                (
                    r["case"],
                    H.format_seconds(r["seconds"]),
                    "—" if r["ours_over_peer_time"] is None else f"{r['ours_over_peer_time']:.2f}",
                    "—" if r["nfe_forward"] is None else f"{r['nfe_forward']:.0f}",
                )
                for r in rows
            ],
        )
    )
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows, B = doc["results"], doc["config"]["B"]
    fig, axes = H.figure(ncols=2, size=(6.0, 3.6))
    for ax, prefix, title in (
        (axes[0], ("ours LatentSDE", "torchsde"), f"latent SDE training step, B={B}"),
        (axes[1], ("ours NeuralCDE", "torchcde"), f"neural CDE forward+backward, B={B}"),
    ):
        sel = [r for r in rows if r["case"].startswith(prefix)]
        ax.barh(
            [r["case"] for r in sel],
            [r["seconds"] for r in sel],
            color=["C0" if r["case"].startswith("ours") else "C2" for r in sel],
        )
        ax.set_xlabel("seconds per step (median)")
        ax.set_title(title)
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``results``: time per training step, ours / like-for-like peer, forward NFE."""
    rows = [
        (
            r["case"],
            H.format_seconds(r["seconds"]),
            "" if r["ours_over_peer_time"] is None else f"**{r['ours_over_peer_time']:.2f}**",
            H.fmt(r["nfe_forward"], "{:.0f}"),
        )
        for r in doc["results"]
    ]
    return {
        "results": H.markdown_table([f"case (B = {doc['config']['B']})", "time per step", "ours / peer", "forward NFE"], rows)
    }


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
