"""Stabilized explicit (Chebyshev) SDE solvers: ``SROCK1``.

S-ROCK methods extend the stability interval of an explicit method quadratically with
the number of stages ``s`` (about ``2 s²`` along the negative real axis, less the damping)
by running the drift through a damped Chebyshev recursion, then adding the noise at the
end.  For mildly stiff problems (a dominant eigenvalue ``ρ`` with ``ρ dt`` in the tens to
thousands) they need no Jacobian and no linear solve.

Step (every sample its own ``s``, ``η``; ``T_j`` Chebyshev polynomials)::

    ω0 = 1 + η / s²,   ω1 = T_s(ω0) / T_s'(ω0)
    K0 = y,   K1 = y + dt (ω1/ω0) f(t, K0)
    Kj = 2 dt ω1 (T_{j-1}/T_j) f(t_{j-1}, K_{j-1}) + 2 ω0 (T_{j-1}/T_j) K_{j-1} - (T_{j-2}/T_j) K_{j-2}
    Itô, diagonal/scalar noise (derivative-free Milstein correction, as StochasticDiffEq):
        y1 = K_s + g_s ΔW + (g(K_{s-1} + √dt g_s) - g_s) / (2√dt) · (ΔW² - dt),   g_s = g(t_{s-1}, K_{s-1})
    general noise:  y1 = K_s + g(t_{s-1}, K_{s-1}) ΔW

with the stage times following the same recursion.  The stage count is chosen per sample
as StochasticDiffEq does: ``s = floor(sqrt(2 dt ρ) + 1)`` rounded up to the next entry of
``(3, 5, 7, 10, 25, 50, 75, 100, 150, 200)`` with the damping ``η`` tabulated for it
``(2.2, 12.0, 13.0, 14.3, 20.3, 27.2, 32.1, 36.0, 42.1, 46.7)`` (more damping for more
stages keeps the mean-square stability region wide enough for the noise), capped at 200.
``ρ`` comes from a user ``eigen_est(t, y) -> (B,)`` or from a nonlinear power iteration with
finite-difference Jacobian-vector products (``power_iters`` drift evaluations, times a
safety factor 1.2 as in ROCK codes); ``nstages`` fixes ``s`` instead.

Batching: the recursion runs to the largest ``s`` in the batch (one host synchronisation
per step to read it); a sample stops updating after its own ``s`` stages.

Fixed step (StochasticDiffEq's ``SROCK1`` is not adaptive); strong order 0.5 (1.0 observed
for diagonal noise thanks to the Milstein term), weak order 1.  Itô only here
(StochasticDiffEq's Stratonovich variant couples the noise into the last two stages).

Sources: A. Abdulle, T. Li, "S-ROCK methods for stiff Itô SDEs", Commun. Math. Sci. 6(4)
(2008) 845–868; A. Abdulle, S. Cirilli, "S-ROCK: Chebyshev methods for stiff stochastic
differential equations", SIAM J. Sci. Comput. 30(2) (2008) 997–1014; stage/damping table and
stage-count rule from SciML/StochasticDiffEq.jl (``SROCK1ConstantCache``,
``perform_step/SROCK_perform_step.jl``, ``choose_deg!``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..problem import Terms, expand_to
from .base import ALL_NOISE, AbstractSolver, StepOutput

STAGES = (3, 5, 7, 10, 25, 50, 75, 100, 150, 200)
DAMPING = (2.2, 12.0, 13.0, 14.3, 20.3, 27.2, 32.1, 36.0, 42.1, 46.7)


def power_iteration_eigen(f: Callable[[Tensor, Tensor], Tensor], t: Tensor, y: Tensor, fy: Tensor, iters: int) -> Tensor:
    """Per-sample estimate of the spectral radius of ``∂f/∂y`` at ``(t, y)``: ``(B,)`` float64.

    Nonlinear power iteration with forward-difference products ``J v ≈ (f(y + ε v) - f(y))/ε``
    started from ``f(t, y)`` (``iters`` drift evaluations, no autodiff needed)."""
    with torch.no_grad():
        y, fy = y.detach(), fy.detach()
        batch = y.shape[0]
        eps_machine = torch.finfo(y.dtype).eps
        ynorm = y.flatten(1).norm(dim=1)
        v = fy.clone()
        fallback = torch.ones_like(v)
        vnorm = v.flatten(1).norm(dim=1)
        v = torch.where(expand_to(vnorm > 0, v), v, fallback)
        rho = torch.zeros(batch, dtype=torch.float64, device=y.device)
        for _ in range(iters):
            vnorm = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(y.dtype).tiny)
            scale = eps_machine**0.5 * (1 + ynorm)  # size of the perturbation
            v = v * expand_to(scale / vnorm, v)
            jv = (f(t, y + v) - fy) / expand_to(scale, v)
            rho = jv.flatten(1).norm(dim=1).double()
            v = torch.where(expand_to(rho > 0, jv), jv, fallback)
    return rho


class SROCK1(AbstractSolver):
    """Stabilized explicit S-ROCK method of order 1 (weak) / 0.5 (strong), Itô, all noise
    types, fixed step (StochasticDiffEq's ``SROCK1``).

    Args:
        nstages: fixed stage count (rounded up to the table above); None: per sample from ``ρ``.
        eigen_est: ``eigen_est(t, y) -> (B,)`` spectral-radius bound of ``∂f/∂y`` (else power iteration).
        power_iters: drift evaluations of the power iteration per step.
        safety: factor on the power-iteration estimate.
    """

    strong_order = 0.5
    weak_order = 1.0
    noise_types = ALL_NOISE
    interpretations = frozenset({"ito"})
    adaptive = False
    controller_order = 0.5

    def __init__(
        self,
        nstages: int | None = None,
        *,
        eigen_est: Callable[[Tensor, Tensor], Tensor] | None = None,
        power_iters: int = 10,
        safety: float = 1.2,
    ):
        if nstages is not None and (isinstance(nstages, bool) or not isinstance(nstages, int) or nstages < 1):
            raise ValueError(f"nstages must be a positive int or None; got {nstages!r}")
        if nstages is not None and nstages > STAGES[-1]:
            raise ValueError(f"nstages must be at most {STAGES[-1]}; got {nstages}")
        if eigen_est is not None and not callable(eigen_est):
            raise TypeError(f"eigen_est must be a callable eigen_est(t, y) -> (B,); got {eigen_est!r}")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be a positive int; got {power_iters!r}")
        if not safety >= 1.0:
            raise ValueError(f"safety must be >= 1; got {safety!r}")
        self.nstages, self.eigen_est, self.power_iters, self.safety = nstages, eigen_est, power_iters, float(safety)

    def _stages(self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, fy: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """``(s (B,) long, η (B,) float64, ρ (B,) float64, nf spent)``."""
        table = torch.tensor(STAGES, dtype=torch.float64, device=y.device)
        nf = 0
        if self.nstages is not None:
            raw = torch.full((y.shape[0],), float(self.nstages), dtype=torch.float64, device=y.device)
            rho = torch.full_like(raw, float("nan"))
        else:
            if self.eigen_est is not None:
                rho = torch.as_tensor(self.eigen_est(t, y.detach()), dtype=torch.float64, device=y.device)
                rho = rho.expand(y.shape[0]).detach()
            else:
                rho = self.safety * power_iteration_eigen(terms.drift, t, y, fy, self.power_iters)
                nf = self.power_iters
            raw = torch.floor(torch.sqrt(2 * dt.double().abs() * rho) + 1)
            # a sample whose drift is NaN/Inf has no spectral radius: one stage (its step is
            # non-finite and the engine stops it), instead of an out-of-range table index
            raw = torch.where(torch.isfinite(raw), raw, torch.ones_like(raw))
        index = torch.searchsorted(table, raw.clamp(max=STAGES[-1]).contiguous())
        stages = table[index].long()
        eta = torch.tensor(DAMPING, dtype=torch.float64, device=y.device)[index]
        return stages, eta, rho, nf

    def step(
        self, terms: Terms, t: Tensor, y: Tensor, dt: Tensor, dw: Tensor | None, levy_h: Tensor | None, f0: Tensor | None = None
    ) -> StepOutput:
        assert terms.diffusion is not None and dw is not None
        f, dtype = terms.drift, y.dtype
        k = f(t, y)
        stages, eta, rho, nf_eig = self._stages(terms, t, y, dt, k)
        s = stages.double()
        w0 = 1 + eta / (s * s)
        root = torch.sqrt(w0 * w0 - 1)
        acosh = torch.log(w0 + root)
        w1 = root * torch.cosh(s * acosh) / (s * torch.sinh(s * acosh))
        w0y, w1y = expand_to(w0.to(dtype), y), expand_to(w1.to(dtype), y)
        dt_y = expand_to(dt, y)
        tc = t.double()
        dtd = dt.double()

        u_prev2, u_prev = y, y + dt_y * (w1y / w0y) * k
        t_prev2, t_prev = tc, tc + dtd * w1 / w0
        T2, T1 = torch.ones_like(w0), w0
        u_last, u_before, t_before = u_prev, y, tc  # samples with s = 1 never occur (s >= 3)
        m = int(stages.max())  # one host synchronisation: the batch's longest recursion
        for i in range(2, m + 1):
            Ti = 2 * w0 * T1 - T2
            mu, nu, kappa = 2 * w1 * T1 / Ti, 2 * w0 * T1 / Ti, -T2 / Ti
            k = f(t_prev.to(t.dtype), u_prev)
            u = (
                (dt_y * expand_to(mu.to(dtype), y)) * k
                + expand_to(nu.to(dtype), y) * u_prev
                + expand_to(kappa.to(dtype), y) * u_prev2
            )
            t_i = dtd * mu + nu * t_prev + kappa * t_prev2
            live = i <= stages
            done = i == stages
            u_last = torch.where(expand_to(done, y), u, u_last)
            u_before = torch.where(expand_to(done, y), u_prev, u_before)
            t_before = torch.where(done, t_prev, t_before)
            # a sample past its own stage count stops updating
            u_prev2 = torch.where(expand_to(live, y), u_prev, u_prev2)
            u_prev = torch.where(expand_to(live, y), u, u_prev)
            t_prev2, t_prev = torch.where(live, t_prev, t_prev2), torch.where(live, t_i, t_prev)
            T2, T1 = torch.where(live, T1, T2), torch.where(live, Ti, T1)
        tb = t_before.to(t.dtype)
        g = terms.diffusion(tb, u_before)
        if terms.noise == "general":
            y1 = u_last + terms.g_dw(g, dw)
            ng = 1
        else:
            abs_dt = dt_y.abs()  # noise scale: |dt| when time runs backwards
            sqrt_dt = torch.sqrt(abs_dt)
            dw_state = terms.noise_like_state(dw, y)
            g_support = terms.diffusion(tb, u_before + sqrt_dt * g)
            y1 = u_last + g * dw_state + (g_support - g) / (2 * sqrt_dt) * (dw_state * dw_state - abs_dt)
            ng = 2
        nf = stages + nf_eig
        return StepOutput(y1, None, nf=nf, ng=ng, stiffness=None if self.nstages is not None else rho)

    def __repr__(self) -> str:
        return "SROCK1()" if self.nstages is None else f"SROCK1(nstages={self.nstages})"


__all__ = ["DAMPING", "SROCK1", "STAGES", "power_iteration_eigen"]
