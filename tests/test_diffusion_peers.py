"""``diffeqbridge.diffusion`` against its peers, k-diffusion and diffusers, on the same problems.

Every comparison runs the same sampler in both libraries on the same noise grid, from the same
``x_T``, with the same noise draws (stochastic samplers), on an exact closed-form denoiser (the
2-D Gaussian mixture of ``dd.GaussianMixture``), in float64.  Where the mathematics is the same
the outputs agree to ``1e-10`` relative; where the definitions differ the test says why and
checks both against the exact probability-flow solution instead.  The table of what matches and
what differs is in docs/diffusion_samplers.md ("Agreement with k-diffusion and diffusers").

* k-diffusion samplers take a denoiser ``D(x~, sigma)`` of the VE-scaled state
  ``x~ = x / alpha`` at ``sigma = sigma_t / alpha_t``; on :class:`dd.VESDE` (``alpha = 1``)
  that is our model's x0-prediction at the time of ``sigma``.  Its samplers end at the last
  entry of ``sigmas``: we pass our grid without k-diffusion's trailing zero (the peer's final
  denoising step is tested separately, against EDM's ``denoise_to_zero``).
* diffusers' schedulers hold their tables in float32 and cast the state to float32 in
  ``step``.  The ``diffusers`` fixture runs them in float64 instead (the scheduler module's
  ``torch.float32`` and ``np.float32`` are swapped for float64): the arithmetic is theirs, only
  the precision changes (``test_diffusers_as_shipped_agree_to_float32_rounding`` checks the
  float32 originals).  The discrete DDPM schedule maps to ``dd.DiscreteVPSDE`` with DDPM step
  ``k`` at ``t = (k + 1) / N``; ``N = 1001`` makes diffusers' "linspace" integer timesteps fall on
  our uniform grids (``N = 1000`` for the "trailing" DDIM/DDPM grids).  Where a scheduler's own
  grid cannot be ours, ``_diffusers_on_grid`` replaces its ``sigmas`` by our grid's.

Peers are optional: k-diffusion (``pip install --no-deps k-diffusion``; only
``k_diffusion/sampling.py`` is loaded, see ``_k_diffusion_sampling``) and diffusers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from problems import fitted_order

from diffeqbridge import diffusion as dd
from diffeqbridge.diffusion.common import STREAMS
from diffeqbridge.diffusion.edm import karras_sigmas

# diffusers converts its float64 tables with np.array(tensor) (a numpy-2 deprecation) and deprecates
# algorithm_type="dpmsolver": neither changes a number
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`algorithm_types[ =]dpmsolver:FutureWarning"),
]

SIGMA_MIN, SIGMA_MAX = 0.02, 80.0
MATCH = 1e-10  # relative max-norm agreement of the same mathematics in float64


def _k_diffusion_sampling() -> Any:
    """``k_diffusion.sampling`` without ``k_diffusion/__init__``: the package's ``__init__`` imports its
    training stack (PIL, torchvision, clip, skimage ...), which ``pip install --no-deps`` leaves out.
    ``sampling.py`` itself needs scipy, torchsde, torchdiffeq, tqdm (the test extra) and one helper of
    ``k_diffusion.utils`` (``append_dims``), given here.  ``sys.modules`` is restored afterwards."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        file_spec = importlib.util.spec_from_file_location(
            "k_diffusion.sampling", f"{pkg.__path__[0]}/sampling.py", submodule_search_locations=None
        )
        module = importlib.util.module_from_spec(file_spec)
        sys.modules["k_diffusion.sampling"] = module
        file_spec.loader.exec_module(module)
    except ImportError as exc:  # one of sampling.py's own imports is missing
        pytest.skip(f"k_diffusion.sampling cannot be imported: {exc}")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return module


@pytest.fixture(scope="module")
def ks() -> Any:
    return _k_diffusion_sampling()


@contextlib.contextmanager
def _float64_default() -> Iterator[None]:
    """k-diffusion builds its grids with ``torch.linspace``/``torch.tensor`` in the default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- problems
def _mixture() -> dd.GaussianMixture:
    return dd.GaussianMixture([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], 0.5)


class SigmaProblem:
    """The 2-D mixture on a process with ``alpha = 1`` (so ``x = x~``) whose noise level runs from
    ``SIGMA_MAX`` at ``T`` to ``SIGMA_MIN`` at ``t_end``.

    ``VESDE`` (default): ``log sigma`` is linear in ``t``, so DPM-Solver's logSNR grid and the
    uniform-time grid are k-diffusion's exponential grid.  ``rho``: ``sigma = t^rho``, so the
    uniform-time grid is Karras et al.'s grid ``get_sigmas_karras(rho)``.
    """

    def __init__(self, rho: float | None = None, n: int = 64):
        if rho is None:
            self.sde: Any = dd.VESDE(SIGMA_MIN / 2, SIGMA_MAX)
            self.t_end = float(self.sde.t_from_log_snr(torch.tensor(-math.log(SIGMA_MIN), dtype=torch.float64)))
        else:
            self.sde = dd.ScheduleSDE(torch.ones_like, lambda t: t**rho, T=SIGMA_MAX ** (1.0 / rho))
            self.t_end = SIGMA_MIN ** (1.0 / rho)
        self.gm = _mixture()
        self.model = self.gm.score_model(self.sde, "eps")
        self._x0 = self.gm.score_model(self.sde, "x0")
        self.x_T = SIGMA_MAX * dd.per_sample_normal((n, 2), seed=3)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """k-diffusion's model: ``D(x, sigma)`` with ``sigma`` ``(B,)``."""
        return self._x0(x, self.sde.t_from_log_snr(-torch.log(sigma.double())))

    def sigmas(self, sol: Any) -> torch.Tensor:
        """The noise levels of a solution's saved grid (``save_trajectory=True``)."""
        return self.sde.marginal(sol.ts.double())[1]


@pytest.fixture(scope="module")
def ve() -> SigmaProblem:
    return SigmaProblem()


@pytest.fixture(scope="module")
def karras() -> SigmaProblem:
    return SigmaProblem(rho=7.0)


def _noise(shape: tuple[int, ...], stream: int, seed: int = 0) -> torch.Tensor:
    return dd.per_sample_normal(shape, seed, stream)


class _Counted:
    """A model wrapper counting its calls (each call evaluates the whole batch)."""

    def __init__(self, fn: Any):
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


class _NoiseFeed:
    """k-diffusion's ``noise_sampler(sigma, sigma_next)``: our draw of step ``i`` at the ``i``-th call."""

    def __init__(self, shape: tuple[int, ...], base: int, seed: int = 0):
        self.shape, self.base, self.seed, self.calls = shape, base, seed, 0

    def __call__(self, *_: Any) -> torch.Tensor:
        z = _noise(self.shape, self.base + self.calls, self.seed)
        self.calls += 1
        return z


# ----------------------------------------------------------------------------- k-diffusion: grids
def test_karras_and_exponential_grids_match_k_diffusion(ks, ve):
    with _float64_default():
        kar = ks.get_sigmas_karras(12, SIGMA_MIN, SIGMA_MAX, rho=7.0)
        exp = ks.get_sigmas_exponential(11, SIGMA_MIN, SIGMA_MAX)
    assert _rel(karras_sigmas(12, SIGMA_MIN, SIGMA_MAX, 7.0), kar[:-1]) < 1e-14
    # DPM-Solver's logSNR grid on the VE process is k-diffusion's exponential grid
    sol = dd.sample(ve.model, ve.sde, ve.x_T, method="dpm_solver", steps=10, order=1, t_end=ve.t_end, save_trajectory=True)
    assert _rel(ve.sigmas(sol), exp[:-1]) < 1e-12


# ----------------------------------------------------------------------------- k-diffusion: samplers
def _ours(p: SigmaProblem, steps: int, method: str = "dpm_solver", **options: Any) -> Any:
    return dd.sample(p.model, p.sde, p.x_T, method=method, steps=steps, t_end=p.t_end, save_trajectory=True, **options)


DPM = {"method": "dpm_solver", "lower_order_final": False}
K_DETERMINISTIC = {
    # k-diffusion sampler (options) -> our sampler on the same grid (logSNR = k-diffusion's exponential grid)
    "sample_euler": ({}, {**DPM, "order": 1}),
    "sample_dpmpp_2m": ({}, {**DPM, "order": 2, "algorithm": "dpmsolver++", "variant": "multistep"}),
    "sample_dpm_2": ({}, {**DPM, "order": 2, "algorithm": "dpmsolver", "variant": "singlestep"}),
    "sample_dpmpp_2s_ancestral": ({"eta": 0.0}, {**DPM, "order": 2, "algorithm": "dpmsolver++", "variant": "singlestep"}),
    "sample_dpmpp_sde": ({"eta": 0.0}, {**DPM, "order": 2, "algorithm": "dpmsolver++", "variant": "singlestep"}),
}


@pytest.mark.parametrize("name", list(K_DETERMINISTIC))
def test_k_diffusion_deterministic_samplers_match(ks, ve, name):
    """Same grid, same x_T: k-diffusion's sampler and ours agree to rounding.  ``sample_euler`` is DDIM
    (Euler in sigma of the VE-scaled flow is DPM-Solver-1), ``sample_dpm_2`` is DPM-Solver-2 (its
    Euler half-step to the geometric-mean sigma is DPM-Solver-1 to ``lambda_s + h/2``), and the
    ancestral/SDE DPM-Solver++(2S) samplers at ``eta = 0`` are DPM-Solver++(2S) (``r = 1/2``)."""
    k_opts, ours = K_DETERMINISTIC[name]
    sol = _ours(ve, 16, **ours)
    sig = ve.sigmas(sol)
    if name in ("sample_dpmpp_2s_ancestral", "sample_dpmpp_sde"):
        k_opts = {**k_opts, "noise_sampler": lambda *_: torch.zeros_like(ve.x_T)}
    denoiser = _Counted(ve.denoiser)
    theirs = getattr(ks, name)(denoiser, ve.x_T.clone(), sig, disable=True, **k_opts)
    assert _rel(sol.ys[-1], theirs) < MATCH
    assert bool((sol.stats.nf == denoiser.calls).all())  # the same model evaluations per sample


def test_k_diffusion_dpmpp_2m_and_euler_match_on_the_karras_grid(ks, karras):
    """On ``sigma = t^7`` our uniform-time grid is ``get_sigmas_karras``: the popular "DPM++ 2M Karras"."""
    for name, ours in (("sample_dpmpp_2m", K_DETERMINISTIC["sample_dpmpp_2m"][1]), ("sample_euler", {**DPM, "order": 1})):
        sol = _ours(karras, 12, skip_type="time_uniform", **ours)
        with _float64_default():
            grid = ks.get_sigmas_karras(13, SIGMA_MIN, SIGMA_MAX, rho=7.0)[:-1]
        assert _rel(karras.sigmas(sol), grid) < 1e-13
        theirs = getattr(ks, name)(karras.denoiser, karras.x_T.clone(), grid, disable=True)
        assert _rel(sol.ys[-1], theirs) < MATCH, name


@pytest.mark.parametrize("denoise_to_zero", [False, True])
@pytest.mark.parametrize("churn", [0.0, 20.0])
def test_k_diffusion_heun_matches_edm(ks, ve, monkeypatch, denoise_to_zero, churn):
    """EDM (Karras et al. Alg. 2) = ``sample_heun`` on ``get_sigmas_karras``; with ``denoise_to_zero``
    the grid ends in k-diffusion's appended ``sigma = 0`` (an Euler step).  The churn noise of step ``i``
    is fed to k-diffusion's ``torch.randn_like`` call of that step."""
    opts = {"S_churn": churn, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    sol = _ours(ve, 15, method="edm", denoise_to_zero=denoise_to_zero, seed=7, **opts)
    levels = 8
    sig = karras_sigmas(levels, SIGMA_MIN, SIGMA_MAX, 7.0)
    assert _rel(ve.sigmas(sol)[:levels], sig) < 1e-13
    if denoise_to_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    feed = _NoiseFeed(tuple(ve.x_T.shape), STREAMS["churn"], seed=7)
    monkeypatch.setattr(torch, "randn_like", lambda x, **_: feed())
    denoiser = _Counted(ve.denoiser)
    theirs = ks.sample_heun(denoiser, ve.x_T.clone(), sig, disable=True, s_churn=churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    assert _rel(sol.ys[-1], theirs) < MATCH
    assert bool((sol.stats.nf == denoiser.calls).all())


@pytest.mark.parametrize("order", [1, 2])
def test_k_diffusion_ancestral_and_2m_sde_match_sde_dpm_solver(ks, ve, order):
    """SDE-DPM-Solver++(1M) is Euler-ancestral (``eta = 1``: ``sigma_down = sigma_next e^{-h}``,
    ``sigma_up = sigma_next sqrt(1 - e^{-2h})``); SDE-DPM-Solver++(2M) is ``sample_dpmpp_2m_sde``
    (midpoint).  Our per-sample draw of step ``i`` is k-diffusion's ``noise_sampler``'s ``i``-th."""
    sol = _ours(ve, 14, algorithm="sde-dpmsolver++", order=order, lower_order_final=False, seed=11)
    feed = _NoiseFeed(tuple(ve.x_T.shape), STREAMS["sampler"], seed=11)
    name = "sample_euler_ancestral" if order == 1 else "sample_dpmpp_2m_sde"
    theirs = getattr(ks, name)(ve.denoiser, ve.x_T.clone(), ve.sigmas(sol), disable=True, noise_sampler=feed)
    assert feed.calls == 14
    assert _rel(sol.ys[-1], theirs) < MATCH


VP_CASES = {
    # k-diffusion sampler -> (our method and options, noise stream or None)
    "sample_dpmpp_2m": ({**K_DETERMINISTIC["sample_dpmpp_2m"][1], "skip_type": "time_uniform"}, None),
    "sample_dpm_2": ({**K_DETERMINISTIC["sample_dpm_2"][1], "skip_type": "time_uniform"}, None),
    "sample_euler_ancestral": ({**DPM, "order": 1, "algorithm": "sde-dpmsolver++", "skip_type": "time_uniform"}, "sampler"),
    "sample_heun": ({"method": "edm", "S_churn": 10.0}, "churn"),
}


@pytest.mark.parametrize("process", ["vp", "subvp"])
@pytest.mark.parametrize("name", list(VP_CASES))
def test_k_diffusion_matches_on_vp_processes(ks, monkeypatch, process, name):
    """On VP and sub-VP processes our samplers work in the scaled state ``x~ = x / alpha`` at
    ``sigma/alpha``: k-diffusion on ``x~`` with the denoiser ``D(x~, s) = x0(alpha(t) x~, t)`` at the
    ``t`` of ``s`` agrees with ``ys[-1] / alpha(t_end)``.  The VP's uniform-time grid is
    ``get_sigmas_vp``."""
    sde = dd.VPSDE() if process == "vp" else dd.SubVPSDE()
    gm, t_end = _mixture(), 1e-3
    model, x0 = gm.score_model(sde, "eps"), gm.score_model(sde, "x0")
    x_T = sde.prior_sample((32, 2), seed=4)
    options, stream = VP_CASES[name]
    sol = dd.sample(model, sde, x_T, steps=12, t_end=t_end, seed=2, save_trajectory=True, **options)
    alpha, sigma = sde.marginal(sol.ts.double())
    sig = sigma / alpha
    if name == "sample_heun":
        sig = karras_sigmas(7, float(sig[-1]), float(sig[0]), 7.0)

    def denoiser(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = sde.t_from_log_snr(-torch.log(s.double()))
        return x0(sde.marginal(t)[0][:, None] * x, t)

    kw: dict[str, Any] = {}
    if stream is not None:
        feed = _NoiseFeed(tuple(x_T.shape), STREAMS[stream], seed=2)
        if name == "sample_heun":
            kw["s_churn"] = 10.0
            monkeypatch.setattr(torch, "randn_like", lambda x, **_: feed())
        else:
            kw["noise_sampler"] = feed
    theirs = getattr(ks, name)(denoiser, x_T / alpha[0], sig, disable=True, **kw)
    assert _rel(sol.ys[-1] / alpha[-1], theirs) < MATCH
    if process == "vp" and name == "sample_dpmpp_2m":
        with _float64_default():
            vp_grid = ks.get_sigmas_vp(13, beta_d=sde.beta_max - sde.beta_min, beta_min=sde.beta_min, eps_s=t_end)
        assert _rel(sig, vp_grid[:-1]) < 1e-12


@pytest.mark.parametrize("nfe", [15, 16, 17])
def test_k_diffusion_dpm_fast_matches_dpm_solver_3(ks, ve, nfe):
    """``sample_dpm_fast`` is DPM-Solver-3 (singlestep, noise prediction) on the uniform-lambda grid with
    the reference code's order split (``[3, ..., 3, 2, 1]``, ``[3, ..., 3, 1]``, ``[3, ..., 3, 2]``)."""
    ours = _ours(ve, nfe, order=3, algorithm="dpmsolver", variant="singlestep", lower_order_final=True)
    with _float64_default():  # it builds its end points with torch.tensor(sigma)
        theirs = ks.sample_dpm_fast(ve.denoiser, ve.x_T.clone(), SIGMA_MIN, SIGMA_MAX, nfe, disable=True)
    assert int(ours.stats.nf[0]) == nfe
    assert _rel(ours.ys[-1], theirs) < MATCH


# ----------------------------------------------------------------------------- diffusers
class _Float64(types.ModuleType):
    """``torch`` or ``numpy`` as a diffusers scheduler module sees them in the ``diffusers`` fixture:
    ``float32`` is ``float64``, everything else is the real module's."""

    def __init__(self, real: Any):
        super().__init__(real.__name__)
        self._real, self.float32 = real, real.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def diffusers(monkeypatch):
    """``make(cls_name, problem, **config)``: a diffusers scheduler computing in float64 (module docstring)."""
    lib = pytest.importorskip("diffusers")

    def make(cls_name: str, p: DDPMProblem | None, **config: Any) -> Any:
        cls = getattr(lib, cls_name)
        module = sys.modules[cls.__module__]
        monkeypatch.setattr(module, "torch", _Float64(torch))
        if hasattr(module, "np"):
            monkeypatch.setattr(module, "np", _Float64(np))
        if p is None:
            return cls(**config)
        sched = cls(num_train_timesteps=p.N, trained_betas=p.betas.numpy(), **config)
        assert sched.alphas_cumprod.dtype == torch.float64
        return sched

    return make


class DDPMProblem:
    """The 2-D mixture under DDPM's linear betas ``1e-4 .. 0.02`` in ``N`` steps: ``dd.DiscreteVPSDE``
    (DDPM step ``k`` at ``t = (k + 1) / N``) for us, ``trained_betas`` for diffusers."""

    def __init__(self, N: int, n: int = 64):
        self.N = N
        self.betas = torch.linspace(1e-4, 0.02, N, dtype=torch.float64)
        self.sde = dd.DiscreteVPSDE(self.betas)
        acp = torch.cumprod(1.0 - self.betas, 0)
        self.log_sigmas = 0.5 * torch.log((1.0 - acp) / acp)  # log(sigma/alpha) of step k
        gm = _mixture()
        self.model, self.x0 = gm.score_model(self.sde, "eps"), gm.score_model(self.sde, "x0")
        self.x_T = self.sde.prior_sample((n, 2), seed=3)

    def time(self, timestep: Any) -> torch.Tensor:
        """Our time ``(B,)`` of a diffusers timestep, also a fractional one (diffusers interpolates
        ``log sigma`` linearly between steps): the ``t`` with the same ``sigma/alpha``."""
        log_sigma = float(np.interp(float(timestep), np.arange(self.N), self.log_sigmas.numpy()))
        t = self.sde.t_from_log_snr(torch.tensor([-log_sigma], dtype=torch.float64))
        return t.expand(self.x_T.shape[0])

    def eps(self, x: torch.Tensor, timestep: Any) -> torch.Tensor:
        """diffusers' model: eps-prediction at the (VP-scaled) input and timestep."""
        return self.model(x, self.time(timestep))

    def denoise(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The final denoising step of a scheduler that ends at ``alpha = 1``: ``x0(x, t)``."""
        return self.x0(x, torch.full((x.shape[0],), t, dtype=torch.float64))


def _set_timesteps(sched: Any, n: int) -> None:
    sched.set_timesteps(n)
    assert getattr(sched, "sigmas", torch.zeros((), dtype=torch.float64)).dtype == torch.float64


def _drive(p: DDPMProblem, sched: Any, x: torch.Tensor, scaled: bool = False, **step: Any) -> torch.Tensor:
    """The usual diffusers loop; ``step[k]`` may be a callable of the step index ``i``."""
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t) if scaled else x
        kw = {k: v(i) if callable(v) else v for k, v in step.items()}
        x = sched.step(p.eps(inp, t), t, x, **kw).prev_sample
    return x


def _ours_ddpm(p: DDPMProblem, steps: int, t_end: float, **options: Any) -> torch.Tensor:
    kw = {"method": "dpm_solver", "variant": "multistep", "skip_type": "time_uniform", **options}
    return dd.sample(p.model, p.sde, p.x_T, steps=steps, t_end=t_end, **kw).ys[-1]


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize(
    ("algorithm", "order"),
    [("dpmsolver++", 1), ("dpmsolver++", 2), ("dpmsolver", 1), ("dpmsolver", 2), ("sde-dpmsolver++", 1), ("sde-dpmsolver++", 2)],
)
def test_diffusers_dpm_solver_multistep_matches(diffusers, algorithm, order, steps):
    """``DPMSolverMultistepScheduler`` (``timestep_spacing="linspace"``, ``final_sigmas_type="sigma_min"``,
    midpoint) is our multistep DPM-Solver(++) on the uniform-time grid from ``T`` to ``t_end = 1/N``
    (``N - 1 = 1000`` is a multiple of ``steps``: the integer timesteps are our grid).  diffusers lowers
    the final order only below 15 steps; ours whenever ``lower_order_final=True``."""
    p = DDPMProblem(1001)
    sched = diffusers(
        "DPMSolverMultistepScheduler", p, algorithm_type=algorithm, solver_order=order, final_sigmas_type="sigma_min"
    )
    _set_timesteps(sched, steps)
    noise = {}
    if algorithm == "sde-dpmsolver++":
        noise["variance_noise"] = lambda i: _noise(tuple(p.x_T.shape), STREAMS["sampler"] + i, seed=5)
    theirs = _drive(p, sched, p.x_T.clone(), **noise)
    ours = _ours_ddpm(p, steps, 1.0 / p.N, algorithm=algorithm, order=order, lower_order_final=steps < 15, seed=5)
    assert _rel(ours, theirs) < MATCH


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize(("parameterization", "prediction_type"), [("x0", "sample"), ("v", "v_prediction")])
def test_diffusers_prediction_types_match_our_parameterizations(diffusers, algorithm, parameterization, prediction_type):
    """The same exact model as an x0- or v-prediction (``v = alpha eps - sigma x0``) through diffusers'
    ``prediction_type`` and through our ``parameterization``: the same samples."""
    p = DDPMProblem(1001)
    model = _mixture().score_model(p.sde, parameterization)
    config = {"algorithm_type": algorithm, "prediction_type": prediction_type, "final_sigmas_type": "sigma_min"}
    sched = diffusers("DPMSolverMultistepScheduler", p, **config)
    _set_timesteps(sched, 10)
    x = p.x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, p.time(t)), t, x).prev_sample
    kw = {"method": "dpm_solver", "skip_type": "time_uniform", "algorithm": algorithm, "order": 2}
    ours = dd.sample(model, p.sde, p.x_T, parameterization=parameterization, steps=10, t_end=1.0 / p.N, **kw).ys[-1]
    assert _rel(ours, x) < MATCH


def test_diffusers_as_shipped_agree_to_float32_rounding():
    """Without the float64 swap diffusers' ``DPMSolverMultistepScheduler`` (float32 tables, float32
    state in ``step``) agrees with ours to float32 rounding: 4e-7 - 3e-6 relative."""
    lib = pytest.importorskip("diffusers")
    p = DDPMProblem(1001)
    for order, steps in ((1, 10), (2, 10), (2, 20)):
        sched = lib.DPMSolverMultistepScheduler(
            num_train_timesteps=p.N, trained_betas=p.betas.numpy(), solver_order=order, final_sigmas_type="sigma_min"
        )
        sched.set_timesteps(steps)
        assert sched.sigmas.dtype == torch.float32
        ours = _ours_ddpm(p, steps, 1.0 / p.N, order=order, lower_order_final=steps < 15)
        err = _rel(ours, _drive(p, sched, p.x_T.clone()))
        assert 1e-8 < err < 1e-5, (order, steps, err)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_diffusers_ddim_and_ddpm_match(diffusers, monkeypatch, eta):
    """``DDIMScheduler`` (``"trailing"``, ``set_alpha_to_one``) is DPM-Solver-1 on the uniform grid
    ``1, 0.9, ..., 0.1`` followed by its final step to ``alpha = 1``, i.e. the denoiser ``x0(x, 0.1)``.
    At ``eta = 1`` DDIM is SDE-DPM-Solver++(1), and so is ``DDPMScheduler`` (its posterior over the
    skipped steps); DDPM draws one normal per step, the last one multiplied by ``1e-10``
    (``sqrt`` of its variance clamp ``1e-20``), fed here as zero."""
    p = DDPMProblem(1000)
    steps = 10
    sched = diffusers("DDIMScheduler", p, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    _set_timesteps(sched, steps)
    t_last = (int(sched.timesteps[-1]) + 1) / p.N
    assert t_last == pytest.approx(0.1)
    shape = tuple(p.x_T.shape)
    z = [_noise(shape, STREAMS["sampler"] + i, seed=5) for i in range(steps - 1)] + [torch.zeros(shape, dtype=torch.float64)]
    theirs = _drive(p, sched, p.x_T.clone(), eta=eta, variance_noise=lambda i: z[i])
    algorithm = "sde-dpmsolver++" if eta else "dpmsolver++"
    ours = p.denoise(_ours_ddpm(p, steps - 1, t_last, algorithm=algorithm, order=1, seed=5), t_last)
    assert _rel(ours, theirs) < MATCH
    if eta:
        ddpm = diffusers("DDPMScheduler", p, timestep_spacing="trailing", clip_sample=False)
        _set_timesteps(ddpm, steps)
        draws = iter(z)
        monkeypatch.setattr(sys.modules[type(ddpm).__module__], "randn_tensor", lambda *a, **k: next(draws))
        assert _rel(ours, _drive(p, ddpm, p.x_T.clone())) < MATCH


def test_diffusers_euler_and_heun_match(diffusers):
    """``EulerDiscreteScheduler`` ("linspace", final sigma 0) is DPM-Solver-1 (Euler in ``sigma`` of the
    VE-scaled state) on the uniform grid to ``t_end = 1/N`` plus its final Euler step to ``sigma = 0``
    (= the denoiser); ``HeunDiscreteScheduler(use_karras_sigmas=True)`` is EDM with
    ``denoise_to_zero=True``.  diffusers starts from ``init_noise_sigma * noise`` with
    ``init_noise_sigma = sigma_max``, the variance-exploding approximation of the VE-scaled prior's
    ``sqrt(sigma_max^2 + 1)`` (relative difference ``1/(2 sigma_max^2) = 2e-5`` here): both get the
    same ``x~_T = x_T sqrt(sigma_max^2 + 1)`` instead."""
    p = DDPMProblem(1001)
    steps = 10
    euler = diffusers("EulerDiscreteScheduler", p)
    _set_timesteps(euler, steps + 1)
    x_T = p.x_T * math.sqrt(1.0 + float(euler.sigmas[0]) ** 2)
    assert float(euler.init_noise_sigma) == pytest.approx(float(euler.sigmas[0]))
    theirs = _drive(p, euler, x_T.clone(), scaled=True)
    ours = p.denoise(_ours_ddpm(p, steps, 1.0 / p.N, order=1), 1.0 / p.N)
    assert _rel(ours, theirs) < MATCH

    heun = diffusers("HeunDiscreteScheduler", p, use_karras_sigmas=True)
    _set_timesteps(heun, 8)
    theirs = _drive(p, heun, x_T.clone(), scaled=True)
    ours = dd.sample(p.model, p.sde, p.x_T, method="edm", steps=15, t_end=1.0 / p.N, denoise_to_zero=True).ys[-1]
    assert _rel(ours, theirs) < MATCH


def test_diffusers_euler_ancestral_matches_sde_dpm_solver(diffusers, monkeypatch):
    """``EulerAncestralDiscreteScheduler`` is SDE-DPM-Solver++(1) on the uniform grid plus its last step to
    ``sigma = 0`` (``sigma_up = 0`` there: the denoiser).  Its draw of step ``i`` is ours; the last
    one is multiplied by zero."""
    p = DDPMProblem(1001)
    steps = 10
    sched = diffusers("EulerAncestralDiscreteScheduler", p)
    _set_timesteps(sched, steps + 1)
    shape = tuple(p.x_T.shape)
    draws = iter([_noise(shape, STREAMS["sampler"] + i, seed=5) for i in range(steps)] + [torch.zeros(shape)])
    monkeypatch.setattr(sys.modules[type(sched).__module__], "randn_tensor", lambda *a, **k: next(draws))
    theirs = _drive(p, sched, p.x_T * math.sqrt(1.0 + float(sched.sigmas[0]) ** 2), scaled=True)
    ours = p.denoise(_ours_ddpm(p, steps, 1.0 / p.N, algorithm="sde-dpmsolver++", order=1, seed=5), 1.0 / p.N)
    assert _rel(ours, theirs) < MATCH


# ----------------------------------------------------------------------------- where the definitions differ
@pytest.fixture(scope="module")
def ve_flow(ve) -> torch.Tensor:
    """The probability-flow solution at ``t_end`` on the VE problem: DPM-Solver-3, 3000 NFE (error ~1e-8)."""
    return _ours(ve, 3000, order=3, algorithm="dpmsolver", variant="singlestep", lower_order_final=False).ys[-1]


def _diffusers_on_grid(sched: Any, p: SigmaProblem, sol: Any) -> torch.Tensor:
    """A ``DPMSolverMultistepScheduler``'s updates on our solution's grid (its ``sigmas`` replaced by
    ours); its state is VP-scaled, ``x = x~ / sqrt(1 + sigma^2)``.  Returns ``x~`` at the grid's end."""
    sig = p.sigmas(sol)
    _set_timesteps(sched, len(sig) - 1)
    sched.sigmas = sig.clone()
    scale = torch.sqrt(1.0 + sig.square())
    x = p.x_T / scale[0]
    for i, t in enumerate(sched.timesteps):
        eps = p.model(x * scale[i], sol.ts[i].double().expand(x.shape[0]))
        x = sched.step(eps, t, x).prev_sample
    return x * scale[-1]


def test_third_order_multistep_peers_are_second_order(ks, ve, ve_flow, diffusers):
    """DPM-Solver++(3M) differs: ours adds ``2 phi2 D2`` for the ``h^2 f''`` term of the Taylor
    expansion (``D2 ~ h^2 f'' / 2``, ``phi2 = (h^2/2 - h - expm1(-h)) / h^2``: exact for quadratic
    ``x0(lambda)``); DPM-Solver's reference code, diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``
    and k-diffusion's ``sample_dpmpp_3m_sde(eta=0)`` add ``phi2 D2``, half of it.  On the same uniform-
    lambda grid the two peers agree with each other to rounding (diffusers with ``solver_type="heun"``: its
    second-order warm-up step is then k-diffusion's, ``phi1 D1``), and against the exact flow ours
    converges with slope 3 and theirs tends to 2."""
    ddpm = DDPMProblem(1001)
    ns, errs = [40, 80, 160, 320], {"ours": [], "k-diffusion": [], "diffusers": []}
    for n in ns:
        sol = _ours(ve, n, order=3, algorithm="dpmsolver++", variant="multistep", lower_order_final=False)
        kd = ks.sample_dpmpp_3m_sde(
            ve.denoiser, ve.x_T.clone(), ve.sigmas(sol), disable=True, eta=0.0, noise_sampler=lambda *_: torch.zeros_like(ve.x_T)
        )
        sched = diffusers("DPMSolverMultistepScheduler", ddpm, solver_order=3, final_sigmas_type="sigma_min", solver_type="heun")
        theirs = _diffusers_on_grid(sched, ve, sol)
        assert _rel(theirs, kd) < MATCH
        for key, out in (("ours", sol.ys[-1]), ("k-diffusion", kd), ("diffusers", theirs)):
            errs[key].append(float((out - ve_flow).abs().max()))
    slopes = {k: fitted_order([1.0 / n for n in ns], v) for k, v in errs.items()}
    assert slopes["ours"] > 2.7, (slopes, errs)
    assert slopes["k-diffusion"] < 2.5 and slopes["diffusers"] < 2.5, (slopes, errs)
    assert errs["ours"][-1] < 0.5 * errs["diffusers"][-1], errs


def test_third_order_multistep_noise_prediction_differs_the_same_way(ve, ve_flow, diffusers):
    """DPM-Solver(3M) (noise prediction): the same factor 2 on ``D2`` (``-sigma_t phi2 D2`` with
    ``phi2 = (expm1(h) - h - h^2/2) / h^2`` in diffusers, twice that in ours): slope 3 against 2."""
    ddpm = DDPMProblem(1001)
    ns, errs = [80, 160, 320], {"ours": [], "diffusers": []}
    for n in ns:
        sol = _ours(ve, n, order=3, algorithm="dpmsolver", variant="multistep", lower_order_final=False)
        config = {"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}
        theirs = _diffusers_on_grid(diffusers("DPMSolverMultistepScheduler", ddpm, **config), ve, sol)
        for key, out in (("ours", sol.ys[-1]), ("diffusers", theirs)):
            errs[key].append(float((out - ve_flow).abs().max()))
    slopes = {k: fitted_order([1.0 / n for n in ns], v) for k, v in errs.items()}
    assert slopes["ours"] > 2.7 and slopes["diffusers"] < 2.4, (slopes, errs)
    assert errs["ours"][-1] < 0.5 * errs["diffusers"][-1], errs


def test_second_order_variants_converge_to_the_same_flow(ve, ve_flow, diffusers):
    """Where the 2M definitions differ, both converge to the exact flow at order 2: diffusers' 2M at 15
    steps or more does not lower its last order (ours with ``lower_order_final=True`` does, and equals
    it with ``False``), and its ``solver_type="heun"`` weights ``D1`` by ``phi1`` instead of ``phi0/2``."""
    ddpm = DDPMProblem(1001)
    ns = [40, 80, 160, 320]
    errs: dict[str, list[float]] = {"ours lower_order_final": [], "diffusers midpoint": [], "diffusers heun": []}
    for n in ns:
        lowered = _ours(ve, n, order=2, algorithm="dpmsolver++", variant="multistep", lower_order_final=True)
        plain = _ours(ve, n, order=2, algorithm="dpmsolver++", variant="multistep", lower_order_final=False)
        outs = {"ours lower_order_final": lowered.ys[-1]}
        for solver_type in ("midpoint", "heun"):
            sched = diffusers("DPMSolverMultistepScheduler", ddpm, final_sigmas_type="sigma_min", solver_type=solver_type)
            outs[f"diffusers {solver_type}"] = _diffusers_on_grid(sched, ve, plain)
        assert _rel(plain.ys[-1], outs["diffusers midpoint"]) < MATCH
        for key, out in outs.items():
            errs[key].append(float((out - ve_flow).abs().max()))
    slopes = {k: fitted_order([1.0 / n for n in ns], v) for k, v in errs.items()}
    assert all(1.7 < v < 2.3 for v in slopes.values()), (slopes, errs)
    finest = [v[-1] for v in errs.values()]
    assert max(finest) < 5 * min(finest), errs


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_diffusers_singlestep_on_the_fine_grid(ve, ve_flow, diffusers, algorithm):
    """``DPMSolverSinglestepScheduler`` takes its intermediate points from its grid: on the uniform-lambda
    grid of ``order * m`` steps they are ours (``lambda_s + r h``).  Order 2 (midpoint) is then our
    DPM-Solver(++)-2 singlestep to rounding.  Order 3 differs: diffusers reaches the point at ``2/3`` with
    its order-2 midpoint update (``phi0 / 2`` weighting), DPM-Solver-3 (Lu et al. 2022, Alg. 2; ours)
    with the ``phi1`` weighting; both converge to the flow, their errors within 1.6x of each other."""
    ddpm = DDPMProblem(1001)
    config = {"algorithm_type": algorithm, "lower_order_final": False, "final_sigmas_type": "sigma_min"}
    kw = {"algorithm": algorithm, "lower_order_final": False}
    m = 6
    fine = _ours(ve, 2 * m, order=1, variant="multistep", **kw)
    ours = _ours(ve, 2 * m, order=2, variant="singlestep", **kw)
    theirs = _diffusers_on_grid(diffusers("DPMSolverSinglestepScheduler", ddpm, solver_order=2, **config), ve, fine)
    assert _rel(ours.ys[-1], theirs) < MATCH
    ms, errs = [20, 40, 80], {"ours": [], "diffusers": []}
    for m in ms:
        fine = _ours(ve, 3 * m, order=1, variant="multistep", **kw)
        ours = _ours(ve, 3 * m, order=3, variant="singlestep", **kw)
        theirs = _diffusers_on_grid(diffusers("DPMSolverSinglestepScheduler", ddpm, solver_order=3, **config), ve, fine)
        assert _rel(ours.ys[-1], theirs) > 1e-6  # not the same method
        for key, out in (("ours", ours.ys[-1]), ("diffusers", theirs)):
            errs[key].append(float((out - ve_flow).abs().max()))
    slopes = {k: fitted_order([1.0 / m for m in ms], v) for k, v in errs.items()}
    assert all(v > 2.0 for v in slopes.values()), (slopes, errs)
    assert 0.6 < errs["ours"][-1] / errs["diffusers"][-1] < 1.6, errs


def test_diffusers_edm_euler_matches(diffusers, karras):
    """``EDMEulerScheduler`` (Karras grid from its ``sigma_min``/``sigma_max``, final sigma 0, EDM's
    preconditioning) is DPM-Solver-1 on our Karras grid plus the final step to ``sigma = 0``.  Its model
    is ``F(c_in x, c_noise)`` with ``D = c_skip x + c_out F``: the exact denoiser written that way."""
    sched = diffusers("EDMEulerScheduler", None, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0)
    _set_timesteps(sched, 12)
    sd = sched.config.sigma_data
    x = karras.x_T.clone()
    for t in sched.timesteps:
        sigma = torch.exp(4.0 * t.double()).expand(x.shape[0])  # c_noise = log(sigma) / 4
        inp = sched.scale_model_input(x, t)
        x_in = inp * torch.sqrt(sigma**2 + sd**2)[:, None]
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2)
        F = (karras.denoiser(x_in, sigma) - c_skip[:, None] * x_in) / c_out[:, None]
        x = sched.step(F, t, x).prev_sample
    sol = _ours(karras, 11, order=1, skip_type="time_uniform", lower_order_final=False)
    assert _rel(karras.sigmas(sol), sched.sigmas[:-1]) < 1e-13
    ours = karras.denoiser(sol.ys[-1], torch.full((x.shape[0],), SIGMA_MIN, dtype=torch.float64))
    assert _rel(ours, x) < MATCH
