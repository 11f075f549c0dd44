"""Ensembles: streamed reductions vs closed forms, batch independence, torch.distributed (gloo, 2 ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.ensemble import Quantiles

HERE = Path(__file__).resolve().parent
MU, SIGMA, DT = 0.5, 0.3, 0.25


def gbm_ensemble(*reductions: deb.Reduction) -> deb.EnsembleProblem:
    def prob_func(indices: torch.Tensor) -> deb.SDEProblem:
        y0 = torch.ones(indices.shape[0], 1, dtype=torch.float64)
        return deb.SDEProblem(lambda t, y: MU * y, lambda t, y: SIGMA * y, y0, tspan=(0.0, 1.0))

    return deb.EnsembleProblem(prob_func, reduction=list(reductions) or None)


def test_sample_offset_selects_rows_of_the_big_tree():
    big = deb.VirtualBrownianTree(0.0, 1.0, (6, 2), seed=3)
    part = deb.VirtualBrownianTree(0.0, 1.0, (2, 2), seed=3, sample_offset=4)
    t = torch.tensor([0.3, 0.71], dtype=torch.float64)
    assert torch.equal(part.W(t), big.W(torch.tensor([0.0] * 4 + [0.3, 0.71], dtype=torch.float64))[4:])
    with pytest.raises(ValueError, match="sample_offset"):
        deb.VirtualBrownianTree(0.0, 1.0, (2, 2), sample_offset=-1)


def test_million_gbm_paths_streamed_moments_match_the_scheme_and_one_batch():
    """10⁶ Euler–Maruyama GBM paths (4 steps) in 4 batches: the streamed mean/variance equal the
    closed-form moments of the scheme, E[X_N] = (1 + μh)^N and
    E[X_N²] = ((1 + μh)² + σ²h)^N (X_{k+1} = X_k (1 + μh + σ ΔW_k)), within 4 standard errors,
    and every path equals the path of a one-batch run bit for bit."""
    n = 10**6
    eprob = gbm_ensemble(deb.Moments(), deb.Collect())
    kwargs = {"alg": deb.EM(), "dt": DT, "seed": 11, "brownian_tol": DT}
    batched = deb.solve_ensemble(eprob, n, batch_size=250_000, **kwargs)
    single = deb.solve_ensemble(eprob, n, batch_size=n, **kwargs)
    steps = round(1 / DT)
    mean = (1 + MU * DT) ** steps
    var = ((1 + MU * DT) ** 2 + SIGMA**2 * DT) ** steps - mean**2
    m = batched.result["moments"]
    assert batched.batches == 4 and m["count"] == n and batched.retcodes == {"Success": n}
    assert abs(float(m["mean"]) - mean) < 4 * float(m["sem"])
    values = batched.result["collect"]["values"].ravel()
    # SE of the sample variance: sqrt((m4 - var²) / n)
    se_var = float(((values - values.mean()) ** 4).mean() - values.var() ** 2) ** 0.5 / n**0.5
    assert abs(float(m["var"]) - var) < 4 * se_var
    assert torch.equal(values, single.result["collect"]["values"].ravel())
    torch.testing.assert_close(m["mean"], single.result["moments"]["mean"], rtol=1e-13, atol=0)
    torch.testing.assert_close(m["var"], single.result["moments"]["var"], rtol=1e-12, atol=0)
    torch.testing.assert_close(m["mean"], values.mean().reshape(1), rtol=1e-13, atol=0)


def test_quantiles_exact_then_within_the_rank_bound():
    x = torch.randn(5000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    qs = (0.01, 0.3, 0.5, 0.9)
    exact = Quantiles(qs, capacity=8192)
    state = exact.partial(x[:1234], torch.arange(1234))
    state = exact.merge(state, exact.partial(x[1234:], torch.arange(1234, 5000)))
    res = exact.result(state)
    assert res["exact"]
    want = np.quantile(x.numpy(), qs, axis=0, method="inverted_cdf")
    assert np.array_equal(res["quantiles"].numpy(), want)
    sketch = Quantiles(qs, capacity=64)
    state = None
    for k in range(0, 5000, 500):
        part = sketch.partial(x[k : k + 500], torch.arange(k, k + 500))
        state = part if state is None else sketch.merge(state, part)
    res = sketch.result(state)
    assert not res["exact"]
    ranks = (x.unsqueeze(0) <= res["quantiles"].unsqueeze(1)).double().mean(dim=1)  # empirical CDF at the answer
    bound = np.log2(5000 / 64) / 64  # the documented worst-case rank error
    assert (ranks - torch.tensor(qs, dtype=torch.float64).unsqueeze(1)).abs().max() <= bound


def test_ensemble_validation():
    eprob = gbm_ensemble()
    with pytest.raises(ValueError, match="n must"):
        deb.solve_ensemble(eprob, 0)
    with pytest.raises(ValueError, match="batch_size"):
        deb.solve_ensemble(eprob, 10, batch_size=0)
    with pytest.raises(TypeError, match="eprob"):
        deb.solve_ensemble(object(), 10)
    with pytest.raises(TypeError, match="reduction"):
        deb.EnsembleProblem(lambda i: None, reduction=lambda a, b: a)
    with pytest.raises(ValueError, match="sample_offset"):
        deb.solve_ensemble(eprob, 10, sample_offset=3)
    bad = deb.EnsembleProblem(lambda i: gbm_ensemble().prob_func(i[:1]))
    with pytest.raises(ValueError, match="prob_func returned"):
        deb.solve_ensemble(bad, 10, alg=deb.EM(), dt=0.5)


def test_failed_samples_are_left_out_and_counted():
    def prob_func(indices: torch.Tensor) -> deb.SDEProblem:
        y0 = torch.ones(indices.shape[0], 1, dtype=torch.float64)
        k = (indices % 4 == 0).to(torch.float64).unsqueeze(1) * 1e300  # every 4th sample overflows (Unstable)
        return deb.SDEProblem(lambda t, y: k * y * y, lambda t, y: 0.1 + 0 * y, y0, tspan=(0.0, 1.0), noise="additive")

    esol = deb.solve_ensemble(deb.EnsembleProblem(prob_func), 40, batch_size=15, alg=deb.EM(), dt=0.5)
    assert esol.retcodes == {"Unstable": 10, "Success": 30} and esol.successful == 30
    assert esol["count"] == 30 and bool(torch.isfinite(esol["mean"]).all())


def test_two_process_gloo_run_equals_one_process_bit_for_bit(tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo on localhost) gives every path, every reduction and
    every count of a one-process run, bit for bit."""
    sys.path.insert(0, str(HERE))
    try:
        import ensemble_worker
    finally:
        sys.path.remove(str(HERE))
    out = tmp_path / "dist.pt"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ensemble_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    ref = ensemble_worker.run(distributed=False)
    assert got["world"] == 2 and got["retcodes"] == ref.retcodes and got["nf"] == ref.nf
    for name, res in ref.result.items():
        for key, value in res.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got["result"][name][key], value), (name, key)
            else:
                assert got["result"][name][key] == value, (name, key)


def test_ensemble_with_terminating_events_reduces_event_times_and_states():
    """y' = -k_i y, k_i = 1 + (i mod 4)/2, stopped at y = 1/2: the default output is the state at the
    event (1/2), and an output_func of the event time gives the mean of log(2)/k_i."""

    def prob_func(indices: torch.Tensor) -> deb.ODEProblem:
        k = (1.0 + (indices % 4).to(torch.float64) / 2).unsqueeze(1)
        return deb.ODEProblem(lambda t, y: -k * y, torch.ones(indices.shape[0], 1, dtype=torch.float64), (0.0, 5.0))

    half = deb.ContinuousEvent(lambda t, y: y[:, 0] - 0.5)
    kwargs = {"alg": deb.Tsit5(), "events": [half], "atol": 1e-10, "rtol": 1e-10}
    states = deb.solve_ensemble(deb.EnsembleProblem(prob_func), 40, batch_size=12, **kwargs)
    assert states.retcodes == {"Terminated": 40}
    torch.testing.assert_close(states["mean"], torch.tensor([0.5], dtype=torch.float64), atol=1e-9, rtol=0)
    times = deb.solve_ensemble(
        deb.EnsembleProblem(prob_func, output_func=lambda sol, idx: sol.events.t), 40, batch_size=12, **kwargs
    )
    want = np.mean([np.log(2) / (1 + (i % 4) / 2) for i in range(40)])
    assert abs(float(times["mean"]) - want) < 1e-8
