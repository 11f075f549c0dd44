"""Reversible Heun (Kidger, Foster, Li, Lyons 2021, "Efficient and Accurate Gradients for
Neural SDEs", NeurIPS; Algorithm 1).

A Stratonovich scheme that carries a second state ``z`` next to the solution ``y``.  With
``F(t, z) = f(t, z) dt + g(t, z) ∘ dW`` over the step ``[t_n, t_{n+1}]``::

    z_{n+1} = 2 y_n - z_n + F(t_n, z_n)
    y_{n+1} = y_n + (F(t_n, z_n) + F(t_{n+1}, z_{n+1})) / 2

and ``z_0 = y_0``.  ``F(t_{n+1}, z_{n+1})``'s evaluations are reused by the next step, so a
step costs ONE drift and ONE diffusion evaluation.  The map ``(y_n, z_n) -> (y_{n+1}, z_{n+1})``
is algebraically invertible::

    z_n = 2 y_{n+1} - z_{n+1} - F(t_{n+1}, z_{n+1}),   y_n = y_{n+1} - (F(t_n, z_n) + F(t_{n+1}, z_{n+1})) / 2

which is what ``BacksolveAdjoint`` uses to give the exact discrete gradient with O(1) memory
(see :mod:`diffeqbridge.adjoint`).  Orders (the paper's Theorems): strong 0.5 in general,
1.0 for additive noise; weak 1.0.  Fixed step (no error estimate).

The solver's state ``(z, f(t, z), g(t, z))`` lives in the engine's ``LoopState.solver_state``
(:meth:`ReversibleHeun.init` builds it from ``y0``; ``carries_state``: the engine keeps a
sample's state where its step was not accepted, and the checkpointed sensealgs differentiate
through it).
"""

from __future__ import annotations

from torch import Tensor

from ..problem import Terms, expand_to
from .base import ALL_NOISE, AbstractSolver, Startup, StepOutput

State = tuple[Tensor, Tensor, Tensor]  # (z, f(t, z), g(t, z))


def reversible_heun_step(terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor, state: State) -> tuple[Tensor, State]:
    """One step ``(y_n, state_n) -> (y_{n+1}, state_{n+1})``; shapes as :meth:`AbstractSolver.step`."""
    assert terms.diffusion is not None
    z, f_z, g_z = state
    dt_b = expand_to(dt, y)
    z1 = 2.0 * y - z + f_z * dt_b + terms.g_dw(g_z, dw)
    t1 = t + dt
    f_z1, g_z1 = terms.drift(t1, z1), terms.diffusion(t1, z1)
    # halving dt and dW rather than the sums: the same products bit for bit (a power of two),
    # two fewer operations on the autograd graph
    y1 = y + (f_z + f_z1) * (0.5 * dt_b) + terms.g_dw(g_z + g_z1, 0.5 * dw)
    return y1, (z1, f_z1, g_z1)


def reversible_heun_unstep(terms: Terms, t1: Tensor, y1: Tensor, dt: Tensor, dw: Tensor, state1: State) -> tuple[Tensor, State]:
    """The inverse of :func:`reversible_heun_step` (exact up to rounding): from
    ``(y_{n+1}, state_{n+1})`` at ``t1 = t_n + dt`` back to ``(y_n, state_n)``."""
    assert terms.diffusion is not None
    z1, f_z1, g_z1 = state1
    dt_b = expand_to(dt, y1)
    z = 2.0 * y1 - z1 - f_z1 * dt_b - terms.g_dw(g_z1, dw)
    t = t1 - dt
    f_z, g_z = terms.drift(t, z), terms.diffusion(t, z)
    y = y1 - 0.5 * (f_z + f_z1) * dt_b - terms.g_dw(0.5 * (g_z + g_z1), dw)
    return y, (z, f_z, g_z)


class ReversibleHeun(AbstractSolver):
    """Reversible Heun: Stratonovich, all noise types, strong order 0.5 (1.0 for additive
    noise), weak order 1.0, fixed step, one drift + one diffusion evaluation per step;
    algebraically reversible (exact O(1)-memory gradients with ``BacksolveAdjoint``)."""

    strong_order = 0.5
    weak_order = 1.0
    noise_types = ALL_NOISE
    interpretations = frozenset({"stratonovich"})
    carries_state = True  # (z, f(z), g(z)) in LoopState.solver_state, kept where a step is not accepted
    reversible = True
    init_uses_start = True

    def init(self, terms: Terms, t: Tensor, y0: Tensor, startup: Startup | None = None) -> State:
        """``(z_0, f(t_0, z_0), g(t_0, z_0))`` with ``z_0 = y_0``: the start-up's values where
        ``solve`` evaluated (and counted) them, else evaluated here."""
        assert terms.diffusion is not None
        f0 = startup.f0 if startup is not None and startup.f0 is not None else terms.drift(t, y0)
        g0 = startup.g0 if startup is not None and startup.g0 is not None else terms.diffusion(t, y0)
        return (y0, f0, g0)

    def step(  # type: ignore[override]
        self,
        terms: Terms,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        dw: Tensor | None,
        levy_h: Tensor | None,
        f0: None,
        state: State,
    ) -> StepOutput:
        assert dw is not None
        y1, state1 = reversible_heun_step(terms, t, y, dt, dw, state)
        return StepOutput(y1, None, nf=1, ng=1, state=state1)
