"""User functions only ever see times inside ``tspan`` (issue 15 item 11).

Finished or failed samples stay in the batch (masked); they must not be evaluated past the
end of the span (or below ``t1`` when time runs backwards), and a model that is NaN outside
the span must not put NaN into the gradients of the healthy samples.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import diffeqbridge as deb

DT = torch.float64


class Guard:
    """Wraps a field ``f(t, y)``: records every time seen, and returns NaN outside ``[lo, hi]``."""

    def __init__(self, f, lo: float, hi: float):
        self.f, self.lo, self.hi = f, lo, hi
        self.outside = 0
        self.calls = 0

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        bad = (t < self.lo) | (t > self.hi)
        self.outside += int(bad.sum())
        out = self.f(t, y)
        return torch.where(bad.reshape((-1,) + (1,) * (out.ndim - 1)), torch.full_like(out, float("nan")), out)


def _rates(batch: int) -> Tensor:
    return torch.logspace(-1, 1.5, batch, dtype=DT).reshape(batch, 1)


@pytest.mark.parametrize("tspan", [(0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("case", ["SOSRA", "SRIW1", "EM", "Tsit5", "Rodas4"])
def test_fields_only_see_times_inside_tspan(case, tspan):
    batch = 8
    rates = _rates(batch)
    theta = torch.tensor(1.0, dtype=DT, requires_grad=True)
    lo, hi = min(tspan), max(tspan)
    sign = 1.0 if tspan[1] > tspan[0] else -1.0
    # decaying in the direction of integration, at very different rates: samples finish at
    # very different iterations, the early ones are masked for most of the solve
    drift = Guard(lambda t, y: -sign * theta * rates * y + 0.1 * torch.cos(t).reshape(-1, 1), lo, hi)
    y0 = torch.ones(batch, 1, dtype=DT)
    saveat = torch.linspace(tspan[0], tspan[1], 5, dtype=DT)
    if case in ("Tsit5", "Rodas4"):
        prob = deb.ODEProblem(drift, y0, tspan, params=[theta])
        kw = dict(atol=1e-6, rtol=1e-6)
        g = None
    else:
        g = Guard(lambda t, y: 0.1 * (1.0 + 0.0 * y) if case != "SRIW1" else 0.1 * y, lo, hi)
        noise = "additive" if case == "SOSRA" else "diagonal"
        prob = deb.SDEProblem(drift, g, y0, tspan, noise=noise, params=[theta])
        kw = dict(dt=0.003) if case == "EM" else dict(atol=1e-2, rtol=1e-2)
    sol = deb.solve(prob, getattr(deb, case)(), saveat=saveat, seed=1, **kw)
    assert sol.success
    assert drift.outside == 0 and (g is None or g.outside == 0)
    if case != "EM":  # masked lanes existed (fixed steps: the samples step in lockstep)
        assert int(sol.stats.naccept.max()) > 2 * int(sol.stats.naccept.min())
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [theta])
    assert torch.isfinite(grad)


def test_failed_sample_masked_inside_tspan_and_healthy_gradient_finite():
    """One sample blows up (ReturnCode != Success) early; the masked lane keeps being
    evaluated, only inside the span, and the healthy samples' gradient stays finite."""
    theta = torch.tensor(1.0, dtype=DT, requires_grad=True)
    drift = Guard(lambda t, y: theta * y * y - y, 0.0, 1.0)
    y0 = torch.tensor([[50.0], [0.1], [0.5], [-1.0]], dtype=DT)
    sol = deb.solve(deb.ODEProblem(drift, y0, (0.0, 1.0), params=[theta]), deb.Tsit5(), atol=1e-8, rtol=1e-8)
    ok = sol.retcodes == int(deb.ReturnCode.Success)
    assert not bool(ok[0]) and bool(ok[1:].all())
    assert drift.outside == 0
    (grad,) = torch.autograd.grad(sol.ys[-1][ok].sum(), [theta])
    assert torch.isfinite(grad)
