"""``solve(..., compile=True)`` against the eager loop and diffrax (Lotka–Volterra) and torchsde (GBM).

x' = 1.5x - xy, y' = -3y + xy on [0, 10], atol = rtol = 1e-6, batches of B initial states.
Measured per batch size: the first compiled solve from a cold inductor cache (compile
time + one solve), the warm per-solve times of both loops and of diffrax (Tsit5, the same
PIDController tolerances, ``jax.jit(jax.vmap(diffeqsolve))`` over the batch: per-sample
steps as ours; warm, compiled before timing) as interleaved medians (``unrolled``: compiled with
``check_every=8``, 8 iterations per compiled call, through inductor's C++ wrapper as
``compile=True`` does on the CPU; at B = 64 also ``unrolled_python_wrapper``: the same through
its Python wrapper), the steps (which must be equal between our loops), the largest
difference of the solutions and the first solve of each compiled variant (its compilation).
``profile``: where a warm unrolled solve at B = 64 spends its time, with either wrapper
(cProfile, :func:`_profile`).

GBM (``gbm`` rows; the problem of ``sde_work_precision.py``, B = 256 paths on one shared
Brownian path per sample): SOSRI at tol 1e-2 and 1e-3, eager, compiled with the tree query
inside the graph (the C kernel as custom ops; also with ``check_every=8``: 8 iterations per
compiled call) and compiled with it between graphs (the path
before the custom ops, forced with a tree whose ``traceable`` is False), against torchsde's
fixed-step ``srk`` on the same paths; all interleaved in one measurement.  ``matched``:
torchsde's cheapest run at least as accurate (strong error at T) as ours.

    python benchmarks/compile_iteration.py [--quick] [--out DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "compile_iteration"
UNROLL = 8  # check_every of the "unrolled" runs: compiled calls of 8 iterations
WRAPPER_BATCH = 64  # the batch size whose unrolled calls are also measured with inductor's Python wrapper


def python_wrapper(solve: Any) -> Any:
    """``solve()`` with the unrolled calls through inductor's Python wrapper (the default on the
    CPU is its C++ wrapper, ``engine.Integrator._cpp_wrapper``)."""
    from diffeqbridge import engine

    engine._CPP_WRAPPER_UNROLLED = False
    try:
        return solve()
    finally:
        engine._CPP_WRAPPER_UNROLLED = True


def _diffrax_solve(batch: int) -> Any:
    """diffrax's warm solve of the same batch (None when diffrax/JAX are not installed)."""
    try:
        import diffrax
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    import numpy as np

    jax.config.update("jax_enable_x64", True)

    def lotka_volterra(t: Any, y: Any, args: Any) -> Any:
        a, b = y[0], y[1]
        return jnp.stack([1.5 * a - a * b, -3.0 * b + a * b])

    def one(y: Any) -> Any:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lotka_volterra),
            diffrax.Tsit5(),
            0.0,
            10.0,
            dt0=None,
            y0=y,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=100_000,
        )
        return sol.ys[-1]

    batched = jax.jit(jax.vmap(one))
    y0 = jnp.asarray(np.ones((batch, 2)) + np.linspace(0, 1, batch)[:, None])

    def solve() -> Any:
        return jax.block_until_ready(batched(y0))

    solve()  # compile
    return solve


def _problem(batch: int) -> Any:
    import torch

    import diffeqbridge as deb

    def lotka_volterra(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = y[:, 0], y[:, 1]
        return torch.stack([1.5 * a - a * b, -3.0 * b + a * b], dim=1)

    y0 = torch.ones(batch, 2, dtype=torch.float64) + torch.linspace(0, 1, batch, dtype=torch.float64)[:, None]
    return deb.ODEProblem(lotka_volterra, y0, (0.0, 10.0))


def run(quick: bool, out: Path, threads: int = 1) -> dict:
    threading = H.set_threads(threads)
    # a cold inductor cache, so the first compiled solve shows the whole compilation cost
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deb-inductor-")

    import diffeqbridge as deb

    rows = []
    for batch in [1, 64] if quick else [1, 64, 1024]:
        prob = _problem(batch)

        def solve(compile: bool, prob: Any = prob, every: int | None = None) -> Any:
            return deb.solve(prob, deb.Tsit5(), atol=1e-6, rtol=1e-6, backend="native", compile=compile, check_every=every)

        eager = solve(False)
        start = time.perf_counter()
        compiled = solve(True)
        first = time.perf_counter() - start
        start = time.perf_counter()
        unrolled = solve(True, every=UNROLL)  # compiles the unrolled graph
        first_unrolled = time.perf_counter() - start
        cases = {"eager": lambda: solve(False), "compiled": lambda: solve(True), "unrolled": lambda: solve(True, every=UNROLL)}
        first_python = None
        if batch == WRAPPER_BATCH:
            start = time.perf_counter()
            python_wrapper(lambda: solve(True, every=UNROLL))  # compiles it
            first_python = time.perf_counter() - start
            cases["unrolled_python_wrapper"] = lambda: python_wrapper(lambda: solve(True, every=UNROLL))
        dfx = _diffrax_solve(batch)
        if dfx is not None:
            cases["diffrax"] = dfx
        timings = H.measure_interleaved(cases, repeats=5 if quick else 15, warmup=1, target_s=0.2)
        dfx_median = timings["diffrax"].median if dfx is not None else None
        if batch == WRAPPER_BATCH:
            profiled = prob  # compiled already (a new problem would be one more compilation)
        rows.append(
            {
                "batch": batch,
                "first_compiled_solve_s": first,
                "eager": timings["eager"],
                "compiled": timings["compiled"],
                "diffrax": timings.get("diffrax"),
                "speedup": timings["eager"].median / timings["compiled"].median,
                "eager_over_diffrax": timings["eager"].median / dfx_median if dfx_median else None,
                "compiled_over_diffrax": timings["compiled"].median / dfx_median if dfx_median else None,
                "unrolled": timings["unrolled"],
                "unrolled_over_diffrax": timings["unrolled"].median / dfx_median if dfx_median else None,
                "first_unrolled_solve_s": first_unrolled,
                "unrolled_python_wrapper": timings.get("unrolled_python_wrapper"),
                "unrolled_python_wrapper_over_diffrax": (
                    timings["unrolled_python_wrapper"].median / dfx_median if dfx_median and first_python else None
                ),
                "first_python_wrapper_solve_s": first_python,
                "unrolled_max_abs_diff": float((eager.ys - unrolled.ys).abs().max()),
                "naccept_max": int(eager.stats.naccept.max()),
                "same_steps": bool(
                    (eager.stats.naccept == compiled.stats.naccept).all()
                    and (eager.stats.nreject == compiled.stats.nreject).all()
                ),
                "max_abs_diff": float((eager.ys - compiled.ys).abs().max()),
            }
        )
        print(
            f"B={batch}: first compiled solve {first:.2f} s; eager {H.format_seconds(timings['eager'].median)}, "
            f"compiled {H.format_seconds(timings['compiled'].median)} per solve, "
            f"unrolled (check_every={UNROLL}) {H.format_seconds(timings['unrolled'].median)}, "
            f"diffrax {H.format_seconds(dfx_median)}; "
            f"same steps {rows[-1]['same_steps']}, max |diff| {rows[-1]['max_abs_diff']:.3g}"
        )
    profile = {"cpp_wrapper": _profile(profiled), "python_wrapper": python_wrapper(lambda: _profile(profiled))}
    gbm = _gbm_rows(quick)
    payload = {"threads": threading, "rows": rows, "profile": profile, "gbm": gbm}
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def _profile(prob: Any, solves: int = 20) -> dict:
    """Where a warm ``compile=True, check_every=UNROLL`` solve spends its time: cProfile of
    ``solves`` solves, as shares of the total: the compiled calls (torch.compile's
    ``compile_wrapper``, cumulative) split into dynamo and AOTAutograd (guards, frame, runtime
    wrapper, writing the outputs back), inductor's wrapper (``call``: its Python), the buffers
    it allocates and views (``empty_strided``, ``reinterpret_tensor``) and the kernel; and
    ``eager``: the rest of the solve (initial step, the eager first iteration, the loop's
    checks).  Per compiled call: those buffer calls and the kernels.  cProfile inflates
    Python-side costs; the shares, not the absolute times, are the point."""
    import cProfile
    import pstats

    import diffeqbridge as deb

    def solve() -> Any:
        return deb.solve(prob, deb.Tsit5(), atol=1e-6, rtol=1e-6, backend="native", compile=True, check_every=UNROLL)

    solve()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(solves):
        solve()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats.values())
    sums = dict.fromkeys(
        ("compiled", "inductor", "kernel", "buffers", "calls", "empty_strided", "reinterpret_tensor", "kernels"), 0.0
    )
    for (file, _, function), (_, ncalls, tottime, cumtime, _) in stats.items():
        if function == "compile_wrapper":  # torch.compile's entry: one per compiled call
            sums["compiled"] += cumtime
            sums["calls"] += ncalls
        elif function == "__call__" and file.endswith("output_code.py"):  # inductor's compiled graph
            sums["inductor"] += cumtime
        elif function.endswith(".kernel>") or "inductor_entry_cpp" in function:
            sums["kernel"] += tottime
            sums["kernels"] += ncalls
        else:
            for key in ("empty_strided", "reinterpret_tensor"):
                if f"_{key}" in function:
                    sums["buffers"] += tottime
                    sums[key] += ncalls
    share = {
        "dynamo and AOTAutograd": (sums["compiled"] - sums["inductor"]) / total,
        "inductor wrapper (Python)": (sums["inductor"] - sums["kernel"] - sums["buffers"]) / total,
        "wrapper buffers": sums["buffers"] / total,
        "kernel": sums["kernel"] / total,
        "eager (start, first iteration, checks)": (total - sums["compiled"]) / total,
    }
    calls = max(sums["calls"], 1.0)
    per_call = {key: sums[key] / calls for key in ("empty_strided", "reinterpret_tensor", "kernels")}
    print(f"profile (B = {prob.y0.shape[0]}, check_every={UNROLL}): shares {share}; per compiled call {per_call}")
    return {
        "batch": int(prob.y0.shape[0]),
        "solves": solves,
        "seconds_per_solve": total / solves,
        "share": share,
        "per_call": per_call,
    }


def _gbm_rows(quick: bool) -> list[dict]:
    """GBM timings (module docstring): one row per (library, variant, level)."""
    import diffeqbridge as deb
    from benchmarks import _peers as Pe
    from benchmarks._sde_problems import problems

    class BetweenGraphs(deb.VirtualBrownianTree):
        """The same tree, its query kept eager between compiled graphs (the earlier path)."""

        @property
        def traceable(self) -> bool:
            return False

    P, batch = problems()["gbm"], 256
    prob = P.ours(batch)
    trees = {"in-graph": Pe.our_tree(P, batch), "between-graphs": Pe.our_tree(P, batch), "eager": Pe.our_tree(P, batch)}
    trees["between-graphs"].__class__ = BetweenGraphs
    exact_end = Pe.reference_ours(P, prob, trees["eager"]).numpy()
    results: dict[str, Any] = {}

    def ours(variant: str, tol: float) -> Any:
        def solve() -> Any:
            every = UNROLL if variant.endswith("unrolled") else None
            tree = trees[variant.removesuffix("-unrolled")]
            sol = deb.solve(
                prob,
                deb.SOSRI(),
                atol=tol,
                rtol=tol,
                brownian=tree,
                compile=variant != "eager",
                check_every=every,
                backend="native",
            )
            results[f"ours {variant} {tol:g}"] = sol
            return sol

        return solve

    cases: dict[str, Any] = {}
    for tol in (1e-2, 1e-3):
        for variant in ("eager", "in-graph", "between-graphs", "in-graph-unrolled"):
            cases[f"ours {variant} {tol:g}"] = ours(variant, tol)
    for k in (3, 4, 5, 6):
        runner = Pe.make_torchsde(P, batch, "srk", False)
        cases[f"torchsde srk {2.0**-k:g}"] = lambda runner=runner, k=k: results.__setitem__(
            f"torchsde srk {2.0**-k:g}", runner(2.0**-k)
        )
    start = time.perf_counter()
    for case in cases.values():  # compiles both compiled variants before anything is timed
        case()
    print(f"GBM: warm-up with compilation {time.perf_counter() - start:.1f} s")
    timings = H.measure_interleaved(cases, repeats=5 if quick else 15, warmup=0, target_s=0.2)
    rows = []
    for name, timing in timings.items():
        res = results[name]
        if name.startswith("ours"):
            err = Pe.strong_error(res.ys[-1].numpy(), exact_end)
            nfe = float((res.stats.nf + res.stats.ng).double().mean())
        else:
            err, nfe = res["err"], res["nfe"]
        rows.append({"case": name, "wall_s": timing, "err": err, "nfe": nfe})
    peers = [r for r in rows if r["case"].startswith("torchsde")]
    for r in rows:
        if r["case"].startswith("ours"):
            good = [p for p in peers if p["err"] <= r["err"]]
            best = min(good, key=lambda p: p["wall_s"].median) if good else None
            r["matched"] = best["case"] if best else None
            r["ratio_vs_torchsde"] = r["wall_s"].median / best["wall_s"].median if best else None
        print(
            f"GBM {r['case']}: {H.format_seconds(r['wall_s'].median)}, err {r['err']:.2e}, nfe {r['nfe']:.0f}"
            + (f", {r['ratio_vs_torchsde']:.2f}x {r['matched']}" if r.get("ratio_vs_torchsde") else "")
        )
    return rows


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows = doc["rows"]
    fig, (ax,) = H.figure()
    xs = [str(r["batch"]) for r in rows]
    width = 0.2
    series = [
        ("eager", "eager"),
        ("compiled", "compile=True"),
        ("unrolled", f"compile=True, check_every={UNROLL}"),
        ("diffrax", "diffrax (jit, vmap)"),
    ]
    for k, (key, name) in enumerate(series):
        values = [r[key]["median"] if r.get(key) else 0.0 for r in rows]
        ax.bar([i + (k - 1.5) * width for i in range(len(xs))], values, width, label=name)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("seconds per solve (warm)")
    ax.set_yscale("log")
    ax.set_title("Lotka–Volterra, Tsit5, tol 1e-6")
    ax.legend()
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``rows``: eager vs ``compile=True`` per batch size; ``gbm``: the GBM timings."""
    rows = [
        (
            r["batch"],
            f"{r['first_compiled_solve_s']:.1f} s",
            H.format_seconds(r["eager"]["median"]),
            H.format_seconds(r["compiled"]["median"]),
            H.format_seconds(r["diffrax"]["median"] if r.get("diffrax") else None),
            f"{r['speedup']:.2f}x",
            f"{r['eager_over_diffrax']:.1f}x" if r.get("eager_over_diffrax") else "—",
            f"{r['compiled_over_diffrax']:.1f}x" if r.get("compiled_over_diffrax") else "—",
            H.format_seconds(r["unrolled"]["median"]) if r.get("unrolled") else "—",
            f"{r['unrolled_over_diffrax']:.1f}x" if r.get("unrolled_over_diffrax") else "—",
            r["naccept_max"],
            "yes" if r["same_steps"] else "no",
            f"{r['max_abs_diff']:.1e}",
        )
        for r in doc["rows"]
    ]
    header = [
        "B",
        "first compiled solve",
        "eager",
        "compiled",
        "diffrax",
        "speed-up",
        "eager/diffrax",
        "compiled/diffrax",
        "compiled, check_every=8",
        "that/diffrax",
        "steps",
        "same steps",
        "max abs. diff",
    ]
    gbm = [
        (
            r["case"],
            H.format_seconds(r["wall_s"]["median"]),
            f"{r['err']:.2e}",
            f"{r['nfe']:.0f}",
            r.get("matched") or "—",
            f"{r['ratio_vs_torchsde']:.2f}x" if r.get("ratio_vs_torchsde") else "—",
        )
        for r in doc.get("gbm", [])
    ]
    header_gbm = ["case", "wall time", "strong error", "NFE", "matched torchsde", "time / torchsde"]
    compile_rows = [
        (
            r["batch"],
            f"{r['first_compiled_solve_s']:.1f} s",
            f"{r['first_unrolled_solve_s']:.1f} s" if r.get("first_unrolled_solve_s") else "—",
            f"{r['first_python_wrapper_solve_s']:.1f} s" if r.get("first_python_wrapper_solve_s") else "—",
            H.format_seconds(r["unrolled"]["median"]) if r.get("unrolled") else "—",
            f"{r['unrolled_over_diffrax']:.1f}x" if r.get("unrolled_over_diffrax") else "—",
            H.format_seconds(r["unrolled_python_wrapper"]["median"]) if r.get("unrolled_python_wrapper") else "—",
            f"{r['unrolled_python_wrapper_over_diffrax']:.1f}x" if r.get("unrolled_python_wrapper_over_diffrax") else "—",
        )
        for r in doc["rows"]
    ]
    header_compile = [
        "B",
        "first solve, check_every=1",
        "first solve, check_every=8",
        "first solve, 8, Python wrapper",
        "check_every=8 (C++ wrapper)",
        "that/diffrax",
        "check_every=8, Python wrapper",
        "that/diffrax",
    ]
    tables = {
        "rows": H.markdown_table(header, rows),
        "gbm": H.markdown_table(header_gbm, gbm),
        "compile": H.markdown_table(header_compile, compile_rows),
    }
    if doc.get("profile"):
        cpp, py = doc["profile"]["cpp_wrapper"], doc["profile"]["python_wrapper"]
        lines = [(name, f"{100 * py['share'][name]:.0f} %", f"{100 * cpp['share'][name]:.0f} %") for name in py["share"]]
        lines += [
            (f"per compiled call: {name}", f"{py['per_call'][name]:.0f}", f"{cpp['per_call'][name]:.0f}")
            for name in py["per_call"]
        ]
        per_solve = (f"{py['seconds_per_solve'] * 1e3:.1f} ms", f"{cpp['seconds_per_solve'] * 1e3:.1f} ms")
        lines.append(("time per solve under cProfile", *per_solve))
        header_profile = [f"B = {py['batch']}, check_every={UNROLL}", "Python wrapper", "C++ wrapper"]
        tables["profile"] = H.markdown_table(header_profile, lines)
    return tables


def main(argv: list[str] | None = None) -> int:
    return H.plain_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
