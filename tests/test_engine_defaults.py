"""Defaults as SciML: ``dtmin`` relative to the float spacing of ``t`` (not the span), and
``unstable_check``: a blowing-up sample stops early with ``ReturnCode.Unstable``."""

from __future__ import annotations

import pytest
import torch

import diffeqbridge as deb

DT = torch.float64


def _robertson(y: torch.Tensor) -> torch.Tensor:
    y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2], dim=1)


@pytest.mark.parametrize("alg", [deb.Rodas4(), deb.Kvaerno5()], ids=repr)
def test_robertson_to_1e11_with_default_dtmin(alg):
    """The old default ``dtmin = 1e-14 (t1 - t0)`` was 1e-3 here (and the initial step was
    floored at 10): DtLessThanMin with NaN before the first step."""
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=DT)
    sol = deb.solve(
        deb.ODEProblem(lambda t, y: _robertson(y), y0, (0.0, 1e11)), alg, atol=1e-8, rtol=1e-6, saveat=[0.0, 40.0, 1e11]
    )
    assert sol.success
    y40 = sol.ys[1, 0]
    # reference values at t = 40 (Hairer & Wanner's ROBER; high-accuracy solution)
    assert torch.allclose(y40, torch.tensor([0.7158271, 9.185535e-6, 0.2841637], dtype=DT), rtol=1e-3, atol=1e-9)
    yend = sol.ys[-1, 0]
    assert abs(float(yend.sum()) - 1.0) < 1e-6  # mass conservation
    assert float(yend[0]) < 1e-5 and float(yend[2]) > 0.9999  # y1 -> 0, y3 -> 1 as t -> inf


def test_blow_up_stops_early_with_unstable_and_healthy_samples_succeed():
    """du = u^2 dt + 0.01 dW from u0 = 10 blows up at t ~ 0.1; beside three healthy samples
    (u0 small: no blow-up on [0, 1]) it stops with Unstable after a few hundred steps
    instead of crawling 14,000+ steps to DtLessThanMin."""
    y0 = torch.tensor([[10.0], [0.1], [0.5], [-1.0]], dtype=DT)
    prob = deb.SDEProblem(lambda t, y: y * y, lambda t, y: 0.01 * torch.ones_like(y), y0, (0.0, 1.0), noise="additive")
    sol = deb.solve(prob, deb.SOSRA(), seed=0)
    codes = [int(c) for c in sol.retcodes]
    assert codes[0] == int(deb.ReturnCode.Unstable)
    assert codes[1:] == [int(deb.ReturnCode.Success)] * 3
    steps = sol.stats.naccept + sol.stats.nreject
    assert int(steps[0]) < 2000
    assert int(steps[1:].max()) < 1000


def test_dtmin_still_stops_a_sample_that_cannot_progress():
    """A sample whose error estimate never passes (a discontinuous drift it keeps stepping
    into) still ends with DtLessThanMin when ``dtmin`` is given; the others succeed."""
    y0 = torch.tensor([[0.0], [1.0]], dtype=DT)
    flip = torch.tensor([[1.0], [0.0]], dtype=DT)

    def f(t, y):
        return flip * torch.where(t[:, None] > 0.5, torch.full_like(y, 1e8), torch.zeros_like(y)) - (1 - flip) * y

    sol = deb.solve(deb.ODEProblem(f, y0, (0.0, 1.0)), deb.Tsit5(), atol=1e-12, rtol=1e-12, dtmin=1e-6)
    assert int(sol.retcodes[0]) == int(deb.ReturnCode.DtLessThanMin)
    assert int(sol.retcodes[1]) == int(deb.ReturnCode.Success)


def test_solvers_receive_float64_time_for_float32_states():
    """Time is not quantized to the state's dtype inside the engine (issue 15 item 3): at
    t0 = 1e9 a float32 time has a spacing of 64, float64 one of 1.2e-7."""
    seen: list[torch.Tensor] = []

    class Recording(deb.Tsit5):
        def step(self, terms, t, y, dt, dw, levy_h, f0=None):
            seen.append(t.clone())
            return super().step(terms, t, y, dt, dw, levy_h, f0)

    y0 = torch.ones(3, 1, dtype=torch.float32)
    sol = deb.solve(deb.ODEProblem(lambda t, y: -y, y0, (1e9, 1e9 + 1.0)), Recording(), atol=1e-5, rtol=1e-5)
    assert sol.success and sol.ys.dtype == torch.float32
    assert all(t.dtype == torch.float64 for t in seen)
    times = torch.stack(seen)[:, 0] - 1e9
    assert float(times.max()) < 1.0 and len(set(times.tolist())) > 5  # sub-unit times, not multiples of 64
    assert abs(float(sol.ys[-1, 0, 0]) - 0.36787944) < 1e-4
