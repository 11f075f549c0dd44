"""``solve(..., compact=f)`` against the masked loop, on batches whose samples finish at very
different iterations.

Cases (per-sample parameters ride along as a constant last state component, so every field
is row-independent, as compaction requires):

* ``ode_decay``: y' = -k y (1 + sin(t)/2), k = logspace(-1, 2.5, B); Tsit5, atol = rtol =
  1e-8 on [0, 3] (14 to 422 steps per sample).
* ``gbm_demo``: the CLI demo's GBM du = 1.01 u dt + sigma_i u dW, u0 = 1/2 on [0, 1], with a
  spread of volatilities sigma_i = logspace(log10 0.1, log10 2, B); ``alg=None`` (SOSRI) at the
  demo's tolerance 1e-2 and 1e-3, 11 save times.
* ``stiff_sde``: dX = -k_i (X - cos t) dt + 0.5 dW (additive), X0 = 1, k_i = logspace(0, 2.5, B)
  on [0, 1]; SOSRA at 1e-2 (15 to ~300 steps per sample).

Each case is solved masked (``compact=0``) and with ``compact=0.5`` and ``0.8``, interleaved
(:func:`_harness.measure_interleaved`); the results are checked bit-identical.  "Useful lanes"
is the fraction of computed lanes (loop iterations x current batch size) that belonged to a
running sample.  Writes ``<out>/compact_batch.json`` and ``.png`` (default
``benchmarks/results/``; the tables in docs/engine.md and BENCHMARKS.md are rendered from it by
``tools/bench_report.py``).

    python benchmarks/compact_batch.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

import diffeqbridge as deb
from diffeqbridge import engine

NAME = "compact_batch"
THRESHOLDS = (0.0, 0.5, 0.8)


def _decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-y[:, 1] * y[:, 0] * (1 + 0.5 * torch.sin(t)), torch.zeros_like(y[:, 1])], dim=1)


def _gbm_drift(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([1.01 * y[:, 0], torch.zeros_like(y[:, 0])], dim=1)


def _gbm_diffusion(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([y[:, 1] * y[:, 0], torch.zeros_like(y[:, 0])], dim=1)


def _stiff_drift(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-y[:, 1] * (y[:, 0] - torch.cos(t)), torch.zeros_like(y[:, 0])], dim=1)


def _additive(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.full_like(y[:, 0], 0.5), torch.zeros_like(y[:, 0])], dim=1)


def _carried(x0: float, param: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.full_like(param, x0), param], dim=1)


def cases(batch: int) -> dict[str, tuple[deb.ODEProblem, dict[str, Any]]]:
    """name -> (problem, solve keyword arguments)."""
    sigma = torch.logspace(-1, torch.log10(torch.tensor(2.0)).item(), batch)
    gbm = deb.SDEProblem(_gbm_drift, _gbm_diffusion, _carried(0.5, sigma), (0.0, 1.0))
    demo_saves = torch.linspace(0, 1, 11)
    return {
        "ode_decay": (
            deb.ODEProblem(_decay, _carried(1.0, torch.logspace(-1, 2.5, batch)), (0.0, 3.0)),
            dict(alg=deb.Tsit5(), atol=1e-8, rtol=1e-8),
        ),
        "gbm_demo_1e-2": (gbm, dict(alg=None, atol=1e-2, rtol=1e-2, saveat=demo_saves, seed=0)),
        "gbm_demo_1e-3": (gbm, dict(alg=None, atol=1e-3, rtol=1e-3, saveat=demo_saves, seed=0)),
        "stiff_sde": (
            deb.SDEProblem(_stiff_drift, _additive, _carried(1.0, torch.logspace(0, 2.5, batch)), (0.0, 1.0), noise="additive"),
            dict(alg=deb.SOSRA(), atol=1e-2, rtol=1e-2, seed=0),
        ),
    }


def lane_counts(prob: deb.ODEProblem, kwargs: dict[str, Any], compact: float) -> tuple[Any, int, int]:
    """One solve with the loop's iterations counted: ``(solution, iterations, lanes computed)``."""
    counts = [0, 0]
    original = engine.Integrator.step

    def counting(self: engine.Integrator, s: engine.LoopState) -> None:
        counts[0] += 1
        counts[1] += s.t.shape[0]
        original(self, s)

    engine.Integrator.step = counting  # type: ignore[method-assign]
    try:
        sol = deb.solve(prob, compact=compact, backend="native", **kwargs)
    finally:
        engine.Integrator.step = original  # type: ignore[method-assign]
    return sol, counts[0], counts[1]


def same(a: Any, b: Any) -> bool:
    return bool(torch.equal(a.ys.nan_to_num(), b.ys.nan_to_num()) and torch.equal(a.stats.naccept, b.stats.naccept))


def run(quick: bool, out: Path, threads: int = 1) -> dict[str, Any]:
    H.set_threads(threads)
    torch.set_default_dtype(torch.float64)
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    for batch in (1024, 16384):
        for name, (prob, kwargs) in cases(batch).items():
            useful: dict[float, float] = {}
            reference = None
            for compact in THRESHOLDS:
                sol, iterations, lanes = lane_counts(prob, kwargs, compact)
                work = int((sol.stats.naccept + sol.stats.nreject).sum())
                useful[compact] = work / lanes
                if reference is None:
                    reference = sol
                    steps = sol.stats.naccept + sol.stats.nreject
                    steps_range = (int(steps.min()), int(steps.max()))
                elif not same(sol, reference):
                    raise AssertionError(f"{name} B={batch}: compact={compact} differs from the masked loop")

            def solver(compact: float, prob: deb.ODEProblem = prob, kwargs: dict[str, Any] = kwargs) -> Any:
                return lambda: deb.solve(prob, compact=compact, backend="native", **kwargs)

            timings = H.measure_interleaved(
                {f"compact={c:g}": solver(c) for c in THRESHOLDS}, repeats=2 if quick else 5, warmup=0, target_s=0.0
            )
            masked = timings["compact=0"]
            row = {
                "case": name,
                "batch": batch,
                "steps_min": steps_range[0],
                "steps_max": steps_range[1],
                "bit_identical": True,
                **{f"useful_lanes_{c:g}": round(useful[c], 4) for c in THRESHOLDS},
                **{f"time_{c:g}": timings[f"compact={c:g}"] for c in THRESHOLDS},
                **{f"speedup_{c:g}": round(masked.median / timings[f"compact={c:g}"].median, 3) for c in THRESHOLDS[1:]},
            }
            rows.append(row)
            payload = {"threads": threads, "thresholds": list(THRESHOLDS), "rows": rows}
            doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)  # every row: a long run keeps it
            print(
                f"{name:14s} B={batch:6d} steps {steps_range[0]}-{steps_range[1]}: useful lanes "
                + ", ".join(f"{c:g}: {useful[c]:.0%}" for c in THRESHOLDS)
                + " | median "
                + ", ".join(f"{c:g}: {timings[f'compact={c:g}'].median * 1e3:.0f} ms" for c in THRESHOLDS)
                + " | speedup "
                + ", ".join(f"{c:g}: {row[f'speedup_{c:g}']:.2f}x" for c in THRESHOLDS[1:]),
                flush=True,
            )
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def _median(r: dict[str, Any], c: float) -> float:
    return float(r[f"time_{c:g}"]["median"])


def plot(doc: dict[str, Any]) -> Any:
    """Speed-up of each threshold over the masked loop per case and batch size, and the
    useful-lane fractions (from the JSON document)."""
    rows = doc["rows"]
    fig, (ax,) = H.figure(size=(8.0, 4.5))
    labels = [f"{r['case']}\nB={r['batch']}" for r in rows]
    width = 0.38
    for k, c in enumerate(doc["thresholds"][1:]):
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        bars = ax.bar(xs, [_median(r, 0.0) / _median(r, c) for r in rows], width, label=f"compact={c:g}")
        for bar, r in zip(bars, rows):
            ax.annotate(
                f"{r[f'useful_lanes_{c:g}']:.0%}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speed-up over the masked loop (median)")
    ax.set_title("compact=f: speed-up (labels: useful lanes)")
    ax.legend()
    return fig


def tables(doc: dict[str, Any]) -> dict[str, str]:
    """``rows``: masked vs compacted per case and batch size."""
    cs = doc["thresholds"]
    header = ["case", "B", "steps per sample", *[f"useful lanes {c:g}" for c in cs], *[f"time {c:g}" for c in cs]]
    header += [f"speed-up {c:g}" for c in cs[1:]]
    body = [
        (
            r["case"],
            r["batch"],
            f"{r['steps_min']}–{r['steps_max']}",
            *[f"{r[f'useful_lanes_{c:g}']:.0%}" for c in cs],
            *[H.format_seconds(_median(r, c)) for c in cs],
            *[f"{_median(r, 0.0) / _median(r, c):.2f}x" for c in cs[1:]],
        )
        for r in doc["rows"]
    ]
    return {"rows": H.markdown_table(header, body)}


def main(argv: list[str] | None = None) -> int:
    return H.plain_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
