"""Regularizing the solver's heuristics makes trained neural SDEs/ODEs cheaper to solve.

Reproduces, on CPU-sized toys, the experiment of Pal et al. (ICML 2021, "Opening the
Blackbox") and Pal et al. (ICML 2023, "Locally Regularized Neural Differential Equations"):

* **neural SDE** (the 2-D toy of the papers' code, after DiffEqFlux's neural SDE tutorial):
  data are the moments of a cubic spiral SDE ``du = (u³) A dt + 0.2 u dW``; the model's
  drift is ``x ↦ Linear(tanh(Linear(x³)))``, its diffusion a diagonal ``Linear``; it is
  solved with SOSRI at ``atol = rtol = 0.3`` on ``n_traj`` trajectories and trained to
  match the data's means and variances at the save times;
* **neural ODE** (the cubic spiral ``u' = (u³) A``), Tsit5, trained on trajectories from a
  few initial conditions, tested on others;
* **neural ODE classifier** (the headline): concentric circles in 2-D (inner radius 0.5,
  outer 1, noise 0.08), one augmented zero dimension (ANODE), a time-dependent MLP field
  ``(y, t) -> Linear(64) tanh Linear(64) tanh Linear(3)`` solved by Tsit5 at
  ``atol = rtol = 1e-5`` on ``[0, 1]``, a linear read-out of ``y(1)`` and cross-entropy on
  the endpoint only.  Nothing constrains the flow between ``t = 0`` and ``t = 1``, and the
  unregularized flow gets about twice as expensive to solve as at initialisation while it
  learns; the regularized one reaches the same accuracy with a cheaper flow.  This is the
  papers' setting in miniature (over-parameterized model, endpoint-only supervision),
  unlike the two toys above, whose unregularized models are already about as cheap as the
  data-generating dynamics.

Each model is trained without regularization and with each regularizer (same seed, same
iterations, same data), then evaluated at test time *without* regularization: test loss
(and accuracy), NFE (drift evaluations per trajectory) and prediction wall time.

    python examples/regularization.py [--quick] [--out bench_out]

takes about 6 CPU minutes (``--quick`` about one; ``--only cls`` runs the classifier alone).

writes ``regularization.json`` and ``regularization.png`` (loss curves and test NFE).
``benchmarks/regularization.py`` runs the same experiment as a benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import diffeqbridge as deb
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import diffeqbridge as deb

SPIRAL = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])

# name -> (regularize, weight)
SDE_CONFIGS: dict[str, tuple[Any, float]] = {
    "none": (None, 0.0),
    "error": ("error", 3.0),
    "stiffness": ("stiffness", 0.1),
    "local_error": ("local_error", 30.0),
    "local_stiffness": ("local_stiffness", 0.1),
}
ODE_CONFIGS: dict[str, tuple[Any, float]] = {
    "none": (None, 0.0),
    "error": ("error", 0.3),
    "stiffness": ("stiffness", 0.003),
    "local_error": ("local_error", 3.0),
    "local_stiffness": ("local_stiffness", 0.03),
}
# Classifier: error and local_error only.  In float32 at tol 1e-5 the embedded solution
# mostly differs from the solution by less than the dtype resolves, so the stiffness
# estimate (between the two) is 0 for >= 97 % of the points and the stiffness kinds have
# almost nothing to act on.  The sweep entries (full size
# only) show the accuracy/cost trade-off around the chosen weights.
CLS_CONFIGS: dict[str, tuple[Any, float]] = {
    "none": (None, 0.0),
    "error": ("error", 10.0),
    "local_error": ("local_error", 150.0),
}
CLS_SWEEP: dict[str, tuple[Any, float]] = {
    "error_w3": ("error", 3.0),
    "error_w30": ("error", 30.0),
    "local_error_w50": ("local_error", 50.0),
    "local_error_w500": ("local_error", 500.0),
}
# Weights: a local term is one step's EEst·dt, about (number of steps) times smaller than the
# global sum, hence ~10x larger weights.  Chosen from a small sweep (see the README section):
# 10x larger global-error weights cut the NFE further but the loss then stalls.

SIZES = {
    # iterations, data trajectories (SDE), model trajectories per iteration, test repeats;
    # classifier: iterations, train/test points, whether to run the weight sweep, timing repeats.
    # quick: 60 iterations show the error regularizer's effect; local_error (whose fit
    # starts later, see the plot) is still at chance level then
    "full": {
        "sde_iters": 30,
        "ode_iters": 200,
        "n_data": 1000,
        "n_traj": 100,
        "repeats": 3,
        "data_tol": 0.05,
        "cls_iters": 150,
        "cls_train": 256,
        "cls_test": 1024,
        "cls_sweep": True,
        "cls_repeats": 11,
    },
    "quick": {
        "sde_iters": 8,
        "ode_iters": 20,
        "n_data": 100,
        "n_traj": 32,
        "repeats": 2,
        "data_tol": 0.1,
        "cls_iters": 60,
        "cls_train": 256,
        "cls_test": 512,
        "cls_sweep": False,
        "cls_repeats": 5,
    },
    "tiny": {
        "sde_iters": 1,
        "ode_iters": 1,
        "n_data": 16,
        "n_traj": 4,
        "repeats": 1,
        "data_tol": 0.3,
        "cls_iters": 1,
        "cls_train": 16,
        "cls_test": 16,
        "cls_sweep": False,
        "cls_repeats": 1,
    },
}


class Cube(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**3


def drift_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Cube(), nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))


# ------------------------------------------------------------------------- SDE toy
def sde_data(n: int, ts: torch.Tensor, seed: int, tol: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and variances ``(T, 2)`` of the true spiral SDE over ``n`` trajectories."""
    a = SPIRAL.double()
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64).repeat(n, 1)
    prob = deb.SDEProblem(lambda t, y: (y**3) @ a, lambda t, y: 0.2 * y, y0, (0.0, float(ts[-1])))
    with torch.no_grad():
        sol = deb.solve(prob, deb.SOSRI(), saveat=ts, atol=tol, rtol=tol, seed=seed)
    ys = sol.ys.float()
    return ys.mean(1), ys.var(1)


def sde_true_nfe(n: int, ts: torch.Tensor, seed: int) -> tuple[float, float]:
    """NFE per trajectory of the data-generating SDE itself, solved as the model is (SOSRI, 0.3)."""
    y0 = torch.tensor([[2.0, 0.0]]).repeat(n, 1)
    prob = deb.SDEProblem(lambda t, y: (y**3) @ SPIRAL, lambda t, y: 0.2 * y, y0, (0.0, float(ts[-1])))
    out = []
    for times in (ts, ts[[0, -1]]):
        with torch.no_grad():
            sol = deb.solve(prob, deb.SOSRI(), saveat=times, atol=0.3, rtol=0.3, seed=seed)
        out.append(float(sol.stats.nf.double().mean()))
    return out[0], out[1]


def sde_loss(ys: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """DiffEqFlux's neural SDE tutorial loss: ``Σ (mean - data)² + Σ (var - data)² / 10``."""
    return (ys.mean(1) - means).square().sum() + (ys.var(1) - variances).square().sum() / 10


def make_sde(regularize: Any, seed: int = 0) -> deb.NeuralSDE:
    drift = drift_net(seed)
    torch.manual_seed(seed + 1)
    diffusion = nn.Linear(2, 2)
    return deb.NeuralSDE(drift, diffusion, alg=deb.SOSRI(), regularize=regularize, atol=0.3, rtol=0.3)


def train_sde(name: str, regularize: Any, weight: float, data: tuple, ts: torch.Tensor, size: dict) -> dict:
    model = make_sde(regularize)
    opt = torch.optim.Adam(model.parameters(), lr=0.025)
    y0 = torch.tensor([[2.0, 0.0]]).repeat(size["n_traj"], 1)
    curve, regs, nfe = [], [], []
    start = time.perf_counter()
    for it in range(size["sde_iters"]):
        opt.zero_grad()
        ys = model(y0, ts, seed=it)
        loss = sde_loss(ys, *data)
        total = loss
        if model.regularization is not None:
            total = loss + weight * model.regularization.mean()
            regs.append(float(model.regularization.detach().mean()))
        total.backward()
        opt.step()
        curve.append(float(loss.detach()))
        nfe.append(float(model.stats.nf.double().mean()))
    train_s = time.perf_counter() - start
    return {"model": model, "curve": curve, "reg_curve": regs, "train_nfe": nfe, "train_s": train_s}


def evaluate_sde(model: deb.NeuralSDE, data: tuple, ts: torch.Tensor, size: dict) -> dict:
    """Test loss / NFE / wall time without regularization, on fresh Brownian paths."""
    model.regularize = None
    y0 = torch.tensor([[2.0, 0.0]]).repeat(size["n_traj"], 1)
    losses, nfes, nfes_free, times = [], [], [], []
    with torch.no_grad():
        for r in range(size["repeats"]):
            seed = 10_000 + r
            start = time.perf_counter()
            ys = model(y0, ts, seed=seed)
            times.append(time.perf_counter() - start)
            losses.append(float(sde_loss(ys, *data)))
            nfes.append(float(model.stats.nf.double().mean()))
            model(y0, ts[[0, -1]], seed=seed)  # cost of the dynamics alone (no save times to land on)
            nfes_free.append(float(model.stats.nf.double().mean()))
    return {
        "test_loss": statistics.mean(losses),
        "nfe": statistics.mean(nfes),
        "nfe_endpoints": statistics.mean(nfes_free),
        "predict_s": statistics.median(times),
    }


# ------------------------------------------------------------------------- ODE toy
def ode_data(y0: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    a = SPIRAL.double()
    prob = deb.ODEProblem(lambda t, y: (y**3) @ a, y0.double(), (0.0, float(ts[-1])))
    with torch.no_grad():
        return deb.solve(prob, deb.Tsit5(), saveat=ts, atol=1e-9, rtol=1e-9).ys.float()


def ode_true_nfe(y0: torch.Tensor, ts: torch.Tensor) -> tuple[float, float]:
    """NFE per trajectory of the true spiral ODE, solved as the model is (Tsit5, 1e-5)."""
    prob = deb.ODEProblem(lambda t, y: (y**3) @ SPIRAL, y0, (0.0, float(ts[-1])))
    out = []
    for times in (ts, ts[[0, -1]]):
        with torch.no_grad():
            sol = deb.solve(prob, deb.Tsit5(), saveat=times, atol=1e-5, rtol=1e-5)
        out.append(float(sol.stats.nf.double().mean()))
    return out[0], out[1]


def ode_initial(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([[2.0, 0.0]]) + 0.2 * torch.randn(n, 2, generator=g)


def train_ode(
    name: str, regularize: Any, weight: float, y0: torch.Tensor, data: torch.Tensor, ts: torch.Tensor, size: dict
) -> dict:
    model = deb.NeuralODE(drift_net(0), alg=deb.Tsit5(), regularize=regularize, atol=1e-5, rtol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    curve, regs, nfe = [], [], []
    start = time.perf_counter()
    for _ in range(size["ode_iters"]):
        opt.zero_grad()
        ys = model(y0, ts)
        loss = (ys - data).square().mean()
        total = loss
        if model.regularization is not None:
            total = loss + weight * model.regularization.mean()
            regs.append(float(model.regularization.detach().mean()))
        total.backward()
        opt.step()
        curve.append(float(loss.detach()))
        nfe.append(float(model.stats.nf.double().mean()))
    return {"model": model, "curve": curve, "reg_curve": regs, "train_nfe": nfe, "train_s": time.perf_counter() - start}


def evaluate_ode(model: deb.NeuralODE, y0: torch.Tensor, data: torch.Tensor, ts: torch.Tensor, size: dict) -> dict:
    model.regularize = None
    times = []
    with torch.no_grad():
        for _ in range(size["repeats"]):
            start = time.perf_counter()
            ys = model(y0, ts)
            times.append(time.perf_counter() - start)
        loss = float((ys - data).square().mean())
        nfe = float(model.stats.nf.double().mean())
        model(y0, ts[[0, -1]])
        nfe_free = float(model.stats.nf.double().mean())
    return {"test_loss": loss, "nfe": nfe, "nfe_endpoints": nfe_free, "predict_s": statistics.median(times)}


# ---------------------------------------------------------------- ODE classifier
CLS_TOL = 1e-5
CLS_AUG = 1  # augmented zero dimensions (ANODE)


def circles(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``(n, 2)`` on two noisy concentric circles (radii 0.5 / 1) and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    radius = torch.where(labels == 0, 0.5, 1.0) + 0.08 * torch.randn(n, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1), labels


class TimeField(nn.Module):
    """``(t, y) -> MLP([y, t])``: a time-dependent vector field on ``(B, d)`` states."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=y.dtype).reshape(-1, 1).expand(y.shape[0], 1)
        return self.net(torch.cat([y, tt], 1))


class Classifier(nn.Module):
    """Augment ``x (B, 2)`` with zeros, flow it by a neural ODE over ``[0, 1]``, read out ``y(1)``."""

    def __init__(self, regularize: Any, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        dim = 2 + CLS_AUG
        self.ode = deb.NeuralODE(TimeField(dim), alg=deb.Tsit5(), regularize=regularize, atol=CLS_TOL, rtol=CLS_TOL)
        self.head = nn.Linear(dim, 2)
        self.ts = torch.tensor([0.0, 1.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = torch.cat([x, x.new_zeros(x.shape[0], CLS_AUG)], 1)
        return self.head(self.ode(y0, self.ts)[-1])


def train_cls(regularize: Any, weight: float, data: tuple, size: dict) -> dict:
    model = Classifier(regularize)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, labels = data
    curve, regs, nfe = [], [], []
    start = time.perf_counter()
    for _ in range(size["cls_iters"]):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        total = loss
        if model.ode.regularization is not None:
            total = loss + weight * model.ode.regularization.mean()
            regs.append(float(model.ode.regularization.detach().mean()))
        total.backward()
        opt.step()
        curve.append(float(loss.detach()))
        nfe.append(float(model.ode.stats.nf.double().mean()))
    return {"model": model, "curve": curve, "reg_curve": regs, "train_nfe": nfe, "train_s": time.perf_counter() - start}


def evaluate_cls(model: Classifier, data: tuple) -> dict:
    """Test cross-entropy, accuracy and NFE per point, without regularization."""
    model.ode.regularize = None
    x, labels = data
    with torch.no_grad():
        logits = model(x)
        nfe = float(model.ode.stats.nf.double().mean())
        loss = float(nn.functional.cross_entropy(logits, labels))
        acc = float((logits.argmax(1) == labels).double().mean())
    return {"test_loss": loss, "test_accuracy": acc, "nfe": nfe, "nfe_endpoints": nfe}


def time_predictions(models: dict[str, Classifier], x: torch.Tensor, repeats: int, check_every: int = 8) -> dict[str, float]:
    """Fastest of ``repeats`` test-set predictions per model, the models timed in turn (round
    robin), so that load changes on a shared machine hit all of them alike.

    ``check_every``: the engine's termination check period.  The batch loop runs until its
    slowest sample is done, rounded up to a multiple of ``check_every`` iterations (the
    accelerator default 8 saves host syncs on GPUs); with ~10-16 steps per solve that
    rounding hides the saving, so the headline time uses 1 (the CPU default: a check per
    step costs nothing there).
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.ode.solve_kwargs["check_every"] = check_every
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
        for model in models.values():
            model.ode.solve_kwargs.pop("check_every")
    return {name: min(t) for name, t in times.items()}


# ---------------------------------------------------------------------- experiment
def _ratios(results: dict) -> None:
    base = results["none"]
    for r in results.values():
        r["nfe_ratio"] = r["nfe"] / base["nfe"]
        r["nfe_endpoints_ratio"] = r["nfe_endpoints"] / base["nfe_endpoints"]
        r["predict_time_ratio"] = r["predict_s"] / base["predict_s"]
        r["test_loss_ratio"] = r["test_loss"] / base["test_loss"]


def run(
    quick: bool = False,
    out: Path = Path("bench_out"),
    size: str | None = None,
    only: tuple[str, ...] = ("cls", "sde", "ode"),
    log: Any = print,
) -> dict:
    """Run the experiment; writes ``out/regularization.json`` and ``.png``; returns the payload."""
    torch.set_num_threads(1)
    key = size or ("quick" if quick else "full")
    sz = SIZES[key]
    payload: dict[str, Any] = {"size": key, "config": sz, "problems": {}}
    curves: dict[str, dict[str, list[float]]] = {}
    if "cls" in only:
        train, test = circles(sz["cls_train"], 1), circles(sz["cls_test"], 2)
        configs = {**CLS_CONFIGS, **(CLS_SWEEP if sz["cls_sweep"] else {})}
        res = {}
        models = {}
        curves["cls"] = {}
        for name, (reg, weight) in configs.items():
            tr = train_cls(reg, weight, train, sz)
            ev = evaluate_cls(tr["model"], test)
            models[name] = tr["model"]
            res[name] = {
                "regularize": reg,
                "weight": weight,
                "train_s": tr["train_s"],
                "final_train_loss": tr["curve"][-1],
                "train_nfe_last": tr["train_nfe"][-1],
                "train_nfe_first": tr["train_nfe"][0],
                **ev,
            }
            curves["cls"][name] = tr["curve"]
        for name, t in time_predictions(models, test[0], sz["cls_repeats"], check_every=1).items():
            res[name]["predict_s"] = t
        for name, t in time_predictions(models, test[0], sz["cls_repeats"]).items():
            res[name]["predict_s_check_every_8"] = t
        for name, r in res.items():
            log(
                f"cls {name:16s} test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.3f}  NFE {r['nfe']:.1f}  "
                f"predict {r['predict_s'] * 1e3:.1f} ms  train {r['train_s']:.1f} s"
            )
        _ratios(res)
        for r in res.values():
            r["predict_time_ratio_check_every_8"] = r["predict_s_check_every_8"] / res["none"]["predict_s_check_every_8"]
            r["meets_target"] = r["nfe_ratio"] <= 0.75 and r["test_loss_ratio"] <= 1.05
        payload["problems"]["neural_ode_classifier"] = {
            "alg": "Tsit5",
            "atol": CLS_TOL,
            "rtol": CLS_TOL,
            "save_times": 2,
            "augmented_dims": CLS_AUG,
            "width": 64,
            "train_points": sz["cls_train"],
            "test_points": sz["cls_test"],
            "iters": sz["cls_iters"],
            "results": res,
        }
    if "sde" in only:
        ts = torch.linspace(0.0, 1.0, 10)
        data = sde_data(sz["n_data"], ts.double(), seed=1, tol=sz["data_tol"])
        test_data = sde_data(sz["n_data"], ts.double(), seed=2, tol=sz["data_tol"])
        res: dict[str, Any] = {}
        curves["sde"] = {}
        for name, (reg, weight) in SDE_CONFIGS.items():
            tr = train_sde(name, reg, weight, data, ts, sz)
            ev = evaluate_sde(tr["model"], test_data, ts, sz)
            res[name] = {
                "regularize": reg,
                "weight": weight,
                "train_s": tr["train_s"],
                "final_train_loss": tr["curve"][-1],
                "train_nfe_last": tr["train_nfe"][-1],
                **ev,
            }
            curves["sde"][name] = tr["curve"]
            log(
                f"sde {name:16s} test loss {ev['test_loss']:.4f}  NFE {ev['nfe']:.1f} (endpoints {ev['nfe_endpoints']:.1f})  "
                f"predict {ev['predict_s'] * 1e3:.1f} ms  train {tr['train_s']:.1f} s"
            )
        _ratios(res)
        true_nfe = sde_true_nfe(sz["n_traj"], ts, seed=10_000)
        payload["problems"]["neural_sde"] = {
            "alg": "SOSRI",
            "atol": 0.3,
            "rtol": 0.3,
            "save_times": len(ts),
            "true_dynamics_nfe": true_nfe[0],
            "true_dynamics_nfe_endpoints": true_nfe[1],
            "results": res,
        }
        log(f"sde true dynamics NFE {true_nfe[0]:.1f} (endpoints {true_nfe[1]:.1f})")
    if "ode" in only:
        ts = torch.linspace(0.0, 1.5, 6)
        y_train, y_test = ode_initial(16, 1), ode_initial(16, 2)
        d_train, d_test = ode_data(y_train, ts), ode_data(y_test, ts)
        res = {}
        curves["ode"] = {}
        for name, (reg, weight) in ODE_CONFIGS.items():
            tr = train_ode(name, reg, weight, y_train, d_train, ts, sz)
            ev = evaluate_ode(tr["model"], y_test, d_test, ts, sz)
            res[name] = {
                "regularize": reg,
                "weight": weight,
                "train_s": tr["train_s"],
                "final_train_loss": tr["curve"][-1],
                "train_nfe_last": tr["train_nfe"][-1],
                **ev,
            }
            curves["ode"][name] = tr["curve"]
            log(
                f"ode {name:16s} test loss {ev['test_loss']:.5f}  NFE {ev['nfe']:.1f} (endpoints {ev['nfe_endpoints']:.1f})  "
                f"predict {ev['predict_s'] * 1e3:.1f} ms  train {tr['train_s']:.1f} s"
            )
        _ratios(res)
        true_nfe = ode_true_nfe(y_test, ts)
        payload["problems"]["neural_ode"] = {
            "alg": "Tsit5",
            "atol": 1e-5,
            "rtol": 1e-5,
            "save_times": len(ts),
            "true_dynamics_nfe": true_nfe[0],
            "true_dynamics_nfe_endpoints": true_nfe[1],
            "results": res,
        }
        log(f"ode true dynamics NFE {true_nfe[0]:.1f} (endpoints {true_nfe[1]:.1f})")
    payload["curves"] = curves
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "regularization.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot(payload, out / "regularization.png")
    return payload


def plot(payload: dict, path: Path) -> None:
    """Write ``make_figure(payload)`` to the PNG ``path``."""
    import matplotlib.pyplot as plt

    fig = make_figure(payload)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figure(payload: dict):
    """Training loss curves and test-time NFE per problem (one row each), from the JSON payload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(payload["problems"])
    fig, axes = plt.subplots(len(probs), 2, figsize=(11, 4 * len(probs)), squeeze=False)
    for row, prob in enumerate(probs):
        res = payload["problems"][prob]["results"]
        key = {"neural_sde": "sde", "neural_ode": "ode", "neural_ode_classifier": "cls"}[prob]
        ax = axes[row][0]
        for name, curve in payload["curves"][key].items():
            ax.plot(curve, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (without the regularizer)", fontsize=8)
        ax.set_title(f"{prob}: training")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        names = list(res)
        x = range(len(names))
        info = payload["problems"][prob]
        if key == "cls":  # endpoint-only: one solve over (0, 1)
            ax.bar(list(x), [res[n]["nfe"] for n in names], width=0.6, label="NFE per point")
            ax.axhline(res["none"]["train_nfe_first"], color="k", linestyle=":", linewidth=1, label="at initialisation")
        else:
            ax.bar([i - 0.2 for i in x], [res[n]["nfe"] for n in names], width=0.4, label="NFE at save times")
            ax.bar([i + 0.2 for i in x], [res[n]["nfe_endpoints"] for n in names], width=0.4, label="NFE (t0, t1) only")
        for i, n in enumerate(names):
            acc = f"\nacc {res[n]['test_accuracy']:.3f}" if "test_accuracy" in res[n] else ""
            ax.text(
                i,
                res[n]["nfe"],
                f"loss×{res[n]['test_loss_ratio']:.2f}\nNFE×{res[n]['nfe_ratio']:.2f}{acc}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        if "true_dynamics_nfe" in info:
            ax.axhline(info["true_dynamics_nfe"], color="C0", linestyle="--", linewidth=1, label="true dynamics, at save times")
            ax.axhline(
                info["true_dynamics_nfe_endpoints"], color="C1", linestyle="--", linewidth=1, label="true dynamics, (t0, t1) only"
            )
        ax.set_ylim(0, 1.35 * max(max(res[n]["nfe"] for n in names), info.get("true_dynamics_nfe", 0.0)))
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel("drift evaluations per trajectory (test)")
        ax.set_title(f"{prob}: test-time cost ({payload['problems'][prob]['alg']})")
        ax.legend(fontsize=7, loc="lower right")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--only", default="cls,sde,ode")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    run(args.quick, args.out, size="tiny" if args.tiny else None, only=tuple(args.only.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
