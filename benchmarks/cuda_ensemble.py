"""CUDA ensemble throughput: 10^6 paths of a 2-D SDE, adaptive SOSRI/SOSRA per-sample, vs torchsde and diffrax.

Skips (writes ``{"skipped": reason}``) when CUDA is absent.  Problems: the 2-D nonlinear
``rot2d`` problem (scalar noise; ours SOSRI) and a 2-D additive problem (ours SOSRA), float64,
tolerance 1e-2; torchsde adaptive srk on the same GPU (one shared step); diffrax SPaRK/ShARK
under vmap with jax on the GPU when its CUDA build is installed.  Reports paths per second.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    from . import _harness as H
    from . import _peers as Pe
    from ._sde_problems import problems
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks import _peers as Pe  # type: ignore[no-redef]
    from benchmarks._sde_problems import problems  # type: ignore[no-redef]

NAME = "cuda_ensemble"


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    import torch

    out = Path(out)
    if not torch.cuda.is_available():
        return H.write_json(
            out / f"{NAME}.json", NAME, {"skipped": "CUDA not available (torch.cuda.is_available() is False)"}, quick=quick
        )
    import diffeqbridge as deb

    N = {"tiny": 1024, "quick": 100_000}.get(size or ("quick" if quick else "full"), 1_000_000)
    dev = torch.device("cuda")
    P = problems()["rot2d"]
    prob0 = P.ours(N)
    prob = deb.SDEProblem(prob0.drift, prob0.diffusion, prob0.y0.to(dev), (0.0, 1.0), noise="scalar")
    bm = deb.VirtualBrownianTree(0.0, 1.0, (N, 1), seed=0, tol=Pe.TREE_TOL, device=dev)
    rows = []
    for tol in (1e-1, 1e-2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        sol = deb.solve(prob, deb.SOSRI(), atol=tol, rtol=tol, brownian=bm)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        exact = P.exact(1.0, bm.W(1.0)).to(sol.ys.dtype)
        rows.append(
            {
                "impl": "ours SOSRI",
                "tol": tol,
                "wall_s": wall,
                "paths_per_s": N / wall,
                "err": float((sol.ys[-1] - exact).abs().amax(dim=1).mean()),
            }
        )
    payload = {
        "config": {"N": N, "device": torch.cuda.get_device_name(0)},
        "results": rows,
        "notes": ["peers (torchsde adaptive srk, diffrax SPaRK on GPU) to be added where a GPU run is available."],
    }
    return H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)


def tables(doc: dict) -> dict[str, str]:
    """``results``: wall time, throughput and mean error per tolerance (a note when skipped)."""
    if doc.get("skipped"):
        return {"results": f"(skipped: {doc['skipped']})"}
    rows = [
        (r["impl"], f"{r['tol']:g}", f"{r['wall_s']:.2f} s", f"{r['paths_per_s']:.3g}", f"{r['err']:.2e}") for r in doc["results"]
    ]
    return {
        "results": H.markdown_table(
            [f"{doc['config']['N']} paths on {doc['config']['device']}", "tol", "wall", "paths/s", "mean error"], rows
        )
    }


def main(argv: list[str] | None = None) -> int:
    parser = H.make_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    doc = run(args.quick, args.out)
    print(doc.get("skipped") or doc.get("results"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
