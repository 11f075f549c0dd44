"""``solve(..., compact=f)``: finished samples leave the batch, with the masked loop's bits.

Samples of ``y' = -k y`` with rates ``k`` spread over three decades (the rate rides along as
a constant second state component, so the drift is row-independent) take 8 to several
hundred steps; compaction at several thresholds must reproduce the masked loop exactly:
states, step counts, retcodes, and gradients.
"""

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import engine

pytestmark = pytest.mark.usefixtures("float64_default")


def decay(t, y):
    return torch.stack([-y[:, 1] * y[:, 0] * (1 + 0.5 * torch.sin(t)), torch.zeros_like(y[:, 1])], dim=1)


@pytest.fixture
def compactions(monkeypatch):
    """The batch sizes the loop compacted to, so a test sees that compaction happened."""
    sizes: list[int] = []
    original = engine.Integrator._compact

    def counting(self, full, part, idx):
        small, new_idx = original(self, full, part, idx)
        sizes.append(int(new_idx.numel()))
        return small, new_idx

    monkeypatch.setattr(engine.Integrator, "_compact", counting)
    return sizes


def problem(batch: int = 16) -> deb.ODEProblem:
    rates = torch.logspace(-1, 2.5, batch)
    return deb.ODEProblem(decay, torch.stack([torch.ones(batch), rates], dim=1), (0.0, 3.0))


@pytest.mark.parametrize("alg", [deb.Tsit5(), deb.Dopri5(), deb.Rodas4()], ids=lambda a: type(a).__name__)
def test_compacted_equals_masked(alg, compactions):
    prob = problem()
    kwargs = dict(alg=alg, atol=1e-8, rtol=1e-8, saveat=torch.linspace(0, 3, 7), backend="native")
    masked = deb.solve(prob, **kwargs)
    steps = masked.stats.naccept
    assert int(steps.max()) > 2 * int(steps.min())  # samples finish at very different iterations
    for threshold in (0.3, 0.9):
        compactions.clear()
        compacted = deb.solve(prob, compact=threshold, **kwargs)
        assert compactions and compactions[-1] < prob.batch_size, compactions
        assert torch.equal(compacted.ys, masked.ys)
        assert torch.equal(compacted.retcodes, masked.retcodes)
        for name in ("naccept", "nreject", "nf"):
            assert torch.equal(getattr(compacted.stats, name), getattr(masked.stats, name)), name
        assert compacted.stats.extra.keys() == masked.stats.extra.keys()
        for key, value in masked.stats.extra.items():
            assert torch.equal(compacted.stats.extra[key], value), key


def test_compacted_gradients_equal_masked(compactions):
    y0 = torch.stack([torch.ones(8), torch.logspace(-1, 2, 8)], dim=1).requires_grad_()
    prob = deb.ODEProblem(decay, y0, (0.0, 2.0))
    grads = []
    for compact in (0.0, 0.6):
        sol = deb.solve(prob, deb.Tsit5(), atol=1e-8, rtol=1e-8, compact=compact, backend="native")
        grads.append(torch.autograd.grad(sol.ys[-1, :, 0].sum(), y0)[0])
    assert compactions
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.5"])
def test_compact_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="compact must be a number in"):
        deb.solve(problem(2), deb.Tsit5(), compact=bad)
