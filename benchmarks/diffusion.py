"""Diffusion sampling: quality vs NFE of our samplers, k-diffusion's and diffusers', same exact score.

Problems: the issue's 2-D Gaussian mixture (weights 0.5/0.3/0.2, means (-3,0), (3,0), (0,3),
std 0.5) and a 64-D mixture (weights 0.4/0.3/0.2/0.1, means 3 e_k, std 0.5), diffused by
DDPM's discrete linear-beta VP schedule (1e-4 .. 0.02, 1000 steps; ``dd.DiscreteVPSDE``):
the schedule diffusers' schedulers are built for.  Every sampler gets the exact score of
the diffused mixture at the noise level it asks for (through its own interface: ``eps`` at a
DDPM timestep for diffusers, the denoiser ``D(x/alpha, sigma/alpha)`` for k-diffusion, the
process time for ours), and starts from the same ``x_T`` at ``sigma/alpha = 157`` (DDPM step
999).  Samplers end either at ``t_end`` (DDPM step 0, ``sigma/alpha = 0.01``) or, after a
final denoising step, at ``sigma = 0``; each is compared with the reference at its own end.

Figures per (sampler, NFE): ``path_err`` = RMS over samples and coordinates of the distance
to the probability-flow ODE's solution from the same ``x_T`` (a 3000-NFE DPM-Solver-3 run,
then continued to ``sigma = 0`` on the sigma-parameterised process; deterministic samplers
only), the sliced Wasserstein distance to exact data samples (its floor: the reference's own
distance), the worst component-weight error and the worst component-std error.  Wall times:
the ~20-NFE configuration of each sampler timed interleaved.

k-diffusion: its package ``__init__`` imports the training stack (PIL, torchvision, clip ...);
only ``k_diffusion/sampling.py`` is loaded, with a two-line stand-in for the one helper it
takes from ``k_diffusion.utils`` (``append_dims``).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "diffusion"
N_TRAIN = 1000


# ----------------------------------------------------------------------------- peers
def import_k_diffusion_sampling() -> Any:
    """``k_diffusion.sampling`` without running ``k_diffusion/__init__`` (see the module docstring)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x: Any, target_dims: int) -> Any:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    return importlib.import_module("k_diffusion.sampling")


class Problem:
    """A mixture, the DDPM process, the exact models for every interface, and the reference."""

    def __init__(self, name: str, gm: Any, n: int):
        import torch

        from diffeqbridge import diffusion as dd

        self.name, self.gm, self.n = name, gm, n
        betas = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=torch.float64)
        self.betas = betas
        self.sde = dd.DiscreteVPSDE(betas)
        self.t_end = 1.0 / N_TRAIN
        acp = torch.cumprod(1.0 - betas, 0)
        self.train_sigmas = torch.sqrt((1.0 - acp) / acp)  # sigma/alpha of DDPM step k
        self.sigma_min, self.sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        # VP on the sigma/alpha axis: time s is the noise level (alpha = 1/sqrt(1+s^2))
        self.sig_sde = dd.ScheduleSDE(
            lambda s: torch.rsqrt(1.0 + s * s), lambda s: s * torch.rsqrt(1.0 + s * s), T=self.sigma_max * 1.01
        )
        self.model_t = gm.score_model(self.sde, "eps")
        self._eps_s = gm.score_model(self.sig_sde, "eps")
        self._x0_s = gm.score_model(self.sig_sde, "x0")
        self.x_T = self.sde.prior_sample((n, *gm.state_shape), seed=0)
        self.data = gm.sample(n, seed=123)

    # k-diffusion: denoiser on x~ = x / alpha at sigma~
    def denoiser(self, x: Any, sigma: Any) -> Any:
        import torch

        alpha = torch.rsqrt(1.0 + sigma.double() * sigma.double()).reshape(-1, *[1] * (x.ndim - 1))
        return self._x0_s((alpha * x.double()), sigma.double()).to(x.dtype)

    # diffusers: eps at (scaled) input and DDPM timestep (fractional ones as its own log-sigma interpolation)
    def sigma_of_timestep(self, timestep: Any) -> float:
        import numpy as np

        return float(np.exp(np.interp(float(timestep), np.arange(N_TRAIN), np.log(self.train_sigmas.numpy()))))

    def eps_diffusers(self, x: Any, timestep: Any) -> Any:
        import torch

        s = torch.full((x.shape[0],), self.sigma_of_timestep(timestep), dtype=torch.float64)
        return self._eps_s(x.double(), s).to(x.dtype)

    def references(self) -> dict[str, Any]:
        """The probability-flow ODE's solution at ``t_end`` and at ``sigma = 0`` from ``x_T``."""

        from diffeqbridge import diffusion as dd

        kw = {"method": "dpm_solver", "algorithm": "dpmsolver", "variant": "singlestep", "order": 3, "lower_order_final": False}
        end = dd.sample(self.model_t, self.sde, self.x_T, steps=3000, t_end=self.t_end, **kw).ys[-1]
        half = dd.sample(self.model_t, self.sde, self.x_T, steps=1500, t_end=self.t_end, **kw).ys[-1]
        sig_end = dd.ScheduleSDE(self.sig_sde.alpha_fn, self.sig_sde.sigma_fn, T=self.sigma_min)
        zero = dd.sample(
            self._x0_s,
            sig_end,
            end,
            parameterization="x0",
            steps=600,
            t_end=1e-9 * self.sigma_min,
            **{**kw, "algorithm": "dpmsolver++"},
        ).ys[-1]
        return {"t_end": end, "zero": zero, "accuracy": float(_rms(end - half))}


def _rms(x: Any) -> float:
    return float(x.double().square().mean().sqrt())


# ----------------------------------------------------------------------------- samplers
Sampler = Callable[[Problem, int], tuple[Any, float, str]]  # (problem, nfe) -> (samples, nfe per sample, end)


def ours(method: str, end: str = "t_end", **options: Any) -> Sampler:
    def run(p: Problem, nfe: int) -> tuple[Any, float, str]:
        from diffeqbridge import diffusion as dd

        sol = dd.sample(p.model_t, p.sde, p.x_T, method=method, steps=nfe, t_end=p.t_end, **options)
        return sol.ys[-1], float(sol.stats.nf.double().mean()), end

    return run


def ours_adaptive(order: int, controller: str = "pi", variant: str = "adaptive") -> Sampler:
    def run(p: Problem, tol: float) -> tuple[Any, float, str]:
        from diffeqbridge import diffusion as dd

        sol = dd.sample(
            p.model_t,
            p.sde,
            p.x_T,
            method="dpm_solver",
            variant=variant,
            order=order,
            rtol=tol,
            atol=tol / 10,
            t_end=p.t_end,
            controller=controller,
        )
        return sol.ys[-1], float(sol.stats.nf.double().mean()), "t_end"

    return run


def kd(name: str, sigmas: str | None, nfe_of_n: Callable[[int], int], **options: Any) -> Sampler:
    """A k-diffusion sampler on its sigma grid (``n`` levels + 0) in the scaled variables."""

    def run(p: Problem, nfe: int) -> tuple[Any, float, str]:

        ks = import_k_diffusion_sampling()
        n = max(2, _levels_for(nfe, nfe_of_n))
        x = p.x_T * math.sqrt(1.0 + p.sigma_max**2)
        if name == "sample_dpm_fast":
            out = ks.sample_dpm_fast(p.denoiser, x, p.sigma_min, p.sigma_max, nfe, disable=True)
            return out / math.sqrt(1.0 + p.sigma_min**2), float(nfe), "t_end"
        grid = {"karras": ks.get_sigmas_karras, "exponential": ks.get_sigmas_exponential}[sigmas]
        sig = grid(n, p.sigma_min, p.sigma_max).double()
        out = getattr(ks, name)(p.denoiser, x, sig, disable=True, **options)
        return out, float(nfe_of_n(n)), "zero"

    return run


def kd_adaptive(order: int) -> Sampler:
    def run(p: Problem, tol: float) -> tuple[Any, float, str]:
        ks = import_k_diffusion_sampling()
        x = p.x_T * math.sqrt(1.0 + p.sigma_max**2)
        out, info = ks.sample_dpm_adaptive(
            p.denoiser, x, p.sigma_min, p.sigma_max, order=order, rtol=tol, atol=tol / 10, disable=True, return_info=True
        )
        return out / math.sqrt(1.0 + p.sigma_min**2), float(info["nfe"]), "t_end"

    return run


def diffusers_sampler(cls_name: str, nfe_of_n: Callable[[int], int], seed: int | None = None, **config: Any) -> Sampler:
    def run(p: Problem, nfe: int) -> tuple[Any, float, str]:
        import diffusers
        import torch

        sched = getattr(diffusers, cls_name)(
            num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", **config
        )
        n = max(2, _levels_for(nfe, nfe_of_n))
        sched.set_timesteps(n)
        x = p.x_T * float(sched.init_noise_sigma)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        calls = 0
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            eps = p.eps_diffusers(inp, t)
            calls += 1
            kwargs = {"generator": gen} if gen is not None else {}
            x = sched.step(eps, t, x, **kwargs).prev_sample
        return x, float(calls), "zero"

    return run


def _levels_for(nfe: int, nfe_of_n: Callable[[int], int]) -> int:
    """The largest ``n`` whose NFE does not exceed ``nfe``."""
    n = 1
    while nfe_of_n(n + 1) <= nfe:
        n += 1
    return n


def samplers() -> dict[str, tuple[str, Sampler, bool]]:
    """name -> (family, sampler, deterministic)."""
    same = lambda n: n
    heun = lambda n: 2 * n - 1
    return {
        "ours DPM-Solver++(2M) logSNR": ("2M", ours("dpm_solver"), True),
        "ours DPM-Solver++(2M) time_uniform": ("2M", ours("dpm_solver", skip_type="time_uniform"), True),
        "ours DPM-Solver-3 (singlestep)": ("3S", ours("dpm_solver", variant="singlestep", order=3, algorithm="dpmsolver"), True),
        "ours EDM Heun (to sigma=0)": ("heun", ours("edm", end="zero", denoise_to_zero=True), True),
        "ours EDM Heun (to t_end)": ("heun", ours("edm"), True),
        "ours SDE-DPM-Solver++(2M)": ("sde", ours("dpm_solver", algorithm="sde-dpmsolver++"), False),
        "k-diffusion dpmpp_2m (exponential)": ("2M", kd("sample_dpmpp_2m", "exponential", same), True),
        "k-diffusion dpmpp_2m (karras)": ("2M", kd("sample_dpmpp_2m", "karras", same), True),
        "k-diffusion dpm_fast (DPM-Solver-3)": ("3S", kd("sample_dpm_fast", None, same), True),
        "k-diffusion heun (karras)": ("heun", kd("sample_heun", "karras", heun), True),
        "k-diffusion euler (karras)": ("euler", kd("sample_euler", "karras", same), True),
        "k-diffusion dpmpp_2m_sde (exponential)": ("sde", kd("sample_dpmpp_2m_sde", "exponential", same), False),
        "diffusers DPMSolverMultistep 2M": ("2M", diffusers_sampler("DPMSolverMultistepScheduler", same), True),
        "diffusers DPMSolverMultistep 2M (lu lambdas)": (
            "2M",
            diffusers_sampler("DPMSolverMultistepScheduler", same, use_lu_lambdas=True),
            True,
        ),
        "diffusers Heun (karras)": ("heun", diffusers_sampler("HeunDiscreteScheduler", heun, use_karras_sigmas=True), True),
        "diffusers Euler (karras)": ("euler", diffusers_sampler("EulerDiscreteScheduler", same, use_karras_sigmas=True), True),
        "diffusers SDE-DPMSolver++ 2M": (
            "sde",
            diffusers_sampler("DPMSolverMultistepScheduler", same, seed=0, algorithm_type="sde-dpmsolver++"),
            False,
        ),
    }


ADAPTIVE = {
    "ours adaptive DPM-Solver-12 (per-sample)": ours_adaptive(2),
    "ours adaptive DPM-Solver-23 (per-sample)": ours_adaptive(3),
    "ours adaptive DPM-Solver-23 (per-sample, paper's controller)": ours_adaptive(3, "paper"),
    "ours adaptive multistep 2M/3M (per-sample)": ours_adaptive(3, variant="adaptive_multistep"),
    "k-diffusion dpm_adaptive order 3 (batch norm)": kd_adaptive(3),
    "k-diffusion dpm_adaptive order 2 (batch norm)": kd_adaptive(2),
}


# ----------------------------------------------------------------------------- measuring
def _quality(p: Problem, refs: dict, x: Any, end: str, deterministic: bool) -> dict[str, Any]:
    from diffeqbridge import diffusion as dd

    x = x.double()
    frac, std = p.gm.component_stats(x)
    finite = bool(x.isfinite().all())
    return {
        "path_err": _rms(x - refs[end]) if deterministic and finite else None,
        "sw": dd.sliced_wasserstein(x, p.data, n_projections=128) if finite else None,
        "weight_err": float((frac - p.gm.weights).abs().max()) if finite else None,
        "std_err": float((std - p.gm.stds).abs().nan_to_num(1.0).max()) if finite else None,
        "end": end,
    }


def _interp_nfe(rows: list[dict], err: float) -> float | None:
    """NFE at which a curve (rows sorted by NFE) first reaches ``err`` (log-log interpolation)."""
    pts = sorted((r["nfe"], r["path_err"]) for r in rows if r.get("path_err"))
    for (n0, e0), (n1, e1) in itertools.pairwise(pts):
        if e0 <= err:
            return n0
        if e1 <= err < e0:
            w = math.log(e0 / err) / math.log(e0 / e1)
            return math.exp(math.log(n0) + w * math.log(n1 / n0))
    return pts[0][0] if pts and pts[0][1] <= err else None


def run_problem(p: Problem, nfes: list[int], tols: list[float], timing_repeats: int) -> dict[str, Any]:
    refs = p.references()
    floor = _quality(p, refs, refs["t_end"], "t_end", True)
    curves: dict[str, list[dict]] = {}
    families: dict[str, str] = {}
    errors: dict[str, str] = {}
    for name, (family, fn, det) in samplers().items():
        families[name] = family
        rows = []
        for nfe in nfes:
            try:
                x, used, end = fn(p, nfe)
            except Exception as exc:  # noqa: BLE001 - a peer failing is a result, recorded
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                break
            rows.append({"nfe_budget": nfe, "nfe": used, **_quality(p, refs, x, end, det)})
        curves[name] = rows
    for name, fn in ADAPTIVE.items():
        families[name] = "adaptive"
        rows = []
        for tol in tols:
            try:
                x, used, end = fn(p, tol)
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                break
            rows.append({"tol": tol, "nfe": used, **_quality(p, refs, x, end, True)})
        curves[name] = rows

    # equal NFE: error ratios of same-mathematics pairs
    pairs = [
        ("ours DPM-Solver++(2M) logSNR", "k-diffusion dpmpp_2m (exponential)"),
        ("ours DPM-Solver++(2M) logSNR", "diffusers DPMSolverMultistep 2M (lu lambdas)"),
        ("ours DPM-Solver++(2M) time_uniform", "diffusers DPMSolverMultistep 2M"),
        ("ours DPM-Solver-3 (singlestep)", "k-diffusion dpm_fast (DPM-Solver-3)"),
        ("ours EDM Heun (to sigma=0)", "k-diffusion heun (karras)"),
        ("ours EDM Heun (to sigma=0)", "diffusers Heun (karras)"),
    ]
    equal_nfe = []
    for a, b in pairs:
        for ra, rb in zip(curves.get(a, []), curves.get(b, [])):
            if ra["path_err"] and rb["path_err"] and ra["nfe"] == rb["nfe"]:
                equal_nfe.append(
                    {
                        "ours": a,
                        "peer": b,
                        "nfe": ra["nfe"],
                        "ours_err": ra["path_err"],
                        "peer_err": rb["path_err"],
                        "ratio_err_ours_over_peer": ra["path_err"] / rb["path_err"],
                    }
                )

    # adaptive target: NFE to reach the peers' errors
    peers = [n for n in curves if not n.startswith("ours") and curves[n] and curves[n][0].get("path_err")]
    targets = []
    for err in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4):
        peer_nfe = {n: _interp_nfe(curves[n], err) for n in peers}
        peer_nfe = {n: v for n, v in peer_nfe.items() if v is not None}
        if not peer_nfe:
            continue
        best_peer = min(peer_nfe, key=peer_nfe.get)
        adaptive_peers = {n: v for n, v in peer_nfe.items() if families[n] == "adaptive"}
        best_adaptive = min(adaptive_peers, key=adaptive_peers.get) if adaptive_peers else None
        row = {
            "path_err": err,
            "best_peer": best_peer,
            "best_peer_nfe": peer_nfe[best_peer],
            "best_adaptive_peer": best_adaptive,
            "best_adaptive_peer_nfe": adaptive_peers.get(best_adaptive),
        }
        for name in [n for n in curves if n.startswith("ours") and curves[n] and curves[n][0].get("path_err")]:
            v = _interp_nfe(curves.get(name, []), err)
            row[name] = (
                None
                if v is None
                else {
                    "nfe": v,
                    "ratio_vs_best_peer": v / peer_nfe[best_peer],
                    "ratio_vs_best_adaptive_peer": v / adaptive_peers[best_adaptive] if best_adaptive else None,
                }
            )
        targets.append(row)

    timing = _timing(p, timing_repeats)
    return {
        "n": p.n,
        "dim": p.gm.dim,
        "sigma_min": p.sigma_min,
        "sigma_max": p.sigma_max,
        "reference_accuracy": refs["accuracy"],
        "floor": floor,
        "families": families,
        "curves": curves,
        "errors": errors,
        "equal_nfe": equal_nfe,
        "adaptive_targets": targets,
        "timing": timing,
    }


def _timing(p: Problem, repeats: int) -> dict[str, Any]:
    """Seconds per sampling call at ~20 NFE, interleaved; ratios against our same-family sampler."""
    cases = {}
    for name, (_, fn, _) in samplers().items():
        cases[name] = lambda fn=fn: fn(p, 20)
    try:
        timings = H.measure_interleaved(cases, repeats=repeats, warmup=1, target_s=0.05)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
    ref = {
        "2M": "ours DPM-Solver++(2M) time_uniform",
        "3S": "ours DPM-Solver-3 (singlestep)",
        "heun": "ours EDM Heun (to sigma=0)",
        "sde": "ours SDE-DPM-Solver++(2M)",
        "euler": "ours DPM-Solver++(2M) logSNR",
    }
    fam = {name: f for name, (f, _, _) in samplers().items()}
    return {
        name: {"seconds": t.median, "ratio_vs_ours": t.median / timings[ref[fam[name]]].median, "vs": ref[fam[name]]}
        for name, t in timings.items()
    }


def inversion_round_trips(steps_list: list[int]) -> dict[str, Any]:
    """Relative round-trip error ``|sample(invert(x0)) - x0| / |x0|`` of BDIA and EDICT (float64,
    the 2-D mixture under the VP SDE, 64 points), and the sampling error of BDIA/EDICT/DDIM
    from noise against the exact flow of the 1-D Gaussian N(0.5, 0.8^2)."""
    import torch

    from diffeqbridge import diffusion as dd

    sde = dd.VPSDE()
    gm = mixtures()["2d"]
    model = gm.score_model(sde, "eps")
    x0 = gm.sample(64, seed=5)
    round_trip: dict[str, list] = {}
    for method, key, values in (("bdia", "gamma", (1.0, 0.9, 0.7, 0.5)), ("edict", "p", (0.93, 0.97))):
        for v in values:
            rows = []
            for steps in steps_list:
                state = dd.invert(model, sde, x0, method=method, steps=steps, **{key: v})
                back = dd.sample(model, sde, state, method=method).ys[-1]
                rel = float((back - x0).norm() / x0.norm())
                rows.append({"steps": steps, "rel_err": rel if math.isfinite(rel) else None})
            round_trip[f"{method} {key}={v}"] = rows
    gauss = dd.GaussianMixture([1.0], [[0.5]], 0.8)
    g_model = gauss.score_model(sde, "eps")
    x_T = torch.linspace(-2.0, 2.0, 16, dtype=torch.float64).reshape(16, 1)
    a_T, s_T = sde.marginal(torch.tensor([1.0], dtype=torch.float64))
    a, s = sde.marginal(torch.tensor([1e-3], dtype=torch.float64))
    exact = a * 0.5 + (x_T - a_T * 0.5) * torch.sqrt(a * a * 0.64 + s * s) / torch.sqrt(a_T * a_T * 0.64 + s_T * s_T)
    sampling: dict[str, list] = {}
    cases = {
        "DDIM": {
            "method": "dpm_solver",
            "algorithm": "dpmsolver",
            "variant": "singlestep",
            "order": 1,
            "skip_type": "time_uniform",
        },
        "BDIA gamma=1": {"method": "bdia"},
        "BDIA gamma=0.5": {"method": "bdia", "gamma": 0.5},
        "EDICT p=0.93": {"method": "edict"},
    }
    for name, kw in cases.items():
        sampling[name] = [
            {"steps": n, "max_err": float((dd.sample(g_model, sde, x_T, steps=n, **kw).ys[-1] - exact).abs().max())}
            for n in steps_list
        ]
    return {"round_trip": round_trip, "sampling_error_gaussian": sampling}


def mixtures() -> dict[str, Any]:
    import torch

    from diffeqbridge import diffusion as dd

    two = dd.GaussianMixture([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], 0.5)
    means = torch.zeros(4, 64, dtype=torch.float64)
    means[torch.arange(4), torch.arange(4)] = 3.0
    high = dd.GaussianMixture([0.4, 0.3, 0.2, 0.1], means, 0.5)
    return {"2d": two, "64d": high}


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    H.set_threads(threads)
    out = Path(out)
    tiny = size == "tiny"
    sizes = {"2d": 300 if tiny else (2000 if quick else 4000), "64d": 100 if tiny else (500 if quick else 1000)}
    nfes = [8, 16] if tiny else ([6, 10, 15, 20, 30, 50, 80] if quick else [6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 70, 100])
    tols = (
        [0.05, 0.01]
        if tiny
        else ([0.1, 0.03, 0.01, 0.003, 0.001] if quick else [0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4])
    )
    repeats = 1 if tiny else (3 if quick else 5)
    problems = {}
    start = time.perf_counter()
    for name, gm in mixtures().items():
        problems[name] = run_problem(Problem(name, gm, sizes[name]), nfes, tols, repeats)
    inversion = inversion_round_trips([10, 25] if tiny else [10, 25, 50, 100, 200])
    payload = {
        "nfes": nfes,
        "tols": tols,
        "problems": problems,
        "inversion": inversion,
        "seconds": time.perf_counter() - start,
        "versions": {m: _dist_version(m) for m in ("diffusers", "k-diffusion")},
    }
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    return doc


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plot(doc: dict) -> Any:
    """Per problem: ODE error and sliced W2 vs NFE; one legend per row, outside the axes."""
    import matplotlib

    fig, axes = H.figure(ncols=2, nrows=len(doc["problems"]), size=(6.0, 4.8))
    names = list(next(iter(doc["problems"].values()))["curves"])
    colors = [matplotlib.colormaps["tab20"](k) for k in range(20)] + [matplotlib.colormaps["Dark2"](k) for k in range(8)]
    styles = {
        name: {
            "color": colors[k % len(colors)],
            "linestyle": "-" if name.startswith("ours") else "--",
            "marker": "o" if name.startswith("ours") else "x",
            "markersize": 4,
        }
        for k, name in enumerate(names)
    }
    for i, (pname, r) in enumerate(doc["problems"].items()):
        path_series, sw_series = {}, {}
        for name, rows in r["curves"].items():
            if rows and rows[0].get("path_err") is not None:
                path_series[name] = ([row["nfe"] for row in rows], [row["path_err"] for row in rows])
            sw_series[name] = ([row["nfe"] for row in rows], [row["sw"] for row in rows])
        H.plot_series(
            axes[2 * i],
            path_series,
            xlabel="NFE per sample",
            ylabel="RMS distance to the exact ODE solution",
            title=f"{pname}: ODE error (deterministic samplers)",
            styles=styles,
        )
        H.plot_series(
            axes[2 * i + 1],
            sw_series,
            xlabel="NFE per sample",
            ylabel="sliced W2 to data samples",
            title=f"{pname}: sample quality (floor {r['floor']['sw']:.3f})",
            styles=styles,
        )
        axes[2 * i].get_legend().remove()
        axes[2 * i + 1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.set_size_inches(16.0, 4.8 * len(doc["problems"]))
    return fig


PROBLEM_LABELS = {"2d": "2-D", "64d": "64-D"}
OURS_23 = "ours adaptive DPM-Solver-23 (per-sample)"
OURS_MS = "ours adaptive multistep 2M/3M (per-sample)"


def _short(name: str | None) -> str:
    return "—" if name is None else name.replace("DPMSolverMultistep ", "").replace(" (exponential)", " exp.")


def tables(doc: dict) -> dict[str, str]:
    """``equal_nfe``: path-error ratio ours / peer of the same mathematics over the NFE sweep, per problem;
    ``adaptive``: NFE per sample to reach a path error, best peer against our adaptive samplers."""
    probs = doc["problems"]
    pairs = list(dict.fromkeys((e["ours"], e["peer"]) for r in probs.values() for e in r["equal_nfe"]))
    eq_rows = [
        (
            f"{a.removeprefix('ours ')}",
            b,
            *(
                H.span((e["ratio_err_ours_over_peer"] for e in r["equal_nfe"] if (e["ours"], e["peer"]) == (a, b)), "{:.2f}")
                for r in probs.values()
            ),
        )
        for a, b in pairs
    ]
    ad_rows = []
    for pname, r in probs.items():
        fixed = [n for n, f in r["families"].items() if n.startswith("ours") and f != "adaptive" and r["curves"].get(n)]
        for t in r["adaptive_targets"]:
            cells = []
            for name in (OURS_23, OURS_MS):
                v = t.get(name)
                r_ = v and v["ratio_vs_best_peer"]
                cells.append(
                    "not reached" if v is None else f"{v['nfe']:.1f} ({'**' if r_ < 1 else ''}x{r_:.2f}{'**' if r_ < 1 else ''})"
                )
            ours_fixed = {n: _interp_nfe(r["curves"][n], t["path_err"]) for n in fixed}
            ours_fixed = {n: v for n, v in ours_fixed.items() if v is not None}
            best_fixed = min(ours_fixed, key=ours_fixed.__getitem__) if ours_fixed else None
            ad_rows.append(
                (
                    PROBLEM_LABELS.get(pname, pname),
                    H.sci(t["path_err"], 0),
                    f"{_short(t['best_peer'])} ({t['best_peer_nfe']:.1f})",
                    H.fmt(t["best_adaptive_peer_nfe"], "{:.1f}"),
                    *cells,
                    "—" if best_fixed is None else f"{ours_fixed[best_fixed]:.1f} ({best_fixed.removeprefix('ours ')})",
                )
            )
    return {
        "equal_nfe": H.markdown_table(["ours", "peer", *(PROBLEM_LABELS.get(p, p) for p in probs)], eq_rows),
        "adaptive": H.markdown_table(
            ["problem", "path_err", "best peer (NFE)", "kd adaptive", "ours 23", "ours ms", "ours best fixed grid"], ad_rows
        ),
    }


def headline(doc: dict) -> str:
    """Median error ratios at equal NFE of the same-mathematics pairs, and the adaptive NFE ratio."""
    import statistics

    parts = []
    for pname, r in doc["problems"].items():
        ratios: dict[str, list[float]] = {}
        for e in r["equal_nfe"]:
            ratios.setdefault(f"{e['ours'].split(' (')[0][5:]} vs {e['peer'].split(' ')[0]}", []).append(
                e["ratio_err_ours_over_peer"]
            )
        eq = ", ".join(f"{k} x{statistics.median(v):.2f}" for k, v in ratios.items())
        adaptive = []
        for label, key in (
            ("adaptive-23", "ours adaptive DPM-Solver-23 (per-sample)"),
            ("adaptive 2M/3M", "ours adaptive multistep 2M/3M (per-sample)"),
        ):
            ad = [t[key]["ratio_vs_best_peer"] for t in r["adaptive_targets"] if t.get(key)]
            if ad:
                adaptive.append(f"{label} x{statistics.median(ad):.2f}")
        parts.append(f"{pname}: err ours/peer {eq}; NFE / best peer's: {', '.join(adaptive) or '-'}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
