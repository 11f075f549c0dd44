"""Ensemble throughput: paths per second of one Monte Carlo estimate vs batch size and processes.

The estimate: ``E[X_1]`` of geometric Brownian motion ``dX = μ X dt + σ X dW`` (μ = 0.5, σ = 0.3,
``X_0 = 1``) by Euler–Maruyama with 32 steps, over ``n`` paths (2^17 with ``--quick``, 2^20
otherwise), float64.  Cases, all in one run:

* ours, ``deb.solve_ensemble`` (streamed ``Moments``) at several batch sizes, 1 process;
* ours, the same with ``distributed=True`` on 2 processes (``torchrun --nproc_per_node=2``,
  gloo; the timing excludes process start-up and is taken by rank 0 between two barriers);
* torchsde ``sdeint(method="euler")`` in batches (its default Brownian interval);
* diffrax ``Euler`` + ``VirtualBrownianTree`` under ``jax.vmap`` in batches (jit compiled
  once, compilation excluded).

Each case is run once (after a warm-up batch) and reports paths/s and its estimate with its
standard error (the closed form of the scheme, ``(1 + μ h)^32``, is in the JSON).  On a 2-core
machine shared with other jobs the 2-process figure is a ceiling, not a promise.  With
``--device cuda`` ours and torchsde run on the GPU (the distributed case then needs 2 GPUs).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "ensemble"
MU, SIGMA, STEPS = 0.5, 0.3, 32
DT = 1.0 / STEPS


def _ensemble(device: str):
    import torch

    import diffeqbridge as deb

    def prob_func(indices):
        y0 = torch.ones(indices.shape[0], 1, dtype=torch.float64, device=device)
        return deb.SDEProblem(lambda t, y: MU * y, lambda t, y: SIGMA * y, y0, tspan=(0.0, 1.0))

    return deb.EnsembleProblem(prob_func)


def ours(n: int, batch: int, device: str = "cpu", distributed: bool = False) -> dict:
    import diffeqbridge as deb

    eprob = _ensemble(device)
    kwargs = {"alg": deb.EM(), "dt": DT, "seed": 0, "brownian_tol": DT, "device": device}
    deb.solve_ensemble(eprob, batch, batch_size=batch, distributed=distributed, **kwargs)  # warm-up
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    start = time.perf_counter()
    esol = deb.solve_ensemble(eprob, n, batch_size=batch, distributed=distributed, **kwargs)
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "paths_per_s": n / seconds, "mean": float(esol["mean"]), "sem": float(esol["sem"])}


def torchsde_case(n: int, batch: int, device: str = "cpu") -> dict:
    import torch
    import torchsde

    class GBM(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return MU * y

        def g(self, t, y):
            return SIGMA * y

    sde, ts = GBM(), torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)

    def one(b: int) -> torch.Tensor:
        y0 = torch.ones(b, 1, dtype=torch.float64, device=device)
        return torchsde.sdeint(sde, y0, ts, method="euler", dt=DT)[-1, :, 0]

    one(min(batch, 1024))
    start = time.perf_counter()
    total, total_sq = 0.0, 0.0
    with torch.no_grad():
        for s in range(0, n, batch):
            x = one(min(batch, n - s))
            total, total_sq = total + float(x.sum()), total_sq + float((x * x).sum())
    seconds = time.perf_counter() - start
    mean = total / n
    return {"seconds": seconds, "paths_per_s": n / seconds, "mean": mean, "sem": math.sqrt(max(total_sq / n - mean**2, 0.0) / n)}


def diffrax_case(n: int, batch: int) -> dict:
    import diffrax
    import jax
    import jax.numpy as jnp
    import lineax as lx

    jax.config.update("jax_enable_x64", True)
    H.enable_jax_compilation_cache(jax)

    def path(key):
        bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=DT / 2, shape=(1,), key=key)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: MU * y), diffrax.ControlTerm(lambda t, y, a: lx.DiagonalLinearOperator(SIGMA * y), bm)
        )
        sol = diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, 1.0, DT, jnp.ones(1), saveat=diffrax.SaveAt(t1=True))
        return sol.ys[-1, 0]

    batched = jax.jit(jax.vmap(path))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    batched(keys[:batch]).block_until_ready()  # compile
    start = time.perf_counter()
    total, total_sq = 0.0, 0.0
    for s in range(0, n, batch):
        chunk = keys[s : s + batch]
        if chunk.shape[0] < batch:
            chunk = jnp.concatenate([chunk, keys[: batch - chunk.shape[0]]])  # same shape: no recompilation
        x = batched(chunk)[: min(batch, n - s)]
        total, total_sq = total + float(x.sum()), total_sq + float((x * x).sum())
    seconds = time.perf_counter() - start
    mean = total / n
    return {"seconds": seconds, "paths_per_s": n / seconds, "mean": mean, "sem": math.sqrt(max(total_sq / n - mean**2, 0.0) / n)}


def _two_processes(n: int, batch: int, device: str, threads: int) -> dict:
    """``torchrun --nproc_per_node=2`` this file in worker mode; rank 0 prints the JSON line."""
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS=str(max(threads, 1)),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "--worker",
        str(n),
        str(batch),
        device,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "wall_with_startup_s": wall}


def _worker(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    n, batch, device = int(argv[0]), int(argv[1]), argv[2]
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    result = ours(n, batch, device=device, distributed=True)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, device: str = "cpu") -> dict:
    info = H.set_threads(threads)
    n = {"tiny": 2**12, "quick": 2**17}.get(size or ("quick" if quick else "full"), 2**20)
    batches = [b for b in (2**10, 2**12, 2**14, 2**16, 2**18) if b <= n][: (3 if size == "tiny" else 5)]
    peer_batch = min(2**14, n)
    cases: dict[str, dict] = {}
    for b in batches:
        cases[f"ours 1 proc, batch {b}"] = {"batch": b, "processes": 1, **ours(n, b, device)}
    for b in batches[-2:]:
        cases[f"ours 2 proc, batch {b}"] = {"batch": b, "processes": 2, **_two_processes(n, b, device, threads)}
    try:
        cases[f"torchsde, batch {peer_batch}"] = {"batch": peer_batch, "processes": 1, **torchsde_case(n, peer_batch, device)}
    except ImportError as exc:
        cases["torchsde"] = {"skipped": str(exc)}
    try:
        cases[f"diffrax vmap, batch {peer_batch}"] = {"batch": peer_batch, "processes": 1, **diffrax_case(n, peer_batch)}
    except ImportError as exc:
        cases["diffrax"] = {"skipped": str(exc)}
    exact = (1 + MU * DT) ** STEPS
    doc = H.write_json(
        Path(out) / f"{NAME}.json",
        NAME,
        {"n": n, "steps": STEPS, "device": device, "threads": info, "scheme_mean": exact, "cases": cases},
        quick=quick,
    )
    H.write_plot(plot, doc, Path(out) / f"{NAME}.png")
    print(
        H.markdown_table(
            ["case", "paths/s", "seconds", "estimate ± s.e."],
            [
                [k, f"{c['paths_per_s']:.3g}", f"{c['seconds']:.2f}", f"{c['mean']:.5f} ± {c['sem']:.5f}"]
                for k, c in cases.items()
                if "paths_per_s" in c
            ],
        )
    )
    print(f"scheme's exact mean: {exact:.5f}")
    return doc


def tables(doc: dict) -> dict[str, str]:
    """``cases``: throughput and the estimate of every case."""
    rows = [
        (k, H.sci(c["paths_per_s"]), f"{c['seconds']:.2f}", f"{c['mean']:.5f} ± {c['sem']:.5f}")
        for k, c in doc["cases"].items()
        if "paths_per_s" in c
    ]
    return {
        "cases": H.markdown_table(
            ["case", "paths/s", "seconds", f"estimate ± s.e. (scheme's exact mean {doc['scheme_mean']:.5f})"], rows
        )
    }


def headline(doc: dict) -> str:
    """Best paths/s per implementation (``python -m diffeqbridge bench`` summary line)."""
    best: dict[str, float] = {}
    for name, case in doc["cases"].items():
        if "paths_per_s" in case:
            key = name.split(",")[0]
            best[key] = max(best.get(key, 0.0), case["paths_per_s"])
    return ", ".join(f"{k} {v:.3g} paths/s" for k, v in best.items())


def _label(cases: dict, case: dict) -> str:
    return next(k for k, v in cases.items() if v is case)


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    cases, n, device = doc["cases"], doc["n"], doc["device"]
    fig, (ax,) = H.figure(size=(7.0, 4.5))
    for procs, style in ((1, "o-"), (2, "s-")):
        pts = [
            (c["batch"], c["paths_per_s"])
            for c in cases.values()
            if c.get("processes") == procs and "paths_per_s" in c and "ours" in _label(cases, c)
        ]
        if pts:
            ax.plot(*zip(*pts), style, label=f"diffeqbridge, {procs} process{'es' if procs > 1 else ''}")
    for name, c in cases.items():
        if "paths_per_s" in c and not name.startswith("ours"):
            ax.plot([c["batch"]], [c["paths_per_s"]], "D", markersize=9, label=name)
    H.label_axes(
        ax,
        xlabel="batch size (paths per solve call)",
        ylabel="paths / s",
        title=f"E[X_1] of GBM, Euler–Maruyama 32 steps, n = {n} paths ({device})",
        logx=2,
        logy=True,
    )
    return fig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _worker(argv[1:])
        return 0
    parser = H.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    run(args.quick, args.out, threads=args.threads, size="tiny" if args.tiny else None, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
