"""Ensembles over ``torch.distributed``: one process per core or GPU, started by ``torchrun``.

::

    # run.py
    import diffeqbridge as deb
    esol = deb.solve_ensemble(eprob, 10**8, batch_size=10**6, distributed=True, alg=deb.EM(), dt=1e-2)

    $ torchrun --standalone --nproc_per_node=2 run.py     # gloo on CPU, NCCL with one GPU per rank

* Batch ``k`` (indices ``k*batch_size ...``) is solved by rank ``k mod world_size`` with
  ``sample_offset = k*batch_size``: every sample gets the Brownian path it has in one big
  batch, so per-sample outputs are bit-for-bit those of a one-process run.
* Each rank keeps one small partial reduction state per batch it solved.  At the end the
  partials are exchanged with ``all_gather_object`` and every rank folds all of them in
  batch order ``0, 1, 2, ...`` — the fold a one-process run does — so the reductions are the
  same bits too, on every rank.  Return-code counts and evaluation counts are summed with
  ``all_reduce``.
* The process group: when ``torch.distributed`` is not initialised yet, one is started from
  the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), with
  NCCL when CUDA is available and gloo otherwise; it is left open for the caller.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from .ensemble import (
    EnsembleProblem,
    EnsembleSolution,
    _progress,
    batch_bounds,
    finish,
    fold,
    solve_batch,
)
from .solution import ReturnCode

__all__ = ["init", "shard", "solve_ensemble_distributed"]


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment if needed.

    Returns ``(rank, world_size)``.  ``backend``: ``"gloo"``, ``"nccl"`` or None (NCCL when
    CUDA is available, else gloo).
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "distributed=True needs torch.distributed initialised, or a launch by torchrun "
                "(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment)"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shard(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` solves: ``k ≡ rank (mod world_size)``."""
    return list(range(rank, n_batches, world_size))


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def solve_ensemble_distributed(
    eprob: EnsembleProblem,
    n: int,
    batch_size: int,
    *,
    progress: bool = False,
    device: torch.device | str | None = None,
    **solve_kwargs: Any,
) -> EnsembleSolution:
    """:func:`diffeqbridge.solve_ensemble` with ``distributed=True`` (see the module docstring)."""
    rank, world = init()
    if device is None:
        device = _default_device()
    bounds = batch_bounds(n, batch_size)
    mine = shard(len(bounds), rank, world)
    bar = _progress(progress and rank == 0, sum(bounds[k][1] - bounds[k][0] for k in mine), f"ensemble rank {rank}")
    local: dict[int, dict[str, Any]] = {}
    for k in mine:
        start, stop = bounds[k]
        part = solve_batch(eprob, start, stop, solve_kwargs, device)
        local[k] = {"partials": part["partials"], "codes": part["codes"], "nf": part["nf"]}
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {k: v["partials"] for k, v in local.items()})
    partials: dict[int, Any] = {}
    for piece in gathered:
        partials.update(piece)
    # counts: an all_reduce of small integer tensors (on the backend's device)
    comm_device = _default_device()
    codes = torch.zeros(len(ReturnCode), dtype=torch.int64)
    for v in local.values():
        codes = codes + v["codes"]
    totals = torch.cat([codes, torch.tensor([sum(v["nf"] for v in local.values())], dtype=torch.int64)]).to(comm_device)
    dist.all_reduce(totals)
    totals = totals.cpu()
    ordered = ({"partials": partials[k], "codes": torch.zeros_like(totals[:-1]), "nf": 0} for k in range(len(bounds)))
    states, _, _ = fold(eprob, ordered)  # batch order: the one-process fold, the same bits
    return finish(eprob, n, states, totals[:-1], int(totals[-1]), len(bounds), world_size=world)
