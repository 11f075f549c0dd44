"""The fused and the eager descents of ``deb.VirtualBrownianTree`` give the same path.

``evaluate`` runs a fused kernel (C on the CPU, ``torch.compile`` of
``_tree_kernel.fused_point`` on CUDA) or the eager tensor ops; both do the same float64
operations in the same order, so they differ only where ``log``/``sin``/``cos`` round
differently (glibc/libmvec vs SLEEF).  Bound checked here (docs/brownian.md): for W the
difference is below ``1e-14 * sqrt(t - t0)`` and for ``J = int W`` below
``1e-14 * (t - t0)^{3/2}`` (measured ~2e-15); the integer hash is bit-identical (a wrong
node key would give O(1) differences).  Also: the torch source of the CUDA kernel (run
here without compiling, including the depth padding), odd batch sizes, deep trees whose
hash absorbs ``node >> 32``, ``sample_offset`` and the environment switch.
"""

from __future__ import annotations

import pytest
import torch

import diffeqbridge as deb
from diffeqbridge import _tree_kernel as K

F64 = torch.float64
REL = 1e-14


def _times(batch: int, seed: int, t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = t0 + (t1 - t0) * torch.rand(batch, generator=g, dtype=F64)
    t[:3] = torch.tensor([t0, t1, t0 + (t1 - t0) * 0.5], dtype=F64)[: min(3, batch)]  # ends and a node
    return t


def _assert_close_paths(bm: deb.VirtualBrownianTree, t: torch.Tensor, w: torch.Tensor, j: torch.Tensor) -> None:
    w_ref, j_ref = bm._evaluate_eager(t)
    elapsed = (t - bm.t0).unsqueeze(1)
    assert float(w_ref.abs().max()) > 0.1  # not vacuous
    assert bool(((w - w_ref).abs() <= REL * elapsed.sqrt() + 1e-300).all())
    assert bool(((j - j_ref).abs() <= REL * elapsed**1.5 + 1e-300).all())


def _use(mode: str, monkeypatch) -> str:
    if mode == "fused" and K.c_kernel() is None:
        pytest.skip("no C compiler: the fused CPU kernel is unavailable")
    monkeypatch.setenv(K.ENV_VAR, mode)  # "fused": a kernel failing at run time is an error
    return mode


@pytest.fixture
def fused(monkeypatch):
    return _use("fused", monkeypatch)


@pytest.mark.parametrize(
    "shape, tol, span",
    [
        ((1000, 1), 2.0**-20, (0.0, 1.0)),
        ((37, 3, 2), 1e-3, (-1.0, 2.5)),
        ((130, 1), 2.0**-40, (0.0, 1.0)),
        ((5, 4), 1e-15, (0.0, 3.0)),
    ],
)
def test_fused_matches_eager(fused, shape, tol, span):
    bm = deb.VirtualBrownianTree(*span, shape, seed=7, tol=tol)
    assert bm.kernel == "fused"
    t = _times(shape[0], seed=1, t0=span[0], t1=span[1])
    w, j = bm.evaluate(t)
    assert w.shape == j.shape == (shape[0], bm.n_elements) and w.dtype == F64
    _assert_close_paths(bm, t, w, j)


@pytest.mark.parametrize("depth_tol", [2.0**-6, 2.0**-11, 2.0**-34])
def test_torch_source_of_the_cuda_kernel_matches_eager(depth_tol):
    """``fused_point`` (what torch.compile fuses on CUDA), run op by op, padded depth included."""
    bm = deb.VirtualBrownianTree(0.0, 2.0, (50, 2), seed=8, tol=depth_tol)
    t = _times(50, seed=2, t1=2.0)
    _, _, w_root, h_root, levels, level_keys, geometry, cell_key, wide = bm._fused_inputs(padded=True)
    assert levels.shape[0] == K.padded_depth(bm.depth) >= bm.depth
    w, j = K.fused_point(t, bm._element_keys, w_root, h_root, levels, level_keys, geometry, levels.shape[0], cell_key, wide)
    _assert_close_paths(bm, t, w, j)


def test_fused_values_do_not_depend_on_batch_position_or_size(fused):
    """Elements run in blocks of 64 lanes; a sample's value must not depend on its lane."""
    big = deb.VirtualBrownianTree(0.0, 1.0, (200, 3), seed=9)
    t = _times(200, seed=3)
    w_big, j_big = big.evaluate(t)
    for lo, hi in ((0, 1), (5, 70), (63, 65), (130, 200)):
        part = deb.VirtualBrownianTree(0.0, 1.0, (hi - lo, 3), seed=9, sample_offset=lo)
        w, j = part.evaluate(t[lo:hi])
        assert torch.equal(w, w_big[lo:hi]) and torch.equal(j, j_big[lo:hi])


def test_sample_offset_selects_samples_of_the_ensemble(tree_kernel_modes):
    whole = deb.VirtualBrownianTree(0.0, 1.0, (12, 2), seed=10)
    tail = deb.VirtualBrownianTree(0.0, 1.0, (4, 2), seed=10, sample_offset=8)
    s, t = _times(12, seed=4) * 0.5, 0.5 + _times(12, seed=5) * 0.5
    for a, b in zip(whole(s, t), tail(s[8:], t[8:])):
        assert torch.equal(a[8:], b)
    assert not torch.equal(whole.W(0.7)[:4], tail.W(0.7))
    with pytest.raises(ValueError, match="sample_offset"):
        deb.VirtualBrownianTree(0.0, 1.0, (4, 2), sample_offset=-1)


@pytest.fixture(params=["fused", "eager"])
def tree_kernel_modes(request, monkeypatch):
    return _use(request.param, monkeypatch)


def test_increments_from_fused_and_eager_states_agree_in_float32_and_float64(fused):
    s, t = _times(300, seed=6) * 0.5, 0.5 + _times(300, seed=7) * 0.5
    for dtype in (torch.float32, torch.float64):
        bm = deb.VirtualBrownianTree(0.0, 1.0, (300, 2), seed=11, dtype=dtype)
        dw, h = bm(s, t)
        dw_e, h_e = bm.increment_from(s, bm._evaluate_eager(s), t, bm._evaluate_eager(t))
        assert dw.dtype == h.dtype == dtype
        tol = {"rtol": 0, "atol": 1e-13 if dtype == F64 else 1e-6}
        torch.testing.assert_close(dw, dw_e, **tol)
        torch.testing.assert_close(h, h_e, **tol)


def test_environment_switch_selects_the_path(fused, monkeypatch):
    bm = deb.VirtualBrownianTree(0.0, 1.0, (3, 1))
    assert bm.kernel == "fused"
    monkeypatch.setenv(K.ENV_VAR, "eager")
    assert bm.kernel == "eager"
    monkeypatch.setenv(K.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=K.ENV_VAR):
        bm.W(0.5)


def test_solve_builds_its_tree_at_the_resolution_of_dtmin():
    from diffeqbridge.brownian import solve_tol

    assert solve_tol(0.0, 2.0, None) == solve_tol(0.0, 2.0, 0.0) == 2.0 * 2.0**-20
    assert solve_tol(0.0, 2.0, 1e-3) == 1e-3
    assert solve_tol(0.0, 1.0, 1e-300) == 2.0**-52
    bm = deb.VirtualBrownianTree(0.0, 1.0, (8, 1), seed=3, tol=solve_tol(0.0, 1.0, 1e-3))
    assert bm.tol <= 1e-3 < 2 * bm.tol
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: 0.5 * torch.ones_like(y), torch.ones(8, 1, dtype=F64), (0.0, 1.0))
    via_dtmin = deb.solve(prob, deb.EM(), dt=2.0**-6, seed=3, dtmin=1e-3).ys[-1]
    explicit = deb.solve(prob, deb.EM(), dt=2.0**-6, brownian=bm).ys[-1]
    default = deb.solve(prob, deb.EM(), dt=2.0**-6, seed=3).ys[-1]
    assert torch.equal(via_dtmin, explicit)
    # the same path at the dt-grid's dyadic nodes (levels <= 10 are shared by both trees):
    # EM only reads W there, so the default (depth-20) tree gives the same solution
    torch.testing.assert_close(default, explicit, rtol=0, atol=1e-13)


def test_per_sample_reuse_changes_no_bit(fused):
    """Consecutive queries reuse each sample's cached top levels; the values must equal a
    fresh tree's (no cache) for forward steps, rejected-step re-queries and jumps back."""
    batch = 70  # not a multiple of the 8-lane blocks
    g = torch.Generator().manual_seed(12)
    cached = deb.VirtualBrownianTree(0.0, 1.0, (batch, 2), seed=13, tol=2.0**-16)
    t = torch.zeros(batch, dtype=F64)
    for step in range(40):
        h = 10.0 ** (-3 * torch.rand(batch, generator=g, dtype=F64))  # 1e-3 .. 1 (clamped to t1)
        t_new = t + h if step % 7 else t * torch.rand(batch, generator=g, dtype=F64)  # sometimes jump back
        fresh = deb.VirtualBrownianTree(0.0, 1.0, (batch, 2), seed=13, tol=2.0**-16)
        for a, b in zip(cached.evaluate(t_new), fresh.evaluate(t_new)):
            assert torch.equal(a, b)
        t = torch.where(torch.rand(batch, generator=g) < 0.8, t_new, t).clamp(max=1.0)  # 20 % "rejected"
    assert cached._reuse is not None and cached._reuse.valid


def test_select_gives_the_rows_paths_bit_for_bit(tree_kernel_modes):
    """``select(rows)`` (the engine's compacted batch): row ``j`` is row ``rows[j]``'s path,
    with the C kernel's reuse cache gathered (warm, then stepped on), for selections of
    selections and for ``evaluate_scalar`` (the fixed-step engine's query)."""
    batch = 70
    g = torch.Generator().manual_seed(3)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (batch, 2), seed=21, tol=2.0**-16)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.5
    w_all, j_all = bm.evaluate(t)  # warms the per-sample cache
    rows = torch.tensor([69, 0, 8, 7, 33, 34, 35, 36, 37, 38, 12])
    view = bm.select(rows)
    assert view.shape == (rows.numel(), 2) and view.batch_size == rows.numel()
    assert (view._reuse is not None and view._reuse.valid) == (tree_kernel_modes == "fused")
    for a, b in zip(view.evaluate(t[rows]), (w_all, j_all)):  # all levels from the cache
        assert torch.equal(a, b[rows])
    for _ in range(5):
        t = (t + 10.0 ** (-3 * torch.rand(batch, generator=g, dtype=F64))).clamp(max=1.0)
        fresh = deb.VirtualBrownianTree(0.0, 1.0, (batch, 2), seed=21, tol=2.0**-16).evaluate(t)
        for a, b in zip(view.evaluate(t[rows]), fresh):
            assert torch.equal(a, b[rows])
    inner = torch.tensor([3, 10, 0])
    for a, b in zip(view.select(inner).evaluate(t[rows[inner]]), bm.evaluate(t)):
        assert torch.equal(a, b[rows[inner]])
    w_s, _ = view.evaluate_scalar(0.375)
    assert torch.equal(w_s, bm.evaluate_scalar(0.375)[0][rows])
    with pytest.raises(ValueError, match="rows must be a 1-D"):
        bm.select(rows.reshape(1, -1))


def test_without_a_c_compiler_the_eager_path_runs_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing compiled before
    K.c_library.cache_clear()
    try:
        bm = deb.VirtualBrownianTree(0.0, 1.0, (6, 2), seed=14)
        with pytest.warns(RuntimeWarning, match="could not compile"):
            assert bm.kernel == "eager"
        t = _times(6, seed=8)
        w, j = bm.evaluate(t)
        w_ref, j_ref = bm._evaluate_eager(t)
        assert torch.equal(w, w_ref) and torch.equal(j, j_ref)
        monkeypatch.setenv(K.ENV_VAR, "fused")
        with pytest.raises(RuntimeError, match="could not be compiled"):
            bm.evaluate(t)
    finally:
        K.c_library.cache_clear()  # the next test builds (or finds) the real kernel again


@pytest.mark.parametrize("shape, tol", [((70, 3), 2.0**-7), ((9, 2), 2.0**-40), ((16, 1), 0.5)])
def test_evaluate_grid_equals_evaluate_at_each_time(tree_kernel_modes, shape, tol):
    """``evaluate_grid`` (the fixed-step engine's query: on the C path one ``tree_grid`` call
    that keeps the levels consecutive times share) gives ``evaluate(t)``'s numbers bit for bit
    at every time: increasing, repeated, backwards and jumping times, W-only and with J, a
    batch that is not a multiple of the kernel's 8 lanes, trees deeper than 32 levels."""
    times = [0.0, 0.02, 0.04, 0.04, 0.0601, 0.5, 0.49, 1.0, 0.999999, 0.25, 0.0]
    bm = deb.VirtualBrownianTree(0.0, 1.0, shape, seed=5, tol=tol, sample_offset=3)
    w, j = bm.evaluate_grid(times)
    w_only, none = deb.VirtualBrownianTree(0.0, 1.0, shape, seed=5, tol=tol, sample_offset=3).evaluate_grid(times, levy=False)
    assert none is None and w.shape == (len(times), shape[0], shape[1]) and j is not None
    assert torch.equal(w_only, w)
    for k, t in enumerate(times):
        fresh = deb.VirtualBrownianTree(0.0, 1.0, shape, seed=5, tol=tol, sample_offset=3)
        w_ref, j_ref = fresh.evaluate(torch.full((shape[0],), t, dtype=F64))
        assert torch.equal(w[k], w_ref) and torch.equal(j[k], j_ref), (k, t)


def test_evaluate_grid_of_a_subclass_goes_through_its_evaluate(fused):
    """A subclass that redefines ``evaluate`` (a view, a transformed path) is queried through
    it by ``evaluate_grid`` (one ``evaluate_scalar`` per time, which on the fused path calls
    ``evaluate``), not by the C kernel directly."""

    class Doubled(deb.VirtualBrownianTree):
        def evaluate(self, t):  # type: ignore[override]
            w, j = super().evaluate(t)
            return 2.0 * w, 2.0 * j

    times = [0.0, 0.3, 0.6]
    w, _ = Doubled(0.0, 1.0, (4, 2), seed=1, tol=2.0**-8).evaluate_grid(times, levy=False)
    ref, _ = deb.VirtualBrownianTree(0.0, 1.0, (4, 2), seed=1, tol=2.0**-8).evaluate_grid(times, levy=False)
    assert float(ref[1:].abs().max()) > 0 and torch.equal(w, 2.0 * ref)
