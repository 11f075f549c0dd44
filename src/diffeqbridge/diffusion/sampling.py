"""``dd.sample``: every sampler behind one call, each returning a :class:`~diffeqbridge.Solution`.

Time runs from ``sde.T`` down to ``t_end``.  The reverse-time SDE and the probability-flow
ODE (Song et al. 2021, eqs. 6 and 13) of the forward process ``dx = f(t) x dt + g(t) dW``::

    reverse SDE:       dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dW̄
    probability flow:  dx = [f(t) x - g(t)^2 score(x, t) / 2] dt

are solved by :func:`diffeqbridge.solve` on ``tspan = (T, t_end)`` (the engine's own
backward-time integration: negative steps, the Brownian increment over ``[t - h, t]``), so
every deb solver, the per-sample step-size controller, the Brownian tree and the sensealgs
apply unchanged.  The reverse SDE has additive noise: the default is ``SRA1`` (Rößler 2010's
strong order-1.5 scheme for additive noise, two stages, embedded error estimate) at
``atol = rtol = 1e-2`` (SciML's SDE defaults).  Measured on the 2-D mixture (VP, exact score,
100 samples; strong error of ``x(t_end)``, mean and max over samples, against a ``SRA1`` solve
at ``3e-4`` on the same Brownian path)::

    tolerance                1e-3               1e-2              5e-2             2e-1
    SRA1   NFE, mean/max err  1035, 3.4e-4/2.7e-3  238, 3.6e-3/2.6e-2  97, 4.5e-2/2.2  55, 6.7e-2/0.21
    SOSRA  NFE, mean/max err  1550, 4.5e-4/8.6e-3  357, 5.3e-3/2.3e-2  145, 2.8e-2/0.23  80, 1.0e-1/3.3

(``SOSRA``, the package's general default for additive noise, buys stability this problem
does not need with a third stage.  From ``5e-2`` up single samples change mixture component
-- max errors of 2-3 -- while component weights/stds stay within sampling noise.)

A rejected step re-queries the Brownian tree at the shorter step -- the noise of the
accepted path is a fixed Brownian path, so adaptivity adds no bias (samplers that redraw noise
after a rejection, e.g. Jolicoeur-Martineau et al. 2021's "Gotta Go Fast", select the draws the
controller accepts and distort the law; see ``tests/test_diffusion_sampling.py`` and
docs/diffusion.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..brownian import VirtualBrownianTree
from ..problem import ODEProblem, SDEProblem, expand_to
from ..solution import Solution
from ..solve import solve
from ..solvers import SRA1, Tsit5
from .common import (
    STREAMS,
    check_model_dtype,
    check_seed,
    check_steps,
    check_t_end,
    check_x,
    grid_solution,
    per_sample_normal,
)
from .models import ModelAdapter, as_adapter, check_model, check_parameterization, check_sde
from .processes import DiffusionProcess

METHODS = ("sde", "ode", "pc", "dpm_solver", "edm", "bdia", "edict")
PAIR_METHODS = ("bdia", "edict")  # their state may be the pair dd.invert returns

# defaults of the engine-based samplers (documented in dd.sample)
SDE_TOLERANCES = (1e-2, 1e-2)
ODE_TOLERANCES = (1e-5, 1e-5)  # score_sde's ode_sampler
PC_STEPS = 1000  # score_sde's N


def _check_tolerance(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number or None; got {value!r}")
    return float(value)


def _check_state(method: str, x_T: Any) -> Any:
    if method in PAIR_METHODS and isinstance(x_T, (tuple, list)):
        if len(x_T) != 2:
            raise ValueError(f"x_T for method={method!r} is a tensor or the pair dd.invert returns; got {len(x_T)} items")
        a, b = (check_x("x_T", v) for v in x_T)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError("the two states of x_T must share shape and dtype")
        return x_T  # as given: dd.invert's InversionState keeps its grid
    return check_x("x_T", x_T)


def _first_state(x_T: Any) -> Tensor:
    return x_T[0] if isinstance(x_T, (tuple, list)) else x_T


def sample(
    model: Any,
    sde: DiffusionProcess,
    x_T: Tensor,
    method: str = "sde",
    parameterization: str = "eps",
    alg: Any = None,
    t_end: float = 1e-3,
    atol: float | None = None,
    rtol: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    sensealg: Any = None,
    **options: Any,
) -> Solution:
    """Sample ``p_{t_end}`` by integrating from ``x_T ~ prior`` at ``T`` down to ``t_end``.

    Args:
        model: ``model(x, t)`` -> ``x``'s shape, ``t`` of shape ``(B,)`` (``nn.Module`` or
            function), predicting ``parameterization``; or a :class:`ModelAdapter`.
        sde: the forward process (``dd.VPSDE()``, ...).
        x_T: ``(B, *state_shape)`` starting states (``sde.prior_sample(...)``).
        method: ``"sde"`` (reverse-time SDE), ``"ode"`` (probability flow), ``"pc"``
            (Euler--Maruyama predictor + Langevin corrector), ``"dpm_solver"``, ``"edm"``,
            ``"bdia"``, ``"edict"``.
        parameterization: what ``model`` predicts: ``"eps"`` | ``"x0"`` | ``"score"`` | ``"v"``.
        alg: ``"sde"``: any deb SDE solver supporting additive noise (default ``SRA1()``,
            adaptive, see the module docstring); ``"ode"``: any deb ODE solver (default ``Tsit5()``).  Other methods
            take their options through ``**options``.
        t_end: where sampling stops, in ``(0, T)`` (score_sde's ``eps = 1e-3``).
        atol, rtol: ``"sde"``: default ``1e-2``/``1e-2`` (module docstring: about 240 model
            evaluations per sample on the 2-D mixture, strong error 4e-3);
            ``"ode"``: ``1e-5``/``1e-5`` (score_sde's probability-flow sampler).
        steps: fixed number of steps: ``"sde"``/``"ode"``: a fixed-step solve with
            ``dt = (T - t_end) / steps`` (needed for non-adaptive solvers such as ``EM``);
            ``"pc"``: predictor steps (default 1000); the fixed-grid methods: their grid.
        seed: the Brownian tree's seed (and every other per-sample draw): sample ``i``
            depends on ``(seed, i)`` only.
        sensealg: gradients w.r.t. ``x_T``, the model's parameters and guidance
            conditioning: ``"sde"``/``"ode"``: any deb sensealg (the model's parameters are
            passed as the problem's ``params``); ``"pc"``: ``None`` (autograd through the loop).
        **options: ``"sde"``/``"ode"``: passed to :func:`diffeqbridge.solve` (``saveat``
            -- decreasing times from ``T`` to ``t_end`` --, ``max_steps``, ``brownian``,
            ``adaptive``, ``dt`` ...); ``"pc"``: ``snr=0.16``, ``n_corrector=1``,
            ``denoise=True``, ``step_size="schedule"``, ``sigma_data=1``; other methods: their own keywords.

    Returns:
        :class:`~diffeqbridge.Solution`: ``ys[-1]`` the samples at ``t_end`` ``(B, *state_shape)``,
        ``stats.nf`` model evaluations per sample (``(B,)``; guidance counts its network
        calls), ``retcodes`` per sample.

    Everything is validated before the first model call.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    sde = check_sde(sde)
    check_model(model)
    if not isinstance(model, ModelAdapter):
        check_parameterization(parameterization)
    x_T = _check_state(method, x_T)
    check_model_dtype(model, _first_state(x_T))
    t_end = check_t_end(t_end, sde.T)
    check_seed(seed)
    if steps is not None:
        check_steps(steps)
    atol, rtol = _check_tolerance("atol", atol), _check_tolerance("rtol", rtol)
    adapter = as_adapter(model, sde, parameterization)
    if method == "sde":
        return sample_reverse_sde(
            adapter, sde, x_T, alg=alg, t_end=t_end, atol=atol, rtol=rtol, steps=steps, seed=seed, sensealg=sensealg, **options
        )
    if method == "ode":
        return sample_probability_flow(
            adapter, sde, x_T, alg=alg, t_end=t_end, atol=atol, rtol=rtol, steps=steps, seed=seed, sensealg=sensealg, **options
        )
    if alg is not None:
        raise ValueError(f"alg= applies to methods 'sde' and 'ode'; method={method!r} takes its options as keywords")
    if method == "pc":
        if sensealg is not None:
            raise ValueError("method='pc' is differentiated by autograd through its loop; pass sensealg=None")
        if atol is not None or rtol is not None:
            raise ValueError("method='pc' is a fixed-grid sampler: atol/rtol do not apply")
        return sample_pc(adapter, sde, x_T, t_end=t_end, steps=steps, seed=seed, **options)
    tolerances: dict[str, Any] = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    if sensealg is not None:
        options["sensealg"] = sensealg
    if method == "dpm_solver":
        from .dpm_solver import sample_dpm_solver

        return sample_dpm_solver(adapter, sde, x_T, t_end=t_end, steps=steps, seed=seed, **tolerances, **options)
    if method == "edm":
        from .edm import sample_edm

        return sample_edm(adapter, sde, x_T, t_end=t_end, steps=steps, seed=seed, **tolerances, **options)
    from . import inversion

    fn = inversion.sample_bdia if method == "bdia" else inversion.sample_edict
    return fn(adapter, sde, x_T, t_end=t_end, steps=steps, seed=seed, **tolerances, **options)


# ---------------------------------------------------------------------- engine-based samplers
def reverse_sde_drift(adapter: ModelAdapter, sde: DiffusionProcess, scale: float = 1.0) -> Any:
    """``(t, x) -> f(t) x - scale g(t)^2 score(x, t)``: ``scale = 1`` the reverse SDE's drift,
    ``1/2`` the probability-flow ODE's."""

    def drift(t: Tensor, x: Tensor) -> Tensor:
        g2 = expand_to(sde.g2(t).to(x.dtype), x)
        return sde.drift(t, x) - scale * g2 * adapter.score(x, t)

    return drift


def _solve_kwargs(steps: int | None, t_end: float, sde: DiffusionProcess, options: dict[str, Any]) -> dict[str, Any]:
    if steps is not None:
        if "dt" in options:
            raise ValueError("pass steps= or dt=, not both")
        options = {**options, "dt": (sde.T - t_end) / steps, "adaptive": options.get("adaptive", False)}
    return options


def _scale_nf(sol: Solution, adapter: ModelAdapter) -> Solution:
    per_call = int(getattr(adapter.model, "evaluations_per_call", 1))
    if per_call != 1:
        sol.stats.nf = sol.stats.nf * per_call
    return sol


def sample_reverse_sde(
    adapter: ModelAdapter,
    sde: DiffusionProcess,
    x_T: Tensor,
    alg: Any = None,
    t_end: float = 1e-3,
    atol: float | None = None,
    rtol: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    sensealg: Any = None,
    **options: Any,
) -> Solution:
    """The reverse-time SDE from ``T`` to ``t_end`` with :func:`diffeqbridge.solve` (see :func:`sample`)."""
    prob = SDEProblem(
        reverse_sde_drift(adapter, sde), sde.diffusion, x_T, tspan=(sde.T, t_end), noise="additive", params=adapter.parameters()
    )
    sol = solve(
        prob,
        alg if alg is not None else SRA1(),
        atol=SDE_TOLERANCES[0] if atol is None else atol,
        rtol=SDE_TOLERANCES[1] if rtol is None else rtol,
        seed=seed,
        sensealg=sensealg,
        **_solve_kwargs(steps, t_end, sde, options),
    )
    return _scale_nf(sol, adapter)


def sample_probability_flow(
    adapter: ModelAdapter,
    sde: DiffusionProcess,
    x_T: Tensor,
    alg: Any = None,
    t_end: float = 1e-3,
    atol: float | None = None,
    rtol: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    sensealg: Any = None,
    **options: Any,
) -> Solution:
    """The probability-flow ODE from ``T`` to ``t_end`` with :func:`diffeqbridge.solve` (see :func:`sample`).
    ``seed`` is unused (deterministic), accepted for a uniform signature."""
    prob = ODEProblem(reverse_sde_drift(adapter, sde, 0.5), x_T, tspan=(sde.T, t_end), params=adapter.parameters())
    sol = solve(
        prob,
        alg if alg is not None else Tsit5(),
        atol=ODE_TOLERANCES[0] if atol is None else atol,
        rtol=ODE_TOLERANCES[1] if rtol is None else rtol,
        sensealg=sensealg,
        **_solve_kwargs(steps, t_end, sde, options),
    )
    return _scale_nf(sol, adapter)


# ---------------------------------------------------------------------- predictor-corrector
CORRECTOR_STEP_SIZES = ("schedule", "batch")


def _check_pc_options(snr: Any, n_corrector: Any, step_size: Any, sigma_data: Any) -> tuple[float, int, str, float]:
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a positive number; got {snr!r}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be a non-negative int; got {n_corrector!r}")
    if step_size not in CORRECTOR_STEP_SIZES:
        raise ValueError(f"step_size must be one of {CORRECTOR_STEP_SIZES}; got {step_size!r}")
    if (
        isinstance(sigma_data, bool)
        or not isinstance(sigma_data, (int, float))
        or not (math.isfinite(sigma_data) and sigma_data > 0)
    ):
        raise ValueError(f"sigma_data must be a positive number; got {sigma_data!r}")
    return float(snr), n_corrector, step_size, float(sigma_data)


def langevin_step(
    adapter: ModelAdapter, x: Tensor, t: Tensor, z: Tensor, snr: float, ratio: Tensor, fisher: Tensor | None = None
) -> Tensor:
    """One Langevin corrector step ``x <- x + e s + sqrt(2 e) z`` (score_sde's ``LangevinCorrector``).

    ``e = 2 ratio snr^2 |z|^2 / F`` with ``F`` the Fisher information ``E|s|^2``.  score_sde
    takes ``|z|`` and ``|s|`` as norms AVERAGED OVER THE BATCH (``fisher=None``), so every
    sample's step depends on the others.  Given ``fisher`` ``(B,)`` (a function of ``t`` only)
    the step is per sample, ``e = 2 ratio snr^2 D / F`` (``D = E|z|^2``).  The step must not
    depend on the sample's own state or noise: measured on the 2-D mixture (component std
    0.5), per-sample norms ``|s_i|`` gave stds 1.2-1.7 (steps blow up at the modes), a
    per-sample Fisher estimate ``max(|s_i|^2, -div s_i)`` still 0.56-0.63 (a state-dependent
    step changes the Langevin diffusion's invariant law to ``p / e``), the drawn ``|z_i|^2``
    instead of ``D`` 0.74-0.93 (noise ``~ |z| z``).  ``ratio`` ``(B,)`` is
    ``alpha(t)^2 / alpha(t_next)^2`` (score_sde's ``1 - beta_i`` for VP, 1 for VE).
    """
    score = adapter.score(x, t)
    if fisher is None:
        fisher = score.detach().flatten(1).norm(dim=1).mean().square().expand(x.shape[0])
        noise_sq = z.flatten(1).norm(dim=1).mean().square()
    else:
        noise_sq = torch.tensor(float(z[0].numel()), dtype=x.dtype, device=x.device)
    fisher = fisher.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny)
    step = expand_to(2.0 * ratio.to(x.dtype) * snr**2 * noise_sq / fisher, x)
    return x + step * score + torch.sqrt(2.0 * step) * z


def schedule_fisher(sde: DiffusionProcess, t: Tensor, dim: int, sigma_data: float) -> Tensor:
    """``D / (alpha^2 sigma_data^2 + sigma^2)``: the Fisher information ``E|s|^2`` of ``p_t`` when
    the data are ``N(0, sigma_data^2 I)`` -- a per-time, state-free Fisher for the corrector."""
    alpha, sigma = sde.marginal(t)
    return dim / (alpha.square() * sigma_data**2 + sigma.square())


def sample_pc(
    adapter: ModelAdapter,
    sde: DiffusionProcess,
    x_T: Tensor,
    t_end: float = 1e-3,
    steps: int | None = None,
    seed: int = 0,
    snr: float = 0.16,
    n_corrector: int = 1,
    denoise: bool = True,
    step_size: str = "schedule",
    sigma_data: float = 1.0,
    brownian: VirtualBrownianTree | None = None,
) -> Solution:
    """Predictor--corrector sampling (Song et al. 2021, Algorithm 1 with an EM predictor).

    On the uniform grid ``t_0 = T > ... > t_steps = t_end``, step ``i``: ``n_corrector``
    Langevin steps at ``t_i`` (:func:`langevin_step`, noise from :func:`per_sample_normal`;
    ``step_size="schedule"``: per-sample steps from :func:`schedule_fisher` with ``sigma_data``
    the data's std per element; ``"batch"``: score_sde's batch-averaged norms, which couple
    the samples),
    then one Euler--Maruyama step of the reverse SDE to ``t_{i+1}`` whose Brownian increment
    ``W(t_{i+1}) - W(t_i)`` comes from a :class:`~diffeqbridge.VirtualBrownianTree` on
    ``[t_end, T]`` (``seed``, or ``brownian``).  ``denoise=True`` returns the last predictor
    step's mean (no noise in the last step), as score_sde.  NFE per sample:
    ``steps (1 + n_corrector)``.

    Returns a Solution with ``ts = (T, t_end)``, ``ys`` ``(2, B, *state_shape)``.
    """
    steps = check_steps(steps, PC_STEPS)
    snr, n_corrector, step_size, sigma_data = _check_pc_options(snr, n_corrector, step_size, sigma_data)
    x = x_T
    batch, dtype, device = x.shape[0], x.dtype, x.device
    if brownian is None:
        brownian = VirtualBrownianTree(t_end, sde.T, tuple(x.shape), seed=seed, dtype=dtype, device=device)
    elif not isinstance(brownian, VirtualBrownianTree) or tuple(brownian.shape) != tuple(x.shape):
        raise ValueError(f"brownian must be a deb.VirtualBrownianTree of shape {tuple(x.shape)}")
    ts = torch.linspace(sde.T, t_end, steps + 1, dtype=torch.float64)
    grid = ts.tolist()
    alpha = sde.marginal(ts)[0]
    w_prev = brownian.evaluate_scalar(grid[0], levy=False)[0]
    x_mean = x
    for i in range(steps):
        t = torch.full((batch,), grid[i], dtype=dtype, device=device)
        ratio = (alpha[i] / alpha[i + 1]).square().to(device).expand(batch)
        fisher = schedule_fisher(sde, t, x[0].numel(), sigma_data) if step_size == "schedule" else None
        for k in range(n_corrector):
            z = per_sample_normal(tuple(x.shape), seed, STREAMS["corrector"] + i * n_corrector + k, dtype, device)
            x = langevin_step(adapter, x, t, z, snr, ratio, fisher)
        h = grid[i] - grid[i + 1]
        w_next = brownian.evaluate_scalar(grid[i + 1], levy=False)[0]
        dw = brownian._shape_out(w_next - w_prev).to(dtype)
        w_prev = w_next
        drift = reverse_sde_drift(adapter, sde)(t, x)
        x_mean = x - h * drift
        x = x_mean + sde.diffusion(t, x) * dw
    final = x_mean if denoise else x
    nf = adapter.nfe_for(batch, device)
    return grid_solution(ts[[0, -1]], torch.stack([x_T, final]), nf, steps, alg="pc")
