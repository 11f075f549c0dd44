"""Neural SDE training step: forward and forward+backward time and peak memory, ours vs torchsde vs diffrax.

Model: state 32, drift MLP 32 -> 128 -> 128 -> 32 (tanh), diagonal diffusion MLP
32 -> 128 -> 32 (tanh, sigmoid), Stratonovich, fixed-step EulerHeun with 50 steps on [0, 1],
batch 1024 (quick: 256), float64; loss = mean of y(T)^2.

* ours: ``deb.solve(prob, deb.EulerHeun(), dt=1/50, brownian=tree)`` with ``sensealg=None``
  (discrete backprop through the steps); the tree has ``tol = 2^-7``.  Also
  ``deb.ReversibleHeun()`` (one drift + one diffusion evaluation per step) with
  ``DiscreteAdjoint()`` and with ``BacksolveAdjoint()`` (exact gradient, O(1) memory).
* torchsde: ``sdeint(method='euler_heun')`` (backprop through the solver) and
  ``sdeint_adjoint(method='euler_heun', adjoint_method='euler_heun')`` (stochastic adjoint),
  each with a fresh ``BrownianInterval`` per call (its native Brownian motion).
* diffrax: ``EulerHeun`` under ``jax.vmap`` over per-sample ``VirtualBrownianTree``s
  (``tol = 2^-7``), ``eqx.filter_jit`` (warm), default ``RecursiveCheckpointAdjoint``.

Accuracy: the strong error of ``y(1)`` of each solver at this ``dt`` against a ``dt/16``
reference, every solver driven by the same path (our tree, fed to torchsde too), is reported
next to the times (quick run: ours EulerHeun and ReversibleHeun 2.9e-4, torchsde's
euler_heun, Euler on the drift, 4.0e-4): at equal dt ours are at least as accurate.

Matched accuracy: ``ours ReversibleHeun forward+backward, matched accuracy`` takes the fewest
steps (of :func:`candidate_steps`) whose strong error is at most torchsde's at ``dt``, chosen
from the errors measured before the timings (quick run: 36 steps, 3.7e-4).

Measured (quick, B = 256, shared 2-core machine at load ~3, one interleaved run): ours
EulerHeun forward+backward 1.43x torchsde sdeint, ReversibleHeun 0.77x, ReversibleHeun at
matched accuracy 0.56x, our exact reversible backsolve 0.61x torchsde sdeint_adjoint (other
runs: ReversibleHeun 0.76-0.88x).  What
is left: the MLPs (~74 % of our ReversibleHeun step), the tree (~12 %), the solver's
arithmetic (BENCHMARKS.md section 4).

Time: median over interleaved repeats, with the default allocator settings.  Peak memory
(measured after all timings): increase of the process's peak resident set size over the call
(``/proc/self/clear_refs`` resets the peak before each measured call, glibc's heap is trimmed
and large blocks are mmap'd so freed memory leaves the RSS; Linux only, else ``None``).  The three libraries have
different parameters (same architecture); the weights do not change the cost.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
    from ._sde_problems import torchsde_brownian_from
    from .sde_work_precision import setup_jax
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]
    from benchmarks._sde_problems import torchsde_brownian_from  # type: ignore[no-redef]
    from benchmarks.sde_work_precision import setup_jax  # type: ignore[no-redef]

NAME = "neural_sde_step"
STATE, WIDTH = 32, 128
TREE_TOL = 2.0**-7


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC: Any = None


def _libc():
    """glibc with ``M_MMAP_THRESHOLD`` = 64 KiB (big blocks are mmap'd and go back to the OS on
    free, so the RSS follows the live memory).  Set only when memory is first measured, after
    the timings: it makes every allocation of 64 KiB or more a system call and page faults,
    which would slow down (and distort) the timed calls."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 16)
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def peak_increment_mb(fn: Callable[[], Any]) -> float | None:
    """Peak RSS increase (MiB) while running ``fn`` once (glibc heap trimmed first)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        fn()
        return None
    before = _rss_kb("VmRSS")
    fn()
    peak = _rss_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024.0


def _model_and_y0(B: int) -> tuple[Any, Any]:
    """The torchsde-style model (``f``/``g`` methods, diagonal Stratonovich) with seeded
    weights, and ``y0 (B, STATE)``; every torch case uses this one."""
    import torch

    class Fields(torch.nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.drift_net = torch.nn.Sequential(
                torch.nn.Linear(STATE, WIDTH),
                torch.nn.Tanh(),
                torch.nn.Linear(WIDTH, WIDTH),
                torch.nn.Tanh(),
                torch.nn.Linear(WIDTH, STATE),
            )
            self.diff_net = torch.nn.Sequential(
                torch.nn.Linear(STATE, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, STATE), torch.nn.Sigmoid()
            )

        def f(self, t, y):
            return self.drift_net(y)

        def g(self, t, y):
            return 0.3 * self.diff_net(y)

    torch.manual_seed(0)
    model = Fields().double()
    return model, 0.1 * torch.randn(B, STATE, dtype=torch.float64)


def _torch_cases(B: int, steps: int, matched_steps: int | None = None) -> dict[str, Callable[[], Any]]:
    import torch
    import torchsde

    import diffeqbridge as deb

    dt = 1.0 / steps
    model, y0 = _model_and_y0(B)
    prob = deb.SDEProblem(model.f, model.g, y0, (0.0, 1.0), noise="diagonal", interpretation="stratonovich", params=model)
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, STATE), seed=0, tol=TREE_TOL)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def ours(backward: bool, alg: Any = None, sensealg: Any = None, n: int = steps):
        alg = alg or deb.EulerHeun()

        def call():
            with torch.set_grad_enabled(backward):
                sol = deb.solve(prob, alg, dt=1.0 / n, brownian=tree, sensealg=sensealg)
                loss = sol.ys[-1].pow(2).mean()
                if backward:
                    model.zero_grad(set_to_none=True)
                    loss.backward()
            return loss

        return call

    def tsde(backward: bool, adjoint: bool):
        def call():
            bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, STATE), dtype=torch.float64, entropy=0)
            with torch.set_grad_enabled(backward):
                if adjoint:
                    ys = torchsde.sdeint_adjoint(model, y0, ts, bm=bm, dt=dt, method="euler_heun", adjoint_method="euler_heun")
                else:
                    ys = torchsde.sdeint(model, y0, ts, bm=bm, dt=dt, method="euler_heun")
                loss = ys[-1].pow(2).mean()
                if backward:
                    model.zero_grad(set_to_none=True)
                    loss.backward()
            return loss

        return call

    matched = {}
    if matched_steps is not None:
        matched[MATCHED] = ours(True, deb.ReversibleHeun(), deb.DiscreteAdjoint(), matched_steps)
    return {
        "ours forward": ours(False),
        "ours forward+backward": ours(True),
        "ours ReversibleHeun forward+backward": ours(True, deb.ReversibleHeun(), deb.DiscreteAdjoint()),
        **matched,
        "ours ReversibleHeun backsolve forward+backward": ours(True, deb.ReversibleHeun(), deb.BacksolveAdjoint()),
        "torchsde sdeint forward": tsde(False, False),
        "torchsde sdeint forward+backward": tsde(True, False),
        "torchsde sdeint_adjoint forward+backward": tsde(True, True),
    }


def candidate_steps(steps: int) -> list[int]:
    """Step counts tried for the matched-accuracy case, from ``steps`` down to ``steps / 2``."""
    return sorted({max(1, round(steps * f)) for f in (1.0, 0.9, 0.8, 0.72, 0.64, 0.6, 0.5)}, reverse=True)


def strong_errors(B: int, steps: int) -> tuple[dict[str, float], dict[int, float]]:
    """RMS error of ``y(1)`` at ``dt = 1/steps`` against a reference (ours EulerHeun at
    ``dt/16``), every solver driven by the same Brownian path (our tree, also fed to
    torchsde): the solvers are at equal accuracy when these are alike.  The model and ``y0``
    are :func:`_model_and_y0`'s, as in :func:`_torch_cases`.  Also ReversibleHeun's error
    at each of :func:`candidate_steps` (for the matched-accuracy case)."""
    import torch
    import torchsde

    import diffeqbridge as deb

    model, y0 = _model_and_y0(B)
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, STATE), seed=0, tol=TREE_TOL)

    prob = deb.SDEProblem(model.f, model.g, y0, (0.0, 1.0), noise="diagonal", interpretation="stratonovich", params=model)
    dt = 1.0 / steps
    with torch.no_grad():
        ref = deb.solve(prob, deb.EulerHeun(), dt=dt / 16, brownian=tree).ys[-1]
        finals = {
            "ours EulerHeun": deb.solve(prob, deb.EulerHeun(), dt=dt, brownian=tree).ys[-1],
            "ours ReversibleHeun": deb.solve(prob, deb.ReversibleHeun(), dt=dt, brownian=tree).ys[-1],
            "torchsde euler_heun": torchsde.sdeint(
                model,
                y0,
                torch.tensor([0.0, 1.0], dtype=torch.float64),
                bm=torchsde_brownian_from(tree),
                dt=dt,
                method="euler_heun",
            )[-1],
        }
        by_steps = {n: deb.solve(prob, deb.ReversibleHeun(), dt=1.0 / n, brownian=tree).ys[-1] for n in candidate_steps(steps)}

    def rms(y: Any) -> float:
        return float(((y - ref) ** 2).mean().sqrt())

    return {name: rms(y) for name, y in finals.items()}, {n: rms(y) for n, y in by_steps.items()}


def matched_steps(errors: dict[str, float], by_steps: dict[int, float]) -> int:
    """The fewest steps (of :func:`candidate_steps`) at which our ReversibleHeun's strong
    error is at most torchsde's euler_heun's at the benchmark's ``dt``."""
    target = errors["torchsde euler_heun"]
    return min((n for n, e in by_steps.items() if e <= target), default=max(by_steps))


def _diffrax_cases(B: int, steps: int) -> dict[str, Callable[[], Any]]:
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import lineax as lx

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    drift = eqx.nn.MLP(STATE, STATE, WIDTH, 2, activation=jnp.tanh, key=k1, dtype=jnp.float64)
    diff = eqx.nn.MLP(STATE, STATE, WIDTH, 1, activation=jnp.tanh, final_activation=jax.nn.sigmoid, key=k2, dtype=jnp.float64)
    model = (drift, diff)
    y0 = 0.1 * jax.random.normal(k3, (B, STATE), dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(1), B)
    dt = 1.0 / steps

    def solve_one(model, y, key):
        d, s = model
        bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=TREE_TOL, shape=(STATE,), key=key)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: d(y)), diffrax.ControlTerm(lambda t, y, a: lx.DiagonalLinearOperator(0.3 * s(y)), bm)
        )
        sol = diffrax.diffeqsolve(
            terms, diffrax.EulerHeun(), 0.0, 1.0, dt0=dt, y0=y, saveat=diffrax.SaveAt(t1=True), max_steps=steps + 1
        )
        return sol.ys[-1]

    def loss(model, y0, keys):
        return jnp.mean(jax.vmap(solve_one, in_axes=(None, 0, 0))(model, y0, keys) ** 2)

    fwd = eqx.filter_jit(loss)
    fwd_bwd = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    return {
        "diffrax forward": lambda: jax.block_until_ready(fwd(model, y0, keys)),
        "diffrax forward+backward": lambda: jax.block_until_ready(fwd_bwd(model, y0, keys)),
    }


MATCHED = "ours ReversibleHeun forward+backward, matched accuracy"
BASE = {
    "torchsde sdeint forward": "ours forward",
    "torchsde sdeint forward+backward": "ours forward+backward",
    "ours ReversibleHeun forward+backward": "torchsde sdeint forward+backward",
    MATCHED: "torchsde sdeint forward+backward",
    "ours ReversibleHeun backsolve forward+backward": "torchsde sdeint_adjoint forward+backward",
    "torchsde sdeint_adjoint forward+backward": "ours forward+backward",
    "diffrax forward": "ours forward",
    "diffrax forward+backward": "ours forward+backward",
}


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    size = size or ("quick" if quick else "full")
    threading = setup_jax(threads)
    B, steps = {"tiny": (8, 5), "quick": (256, 50), "full": (1024, 50)}[size]
    repeats = {"tiny": 1, "quick": 3, "full": 7}[size]
    accuracy, by_steps = strong_errors(B, steps)
    matched = matched_steps(accuracy, by_steps)
    if progress:
        progress("accuracy")
    cases = {**_torch_cases(B, steps, matched), **_diffrax_cases(B, steps)}
    for fn in cases.values():  # warm-up (JIT)
        fn()
    timings = H.measure_interleaved(cases, repeats=repeats, warmup=0, target_s=0.05)
    if progress:
        progress("timings")
    memory = {name: peak_increment_mb(fn) for name, fn in cases.items()}  # after the timings (see _libc)
    rows = []
    for name, t in timings.items():
        base = BASE.get(name)
        ours_name, peer = (name, base) if name.startswith("ours") else (base, name)
        mem_ok = base and (memory[name] or 0) > 1 and (memory[base] or 0) > 1
        rows.append(
            {
                "case": name,
                "seconds": t.median,
                "peak_mb": memory[name],
                "timing": t.as_dict(),
                "ours_over_peer_time": timings[ours_name].median / timings[peer].median if base else None,
                "ours_over_peer_mem": (memory[ours_name] / memory[peer]) if mem_ok else None,
            }
        )
    payload = {
        "strong_error_vs_dt16_reference": accuracy,
        "reversible_heun_error_by_steps": {str(n): e for n, e in by_steps.items()},
        "matched_steps": matched,
        "config": {
            "B": B,
            "state": STATE,
            "width": WIDTH,
            "steps": steps,
            "size": size,
            "repeats": repeats,
            "tree_tol": TREE_TOL,
            "threads": threading,
            "dtype": "float64",
        },
        "notes": [
            "peak_mb: peak RSS increase over one warm call (/proc/self/clear_refs reset), MiB.",
            (
                "ours_over_peer_*: ours / peer for the like-for-like case (< 1: ours cheaper); the "
                "ReversibleHeun rows compare with torchsde's sdeint (discrete backprop) and "
                "sdeint_adjoint (backsolve)."
            ),
            (
                "strong_error_vs_dt16_reference: RMS error of y(1) against ours EulerHeun at dt/16, "
                "every solver driven by the same path (our tree)."
            ),
            (
                "matched accuracy: ReversibleHeun with matched_steps steps, the fewest of "
                "reversible_heun_error_by_steps whose error is at most torchsde euler_heun's at "
                "the benchmark's steps (chosen from these measurements, before the timings)."
            ),
        ],
        "results": rows,
    }
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    print(
        H.markdown_table(
            ["case", "time", "peak MiB", "ours/peer time", "ours/peer mem"],
            [
                (
                    r["case"],
                    H.format_seconds(r["seconds"]),
                    "—" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}",
                    "—" if r["ours_over_peer_time"] is None else f"{r['ours_over_peer_time']:.2f}",
                    "—" if r["ours_over_peer_mem"] is None else f"{r['ours_over_peer_mem']:.2f}",
                )
                for r in rows
            ],
        )
    )
    print("strong error of y(1) vs a dt/16 reference (same path):", {k: f"{v:.3g}" for k, v in accuracy.items()})
    print(f"ReversibleHeun by steps: { {n: f'{e:.3g}' for n, e in by_steps.items()} }; matched accuracy: {matched} steps")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows, c = doc["results"], doc["config"]
    fig, (ax_t, ax_m) = H.figure(ncols=2, size=(6.0, 4.2))
    names = [r["case"] for r in rows]
    colors = ["C0" if n.startswith("ours") else "C2" if n.startswith("torchsde") else "C1" for n in names]
    ax_t.barh(names, [r["seconds"] for r in rows], color=colors)
    ax_t.set_xlabel("seconds per call (median)")
    ax_t.set_title(f"neural SDE, B={c['B']}, state {c['state']}, width {c['width']}, {c['steps']} steps")
    ax_m.barh(names, [r["peak_mb"] or 0 for r in rows], color=colors)
    ax_m.set_xlabel("peak RSS increase [MiB]")
    ax_m.set_yticklabels([])
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``results``: time, peak memory and ours / peer ratios per case; ``accuracy``: strong errors."""
    rows = [
        (
            r["case"],
            H.format_seconds(r["seconds"]),
            H.fmt(r["peak_mb"], "{:.0f}"),
            H.fmt(r["ours_over_peer_time"], "{:.2f}"),
            H.fmt(r["ours_over_peer_mem"], "{:.2f}"),
            BASE.get(r["case"], ""),
        )
        for r in doc["results"]
    ]
    acc = [(k, f"{v:.2g}") for k, v in doc["strong_error_vs_dt16_reference"].items()]
    acc += [(f"ours ReversibleHeun, {n} steps", f"{v:.2g}") for n, v in doc.get("reversible_heun_error_by_steps", {}).items()]
    return {
        "results": H.markdown_table(
            ["case", "time", "peak MiB", "ours / peer (time)", "ours / peer (memory)", "compared with"], rows
        ),
        "accuracy": H.markdown_table(["solver (dt = 1/steps)", "strong error of y(1) vs dt/16 on the same path"], acc),
    }


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
