"""``deb.solve(..., backend="julia")``: the same problem and solver objects, solved by SciML.

Batching: one SciML trajectory per sample (an ``EnsembleProblem`` whose ``prob_func`` sets
``u0`` and the seed of sample ``i``; ``EnsembleSerial`` because Python callbacks hold the GIL).
We chose this over one batched out-of-place function on a ``(n, B)`` state because it keeps
diffeqbridge's per-sample contract: every sample has its own adaptive steps, its own retcode
and its own stats, exactly as with the native engine (a batched state would share one step
size and one retcode across the batch).  The price is ``B`` Python calls of batch size 1 per
stage; for speed use Julia-source problems (``diffeqbridge.julia.SDEProblem``), which run
on Julia threads or a GPU without Python in the loop.

Stats: ``nf``/``ng`` are counted in the Python wrappers (SciML's SDE stats do not count
drift/diffusion calls); ``naccept``/``nreject`` come from ``sol.stats`` (zero on the
gradient path, where the forward solve runs inside Zygote).

Gradients: the solve goes through the native backend's autograd boundary
(:class:`diffeqbridge.adjoint._SolveFunction`) with a :class:`_JuliaSolve` as the external
forward/backward; Julia's side runs SciMLSensitivity with an explicit ``sensealg`` and asks
Python for VJPs of the drift/diffusion over ``[y, *prob.params]``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..adjoint import (
    ExternalSolve,
    _flat_params,
    _flatten_grads,
    _SolveFunction,
    check_closure_params,
)
from ..problem import ODEProblem, Terms
from ..solution import Solution, Stats
from .mapping import algorithm_spec, retcode_from_julia, sensealg_spec, solve_kwargs

__all__ = ["PythonFields", "solve_julia"]


class PythonFields:
    """The problem's drift/diffusion as SciML sees them: one sample, flat float64 arrays.

    ``drift(u, p, t)``/``diffusion(u, p, t)`` take ``u`` (a length-``n`` array from Julia, read
    without a copy), ignore ``p`` (it always equals the current ``prob.params``, flattened) and
    return float64 NumPy arrays (``(n,)``, or ``(n, m)`` for general-noise diffusion).
    ``*_vjp(u, p, t, v)`` return ``(vᵀ∂F/∂u, vᵀ∂F/∂θ)`` with ``torch.autograd.grad`` over
    ``[y, *prob.params]``.  Calls are counted per sample (``set_sample(i)``, 1-based, is called
    by Julia before each trajectory).
    """

    def __init__(self, prob: ODEProblem):
        self.prob = prob
        self.terms = Terms(prob)
        self.state_shape = prob.state_shape
        self.dtype = prob.y0.dtype
        self.device = prob.y0.device
        batch = prob.batch_size
        self.nf = np.zeros(batch, dtype=np.int64)
        self.ng = np.zeros(batch, dtype=np.int64)
        self.sample = 0

    def set_sample(self, i: int) -> None:
        self.sample = int(i) - 1

    def _state(self, u: Any) -> Tensor:
        return torch.as_tensor(np.asarray(u, dtype=np.float64)).reshape(1, *self.state_shape).to(
            dtype=self.dtype, device=self.device)

    def _time(self, t: float) -> Tensor:
        return torch.full((1,), float(t), dtype=torch.float64, device=self.device)

    @staticmethod
    def _out(x: Tensor, general: bool) -> np.ndarray:
        x = x.detach().to(device="cpu", dtype=torch.float64)
        return x.reshape(-1, x.shape[-1]).numpy() if general else x.reshape(-1).numpy()

    def drift(self, u: Any, p: Any, t: float) -> np.ndarray:
        self.nf[self.sample] += 1
        with torch.no_grad():
            return self._out(self.terms.drift(self._time(t), self._state(u)), False)

    def diffusion(self, u: Any, p: Any, t: float) -> np.ndarray:
        self.ng[self.sample] += 1
        assert self.terms.diffusion is not None
        with torch.no_grad():
            return self._out(self.terms.diffusion(self._time(t), self._state(u)), self.prob.noise == "general")

    def _vjp(self, fn: Callable[[Tensor, Tensor], Tensor], u: Any, t: float, v: Any) -> tuple[np.ndarray, np.ndarray]:
        params = self.prob.params
        with torch.enable_grad():
            y = self._state(u).requires_grad_(True)
            out = fn(self._time(t), y)
            cot = torch.as_tensor(np.asarray(v, dtype=np.float64)).to(dtype=out.dtype, device=out.device)
            grads = torch.autograd.grad(out, [y, *params], grad_outputs=cot.reshape(out.shape), allow_unused=True)
        gy = grads[0] if grads[0] is not None else torch.zeros_like(y)
        gp = _flatten_grads(grads[1:], params, gy)
        return self._out(gy, False), gp.detach().to(device="cpu", dtype=torch.float64).numpy()

    def drift_vjp(self, u: Any, p: Any, t: float, v: Any) -> tuple[np.ndarray, np.ndarray]:
        return self._vjp(self.terms.drift, u, t, v)

    def diffusion_vjp(self, u: Any, p: Any, t: float, v: Any) -> tuple[np.ndarray, np.ndarray]:
        assert self.terms.diffusion is not None
        return self._vjp(self.terms.diffusion, u, t, v)


def _call_kwargs(prob: ODEProblem, solver: Any, fields: PythonFields, *, dt: float | None, adaptive: bool,
                 atol: float, rtol: float, saveat: list[float], seed: int, max_steps: int,
                 dtmin: float) -> dict[str, Any]:
    alg = algorithm_spec(solver, prob.interpretation, python_callbacks=True)
    kwargs: dict[str, Any] = {
        "alg": alg.name, "interpretation": alg.kwargs.get("interpretation", "ito"),
        "theta": alg.kwargs.get("theta"), "autodiff": alg.kwargs.get("autodiff"),
        "noise": prob.noise or "diagonal", "noise_dim": prob.noise_dim if prob.noise == "general" else None,
        "seed": int(seed), "on_trajectory": fields.set_sample,
    }
    kwargs.update(solve_kwargs(atol=atol, rtol=rtol, saveat=saveat, max_steps=max_steps, dtmin=dtmin,
                               dt=dt, adaptive=adaptive))
    kwargs["saveat"] = np.asarray(kwargs["saveat"], dtype=np.float64)
    return kwargs


def _solution(prob: ODEProblem, solver: Any, fields: PythonFields, ts: Tensor, ys: Tensor, retcodes: Any,
              naccept: Any, nreject: Any, wend: Any) -> Solution:
    codes = torch.tensor([int(retcode_from_julia(str(c))) for c in retcodes], dtype=torch.int64)
    stats = Stats(
        nf=torch.from_numpy(fields.nf.copy()), ng=torch.from_numpy(fields.ng.copy()),
        naccept=torch.as_tensor(np.asarray(naccept, dtype=np.int64)),
        nreject=torch.as_tensor(np.asarray(nreject, dtype=np.int64)),
    )
    w = np.asarray(wend, dtype=np.float64)
    if w.size:  # W(t1) - W(t0) of SciML's noise, (B, *noise_shape)
        stats.extra["W_end"] = torch.from_numpy(w.T.copy()).reshape(prob.batch_size, *prob.noise_shape)
    return Solution(ts=ts.to(prob.y0.dtype), ys=ys, stats=stats, retcodes=codes.to(prob.y0.device), alg=solver)


class _JuliaSolve(ExternalSolve):
    """Forward: ``solve_batch_pullback`` in Julia (keeps the pullbacks); backward: ``apply_pullback``."""

    def __init__(self, mod: Any, prob: ODEProblem, fields: PythonFields, kwargs: dict[str, Any], sense: Any):
        self.mod, self.prob, self.fields, self.kwargs, self.sense = mod, prob, fields, kwargs, sense
        self.result: tuple[Any, Any, Any, Any] | None = None
        self.pullback: Any = None

    def forward(self, y0: Tensor, flat_params: Tensor) -> Tensor:
        from .bridge import from_julia, to_julia_matrix

        f = self.fields
        g = f.diffusion if self.prob.is_sde else None
        gv = f.diffusion_vjp if self.prob.is_sde else None
        ys, codes, nacc, nrej, wend, pb = self.mod.solve_batch_pullback(
            f.drift, f.drift_vjp, g, gv, to_julia_matrix(y0), self.prob.tspan,
            flat_params.detach().to(device="cpu", dtype=torch.float64).numpy(),
            sensealg_name=self.sense.name, checkpointing=self.sense.checkpointing,
            noisemixing=self.sense.noisemixing, **self.kwargs,
        )
        self.result, self.pullback = (codes, nacc, nrej, wend), pb
        y0c = self.prob.y0
        return from_julia(ys, tuple(y0c.shape), y0c.dtype, y0c.device).clone()

    def backward(self, grad_ys: Tensor) -> tuple[Tensor, Tensor]:
        y0 = self.prob.y0
        gys = grad_ys.detach().reshape(grad_ys.shape[0], grad_ys.shape[1], -1).to(device="cpu", dtype=torch.float64)
        # (T, B, n) C-order == n x B x T column-major: what apply_pullback expects
        gu0s, gp = self.mod.apply_pullback(self.pullback, gys.numpy().T)
        gy0 = torch.from_numpy(np.asarray(gu0s).T.copy()).reshape(y0.shape).to(dtype=y0.dtype, device=y0.device)
        gpt = torch.as_tensor(np.asarray(gp, dtype=np.float64)).to(device=y0.device)
        return gy0, gpt


def solve_julia(prob: ODEProblem, solver: Any, *, dt: float | None, adaptive: bool, atol: float, rtol: float,
                save_times: Tensor, seed: int, max_steps: int, dtmin: float, sensealg: Any = None) -> Solution:
    """Solve ``prob`` with SciML (inputs already validated by ``deb.solve``)."""
    from .bridge import from_julia, load, to_julia_matrix

    mod = load()
    fields = PythonFields(prob)
    saveat = [float(t) for t in save_times.tolist()]
    kwargs = _call_kwargs(prob, solver, fields, dt=dt, adaptive=adaptive, atol=atol, rtol=rtol, saveat=saveat,
                          seed=seed, max_steps=max_steps, dtmin=dtmin)
    if torch.is_grad_enabled():
        # tensors requiring grad hidden in closures would get silent zero gradients in
        # SciMLSensitivity (only u0 and p are differentiated): refuse them (one evaluation each)
        check_closure_params(prob, fields.terms, sensealg)
    needs_grad = torch.is_grad_enabled() and (prob.y0.requires_grad or any(p.requires_grad for p in prob.params))
    if needs_grad:
        sense = sensealg_spec(sensealg, prob.is_sde, prob.noise)
        ext = _JuliaSolve(mod, prob, fields, kwargs, sense)
        ys = _SolveFunction.apply(ext, prob.y0, _flat_params(prob.params, prob.y0))
        assert ext.result is not None
        return _solution(prob, solver, fields, save_times, ys, *ext.result)
    g = fields.diffusion if prob.is_sde else None
    gv = fields.diffusion_vjp if prob.is_sde else None
    ys_j, codes, nacc, nrej, wend = mod.solve_batch(
        fields.drift, fields.drift_vjp, g, gv, to_julia_matrix(prob.y0), prob.tspan,
        np.zeros(0, dtype=np.float64), **kwargs,
    )
    ys = from_julia(ys_j, tuple(prob.y0.shape), prob.y0.dtype, prob.y0.device)
    return _solution(prob, solver, fields, save_times, ys, codes, nacc, nrej, wend)
