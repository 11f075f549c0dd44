"""Elementwise pieces of the virtual Brownian tree, and its fused one-kernel descents.

Everything here is plain elementwise code, shared by the paths of
:class:`~diffeqbridge.brownian.VirtualBrownianTree`:

* the *eager* path runs these functions op by op (the per-sample descent of ``evaluate``
  is vectorised over levels with cumulative sums there; the batch-shared descent of
  ``evaluate_scalar`` runs :func:`level_update` per level);
* on the CPU the *fused* path is ``_tree_kernel.c``: the same recursion per (sample,
  element) in a SIMD loop, compiled once per machine with the system C compiler
  (``$CC``, default ``cc``; cached under ``~/.cache/diffeqbridge``, ~1 s) and called
  through ctypes, with per-sample reuse of the top levels;
* on CUDA the fused path is :func:`fused_point`, the level recursion unrolled over a
  static depth inside one ``torch.compile``'d function (Triton), no ``(B, depth, N)``
  intermediates.  It is not used on the CPU: inductor needs minutes per depth there to
  compile the unrolled graph (measured 95 s for 8 levels, 340 s for 20 on this project's
  2-core machines) and its C++ kernel was 4-8x slower than the C kernel.

All paths perform the same float64 operations in the same order (the C kernel is compiled
with ``-ffp-contract=off``, multiplications by ``2^-k`` replace the divisions by ``2^k``
everywhere), so they agree up to the last bits of ``log``/``cos``/``sin`` (glibc/libmvec,
libdevice, SLEEF); the integer hash is bit-identical.

Depth padding (``torch.compile`` path): a tree of depth ``d`` runs in the kernel compiled
for ``D = 4 ceil(d/4)`` levels; the ``D - d`` top levels get zero coefficients
(:func:`level_table`), which makes them exact no-ops (``c + 0 == c``), so one compiled
kernel serves four depths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import operator
import os
import platform
import subprocess
import tempfile
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
PHI32 = 0x9E3779B1  # odd: node -> node * phi is injective mod 2^32
TWO_PI = 2.0 * math.pi
DEPTH_QUANTUM = 4  # compiled depths are multiples of this
ENV_VAR = "DIFFEQBRIDGE_TREE_KERNEL"  # "eager" forces the eager path; "fused" makes failures raise

_C1_I32 = 0x85EBCA6B - (1 << 32)  # MurmurHash3 finalizer multipliers as signed 32-bit integers
_C2_I32 = 0xC2B2AE35 - (1 << 32)

log = logging.getLogger("diffeqbridge.brownian")


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` if it is an int in ``[0, 2**64)`` (hashed as two 32-bit words), else ValueError naming ``name``.

    The one check of every seed and sample offset that feeds the counter-based hash
    (``VirtualBrownianTree``, ``solve``, ``diffeqbridge.diffusion``'s per-sample noise).
    A NumPy integer or an integer 0-d tensor is taken as the int it holds (``operator.index``);
    a bool, a float and anything else is refused."""
    number = None
    if not isinstance(value, (bool, float)) and not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
    if number is None or not 0 <= number < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64) (hashed as two 32-bit words); got {value!r}")
    return number


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values in ``[0, 2^32)``."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def absorb(h: Tensor, value: Tensor | int) -> Tensor:
    """Mix a non-negative integer (< 2^32) into a 32-bit hash state (int64 tensors)."""
    return fmix32(((h ^ value) + 0x9E3779B9) & MASK32)


def fmix32_i32(h: Tensor) -> Tensor:
    """:func:`fmix32` on int32 tensors (two's-complement wrap-around multiplication; the
    masks make the right shifts logical).  Bit-identical to the int64 version."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1_I32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2_I32
    return h ^ ((h >> 16) & 0xFFFF)


def node_key(node: Tensor, level_key: Tensor | int, wide: bool) -> Tensor:
    """int32 key of tree node ``node`` (int64, any shape) at a level with key ``level_key``:
    ``node * phi + level_key (mod 2^32)``, with ``node >> 32`` mixed in for trees deeper
    than 32 levels (``wide``)."""
    key = (node * PHI32 + level_key) & MASK32
    if wide:
        key = absorb(key, node >> 32)
    return key.to(torch.int32)


def standard_normal_pair(words: Tensor) -> tuple[Tensor, Tensor]:
    """Two independent N(0,1) float64 draws from random int32 words ``(2, ...)`` (Box–Muller)."""
    return standard_normal_pair_split(words[0], words[1])


def standard_normal_pair_split(word1: Tensor, word2: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`standard_normal_pair` of the words ``(word1, word2)`` (the same operations)."""
    u1 = (word1.double() + (2.0**31 + 0.5)) * 2.0**-32  # in (0, 1): log is finite
    u2 = (word2.double() + (2.0**31 + 0.5)) * 2.0**-32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = TWO_PI * u2
    return radius * torch.cos(angle), radius * torch.sin(angle)


def node_normals(element_keys: Tensor, key: Tensor | int) -> tuple[Tensor, Tensor]:
    """Standard normals of one node per sample: ``element_keys`` ``(2, B, N)`` int32,
    ``key`` int32 broadcasting against ``(B, N)`` -> two ``(B, N)`` float64."""
    return standard_normal_pair(fmix32_i32(element_keys ^ key))


# One level of the descent.  The state is four running sums (B, N): of the Lévy-area and
# increment recurrences (c_h, c_w, see brownian.py), of the increments of the left children
# passed on the way down (c_l = W at the current node's left end) and of their integrals
# (c_j = J at the left end).  Per-level constants, in this order:
# (inv_pow4 = 4^-k and inv_pow2 = 2^-k: multiplying by a power of two is exactly dividing)
LEVEL_COLUMNS = ("sq16", "sq48", "four_pow4", "inv_pow4", "two_pow2", "inv_pow2", "half_width")


def level_table(length: float, depth: int, padded: int) -> list[tuple[float, ...]]:
    """Per-level constants (:data:`LEVEL_COLUMNS`) of a tree of ``depth`` levels on an
    interval of ``length``, preceded by ``padded - depth`` all-zero no-op levels."""
    rows: list[tuple[float, ...]] = [(0.0,) * 7] * (padded - depth)
    for k in range(depth):
        width = length * 2.0**-k
        pow4, pow2 = 4.0**k, 2.0**k
        rows.append(
            (math.sqrt(width / 16.0), math.sqrt(width / 48.0), 4.0 * pow4, 1.0 / pow4, 2.0 * pow2, 1.0 / pow2, 0.5 * width)
        )
    return rows


def level_update(
    sums: tuple[Tensor, Tensor, Tensor, Tensor],
    roots: tuple[Tensor, Tensor],
    z: Tensor,
    x: Tensor,
    right: Tensor | float,
    consts: tuple[Tensor | float, ...],
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """One level: standard normals ``z, x`` of the node, ``right`` (0/1, float) whether the
    query goes to the right child -> the updated sums and the node's ``(W, H)``.

    The node's ``(W_k, H_k)`` come from the linear recurrences of the midpoint split
    (brownian.py), ``4^k H_k = H_0 + sum_{j<k} 4^{j+1} (-Z_j/2 + s_j X_j)`` and
    ``2^k W_k = W_0 + sum_{j<k} 2^{j+1} s_j (3 H_j/2 + Z_j)`` with ``s_j = 1 - 2 right_j``;
    the exclusive sums are formed as ``inclusive - increment``, as the eager path's
    cumulative sums do, so both paths add in the same order.
    """
    c_h, c_w, c_l, c_j = sums
    w_root, h_root = roots
    sq16, sq48, four_pow4, inv_pow4, two_pow2, inv_pow2, half_width = consts
    sign = 1.0 - 2.0 * right
    z, x = z * sq16, x * sq48
    h_inc = four_pow4 * (-0.5 * z + sign * x)
    c_h = c_h + h_inc
    levy = (h_root + (c_h - h_inc)) * inv_pow4
    w_inc = two_pow2 * sign * (1.5 * levy + z)
    c_w = c_w + w_inc
    w_node = (w_root + (c_w - w_inc)) * inv_pow2
    w_left = 0.5 * w_node + 1.5 * levy + z  # increment over the left child
    h_left = 0.25 * levy - 0.5 * z + x
    left = right * w_left
    c_l = c_l + left
    c_j = c_j + right * half_width * ((c_l - left) + h_left + 0.5 * w_left)
    w_cell = 0.5 * w_node + sign * (1.5 * levy + z)  # (W, H) of the child the query enters
    h_cell = 0.25 * levy - 0.5 * z + sign * x
    return (c_h, c_w, c_l, c_j), (w_cell, h_cell)


def bridge_w(
    r: Tensor, w: float | Tensor, w2: float | Tensor, w3: float | Tensor, w_cell: Tensor, h_cell: Tensor, z1: Tensor
) -> Tensor:
    """The ``W`` half of :func:`bridge` (the same operations)."""
    q = w - r
    r2 = r * r
    mean_w = (r / w) * w_cell + (6.0 * q * r / w2) * h_cell
    var_w = (r - r2 / w - 3.0 * (q * q) * r2 / w3).clamp(min=0.0)
    return mean_w + torch.sqrt(var_w) * z1


def bridge(
    r: Tensor, w: float | Tensor, w2: float | Tensor, w3: float | Tensor, w_cell: Tensor, h_cell: Tensor, z1: Tensor, z2: Tensor
) -> tuple[Tensor, Tensor]:
    """``(W, H)`` of ``[a, a + r]`` given ``(W, H)`` of the cell ``[a, a + w]`` (``w2 = w^2``,
    ``w3 = w^3``) and standard normals ``z1, z2``: exact Gaussian conditioning.

    With ``q = w - r`` and independent pieces, ``W = W1 + W2`` and
    ``H = (r H1 + q H2)/w + (q W1 - r W2)/(2w)``.
    """
    q = w - r
    r2 = r * r
    rw = r / w
    mean_w = rw * w_cell + (6.0 * q * r / w2) * h_cell
    mean_h = (rw * rw) * h_cell
    var_w = (r - r2 / w - 3.0 * (q * q) * r2 / w3).clamp(min=0.0)
    var_h = (r / 12.0 - (r2 * r2) / (12.0 * w3)).clamp(min=0.0)
    cov = -q * (r2 * r) / (2.0 * w3)
    l11 = torch.sqrt(var_w)
    l21 = torch.where(l11 > 0, cov / torch.where(l11 > 0, l11, torch.ones_like(l11)), torch.zeros_like(l11))
    l22 = torch.sqrt((var_h - l21 * l21).clamp(min=0.0))
    return mean_w + l11 * z1, mean_h + l21 * z1 + l22 * z2


def locate(t: Tensor, t0: float | Tensor, length: float | Tensor, n_cells: float | Tensor) -> tuple[Tensor, Tensor]:
    """Finest cell of times ``t`` ``(B,)`` (clamped to the interval) -> ``(cell int64 (B,),
    fraction of the cell float64 (B,))``."""
    position = ((t - t0) / length).clamp(0.0, 1.0) * n_cells
    cell = (
        torch.minimum(torch.floor(position), n_cells - 1.0)
        if isinstance(n_cells, Tensor)
        else torch.floor(position).clamp(max=n_cells - 1)
    )
    return cell.long(), position - cell


def fused_point(
    t: Tensor,
    element_keys: Tensor,
    w_root: Tensor,
    h_root: Tensor,
    levels: Tensor,
    level_keys: Tensor,
    geometry: Tensor,
    padded: int,
    cell_key: int,
    wide: bool,
) -> tuple[Tensor, Tensor]:
    """``(W(t), J(t))`` for per-sample times, the whole descent elementwise.

    Args:
        t: ``(B,)`` float64 query times.
        element_keys: ``(2, B, N)`` int32 hash keys of (seed, sample, element).
        w_root, h_root: ``(B, N)`` float64, ``(W, H)`` of the whole interval.
        levels: ``(padded, 7)`` float64, :func:`level_table`.
        level_keys: ``(padded,)`` int64 level hash keys (0 on padding levels).
        geometry: ``(6,)`` float64: ``t0, length, n_cells, w, w^2, w^3`` (``w`` = cell width).
        padded: the static number of levels (a multiple of :data:`DEPTH_QUANTUM`).
        cell_key, wide: the in-cell hash key, and whether the tree is deeper than 32 levels.

    Returns two ``(B, N)`` float64 tensors.  Written for ``torch.compile``: the loop over
    levels unrolls at trace time.
    """
    t0, length, n_cells, width, width2, width3 = geometry.unbind(0)
    # every intermediate has the (B, N) shape of the output, so inductor fuses the whole
    # descent into one loop over elements (a (2, B, N) or (B,) intermediate would be stored)
    key0, key1 = element_keys.unbind(0)
    cell, fraction = locate(t.unsqueeze(1).expand_as(w_root), t0, length, n_cells)
    zero = torch.zeros_like(w_root)
    sums = (zero, zero, zero, zero)
    roots = (w_root, h_root)
    child = roots
    for k in range(padded):
        shift = padded - k
        key = node_key(cell >> shift, level_keys[k], wide)
        right = ((cell >> (shift - 1)) & 1).double()
        z, x = standard_normal_pair_split(fmix32_i32(key0 ^ key), fmix32_i32(key1 ^ key))
        sums, child = level_update(sums, roots, z, x, right, tuple(levels[k].unbind(0)))
    key = node_key(cell, cell_key, wide)
    z1, z2 = standard_normal_pair_split(fmix32_i32(key0 ^ key), fmix32_i32(key1 ^ key))
    r = fraction * width
    w_part, h_part = bridge(r, width, width2, width3, child[0], child[1], z1, z2)
    c_l, c_j = sums[2], sums[3]
    return c_l + w_part, c_j + r * c_l + r * (h_part + 0.5 * w_part)


def padded_depth(depth: int) -> int:
    """The compiled depth serving ``depth`` on the ``torch.compile`` path (trees deeper than
    32 levels hash differently, so no padded depth straddles 32)."""
    return DEPTH_QUANTUM * math.ceil(depth / DEPTH_QUANTUM)


@functools.cache
def _compiled(padded: int, device_type: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """``torch.compile(fused_point)`` for one padded depth and device type.  Each gets its own
    code object, hence its own dynamo cache (no recompile-limit sharing between depths);
    shapes are dynamic, so one compilation serves every batch size."""
    code = fused_point.__code__.replace(co_name=f"fused_point_{padded}_{device_type}")
    fn = types.FunctionType(code, fused_point.__globals__, code.co_name, fused_point.__defaults__)
    return torch.compile(fn, dynamic=True, fullgraph=True)


# ----------------------------------------------------------------- the CPU kernel (C)
_C_SOURCE = Path(__file__).with_name("_tree_kernel.c")
_C_BASE_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
# most to least specific: native SIMD with glibc's vector math, native SIMD, portable
_C_FLAG_SETS = (
    (
        "-march=native",
        "-mprefer-vector-width=512",
        "-fopenmp-simd",
        "-DTREE_LIBMVEC",
        "-fno-builtin-sin",
        "-fno-builtin-cos",
        "-lmvec",
        "-lm",
    ),
    ("-march=native", "-lm"),
    ("-lm",),
)
_C_ARGTYPES = (
    (ctypes.c_int64, ctypes.c_int64)
    + (ctypes.c_void_p,) * 7
    + (ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
    + (ctypes.c_void_p,) * 4
    + (ctypes.c_int64,)
)
_C_GRID_ARGTYPES = (
    (ctypes.c_int64, ctypes.c_int64)
    + (ctypes.c_void_p,) * 7
    + (ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
    + (ctypes.c_void_p,) * 3
)
BLOCK = 8  # lanes per block of the C kernel (its BLOCK): the reuse cache's innermost axis
GRID_BLOCK = 16  # lanes per block of its tree_grid (GRID_BLOCK): the scratch rows' innermost axis
REUSE_BUDGET_BYTES = 256 * 2**20  # per-sample reuse caches 4 float64 per level and element, up to this size


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/diffeqbridge`` (default ``~/.cache/diffeqbridge``), or a folder in
    the temporary directory where that cannot be created (a read-only home)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(root) / "diffeqbridge"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"diffeqbridge-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return path


def _cpu_tag() -> bytes:
    """What ``-march=native`` depends on: the machine and the CPU's feature flags."""
    flags = b""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        pass
    return platform.machine().encode() + flags


def _compile_c(flags: tuple[str, ...]) -> Path:
    """Compile the kernel with the C compiler ``$CC`` (default ``cc``) into the user cache
    (``~/.cache/diffeqbridge``), once per source, flags and CPU; returns the library path."""
    source = _C_SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    tag = hashlib.sha256(source + repr((cc, _C_BASE_FLAGS, flags)).encode() + _cpu_tag()).hexdigest()[:20]
    path = _cache_dir() / f"tree_kernel_{tag}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            cmd = [cc, *_C_BASE_FLAGS, str(_C_SOURCE), "-o", str(out), *flags]
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
            os.replace(out, path)  # atomic: concurrent processes never load a partial file
    return path


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """The compiled ``_tree_kernel.c`` (ctypes), or None (with a one-time warning) when no
    flag set compiles: then the CPU runs the eager path."""
    errors = []
    for flags in _C_FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_compile_c(flags)))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = (
                exc.stderr.decode(errors="replace").strip().splitlines()[:1]
                if isinstance(exc, subprocess.CalledProcessError) and exc.stderr
                else [str(exc)]
            )
            errors.append(f"{' '.join(flags)}: {detail[0] if detail else type(exc).__name__}")
            continue
        lib.tree_point.argtypes, lib.tree_point.restype = _C_ARGTYPES, None
        lib.tree_increment.argtypes = (ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_double) + (ctypes.c_void_p,) * 8
        lib.tree_increment.restype = None
        lib.tree_grid.argtypes, lib.tree_grid.restype = _C_GRID_ARGTYPES, None
        log.info("VirtualBrownianTree: fused C kernel on the CPU (%s)", " ".join(flags))
        return lib
    warnings.warn(
        "VirtualBrownianTree: could not compile the fused CPU kernel (set CC to a C compiler); using "
        f"the slower eager path. {'; '.join(errors)}",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def c_kernel() -> Callable[..., None] | None:
    """``tree_point`` of :func:`c_library` (None without one)."""
    lib = c_library()
    return None if lib is None else lib.tree_point


def increment_c(
    t0: float, t1: float, s: Tensor, t: Tensor, state_s: tuple[Tensor, Tensor], state_t: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor] | None:
    """``(dW, H)`` of ``VirtualBrownianTree.increment_from`` in one C loop (the same
    operations), or None when the inputs are not contiguous float64 CPU tensors."""
    lib = c_library()
    tensors = (s, t, *state_s, *state_t)
    if lib is None or not all(
        x.dtype == torch.float64 and x.device.type == "cpu" and x.is_contiguous() and not x.requires_grad for x in tensors
    ):
        return None
    w_s = state_s[0]
    if w_s.ndim != 2 or any(x.shape != w_s.shape for x in tensors[2:]):
        return None
    dw, levy = torch.empty_like(w_s), torch.empty_like(w_s)
    lib.tree_increment(w_s.numel(), w_s.shape[1], t0, t1, *(x.data_ptr() for x in tensors), dw.data_ptr(), levy.data_ptr())
    return dw, levy


class ReuseCache:
    """Per-sample reuse state of the C kernel: each element's previous finest cell ``(B*N,)``
    and its running sums after every level ``(ceil(B*N/8), depth, 4, 8)``, valid after the first query.
    Reuse changes no value (see ``_tree_kernel.c``); a lock keeps concurrent queries on one
    tree from interleaving their updates."""

    def __init__(self, depth: int, count: int):
        self.prev = torch.zeros(count, dtype=torch.int64)
        self.sums = torch.empty((-(-count // BLOCK), depth, 4, BLOCK), dtype=torch.float64)  # (block, level, sum, lane)
        self.flag = torch.zeros(1, dtype=torch.int64)  # 1 once filled (a tensor: an input of tree_point_op)
        self.lock = threading.Lock()
        _CACHES[self.prev.data_ptr()] = self  # tree_point_op finds the lock through its prev tensor

    @property
    def valid(self) -> bool:
        """Whether the cache holds a previous query's cells and sums."""
        return bool(self.flag.item())

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(prev, sums, flag)``: the arguments :func:`tree_point_op` updates in place."""
        return self.prev, self.sums, self.flag

    @staticmethod
    def affordable(depth: int, count: int) -> bool:
        return depth * 4 * count * 8 <= REUSE_BUDGET_BYTES

    def select(self, lanes: Tensor) -> ReuseCache:
        """The cache of the elements ``lanes`` (``(M,)`` int64 indices into this cache's
        ``B*N`` elements), in that order: each element keeps its previous cell and the sums of
        that cell's path, a consistent pair, so the reuse stays exact."""
        depth, count = self.sums.shape[1], lanes.numel()
        out = ReuseCache(depth, count)
        with self.lock:
            out.prev.copy_(self.prev.index_select(0, lanes))
            flat = self.sums.permute(0, 3, 1, 2).reshape(-1, depth, 4).index_select(0, lanes)  # (M, depth, 4)
            padded = flat.new_zeros((out.sums.shape[0] * BLOCK, depth, 4))
            padded[:count] = flat
            out.sums.copy_(padded.reshape(-1, BLOCK, depth, 4).permute(0, 2, 3, 1))
            out.flag.copy_(self.flag)
        return out


def _tree_pointers(
    key0: Tensor,
    key1: Tensor,
    w_root: Tensor,
    h_root: Tensor,
    levels: Tensor,
    level_keys: Tensor,
    geometry: Tensor,
    cell_key: int,
    wide: bool,
) -> tuple[int, ...]:
    """The tree's arguments shared by the C functions ``tree_point`` and ``tree_grid``, in
    their order: element keys, roots, levels (with their count), geometry, cell key, ``wide``."""
    return (
        key0.data_ptr(),
        key1.data_ptr(),
        w_root.data_ptr(),
        h_root.data_ptr(),
        levels.data_ptr(),
        level_keys.data_ptr(),
        levels.shape[0],
        geometry.data_ptr(),
        cell_key,
        int(wide),
    )


def run_c(
    kernel: Callable[..., None],
    t: Tensor,
    key0: Tensor,
    key1: Tensor,
    w_root: Tensor,
    h_root: Tensor,
    levels: Tensor,
    level_keys: Tensor,
    geometry: Tensor,
    cell_key: int,
    wide: bool,
    reuse: ReuseCache | None = None,
) -> tuple[Tensor, Tensor]:
    """``(W(t), J(t))`` from the C kernel: the arguments of :func:`fused_point` unpadded
    (``levels`` ``(depth, 7)``, ``level_keys`` ``(depth,)``), all contiguous on the CPU,
    the element keys as two ``(B, N)`` int32 tensors; ``reuse``: the per-sample cache."""
    w_out, j_out = torch.empty_like(w_root), torch.empty_like(w_root)
    t = t.contiguous()
    args = (
        w_root.numel(),
        w_root.shape[1],
        t.data_ptr(),
        *_tree_pointers(key0, key1, w_root, h_root, levels, level_keys, geometry, cell_key, wide),
        w_out.data_ptr(),
        j_out.data_ptr(),
    )
    if reuse is None:
        kernel(*args, None, None, 0)
    else:
        with reuse.lock:
            # the flag read through its address: a CPU word, not a torch scalar conversion
            filled = ctypes.c_int64.from_address(reuse.flag.data_ptr()).value
            kernel(*args, reuse.prev.data_ptr(), reuse.sums.data_ptr(), filled)
            reuse.flag.fill_(1)
    return w_out, j_out


def run_c_grid(
    times: list[float],
    key0: Tensor,
    key1: Tensor,
    w_root: Tensor,
    h_root: Tensor,
    levels: Tensor,
    level_keys: Tensor,
    geometry: Tensor,
    cell_key: int,
    wide: bool,
    want_j: bool = True,
) -> tuple[Tensor, Tensor | None] | None:
    """``(W, J)`` at ``times`` shared by the batch, each ``(T, B, N)`` float64 (``J`` None
    when not ``want_j``), in one call of the C kernel ``tree_grid`` (arguments as
    :func:`run_c`): the numbers of :func:`run_c` at every time, bit for bit.  None without the
    C library."""
    lib = c_library()
    if lib is None:
        return None
    grid = torch.tensor(times, dtype=torch.float64)
    w_out = torch.empty((len(times), *w_root.shape), dtype=torch.float64)
    j_out = torch.empty_like(w_out) if want_j else None
    scratch = torch.empty((levels.shape[0], 4, GRID_BLOCK), dtype=torch.float64)
    lib.tree_grid(
        w_root.numel(),
        len(times),
        grid.data_ptr(),
        *_tree_pointers(key0, key1, w_root, h_root, levels, level_keys, geometry, cell_key, wide),
        w_out.data_ptr(),
        None if j_out is None else j_out.data_ptr(),
        scratch.data_ptr(),
    )
    return w_out, j_out


# ------------------------------------------------- the C kernels as torch custom ops
# torch.compile cannot trace a ctypes call; as custom ops (opaque nodes with declared output
# shapes) the tree query joins the compiled SDE iteration (engine: solve(..., compile=True)).
# They call the same C functions as run_c / increment_c, so they give the same bits.

#: the live reuse caches by their ``prev`` tensor's address (how tree_point_op finds the lock)
_CACHES: weakref.WeakValueDictionary[int, ReuseCache] = weakref.WeakValueDictionary()
#: tree_point_op's cache arguments for a tree without a reuse cache (never written: zero size)
_NO_CACHE = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64), torch.zeros(1, dtype=torch.int64))


#: the ops' library (``torch.library.Library`` rather than ``custom_op``: the dispatcher calls
#: the CPU kernels directly, without custom_op's autograd/ADInplaceOrView wrappers, which took
#: ~0.1 ms per call filling in defaults; nothing here is differentiated)
_LIB = torch.library.Library("diffeqbridge", "DEF")
_LIB.define(
    "tree_point(Tensor t, Tensor key0, Tensor key1, Tensor w_root, Tensor h_root, Tensor levels, "
    "Tensor level_keys, Tensor geometry, int cell_key, bool wide, Tensor(a!) prev, Tensor(b!) sums, "
    "Tensor(c!) flag) -> (Tensor, Tensor)"
)
_LIB.define(
    "tree_increment(float t0, float t1, Tensor s, Tensor t, Tensor w_s, Tensor j_s, Tensor w_t, Tensor j_t) -> (Tensor, Tensor)"
)


def _tree_point_cpu(
    t: Tensor,
    key0: Tensor,
    key1: Tensor,
    w_root: Tensor,
    h_root: Tensor,
    levels: Tensor,
    level_keys: Tensor,
    geometry: Tensor,
    cell_key: int,
    wide: bool,
    prev: Tensor,
    sums: Tensor,
    flag: Tensor,
) -> tuple[Tensor, Tensor]:
    kernel = c_kernel()
    assert kernel is not None
    cache = _CACHES.get(prev.data_ptr()) if prev.numel() else None
    return run_c(kernel, t, key0, key1, w_root, h_root, levels, level_keys, geometry, cell_key, wide, cache)


def _tree_increment_cpu(
    t0: float, t1: float, s: Tensor, t: Tensor, w_s: Tensor, j_s: Tensor, w_t: Tensor, j_t: Tensor
) -> tuple[Tensor, Tensor]:
    state_s, state_t = (w_s.contiguous(), j_s.contiguous()), (w_t.contiguous(), j_t.contiguous())
    out = increment_c(t0, t1, s.contiguous(), t.contiguous(), state_s, state_t)
    assert out is not None
    return out


def _like_w(*args: Any) -> tuple[Tensor, Tensor]:
    """Both ops' outputs: two tensors like their first ``(B, N)`` state argument."""
    w = next(a for a in args if isinstance(a, Tensor) and a.ndim == 2 and a.dtype == torch.float64)
    return torch.empty_like(w), torch.empty_like(w)


_LIB.impl("tree_point", _tree_point_cpu, "CPU")
_LIB.impl("tree_increment", _tree_increment_cpu, "CPU")
torch.library.register_fake("diffeqbridge::tree_point", lambda *args: _like_w(*args[3:]), lib=_LIB)
torch.library.register_fake("diffeqbridge::tree_increment", lambda *args: _like_w(*args[4:]), lib=_LIB)


def tree_point_op(*args: Any) -> tuple[Tensor, Tensor]:
    """:func:`run_c` as the op ``diffeqbridge::tree_point``: ``(W(t), J(t))``, each ``(B, N)``
    float64; arguments ``(t, key0, key1, w_root, h_root, levels, level_keys, geometry,
    cell_key, wide, prev, sums, flag)`` with ``t`` ``(B,)`` and ``(prev, sums, flag)``
    :meth:`ReuseCache.tensors` (updated in place) or ``_NO_CACHE``."""
    return torch.ops.diffeqbridge.tree_point(*args)  # type: ignore[no-any-return]


def tree_increment_op(*args: Any) -> tuple[Tensor, Tensor]:
    """:func:`increment_c` as the op ``diffeqbridge::tree_increment``: ``(dW, H)``, each
    ``(B, N)`` float64; arguments ``(t0, t1, s, t, w_s, j_s, w_t, j_t)``."""
    return torch.ops.diffeqbridge.tree_increment(*args)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------- dispatch
def kernel_mode() -> str:
    """``"auto"`` (default), ``"eager"`` or ``"fused"``, from the ``DIFFEQBRIDGE_TREE_KERNEL``
    environment variable (read at every query, so it can be switched at run time).  ``fused``
    makes a failure to build the fused kernel an error instead of a fallback."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "eager", "fused"):
        raise ValueError(f"{ENV_VAR} must be 'auto', 'eager' or 'fused'; got {mode!r}")
    return mode


_failed: set[tuple[int, str]] = set()
_verified: set[tuple[int, str]] = set()
_announced: set[str] = set()


def _announce(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.info(message)


def choose(device: torch.device, padded: int = 0) -> str:
    """Which path a query on ``device`` takes: ``"c"`` (CPU), ``"compile"`` (CUDA: Triton
    through ``torch.compile``, for the padded depth ``padded``) or ``"eager"``."""
    mode = kernel_mode()
    if mode == "eager":
        _announce(f"VirtualBrownianTree: eager path ({ENV_VAR}=eager)")
        return "eager"
    if device.type == "cpu":
        if c_kernel() is not None:
            return "c"
        if mode == "fused":
            raise RuntimeError(f"{ENV_VAR}=fused but the CPU kernel could not be compiled")
        return "eager"
    # CUDA: the Triton kernel from torch.compile is opt-in (DIFFEQBRIDGE_TREE_KERNEL=fused) until
    # it has been measured on a GPU (compile time per depth, speed, no host syncs)
    if device.type == "cuda" and mode == "fused" and (padded, device.type) not in _failed:
        return "compile"
    if device.type == "cuda" and mode == "auto":
        _announce(f"VirtualBrownianTree: eager path on cuda (the compiled Triton kernel is opt-in: {ENV_VAR}=fused)")
        return "eager"
    if mode == "fused":
        raise RuntimeError(f"{ENV_VAR}=fused: no fused kernel for device {device}")
    _announce(f"VirtualBrownianTree: eager path on {device.type} (no fused kernel for this device)")
    return "eager"


def run_compiled(
    padded: int, device: torch.device, eager: Callable[[], tuple[Tensor, Tensor]], *args: object
) -> tuple[Tensor, Tensor]:
    """Run :func:`fused_point` through ``torch.compile``.  The first result of each padded
    depth and device is checked against the eager path (``eager()``, within 1e-12 of the
    scale); a failure to compile or a mismatch sends this depth and device to the eager
    path for good, with a one-time warning."""
    key = (padded, device.type)
    try:
        out = _compiled(padded, device.type)(*args)
        if key not in _verified:
            ref = eager()
            scale = 1.0 + float(torch.stack([r.abs().max() for r in ref]).max())
            error = float(torch.stack([(a - r).abs().max() for a, r in zip(out, ref)]).max())
            if not error <= 1e-12 * scale:
                raise RuntimeError(f"compiled kernel differs from the eager path by {error:.3g}")
            _verified.add(key)
    except Exception as exc:  # a missing compiler, an unsupported backend, a miscompilation: fall back
        if kernel_mode() == "fused":
            raise
        _failed.add(key)
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(
            f"VirtualBrownianTree: the fused kernel failed on {device.type} "
            f"({type(exc).__name__}: {first}); using the eager path",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager()
    _announce(f"VirtualBrownianTree: fused torch.compile kernel on {device.type}")
    return out
