"""The Python glue of ``backend="julia"`` against a stand-in for the Julia package.

Julia cannot run here, so ``FakeDiffEqBridge`` implements ``solve_batch`` /
``solve_batch_pullback`` / ``apply_pullback`` in NumPy with the Julia functions' calling
convention: the keyword names (checked against the ``.jl`` signatures), ``u0s`` as an
``n x B`` array, results as a column-major ``n x B x T`` array, retcode names, the
``on_trajectory`` callback, and reverse mode through the Python VJP callbacks exactly as the
``ChainRulesCore.rrule`` of ``PyField`` calls them.  Its integrator is explicit Euler with a
fixed step, so the gradients it returns are known in closed form.  What this checks is the
glue (``diffeqbridge.julia.backend``): argument passing, array layouts, retcode/stat mapping and
the autograd boundary; SciML itself is exercised by ``test_conformance.py`` where Julia runs.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import diffeqbridge as deb
from diffeqbridge.julia import julia_package_dir

JL = julia_package_dir() / "src"


def _julia_keywords(path, function: str) -> set[str]:
    """Keyword names of ``function`` in a .jl file (the part of its signature after ``;``)."""
    src = (JL / path).read_text()
    sig = src[src.index(f"function {function}(") :]
    sig = sig[: sig.index(")\n")]
    kw = sig.split(";", 1)[1]
    return {m.strip().split("=")[0].split("::")[0].strip() for m in kw.split(",") if m.strip() and m.strip() != "kwargs..."}


SOLVE_KW = _julia_keywords("ensemble.jl", "solve_batch") | _julia_keywords("ensemble.jl", "_kwargs_dict")
PULLBACK_KW = _julia_keywords("adjoint.jl", "solve_batch_pullback") | _julia_keywords("ensemble.jl", "_kwargs_dict")


class FakeDiffEqBridge:
    """NumPy stand-in: explicit Euler (ODE) / Euler–Maruyama (SDE) with step ``dt`` or 1/64."""

    def __init__(self):
        self.calls: list[dict] = []

    def _steps(self, tspan, kw):
        t0, t1 = tspan
        h = kw.get("dt") or (t1 - t0) / 64
        return t0, h, round((t1 - t0) / h)

    def _check(self, kw, allowed):
        unknown = set(kw) - allowed
        assert not unknown, f"keywords the Julia function does not take: {unknown}"
        self.calls.append(kw)

    def solve_batch(self, f, fvjp, g, gvjp, u0s, tspan, p, **kw):
        self._check(kw, SOLVE_KW)
        ys, codes, nacc, wend, _ = self._run(f, g, u0s, tspan, kw, keep=False)
        return ys, codes, nacc, np.zeros_like(nacc), wend

    def _run(self, f, g, u0s, tspan, kw, keep):
        n, B = u0s.shape
        saveat = np.asarray(kw["saveat"])
        t0, h, N = self._steps(tspan, kw)
        ys = np.full((n, B, len(saveat)), np.nan, order="F")
        codes, nacc, traj = [], np.zeros(B, dtype=np.int64), []
        m = 0 if g is None else (1 if kw["noise"] == "scalar" else n)
        wend = np.zeros((m, B))
        for i in range(B):
            kw["on_trajectory"](i + 1)
            rng = np.random.default_rng(kw["seed"] * 2**32 + i + 1)
            u = np.array(u0s[:, i], dtype=float)
            states = [u.copy()]
            code = "Success"
            for k in range(N):
                t = t0 + k * h
                for j, ts in enumerate(saveat):
                    if abs(ts - t) < 1e-12:
                        ys[:, i, j] = u
                if k >= kw["maxiters"]:
                    code = "MaxIters"
                    break
                du = np.asarray(f(u, None, t)) * h
                if g is not None:
                    dw = rng.normal(scale=np.sqrt(h), size=m)
                    wend[:, i] += dw
                    du = du + np.asarray(g(u, None, t)) * (dw if m == n else dw[0])
                u = u + du
                states.append(u.copy())
                nacc[i] += 1
            if code == "Success":
                ys[:, i, -1] = u
            codes.append(code)
            traj.append(states)
        return ys, codes, nacc, wend, traj

    def solve_batch_pullback(self, f, fvjp, g, gvjp, u0s, tspan, p, **kw):
        self._check(kw, PULLBACK_KW)
        assert kw["sensealg_name"] in ("InterpolatingAdjoint", "BacksolveAdjoint") and g is None
        ys, codes, nacc, wend, traj = self._run(f, g, u0s, tspan, kw, keep=True)
        t0, h, _ = self._steps(tspan, kw)
        return ys, codes, nacc, nacc * 0, wend, (fvjp, traj, t0, h, len(p))

    def apply_pullback(self, pb, gys):
        fvjp, traj, t0, h, np_ = pb
        gys = np.asarray(gys)
        n, B, _ = gys.shape
        gu0s, gp = np.zeros((n, B)), np.zeros(np_)
        for i, states in enumerate(traj):
            a = gys[:, i, -1].copy()  # cotangent of the final state (only ys[-1] is used below)
            for k in range(len(states) - 2, -1, -1):
                gu, gpk = fvjp(states[k], None, t0 + k * h, a)
                a = a + h * np.asarray(gu)
                gp += h * np.asarray(gpk)
            gu0s[:, i] = a
        return gu0s, gp


@pytest.fixture
def fake(monkeypatch):
    mod = FakeDiffEqBridge()
    monkeypatch.setattr("diffeqbridge.julia.require_julia", lambda: None)
    monkeypatch.setattr("diffeqbridge.julia.bridge.load", lambda: mod)
    return mod


def test_forward_glue(fake):
    y0 = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]], dtype=torch.float64)  # B=3, state (1, 2)
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.0 * y, y0, (0.0, 1.0))
    sol = deb.solve(prob, deb.EM(), dt=1 / 64, saveat=[0.5, 1.0], seed=2, backend="julia")
    assert sol.ys.shape == (2, 3, 1, 2) and sol.ts.tolist() == [0.5, 1.0]
    torch.testing.assert_close(sol.ys[-1], y0 * (1 - 1 / 64) ** 64)
    torch.testing.assert_close(sol.ys[0], y0 * (1 - 1 / 64) ** 32)
    assert sol.success and sol.stats.naccept.tolist() == [64] * 3
    # counted in the Python wrappers: one drift and one diffusion call per step per sample
    assert sol.stats.nf.tolist() == [64] * 3 and sol.stats.ng.tolist() == [64] * 3
    assert sol.stats.extra["W_end"].shape == (3, 1, 2)
    kw = fake.calls[-1]
    assert kw["alg"] == "EM" and kw["seed"] == 2 and kw["adaptive"] is False and kw["dt"] == 1 / 64
    assert kw["noise"] == "diagonal" and kw["noise_dim"] is None and kw["maxiters"] == 100_000
    assert list(kw["saveat"]) == [0.0, 0.5, 1.0]  # t0 is integrated from, then dropped


def test_retcodes_and_solver_keywords(fake):
    prob = deb.SDEProblem(
        lambda t, y: -y, lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=torch.float64), (0.0, 1.0), interpretation="stratonovich"
    )
    sol = deb.solve(prob, deb.RKMil(), dt=1 / 64, adaptive=False, max_steps=5, backend="julia")
    assert sol.retcode == [deb.ReturnCode.MaxIters] * 2
    kw = fake.calls[-1]
    assert kw["alg"] == "RKMil" and kw["interpretation"] == "stratonovich" and kw["autodiff"] is None
    ode = deb.ODEProblem(lambda t, y: -y, torch.ones(2, 3, dtype=torch.float64), (0.0, 1.0))
    deb.solve(ode, deb.Rodas4(), backend="julia")
    kw = fake.calls[-1]
    assert kw["alg"] == "Rodas4" and kw["autodiff"] == "finitediff" and kw["abstol"] == 1e-6


def test_gradient_through_the_boundary(fake):
    """Euler on y' = -θ y: y_N = y0 (1 - θh)^N, so ∂y_N/∂θ = -N h y0 (1 - θh)^(N-1)."""
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -theta * y, y0, (0.0, 1.0), params=[theta])
    sol = deb.solve(prob, deb.Tsit5(), dt=1 / 64, adaptive=False, sensealg=deb.InterpolatingAdjoint(), backend="julia")
    h, N = 1 / 64, 64
    torch.testing.assert_close(sol.ys[-1].detach(), y0.detach() * (1 - 0.7 * h) ** N)
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    gtheta, gy0 = torch.autograd.grad((sol.ys[-1] * w).sum(), [theta, y0])
    torch.testing.assert_close(gtheta, (w * y0.detach()).sum() * (-N * h) * (1 - 0.7 * h) ** (N - 1))
    torch.testing.assert_close(gy0, w * (1 - 0.7 * h) ** N)
    kw = fake.calls[-1]
    assert kw["sensealg_name"] == "InterpolatingAdjoint" and kw["noisemixing"] is False


def test_closure_parameters_refused(fake):
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    prob = deb.ODEProblem(lambda t, y: -theta * y, torch.ones(2, 1, dtype=torch.float64), (0.0, 1.0))
    with pytest.raises(ValueError, match="silently zero"):
        deb.solve(prob, deb.Tsit5(), backend="julia")


def test_julia_signatures_parsed():
    assert {"alg", "seed", "on_trajectory", "noise", "abstol", "saveat", "maxiters", "dt"} <= SOLVE_KW
    assert {"sensealg_name", "checkpointing", "noisemixing"} <= PULLBACK_KW
    assert re.search(r"function apply_pullback\(pb::BatchPullback, gys::AbstractArray\)", (JL / "adjoint.jl").read_text())


# ----------------------------------------------------------------------------- Julia-source problems
class FakeNative:
    """Stand-in for ``compile_field``/``solve_native``/``gpu_ensemble``: records the calls and
    returns a constant trajectory (the Julia side does the maths)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def compile_field(self, body):
        self.calls.append(("compile_field", {"body": body}))
        return ("compiled", body)

    def _result(self, u0s, saveat):
        B = np.asarray(u0s).shape[1]
        ys = np.asfortranarray(np.repeat(np.asarray(u0s)[:, :, None], len(saveat), axis=2))
        return ys, ["Success"] * B, np.ones(B, dtype=np.int64), np.zeros(B, dtype=np.int64), np.zeros((0, B))

    def solve_native(self, f, g, u0s, tspan, p, **kw):
        assert set(kw) <= _julia_keywords("native.jl", "solve_native") | SOLVE_KW
        self.calls.append(("solve_native", kw))
        return self._result(u0s, kw["saveat"])

    def gpu_ensemble(self, f, g, u0s, tspan, p, **kw):
        self.calls.append(("gpu_ensemble", kw))
        return self._result(u0s, kw["saveat"])

    def gpu_available(self):
        return True


def test_julia_source_problem_glue(monkeypatch):
    mod = FakeNative()
    monkeypatch.setattr("diffeqbridge.julia.bridge.load", lambda: mod)
    monkeypatch.setattr("diffeqbridge.julia.bridge.enable_gpu", lambda: mod)
    y0 = torch.full((6, 2), 0.5, dtype=torch.float64)
    prob = deb.julia.SDEProblem("p[1] .* u", "p[2] .* u", y0, (0.0, 1.0), p=[1.01, 0.87])
    sol = deb.julia.solve(prob, deb.SOSRI(), ensemble="threads", saveat=[0.0, 0.5, 1.0])
    assert sol.ys.shape == (3, 6, 2) and sol.success
    assert [c[0] for c in mod.calls] == ["compile_field", "compile_field", "solve_native"]
    kw = mod.calls[-1][1]
    assert kw["alg"] == "SOSRI" and kw["ensemble"] == "threads" and kw["adaptive"] is True
    assert kw["abstol"] == 1e-2 and kw["maxiters"] == 100_000
    sol = deb.julia.solve(prob, "GPUEM", ensemble="gpu", dt=1e-3)
    assert mod.calls[-1][0] == "gpu_ensemble" and mod.calls[-1][1]["alg"] == "GPUEM"
    assert sol.ys.shape == (2, 6, 2)


def test_julia_source_problem_validation():
    y0 = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="Julia source"):
        deb.julia.SDEProblem("", "u", y0)
    with pytest.raises(ValueError, match="noise must be one of"):
        deb.julia.SDEProblem("u", "u", y0, noise="pink")
    prob = deb.julia.SDEProblem("-u", "0.1 .* u", y0)
    with pytest.raises(ValueError, match="ensemble must be one of"):
        deb.julia.solve(prob, deb.EM(), ensemble="mpi")
    with pytest.raises(ValueError, match="GPUTsit5 is for ODEs"):
        deb.julia.solve(prob, "GPUTsit5", ensemble="gpu", dt=0.1)
    with pytest.raises(ValueError, match="pass dt"):
        deb.julia.solve(prob, "GPUEM", ensemble="gpu")
    with pytest.raises(ValueError, match="fixed-step"):
        deb.julia.solve(prob, deb.EM(), ensemble="serial")
    scalar = deb.julia.SDEProblem("-u", "0.1 .* u", y0, noise="scalar")
    with pytest.raises(ValueError, match="diagonal noise only"):
        deb.julia.solve(scalar, "GPUSIEA", ensemble="gpu", dt=0.1)
    assert "juliacall" not in __import__("sys").modules
