"""Gradient memory and time vs number of steps, for every sensealg (and torchsde's adjoint).

A neural SDE (Stratonovich, diagonal noise, MLP drift, softplus diagonal diffusion) is solved
with ``EulerHeun`` at a fixed step ``dt = 1/n_steps`` and differentiated (forward + backward
of ``ys[-1].pow(2).mean()``).  Each case runs in a forked child process; its peak memory is
the rise of the resident set above the child's starting RSS (Linux ``VmHWM`` after resetting
it through ``/proc/self/clear_refs``; ``ru_maxrss`` elsewhere), so it covers torch's
allocator, the autograd graph and every temporary of the backward pass.

Expected: ``DiscreteAdjoint()`` (the default at these sizes) grows linearly with the number
of steps (the graph of every step); ``DiscreteAdjoint(checkpoints=k)`` and
``InterpolatingAdjoint(checkpoints=k)`` with ``k ∝ n_steps`` keep one segment's graph plus
the boundary states; ``BacksolveAdjoint`` (continuous, after EulerHeun; exact, after
``ReversibleHeun``: case ``backsolve_reversible``) is flat; torchsde's ``sdeint_adjoint`` is flat.
diffrax (``RecursiveCheckpointAdjoint``, ``BacksolveAdjoint`` with its ``Heun``, and
``ReversibleHeun`` + ``ReversibleAdjoint`` when the installed diffrax has it -- 0.7.2 does
not) runs in a forked child that imports JAX on the CPU with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``;
its memory is XLA's buffer assignment for the compiled gradient (temporaries + outputs,
``compiled.memory_analysis()``), not an RSS rise, so compare its growth, not its level, with ours.

Measured (shared 2-core machine, B=32, D=8, width 32, 100 -> 1600 steps, one child per
case): DiscreteAdjoint(checkpoints) 52.5 -> 55.8 MiB (+6.2%; with ``torch.utils.checkpoint``,
as before, 100 -> 170 MiB), InterpolatingAdjoint 52.5 -> 55.8 MiB (+6.2%),
BacksolveAdjoint after ReversibleHeun 44.5 -> 44.8 MiB (+0.7%); earlier runs: none
19 -> 118 MiB, BacksolveAdjoint 47.7 -> 48.0 MiB (+0.7%), torchsde sdeint_adjoint
45.5 -> 45.9 MiB (+0.8%).  Quick run (B=16, D=4, width 16, 40 -> 160 steps): none +43%,
DiscreteAdjoint(checkpoints) +6.8%, InterpolatingAdjoint +6.9%, BacksolveAdjoint +0.3%,
reversible backsolve +0.1%, torchsde adjoint +0.2%, diffrax RecursiveCheckpointAdjoint and
BacksolveAdjoint +0.0% (XLA buffers 0.05 / 0.08 MiB).

``python benchmarks/gradients.py [--quick] [--out DIR]`` writes ``gradients.json`` and
``gradients.png``; ``--quick`` (about 70 s of CPU; more wall time on a loaded machine) uses a
smaller model and two step counts.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import diffeqbridge as deb  # noqa: E402

SEGMENT_STEPS = 50  # steps per checkpoint segment for the checkpointed sensealgs


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Model(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.drift = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))
        self.scale = nn.Parameter(torch.full((dim,), 0.2))

    def f(self, t, y):  # torchsde interface
        return self.drift(y)

    def g(self, t, y):
        return nn.functional.softplus(self.scale * y) * 0.2

    noise_type = "diagonal"
    sde_type = "stratonovich"


DIFFRAX_ADJOINTS = ("diffrax_recursive_checkpoint", "diffrax_backsolve", "diffrax_reversible")


def _diffrax_case(name: str, n_steps: int, batch: int, dim: int, width: int, max_steps: int) -> dict[str, Any]:
    """The same model in diffrax (per-sample trees under ``jax.vmap``), JAX on the CPU without
    preallocation.  Memory: XLA's buffer assignment for the compiled gradient (temporaries +
    outputs, ``compiled.memory_analysis()``): what one call needs whatever the allocator does
    (an RSS rise would count compilation, or nothing once buffers are reused).  ``dt0`` is an
    argument and ``max_steps`` is shared, so every step count reuses one compilation."""
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import lineax as lx

    jax.config.update("jax_enable_x64", True)
    H.enable_jax_compilation_cache(jax)
    solver: Any = diffrax.EulerHeun()
    if name == "diffrax_recursive_checkpoint":
        adjoint: Any = diffrax.RecursiveCheckpointAdjoint()
    elif name == "diffrax_backsolve":
        # diffrax's BacksolveAdjoint rejects EulerHeun's term structure; its Heun (the same
        # trapezoidal Stratonovich scheme on drift and diffusion) is accepted
        adjoint, solver = diffrax.BacksolveAdjoint(), diffrax.Heun()
    else:
        if not hasattr(diffrax, "ReversibleAdjoint"):
            return {"error": f"diffrax {diffrax.__version__} has no ReversibleAdjoint"}
        adjoint, solver = diffrax.ReversibleAdjoint(), diffrax.ReversibleHeun()
    k1, k2 = jax.random.split(jax.random.key(0))
    drift = eqx.nn.MLP(dim, dim, width, 1, activation=jnp.tanh, key=k1, dtype=jnp.float64)
    arrays, static = eqx.partition((drift, jnp.full((dim,), 0.2)), eqx.is_array)
    y0 = jax.random.normal(k2, (batch, dim), dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(1), batch)

    def drift_vf(t, y, args):
        return eqx.combine(args, static)[0](y)

    def diffusion_vf(t, y, args):
        return lx.DiagonalLinearOperator(0.2 * jax.nn.softplus(eqx.combine(args, static)[1] * y))

    def solve_one(arrays, y, key, dt0):
        bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=2.0**-20, shape=(dim,), key=key)
        terms = diffrax.MultiTerm(diffrax.ODETerm(drift_vf), diffrax.ControlTerm(diffusion_vf, bm))
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            1.0,
            dt0=dt0,
            y0=y,
            args=arrays,
            adjoint=adjoint,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=max_steps,
        )
        return sol.ys[-1]

    def loss(arrays, dt0):
        return jnp.mean(jax.vmap(solve_one, in_axes=(None, 0, 0, None))(arrays, y0, keys, dt0) ** 2)

    dt0 = jnp.asarray(1.0 / n_steps)
    compiled = jax.jit(jax.grad(loss)).lower(arrays, dt0).compile()
    analysis = compiled.memory_analysis()
    jax.block_until_ready(compiled(arrays, dt0))  # warm
    start = time.perf_counter()
    jax.block_until_ready(compiled(arrays, dt0))
    elapsed = time.perf_counter() - start
    mib = None if analysis is None else (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20
    return {"seconds": elapsed, "peak_mib": mib, "exact_peak": False, "measure": "xla_buffer_assignment"}


def _case(name: str, n_steps: int, batch: int, dim: int, width: int, max_steps: int = 0) -> dict[str, Any]:
    if name in DIFFRAX_ADJOINTS:
        return _diffrax_case(name, n_steps, batch, dim, width, max(max_steps, n_steps) + 1)
    torch.set_num_threads(1)
    model = _Model(dim, width).double()
    y0 = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tree = deb.VirtualBrownianTree(0.0, 1.0, (batch, dim), seed=0)
    dt = 1.0 / n_steps
    segments = max(1, n_steps // SEGMENT_STEPS)
    sensealg = {
        "none": None,
        "discrete_ckpt": deb.DiscreteAdjoint(checkpoints=segments),
        "interpolating": deb.InterpolatingAdjoint(checkpoints=segments),
        "backsolve": deb.BacksolveAdjoint(),
        "backsolve_reversible": deb.BacksolveAdjoint(),
    }.get(name)
    solver = deb.ReversibleHeun() if name == "backsolve_reversible" else deb.EulerHeun()

    def once() -> None:
        if name == "torchsde_adjoint":
            import torchsde
            from _sde_problems import torchsde_brownian_from

            ys = torchsde.sdeint_adjoint(
                model,
                y0,
                torch.tensor([0.0, 1.0], dtype=torch.float64),
                bm=torchsde_brownian_from(tree),
                method="heun",
                adjoint_method="heun",
                dt=dt,
                adjoint_params=tuple(model.parameters()),
            )
        else:
            prob = deb.SDEProblem(model.f, model.g, y0, (0.0, 1.0), interpretation="stratonovich", params=model)
            ys = deb.solve(prob, solver, dt=dt, brownian=tree, sensealg=sensealg).ys
        loss = ys[-1].pow(2).mean()
        loss.backward()

    base = _status_kib("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    once()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": elapsed, "peak_mib": max(0.0, ((peak or 0) - (base or 0)) / 1024.0), "exact_peak": exact}


def _child(conn, *args) -> None:
    try:
        conn.send(_case(*args))
    except Exception as exc:  # noqa: BLE001
        conn.send({"error": repr(exc)})
    conn.close()


def _run_forked(*args) -> dict[str, Any]:
    # JAX does not survive fork() once the parent has initialised it (``bench`` runs the other
    # benchmarks in this process first): the diffrax cases then start a fresh interpreter.
    jax_in_parent = "jax" in sys.modules
    ctx = mp.get_context("spawn" if args[0] in DIFFRAX_ADJOINTS and jax_in_parent else "fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, *args))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def run(quick: bool, out: Path) -> dict[str, Any]:
    if quick:
        steps, batch, dim, width = [40, 160], 16, 4, 16
    else:
        steps, batch, dim, width = [100, 1000, 10000], 256, 32, 128
    names = ["none", "discrete_ckpt", "interpolating", "backsolve", "backsolve_reversible"]
    try:
        import torchsde  # noqa: F401

        names.append("torchsde_adjoint")
    except ImportError:
        pass
    if importlib.util.find_spec("diffrax") is not None:  # not imported here: JAX lives in the children only
        names += list(DIFFRAX_ADJOINTS)
    results: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    for n in steps:
        for name in list(names):
            results[name][n] = _run_forked(name, n, batch, dim, width, max(steps))
            print(f"{name:>28} steps={n:>6}: {results[name][n]}", flush=True)
            if "has no ReversibleAdjoint" in str(results[name][n].get("error", "")):
                names.remove(name)  # this diffrax version lacks it
                results.pop(name)
    growth = {}
    for name in names:
        lo, hi = results[name][steps[0]].get("peak_mib"), results[name][steps[-1]].get("peak_mib")
        growth[name] = None if not lo or hi is None else hi / lo
    payload = {
        "quick": quick,
        "steps": steps,
        "batch": batch,
        "dim": dim,
        "width": width,
        "segment_steps": SEGMENT_STEPS,
        "results": results,
        "peak_growth_first_to_last": growth,
    }
    out.mkdir(parents=True, exist_ok=True)
    doc = H.write_json(out / "gradients.json", "gradients", payload, quick=quick)
    H.write_plot(plot, doc, out / "gradients.png")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    steps = doc["steps"]
    results = {n: {int(k): v for k, v in r.items()} for n, r in doc["results"].items()}
    names = list(results)
    fig, axes = H.figure(ncols=2)
    H.plot_series(
        axes[0],
        {n: (steps, [results[n][s].get("peak_mib") for s in steps]) for n in names},
        xlabel="steps",
        ylabel="peak RSS rise (MiB), forward+backward",
        title="memory",
    )
    H.plot_series(
        axes[1],
        {n: (steps, [results[n][s].get("seconds") for s in steps]) for n in names},
        xlabel="steps",
        ylabel="seconds, forward+backward",
        title="time",
    )
    return fig


LABELS = {
    "none": "`DiscreteAdjoint()` (default here)",
    "discrete_ckpt": f"`DiscreteAdjoint(checkpoints=steps/{SEGMENT_STEPS})`",
    "interpolating": f"`InterpolatingAdjoint(checkpoints=steps/{SEGMENT_STEPS})`",
    "backsolve": "`BacksolveAdjoint()` (EulerHeun, O(dt))",
    "backsolve_reversible": "`BacksolveAdjoint()` after `ReversibleHeun` (exact)",
    "torchsde_adjoint": "torchsde `sdeint_adjoint`",
    "diffrax_recursive_checkpoint": "diffrax `RecursiveCheckpointAdjoint`",
    "diffrax_backsolve": "diffrax `BacksolveAdjoint` (its `Heun`)",
    "diffrax_reversible": "diffrax `ReversibleAdjoint`",
}


def tables(doc: dict) -> dict[str, str]:
    """``growth``: peak memory (and time) of one forward+backward at the fewest and the most steps."""
    lo, hi = str(doc["steps"][0]), str(doc["steps"][-1])
    rows = []
    for name, res in doc["results"].items():
        a, b = res.get(lo, {}), res.get(hi, {})
        if "peak_mib" not in a or "peak_mib" not in b:
            rows.append((LABELS.get(name, name), "—", "—", (a.get("error") or b.get("error") or "")[:60]))
            continue
        growth = doc["peak_growth_first_to_last"].get(name)
        rows.append(
            (
                LABELS.get(name, name),
                f"{a['peak_mib']:.2f} -> {b['peak_mib']:.2f} MiB",
                H.fmt(None if growth is None else 100 * (growth - 1), "{:+.1f} %"),
                f"{a['seconds']:.2f} -> {b['seconds']:.2f} s",
            )
        )
    header = ["sensealg", f"peak rise, {lo} -> {hi} steps", "growth", "time, forward+backward"]
    return {"growth": H.markdown_table(header, rows)}


def main(argv: list[str] | None = None) -> int:
    parser = H.make_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
