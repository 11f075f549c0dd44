"""Gradients through diffusion sampling: peak memory vs the number of steps, per sensealg.

``dd.sample(model, sde, x_T, method="ode", alg=Tsit5(), steps=N, sensealg=...)`` with an MLP
eps-network (64-D state, width 512, B = 128, float64), then ``d |x_end|^2 / d (x_T, theta)``.
Each configuration runs in its own subprocess; the figure is the growth of the process's
peak RSS (``ru_maxrss``) during sampling + backward.  ``None`` backpropagates through the
kept graph of every step (memory linear in N); ``InterpolatingAdjoint(checkpoints=N/25)``
keeps the states at the segment boundaries and one segment's graph at a time.

    python benchmarks/diffusion_gradient_memory.py [--quick | --tiny] [--out DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "diffusion_gradient_memory"

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
import diffeqbridge as deb
from diffeqbridge import diffusion as dd
steps, mode, D, B, width = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(D + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                          torch.nn.SiLU(), torch.nn.Linear(width, D)).double()
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net
    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))
model, sde = Model(), dd.VPSDE()
x = sde.prior_sample((B, D), seed=0).requires_grad_(True)
sensealg = None if mode == "none" else deb.InterpolatingAdjoint(checkpoints=max(1, steps // 25))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
sol = dd.sample(model, sde, x, method="ode", alg=deb.Tsit5(), steps=steps, sensealg=sensealg)
grads = torch.autograd.grad(sol.ys[-1].square().sum(), [x, *model.parameters()])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"steps": steps, "sensealg": mode, "peak_mb": (peak - base) / 1024,
                  "wall_s": time.perf_counter() - start, "grad_x_norm": float(grads[0].norm())}))
"""


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress: Any = None) -> dict:
    size = size or ("quick" if quick else "full")
    steps_list = {"tiny": [10, 20], "quick": [100, 400], "full": [50, 100, 200, 400, 800]}[size]
    dims = {"tiny": (8, 16, 32), "quick": (64, 128, 512), "full": (64, 128, 512)}[size]
    src = str(Path(__file__).resolve().parent.parent / "src")
    rows = []
    for steps in steps_list:
        for mode in ("none", "interpolating"):
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(steps), mode, *map(str, dims)],
                capture_output=True,
                text=True,
                env={**__import__("os").environ, "PYTHONPATH": src},
                check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            if progress:
                progress(f"{steps} {mode}")
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, {"config": {"size": size, "D_B_width": dims}, "rows": rows}, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows = doc["rows"]
    fig, axes = H.figure(size=(5.5, 4.0))
    series = {
        m: ([r["steps"] for r in rows if r["sensealg"] == m], [r["peak_mb"] for r in rows if r["sensealg"] == m])
        for m in ("none", "interpolating")
    }
    H.plot_series(axes[0], series, xlabel="steps", ylabel="peak RSS growth (MB)", title="gradient through dd.sample")
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``rows``: peak memory growth of a gradient through ``dd.sample`` per sensealg and step count."""
    rows = [(r["sensealg"], r["steps"], f"{r['peak_mb']:.1f}") for r in doc["rows"]]
    return {"rows": H.markdown_table(["sensealg", "steps", "peak RSS growth (MB)"], rows)}


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
