"""BacksolveAdjoint on the engine's loop: backward work and gradient accuracy per tolerance.

Cases (float64, one fixed Brownian tree each):

* ``gbm``: Itô GBM ``du = 0.5 u dt + 0.6 u dW`` (B = 4, SOSRI forward at ``atol = rtol = tol``),
  loss ``Σ u(1)``; the error is against the pathwise derivative
  ``(du/dμ, du/dσ) = (u(1), (W(1) - σ) u(1))``, normwise over the batch.
* ``wave``: ``prob_sde_wave`` with its coefficients as parameters (B = 4 on [0, 1] at
  tol 1e-4; B = 2 on [0, 0.02] at tol 1e-6), loss ``Σ u(T)²``; the error is against
  ``DiscreteAdjoint()`` of the same solve.

For each: forward steps per sample, backward steps per sample (``stats.extra["adjoint_naccept"]``),
drift calls of the backward pass (each call evaluates the whole batch), seconds of the
backward pass, relative gradient error.  Before this change (the batch-shared backward
integrator, measured back to back on the same machine): GBM tol 1e-2: 104 backward drift
calls, errors (3.8e-3, 1.8e-2); tol 1e-3: 1,142 calls, (3.4e-4, 1.5e-3).  After: 62 calls,
(5.1e-3, 1.7e-2); 404 calls, (4.6e-4, 1.5e-3).

``python benchmarks/backsolve_steps.py [--quick]`` writes ``benchmarks/results/backsolve_steps.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import diffeqbridge as deb  # noqa: E402

F64 = torch.float64


def _counting(fn: Any, counter: list[int]) -> Any:
    def wrapped(t: Any, y: Any) -> Any:
        counter[0] += 1
        return fn(t, y)

    return wrapped


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = torch.cat([(g - w).reshape(-1) for g, w in zip(got, want)])
    return float(diff.norm() / torch.cat([w.reshape(-1) for w in want]).norm())


def _gbm(tol: float) -> dict[str, Any]:
    batch = 4
    mu = torch.full((batch, 1), 0.5, dtype=F64, requires_grad=True)
    sigma = torch.full((batch, 1), 0.6, dtype=F64, requires_grad=True)
    calls = [0]
    prob = deb.SDEProblem(
        _counting(lambda t, y: mu * y, calls),
        lambda t, y: sigma * y,
        torch.ones(batch, 1, dtype=F64),
        (0.0, 1.0),
        params=[mu, sigma],
    )
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 1), seed=7)
    sol = deb.solve(prob, deb.SOSRI(), brownian=bm, atol=tol, rtol=tol, sensealg=deb.BacksolveAdjoint())
    forward_calls, start = calls[0], time.perf_counter()
    g = torch.autograd.grad(sol.ys[-1].sum(), [mu, sigma])
    seconds = time.perf_counter() - start
    u = sol.ys[-1].detach()
    return {
        "forward_steps": sol.stats.naccept.tolist(),
        "backward_steps": sol.stats.extra["adjoint_naccept"].tolist(),
        "backward_drift_calls": calls[0] - forward_calls,
        "backward_seconds": seconds,
        "error_mu": _rel([g[0]], [u]),
        "error_sigma": _rel([g[1]], [(bm.W(1.0) - 0.6) * u]),
    }


def _wave(tol: float, t_end: float, batch: int, sensealg: Any) -> tuple[list[torch.Tensor], Any, int, float]:
    c1 = torch.tensor(0.01, dtype=F64, requires_grad=True)
    c2 = torch.tensor(0.1, dtype=F64, requires_grad=True)
    y0 = torch.linspace(0.5, 1.0, batch, dtype=F64).reshape(batch, 1).requires_grad_(True)
    calls = [0]
    prob = deb.SDEProblem(
        _counting(lambda t, y: -c1 * torch.sin(y) * torch.cos(y) ** 3, calls),
        lambda t, y: c2 * torch.cos(y) ** 2,
        y0,
        (0.0, t_end),
        noise="diagonal",
        params=[c1, c2],
    )
    bm = deb.VirtualBrownianTree(0.0, t_end, (batch, 1), seed=5)
    sol = deb.solve(prob, deb.SOSRI(), brownian=bm, atol=tol, rtol=tol, sensealg=sensealg)
    forward_calls, start = calls[0], time.perf_counter()
    g = list(torch.autograd.grad(sol.ys[-1].square().sum(), [y0, c1, c2]))
    return g, sol, calls[0] - forward_calls, time.perf_counter() - start


def _wave_case(tol: float, t_end: float, batch: int) -> dict[str, Any]:
    want, _, _, _ = _wave(tol, t_end, batch, deb.DiscreteAdjoint())
    got, sol, calls, seconds = _wave(tol, t_end, batch, deb.BacksolveAdjoint())
    return {
        "t_end": t_end,
        "batch": batch,
        "forward_steps": sol.stats.naccept.tolist(),
        "backward_steps": sol.stats.extra["adjoint_naccept"].tolist(),
        "backward_retcodes": sol.stats.extra["adjoint_retcodes"].tolist(),
        "backward_drift_calls": calls,
        "backward_seconds": seconds,
        "error_vs_discrete": _rel(got, want),
    }


def run(quick: bool, out: Path, threads: int = 1) -> dict[str, Any]:
    threading = H.set_threads(threads)
    gbm_tols = [1e-2, 1e-3] if quick else [1e-2, 1e-3, 1e-4]
    results: dict[str, Any] = {"gbm": {}, "wave": {}}
    for tol in gbm_tols:
        results["gbm"][f"{tol:g}"] = _gbm(tol)
        print("gbm", tol, results["gbm"][f"{tol:g}"], flush=True)
    wave_cases = [(1e-4, 1.0, 4), (1e-6, 0.02, 2)] if quick else [(1e-4, 1.0, 4), (1e-6, 0.2, 2)]
    for tol, t_end, batch in wave_cases:
        results["wave"][f"{tol:g}"] = _wave_case(tol, t_end, batch)
        print("wave", tol, results["wave"][f"{tol:g}"], flush=True)
    payload = {"threading": threading, "results": results}
    return H.write_json(out / "backsolve_steps.json", "backsolve_steps", payload, quick=quick)


def main(argv: list[str] | None = None) -> int:
    args = H.make_parser(__doc__.splitlines()[0]).parse_args(argv)
    run(args.quick, args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
