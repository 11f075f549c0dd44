"""VirtualBrownianTree against the facts torchsde's and diffrax's Brownian test suites check.

torchsde (``tests/test_brownian.py``: BrownianInterval / BrownianTree / BrownianPath) checks
normality of increments at fixed ``(s, t)`` shared by the batch, determinism of repeated and
reordered queries, reproducibility from the entropy (seed), dtypes and shapes; diffrax
(``test/test_brownian.py``: VirtualBrownianTree) checks ``evaluate(t0, t1)`` against
``evaluate(t1) - evaluate(t0)``, the conditional (Brownian bridge) statistics of a point given
the endpoints, ``use_levy=True`` returning ``(W, H)``, and the tolerance semantics.  Here the
same facts are asserted of our public API (``bm(s, t) -> (dW, H)``, ``bm.W(t)``,
``bm.increment_scalar``), each with a fixed seed and a stated tolerance, and each statistical
check paired with a perturbation of the data that it rejects (so it can fail).  What
``tests/test_brownian.py`` and ``tests/test_sde_peers.py`` already cover (random-interval
normality, additivity, Chen's relation, one fixed-triple 6 x 6 covariance) is not repeated.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import diffeqbridge as deb

F64 = torch.float64
KS_P = 1e-3  # Kolmogorov-Smirnov acceptance level (fixed seeds: deterministic outcome)


#: every test runs on both paths of ``evaluate`` (conftest's ``tree_kernel``: fused kernel, eager ops)
pytestmark = pytest.mark.usefixtures("tree_kernel")


def _ks(z: torch.Tensor) -> float:
    """KS p-value of ``z`` (any shape, flattened) against N(0, 1)."""
    return float(stats.kstest(z.reshape(-1).double().numpy(), "norm").pvalue)


def _triples(n: int, seed: int, t0: float, t1: float, gap: float) -> tuple[torch.Tensor, ...]:
    """Per-sample ``t0 <= s < t < u <= t1`` with both gaps at least ``gap``; each ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(n, 3, generator=g, dtype=F64), dim=1).values
    x = x * (1 - 2 * gap) + torch.tensor([0.0, gap, 2 * gap], dtype=F64)  # gaps >= gap (fraction)
    s, t, u = (t0 + (t1 - t0) * x[:, k] for k in range(3))
    return s, t, u


# ------------------------------------------------------- torchsde: normality at fixed (s, t)
@pytest.mark.parametrize("s, t", [(0.0, 1.0), (0.0, 0.3), (0.3, 0.7), (0.999, 1.0), (0.123456, 0.123556)])
def test_increment_at_fixed_times_is_normal_with_variance_t_minus_s(s, t):
    """torchsde's ``test_normality_simple``: every sample queried at the same ``(s, t)``;
    ``dW/sqrt(t-s)`` and ``H/sqrt((t-s)/12)`` pass KS, their means are within 5 standard
    errors of 0 and their variances within 5 standard errors of 1 (``sd = sqrt(2/n)``)."""
    n = 6000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n // 2, 2), seed=101)
    dw, h = bm(s, t)
    zw, zh = dw / math.sqrt(t - s), h / math.sqrt((t - s) / 12)
    for z in (zw, zh):
        assert _ks(z) > KS_P
        assert abs(float(z.mean())) < 5 / math.sqrt(n)
        assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    # the check has power: a 10% error of scale is rejected
    assert _ks(1.1 * zw) < KS_P
    # the shared-time fast path returns the same increment
    assert torch.allclose(bm.increment_scalar(s, t), dw, rtol=0, atol=1e-14)


def test_scalar_brownian_motion_per_sample_shape_and_law():
    """torchsde's scalar ``size=()``: ``shape=B`` (an int) is a batch of scalar motions."""
    n = 5000
    bm = deb.VirtualBrownianTree(-2.0, 3.0, n, seed=7)
    dw, h = bm(-1.0, 2.5)
    assert dw.shape == h.shape == bm.W(0.0).shape == (n,)
    assert _ks(dw / math.sqrt(3.5)) > KS_P
    assert _ks(h / math.sqrt(3.5 / 12)) > KS_P
    assert torch.allclose(dw, bm.W(2.5) - bm.W(-1.0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes_are_the_float64_path_cast(dtype):
    """torchsde's ``test_to_float32`` / dtype parametrisation: the same path in every dtype."""
    ref = deb.VirtualBrownianTree(0.0, 1.0, (64, 3), seed=5)
    low = deb.VirtualBrownianTree(0.0, 1.0, (64, 3), seed=5, dtype=dtype)
    s = torch.linspace(0.0, 0.4, 64, dtype=F64)
    for a, b in zip(ref(s, 0.9), low(s, 0.9)):
        assert b.dtype == dtype and b.shape == (64, 3)
        assert torch.equal(b, a.to(dtype))


def test_times_far_from_zero_keep_the_law():
    """Large time offsets (``t0 = 1e6``): the dyadic descent in relative time keeps the law."""
    n = 8000
    t0 = 1.0e6
    bm = deb.VirtualBrownianTree(t0, t0 + 2.0, (n, 1), seed=9)
    g = torch.Generator().manual_seed(1)
    s = t0 + 1.5 * torch.rand(n, generator=g, dtype=F64)
    length = 1e-3 + 0.4 * torch.rand(n, generator=g, dtype=F64)
    dw, h = bm(s, s + length)
    length = (s + length) - s  # the interval as float64 actually represents it
    assert _ks(dw[:, 0] / length.sqrt()) > KS_P
    assert _ks(h[:, 0] / (length / 12).sqrt()) > KS_P


# ------------------------------------------------------- torchsde: determinism and entropy
def test_many_per_sample_queries_repeat_bit_for_bit_in_another_order():
    """torchsde's ``test_determinism_large``: 40 per-sample queries, then the same ones in
    reverse order interleaved with unrelated queries, on the same tree and on a fresh one."""
    b = 32
    bm = deb.VirtualBrownianTree(0.0, 1.0, (b, 2), seed=77, tol=1e-4)
    g = torch.Generator().manual_seed(2)
    queries = [torch.sort(torch.rand(b, 2, generator=g, dtype=F64), dim=1).values.unbind(1) for _ in range(40)]
    first = [bm(s, t) for s, t in queries]
    fresh = deb.VirtualBrownianTree(0.0, 1.0, (b, 2), seed=77, tol=1e-4)
    for k in reversed(range(len(queries))):
        bm(torch.rand(b, generator=g, dtype=F64), 0.5)  # unrelated query in between
        bm.W(float(torch.rand(1, generator=g)))
        for tree in (bm, fresh):
            again = tree(*queries[k])
            assert torch.equal(again[0], first[k][0]) and torch.equal(again[1], first[k][1])


def test_consecutive_seeds_give_independent_standard_normal_paths():
    """torchsde's entropy tests: the seed is the whole randomness.  Across 1500 consecutive
    seeds (one sample each) ``W(1)`` and ``H_{0,1}`` are N(0, 1) / N(0, 1/12) by KS, and
    neighbouring seeds are uncorrelated (|r| < 4/sqrt(n)); seed ``k`` sample 1 is not seed
    ``k + 1`` sample 0 (keys mix seed and sample index, not their sum)."""
    n = 1500
    w, h, cross = [], [], []
    for seed in range(n):
        bm = deb.VirtualBrownianTree(0.0, 1.0, (2, 1), seed=seed)
        dw, area = bm(0.0, 1.0)
        w.append(dw[0, 0])
        h.append(area[0, 0])
        cross.append(dw[1, 0])
    w_, h_, c_ = torch.stack(w), torch.stack(h), torch.stack(cross)
    assert _ks(w_) > KS_P and _ks(h_ * math.sqrt(12)) > KS_P
    bound = 4 / math.sqrt(n)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert abs(corr(w_[:-1], w_[1:])) < bound
    assert abs(corr(w_, h_)) < bound
    assert abs(corr(c_[:-1], w_[1:])) < bound  # seed k sample 1 vs seed k+1 sample 0
    assert abs(corr(c_, w_)) < bound
    # the check has power: perfectly correlated data is rejected
    assert abs(corr(w_, w_ + 0.1 * h_)) > bound


# ------------------------------------------------------------- diffrax: evaluate(t0, t1)
def test_increment_is_difference_of_point_values_and_levy_area_its_definition():
    """diffrax: ``evaluate(t0, t1) == evaluate(t1) - evaluate(t0)``; with ``use_levy`` the area
    ``H = (1/h) int_s^t (W_u - W_s) du - dW/2`` (trapezoid on a 2^12 grid inside ``[s, t]``,
    error well below the 2e-3 tolerance against ``H`` of order 0.2)."""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (6, 2), seed=3, tol=2.0**-16)
    s, t = 0.15625, 0.65625  # dyadic: the grid below hits cell boundaries
    dw, h = bm(s, t)
    assert torch.allclose(dw, bm.W(t) - bm.W(s), rtol=0, atol=1e-14)
    grid = torch.linspace(s, t, 2**12 + 1, dtype=F64)
    path = torch.stack([bm.W(float(u)) for u in grid])  # (G, 6, 2)
    mean = torch.trapezoid(path - path[0], grid, dim=0) / (t - s)
    assert torch.allclose(h, mean - 0.5 * dw, rtol=0, atol=2e-3)
    assert float((h - (mean - 0.5 * dw)).abs().max()) < 0.1 * float(h.abs().max())


def test_reversed_query_negates_the_increment_and_keeps_the_levy_area():
    """``bm(t, s)`` for ``s < t`` is the step of the time-reversed path ``B_u = W_{t-u}``:
    increment ``-dW`` and, since ``(1/h) int (B_u - B_0) du - (B_h - B_0)/2`` equals the mean of
    ``W`` on ``[s, t]`` minus ``(W_s + W_t)/2``, the same space-time Lévy area ``H``.  This
    keeps ``(t - s)(H + dW/2) = int_s^t (W_u - W_s) du`` as an oriented integral, which a
    solver's step of negative length uses.  (diffrax's ``test_levy_area_reverse_time`` compares
    every field with its negation, but its ``assert tree_map(...)`` is always true: no fact.)"""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (50, 3), seed=8)
    g = torch.Generator().manual_seed(3)
    s, t = torch.sort(torch.rand(50, 2, generator=g, dtype=F64), dim=1).values.unbind(1)
    dw, h = bm(s, t)
    dw_r, h_r = bm(t, s)
    assert torch.allclose(dw_r, -dw, rtol=0, atol=1e-14)
    assert torch.allclose(h_r, h, rtol=0, atol=1e-12)


# ------------------------------------------------- diffrax / torchsde: conditional statistics
def test_brownian_bridge_given_the_endpoint_increment():
    """torchsde's ``test_normality_conditional`` / diffrax's conditional statistics, per sample
    at random ``s < t < u``: ``W_{s,t} | W_{s,u}`` has mean ``r W_{s,u}`` and variance
    ``(t - s)(u - t)/(u - s)`` (``r = (t-s)/(u-s)``): the standardised residual passes KS and is
    uncorrelated with ``W_{s,u}``."""
    n = 12000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=202)
    s, t, u = _triples(n, seed=4, t0=0.0, t1=1.0, gap=1e-3)
    w_st = bm(s, t)[0][:, 0]
    w_su = bm(s, u)[0][:, 0]
    r = (t - s) / (u - s)
    resid = (w_st - r * w_su) / ((t - s) * (u - t) / (u - s)).sqrt()
    assert _ks(resid) > KS_P
    assert abs(float(torch.corrcoef(torch.stack([resid, w_su / (u - s).sqrt()]))[0, 1])) < 4 / math.sqrt(n)
    # power: the unconditional variance in place of the bridge's is rejected
    assert _ks((w_st - r * w_su) / (t - s).sqrt()) < KS_P


def test_levy_bridge_given_the_endpoint_increment_and_area():
    """The bridge with space-time Lévy area (Foster 2020): given ``(W, H)`` of ``[s, u]`` with
    ``h = u - s``, ``W_{s,t}`` has mean ``r W + 6 r (1 - r) H`` and variance
    ``h r (1 - r) (1 - 3 r (1 - r))``; ``H_{s,t}`` alone is ``N(0, (t - s)/12)``."""
    n = 12000
    bm = deb.VirtualBrownianTree(-1.0, 2.0, (n, 1), seed=303)
    s, t, u = _triples(n, seed=5, t0=-1.0, t1=2.0, gap=1e-3)
    w_st, h_st = (x[:, 0] for x in bm(s, t))
    w_su, h_su = (x[:, 0] for x in bm(s, u))
    r = (t - s) / (u - s)
    q = r * (1 - r)
    var = (u - s) * q * (1 - 3 * q)
    resid = (w_st - r * w_su - 6 * q * h_su) / var.sqrt()
    assert _ks(resid) > KS_P
    bound = 4 / math.sqrt(n)
    for other in (w_su / (u - s).sqrt(), h_su / ((u - s) / 12).sqrt()):
        assert abs(float(torch.corrcoef(torch.stack([resid, other]))[0, 1])) < bound
    assert _ks(h_st / ((t - s) / 12).sqrt()) > KS_P
    # power: dropping the Lévy-area term of the mean is rejected
    assert _ks((w_st - r * w_su) / var.sqrt()) < KS_P


# ---------------------------------------------------------------- diffrax: tolerance semantics
def test_point_values_are_exact_at_any_time_even_inside_a_coarse_cell():
    """diffrax's ``tol``: the tree is refined to cells of width ``<= tol`` and the value at a
    time inside a cell comes from the bridge given the cell.  The marginal law of ``W(t)``
    stays exact at any ``t`` (here ``tol = 1/4``: 4 cells), and points at least ``tol`` apart
    have exactly independent increments over disjoint intervals."""
    n = 8000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=404, tol=0.25)
    assert bm.tol == 0.25
    g = torch.Generator().manual_seed(6)
    t = 0.01 + 0.99 * torch.rand(n, generator=g, dtype=F64)
    w = bm.W(t)[:, 0]
    assert _ks(w / t.sqrt()) > KS_P
    # disjoint intervals [0, a], [a + 0.25, 1] with a < 0.75: independent, variances a and 0.75 - a
    a = 0.7 * torch.rand(n, generator=g, dtype=F64)
    w1 = bm(torch.zeros_like(a), a)[0][:, 0] / a.sqrt()
    w2 = bm(a + 0.25, torch.ones_like(a))[0][:, 0] / (0.75 - a).sqrt()
    assert _ks(w1) > KS_P and _ks(w2) > KS_P
    assert abs(float(torch.corrcoef(torch.stack([w1, w2]))[0, 1])) < 4 / math.sqrt(n)


def test_path_is_continuous_below_the_tolerance():
    """Queries closer than ``tol`` resolve inside one cell's bridge: the path stays continuous
    (``|W(t + d) - W(t)| -> 0`` with ``d``) and finite, and ``W`` hits the cell's endpoints."""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (200, 1), seed=505, tol=2.0**-6)
    g = torch.Generator().manual_seed(7)
    t = 0.9 * torch.rand(200, generator=g, dtype=F64)
    gaps = []
    for d in (1e-3, 1e-5, 1e-7):
        gaps.append(float((bm.W(t + d) - bm.W(t)).abs().max()))
    assert gaps[0] < 0.5 and gaps[1] < 0.05 and gaps[2] < 5e-3, gaps
    assert gaps[2] < gaps[1] < gaps[0]
    # approaching a cell boundary from inside the cell gives the boundary's value
    edge = torch.full((200,), 2.0**-6 * 17, dtype=F64)
    assert torch.allclose(bm.W(edge - 1e-12), bm.W(edge), rtol=0, atol=1e-5)


def test_a_non_finite_tensor_time_only_affects_its_own_sample():
    """Per-sample tensor queries are clamped, never checked on the host: a NaN time gives NaN
    in its own row only, and the other rows are the values of the NaN-free query."""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (4, 2), seed=606)
    good = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    bad = good.clone()
    bad[1] = float("nan")
    dw_good, h_good = bm(good, 0.9)
    dw_bad, h_bad = bm(bad, 0.9)
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(dw_bad[keep], dw_good[keep]) and torch.equal(h_bad[keep], h_good[keep])
    assert bool(dw_bad[1].isnan().all())


def test_levy_area_keeps_its_law_on_a_deep_tree_down_to_1e_9_of_the_span():
    """``H`` comes from ``(J(t) - J(s)) / h`` with ``J`` of order ``span^{3/2}``: rounding of
    ``J`` costs a relative error of about ``1e-15 (span / h)^{3/2}`` in ``H`` (docs/brownian.md).
    On a depth-40 tree (``tol = 1e-12``) intervals of ``1e-9`` still give ``H`` the exact law
    (KS, variance within 5 standard errors), and ``dW`` is exact down to the tolerance."""
    n = 6000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=707, tol=1e-12)
    assert bm.depth == 40
    g = torch.Generator().manual_seed(8)
    s = 0.9 * torch.rand(n, generator=g, dtype=F64)
    for length in (1e-6, 1e-9):
        t = s + length
        h_len = t - s
        dw, h = bm(s, t)
        zh = h[:, 0] / (h_len / 12).sqrt()
        assert _ks(zh) > KS_P and abs(float(zh.var()) - 1) < 5 * math.sqrt(2 / n)
    t = s + 4 * bm.tol
    assert _ks(bm(s, t)[0][:, 0] / (t - s).sqrt()) > KS_P


@pytest.mark.parametrize("tol", [0.0, -1.0, float("nan"), float("inf")])
def test_a_tolerance_that_is_not_positive_and_finite_raises_naming_tol(tol):
    """``tol=inf`` raised ``ValueError: math domain error`` (from ``log2(0)``), naming nothing."""
    with pytest.raises(ValueError, match="tol"):
        deb.VirtualBrownianTree(0.0, 1.0, (2, 1), tol=tol)


def test_host_query_times_outside_the_interval_raise_in_every_form():
    """torchsde raises for queries outside ``[t0, t1]``.  Host times are checked whatever their
    container: a list or NumPy array of per-sample times (it raised ``TypeError: float()
    argument must be ... not 'list'``, though ``torch.as_tensor`` accepts it) and the
    shared-time :meth:`increment_scalar` (it clamped ``t = 2`` to ``t1 = 1`` silently).
    Lists and arrays inside the interval are the tensor query's values."""
    np = pytest.importorskip("numpy")
    bm = deb.VirtualBrownianTree(0.0, 1.0, (3, 1), seed=808)
    times = [0.2, 0.5, 0.9]
    ref = bm(0.0, torch.tensor(times, dtype=F64))
    for form in (times, np.array(times)):
        out = bm(0.0, form)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    for bad in ([0.2, 1.5, 0.3], np.array([0.2, -0.5, 0.3]), [0.2, float("nan"), 0.3]):
        with pytest.raises(ValueError, match="t must lie inside"):
            bm(0.0, bad)
        with pytest.raises(ValueError, match="t must lie inside"):
            bm.W(bad)
    with pytest.raises(ValueError, match="t must lie inside"):
        bm.increment_scalar(0.0, 2.0)
    with pytest.raises(ValueError, match="s must lie inside"):
        bm.increment_scalar(-0.1, 0.5)
    with pytest.raises(TypeError, match="s must be a number"):
        bm("soon", 0.5)


def test_levy_area_of_each_half_given_the_whole_interval_area():
    """torchsde's ``test_normality_conditional`` for the space-time area, per sample at random
    ``a < u < b`` (``h1 = u - a``, ``h2 = b - u``, ``h = b - a``): given ``H`` of ``[a, b]``,
    ``H_{a,u}`` has mean ``H (h1/h)^2`` and standard deviation ``sqrt(p^2 + c^2) / h1``, and
    ``H_{u,b}`` mean ``H (h2/h)^2`` and sd ``sqrt(q^2 + c^2) / h2``, with
    ``d = sqrt(h1^3 + h2^3)``, ``p = h1^3.5 h2^0.5 / (2 h d)``, ``q = h1^0.5 h2^3.5 / (2 h d)``,
    ``c = sqrt(3) h1^1.5 h2^1.5 / (6 d)`` (Foster's bridge of the area, as torchsde states it).
    ``H_{a,b}`` is independent of ``W_{a,b}``, so the residuals are uncorrelated with both."""
    n = 12000
    bm = deb.VirtualBrownianTree(0.0, 1.0, (n, 1), seed=909)
    a, u, b = _triples(n, seed=9, t0=0.0, t1=1.0, gap=2e-3)
    w, h = (x[:, 0] for x in bm(a, b))
    h_1 = bm(a, u)[1][:, 0]
    h_2 = bm(u, b)[1][:, 0]
    l1, l2, length = u - a, b - u, b - a
    d = (l1**3 + l2**3).sqrt()
    p = l1**3.5 * l2**0.5 / (2 * length * d)
    q = l1**0.5 * l2**3.5 / (2 * length * d)
    c = math.sqrt(3) * l1**1.5 * l2**1.5 / (6 * d)
    r1 = (h_1 - h * (l1 / length) ** 2) / ((p**2 + c**2).sqrt() / l1)
    r2 = (h_2 - h * (l2 / length) ** 2) / ((q**2 + c**2).sqrt() / l2)
    bound = 4 / math.sqrt(n)
    for resid in (r1, r2):
        assert _ks(resid) > KS_P
        for other in (w / length.sqrt(), h / (length / 12).sqrt()):
            assert abs(float(torch.corrcoef(torch.stack([resid, other]))[0, 1])) < bound
    # power: the unconditional law of H_{a,u} standardised by the conditional sd is rejected
    assert _ks(h_1 / ((p**2 + c**2).sqrt() / l1)) < KS_P


def test_point_values_anchored_at_t0_follow_diffrax_conditional_laws():
    """diffrax's ``test_conditional_statistics`` with ``use_levy=True``: queries ``(W, H)`` over
    ``[t0, s]``, ``[t0, r]``, ``[t0, u]`` for ``s < r < u`` (here per sample, on ``[0.3, 8.7]``
    as diffrax).  With times relative to ``t0``, ``sr = r - s``, ``ru = u - r``, ``su = u - s``,
    ``d = sqrt(sr^3 + ru^3)``, ``a = sr^3.5 ru^0.5 / (2 su d)``, ``b = ru^3.5 sr^0.5 / (2 su d)``,
    ``c = sr^1.5 ru^1.5 / (sqrt(12) d)`` and ``H_su`` the area of ``[s, u]`` from Chen's relation:
    ``W_r`` given the rest is normal with mean ``W_s + (sr/su)(W_u - W_s) + 6 sr ru H_su / su^2``
    and sd ``2 (a + b) / su``; ``H_r`` given the rest has mean
    ``(s/r) H_s + sr^3 H_su / (r su^2) + W_s/2 - s W_mean / (2 r)`` and variance
    ``(c/r)^2 + ((a u + s b) / (r su))^2``."""
    n = 12000
    t0, t1 = 0.3, 8.7
    bm = deb.VirtualBrownianTree(t0, t1, (n,), seed=1111, tol=2.0**-12)
    s, r, u = _triples(n, seed=10, t0=t0, t1=t1, gap=2.0**-10 / (t1 - t0))
    start = torch.full((n,), t0, dtype=F64)
    (w_s, h_s), (w_r, h_r), (w_u, h_u) = (bm(start, x) for x in (s, r, u))
    s, r, u = s - t0, r - t0, u - t0
    sr, ru, su = r - s, u - r, u - s
    d = (sr**3 + ru**3).sqrt()
    a = sr**3.5 * ru.sqrt() / (2 * su * d)
    b = ru**3.5 * sr.sqrt() / (2 * su * d)
    c = sr**1.5 * ru**1.5 / (math.sqrt(12) * d)
    h_su = (u * h_u - s * h_s - u / 2 * w_s + s / 2 * w_u) / su
    w_mean = w_s + (sr / su) * (w_u - w_s) + (6 * sr * ru / su**2) * h_su
    z_w = (w_r - w_mean) / (2 * (a + b) / su)
    assert _ks(z_w) > KS_P
    h_mean = (s / r) * h_s + (sr**3 / (r * su**2)) * h_su + 0.5 * w_s - s / (2 * r) * w_mean
    h_sd = ((c / r) ** 2 + ((a * u + s * b) / (r * su)) ** 2).sqrt()
    assert _ks((h_r - h_mean) / h_sd) > KS_P
    # power: leaving the Lévy-area term out of W's mean is rejected
    assert _ks((w_r - (w_mean - (6 * sr * ru / su**2) * h_su)) / (2 * (a + b) / su)) < KS_P


def test_integer_seeds_of_numpy_and_torch_are_their_int():
    """Peers' tests draw seeds as NumPy integers (torchsde's ``entropy=npr.randint(...)``) or
    keys from arrays: a NumPy integer or an integer 0-d tensor is the int it holds (both raised
    ``ValueError``), in the tree and in ``solve``; bools, floats and negatives still raise."""
    np = pytest.importorskip("numpy")
    ref = deb.VirtualBrownianTree(0.0, 1.0, (3, 2), seed=5, sample_offset=2)(0.2, 0.9)
    for seed in (np.int64(5), np.uint32(5), torch.tensor(5)):
        bm = deb.VirtualBrownianTree(0.0, 1.0, (3, 2), seed=seed, sample_offset=np.int16(2))
        assert type(bm.seed) is int and type(bm.sample_offset) is int
        out = bm(0.2, 0.9)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    for bad in (True, 5.0, torch.tensor(5.0), np.int64(-1), 2**64):
        with pytest.raises(ValueError, match="seed"):
            deb.VirtualBrownianTree(0.0, 1.0, (3, 2), seed=bad)
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.5 * torch.ones_like(y), torch.ones(4, 1, dtype=F64), (0.0, 1.0))
    a = deb.solve(prob, deb.EM(), dt=0.125, seed=np.int64(3))
    b = deb.solve(prob, deb.EM(), dt=0.125, seed=3)
    assert torch.equal(a.ys, b.ys)


def test_per_sample_queries_mixing_empty_intervals_and_strided_times():
    """diffrax evaluates ``evaluate(t, t)`` as zero; here per sample: rows with ``s == t``
    (at ``t0``, inside, at ``t1``) give exactly zero ``dW`` and ``H`` next to a row that does
    not, and strided or expanded (stride-0) time tensors give the contiguous query's values."""
    bm = deb.VirtualBrownianTree(0.0, 1.0, (4, 3), seed=1212)
    s = torch.tensor([0.0, 0.3, 1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0, 0.7], dtype=F64)
    dw, h = bm(s, t)
    assert torch.equal(dw[:3], torch.zeros(3, 3, dtype=F64)) and torch.equal(h[:3], torch.zeros(3, 3, dtype=F64))
    assert bool((dw[3] != 0).all()) and bool((h[3] != 0).all())
    grid = torch.linspace(0.05, 0.95, 8, dtype=F64)
    lo, hi = grid[::2], grid.flip(0)[::2]
    assert not lo.is_contiguous()
    for a, b in zip(bm(lo, hi), bm(lo.contiguous(), hi.contiguous())):
        assert torch.equal(a, b)
    shared = torch.tensor(0.4, dtype=F64).expand(4)
    for a, b in zip(bm(shared, 0.9), bm(0.4, 0.9)):
        assert torch.equal(a, b)


def test_one_time_query_is_the_increment_from_t0():
    """torchsde's ``bm(t)`` and diffrax's ``evaluate(t)``: ``bm(t)`` is ``bm(t0, t)``, for a
    number and per-sample times; it raised ``TypeError`` (missing ``t``)."""
    bm = deb.VirtualBrownianTree(0.5, 2.0, (3, 2), seed=1313)
    for t in (1.25, torch.tensor([0.7, 1.1, 2.0], dtype=F64)):
        for a, b in zip(bm(t), bm(0.5, t)):
            assert torch.equal(a, b)
    assert torch.equal(bm(1.25)[0], bm.W(1.25))
    with pytest.raises(ValueError, match="t must lie inside"):
        bm(2.5)


def test_time_arguments_of_any_numeric_type():
    """diffrax's ``test_shape_and_dtype`` queries with ``int``, ``float``, int32 and float32
    scalars: every combination gives the float64 query's values (times exactly representable),
    also for ``t0``/``t1`` given as 0-d tensors (torchsde's ``t0, t1 = torch.tensor([0., 1.])``)."""
    np = pytest.importorskip("numpy")
    bm = deb.VirtualBrownianTree(torch.tensor(0.0), torch.tensor(2.0), torch.Size([3, 2]), seed=1414)
    ref = bm(0.0, 2.0)
    kinds = (0, 0.0, torch.tensor(0, dtype=torch.int32), torch.tensor(0.0, dtype=torch.float32), np.float32(0.0))
    ends = (2, 2.0, torch.tensor(2, dtype=torch.int32), torch.tensor(2.0, dtype=torch.float32), np.int64(2))
    for s in kinds:
        for t in ends:
            dw, h = bm(s, t)
            assert torch.equal(dw, ref[0]) and torch.equal(h, ref[1])
