"""Run every benchmark in order: ``python benchmarks/run_all.py [--quick] [--out DIR] [--only a,b]``.

Also what ``python -m diffeqbridge bench`` calls.  Each benchmark writes ``DIR/<name>.json`` and
``DIR/<name>.png``; this writes ``DIR/summary.json`` (headline figures and the run times) too.
``--tiny`` (or ``DEB_BENCH_TINY=1``) runs the smallest possible sizes (for tests).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

ORDER = (
    "sde_work_precision",
    "weak_error",
    "ode_work_precision",
    "neural_sde_step",
    "per_sample_steps",
    "gradients",
    "brownian",
    "cuda_ensemble",
    "regularization",
    "stiff_work_precision",
    "stiff_sde",
    "diffusion",
    "ensemble",
    "models",
)


def _fmt(x: Any, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def headline(name: str, doc: dict) -> str:
    """One line of the most telling figures of a benchmark's JSON."""
    try:
        if name == "sde_work_precision":
            parts = []
            for p in ("gbm", "wave"):
                m = doc["problems"].get(p, {}).get("matched", [])
                if m:
                    parts.append(
                        f"{p}: NFE ours/tsde {_fmt(_med([e['ratio_nfe_vs_torchsde'] for e in m]))}, "
                        f"ours/dfx {_fmt(_med([e['ratio_nfe_vs_diffrax'] for e in m]))}; "
                        f"time ours/tsde {_fmt(_med([e['ratio_wall_s_vs_torchsde'] for e in m]))}, "
                        f"ours/dfx {_fmt(_med([e['ratio_wall_s_vs_diffrax'] for e in m]))}"
                    )
            return " | ".join(parts) or "no matched error levels"
        if name == "ode_work_precision":
            parts = []
            for p, r in doc["problems"].items():
                m = r["matched"]
                parts.append(
                    f"{p}: time ours/tde {_fmt(_med([e['ratio_wall_s_vs_torchdiffeq'] for e in m]))}, "
                    f"ours/dfx {_fmt(_med([e['ratio_wall_s_vs_diffrax'] for e in m]))}"
                )
            return " | ".join(parts)
        if name == "neural_sde_step":
            return ", ".join(f"{r['case']}: {H.format_seconds(r['seconds'])}" for r in doc["results"] if "backward" in r["case"])
        if name == "weak_error":
            se_m1 = doc["monte_carlo_standard_error"].get("ours", {}).get("se_m1", float("nan"))
            return f"N={doc['config']['N']}, MC s.e. m1 {se_m1:.2g}"
        if name == "per_sample_steps":
            parts = []
            for p, r in doc["problems"].items():
                ks = [k for k in (r["matched"][0] if r["matched"] else {}) if k.startswith("ratio nfe_total")]
                parts.append(
                    f"{p}: " + ", ".join(f"{k.split(' / ')[1]} {_fmt(_med([e.get(k) for e in r['matched']]))}" for k in ks)
                )
            return "NFE total ours/peer: " + " | ".join(parts)
        if name == "brownian":
            rs = [r for r in doc["results"] if r["B"] == 1024 and r["ratio"] is not None]
            return ", ".join(f"{r['impl']}/ours {r['ratio']:.2g}" for r in rs)
        if name == "cuda_ensemble":
            return doc.get("skipped") or "ran"
        if name == "regularization":
            from benchmarks.regularization import headline as regularization_headline

            return regularization_headline(doc)
        if name == "ensemble":
            from benchmarks.ensemble import headline as ensemble_headline

            return ensemble_headline(doc)
        if name == "diffusion":
            from benchmarks.diffusion import headline as diffusion_headline

            return diffusion_headline(doc)
        if name == "stiff_work_precision":
            parts = []
            for p, r in doc["ode"].items():
                steps = {k: min((x["steps"] for x in v if x["err"] <= 1e-4), default=None) for k, v in r["methods"].items()}
                parts.append(
                    f"{p}: steps to 1e-4 Rodas4 {_fmt(steps.get('ours Rodas4'), '{}')}, "
                    f"dfx Kvaerno5 {_fmt(steps.get('diffrax Kvaerno5'), '{}')}"
                )
            st = doc["sde"]["largest_stable_dt"]
            parts.append(
                f"stiff SDE bounded dt: ImplicitEM {_fmt((st.get('ours ImplicitEM') or {}).get('dt'), '{}')}, "
                f"torchsde {_fmt((st.get('torchsde euler') or {}).get('dt'), '{}')}"
            )
            return " | ".join(parts)
        if name == "stiff_sde":
            return ", ".join(
                f"{r['noise']} alg=None {r['nf_per_path']:.0f} evals/path, error {r['err_mean']:.1e}"
                for r in doc["rows"]
                if r["method"].startswith("alg=None")
            )
        if name == "models":
            return ", ".join(
                f"{r['case']} {r['ours_over_peer_time']:.2f}x peer"
                for r in doc["results"]
                if r["ours_over_peer_time"] is not None
            )
    except Exception as exc:  # noqa: BLE001 - a headline must never break a run
        return f"(no headline: {type(exc).__name__})"
    return ""


def run_all(
    quick: bool,
    out: Path,
    only: list[str] | None = None,
    tiny: bool = False,
    threads: int = 1,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Run the selected benchmarks in ``ORDER``; returns ``{name: {"seconds", "headline", "files", "error"?}}``."""
    tiny = tiny or os.environ.get("DEB_BENCH_TINY", "") not in ("", "0")
    names = [n for n in ORDER if not only or n in only]
    unknown = sorted(set(only or ()) - set(ORDER))
    if unknown:
        raise ValueError(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(ORDER)}")
    H.set_threads(threads)  # before jax initialises
    out = Path(out)
    summary: dict[str, Any] = {}
    for i, name in enumerate(names):
        if on_progress:
            on_progress(name, i, len(names))
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            if name == "brownian":
                kw: dict[str, Any] = {"threads": threads}
                if tiny:
                    kw["batch_sizes"] = (1, 16)
                elif quick:
                    kw["batch_sizes"] = (1, 1024)
                doc = mod.run(quick or tiny, out, **kw)
            elif "size" in inspect.signature(mod.run).parameters:
                doc = mod.run(quick, out, threads=threads, size="tiny" if tiny else None)
            else:  # a benchmark with the plain run(quick, out) convention (e.g. gradients.py)
                doc = mod.run(quick or tiny, out)
            entry["headline"] = headline(name, doc)
        except Exception as exc:  # noqa: BLE001 - keep going, report at the end
            import traceback

            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["seconds"] = time.perf_counter() - start
        entry["files"] = [str(p) for p in (out / f"{name}.json", out / f"{name}.png") if p.exists()]
        summary[name] = entry
    if on_progress:
        on_progress("done", len(names), len(names))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps({"machine": H.machine_info(), "quick": quick, "tiny": tiny, "benchmarks": summary}, indent=2) + "\n"
    )
    return summary


def summary_table(summary: dict) -> str:
    rows = [(n, f"{e['seconds']:.0f} s", e.get("error") or e.get("headline", "")) for n, e in summary.items()]
    return H.markdown_table(["benchmark", "time", "result"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = H.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(ORDER)}")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (tests)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    summary = run_all(
        args.quick,
        args.out,
        only,
        tiny=args.tiny,
        threads=args.threads,
        on_progress=lambda n, i, k: print(f"[{i}/{k}] {n}", flush=True),
    )
    print(summary_table(summary))
    return 1 if any("error" in e for e in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
