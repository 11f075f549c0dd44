"""Single-seed virtual Brownian tree with space-time Lévy area.

The tree is a dyadic refinement of ``[t0, t1]`` down to cells of width ``w <= tol``.
Every node of the tree carries the increment ``W`` and the space-time Lévy area ``H`` of
its interval; a child is drawn from its exact conditional law given the parent (Foster's
thesis, 2020; Jelinčič et al. 2024).  Splitting an interval of length ``h`` with
``(W, H)`` at its midpoint gives, with independent ``Z ~ N(0, h/16)``, ``X ~ N(0, h/48)``::

    W_left  = W/2 + 3H/2 + Z        H_left  = H/4 - Z/2 + X
    W_right = W/2 - 3H/2 - Z        H_right = H/4 - Z/2 - X

(which inverts ``W = W_l + W_r``, ``H = (H_l + H_r)/2 + (W_l - W_r)/4``).  Inside a finest
cell the point is drawn from the exact Gaussian conditional law given the cell's
``(W, H)``; cells are conditionally independent, so the joint law is exact for query
points at least ``tol`` apart.

What the tree returns for a time ``t`` is the pair ``(W(t), J(t))`` with
``J(t) = int_{t0}^t W(u) du``: a pure function of ``(seed, sample, element, t)``.
Increments and Lévy areas over any ``[s, t]`` follow from two such pairs, so additivity
and Chen's relation hold exactly (up to rounding)::

    dW = W(t) - W(s),   H = (J(t) - J(s)) / (t - s) - W(s) - dW / 2.

The descent is a linear recurrence whose coefficients depend only on the binary digits
of the cell index.  Randomness for a node comes from a counter-based hash of
``(seed, sample index, element, level, node)``: no state, no dependence on batch
composition, step sizes, query order or thread count.  Internally everything is float64;
results are cast to the requested dtype.

Two paths evaluate it (``_tree_kernel.py``, docs/brownian.md):

* fused (default where available): one kernel per query runs the whole recursion per
  (sample, element) in registers -- a small C kernel on the CPU (compiled once with the
  system's C compiler, loaded with ctypes), ``torch.compile`` of the same recursion written
  as elementwise torch code on CUDA.  On the CPU each sample also reuses the top levels it
  shares with its previous query (no value changes).
* eager (fallback; ``DIFFEQBRIDGE_TREE_KERNEL=eager``): torch ops, all levels at once with
  cumulative sums over a level axis for per-sample times, and a batch-shared cached descent
  for :meth:`VirtualBrownianTree.evaluate_scalar`.

Both do the same float64 operations in the same order; they differ only where ``log``,
``sin`` and ``cos`` round differently (measured below 2e-15 relative to the path's scale).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from . import _tree_kernel as K
from ._tree_kernel import MASK32 as _MASK32
from ._tree_kernel import absorb as _absorb
from ._tree_kernel import check_seed
from ._tree_kernel import fmix32_i32 as _fmix32_i32
from ._tree_kernel import standard_normal_pair as _standard_normal_pair

_ROOT_LEVEL = 1_000_003
_CELL_LEVEL = 2_000_003


DEFAULT_LEVELS = 20  # default resolution: (t1 - t0) 2^-20


def solve_tol(t0: float, t1: float, dtmin: float | None) -> float:
    """Resolution of the tree ``deb.solve`` makes when it is given no ``brownian``.

    ``dtmin`` given (> 0): the finest cell is at most ``dtmin`` (and at least
    ``(t1 - t0) 2^-52``), so the joint law of every increment and Lévy area the solve uses
    is exact -- an adaptive step is never shorter than ``dtmin`` (the sample stops with
    ``DtLessThanMin``), and points at least one cell apart never share a finest cell.  A
    coarser ``dtmin`` also gives a shallower, cheaper tree.  Otherwise (``dtmin`` None or 0):
    ``(t1 - t0) 2^-20``, exact for steps down to about ``1e-6 (t1 - t0)``.

    Deliberately not a function of ``atol``, ``rtol`` or ``dt``: the depth is part of the
    path (refining a cell re-draws ``W`` inside it, by about ``sqrt(tol)``), so a depth that
    followed the tolerances would give solves at different tolerances different Brownian
    paths and break convergence studies with one seed.
    """
    span = t1 - t0
    if dtmin is None or not float(dtmin) > 0:
        return span * 2.0**-DEFAULT_LEVELS
    return max(float(dtmin), span * 2.0**-52)


def _exclusive_cumsum(x: Tensor, dim: int = -1) -> Tensor:
    return torch.cumsum(x, dim=dim) - x


def _total(x: Tensor) -> Tensor:
    """Sum over the last axis in a fixed sequential order (independent of thread count)."""
    return torch.cumsum(x, dim=-1)[..., -1]


class VirtualBrownianTree:
    """Brownian motion on ``[t0, t1]`` with space-time Lévy area, from one seed.

    Args:
        t0, t1: the interval.
        shape: ``(B, *noise_shape)``: the batch axis first.
        seed: the only source of randomness.
        tol: finest resolution: the joint law is exact for query points at least ``tol``
            apart.  Default ``(t1 - t0) * 2**-20`` (about ``1e-6 (t1 - t0)``).
        dtype: dtype of the returned increments (computation is float64).
        device: device of the returned tensors.
        sample_offset: global index of row 0: row ``i`` draws the path of sample
            ``sample_offset + i`` (a batch of an ensemble, :func:`diffeqbridge.solve_ensemble`,
            gets exactly the paths those samples have in one big batch).

    Call ``bm(s, t)`` with scalars or ``(B,)`` tensors to get ``(dW, H)`` of shape
    ``shape``; ``bm.W(t)`` gives ``W(t) - W(t0)``.
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        shape: tuple[int, ...] | torch.Size,
        seed: int = 0,
        tol: float | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        sample_offset: int = 0,
    ):
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0:
            raise ValueError(f"VirtualBrownianTree needs finite t0 < t1; got t0={t0}, t1={t1}")
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)  # a batch of scalar Brownian motions
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"shape must be an int or a tuple (B, *noise_shape); got {shape!r}") from exc
        if len(shape) < 1 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be (B, *noise_shape) with positive sizes; got {shape}")
        seed = check_seed(seed)
        sample_offset = check_seed(sample_offset, "sample_offset")
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be a floating dtype; got {dtype}")
        length = t1 - t0
        if tol is None:
            tol = length * 2.0**-DEFAULT_LEVELS
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be positive and finite; got {tol}")
        self.t0, self.t1, self.shape, self.seed, self.sample_offset = t0, t1, shape, seed, sample_offset
        self.depth = max(1, math.ceil(math.log2(length / tol) - 1e-9))
        if self.depth > 52:
            raise ValueError(f"tol={tol} is too fine for float64 times on [{t0}, {t1}] (depth {self.depth} > 52)")
        self.tol = length * 2.0**-self.depth
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = shape[0]
        self.n_elements = math.prod(shape[1:])
        self._wide = self.depth > 32
        self._levels = torch.arange(self.depth, device=self.device)
        self._element_keys = self._make_element_keys()
        self._level_keys = self._level_key(self._levels)  # (L,)
        self._root_key = self._level_key(_ROOT_LEVEL)
        self._cell_key = self._level_key(_CELL_LEVEL)
        self._cell_key_int = int(self._cell_key)
        self._root: tuple[Tensor, Tensor] | None = None  # (W, H) of [t0, t1]: a constant, drawn once
        # per-level constants (K.LEVEL_COLUMNS), float64, shared by every path
        table = torch.tensor(K.level_table(length, self.depth, self.depth), dtype=torch.float64, device=self.device)
        (self._sq16, self._sq48, self._four_pow4, self._inv_pow4, self._two_pow2, self._inv_pow2, self._half_widths) = (
            table.unbind(1)
        )
        self._level_consts = [(int(key), *row) for key, row in zip(self._level_keys.tolist(), table.tolist())]
        n_cells = 2**self.depth
        width = length / n_cells
        self._cell = (width, width**2, width**3)  # finest cell width and its powers
        # the fused kernel's inputs (K.fused_point), built on first use
        self._padded = K.padded_depth(self.depth)
        self._fused_args: dict[bool, tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, bool]] = {}
        self._reuse: K.ReuseCache | None = None  # per-sample reuse of the C kernel (K.ReuseCache)
        # evaluate_scalar's cache: the last path's digits and per-level running sums
        self._path_digits: list[tuple[int, int]] = []
        self._path_sums: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # each (L, B, N)
        self._path_last: tuple[Tensor, Tensor] | None = None  # (W, H) of the last path's finest cell
        self._path_has_j = True
        self._memo: list[tuple[tuple[float, bool], tuple[Tensor, Tensor | None]]] = []
        self._cell_normals: tuple[int, tuple[Tensor, Tensor] | None] = (-1, None)

    # ------------------------------------------------------------------ keys
    def _make_element_keys(self) -> Tensor:
        """Two 32-bit keys per (sample, element), int32 of shape ``(2, B, N)``; sample ``i``
        of this tree is sample ``sample_offset + i`` of the seed's ensemble."""
        sample = self.sample_offset + torch.arange(self.batch_size, device=self.device).unsqueeze(1)
        element = torch.arange(self.n_elements, device=self.device).unsqueeze(0)
        base = torch.full((self.batch_size, self.n_elements), 0x2545F491, device=self.device, dtype=torch.int64)
        for word in (self.seed & _MASK32, self.seed >> 32):
            base = _absorb(base, word)
        base = _absorb(_absorb(_absorb(base, sample & _MASK32), sample >> 32), element)
        return torch.stack([base, K.fmix32(base ^ 0x5BD1E995)]).to(torch.int32)  # (2, B, N), wraps

    def _level_key(self, level: Tensor | int) -> Tensor:
        start = torch.as_tensor(0x1B873593, dtype=torch.int64, device=self.device)
        return _absorb(_absorb(start, torch.as_tensor(level, device=self.device)), 0x68E31DA4)

    def _normals(self, level_key: Tensor, node: Tensor) -> tuple[Tensor, Tensor]:
        """Standard normals for nodes ``node`` (``(B, ...)``) -> each ``(B, N, ...)``.

        ``level_key`` broadcasts against ``node``.  A node's randomness is a hash of
        (seed, sample, element, level, node index) and nothing else: the node key
        ``node * phi + level_key (mod 2^32)`` is injective within a level (``phi`` odd),
        and the element keys are mixed in by MurmurHash3's finalizer.
        """
        key = K.node_key(node, level_key, self._wide).unsqueeze(1)  # (B, 1, ...)
        keys = self._element_keys.reshape(self._element_keys.shape + (1,) * (node.ndim - 1))
        return _standard_normal_pair(_fmix32_i32(keys ^ key))

    # ------------------------------------------------------------- evaluation
    def _times(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        if t.ndim == 0:
            t = t.expand(self.batch_size)
        if t.shape != (self.batch_size,):
            raise ValueError(f"query times must be scalars or of shape ({self.batch_size},); got {tuple(t.shape)}")
        return t.to(torch.float64)

    @property
    def kernel(self) -> str:
        """The path :meth:`evaluate` takes: ``"fused"`` (one kernel per query: C on the CPU,
        Triton through ``torch.compile`` on CUDA) or ``"eager"`` (torch ops; forced by the
        environment variable ``DIFFEQBRIDGE_TREE_KERNEL=eager``)."""
        return "eager" if K.choose(self.device, self._padded) == "eager" else "fused"

    def evaluate(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(W(t) - W(t0), int_{t0}^t (W(u) - W(t0)) du)``, each ``(B, N)`` float64.

        Times outside ``[t0, t1]`` are clamped to it.  Runs the fused kernel where it is
        available (:attr:`kernel`), else the eager descent; both give the same numbers up
        to the last bits of ``log``, ``sin`` and ``cos`` (docs/brownian.md).
        """
        t = self._times(t).detach()
        path = K.choose(self.device, self._padded)
        if path == "c":
            kernel = K.c_kernel()
            assert kernel is not None
            return K.run_c(kernel, t, *self._fused_inputs(padded=False), reuse=self._reuse_cache())
        if path == "compile":
            return K.run_compiled(
                self._padded,
                self.device,
                lambda: self._evaluate_eager(t),
                t,
                self._element_keys,
                *self._root_increment(),
                *self._fused_inputs(padded=True)[4:7],
                self._padded,
                self._cell_key_int,
                self._wide,
            )
        return self._evaluate_eager(t)

    @property
    def traceable(self) -> bool:
        """Whether :meth:`evaluate_op` and :meth:`increment_op` apply: the fused C kernel on
        the CPU (read at call time, like :attr:`kernel`)."""
        return self.device.type == "cpu" and K.choose(self.device) == "c"

    def evaluate_op(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`evaluate` (``t`` ``(B,)``) through the C kernel registered as a torch custom
        op (:func:`K.tree_point_op`), which ``torch.compile`` keeps as one node of its graph;
        the same kernel, so the same bits.  Only where :attr:`traceable`."""
        cache = self._reuse_cache()
        tensors = cache.tensors() if cache is not None else K._NO_CACHE
        return K.tree_point_op(self._times(t).detach().contiguous(), *self._fused_inputs(padded=False), *tensors)

    def increment_op(
        self, s: Tensor, state_s: tuple[Tensor, Tensor], t: Tensor, state_t: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """:meth:`increment_from` through the custom op :func:`K.tree_increment_op` (the C
        loop of the fused path); only where :attr:`traceable`."""
        dw, levy = K.tree_increment_op(self.t0, self.t1, self._times(s), self._times(t), *state_s, *state_t)
        return self._shape_out(dw), self._shape_out(levy)

    def _reuse_cache(self) -> K.ReuseCache | None:
        """The C kernel's per-sample reuse state (None when it would exceed its memory budget)."""
        count = self.batch_size * self.n_elements
        if self._reuse is None and K.ReuseCache.affordable(self.depth, count):
            self._reuse = K.ReuseCache(self.depth, count)
        return self._reuse

    def _fused_inputs(self, padded: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, bool]:
        """The fused kernels' inputs: ``(key0, key1, w_root, h_root, levels, level_keys,
        geometry, cell_key, wide)``; ``levels``/``level_keys`` padded to :attr:`_padded`
        levels for the ``torch.compile`` path (:func:`K.fused_point`)."""
        if self._fused_args.get(padded) is None:
            rows = self._padded if padded else self.depth
            length = self.t1 - self.t0
            levels = torch.tensor(K.level_table(length, self.depth, rows), dtype=torch.float64, device=self.device)
            pad = torch.zeros(rows - self.depth, dtype=torch.int64, device=self.device)
            keys = torch.cat([pad, self._level_keys]).contiguous()
            geometry = torch.tensor([self.t0, length, float(2**self.depth), *self._cell], dtype=torch.float64, device=self.device)
            key0, key1 = (k.contiguous() for k in self._element_keys.unbind(0))
            self._fused_args[padded] = (
                key0,
                key1,
                *self._root_increment(),
                levels,
                keys,
                geometry,
                self._cell_key_int,
                self._wide,
            )
        return self._fused_args[padded]

    def _evaluate_eager(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`evaluate` op by op: the level recursion as cumulative sums over a level axis."""
        cell, cell_fraction = K.locate(t, self.t0, self.t1 - self.t0, float(2**self.depth))
        cell_fraction = cell_fraction.unsqueeze(1)  # (B, 1)

        shifts = self.depth - self._levels  # (L,)
        node = cell.unsqueeze(1) >> shifts  # (B, L): index of the node split at level k
        goes_right = ((cell.unsqueeze(1) >> (shifts - 1)) & 1).double().unsqueeze(1)  # (B, 1, L)
        sign = 1.0 - 2.0 * goes_right

        w_root, h_root = self._root_increment()  # (B, N)

        z, x = self._normals(self._level_keys, node)  # (B, N, L)
        z = z * self._sq16
        x = x * self._sq48

        # H_{k+1} = H_k/4 - Z_k/2 + s_k X_k, solved as 4^k H_k = H_0 + sum_{j<k} 4^{j+1} e_j
        # (the same operations as K.level_update, all levels at once).
        h_increments = self._four_pow4 * (-0.5 * z + sign * x)
        levy = (h_root.unsqueeze(-1) + _exclusive_cumsum(h_increments)) * self._inv_pow4  # H_k, (B, N, L)
        # W_{k+1} = W_k/2 + s_k (3 H_k/2 + Z_k), solved as 2^k W_k = W_0 + sum_{j<k} 2^{j+1} (...).
        w_increments = self._two_pow2 * sign * (1.5 * levy + z)
        w_node = (w_root.unsqueeze(-1) + _exclusive_cumsum(w_increments)) * self._inv_pow2  # W_k

        w_left = 0.5 * w_node + 1.5 * levy + z  # increment over the left child
        h_left = 0.25 * levy - 0.5 * z + x
        left_contrib = goes_right * w_left
        w_at_start = _exclusive_cumsum(left_contrib)  # W(a_k) at each level's left end
        j_contrib = goes_right * self._half_widths * (w_at_start + h_left + 0.5 * w_left)
        w_cell_start = _total(left_contrib)
        j_cell_start = _total(j_contrib)

        last_sign = sign[..., -1]
        w_cell = 0.5 * w_node[..., -1] + last_sign * (1.5 * levy[..., -1] + z[..., -1])
        h_cell = 0.25 * levy[..., -1] - 0.5 * z[..., -1] + last_sign * x[..., -1]

        r = cell_fraction * self._cell[0]
        w_part, h_part = K.bridge(r, *self._cell, w_cell, h_cell, *self._normals(self._cell_key, cell))
        w_t = w_cell_start + w_part
        j_t = j_cell_start + r * w_cell_start + r * (h_part + 0.5 * w_part)
        return w_t, j_t

    def _root_increment(self) -> tuple[Tensor, Tensor]:
        """``(W, H)`` of the whole interval, ``(B, N)`` each (drawn once, then cached)."""
        if self._root is None:
            z_root, x_root = self._normals(self._root_key, torch.zeros(self.batch_size, dtype=torch.long, device=self.device))
            length = self.t1 - self.t0
            self._root = ((math.sqrt(length) * z_root).contiguous(), (math.sqrt(length / 12.0) * x_root).contiguous())
        return self._root

    def _normals_shared(self, level_key: int, node: int) -> tuple[Tensor, Tensor]:
        """:meth:`_normals` for one node index shared by the whole batch -> each ``(B, N)``."""
        key = int(K.node_key(torch.tensor(node, dtype=torch.int64), level_key, self._wide))
        return K.node_normals(self._element_keys, key)

    def evaluate_scalar(self, t: float, levy: bool = True) -> tuple[Tensor, Tensor | None]:
        """:meth:`evaluate` at one time shared by the whole batch (a Python float): the same
        numbers as ``evaluate(torch.full((B,), t))`` on either path.

        The fused path simply runs the kernel.  The eager path is faster than its per-sample
        descent: every sample descends the same nodes, so the levels this path shares with
        the previous call's (consecutive steps of a solve share all but the deepest few) are
        taken from a cache, and only the others are redrawn (:meth:`_descend`).  Used by the
        engine for fixed-step solves and by the backward passes of the adjoints.
        ``levy=False`` skips the integral ``J`` on the eager path (returned as None either
        way; ``W`` is unchanged) for solvers that do not use the Lévy area.
        """
        t = float(t)
        want_j = bool(levy)
        for key, value in self._memo:  # the last two answers (adjoints ask for each time twice)
            if key[0] == t and (key[1] or not want_j):
                return value if want_j else (value[0], None)
        if K.choose(self.device, self._padded) != "eager":
            w_t, j_t = self.evaluate(torch.full((self.batch_size,), t, dtype=torch.float64, device=self.device))
            self._memo = [((t, True), (w_t, j_t)), *self._memo[:1]]
            return (w_t, j_t) if want_j else (w_t, None)
        length = self.t1 - self.t0
        n_cells = 2**self.depth
        position = min(max((t - self.t0) / length, 0.0), 1.0) * n_cells
        cell = min(math.floor(position), n_cells - 1)
        fraction = position - cell
        w_root, h_root = self._root_increment()
        depth = self.depth
        digits = [((cell >> (depth - k)), (cell >> (depth - k - 1)) & 1) for k in range(depth)]
        start = 0
        old = self._path_digits
        while start < len(old) and old[start] == digits[start]:
            start += 1
        if want_j and not self._path_has_j:
            start = 0  # the cached levels were drawn without J's sums
        if start < depth:
            self._path_has_j = want_j
            self._descend(start, digits, w_root, h_root)
        assert self._path_last is not None and self._path_sums is not None
        w_cell, h_cell = self._path_last
        w_cell_start, j_cell_start = self._path_sums[2][-1], self._path_sums[3][-1]
        # (B, 1) like the vectorised path
        r = torch.full((self.batch_size, 1), fraction, dtype=torch.float64, device=self.device) * self._cell[0]
        if self._cell_normals[0] != cell:
            self._cell_normals = (cell, self._normals_shared(self._cell_key_int, cell))
        normals = self._cell_normals[1]
        assert normals is not None
        if not want_j:
            result: tuple[Tensor, Tensor | None] = (w_cell_start + K.bridge_w(r, *self._cell, w_cell, h_cell, normals[0]), None)
        else:
            w_part, h_part = K.bridge(r, *self._cell, w_cell, h_cell, *normals)
            w_t = w_cell_start + w_part
            result = (w_t, j_cell_start + r * w_cell_start + r * (h_part + 0.5 * w_part))
        self._memo = [((t, want_j), result), *self._memo[:1]]
        return result

    def evaluate_grid(self, times: list[float], levy: bool = True) -> tuple[Tensor, Tensor | None]:
        """:meth:`evaluate_scalar` at every time of ``times`` (Python floats shared by the
        batch, e.g. a fixed-step solve's grid), stacked: ``(W, J)`` each ``(T, B, N)`` float64,
        ``J`` None when not ``levy``.  The same numbers as ``evaluate_scalar(t)`` (hence as
        :meth:`evaluate`) for each ``t``, bit for bit.

        On the CPU's C kernel one call answers the whole grid: each block of elements walks
        the times in order and redraws only the levels below the deepest common ancestor of
        consecutive times (``tree_grid`` in ``_tree_kernel.c``).  Elsewhere, and for
        subclasses that redefine :meth:`evaluate_scalar` or :meth:`evaluate` (views of a
        tree), one :meth:`evaluate_scalar` per time.
        """
        times = [float(t) for t in times]
        cls = type(self)
        own = cls.evaluate_scalar is VirtualBrownianTree.evaluate_scalar and cls.evaluate is VirtualBrownianTree.evaluate
        if own and self.device.type == "cpu" and times and K.choose(self.device, self._padded) == "c":
            out = K.run_c_grid(times, *self._fused_inputs(padded=False), want_j=bool(levy))
            if out is not None:
                return out
        points = [self.evaluate_scalar(t, levy=levy) for t in times]
        w = torch.stack([p[0] for p in points])
        return w, torch.stack([p[1] for p in points]) if levy else None  # type: ignore[misc]

    def _descend(self, start: int, digits: list[tuple[int, int]], w_root: Tensor, h_root: Tensor) -> None:
        """Redo the descent of :meth:`evaluate` for levels ``start..depth-1`` of the path
        ``digits`` (node index, goes-right bit per level) shared by the batch, all levels at
        once, continuing the running sums of the cached levels ``< start``.  A cumulative sum
        is resumed by prepending the cached sum, so the additions happen in the same order as
        in :meth:`evaluate` (bit-identical results)."""
        dev = self.device
        levels = slice(start, self.depth)
        n = self.depth - start
        if self._path_sums is None:
            self._path_sums = tuple(torch.empty((self.depth, *w_root.shape), dtype=torch.float64, device=dev) for _ in range(4))  # type: ignore[assignment]
        if n <= 4:  # a few levels: one at a time on contiguous (B, N) tensors is faster
            self._descend_levels(start, digits, w_root, h_root)
            return
        col = (n, 1, 1)  # level-major layout (n, B, N): each level's slice is contiguous
        nodes = torch.tensor([d[0] for d in digits[levels]], dtype=torch.int64, device=dev)
        goes_right = torch.tensor([float(d[1]) for d in digits[levels]], dtype=torch.float64, device=dev).reshape(col)
        sign = 1.0 - 2.0 * goes_right
        node_key = K.node_key(nodes, self._level_keys[levels], self._wide)
        keys = self._element_keys.unsqueeze(1)  # (2, 1, B, N)
        z, x = _standard_normal_pair(_fmix32_i32(keys ^ node_key.reshape(1, *col)))  # (n, B, N)
        z = z * self._sq16[levels].reshape(col)
        x = x * self._sq48[levels].reshape(col)
        sums = self._path_sums
        assert sums is not None

        def resume(i: int, increments: Tensor) -> Tensor:
            """Inclusive cumulative sum over levels continuing the cached sum of level start-1."""
            prefix = sums[i][start - 1 : start] if start > 0 else torch.zeros_like(increments[:1])
            total = torch.cumsum(torch.cat([prefix, increments]), dim=0)[1:]
            sums[i][start:] = total  # the cache only: nothing returned is a view of it
            return total

        h_increments = self._four_pow4[levels].reshape(col) * (-0.5 * z + sign * x)
        levy = (h_root + (resume(0, h_increments) - h_increments)) * self._inv_pow4[levels].reshape(col)
        w_increments = self._two_pow2[levels].reshape(col) * sign * (1.5 * levy + z)
        w_node = (w_root + (resume(1, w_increments) - w_increments)) * self._inv_pow2[levels].reshape(col)
        w_left = 0.5 * w_node + 1.5 * levy + z
        h_left = 0.25 * levy - 0.5 * z + x
        left_contrib = goes_right * w_left
        w_at_start = resume(2, left_contrib) - left_contrib
        if self._path_has_j:
            resume(3, goes_right * self._half_widths[levels].reshape(col) * (w_at_start + h_left + 0.5 * w_left))
        self._path_digits = list(digits)
        last_sign = sign[-1]
        self._path_last = (
            0.5 * w_node[-1] + last_sign * (1.5 * levy[-1] + z[-1]),
            0.25 * levy[-1] - 0.5 * z[-1] + last_sign * x[-1],
        )

    def _descend_levels(self, start: int, digits: list[tuple[int, int]], w_root: Tensor, h_root: Tensor) -> None:
        """:meth:`_descend` one level at a time (:func:`K.level_update`, the same operations)."""
        path_sums = self._path_sums
        assert path_sums is not None
        if start == 0:
            zero = torch.zeros_like(w_root)
            sums = (zero, zero, zero, zero)
        else:
            sums = tuple(buffer[start - 1] for buffer in path_sums)  # type: ignore[assignment]
        child = (w_root, h_root)
        for k in range(start, self.depth):
            node, right = digits[k]
            level_key, *consts = self._level_consts[k]
            z, x = self._normals_shared(level_key, node)
            sums, child = K.level_update(sums, (w_root, h_root), z, x, float(right), tuple(consts))
            for buffer, value in zip(path_sums, sums):
                buffer[k] = value
        self._path_digits = list(digits)
        self._path_last = child

    # ----------------------------------------------------------------- public
    def select(self, rows: Tensor) -> VirtualBrownianTree:
        """The tree of rows ``rows`` of this batch: ``(M,)`` int64 indices, row ``j`` of the
        result is the path of row ``rows[j]`` here (same numbers bit for bit, on every kernel
        path: a path is a pure function of seed and sample index).  The keys, the root
        increment and the C kernel's per-sample reuse cache are gathered, so a compacted
        batch (:mod:`diffeqbridge.engine`, ``solve(..., compact=f)``) queries only its rows."""
        rows = rows.to(device=self.device, dtype=torch.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be a 1-D index tensor; got shape {tuple(rows.shape)}")
        view = copy.copy(self)
        view.batch_size = rows.numel()
        view.shape = (view.batch_size, *self.shape[1:])
        view._element_keys = self._element_keys.index_select(1, rows)
        view._root = None if self._root is None else (self._root[0].index_select(0, rows), self._root[1].index_select(0, rows))
        view._fused_args = {}
        view._reuse = None
        if self._reuse is not None:
            lanes = (rows.unsqueeze(1) * self.n_elements + torch.arange(self.n_elements, device=self.device)).flatten()
            view._reuse = self._reuse.select(lanes.cpu())
        view._path_digits, view._path_sums, view._path_last, view._path_has_j = [], None, None, True
        view._memo, view._cell_normals = [], (-1, None)
        return view

    def _shape_out(self, x: Tensor) -> Tensor:
        return x.reshape(self.shape).to(self.dtype)

    def increment_from(
        self, s: Tensor | float, state_s: tuple[Tensor, Tensor], t: Tensor | float, state_t: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(dW, H)`` over ``[s, t]`` from two results of :meth:`evaluate`, shaped ``shape``."""
        lo, hi = self._times(s), self._times(t)
        if self.device.type == "cpu" and K.choose(self.device) == "c":
            out = K.increment_c(self.t0, self.t1, lo.contiguous(), hi.contiguous(), state_s, state_t)
            if out is not None:
                return self._shape_out(out[0]), self._shape_out(out[1])
        w_s, j_s = state_s
        w_t, j_t = state_t
        h = (hi.clamp(self.t0, self.t1) - lo.clamp(self.t0, self.t1)).unsqueeze(1)
        nonzero = h != 0
        safe_h = torch.where(nonzero, h, torch.ones_like(h))
        dw = w_t - w_s
        levy = torch.where(nonzero, (j_t - j_s) / safe_h - w_s - 0.5 * dw, torch.zeros_like(dw))
        return self._shape_out(dw), self._shape_out(levy)

    def __call__(self, s: Tensor | float, t: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """Increment ``W(t) - W(s)`` and space-time Lévy area ``H_{s,t}``, each ``shape``.

        ``H_{s,t} = (1/(t-s)) int_s^t (W_u - W_s) du - (W_t - W_s)/2 ~ N(0, (t-s)/12)``,
        independent of the increment.  ``bm(t)`` alone is ``bm(t0, t)`` (torchsde's ``bm(t)``,
        diffrax's ``evaluate(t)``).  Host times outside ``[t0, t1]`` (beyond rounding) raise
        ``ValueError``; tensor times are clamped to it (no host sync).
        """
        if t is None:
            s, t = self.t0, s
        self._check_query("s", s)
        self._check_query("t", t)
        return self.increment_from(s, self.evaluate(s), t, self.evaluate(t))

    def _check_query(self, name: str, value: Tensor | float) -> None:
        """Refuse a host query time (a number, a list, a NumPy value or array) outside
        ``[t0, t1]``: the tree would clamp it and return the increment of a shorter interval
        (wrong variance) without a word.  Tensors are not checked (no host sync)."""
        if isinstance(value, Tensor):
            return
        slack = 64 * torch.finfo(torch.float64).eps * max(abs(self.t0), abs(self.t1), 1.0)
        if isinstance(value, (int, float)) and self.t0 - slack <= value <= self.t1 + slack:
            return  # the common case, without building a tensor
        try:
            times = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a number or a tensor of times; got {type(value).__name__}") from exc
        outside = ~((times >= self.t0 - slack) & (times <= self.t1 + slack))
        if bool(outside.any()):
            raise ValueError(
                f"{name} must lie inside the tree's interval [t0, t1] = [{self.t0}, {self.t1}]; "
                f"got {float(times[outside].reshape(-1)[0])} "
                "(build the VirtualBrownianTree over the whole span queried)"
            )

    def increment_scalar(self, s: float, t: float) -> Tensor:
        """``W(t) - W(s)`` for times shared by the batch, shaped ``shape`` (the ``dW`` of
        :meth:`__call__`, through :meth:`evaluate_scalar` without the Lévy area)."""
        self._check_query("s", s)
        self._check_query("t", t)
        w_s, _ = self.evaluate_scalar(s, levy=False)
        w_t, _ = self.evaluate_scalar(t, levy=False)
        return self._shape_out(w_t - w_s)

    def W(self, t: Tensor | float) -> Tensor:
        """``W(t) - W(t0)`` of shape ``shape``; a Python-number ``t`` outside ``[t0, t1]`` raises."""
        self._check_query("t", t)
        return self._shape_out(self.evaluate(t)[0])

    def __repr__(self) -> str:
        return (
            f"VirtualBrownianTree(t0={self.t0}, t1={self.t1}, shape={self.shape}, seed={self.seed}, "
            f"tol={self.tol:.3g}, depth={self.depth})"
        )
