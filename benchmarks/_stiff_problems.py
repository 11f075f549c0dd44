"""Stiff ODE test problems of the Hairer/Wanner test set, written once for torch and jax.

Robertson (t in [0, 40]), HIRES (t in [0, 321.8122]) and Van der Pol with eps = 1e-6 (t in
[0, 2]); references y(T) are the test set's RADAU solutions (E. Hairer, G. Wanner, "Solving
Ordinary Differential Equations II", and the IVP test set of Mazzia & Magherini).  Used by
``benchmarks/stiff_work_precision.py`` (torch and jax) and ``tests/test_stiff_ode.py``
(``examples/stiff_chemistry.py`` keeps its own copy on purpose: an example stands alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# name -> (T, y0, y(T))
REFERENCES = {
    "robertson": (40.0, [1.0, 0.0, 0.0], [0.7158270687193941, 9.185534764557338e-6, 0.2841637457458413]),
    "hires": (
        321.8122,
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057],
        [
            7.371312573325668e-4,
            1.442485726316185e-4,
            5.888729740967575e-5,
            1.175651343283149e-3,
            2.386356198831331e-3,
            6.238968252742796e-3,
            2.849998395185769e-3,
            2.850001604814231e-3,
        ],
    ),
    "vanderpol": (2.0, [2.0, 0.0], [1.706167732170483, -0.8928097010247975]),
}


def fields(stack: Callable[[list[Any]], Any]) -> dict[str, Callable[[Any, Any], Any]]:
    """``{name: f(t, y)}`` for states ``y`` of shape ``(..., n)``; ``stack`` joins a list of ``(...)``
    components along a new last axis (``lambda xs: torch.stack(xs, -1)``, or jax.numpy's)."""

    def robertson(t, y):
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        return stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2])

    def hires(t, y):
        y1, y2, y3, y4, y5, y6, y7, y8 = (y[..., i] for i in range(8))
        return stack(
            [
                -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
                1.71 * y1 - 8.75 * y2,
                -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
                8.32 * y2 + 1.71 * y3 - 1.12 * y4,
                -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
                -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
                280.0 * y6 * y8 - 1.81 * y7,
                -280.0 * y6 * y8 + 1.81 * y7,
            ]
        )

    def vanderpol(t, y):
        a, b = y[..., 0], y[..., 1]
        return stack([b, ((1 - a * a) * b - a) / 1e-6])

    return {"robertson": robertson, "hires": hires, "vanderpol": vanderpol}
