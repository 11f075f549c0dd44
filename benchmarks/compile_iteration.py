"""``solve(..., compile=True)`` against the eager loop: Lotka–Volterra with Tsit5.

x' = 1.5x - xy, y' = -3y + xy on [0, 10], atol = rtol = 1e-6, batches of B initial states.
Measured per batch size: the first compiled solve from a cold inductor cache (compile
time + one solve), the warm per-solve times of both loops (interleaved medians), the steps
(which must be equal) and the largest difference of the solutions.

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
        timings = H.measure_interleaved(
            {"eager": lambda: solve(False), "compiled": lambda: solve(True)}, repeats=5 if quick else 15, warmup=1, target_s=0.2
        )
        rows.append(
            {
                "batch": batch,
                "first_compiled_solve_s": first,
                "eager": timings["eager"],
                "compiled": timings["compiled"],
                "speedup": timings["eager"].median / timings["compiled"].median,
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
            f"compiled {H.format_seconds(timings['compiled'].median)} per solve; "
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
    width = 0.4
    ax.bar([i - width / 2 for i in range(len(xs))], [r["eager"]["median"] for r in rows], width, label="eager")
    ax.bar([i + width / 2 for i in range(len(xs))], [r["compiled"]["median"] for r in rows], width, label="compile=True")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("seconds per solve (warm)")
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
            f"{r['speedup']:.2f}x",
            r["naccept_max"],
            "yes" if r["same_steps"] else "no",
            f"{r['max_abs_diff']:.1e}",
        )
        for r in doc["rows"]
    ]
    header = ["B", "first compiled solve", "eager", "compiled", "speed-up", "steps", "same steps", "max abs. diff"]
    return {"rows": H.markdown_table(header, rows)}


def main(argv: list[str] | None = None) -> int:
    return H.plain_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
