"""``solve(..., compile=True)`` against the eager loop and diffrax: Lotka–Volterra with Tsit5.

x' = 1.5x - xy, y' = -3y + xy on [0, 10], atol = rtol = 1e-6, batches of B initial states.
Measured per batch size: the first compiled solve from a cold inductor cache (compile
time + one solve), the warm per-solve times of both loops and of diffrax (Tsit5, the same
PIDController tolerances, ``jax.jit(jax.vmap(diffeqsolve))`` over the batch: per-sample
steps as ours; warm, compiled before timing) as interleaved medians, the steps (which must be
equal between our loops) and the largest difference of the solutions.

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

        def solve(compile: bool, prob: Any = prob) -> Any:
            return deb.solve(prob, deb.Tsit5(), atol=1e-6, rtol=1e-6, backend="native", compile=compile)

        eager = solve(False)
        start = time.perf_counter()
        compiled = solve(True)
        first = time.perf_counter() - start
        cases = {"eager": lambda: solve(False), "compiled": lambda: solve(True)}
        dfx = _diffrax_solve(batch)
        if dfx is not None:
            cases["diffrax"] = dfx
        timings = H.measure_interleaved(cases, repeats=5 if quick else 15, warmup=1, target_s=0.2)
        dfx_median = timings["diffrax"].median if dfx is not None else None
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
            f"diffrax {H.format_seconds(dfx_median)}; "
            f"same steps {rows[-1]['same_steps']}, max |diff| {rows[-1]['max_abs_diff']:.3g}"
        )
    doc = H.write_json(out / f"{NAME}.json", NAME, {"threads": threading, "rows": rows}, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows = doc["rows"]
    fig, (ax,) = H.figure()
    xs = [str(r["batch"]) for r in rows]
    width = 0.27
    series = [("eager", "eager"), ("compiled", "compile=True"), ("diffrax", "diffrax (jit, vmap)")]
    for k, (key, name) in enumerate(series):
        values = [r[key]["median"] if r.get(key) else 0.0 for r in rows]
        ax.bar([i + (k - 1) * width for i in range(len(xs))], values, width, label=name)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("seconds per solve (warm)")
    ax.set_yscale("log")
    ax.set_title("Lotka–Volterra, Tsit5, tol 1e-6")
    ax.legend()
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``rows``: eager vs ``compile=True`` per batch size."""
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
        "steps",
        "same steps",
        "max abs. diff",
    ]
    return {"rows": H.markdown_table(header, rows)}


def main(argv: list[str] | None = None) -> int:
    return H.plain_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
