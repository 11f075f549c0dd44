"""Peak memory of a fixed-step solve against the size of its output (issue 15, item 12).

Each configuration runs in a fresh Python process (so the process's high-water mark
``VmHWM`` belongs to it): import, warm up on a tiny batch, read ``VmRSS`` (the base), run
``solve(SDEProblem(-y, 0.1 y), EM(), dt, saveat=linspace(0, 1, T))`` under ``torch.no_grad``
on ``B`` samples, read ``VmHWM``.  Reported: ``peak - base`` against the output
``ys`` (``T x B x D`` float64), and, as the suspected cause, the peak of ONE Brownian-tree
query ``tree.evaluate_scalar(t, levy=False)`` at the same ``B`` (the tree evaluates all
``depth`` levels at once, so its temporaries are ``(depth, B, D)`` tensors).

``python benchmarks/memory.py [--quick] [--out DIR]`` writes ``out/memory.json`` and
``out/memory.png``.  Linux only (``/proc/self/status``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:  # run as a script: python benchmarks/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _harness as H  # type: ignore[no-redef]

NAME = "memory"

_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
import diffeqbridge as deb

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

B, D, T, dt, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
prob = lambda b: deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * y, torch.ones(b, D, dtype=torch.float64))
save = torch.linspace(0, 1, T, dtype=torch.float64)
with torch.no_grad():
    deb.solve(prob(8), deb.EM(), dt=dt, saveat=save)  # warm-up
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, D), seed=0)
    base = status("VmRSS")
    if what == "solve":
        sol = deb.solve(prob(B), deb.EM(), dt=dt, saveat=save)
        out = sol.ys.numel() * sol.ys.element_size()
    else:
        tree.evaluate_scalar(0.37, levy=False)
        out = B * D * 8
print(json.dumps({"base_mb": base, "peak_mb": status("VmHWM"), "output_mb": out / 2**20, "depth": tree.depth}))
"""


def _measure(B: int, D: int, T: int, dt: float, what: str) -> dict[str, Any]:
    src = Path(__file__).resolve().parents[1] / "src"
    env_path = f"{src}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(B), str(D), str(T), str(dt), what],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(B=B, D=D, T=T, dt=dt, what=what, over_base_mb=row["peak_mb"] - row["base_mb"])
    row["ratio_to_output"] = row["over_base_mb"] / row["output_mb"]
    return row


def run(quick: bool, out: Path, threads: int = 1) -> dict[str, Any]:
    batches = (10_000, 100_000) if not quick else (20_000,)
    rows = []
    for B in batches:
        rows.append(_measure(B, 1, 100, 0.01, "solve"))
        rows.append(_measure(B, 1, 100, 0.01, "tree_query"))
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
    payload = {"rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows = doc["rows"]
    fig, (ax,) = H.figure(size=(6.0, 4.0))
    for what, marker in (("solve", "o"), ("tree_query", "s")):
        pts = [(r["B"], r["over_base_mb"]) for r in rows if r["what"] == what]
        ax.loglog(*zip(*pts), marker=marker, label=f"{what}: peak - base")
    pts = [(r["B"], r["output_mb"]) for r in rows if r["what"] == "solve"]
    ax.loglog(*zip(*pts), "k--", label="output ys (T=100)")
    ax.set_xlabel("batch B (state size 1, float64)")
    ax.set_ylabel("MiB")
    ax.legend()
    ax.set_title("EM, dt = 0.01, 100 save points")
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``rows``: peak memory over the baseline against the size of the output, per case."""
    rows = [
        (r["what"], r["B"], f"{r['over_base_mb']:.1f}", f"{r['output_mb']:.1f}", f"{r['ratio_to_output']:.2f}")
        for r in doc["rows"]
    ]
    return {"rows": H.markdown_table(["case", "B", "peak - base (MiB)", "output ys (MiB)", "ratio"], rows)}


def main(argv: list[str] | None = None) -> int:
    return H.plain_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
