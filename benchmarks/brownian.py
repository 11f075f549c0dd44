"""Cost per query of a Brownian path with space-time Lévy area: ours vs torchsde vs diffrax.

A *query* returns, for every one of ``B`` samples, the increment ``W(t) - W(s)`` and the
space-time Lévy area ``H_{s,t}`` over a random interval ``[s, t] ⊂ [0, 1]`` (``s < t``
sorted uniforms), in float64, with noise shape ``(B, N)`` (``N = 1`` by default).

Implementations (all seeded once, tolerance ``2^-20`` on ``[0, 1]`` where one applies):

* ``ours``: :class:`diffeqbridge.VirtualBrownianTree`, ``bm(s, t)`` with per-sample
  ``(B,)`` times, and with batch-shared scalar times; ``bm.evaluate(t)`` (the one call per
  engine step) separately, on the fused kernel (the default where a C compiler exists) and
  on the eager path (``bm._evaluate_eager``, what runs without one).  Cost per sample per
  level = time of ``evaluate`` / (B x depth).
* ``diffrax``: ``diffrax.VirtualBrownianTree(levy_area=SpaceTimeLevyArea)``; per-sample
  times through ``jax.jit(jax.vmap(...))`` over one tree per sample (per-sample keys),
  shared times through one tree of shape ``(B, N)``; x64 enabled, warm (compiled during
  warm-up), ``block_until_ready``.
* ``torchsde``: ``torchsde.BrownianInterval(levy_area_approximation='space-time',
  entropy=seed)``, which takes one scalar ``(s, t)`` for the whole batch.  Per-sample times
  are emulated by a Python loop over ``B`` intervals of size ``(1, N)``; that is only
  feasible for small ``B`` (``B <= 1024`` here) and is reported as such.  At every ``B`` we
  also time what it does natively: batch-shared random times with size ``(B, N)`` noise.
  BrownianInterval splits at the query points themselves (exact at any points, no
  ``tol``); it keeps the interval tree it grows, so its per-query cost rises slowly
  (roughly with the log of the number of queries made); ``queries_made`` records that.
  H is recovered from torchsde's ``U = ∫_s^t (W_u - W_s) du`` as ``U/(t-s) - dW/2``.

Ratios are ``peer / ours`` against the like-for-like ours case (per-sample vs per-sample,
shared vs shared).  A ``torch.profiler`` summary of ours at ``B = 1024`` is included.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:  # run as a script: python benchmarks/brownian.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _harness as H  # type: ignore[no-redef]

NAME = "brownian"
T0, T1 = 0.0, 1.0
TOL = 2.0**-20
SEED = 0
BATCH_SIZES = (1, 1024, 65536)
LOOP_MAX_B = 1024  # largest B for the torchsde per-sample loop
POOL = 8  # distinct pre-generated queries cycled through per case

OURS = "ours (per-sample t)"
OURS_SHARED = "ours (shared t)"
OURS_EVAL = "ours evaluate (per-sample t)"
OURS_EVAL_EAGER = "ours evaluate, eager path (per-sample t)"
DFX = "diffrax (vmap, per-sample t)"
DFX_SHARED = "diffrax (shared t)"
TSDE_LOOP = "torchsde (loop over B, per-sample t)"
TSDE_SHARED = "torchsde (shared t)"

# peer -> the ours case it is compared with
BASELINE = {
    DFX: OURS,
    TSDE_LOOP: OURS,
    DFX_SHARED: OURS_SHARED,
    TSDE_SHARED: OURS_SHARED,
    OURS_EVAL: OURS,
    OURS_EVAL_EAGER: OURS_EVAL,
}
STYLES = {
    OURS: {"color": "C0", "linewidth": 2.5},
    OURS_SHARED: {"color": "C0", "linestyle": "--"},
    OURS_EVAL: {"color": "C0", "linestyle": ":", "marker": "s"},
    OURS_EVAL_EAGER: {"color": "C3", "linestyle": ":", "marker": "x"},
    DFX: {"color": "C1"},
    DFX_SHARED: {"color": "C1", "linestyle": "--"},
    TSDE_LOOP: {"color": "C2"},
    TSDE_SHARED: {"color": "C2", "linestyle": "--"},
}


def _cases_for(B: int, N: int, rng, queries: dict[str, int]) -> dict[str, Callable[[], Any]]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchsde

    from diffeqbridge import VirtualBrownianTree

    # The stateless trees (ours, diffrax) cycle through POOL pre-generated queries.
    lo_hi = np.sort(rng.random((POOL, 2, B)), axis=1)  # per-sample s < t
    shared = np.sort(rng.random((POOL, 2)), axis=1)
    per_sample_torch = [(torch.from_numpy(q[0].copy()), torch.from_numpy(q[1].copy())) for q in lo_hi]
    per_sample_torch_t = [(torch.from_numpy(q[1].copy()),) for q in lo_hi]
    shared_float = [(float(q[0]), float(q[1])) for q in shared]
    per_sample_jax = [(jnp.asarray(q[0]), jnp.asarray(q[1])) for q in lo_hi]
    shared_jax = [(jnp.asarray(q[0]), jnp.asarray(q[1])) for q in shared]

    cases: dict[str, Callable[[], Any]] = {}

    # ----- ours
    bm = VirtualBrownianTree(T0, T1, (B, N), seed=SEED, tol=TOL, dtype=torch.float64)
    cases[OURS] = H.cycle(bm, per_sample_torch)
    cases[OURS_SHARED] = H.cycle(bm, shared_float)
    cases[OURS_EVAL] = H.cycle(bm.evaluate, per_sample_torch_t)
    if B <= LOOP_MAX_B * 64:
        cases[OURS_EVAL_EAGER] = H.cycle(bm._evaluate_eager, per_sample_torch_t)

    # ----- diffrax
    keys = jax.random.split(jax.random.key(SEED), B)

    def one_sample(key, s, t):
        tree = diffrax.VirtualBrownianTree(T0, T1, tol=TOL, shape=(N,), key=key, levy_area=diffrax.SpaceTimeLevyArea)
        inc = tree.evaluate(s, t, use_levy=True)
        return inc.W, inc.H

    per_sample_fn = jax.jit(jax.vmap(one_sample))

    @jax.jit
    def shared_fn(key, s, t):
        tree = diffrax.VirtualBrownianTree(T0, T1, tol=TOL, shape=(B, N), key=key, levy_area=diffrax.SpaceTimeLevyArea)
        inc = tree.evaluate(s, t, use_levy=True)
        return inc.W, inc.H

    key0 = jax.random.key(SEED)
    cases[DFX] = H.cycle(lambda s, t: jax.block_until_ready(per_sample_fn(keys, s, t)), per_sample_jax)
    cases[DFX_SHARED] = H.cycle(lambda s, t: jax.block_until_ready(shared_fn(key0, s, t)), shared_jax)

    # ----- torchsde
    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        queries[name] = 0

        def call(*args):
            queries[name] += 1
            return fn(*args)

        return call

    interval = torchsde.BrownianInterval(
        T0, T1, size=(B, N), dtype=torch.float64, entropy=SEED, levy_area_approximation="space-time"
    )

    def tsde_shared(s: float, t: float):
        dw, u = interval(s, t, return_U=True)
        return dw, u / (t - s) - 0.5 * dw

    # BrownianInterval caches the results of intervals it has served, so unlike the
    # stateless trees it must get fresh times on every call (drawn inside the call; the
    # draw costs ~1 µs for shared times, ~B µs for the loop, small against the queries).
    tsde_rng = np.random.default_rng(SEED + B)

    def fresh_shared() -> tuple[float, float]:
        s, t = sorted(tsde_rng.random(2).tolist())
        return s, t

    shared_query = counted(f"{TSDE_SHARED} @ B={B}", tsde_shared)
    cases[TSDE_SHARED] = lambda: shared_query(*fresh_shared())

    if B <= LOOP_MAX_B:
        intervals = [
            torchsde.BrownianInterval(
                T0, T1, size=(1, N), dtype=torch.float64, entropy=SEED + i, levy_area_approximation="space-time"
            )
            for i in range(B)
        ]

        def tsde_loop(ss: list[float], ts: list[float]):
            dws, hs = [], []
            for bi, s, t in zip(intervals, ss, ts):
                dw, u = bi(s, t, return_U=True)
                dws.append(dw)
                hs.append(u / (t - s) - 0.5 * dw)
            return torch.cat(dws), torch.cat(hs)

        loop_query = counted(f"{TSDE_LOOP} @ B={B}", tsde_loop)

        def fresh_loop():
            q = np.sort(tsde_rng.random((2, B)), axis=0)
            return loop_query(q[0].tolist(), q[1].tolist())

        cases[TSDE_LOOP] = fresh_loop

    return cases


def _sanity(cases: dict[str, Callable[[], Any]], B: int, N: int) -> None:
    import numpy as np

    for name, fn in cases.items():
        out = fn()
        for x in out:
            a = np.asarray(x)
            if a.shape != (B, N) or not np.all(np.isfinite(a)):
                raise RuntimeError(f"{name}: expected finite ({B}, {N}) output, got {a.shape}")


def _profile_ours(B: int, N: int, calls: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffeqbridge import VirtualBrownianTree
    from diffeqbridge import _tree_kernel as K

    bm = VirtualBrownianTree(T0, T1, (B, N), seed=SEED, tol=TOL, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    qs = [torch.sort(torch.rand(2, B, generator=g, dtype=torch.float64), dim=0).values for _ in range(calls)]
    bm(qs[0][0], qs[0][1])
    run_c = K.run_c

    def labelled(*args, **kwargs):  # the C kernel is no torch op: name it for the profiler
        with torch.profiler.record_function("tree_point (fused C kernel)"):
            return run_c(*args, **kwargs)

    K.run_c = labelled
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for q in qs:
                bm(q[0], q[1])
    finally:
        K.run_c = run_c
    avgs = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    rows = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "B": B,
        "kernel": bm.kernel,
        "calls": calls,
        "total_self_cpu_us_per_call": total / calls,
        "top_ops": [
            {
                "name": e.key,
                "count_per_call": e.count / calls,
                "self_cpu_us_per_call": e.self_cpu_time_total / calls,
                "self_cpu_pct": 100.0 * e.self_cpu_time_total / total,
            }
            for e in rows
        ],
    }


def _min_cost_per_level(B: int, N: int, calls: int) -> dict[str, Any]:
    """Fastest of ``calls`` ``evaluate`` calls (per-sample random times, fused path) per sample
    per level: on a shared machine the minimum is the figure least distorted by other jobs."""
    import time

    import torch

    from diffeqbridge import VirtualBrownianTree

    bm = VirtualBrownianTree(T0, T1, (B, N), seed=SEED, tol=TOL, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    best = float("inf")
    for _ in range(calls):
        t = torch.rand(B, generator=g, dtype=torch.float64)
        start = time.perf_counter()
        bm.evaluate(t)
        best = min(best, time.perf_counter() - start)
    return {
        "B": B,
        "kernel": bm.kernel,
        "calls": calls,
        "min_seconds": best,
        "ns_per_sample_per_level": 1e9 * best / (B * N * bm.depth),
    }


def run(quick: bool, out: Path, noise_dim: int = 1, batch_sizes: tuple[int, ...] = BATCH_SIZES, threads: int = 1) -> dict:
    threading = H.set_threads(threads)  # before jax initialises
    import jax
    import numpy as np
    import torch

    jax.config.update("jax_enable_x64", True)
    torch.set_default_dtype(torch.float64)
    repeats, target_s, warmup = (3, 0.01, 0) if quick else (9, 0.05, 1)

    from diffeqbridge import VirtualBrownianTree

    depth = VirtualBrownianTree(T0, T1, (1, 1), tol=TOL).depth
    rng = np.random.default_rng(12345)
    queries: dict[str, int] = {}
    timings: dict[str, dict[int, H.Timing]] = {}
    for B in batch_sizes:
        cases = _cases_for(B, noise_dim, rng, queries)
        _sanity(cases, B, noise_dim)  # also the first warm-up (JIT compilation for diffrax)
        for name, t in H.measure_interleaved(cases, repeats=repeats, warmup=warmup, target_s=target_s).items():
            timings.setdefault(name, {})[B] = t
        print(f"B={B}: " + ", ".join(f"{n}: {H.format_seconds(timings[n][B].median)}" for n in cases), flush=True)

    names = list(timings)
    table = []
    for name in names:
        for B in batch_sizes:
            t = timings[name].get(B)
            base = BASELINE.get(name)
            ratio = None
            if t is not None and base is not None and B in timings.get(base, {}):
                ratio = t.median / timings[base][B].median
            table.append(
                {
                    "impl": name,
                    "B": B,
                    "seconds_per_query": None if t is None else t.median,
                    "seconds_per_query_per_sample": None if t is None else t.median / B,
                    "ns_per_sample_per_level": None
                    if t is None or name not in (OURS_EVAL, OURS_EVAL_EAGER)
                    else 1e9 * t.median / (B * noise_dim * depth),
                    "ratio_vs": base,
                    "ratio": ratio,
                    "timing": None if t is None else t.as_dict(),
                    "skipped": None if t is not None else f"torchsde per-sample loop infeasible at B={B} (> {LOOP_MAX_B})",
                }
            )

    profile = _profile_ours(1024 if 1024 in batch_sizes else batch_sizes[0], noise_dim, calls=5 if quick else 20)
    min_cost = [
        _min_cost_per_level(B, noise_dim, calls=(30 if B <= 4096 else 5) * (1 if quick else 3)) for B in batch_sizes if B >= 1024
    ]

    payload = {
        "config": {
            "t0": T0,
            "t1": T1,
            "tol": TOL,
            "depth": depth,
            "kernel": VirtualBrownianTree(T0, T1, (1, 1), tol=TOL).kernel,
            "seed": SEED,
            "noise_shape": ["B", noise_dim],
            "dtype": "float64",
            "batch_sizes": list(batch_sizes),
            "quick": quick,
            "threads": threading,
            "repeats": repeats,
            "warmup": warmup,
            "target_sample_s": target_s,
            "query": "per-sample: independent sorted uniforms s<t in [0,1] per sample; shared: one sorted pair for the batch",
            "ratio": "peer median / like-for-like ours median (per-sample vs per-sample, shared vs shared); "
            "for ours evaluate: evaluate / ours call",
        },
        "notes": [
            "torchsde BrownianInterval takes scalar (s, t) for the whole batch; per-sample times are emulated with a Python "
            f"loop over B intervals of size (1, N), measured only for B <= {LOOP_MAX_B}.",
            "torchsde (shared t) is what torchsde does natively: batch-shared random times with (B, N) noise.",
            "torchsde BrownianInterval is exact at any query points (no tol) and keeps the interval tree it grows; "
            "queries_made counts the queries each timed torchsde object had served by the end; torchsde gets fresh "
            "random times on every call (it caches results of intervals already served), ours and diffrax cycle through "
            f"{POOL} pre-generated queries (they are stateless).",
            "diffrax per-sample times: jax.jit(jax.vmap) over one VirtualBrownianTree per sample (per-sample keys); "
            "shared: one tree of shape (B, N). Warm (compiled in warm-up), block_until_ready.",
            "Times are medians over interleaved repeats on a shared machine; compare ratios within one run.",
            "Default --threads 1 pins torch and XLA:CPU to one intra-op thread: on a loaded 2-core machine torch's "
            "2-thread kernels were measured 4-20x slower than 1-thread ones for our tree.",
        ],
        "queries_made": queries,
        "results": table,
        "profile_ours": profile,
        "min_cost_per_level": min_cost,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    print(_summary(table, profile))
    print(
        "fastest evaluate per sample per level: "
        + ", ".join(f"B={m['B']}: {m['ns_per_sample_per_level']:.1f} ns ({m['kernel']})" for m in min_cost)
    )
    return doc


def _medians(doc: dict) -> dict[str, dict[int, float]]:
    """``{case: {B: median seconds per query}}`` from the JSON document's result rows."""
    out: dict[str, dict[int, float]] = {}
    for r in doc["results"]:
        if r["seconds_per_query"] is not None:
            out.setdefault(r["impl"], {})[r["B"]] = r["seconds_per_query"]
    return out


def plot(doc: dict) -> Any:
    """Time per query vs B and the peer / ours ratios, from the JSON document."""
    timings, batch_sizes, machine = _medians(doc), doc["config"]["batch_sizes"], doc["meta"]
    fig, (ax_t, ax_r) = H.figure(ncols=2)
    H.plot_series(
        ax_t,
        {n: (batch_sizes, [timings[n].get(B) for B in batch_sizes]) for n in timings},
        xlabel="samples B",
        ylabel="wall time per query [s]",
        title="(dW, H) query, float64, tol 2^-20",
        styles=STYLES,
    )
    ratios = {}
    for n, base in BASELINE.items():
        if n in timings:
            ratios[f"{n} / {base}"] = (
                batch_sizes,
                [timings[n][B] / timings[base][B] if B in timings[n] and B in timings[base] else None for B in batch_sizes],
            )
    H.plot_series(
        ax_r,
        ratios,
        xlabel="samples B",
        ylabel="time ratio (>1: ours faster)",
        title=f"peer / ours ({machine.get('cpu_affinity')} CPUs, torch threads {machine.get('torch_threads')})",
        styles={f"{n} / {b}": STYLES[n] for n, b in BASELINE.items()},
    )
    ax_r.axhline(1.0, color="k", linewidth=0.8)
    return fig


ROW_LABELS = {
    OURS: "ours `bm(s, t)`, per-sample t",
    OURS_SHARED: "ours `bm(s, t)`, shared t",
    OURS_EVAL: "ours `evaluate(t)` (one per engine step)",
    OURS_EVAL_EAGER: "ours `evaluate(t)`, eager path",
    DFX: "diffrax `VirtualBrownianTree`, vmap, per-sample t",
    DFX_SHARED: "diffrax, shared t",
    TSDE_SHARED: "torchsde `BrownianInterval`, shared t",
    TSDE_LOOP: "torchsde, Python loop over B, per-sample t",
}


def tables(doc: dict) -> dict[str, str]:
    """``cases``: median time per query per case and B (peer / ours ratio in brackets);
    ``min_cost``: the fastest fused ``evaluate`` per sample per level."""
    batch_sizes = doc["config"]["batch_sizes"]
    cells: dict[str, dict[int, str]] = {}
    for r in doc["results"]:
        t = r["seconds_per_query"]
        if t is None:
            cell = "—"
        elif r["ratio"] is None or r["impl"] == OURS_EVAL:
            cell = H.format_seconds(t)
        elif r["impl"] == OURS_EVAL_EAGER:
            cell = f"{H.format_seconds(t)} ({r['ratio']:.3g}x)"
        else:
            cell = f"{H.format_seconds(t)} ({r['ratio']:.3g})"
        cells.setdefault(r["impl"], {})[r["B"]] = cell
    order = [n for n in ROW_LABELS if n in cells] + [n for n in cells if n not in ROW_LABELS]
    rows = [[ROW_LABELS.get(n, n), *(cells[n].get(B, "—") for B in batch_sizes)] for n in order]
    min_cost = [(m["B"], m["kernel"], m["calls"], f"{m['ns_per_sample_per_level']:.1f} ns") for m in doc["min_cost_per_level"]]
    return {
        "cases": H.markdown_table(["case", *(f"B = {B}" for B in batch_sizes)], rows),
        "min_cost": H.markdown_table(["B", "kernel", "calls", "fastest cost per sample per level"], min_cost),
    }


def _summary(table: list[dict], profile: dict) -> str:
    rows = [
        (
            r["impl"],
            r["B"],
            H.format_seconds(r["seconds_per_query"]),
            "—" if r["ratio"] is None else f"{r['ratio']:.3g}",
            r["ratio_vs"] or "",
            "" if r.get("ns_per_sample_per_level") is None else f"{r['ns_per_sample_per_level']:.1f}",
        )
        for r in table
    ]
    text = H.markdown_table(["impl", "B", "time/query", "ratio", "vs", "ns/sample/level"], rows)
    prof_rows = [
        (o["name"], f"{o['count_per_call']:.0f}", H.format_seconds(o["self_cpu_us_per_call"] * 1e-6), f"{o['self_cpu_pct']:.1f}%")
        for o in profile["top_ops"][:10]
    ]
    text += f"\n\ntorch.profiler, ours bm(s, t) at B={profile['B']} (per call):\n"
    text += H.markdown_table(["op", "calls", "self CPU", "share"], prof_rows)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = H.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--noise-dim", type=int, default=1, help="N: noise shape per sample (default 1)")
    args = parser.parse_args(argv)
    run(args.quick, args.out, noise_dim=args.noise_dim, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
