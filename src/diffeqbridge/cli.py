"""Command line: ``python -m diffeqbridge {demo,info,bench,diffusion-demo}``.

``demo`` solves an ensemble of geometric Brownian motions with the automatic algorithm
choice and compares it with the exact solution built from the same Brownian tree;
``info`` reports versions, devices, backends (Julia included) and the solver table;
``bench`` runs the repository's ``benchmarks/`` (a source checkout is needed: the
benchmarks are not part of the installed package); ``diffusion-demo`` samples an exact
2-D Gaussian-mixture score with every diffusion sampler (:mod:`diffeqbridge.diffusion.demo`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

# The demo problem: du = mu u dt + sigma u dW, u(0) = u0 on [0, 1] (Itô), SciML's
# `prob_sde_linear`-style GBM with the constants of the brief.
MU = 1.01
SIGMA = 0.87
U0 = 0.5
T0, T1 = 0.0, 1.0

PEERS = ("jax", "torchsde", "torchdiffeq", "diffrax", "juliacall", "juliapkg", "matplotlib")


# ----------------------------------------------------------------------------- helpers


def _dist_version(name: str) -> str | None:
    """Installed version of a distribution, found without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_version() -> str:
    import diffeqbridge

    return getattr(diffeqbridge, "__version__", None) or _dist_version("diffeqbridge") or "unknown"


def _all_solvers() -> list[type]:
    """The solver classes, from ``deb.solvers.ALL_SOLVERS`` (classes or instances)."""
    from diffeqbridge import solvers

    out = []
    for s in getattr(solvers, "ALL_SOLVERS", ()):
        out.append(s if isinstance(s, type) else type(s))
    return out


def _fmt_order(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _fmt_set(xs: Any) -> str:
    if isinstance(xs, str):
        return xs
    xs = list(xs)
    return ", ".join(map(str, xs)) if xs else "—"


SOLVER_TABLE_HEADER = (
    "solver",
    "kind",
    "strong order",
    "weak order",
    "noise",
    "interpretation",
    "adaptive",
    "Lévy area",
)


def solver_rows() -> list[tuple[str, ...]]:
    """One row per solver from ``describe()``, in ``ALL_SOLVERS`` order."""
    rows = []
    for cls in _all_solvers():
        d = cls.describe()
        is_ode = d.get("kind") == "ODE"
        rows.append(
            (
                str(d["name"]),
                str(d.get("kind", "")),
                _fmt_order(d["strong_order"]),
                _fmt_order(d["weak_order"]),
                "—" if is_ode else _fmt_set(d["noise"]),
                "—" if is_ode else _fmt_set(d["interpretation"]),
                "yes" if d["adaptive"] else "no",
                "yes" if d["levy_area"] else "no",
            )
        )
    return rows


def solver_table_markdown() -> str:
    """The solver table as GitHub markdown (the README's table comes from here)."""
    lines = ["| " + " | ".join(SOLVER_TABLE_HEADER) + " |", "|" + "|".join("---" for _ in SOLVER_TABLE_HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in solver_rows()]
    return "\n".join(lines)


def solver_table_text() -> str:
    """The solver table aligned for a terminal."""
    rows = [SOLVER_TABLE_HEADER, *solver_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SOLVER_TABLE_HEADER))]
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _alg_name(alg: Any) -> str:
    if alg is None:
        return "?"
    return alg.__name__ if isinstance(alg, type) else type(alg).__name__


def _resolve_alg(name: str | None) -> Any:
    """``--alg NAME`` (case-insensitive, ``DP5`` = ``Dopri5``) to a solver instance."""
    if name is None:
        return None
    import diffeqbridge as deb

    aliases = {"dp5": "dopri5"}
    key = aliases.get(name.lower(), name.lower())
    candidates = {cls.__name__.lower(): cls for cls in _all_solvers()}
    cls = candidates.get(key) or getattr(deb, name, None)
    if not isinstance(cls, type):
        known = ", ".join(sorted(c.__name__ for c in candidates.values()))
        raise SystemExit(f"error: unknown algorithm {name!r}; known: {known}")
    return cls()


# ----------------------------------------------------------------------------- demo


def exact_gbm(bm: Any, ts: Any, u0: float = U0, mu: float = MU, sigma: float = SIGMA) -> Any:
    """Exact GBM ``u0 exp((mu - sigma^2/2) t + sigma W(t))`` on the tree's path, ``(T, B, 1)``."""
    import torch

    out = []
    for t in ts.tolist():
        w = bm.W(float(t))
        out.append(u0 * torch.exp((mu - 0.5 * sigma**2) * t + sigma * w))
    return torch.stack(out)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    import diffeqbridge as deb

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    paths = int(args.paths)
    if paths < 1:
        print("error: --paths must be >= 1", file=sys.stderr)
        return 2
    dtype = torch.float64
    alg = _resolve_alg(args.alg)

    def drift(t, y):
        return MU * y

    def diffusion(t, y):
        return SIGMA * y

    y0 = torch.full((paths, 1), U0, dtype=dtype, device=device)
    prob = deb.SDEProblem(drift, diffusion, y0, (T0, T1), noise="diagonal", interpretation="ito")
    bm = deb.VirtualBrownianTree(T0, T1, (paths, 1), seed=args.seed, dtype=dtype, device=device)
    saveat = torch.linspace(T0, T1, 11, dtype=dtype, device=device)
    kwargs: dict[str, Any] = {}
    if args.dt is not None:
        kwargs["dt"] = args.dt
    elif alg is not None and not getattr(alg, "adaptive", True):
        kwargs["dt"] = 1e-3  # fixed-step solver: it needs a step size

    print(f"diffeqbridge demo: geometric Brownian motion du = {MU:.2f} u dt + {SIGMA:.2f} u dW (Itô)")
    print(
        f"  u0 = {U0}, t in [{T0:g}, {T1:g}], {paths} paths, float64, device {device}, "
        f"atol = {args.atol:g}, rtol = {args.rtol:g}, seed = {args.seed}"
    )
    print(f"  algorithm requested: {args.alg or 'automatic (alg=None)'}" + (f", dt = {kwargs['dt']:g}" if "dt" in kwargs else ""))
    sys.stdout.flush()

    start = time.perf_counter()
    sol = deb.solve(
        prob,
        alg,
        atol=args.atol,
        rtol=args.rtol,
        saveat=saveat,
        seed=args.seed,
        brownian=bm,
        progress=not args.no_progress,
        **kwargs,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start

    ts = sol.ts
    ys = sol.ys
    exact = exact_gbm(bm, ts).to(ys.dtype)
    err = (ys - exact).abs()  # (T, B, 1)
    err_t = err.mean(dim=(1, 2))  # mean over paths at each save time
    strong_T = float(err_t[-1])
    strong_max = float(err_t.max())
    st = sol.stats
    nf = st.nf.double()
    ng = st.ng.double()
    nfe_path = float((nf + ng).mean())
    nfe_total = int((st.nf + st.ng).sum())
    summ = st.summary()
    codes = torch.bincount(sol.retcodes.long().cpu(), minlength=len(deb.ReturnCode)).tolist()
    code_str = ", ".join(f"{deb.ReturnCode(i).name}: {n}" for i, n in enumerate(codes) if n)
    mean_T = float(ys[-1].mean())
    mean_exact = U0 * math.exp(MU * (T1 - T0))

    print()
    print(f"algorithm chosen        : {_alg_name(sol.alg)}")
    print(f"strong error at T = {float(ts[-1]):g}  : {strong_T:.3e}   (mean over paths of |u - exact|)")
    print(f"strong error, max over t: {strong_max:.3e}   (over {len(ts)} save times)")
    print(f"weak check              : mean u(T) = {mean_T:.5f}, E[u(T)] = u0 e^mu = {mean_exact:.5f}")
    print(f"NFE per path (nf + ng)  : {nfe_path:.1f}   (nf {summ['nf']:.1f}, ng {summ['ng']:.1f})")
    print(f"NFE total               : {nfe_total}")
    print(f"steps per path          : accepted {summ['naccept']:.1f}, rejected {summ['nreject']:.1f} (mean)")
    print(f"retcodes                : {code_str}")
    print(f"wall time               : {wall:.2f} s")

    if args.plot:
        plot_demo(args.plot, bm, ts, ys, err_t)
        print(f"plot written            : {args.plot}")
    return 0 if sol.success else 1


def plot_demo(path: str, bm: Any, ts: Any, ys: Any, err_t: Any, n_paths: int = 5) -> None:
    """Two panels: a few paths (solver at the save times, exact on a fine grid), error vs t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    k = min(n_paths, ys.shape[1])
    fine = torch.linspace(float(ts[0]), float(ts[-1]), 201, dtype=torch.float64)
    exact_fine = exact_gbm(bm, fine)[:, :k, 0].cpu()
    t_np = ts.detach().cpu().numpy()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i in range(k):
        c = colors[i % len(colors)]
        ax0.plot(fine.numpy(), exact_fine[:, i].numpy(), color=c, lw=1.0, alpha=0.7, label="exact" if i == 0 else None)
        ax0.plot(t_np, ys[:, i, 0].detach().cpu().numpy(), "o", color=c, ms=4, label="solver (saveat)" if i == 0 else None)
    ax0.set_xlabel("t")
    ax0.set_ylabel("u(t)")
    ax0.set_title(f"GBM: {k} sample paths vs exact (same Brownian tree)")
    ax0.legend()
    e = err_t.detach().cpu().numpy()
    ax1.semilogy(t_np[1:], e[1:], "o-")
    ax1.set_xlabel("t")
    ax1.set_ylabel("mean |u - exact|")
    ax1.set_title(f"strong error over time ({ys.shape[1]} paths)")
    ax1.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    import torch

    from diffeqbridge.julia import julia_status

    print(f"diffeqbridge {package_version()}  (Python {platform.python_version()}, {platform.platform()})")
    print()
    print(f"torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(
        f"  CUDA available: {'yes' if cuda else 'no'}"
        + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)")
    )
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}: {torch.cuda.get_device_name(i)}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        print("  MPS available: yes")
    print(f"  CPU threads: {torch.get_num_threads()}")
    print()
    print("optional peers:")
    for name in PEERS:
        v = _dist_version(name)
        print(f"  {name:<12} {v if v else 'not installed'}")
    print()
    ok, reason = julia_status()
    print("backends:")
    print("  native  available (PyTorch engine; the default)")
    print(f"  julia   {'available' if ok else 'unavailable'}: {reason}")
    from diffeqbridge.julia.dispatch import julia_installed

    installed, why = julia_installed()
    print(f"  backend='auto' -> {'julia' if installed else 'native'}" + ("" if installed else f" ({why})"))
    print()
    print("solvers:")
    try:
        table = solver_table_text()
    except Exception as exc:  # pragma: no cover - only while the solvers are incomplete
        table = f"  (solver table unavailable: {exc})"
    print(table)
    return 0


# ----------------------------------------------------------------------------- bench


def find_benchmarks_dir() -> Any:
    """The repository's ``benchmarks/`` folder, found from the (editable) package location."""
    from pathlib import Path

    import diffeqbridge

    pkg = Path(diffeqbridge.__file__).resolve().parent  # .../src/diffeqbridge
    for root in (pkg.parent.parent, pkg.parent, Path.cwd()):
        cand = root / "benchmarks"
        if (cand / "run_all.py").is_file():
            return cand
    return None


def run_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    bench_dir = find_benchmarks_dir()
    if bench_dir is None:
        print(
            "error: benchmarks/ not found. `bench` needs a source checkout of diffeqbridge installed in editable "
            "mode (git clone ...; pip install -e '.[bench]'), since the benchmarks are not shipped in the package.",
            file=sys.stderr,
        )
        return 2
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from benchmarks import run_all as ra
    except ImportError as exc:
        print(
            f"error: cannot import the benchmarks from {bench_dir}: {exc}. Install the extra: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if only:
        unknown = sorted(set(only) - set(ra.ORDER))
        if unknown:
            print(f"error: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(ra.ORDER)}", file=sys.stderr)
            return 2
    out = Path(args.out)
    bar: Any = None
    try:
        from tqdm.auto import tqdm

        total = len(only) if only else len(ra.ORDER)
        bar = tqdm(total=total, desc="bench", unit="benchmark", file=sys.stderr)
    except ImportError:
        pass

    def on_progress(name: str, i: int, n: int) -> None:
        if bar is not None:
            bar.n = i
            bar.set_postfix_str(name, refresh=True)
        else:
            print(f"bench [{i}/{n}] {name}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    summary = ra.run_all(args.quick, out, only, tiny=args.tiny, threads=args.threads, on_progress=on_progress)
    if bar is not None:
        bar.close()
    print()
    print(ra.summary_table(summary))
    print(f"\nJSON and PNG files in {out.resolve()} ({time.perf_counter() - start:.0f} s)")
    return 1 if any("error" in e for e in summary.values()) else 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffeqbridge",
        description="diffeqbridge: SciML-grade SDE/ODE solving for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="solve 10,000 GBM paths with the automatic algorithm and check them against the exact solution",
        description="Solve du = 1.01 u dt + 0.87 u dW, u0 = 1/2 on [0, 1] for many paths with "
        "alg=None (automatic choice) and compare with the exact solution on the same "
        "Brownian tree.",
    )
    demo.add_argument("--paths", type=int, default=10_000, help="number of paths (default 10000)")
    demo.add_argument("--seed", type=int, default=1, help="Brownian tree seed (default 1)")
    demo.add_argument("--atol", type=float, default=1e-2, help="absolute tolerance (default 1e-2, SciML's SDE default)")
    demo.add_argument("--rtol", type=float, default=1e-2, help="relative tolerance (default 1e-2, SciML's SDE default)")
    demo.add_argument(
        "--alg", default=None, metavar="NAME", help="solver name, e.g. SOSRI, SRIW1, LambaEM, EM (default: automatic)"
    )
    demo.add_argument("--dt", type=float, default=None, help="step size (needed by fixed-step solvers; default 1e-3 for them)")
    demo.add_argument(
        "--plot", default=None, metavar="FILE.png", help="write sample paths vs exact and the error over time to this PNG"
    )
    demo.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device (default cpu)")
    demo.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    demo.set_defaults(func=run_demo)

    info = sub.add_parser("info", help="versions, devices, backends (Julia) and the solver table")
    info.set_defaults(func=run_info)

    bench = sub.add_parser(
        "bench",
        help="run the side-by-side benchmarks (torchsde, torchdiffeq, diffrax): JSON + PNG into --out",
        description="Run benchmarks/ of a source checkout: work-precision, weak error, neural SDE step, "
        "per-sample steps, Brownian tree cost. Needs the 'bench' extra.",
    )
    bench.add_argument("--quick", action="store_true", help="short run (a few minutes on 2 cores)")
    bench.add_argument("--tiny", action="store_true", help="smallest sizes, seconds (for tests); also DEB_BENCH_TINY=1")
    bench.add_argument("--out", default="bench_out", metavar="DIR", help="output folder (default bench_out/)")
    bench.add_argument("--only", default=None, metavar="NAME,...", help="comma-separated subset of the benchmarks")
    bench.add_argument("--threads", type=int, default=1, help="torch/XLA intra-op threads (default 1; 0: library defaults)")
    bench.set_defaults(func=run_bench)

    from .diffusion.demo import add_parser as add_diffusion_demo

    add_diffusion_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
