"""The ensemble that tests/test_ensemble.py solves in one process and under ``torchrun`` (2 ranks).

Run as ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ensemble_worker.py OUT``:
rank 0 writes the result to OUT (``torch.save``).
"""

from __future__ import annotations

import sys

import torch

import diffeqbridge as deb

N, BATCH = 350, 50  # 7 batches: ranks get 4 and 3


def ensemble() -> deb.EnsembleProblem:
    """GBM with a per-sample drift taken from the global index, adaptive SOSRI."""

    def prob_func(indices: torch.Tensor) -> deb.SDEProblem:
        mu = (0.5 + 0.1 * (indices % 5).to(torch.float64)).unsqueeze(1)  # (b, 1)
        y0 = torch.ones(indices.shape[0], 1, dtype=torch.float64)
        return deb.SDEProblem(lambda t, y: mu * y, lambda t, y: 0.4 * y, y0, tspan=(0.0, 1.0))

    return deb.EnsembleProblem(prob_func, reduction={"m": deb.Moments(), "q": deb.Quantiles(capacity=256), "all": deb.Collect()})


def run(distributed: bool) -> deb.EnsembleSolution:
    return deb.solve_ensemble(ensemble(), N, batch_size=BATCH, distributed=distributed, alg=deb.SOSRI(), seed=7)


if __name__ == "__main__":
    torch.set_num_threads(1)
    esol = run(distributed=True)
    if torch.distributed.get_rank() == 0:
        torch.save({"result": esol.result, "retcodes": esol.retcodes, "nf": esol.nf, "world": esol.world_size}, sys.argv[1])
    torch.distributed.destroy_process_group()
