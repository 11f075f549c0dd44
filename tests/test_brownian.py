"""Statistical and structural tests of ``deb.VirtualBrownianTree``.

Conventions checked here (DESIGN.md, "VirtualBrownianTree"): ``bm(s, t)`` returns the
increment ``W_{s,t} = W_t - W_s`` and the space-time Lévy area

    H_{s,t} = (1/h) ∫_s^t (W_r - W_s) dr - W_{s,t}/2,   h = t - s,

with ``W_{s,t} ~ N(0, h)``, ``H_{s,t} ~ N(0, h/12)`` independent.  Statistical tests use
fixed seeds and a significance level of 1e-3 (KS) or 4-5 standard errors (moments), so a
correct tree passes deterministically and a wrong variance / correlation fails.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
from scipy import stats

import diffeqbridge as deb

F64 = torch.float64


#: every test runs on both paths of ``evaluate`` (conftest's ``tree_kernel``: fused kernel, eager ops)
pytestmark = pytest.mark.usefixtures("tree_kernel")


def _random_intervals(
    n: int, seed: int, t0: float = 0.0, t1: float = 1.0, min_len: float = 0.0, max_len: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random ``t0 <= s < t <= t1`` with ``min_len <= t - s (<= max_len)``."""
    g = torch.Generator().manual_seed(seed)
    span = t1 - t0
    if max_len is None:
        a = t0 + span * torch.rand(n, generator=g, dtype=F64)
        b = t0 + span * torch.rand(n, generator=g, dtype=F64)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        t = torch.maximum(t, s + min_len).clamp(max=t1)
        s = torch.minimum(s, t - min_len)
        return s, t
    length = min_len + (max_len - min_len) * torch.rand(n, generator=g, dtype=F64)
    s = t0 + (span - length) * torch.rand(n, generator=g, dtype=F64)
    return s, s + length


# ------------------------------------------------------------------------ distribution
def test_increment_and_levy_area_are_standard_normal_after_scaling():
    n = 4000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=11)
    s, t = _random_intervals(n, seed=1, min_len=1e-3)
    dw, h = bm(s, t)
    length = t - s
    z_w = (dw[:, 0] / length.sqrt()).numpy()
    z_h = (h[:, 0] / (length / 12).sqrt()).numpy()
    assert stats.kstest(z_w, "norm").pvalue > 1e-3
    assert stats.kstest(z_h, "norm").pvalue > 1e-3
    # a wrong scale would be caught: the same data scaled by 1.1 fails
    assert stats.kstest(1.1 * z_w, "norm").pvalue < 1e-3 or stats.kstest(1.1 * z_h, "norm").pvalue < 1e-3


def test_short_intervals_between_one_and_two_cells_are_exact():
    """Query points at least ``tol`` apart (here tol..2 tol, anywhere, straddling cells)."""
    n = 4000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=12, tol=1e-3)
    assert bm.tol <= 1e-3 and bm.tol > 0.5e-3  # finest dyadic cell width <= requested tol
    s, t = _random_intervals(n, seed=2, min_len=bm.tol, max_len=2 * bm.tol)
    dw, h = bm(s, t)
    length = t - s
    assert stats.kstest((dw[:, 0] / length.sqrt()).numpy(), "norm").pvalue > 1e-3
    assert stats.kstest((h[:, 0] / (length / 12).sqrt()).numpy(), "norm").pvalue > 1e-3


def test_bridge_inside_a_finest_cell_from_its_left_end():
    """``[a, a + r]`` with ``a`` a cell boundary and ``r`` < one cell: the in-cell bridge's law."""
    n = 4000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=13, tol=2.0**-8)
    assert bm.tol == 2.0**-8
    g = torch.Generator().manual_seed(3)
    cell = torch.randint(0, 2**8, (n,), generator=g).to(F64)
    r = bm.tol * (0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64))
    s = cell * bm.tol
    dw, h = bm(s, s + r)
    assert stats.kstest((dw[:, 0] / r.sqrt()).numpy(), "norm").pvalue > 1e-3
    assert stats.kstest((h[:, 0] / (r / 12).sqrt()).numpy(), "norm").pvalue > 1e-3


def test_increment_independent_of_levy_area_and_across_elements_and_samples():
    n = 8000
    bm = deb.VirtualBrownianTree(0.0, 2.0, (n, 3), seed=21, tol=2.0**-12)
    s, t = _random_intervals(n, seed=4, t1=2.0, min_len=1e-2)
    dw, h = bm(s, t)
    scale = (t - s).sqrt().unsqueeze(1)
    zw, zh = dw / scale, h / (scale / math.sqrt(12))
    bound = 4 / math.sqrt(n)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    for e in range(3):
        assert abs(corr(zw[:, e], zh[:, e])) < bound
    assert abs(corr(zw[:, 0], zw[:, 1])) < bound
    assert abs(corr(zw[:, 1], zw[:, 2])) < bound
    assert abs(corr(zh[:, 0], zh[:, 2])) < bound
    # across samples: neighbouring samples, same (per-sample) interval law
    half = n // 2
    assert abs(corr(zw[0:half:1, 0], zw[half:, 0])) < 4 / math.sqrt(half)
    assert abs(corr(zw[:-1, 0], zw[1:, 0])) < bound
    # the same interval for every sample: samples are independent draws
    dw1, h1 = bm(0.5, 1.5)
    assert abs(corr(dw1[:-1, 0], dw1[1:, 0])) < bound
    assert abs(corr(dw1[:, 0], h1[:, 0])) < bound


def test_variance_of_w_is_elapsed_time():
    n = 10000
    t0, t1 = 0.5, 2.5
    bm = deb.VirtualBrownianTree(t0, t1, (n, 1), seed=31, tol=2.0**-12)
    tol_rel = 5 * math.sqrt(2 / n)  # chi-square: sd of a sample variance is sigma^2 sqrt(2/n)
    for t in (0.75, 1.7, 2.5):
        w = bm.W(t)[:, 0]
        assert abs(float(w.mean())) < 5 * math.sqrt((t - t0) / n)
        assert abs(float(w.square().mean()) / (t - t0) - 1) < tol_rel


def test_joint_covariance_is_min_of_times():
    n = 10000
    t0 = 0.25
    bm = deb.VirtualBrownianTree(t0, 1.25, (n, 1), seed=32, tol=2.0**-12)
    for s, t in ((0.4, 0.9), (0.3, 1.25), (0.8, 0.81)):
        ws, wt = bm.W(s)[:, 0], bm.W(t)[:, 0]
        cov = float((ws * wt).mean())
        var_s, var_t, true_cov = s - t0, t - t0, min(s, t) - t0
        se = math.sqrt((var_s * var_t + true_cov**2) / n)
        assert abs(cov - true_cov) < 5 * se
    # increments over disjoint intervals are uncorrelated
    a, _ = bm(0.3, 0.6)
    b, _ = bm(0.6, 1.1)
    assert abs(float(torch.corrcoef(torch.stack([a[:, 0], b[:, 0]]))[0, 1])) < 4 / math.sqrt(n)


def test_levy_area_matches_its_definition_on_a_fine_grid():
    """H_{s,t} from the tree vs (1/h) ∫ (W_r - W_s) dr - W_{s,t}/2 by the trapezoidal rule.

    On a grid of N cells of width h/N (>= tol), the trapezoidal rule's error is a sum of N
    independent cell Lévy areas: sd = h^{3/2} / (N sqrt(12)) after dividing by h; the
    Lévy area itself has sd sqrt(h/12), ~ N times larger, so a sign error or a missing
    ``- W/2`` term would fail by orders of magnitude.
    """
    batch, n_cells = 64, 2**10
    s0, t0 = 0.25, 0.75
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 2), seed=33, tol=2.0**-12)
    h = t0 - s0
    grid = torch.linspace(s0, t0, n_cells + 1, dtype=F64)
    w = torch.stack([bm.W(float(r)) for r in grid])  # (N+1, B, 2)
    w_rel = w - w[0]
    integral = (h / n_cells) * (w_rel[1:] + w_rel[:-1]).sum(0) / 2
    h_quad = integral / h - w_rel[-1] / 2
    dw, h_tree = bm(s0, t0)
    torch.testing.assert_close(dw, w_rel[-1], rtol=0, atol=1e-12)
    sd_quad = h**1.5 / (n_cells * math.sqrt(12)) / h
    assert float((h_tree - h_quad).abs().max()) < 6 * sd_quad
    assert float(h_tree.abs().mean()) > 20 * sd_quad  # the comparison is not vacuous


# --------------------------------------------------------------------- exact algebra
def test_additivity_of_increments():
    n = 256
    bm = deb.VirtualBrownianTree(-1.0, 3.0, (n, 2, 2), seed=41)
    g = torch.Generator().manual_seed(5)
    times = torch.sort(-1.0 + 4.0 * torch.rand(n, 3, generator=g, dtype=F64), dim=1).values
    s, t, u = times.unbind(1)
    w_su, _ = bm(s, u)
    w_st, _ = bm(s, t)
    w_tu, _ = bm(t, u)
    torch.testing.assert_close(w_su, w_st + w_tu, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_su, bm.W(u) - bm.W(s), rtol=0, atol=1e-12)


def test_chen_relation_for_space_time_levy_area():
    """Chen's relation, derived from the definition of H.

    With h1 = t - s, h2 = u - t, h = u - s and ∫_s^t (W_r - W_s) dr = h1 (H_{s,t} + W_{s,t}/2):

        ∫_s^u (W_r - W_s) dr = ∫_s^t (W_r - W_s) dr + ∫_t^u (W_r - W_t) dr + h2 W_{s,t}

    hence  h H_{s,u} = h1 H_{s,t} + h2 H_{t,u} + (h2 W_{s,t} - h1 W_{t,u}) / 2.
    (Midpoint case h1 = h2 = h/2: H = (H_l + H_r)/2 + (W_l - W_r)/4, as in brownian.py.)
    """
    n = 256
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 3), seed=42)
    g = torch.Generator().manual_seed(6)
    times = torch.sort(torch.rand(n, 3, generator=g, dtype=F64), dim=1).values
    s, t, u = times.unbind(1)
    w1, h1_area = bm(s, t)
    w2, h2_area = bm(t, u)
    _, h_area = bm(s, u)
    h1, h2 = (t - s).unsqueeze(1), (u - t).unsqueeze(1)
    rhs = (h1 * h1_area + h2 * h2_area + (h2 * w1 - h1 * w2) / 2) / (h1 + h2)
    torch.testing.assert_close(h_area, rhs, rtol=0, atol=1e-10)
    # the opposite sign of the cross term is wrong (guards the derivation itself)
    wrong = (h1 * h1_area + h2 * h2_area + (h1 * w2 - h2 * w1) / 2) / (h1 + h2)
    assert float((h_area - wrong).abs().max()) > 1e-3


def test_w_at_t0_is_zero_and_empty_interval_is_zero():
    bm = deb.VirtualBrownianTree(0.3, 1.3, (5, 2), seed=43)
    assert torch.equal(bm.W(0.3), torch.zeros(5, 2, dtype=F64))
    dw, h = bm(0.7, 0.7)
    assert torch.equal(dw, torch.zeros(5, 2, dtype=F64))
    assert torch.equal(h, torch.zeros(5, 2, dtype=F64))
    assert float(bm.W(1.3).abs().max()) > 0


def test_output_shape_and_dtype():
    bm = deb.VirtualBrownianTree(0.0, 1.0, (3, 2, 4), seed=0)
    dw, h = bm(0.1, torch.tensor([0.5, 0.6, 0.7], dtype=F64))
    assert dw.shape == h.shape == (3, 2, 4)
    assert dw.dtype == h.dtype == F64
    assert bm.W(0.5).shape == (3, 2, 4)


# ------------------------------------------------------------------------- invariance
def test_sample_values_do_not_depend_on_batch_composition():
    big = deb.VirtualBrownianTree(0.0, 1.0, (16, 3), seed=51)
    small = deb.VirtualBrownianTree(0.0, 1.0, (4, 3), seed=51)
    s, t = _random_intervals(16, seed=7, min_len=1e-3)
    dw_big, h_big = big(s, t)
    dw_small, h_small = small(s[:4], t[:4])
    assert torch.equal(dw_big[:4], dw_small)
    assert torch.equal(h_big[:4], h_small)
    assert torch.equal(big.W(0.37)[:4], small.W(0.37))


def test_values_do_not_depend_on_query_order_or_repetition():
    bm = deb.VirtualBrownianTree(0.0, 1.0, (8, 2), seed=52)
    times = torch.linspace(0.0, 1.0, 33, dtype=F64)[1:]
    forward = {float(t): bm.W(float(t)) for t in times}
    perm = torch.randperm(times.numel(), generator=torch.Generator().manual_seed(8))
    for t in times[perm]:
        assert torch.equal(bm.W(float(t)), forward[float(t)])
    # repeated queries, and a fresh tree with the same seed, give identical values
    again = deb.VirtualBrownianTree(0.0, 1.0, (8, 2), seed=52)
    for t in (0.5, 0.5, 0.123, 0.999):
        assert torch.equal(bm(0.1, t)[0], again(0.1, t)[0])
        assert torch.equal(bm(0.1, t)[1], again(0.1, t)[1])


def test_values_do_not_depend_on_step_sizes():
    """Reaching ``t`` through different intermediate intervals leaves ``W(t)`` unchanged."""
    target = 0.7
    ref_tree = deb.VirtualBrownianTree(0.0, 1.0, (6, 1), seed=53)
    direct = ref_tree.W(target)
    ref_inc = ref_tree(0.0, target)
    for n_steps in (3, 10, 64):
        bm = deb.VirtualBrownianTree(0.0, 1.0, (6, 1), seed=53)
        grid = torch.linspace(0.0, target, n_steps + 1, dtype=F64)
        total = torch.zeros(6, 1, dtype=F64)
        for a, b in itertools.pairwise(grid):
            total = total + bm(float(a), float(b))[0]
        torch.testing.assert_close(total, direct, rtol=0, atol=1e-12)
        assert torch.equal(bm.W(target), direct)
        assert torch.equal(bm(0.0, target)[1], ref_inc[1])
    # per-sample step sizes: each sample walks its own grid
    bm = deb.VirtualBrownianTree(0.0, 1.0, (6, 1), seed=53)
    t = torch.zeros(6, dtype=F64)
    total = torch.zeros(6, 1, dtype=F64)
    dt = torch.tensor([0.1, 0.07, 0.7, 0.35, 0.01, 0.0233], dtype=F64)
    while bool((t < target).any()):
        t_new = torch.minimum(t + dt, torch.full_like(t, target))
        total = total + bm(t, t_new)[0]
        t = t_new
    torch.testing.assert_close(total, direct, rtol=0, atol=1e-12)


_THREADS_SCRIPT = """
import sys, torch, diffeqbridge as deb
g = torch.Generator().manual_seed(9)
s = 0.5 * torch.rand(512, generator=g, dtype=torch.float64)
t = s + 1e-4 + 0.4 * torch.rand(512, generator=g, dtype=torch.float64)
out = []
for n in (1, 2):
    torch.set_num_threads(n)
    dw, h = deb.VirtualBrownianTree(0.0, 1.0, (512, 4), seed=54)(s, t)
    out.append((dw, h))
(a, b), (c, d) = out
print(bool(torch.equal(a, c)), bool(torch.equal(b, d)), float(a.abs().sum()) > 0)
"""


def test_values_do_not_depend_on_thread_count():
    """torch.set_num_threads(1) vs (2) give identical values.

    Run in a subprocess: on this machine, calling ``torch.set_num_threads(2)`` makes
    ``torch.log`` on small float64 tensors ~1000x slower for the rest of the process
    (MKL threading), which would slow down every later test.
    """
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"], out.stdout


def test_float32_output_is_float64_output_cast():
    s, t = _random_intervals(64, seed=10, min_len=1e-3)
    b64 = deb.VirtualBrownianTree(0.0, 1.0, (64, 3), seed=55, dtype=torch.float64)
    b32 = deb.VirtualBrownianTree(0.0, 1.0, (64, 3), seed=55, dtype=torch.float32)
    for x64, x32 in zip(b64(s, t), b32(s, t)):
        assert x32.dtype == torch.float32
        torch.testing.assert_close(x32, x64.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b32.W(0.6), b64.W(0.6).float(), rtol=1e-6, atol=1e-7)


def test_seed_changes_the_path():
    a = deb.VirtualBrownianTree(0.0, 1.0, (4, 2), seed=1)
    b = deb.VirtualBrownianTree(0.0, 1.0, (4, 2), seed=2)
    for t in (0.25, 1.0):
        assert float((a.W(t) - b.W(t)).abs().min()) > 0
    assert float((a(0.1, 0.2)[1] - b(0.1, 0.2)[1]).abs().min()) > 0


def test_tol_attribute_is_the_finest_dyadic_cell():
    for requested in (0.1, 1e-3, 3e-6):
        bm = deb.VirtualBrownianTree(0.0, 2.0, (1, 1), seed=0, tol=requested)
        assert bm.tol <= requested < 2 * bm.tol
        cells = 2.0 / bm.tol
        assert cells == 2 ** round(math.log2(cells))
    assert deb.VirtualBrownianTree(0.0, 1.0, (1, 1)).tol <= 1e-6  # default ~1e-6 (t1 - t0)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("t0, t1", [(1.0, 1.0), (1.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0)])
def test_bad_interval_raises(t0, t1):
    with pytest.raises(ValueError, match="t0"):
        deb.VirtualBrownianTree(t0, t1, (2, 1))


@pytest.mark.parametrize("shape", [(), (0, 2), (2, 0), (-1,)])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        deb.VirtualBrownianTree(0.0, 1.0, shape)


def test_bad_query_shape_and_bad_seed_raise():
    bm = deb.VirtualBrownianTree(0.0, 1.0, (4, 1))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        bm(torch.zeros(3, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="seed"):
        deb.VirtualBrownianTree(0.0, 1.0, (4, 1), seed=-1)
    with pytest.raises(ValueError, match="tol"):
        deb.VirtualBrownianTree(0.0, 1.0, (4, 1), tol=0.0)
