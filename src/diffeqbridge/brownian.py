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
of the cell index; it is evaluated for all levels at once with cumulative sums over a
level axis, not with a Python loop over levels.  Randomness for a node comes from a
counter-based hash of ``(seed, sample index, element, level, node)``: no state, no
dependence on batch composition, step sizes, query order or thread count.
Internally everything is float64; results are cast to the requested dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_ROOT_LEVEL = 1_000_003
_CELL_LEVEL = 2_000_003
_TWO_PI = 2.0 * math.pi


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values in ``[0, 2^32)``."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _absorb(h: Tensor, value: Tensor | int) -> Tensor:
    """Mix a non-negative integer (< 2^32) into a 32-bit hash state."""
    return _fmix32(((h ^ value) + 0x9E3779B9) & _MASK32)


_C1_I32 = 0x85EBCA6B - (1 << 32)  # the same multipliers as signed 32-bit integers
_C2_I32 = 0xC2B2AE35 - (1 << 32)


def _fmix32_i32(h: Tensor) -> Tensor:
    """:func:`_fmix32` on int32 tensors (two's-complement wrap-around multiplication;
    the masks make the right shifts logical).  Bit-identical to the int64 version."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1_I32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2_I32
    return h ^ ((h >> 16) & 0xFFFF)


def _standard_normal_pair(words: Tensor) -> tuple[Tensor, Tensor]:
    """Two independent N(0,1) float64 draws from random int32 words ``(2, ...)`` (Box–Muller)."""
    uniform = (words.double() + (2.0**31 + 0.5)) * 2.0**-32  # in (0, 1): log is finite
    u1, u2 = uniform[0], uniform[1]
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = _TWO_PI * u2
    return radius * torch.cos(angle), radius * torch.sin(angle)


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
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64) (the tree hashes two 32-bit words); got {seed!r}")
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be a floating dtype; got {dtype}")
        length = t1 - t0
        if tol is None:
            tol = length * 2.0**-20
        if not (tol > 0):
            raise ValueError(f"tol must be positive; got {tol}")
        self.t0, self.t1, self.shape, self.seed = t0, t1, shape, seed
        self.depth = max(1, math.ceil(math.log2(length / tol) - 1e-9))
        if self.depth > 52:
            raise ValueError(f"tol={tol} is too fine for float64 times on [{t0}, {t1}] (depth {self.depth} > 52)")
        self.tol = length * 2.0**-self.depth
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = shape[0]
        self.n_elements = math.prod(shape[1:])
        self._levels = torch.arange(self.depth, device=self.device)
        self._level_widths = length * torch.pow(
            torch.tensor(2.0, dtype=torch.float64, device=self.device), -self._levels.double()
        )
        self._element_keys = self._make_element_keys()
        self._level_keys = self._level_key(self._levels)  # (L,)
        self._root_key = self._level_key(_ROOT_LEVEL)
        self._cell_key = self._level_key(_CELL_LEVEL)
        self._root: tuple[Tensor, Tensor] | None = None  # (W, H) of [t0, t1]: a constant, drawn once
        # evaluate_scalar's cache: the last path's digits and per-level running sums
        self._path_digits: list[tuple[int, int]] = []
        self._path_sums: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # each (L, B, N)
        self._path_last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        pow4 = torch.pow(torch.tensor(4.0, dtype=torch.float64, device=self.device), self._levels.double())
        pow2 = torch.sqrt(pow4)
        # per-level constants: the same float64 values the vectorised descent uses
        self._sq16 = torch.sqrt(self._level_widths / 16.0)
        self._sq48 = torch.sqrt(self._level_widths / 48.0)
        self._four_pow4, self._pow4 = 4.0 * pow4, pow4
        self._two_pow2, self._pow2 = 2.0 * pow2, pow2
        self._half_widths = 0.5 * self._level_widths
        self._path_has_j = True
        self._memo: list[tuple[tuple[float, bool], tuple[Tensor, Tensor | None]]] = []
        self._cell_normals: tuple[int, tuple[Tensor, Tensor] | None] = (-1, None)
        self._cell_key_int = int(self._cell_key)
        self._level_consts = [
            (int(key), float(a), float(b), float(c), float(d), float(e), float(f), float(g))
            for key, a, b, c, d, e, f, g in zip(self._level_keys, self._sq16, self._sq48, self._four_pow4, self._pow4,
                                                  self._two_pow2, self._pow2, self._half_widths)
        ]

    # ------------------------------------------------------------------ keys
    def _make_element_keys(self) -> Tensor:
        """Two 32-bit keys per (sample, element), int32 of shape ``(2, B, N)``."""
        sample = torch.arange(self.batch_size, device=self.device).unsqueeze(1)
        element = torch.arange(self.n_elements, device=self.device).unsqueeze(0)
        base = torch.full((self.batch_size, self.n_elements), 0x2545F491, device=self.device, dtype=torch.int64)
        for word in (self.seed & _MASK32, self.seed >> 32):
            base = _absorb(base, word)
        base = _absorb(_absorb(_absorb(base, sample & _MASK32), sample >> 32), element)
        return torch.stack([base, _fmix32(base ^ 0x5BD1E995)]).to(torch.int32)  # (2, B, N), wraps

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
        node_key = (node * 0x9E3779B1 + level_key) & _MASK32
        if self.depth > 32:
            node_key = _absorb(node_key, node >> 32)
        node_key = node_key.to(torch.int32).unsqueeze(1)  # (B, 1, ...)
        keys = self._element_keys.reshape(self._element_keys.shape + (1,) * (node.ndim - 1))
        return _standard_normal_pair(_fmix32_i32(keys ^ node_key))

    # ------------------------------------------------------------- evaluation
    def _times(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        if t.ndim == 0:
            t = t.expand(self.batch_size)
        if t.shape != (self.batch_size,):
            raise ValueError(f"query times must be scalars or of shape ({self.batch_size},); got {tuple(t.shape)}")
        return t.to(torch.float64)

    def evaluate(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(W(t) - W(t0), int_{t0}^t (W(u) - W(t0)) du)``, each ``(B, N)`` float64.

        Times outside ``[t0, t1]`` are clamped to it.
        """
        t = self._times(t)
        length = self.t1 - self.t0
        n_cells = 2**self.depth
        position = ((t - self.t0) / length).clamp(0.0, 1.0) * n_cells
        cell = torch.floor(position).clamp(max=n_cells - 1)
        cell_fraction = (position - cell).unsqueeze(1)  # (B, 1)
        cell = cell.long()

        shifts = self.depth - self._levels  # (L,)
        node = cell.unsqueeze(1) >> shifts  # (B, L): index of the node split at level k
        goes_right = ((cell.unsqueeze(1) >> (shifts - 1)) & 1).double().unsqueeze(1)  # (B, 1, L)
        sign = 1.0 - 2.0 * goes_right

        w_root, h_root = self._root_increment()  # (B, N)

        z, x = self._normals(self._level_keys, node)  # (B, N, L)
        widths = self._level_widths  # (L,)
        z = z * torch.sqrt(widths / 16.0)
        x = x * torch.sqrt(widths / 48.0)

        # H_{k+1} = H_k/4 - Z_k/2 + s_k X_k, solved as 4^k H_k = H_0 + sum_{j<k} 4^{j+1} e_j.
        pow4 = torch.pow(torch.tensor(4.0, dtype=torch.float64, device=self.device), self._levels.double())
        h_increments = 4.0 * pow4 * (-0.5 * z + sign * x)
        levy = (h_root.unsqueeze(-1) + _exclusive_cumsum(h_increments)) / pow4  # H_k, (B, N, L)
        # W_{k+1} = W_k/2 + s_k (3 H_k/2 + Z_k), solved as 2^k W_k = W_0 + sum_{j<k} 2^{j+1} (...).
        pow2 = torch.sqrt(pow4)
        w_increments = 2.0 * pow2 * sign * (1.5 * levy + z)
        w_node = (w_root.unsqueeze(-1) + _exclusive_cumsum(w_increments)) / pow2  # W_k

        w_left = 0.5 * w_node + 1.5 * levy + z  # increment over the left child
        h_left = 0.25 * levy - 0.5 * z + x
        left_contrib = goes_right * w_left
        w_at_start = _exclusive_cumsum(left_contrib)  # W(a_k) at each level's left end
        j_contrib = goes_right * (0.5 * widths) * (w_at_start + h_left + 0.5 * w_left)
        w_cell_start = _total(left_contrib)
        j_cell_start = _total(j_contrib)

        last_sign = sign[..., -1]
        w_cell = 0.5 * w_node[..., -1] + last_sign * (1.5 * levy[..., -1] + z[..., -1])
        h_cell = 0.25 * levy[..., -1] - 0.5 * z[..., -1] + last_sign * x[..., -1]

        cell_width = length / n_cells
        w_part, h_part = self._bridge_in_cell(cell, cell_fraction * cell_width, cell_width, w_cell, h_cell)
        r = cell_fraction * cell_width
        w_t = w_cell_start + w_part
        j_t = j_cell_start + r * w_cell_start + r * (h_part + 0.5 * w_part)
        return w_t, j_t

    def _root_increment(self) -> tuple[Tensor, Tensor]:
        """``(W, H)`` of the whole interval, ``(B, N)`` each (drawn once, then cached)."""
        if self._root is None:
            z_root, x_root = self._normals(self._root_key, torch.zeros(self.batch_size, dtype=torch.long, device=self.device))
            length = self.t1 - self.t0
            self._root = (math.sqrt(length) * z_root, math.sqrt(length / 12.0) * x_root)
        return self._root

    def _normals_shared(self, level_key: int, node: int) -> tuple[Tensor, Tensor]:
        """:meth:`_normals` for one node index shared by the whole batch -> each ``(B, N)``."""
        node_key = (node * 0x9E3779B1 + level_key) & _MASK32
        if self.depth > 32:
            node_key = int(_absorb(torch.tensor(node_key), node >> 32))
        if node_key >= 1 << 31:
            node_key -= 1 << 32  # as int32 (two's complement), like the vectorised path
        return _standard_normal_pair(_fmix32_i32(self._element_keys ^ node_key))

    def evaluate_scalar(self, t: float, levy: bool = True) -> tuple[Tensor, Tensor | None]:
        """:meth:`evaluate` at one time shared by the whole batch (a Python float).

        Gives the same numbers as ``evaluate(torch.full((B,), t))`` (the same float64
        operations in the same order), faster: every sample descends the same nodes, so the
        levels this path shares with the previous call's (consecutive steps of a solve share
        all but the deepest few) are taken from a cache, and only the others are redrawn
        (:meth:`_descend`).  Used by the engine for fixed-step solves and by the backward
        passes of the adjoints.  ``levy=False`` skips the integral ``J`` (returned as None;
        ``W`` is unchanged) for solvers that do not use the Lévy area.
        """
        t = float(t)
        want_j = bool(levy)
        for key, value in self._memo:  # the last two answers (adjoints ask for each time twice)
            if key[0] == t and (key[1] or not want_j):
                return value if want_j else (value[0], None)
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
        w_node, levy, z, x = self._path_last
        right = digits[-1][1]
        sign = -1.0 if right else 1.0
        w_cell = 0.5 * w_node + sign * (1.5 * levy + z)
        h_cell = 0.25 * levy - 0.5 * z + sign * x
        w_cell_start, j_cell_start = self._path_sums[2][-1], self._path_sums[3][-1]
        cell_width = length / n_cells
        # (B, 1) like the vectorised path: vectorised and scalar pow kernels may differ in the last bit
        r = torch.full((self.batch_size, 1), fraction, dtype=torch.float64, device=self.device) * cell_width
        if self._cell_normals[0] != cell:
            self._cell_normals = (cell, self._normals_shared(self._cell_key_int, cell))
        normals = self._cell_normals[1]
        assert normals is not None
        if not want_j:
            result: tuple[Tensor, Tensor | None] = (w_cell_start + self._bridge_w(r, cell_width, w_cell, h_cell, normals[0]), None)
        else:
            w_part, h_part = self._bridge_in_cell(None, r, cell_width, w_cell, h_cell, normals=normals)
            w_t = w_cell_start + w_part
            result = (w_t, j_cell_start + r * w_cell_start + r * (h_part + 0.5 * w_part))
        self._memo = [((t, want_j), result), *self._memo[:1]]
        return result

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
            self._path_sums = tuple(torch.empty((self.depth, *w_root.shape), dtype=torch.float64, device=dev)
                                    for _ in range(4))  # type: ignore[assignment]
        if n <= 4:  # a few levels: one at a time on contiguous (B, N) tensors is faster
            self._descend_levels(start, digits, w_root, h_root)
            return
        col = (n, 1, 1)  # level-major layout (n, B, N): each level's slice is contiguous
        nodes = torch.tensor([d[0] for d in digits[levels]], dtype=torch.int64, device=dev)
        goes_right = torch.tensor([float(d[1]) for d in digits[levels]], dtype=torch.float64, device=dev).reshape(col)
        sign = 1.0 - 2.0 * goes_right
        node_key = (nodes * 0x9E3779B1 + self._level_keys[levels]) & _MASK32
        if self.depth > 32:
            node_key = _absorb(node_key, nodes >> 32)
        keys = self._element_keys.unsqueeze(1)  # (2, 1, B, N)
        z, x = _standard_normal_pair(_fmix32_i32(keys ^ node_key.to(torch.int32).reshape(1, *col)))  # (n, B, N)
        z = z * self._sq16[levels].reshape(col)
        x = x * self._sq48[levels].reshape(col)
        sums = self._path_sums
        assert sums is not None

        def resume(i: int, increments: Tensor) -> Tensor:
            """Inclusive cumulative sum over levels continuing the cached sum of level start-1."""
            prefix = sums[i][start - 1:start] if start > 0 else torch.zeros_like(increments[:1])
            total = torch.cumsum(torch.cat([prefix, increments]), dim=0)[1:]
            sums[i][start:] = total  # the cache only: nothing returned is a view of it
            return total

        h_increments = self._four_pow4[levels].reshape(col) * (-0.5 * z + sign * x)
        levy = (h_root + (resume(0, h_increments) - h_increments)) / self._pow4[levels].reshape(col)
        w_increments = self._two_pow2[levels].reshape(col) * sign * (1.5 * levy + z)
        w_node = (w_root + (resume(1, w_increments) - w_increments)) / self._pow2[levels].reshape(col)
        w_left = 0.5 * w_node + 1.5 * levy + z
        h_left = 0.25 * levy - 0.5 * z + x
        left_contrib = goes_right * w_left
        w_at_start = resume(2, left_contrib) - left_contrib
        if self._path_has_j:
            resume(3, goes_right * self._half_widths[levels].reshape(col) * (w_at_start + h_left + 0.5 * w_left))
        self._path_digits = list(digits)
        self._path_last = (w_node[-1], levy[-1], z[-1], x[-1])

    def _descend_levels(self, start: int, digits: list[tuple[int, int]], w_root: Tensor, h_root: Tensor) -> None:
        """:meth:`_descend` one level at a time (the same operations, per level)."""
        sums = self._path_sums
        assert sums is not None
        if start == 0:
            zero = torch.zeros_like(w_root)
            c_h = c_w = c_l = c_j = zero
        else:
            c_h, c_w, c_l, c_j = (buffer[start - 1] for buffer in sums)
        with_j = self._path_has_j
        for k in range(start, self.depth):
            node, right = digits[k]
            level_key, sq16, sq48, four_pow4, pow4, two_pow2, pow2, half_width = self._level_consts[k]
            z, x = self._normals_shared(level_key, node)
            z, x = z * sq16, x * sq48
            # (-0.5 z) + (-x) == (-0.5 z) - x exactly
            h_inc = four_pow4 * ((-0.5 * z - x) if right else (-0.5 * z + x))
            c_h = c_h + h_inc
            levy = (h_root + (c_h - h_inc)) / pow4
            w_inc = (-two_pow2 if right else two_pow2) * (1.5 * levy + z)
            c_w = c_w + w_inc
            w_node = (w_root + (c_w - w_inc)) / pow2
            if right:  # else the left-end terms are zero: the sums carry over
                w_left = 0.5 * w_node + 1.5 * levy + z
                c_l = c_l + w_left
                if with_j:
                    h_left = 0.25 * levy - 0.5 * z + x
                    c_j = c_j + half_width * ((c_l - w_left) + h_left + 0.5 * w_left)
            sums[0][k], sums[1][k], sums[2][k] = c_h, c_w, c_l
            if with_j:
                sums[3][k] = c_j
        self._path_digits = list(digits)
        self._path_last = (w_node, levy, z, x)

    @staticmethod
    def _bridge_w(r: Tensor, width: float, w_cell: Tensor, h_cell: Tensor, z1: Tensor) -> Tensor:
        """The ``W`` half of :meth:`_bridge_in_cell` (the same operations)."""
        q = width - r
        w = width
        mean_w = (r / w) * w_cell + (6.0 * q * r / w**2) * h_cell
        var_w = (r - r**2 / w - 3.0 * q**2 * r**2 / w**3).clamp(min=0.0)
        return mean_w + torch.sqrt(var_w) * z1

    def _bridge_in_cell(self, cell: Tensor | None, r: Tensor, width: float, w_cell: Tensor, h_cell: Tensor,
                        normals: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``(W, H)`` of ``[a, a + r]`` given ``(W, H)`` of the cell ``[a, a + width]``.

        Exact Gaussian conditioning: with ``q = width - r`` and independent pieces,
        ``W = W1 + W2`` and ``H = (r H1 + q H2)/w + (q W1 - r W2)/(2w)``.
        """
        q = width - r
        w = width
        mean_w = (r / w) * w_cell + (6.0 * q * r / w**2) * h_cell
        mean_h = (r / w) ** 2 * h_cell
        var_w = (r - r**2 / w - 3.0 * q**2 * r**2 / w**3).clamp(min=0.0)
        var_h = (r / 12.0 - r**4 / (12.0 * w**3)).clamp(min=0.0)
        cov = -q * r**3 / (2.0 * w**3)
        l11 = torch.sqrt(var_w)
        l21 = torch.where(l11 > 0, cov / torch.where(l11 > 0, l11, torch.ones_like(l11)), torch.zeros_like(l11))
        l22 = torch.sqrt((var_h - l21**2).clamp(min=0.0))
        z1, z2 = normals if normals is not None else self._normals(self._cell_key, cell)  # type: ignore[arg-type]
        return mean_w + l11 * z1, mean_h + l21 * z1 + l22 * z2

    # ----------------------------------------------------------------- public
    def _shape_out(self, x: Tensor) -> Tensor:
        return x.reshape(self.shape).to(self.dtype)

    def increment_from(self, s: Tensor, state_s: tuple[Tensor, Tensor], t: Tensor, state_t: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(dW, H)`` over ``[s, t]`` from two results of :meth:`evaluate`, shaped ``shape``."""
        w_s, j_s = state_s
        w_t, j_t = state_t
        lo = self._times(s).clamp(self.t0, self.t1)
        hi = self._times(t).clamp(self.t0, self.t1)
        h = (hi - lo).unsqueeze(1)
        nonzero = h != 0
        safe_h = torch.where(nonzero, h, torch.ones_like(h))
        dw = w_t - w_s
        levy = torch.where(nonzero, (j_t - j_s) / safe_h - w_s - 0.5 * dw, torch.zeros_like(dw))
        return self._shape_out(dw), self._shape_out(levy)

    def __call__(self, s: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Increment ``W(t) - W(s)`` and space-time Lévy area ``H_{s,t}``, each ``shape``.

        ``H_{s,t} = (1/(t-s)) int_s^t (W_u - W_s) du - (W_t - W_s)/2 ~ N(0, (t-s)/12)``,
        independent of the increment.
        """
        return self.increment_from(s, self.evaluate(s), t, self.evaluate(t))

    def increment_scalar(self, s: float, t: float) -> Tensor:
        """``W(t) - W(s)`` for times shared by the batch, shaped ``shape`` (the ``dW`` of
        :meth:`__call__`, through :meth:`evaluate_scalar` without the Lévy area)."""
        w_s, _ = self.evaluate_scalar(s, levy=False)
        w_t, _ = self.evaluate_scalar(t, levy=False)
        return self._shape_out(w_t - w_s)

    def W(self, t: Tensor | float) -> Tensor:
        """``W(t) - W(t0)`` of shape ``shape``."""
        return self._shape_out(self.evaluate(t)[0])

    def __repr__(self) -> str:
        return (
            f"VirtualBrownianTree(t0={self.t0}, t1={self.t1}, shape={self.shape}, seed={self.seed}, "
            f"tol={self.tol:.3g}, depth={self.depth})"
        )
