"""Shared helpers for the benchmarks in this folder.

Conventions every benchmark follows:

* ``python benchmarks/<name>.py [--quick] [--out DIR]``: ``--quick`` keeps a run under a
  few minutes (fewer repeats, smaller calibration target); ``--out`` defaults to
  ``benchmarks/results/``, whose ``<name>.json`` files are committed: ``tools/bench_report.py``
  renders the tables of ``BENCHMARKS.md`` and the plots in ``docs/bench/`` from them.
* Each benchmark module exposes ``run(quick: bool, out: Path) -> dict`` (writes
  ``out/<name>.json`` with :func:`write_json` and ``out/<name>.png`` with :func:`write_plot`,
  and returns the JSON document), ``plot(doc) -> Figure`` and ``tables(doc) -> {name: markdown}``
  (both pure functions of the JSON document) and ``main(argv=None) -> int``.
* The JSON document (schema :data:`SCHEMA`): ``{"benchmark": name, "schema": 1, "meta": {...},
  **payload}``; ``meta`` holds the command line, ``quick``, the date, the load average at the
  start and the end of the run, the machine, the library versions and the git commit (see
  :func:`run_meta`); ``payload`` is the benchmark's own figures, with tabular results as lists
  of flat dicts (``rows`` or ``results``) where it can.
* Peers are timed in the same process and *interleaved* (each repeat runs every case once,
  in a rotating order), so that load from other jobs on a shared machine hits all of them
  alike; compare ratios from one run, not absolute times across runs.
* Times are medians over repeats of the mean time of ``number`` back-to-back calls, after
  warm-up (which also covers JIT compilation), with ``number`` calibrated per case.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS_DIR
SCHEMA = 1
# the load average when the benchmark process started (this module is imported first)
_LOADAVG_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------- CLI
def make_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short run (fewer repeats, smaller sizes), a few minutes at most")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/results/, the committed results)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for torch and XLA:CPU (default 1; 0 keeps the libraries' defaults). "
        "On a small machine shared with other jobs, torch's multi-threaded kernels can be many times slower "
        "than single-threaded ones, which would swamp the comparison.",
    )
    return parser


def sized_main(run: Any, description: str, argv: list[str] | None = None) -> int:
    """``main`` of a benchmark whose ``run(quick, out, threads=, size=)`` knows a ``tiny`` size."""
    parser = make_parser(description)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (smoke test)")
    args = parser.parse_args(argv)
    run(args.quick, args.out, threads=args.threads, size="tiny" if args.tiny else None)
    return 0


def set_threads(n: int) -> dict[str, Any]:
    """Pin torch and XLA:CPU to ``n`` intra-op threads (``0``: leave defaults); returns what was done.

    XLA reads its flags when jax initialises its CPU backend, so this must run before
    jax is first used; if jax was already imported, that is recorded and torch is still set.
    """
    import sys

    record: dict[str, Any] = {"requested": n}
    if n <= 0:
        return record
    if "jax" in sys.modules:
        record["xla"] = "not set: jax already imported"
    else:
        flags = os.environ.get("XLA_FLAGS", "")
        extra = "--xla_cpu_multi_thread_eigen=false" if n == 1 else ""
        if extra:
            os.environ["XLA_FLAGS"] = (flags + " " + extra).strip()
        record["xla"] = os.environ.get("XLA_FLAGS", "")
    import torch

    torch.set_num_threads(n)
    record["torch"] = torch.get_num_threads()
    return record


# -------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call of one case: median over repeats, plus spread and raw samples."""

    median: float
    min: float
    q1: float
    q3: float
    number: int  # calls per sample
    repeats: int
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cycle(fn: Callable[..., Any], args_pool: Sequence[tuple]) -> Callable[[], Any]:
    """A zero-argument callable that calls ``fn(*args)`` with the next entry of ``args_pool``.

    Used to give every timed call fresh (pre-generated) inputs without timing their creation.
    """
    state = {"i": 0}
    n = len(args_pool)

    def call() -> Any:
        args = args_pool[state["i"] % n]
        state["i"] += 1
        return fn(*args)

    return call


def measure_interleaved(
    cases: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    target_s: float = 0.02,
    max_number: int = 1000,
) -> dict[str, Timing]:
    """Time zero-argument callables against each other on a shared, noisy machine.

    Each case is warmed up ``warmup`` times (pass 0 if the caller already ran each case,
    e.g. in a sanity check), then ``number`` (calls per sample) is chosen from one timed
    call so that a sample lasts about ``target_s``; when one call already takes that long,
    that timed call is kept as the first sample.  Rounds then take one sample of every
    case still short of ``repeats`` samples, in an order rotated every round.  Callables must finish
    their work before returning (``block_until_ready`` for JAX, synchronize for CUDA).
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    numbers: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        start = time.perf_counter()
        cases[name]()
        once = time.perf_counter() - start
        numbers[name] = int(min(max_number, max(1, math.ceil(target_s / max(once, 1e-9)))))
        if numbers[name] == 1:  # a slow case: this warm call already is a valid sample
            samples[name].append(once)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if len(samples[name]) >= repeats:
                continue
            fn, number = cases[name], numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {
        name: Timing(
            median=statistics.median(xs),
            min=min(xs),
            q1=_quantile(xs, 0.25),
            q3=_quantile(xs, 0.75),
            number=numbers[name],
            repeats=repeats,
            samples=xs,
        )
        for name, xs in samples.items()
    }


# -------------------------------------------------------------------- machine info
def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absent or broken peer: record that, don't fail
        return None
    return getattr(mod, "__version__", "unknown")


def _git_state(repo: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpu_affinity"] = None
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        info["loadavg"] = None
    info["versions"] = {
        m: _version(m)
        for m in (
            "diffeqbridge",
            "torch",
            "numpy",
            "jax",
            "jaxlib",
            "diffrax",
            "equinox",
            "torchsde",
            "torchdiffeq",
            "matplotlib",
        )
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    try:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001
        pass
    info["git"] = _git_state(Path(__file__).resolve().parent.parent)
    return info


def run_meta(quick: bool | None) -> dict[str, Any]:
    """The ``meta`` block of a result: command, mode, load average at start/end, machine, versions."""
    import sys

    argv = [Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)] if sys.argv else []
    info = machine_info()
    return {
        "command": " ".join(["python", *argv]) if argv else None,
        "quick": quick,
        "date": info.pop("date"),
        "loadavg_start": _LOADAVG_START,
        "loadavg_end": info.pop("loadavg"),
        **info,
    }


def write_json(path: Path, benchmark: str, payload: Mapping[str, Any], *, quick: bool | None = None) -> dict[str, Any]:
    """Write ``{"benchmark", "schema", "meta", **payload}`` to ``path``.

    Returns the document as read back from JSON (plain dicts, lists and numbers), so that what a
    benchmark plots right after its run is what ``tools/bench_report.py`` plots from the file.
    """
    doc = {"benchmark": benchmark, "schema": SCHEMA, "meta": run_meta(quick), **payload}
    text = json.dumps(doc, indent=1, default=_json_default) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return json.loads(text)


def read_json(path: Path) -> dict[str, Any]:
    """A result document written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def write_plot(plot: Callable[[Mapping[str, Any]], Any], doc: Mapping[str, Any], path: Path) -> Path:
    """Render ``plot(doc)`` (a benchmark's plot function) to the PNG ``path``."""
    return savefig(plot(doc), path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Timing):
        return obj.as_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# -------------------------------------------------------------------------- plots
PLOT_STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "legend.framealpha": 0.85,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.markersize": 4,
    "savefig.dpi": 120,
}


def use_style() -> Any:
    """Select the Agg backend and the benchmarks' :data:`PLOT_STYLE`; returns ``matplotlib.pyplot``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(PLOT_STYLE)
    return plt


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.5)):
    """A matplotlib figure on the Agg backend (no display needed), in the benchmarks' common style.

    ``size`` is per panel; returns ``(fig, axes)`` with ``axes`` flattened row by row.
    """
    plt = use_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes.ravel()


def plot_series(
    ax,
    series: Mapping[str, tuple[Iterable[float], Iterable[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = True,
    logy: bool = True,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One line per entry of ``series`` (label -> (xs, ys)); ``None`` ys are skipped."""
    styles = styles or {}
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if not pts:
            continue
        px, py = zip(*pts)
        ax.plot(px, py, label=label, **{"marker": "o", **styles.get(label, {})})
    label_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, logy=logy)


def label_axes(
    ax,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool | int = False,
    logy: bool = False,
    legend: bool = True,
) -> None:
    """The benchmarks' common axis finish: log scales (``logx=2``: base 2), labels, grid, legend.

    Minor ticks of a log axis are labelled only when it spans less than 0.8 decades (they
    overlap on wider ones)."""
    from matplotlib.ticker import LogFormatterSciNotation

    if logx:
        ax.set_xscale("log", base=2 if logx is not True and logx == 2 else 10)
        ax.xaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(0.8, 0.2)))
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(0.8, 0.2)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def plain_main(run: Any, description: str, argv: list[str] | None = None) -> int:
    """``main`` of a benchmark whose ``run(quick, out, threads=)`` takes no size."""
    args = make_parser(description).parse_args(argv)
    run(args.quick, args.out, threads=args.threads)
    return 0


def savefig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_STYLE["savefig.dpi"])
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ------------------------------------------------------------------------ output
def format_seconds(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} s"


def fmt(x: float | None, spec: str = "{:.3g}") -> str:
    """``spec.format(x)``, or an em dash for a missing figure."""
    return "—" if x is None else spec.format(x)


def sci(x: float | None, digits: int = 1) -> str:
    """``3.2e-3`` style (no zero-padded exponent), or an em dash."""
    if x is None:
        return "—"
    mant, exp = f"{x:.{digits}e}".split("e")
    return f"{mant}e{int(exp)}"


def ratio(x: float | None) -> str:
    """A ratio with two significant digits below 1 and one decimal above (``0.25``, ``1.9``)."""
    if x is None:
        return "—"
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def span(xs: Iterable[float | None], spec: str = "{:.2f}") -> str:
    """``"lo–hi"`` of the present values (``"x"`` when they format alike, ``"—"`` when none)."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return "—"
    lo, hi = spec.format(min(vals)), spec.format(max(vals))
    return lo if lo == hi else f"{lo}–{hi}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def enable_jax_compilation_cache(jax: Any) -> None:
    """Persist XLA compilations across benchmark runs (``~/.cache/diffeqbridge-bench/jax``)."""
    try:
        cache = Path.home() / ".cache" / "diffeqbridge-bench" / "jax"
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except Exception:  # noqa: BLE001 - the cache is an optimisation only
        pass
