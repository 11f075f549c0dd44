"""Ensembles: many samples of one problem family, solved in batches, reduced as they stream.

SciML's ``EnsembleProblem(prob, prob_func, output_func, reduction)`` adapted to batches::

    eprob = deb.EnsembleProblem(prob_func, output_func=None, reduction=None)
    esol = deb.solve_ensemble(eprob, n, batch_size=100_000, alg=deb.EM(), dt=1e-2, seed=0)
    esol.result["mean"], esol.result["var"]        # (*out_shape,) each

* ``prob_func(indices) -> problem``: ``indices`` is a ``(b,)`` int64 tensor of *global* sample
  indices (batch ``k`` holds ``k*batch_size ... min((k+1)*batch_size, n) - 1``); it returns an
  ``SDEProblem``/``ODEProblem`` whose ``y0`` has ``b`` rows (one per index).  Per-sample
  parameters are derived from the indices, never from a batch-local counter, so a sample is
  the same whatever batch it sits in.  (SciML's ``prob_func(prob, i, repeat)`` makes one
  problem per trajectory; here one call makes a whole batch.)
* ``solve_ensemble`` solves batch ``k`` with ``solve(prob_k, ..., seed=seed,
  sample_offset=k*batch_size)``: the Brownian tree of sample ``i`` is keyed by its global
  index, so every path equals, bit for bit, the path that sample has in one big batch.
* ``output_func(sol, indices) -> Tensor (b, *out_shape)`` (default: the last saved state,
  ``sol.ys[-1]``, or the state at a terminating event) is what is reduced.  Samples whose return code is not successful
  (``Success``, or ``Terminated`` by an event) are left out of the reduction and counted in
  ``esol.retcodes``.
* ``reduction``: a :class:`Reduction` (default :class:`Moments`), or a list/dict of them.  A
  reduction is *mergeable*: ``partial(values) -> state`` summarises one batch and
  ``merge(a, b) -> state`` combines two summaries, so at most one batch of outputs is in
  memory at a time (10⁸ paths in batches of 10⁵ keep 10⁵ outputs and a few hundred small
  states).  Partials are folded in batch order ``0, 1, 2, ...``; a distributed run
  (:mod:`diffeqbridge.distributed`) gathers the partials of every rank and folds them in the
  same order, so it returns the same bits as one process.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .brownian import VirtualBrownianTree
from .problem import ODEProblem, SDEProblem
from .solution import ReturnCode, Solution

__all__ = ["Collect", "EnsembleProblem", "EnsembleSolution", "Moments", "Quantiles", "Reduction", "solve_ensemble"]


# ------------------------------------------------------------------ reductions
class Reduction:
    """A mergeable summary of per-sample outputs.

    Subclasses implement :meth:`partial` (one batch -> state), :meth:`merge` (two states ->
    one; must not modify its arguments) and :meth:`result` (state -> user-facing dict).
    States are plain dicts of CPU tensors/ints (picklable: the distributed runner gathers them).
    """

    def partial(self, values: Tensor, indices: Tensor) -> Any:
        """Summarise one batch: ``values`` ``(b, *out_shape)`` (successful samples only) and
        their global ``indices`` ``(b,)``."""
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def result(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError


class Moments(Reduction):
    """Count, mean, variance (unbiased), standard error, min and max per output component.

    A batch's partial is ``(n, mean, M2 = Σ (x - mean)²)`` in float64; two partials merge by
    Chan, Golub and LeVeque's pairwise update (1979; Welford's 1962 recurrence for one new
    point is its ``n_b = 1`` case)::

        n = n_a + n_b,   δ = mean_b - mean_a,
        mean = mean_a + δ n_b / n,   M2 = M2_a + M2_b + δ² n_a n_b / n.
    """

    def partial(self, values: Tensor, indices: Tensor) -> dict[str, Any]:
        x = values.detach().to("cpu", torch.float64)
        n = x.shape[0]
        if n == 0:
            empty = torch.zeros(x.shape[1:], dtype=torch.float64)
            return {"n": 0, "mean": empty, "m2": empty.clone(), "min": empty + math.inf, "max": empty - math.inf}
        mean = x.mean(dim=0)
        return {"n": n, "mean": mean, "m2": (x - mean).square().sum(dim=0), "min": x.amin(dim=0), "max": x.amax(dim=0)}

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if b["n"] == 0:
            return a
        if a["n"] == 0:
            return b
        n = a["n"] + b["n"]
        delta = b["mean"] - a["mean"]
        return {
            "n": n,
            "mean": a["mean"] + delta * (b["n"] / n),
            "m2": a["m2"] + b["m2"] + delta.square() * (a["n"] * b["n"] / n),
            "min": torch.minimum(a["min"], b["min"]),
            "max": torch.maximum(a["max"], b["max"]),
        }

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        n = state["n"]
        var = state["m2"] / (n - 1) if n > 1 else torch.full_like(state["m2"], math.nan)
        return {
            "count": n,
            "mean": state["mean"] if n > 0 else torch.full_like(state["mean"], math.nan),
            "var": var,
            "std": var.sqrt(),
            "sem": (var / max(n, 1)).sqrt(),
            "min": state["min"],
            "max": state["max"],
        }


class Quantiles(Reduction):
    """Quantiles of every output component from a mergeable, deterministic sketch.

    Exact while the total count is at most ``capacity``: the result is then the
    "inverted CDF" quantile (numpy's ``method="inverted_cdf"``: the smallest ``x`` with
    ``F(x) >= q``).  Beyond, the sketch is a deterministic variant of the KLL compactor
    hierarchy (Karnin, Lang, Liberty 2016; Agarwal et al. 2012, "Mergeable summaries"):
    level ``h`` keeps sorted items of weight ``2^h``; a level holding more than ``capacity``
    items is sorted and every other item (offset alternating 0, 1, 0, ... per level) moves
    up a level with twice the weight.  Each compaction at level ``h`` shifts any rank by at
    most ``2^h``, so the rank error is at most ``n log2(n / capacity) / capacity`` in the
    worst case (about 0.1 % of ``n`` for ``n = 10^8`` and the default ``capacity = 2^14``),
    and memory is ``capacity`` floats per level (``log2(n / capacity)`` levels) per output
    component.  No randomness: the same inputs in the same merge order give the same bits.
    """

    def __init__(self, q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95), capacity: int = 2**14):
        qs = [float(v) for v in q]
        if not qs or any(not (0.0 <= v <= 1.0) for v in qs):
            raise ValueError(f"q must be probabilities in [0, 1]; got {q!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"capacity must be an int >= 2; got {capacity!r}")
        self.q, self.capacity = qs, capacity

    def _compact(self, levels: list[Tensor], flips: list[int]) -> tuple[list[Tensor], list[int]]:
        levels, flips = list(levels), list(flips)
        h = 0
        while h < len(levels):
            if levels[h].shape[0] > self.capacity:
                items = torch.sort(levels[h], dim=0).values
                keep_odd = items.shape[0] % 2  # an odd item out stays at this level
                rest, items = items[:keep_odd], items[keep_odd:]
                up = items[flips[h] % 2 :: 2]
                flips[h] += 1
                levels[h] = rest
                if h + 1 == len(levels):
                    levels.append(up[:0])
                    flips.append(0)
                levels[h + 1] = torch.cat([levels[h + 1], up])
            h += 1
        return levels, flips

    def partial(self, values: Tensor, indices: Tensor) -> dict[str, Any]:
        x = (
            values.detach().to("cpu", torch.float64).flatten(1)
            if values.ndim > 1
            else values.detach().to("cpu", torch.float64).unsqueeze(1)
        )
        levels, flips = self._compact([x], [0])
        return {"levels": levels, "flips": flips, "shape": tuple(values.shape[1:]), "n": x.shape[0]}

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        depth = max(len(a["levels"]), len(b["levels"]))
        levels, flips = [], []
        for h in range(depth):
            parts = [s["levels"][h] for s in (a, b) if h < len(s["levels"])]
            levels.append(torch.cat(parts))
            flips.append(max(s["flips"][h] for s in (a, b) if h < len(s["flips"])))
        levels, flips = self._compact(levels, flips)
        return {"levels": levels, "flips": flips, "shape": a["shape"], "n": a["n"] + b["n"]}

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        items = torch.cat(state["levels"])  # (m, C)
        if items.shape[0] == 0:  # no successful sample: NaN, as Moments' mean
            nan = torch.full((len(self.q), *state["shape"]), math.nan, dtype=torch.float64)
            return {"q": torch.tensor(self.q, dtype=torch.float64), "quantiles": nan, "exact": True}
        weights = torch.cat([torch.full((lv.shape[0],), 2.0**h, dtype=torch.float64) for h, lv in enumerate(state["levels"])])
        order = torch.argsort(items, dim=0, stable=True)
        sorted_items = torch.gather(items, 0, order)
        cum = torch.cumsum(weights[order], dim=0)  # (m, C)
        total = cum[-1]
        out = []
        for q in self.q:
            # smallest item whose cumulative weight reaches q * total (inverted CDF)
            idx = torch.searchsorted(cum.T.contiguous(), (q * total).unsqueeze(1)).clamp(max=items.shape[0] - 1)
            out.append(torch.gather(sorted_items, 0, idx.T).squeeze(0).reshape(state["shape"]))
        exact = len(state["levels"]) == 1
        return {"q": torch.tensor(self.q, dtype=torch.float64), "quantiles": torch.stack(out), "exact": exact}


class Collect(Reduction):
    """Keep every output, in global sample order (small ensembles and tests only: O(n) memory)."""

    def partial(self, values: Tensor, indices: Tensor) -> dict[str, Any]:
        return {"indices": indices.detach().cpu(), "values": values.detach().cpu()}

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"indices": torch.cat([a["indices"], b["indices"]]), "values": torch.cat([a["values"], b["values"]])}

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        order = torch.argsort(state["indices"])
        return {"indices": state["indices"][order], "values": state["values"][order]}


# ------------------------------------------------------------------ problem and solution
def default_output(sol: Solution, indices: Tensor) -> Tensor:
    """The last state of every sample, ``(b, *state_shape)``: the last saved state, or for a
    sample a terminating event stopped, its state at the event (``sol.events.y``)."""
    last = sol.ys[-1]
    if sol.events is None:
        return last
    stopped = sol.events.terminated.reshape(-1, *([1] * (last.ndim - 1)))
    return torch.where(stopped, sol.events.y.to(last.dtype), last)


@dataclass
class EnsembleProblem:
    """A family of problems, built batch by batch (see the module docstring).

    Args:
        prob_func: ``prob_func(indices (b,) int64) -> SDEProblem | ODEProblem`` with ``b`` samples.
        output_func: ``output_func(sol, indices) -> (b, *out_shape)`` tensor; default ``sol.ys[-1]``.
        reduction: a :class:`Reduction`, a list or dict of them; default :class:`Moments`.
    """

    prob_func: Callable[[Tensor], ODEProblem]
    output_func: Callable[[Solution, Tensor], Tensor] | None = None
    reduction: Reduction | Sequence[Reduction] | dict[str, Reduction] | None = None

    def __post_init__(self) -> None:
        if not callable(self.prob_func):
            raise TypeError(f"prob_func must be callable (indices -> problem); got {self.prob_func!r}")
        if self.output_func is not None and not callable(self.output_func):
            raise TypeError(f"output_func must be callable (sol, indices) -> tensor; got {self.output_func!r}")
        self.reductions: dict[str, Reduction] = _named_reductions(self.reduction)


def _named_reductions(reduction: Any) -> dict[str, Reduction]:
    if reduction is None:
        return {"moments": Moments()}
    if isinstance(reduction, Reduction):
        return {type(reduction).__name__.lower(): reduction}
    if isinstance(reduction, dict):
        items = list(reduction.items())
    elif isinstance(reduction, (list, tuple)):
        items = [(type(r).__name__.lower(), r) for r in reduction]
    else:
        raise TypeError(
            f"reduction must be a deb Reduction (Moments(), Quantiles(), Collect()), a list or dict of "
            f"them, or None; got {reduction!r}"
        )
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"reduction: duplicate names {names}; pass a dict to name them")
    for name, r in items:
        if not isinstance(r, Reduction):
            raise TypeError(f"reduction[{name!r}] must be a deb Reduction; got {r!r}")
    return dict(items)


@dataclass
class EnsembleSolution:
    """Result of :func:`solve_ensemble`.

    Attributes:
        n: number of samples solved.
        result: one dict per reduction, by name (``"moments"`` by default):
            ``result["moments"]["mean"]`` etc.  With a single reduction, ``esol["mean"]``
            reads it directly.
        retcodes: ``{ReturnCode name: count}`` over all samples.
        nf: total drift evaluations.
        batches: number of batches; world_size: processes that shared them.
    """

    n: int
    result: dict[str, dict[str, Any]]
    retcodes: dict[str, int]
    nf: int
    batches: int
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if len(self.result) == 1:
            return next(iter(self.result.values()))[key]
        return self.result[key]

    @property
    def successful(self) -> int:
        return sum(v for k, v in self.retcodes.items() if ReturnCode[k].successful)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the batches of ``n`` samples."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def solve_batch(
    eprob: EnsembleProblem, start: int, stop: int, solve_kwargs: dict[str, Any], device: torch.device | str | None = None
) -> dict[str, Any]:
    """Solve samples ``start..stop-1`` and return their partial reduction states (and counts)."""
    from .solve import solve

    indices = torch.arange(start, stop, dtype=torch.int64, device=device)
    prob = eprob.prob_func(indices)
    if not isinstance(prob, ODEProblem):
        raise TypeError(f"prob_func must return a deb.SDEProblem or deb.ODEProblem; got {type(prob).__name__}")
    if prob.batch_size != stop - start:
        raise ValueError(f"prob_func returned a problem with {prob.batch_size} samples for {stop - start} indices")
    kwargs = dict(solve_kwargs)
    tol = kwargs.pop("brownian_tol", None)
    if tol is not None and isinstance(prob, SDEProblem):  # the tree solve() would make, coarser
        lo, hi = sorted(prob.tspan)
        kwargs["brownian"] = VirtualBrownianTree(
            lo,
            hi,
            (prob.batch_size, *prob.noise_shape),
            seed=kwargs.pop("seed", 0),
            tol=tol,
            dtype=prob.y0.dtype,
            device=prob.y0.device,
            sample_offset=start,
        )
        sol = solve(prob, **kwargs)
    else:
        kwargs.pop("brownian_tol", None)
        sol = solve(prob, sample_offset=start, **kwargs)
    out = (eprob.output_func or default_output)(sol, indices)
    if not isinstance(out, Tensor) or out.shape[:1] != (stop - start,):
        raise ValueError(
            f"output_func must return a tensor with {stop - start} rows; got "
            f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
        )
    ok = _successful(sol.retcodes)
    keep = ok.nonzero().squeeze(1)  # one host sync per batch
    values, kept = out.detach()[keep], indices[keep]
    partials = {name: r.partial(values, kept) for name, r in eprob.reductions.items()}
    codes = torch.bincount(sol.retcodes.long().cpu(), minlength=len(ReturnCode))
    return {"partials": partials, "codes": codes, "nf": int(sol.stats.nf.sum())}


def _successful(retcodes: Tensor) -> Tensor:
    good = [int(c) for c in ReturnCode if c.successful]
    mask = torch.zeros_like(retcodes, dtype=torch.bool)
    for code in good:
        mask = mask | (retcodes == code)
    return mask


def fold(eprob: EnsembleProblem, batch_results: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], Tensor, int]:
    """Merge per-batch results in the order given (batch order): states, return-code counts, nf."""
    states: dict[str, Any] = {}
    codes = torch.zeros(len(ReturnCode), dtype=torch.int64)
    nf = 0
    for part in batch_results:
        for name, r in eprob.reductions.items():
            states[name] = part["partials"][name] if name not in states else r.merge(states[name], part["partials"][name])
        codes = codes + part["codes"]
        nf += part["nf"]
    return states, codes, nf


def finish(
    eprob: EnsembleProblem, n: int, states: dict[str, Any], codes: Tensor, nf: int, batches: int, world_size: int = 1
) -> EnsembleSolution:
    result = {name: eprob.reductions[name].result(state) for name, state in states.items()}
    retcodes = {ReturnCode(i).name: int(c) for i, c in enumerate(codes.tolist()) if c}
    return EnsembleSolution(n=n, result=result, retcodes=retcodes, nf=nf, batches=batches, world_size=world_size)


def check_ensemble_args(eprob: Any, n: Any, batch_size: Any) -> int:
    """Validate and return the batch size (default ``min(n, 100_000)``)."""
    if not isinstance(eprob, EnsembleProblem):
        raise TypeError(f"eprob must be a deb.EnsembleProblem; got {type(eprob).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if batch_size is None:
        return min(n, 100_000)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")
    return batch_size


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the test/bench extras
        return None
    return tqdm(total=total, desc=desc, unit="path", file=sys.stderr, leave=False)


def solve_ensemble(
    eprob: EnsembleProblem,
    n: int,
    batch_size: int | None = None,
    *,
    progress: bool = False,
    distributed: bool = False,
    device: torch.device | str | None = None,
    **solve_kwargs: Any,
) -> EnsembleSolution:
    """Solve ``n`` samples of ``eprob`` in batches and reduce them as they stream.

    Args:
        eprob: the :class:`EnsembleProblem`.
        n: number of samples (global indices ``0 .. n-1``).
        batch_size: samples per :func:`~diffeqbridge.solve` call (default ``min(n, 100_000)``).
            Batch ``k`` holds indices ``k*batch_size ...`` and is solved with
            ``sample_offset=k*batch_size``, so its paths are those of one big batch.
        progress: a tqdm bar over samples (rank 0 only when distributed).
        distributed: share the batches among the processes of the initialised
            ``torch.distributed`` process group (or initialise one from ``torchrun``'s
            environment); see :mod:`diffeqbridge.distributed`.  Every rank returns the same
            :class:`EnsembleSolution`, bit for bit equal to the one-process result.
        device: where the ``indices`` passed to ``prob_func`` live (default CPU;
            distributed on GPUs: the rank's ``cuda:LOCAL_RANK``).
        **solve_kwargs: passed to every :func:`~diffeqbridge.solve` call (``alg``, ``dt``,
            ``seed``, ``saveat``, ``atol``, ...; not ``sample_offset``), and ``brownian_tol``:
            the finest resolution of the Brownian trees (``VirtualBrownianTree(tol=...)``;
            default the tree's ``(t1 - t0) 2^-20``).  A fixed-step solve whose steps are
            dyadic fractions of the span needs no finer tree than its step, and a shallow
            tree is much cheaper to query.

    Returns:
        :class:`EnsembleSolution`.
    """
    batch_size = check_ensemble_args(eprob, n, batch_size)
    if "sample_offset" in solve_kwargs or "brownian" in solve_kwargs:
        raise ValueError("solve_ensemble sets sample_offset per batch; do not pass sample_offset or brownian")
    if distributed:
        from .distributed import solve_ensemble_distributed

        return solve_ensemble_distributed(eprob, n, batch_size, progress=progress, device=device, **solve_kwargs)
    bounds = batch_bounds(n, batch_size)
    bar = _progress(progress, n, "ensemble")

    def batches() -> Iterable[dict[str, Any]]:
        for start, stop in bounds:
            part = solve_batch(eprob, start, stop, solve_kwargs, device)
            if bar is not None:
                bar.update(stop - start)
            yield part

    states, codes, nf = fold(eprob, batches())  # streaming: one batch's outputs alive at a time
    if bar is not None:
        bar.close()
    return finish(eprob, n, states, codes, nf, len(bounds))
