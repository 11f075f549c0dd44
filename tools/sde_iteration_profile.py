"""Per-iteration cost of an eager adaptive SDE solve on GBM, and its wall time against torchsde's.

    PYTHONPATH=src python tools/sde_iteration_profile.py ops SRIW1 --tol 1e-2
    PYTHONPATH=src python tools/sde_iteration_profile.py race --repeats 5

``ops``: one solve of ``benchmarks/_sde_problems.py``'s GBM (B = 256, float64, one thread)
under ``torch.profiler``; prints the loop iterations (the slowest sample's step attempts),
the top-level ATen ops per iteration grouped by the innermost ``diffeqbridge`` function that
issued them, and the CPU time per iteration.

``race``: ours SRIW1 / SOSRI adaptive and SRIW1 fixed-step against torchsde's fixed-step srk
on the same Brownian path (``benchmarks/_peers.py``), interleaved in one process; the time of
each solve is the least CPU time (``time.process_time``) over ``--repeats`` rounds, which a
loaded machine disturbs less than wall time; ratios ours/torchsde at matched strong error
(log-log interpolation, ``_peers.cost_at``).  Diagnostic only: the committed figures come from
``benchmarks/sde_work_precision.py``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import diffeqbridge as deb  # noqa: E402
from benchmarks import _peers as Pe  # noqa: E402
from benchmarks._sde_problems import problems  # noqa: E402

B = 256


def _runner(name: str, adaptive: bool) -> Any:
    """``level -> {err, nfe, iters}`` for our solver ``name`` on GBM (tol or fixed dt)."""
    P = problems()["gbm"]
    prob, bm = P.ours(B), Pe.our_tree(P, B, 0)
    exact = Pe.reference_ours(P, prob, bm, 0).numpy()

    def run(level: float) -> dict[str, float]:
        kw: dict[str, Any] = {"atol": level, "rtol": level} if adaptive else {"dt": level, "adaptive": False}
        sol = deb.solve(prob, getattr(deb, name)(), brownian=bm, max_steps=200_000, **kw)
        return {
            "err": Pe.strong_error(sol.ys[-1].numpy(), exact),
            "nfe": float((sol.stats.nf + sol.stats.ng).double().mean()),
            "iters": int((sol.stats.naccept + sol.stats.nreject).max()),
        }

    return run


def ops(name: str, tol: float) -> None:
    from torch.profiler import ProfilerActivity, profile

    run = _runner(name, True)
    iters = int(run(tol)["iters"])
    best = min(_cpu_time(run, tol) for _ in range(3))
    config = torch._C._profiler._ExperimentalConfig(verbose=True)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, experimental_config=config) as prof:
        run(tol)
    count: collections.Counter[str] = collections.Counter()
    names: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        frames = [f for f in event.stack if "diffeqbridge/" in f]
        where = frames[0].split("diffeqbridge/")[-1] if frames else "?"
        count[where] += 1
        names[where][event.name.removeprefix("aten::")] += 1
    total = sum(count.values())
    print(
        f"{name} tol {tol:g}: {iters} iterations, {total / iters:.0f} top-level ATen ops and {best / iters * 1e6:.0f} µs CPU each"
    )
    for where, n in count.most_common(30):
        print(f"{n / iters:6.1f}/it  {where:60s} {dict(names[where].most_common(4))}")


def _cpu_time(run: Any, level: float) -> float:
    start = time.process_time()
    run(level)
    return time.process_time() - start


def race(repeats: int) -> None:
    P = problems()["gbm"]
    tols = [1e-1, 10**-1.5, 1e-2, 10**-2.5, 1e-3]
    runs = {
        "SRIW1 (adaptive)": (_runner("SRIW1", True), tols),
        "SOSRI (adaptive)": (_runner("SOSRI", True), tols),
        "SRIW1 (fixed)": (_runner("SRIW1", False), [2.0**-k for k in range(1, 7)]),
        "torchsde srk": (Pe.make_torchsde(P, B, "srk", False), [2.0**-k for k in range(1, 8)]),
    }
    items = [(key, level) for key, (_, levels) in runs.items() for level in levels]
    times: dict[tuple[str, float], list[float]] = {item: [] for item in items}
    result: dict[tuple[str, float], dict[str, float]] = {}
    for r in range(repeats):
        shift = r * len(items) // repeats
        for key, level in items[shift:] + items[:shift]:
            start = time.process_time()
            result[(key, level)] = runs[key][0](level)
            times[(key, level)].append(time.process_time() - start)
    rows: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for (key, level), ts in times.items():
        res, best = result[(key, level)], min(ts)
        rows[key].append((best, res["err"]))
        per = f"  {best / res['iters'] * 1e6:5.0f} µs/iteration" if "iters" in res else ""
        print(f"{key:17s} {level:9.3g}  err {res['err']:.2e}  NFE {res['nfe']:7.1f}  {best * 1e3:7.1f} ms{per}")
    for target in (3.16e-2, 1e-2, 3.16e-3):
        peer = Pe.cost_at(rows["torchsde srk"], target)
        ratios = []
        for key in ("SRIW1 (adaptive)", "SOSRI (adaptive)", "SRIW1 (fixed)"):
            ours = Pe.cost_at(rows[key], target)
            ratios.append(f"{key} {ours / peer:.2f}" if ours and peer else f"{key} -")
        print(f"strong error {target:.2g}, time ours/torchsde: " + ", ".join(ratios))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p_ops = sub.add_parser("ops", help="ATen ops and CPU time per loop iteration")
    p_ops.add_argument("solver", nargs="?", default="SRIW1")
    p_ops.add_argument("--tol", type=float, default=1e-2)
    p_race = sub.add_parser("race", help="interleaved against torchsde's srk at matched strong error")
    p_race.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode == "ops":
        ops(args.solver, args.tol)
    else:
        race(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
