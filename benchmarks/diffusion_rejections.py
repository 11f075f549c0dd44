"""Rejected steps and sample quality: redrawn noise vs a fixed Brownian path (2-D mixture).

The adaptive reverse-SDE sampler of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast", GGF,
Algorithm 1: an Euler--Maruyama proposal, an improved-Euler estimate with the same noise,
a per-sample step ``h <- theta h E^-r`` with ``theta = r = 0.9``) draws a fresh ``z`` after
every rejected step.  The controller then keeps the draws it accepts -- small ones, where
the estimate ``E`` grows with ``|z|`` -- and the accepted noise is no longer Brownian.  The
same controller re-querying a fixed path (a :class:`~diffeqbridge.VirtualBrownianTree`:
the increment over the shorter step, conditional on the rejected one) has no such selection.
``dd.sample(method="sde")`` (SRA1 on the engine, which always re-queries the tree) is run
alongside at several tolerances.

Data: weights (0.5, 0.3, 0.2), means (-3, 0), (3, 0), (0, 3), std 0.5; VP SDE, exact score,
``t_end = 1e-3``.  Figures: each component's std (exact 0.5) and the NFE per sample.

    python benchmarks/diffusion_rejections.py [--quick | --tiny] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "diffusion_rejections"


def ggf_sampler(
    score: Any,
    sde: Any,
    x_T: torch.Tensor,
    t_end: float,
    eps_abs: float,
    eps_rel: float,
    tree: Any = None,
    seed: int = 0,
    h_init: float = 0.01,
    max_iter: int = 20000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GGF's adaptive sampler, vectorised with per-sample times; returns ``(x, nfe)``.

    ``score(x, t)`` with ``x`` ``(B, D)``, ``t`` ``(B,)``.  Noise: ``tree=None`` draws a fresh
    ``z`` after every rejection (as published; per-sample draws from ``(seed, iteration)``);
    with a Brownian tree on ``[t_end, T]`` a rejected step re-queries the same path.
    """
    from diffeqbridge.diffusion.common import per_sample_normal

    x, prev = x_T.clone(), x_T.clone()
    batch = x.shape[0]
    t = torch.full((batch,), sde.T, dtype=x.dtype)
    h = torch.full((batch,), h_init, dtype=x.dtype)
    active = torch.ones(batch, dtype=torch.bool)
    nfe = torch.zeros(batch, dtype=torch.long)

    def reverse_drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sde.drift(t, x) - sde.g2(t)[:, None] * score(x, t)

    for it in range(max_iter):
        if not bool(active.any()):
            break
        h = torch.minimum(h, t - t_end)
        s = t - h
        if tree is None:
            dw = h.sqrt()[:, None] * per_sample_normal(tuple(x.shape), seed, 1000 + it, x.dtype)
        else:
            dw, _ = tree(s, t)
        g_t, g_s = sde.g2(t).sqrt()[:, None], sde.g2(s).sqrt()[:, None]
        x1 = x - h[:, None] * reverse_drift(x, t) + g_t * dw
        x2 = x - h[:, None] * reverse_drift(x1, s) + g_s * dw
        x_new = 0.5 * (x1 + x2)
        delta = torch.maximum(torch.full_like(x1, eps_abs), eps_rel * torch.maximum(x1.abs(), prev.abs()))
        err = ((x1 - x_new) / delta).square().mean(dim=1).sqrt()
        accept = active & (err <= 1)
        nfe += 2 * active
        x = torch.where(accept[:, None], x_new, x)
        prev = torch.where(accept[:, None], x1, prev)
        t = torch.where(accept, s, t)
        active = active & ~(accept & (t <= t_end * (1 + 1e-12)))
        h = torch.where(active, 0.9 * h * err.clamp_min(1e-10) ** -0.9, h)
    return x, nfe


def _row(gm: Any, x: torch.Tensor, nfe: torch.Tensor, **info: Any) -> dict[str, Any]:
    frac, stds = gm.component_stats(x)
    return {**info, "nfe": float(nfe.double().mean()), "weights": frac.tolist(), "stds": stds.tolist()}


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress: Any = None) -> dict:
    import diffeqbridge as deb
    from diffeqbridge import diffusion as dd
    from diffeqbridge.diffusion.demo import demo_mixture

    H.set_threads(threads)
    size = size or ("quick" if quick else "full")
    n = {"tiny": 200, "quick": 2000, "full": 8000}[size]
    ggf_tols = {"tiny": [0.05], "quick": [0.02, 0.05, 0.1], "full": [0.01, 0.02, 0.05, 0.1, 0.2]}[size]
    our_tols = {"tiny": [1e-2], "quick": [1e-3, 1e-2, 5e-2], "full": [1e-3, 1e-2, 5e-2, 0.1]}[size]
    sde, gm, t_end = dd.VPSDE(), demo_mixture(), 1e-3
    score = gm.score_model(sde, "score")
    x_T = sde.prior_sample((n, 2), seed=0)
    rows: dict[str, list[dict[str, Any]]] = {"GGF, redraw after rejection": [], "GGF, fixed Brownian path": [], "ours (SRA1)": []}
    for eps_rel in ggf_tols:
        start = time.perf_counter()
        x, nfe = ggf_sampler(score, sde, x_T, t_end, 0.0078, eps_rel, seed=1)
        rows["GGF, redraw after rejection"].append(_row(gm, x, nfe, eps_rel=eps_rel, wall_s=time.perf_counter() - start))
        tree = deb.VirtualBrownianTree(t_end, sde.T, (n, 2), seed=1)
        start = time.perf_counter()
        x, nfe = ggf_sampler(score, sde, x_T, t_end, 0.0078, eps_rel, tree=tree)
        rows["GGF, fixed Brownian path"].append(_row(gm, x, nfe, eps_rel=eps_rel, wall_s=time.perf_counter() - start))
        if progress:
            progress(f"ggf {eps_rel}")
    for tol in our_tols:
        start = time.perf_counter()
        sol = dd.sample(score, sde, x_T, method="sde", parameterization="score", atol=tol, rtol=tol, seed=1)
        rows["ours (SRA1)"].append(_row(gm, sol.ys[-1], sol.stats.nf, tol=tol, wall_s=time.perf_counter() - start))
    payload = {"config": {"n": n, "size": size, "t_end": t_end, "eps_abs": 0.0078, "sde": repr(sde)}, "rows": rows}
    out = Path(out)
    doc = H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)
    H.write_plot(plot, doc, out / f"{NAME}.png")
    for label, rs in rows.items():
        for r in rs:
            tol = r.get("eps_rel", r.get("tol"))
            stds = " ".join(f"{v:.3f}" for v in r["stds"])
            print(f"{label:<30} tol {tol:<6g} NFE {r['nfe']:7.1f}  stds {stds}")
    return doc


def plot(doc: dict) -> Any:
    """The figure of this benchmark, from its JSON document (``tools/bench_report.py`` renders it)."""
    rows, n = doc["rows"], doc["config"]["n"]
    fig, axes = H.figure(ncols=1, size=(6.0, 4.2))
    ax = axes[0]
    for (label, rs), color in zip(rows.items(), ("C3", "C0", "C2")):
        xs = [r["nfe"] for r in rs]
        for k in range(3):
            ax.plot(xs, [r["stds"][k] for r in rs], marker="os^"[k], color=color, label=label if k == 0 else None, alpha=0.85)
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="exact std 0.5")
    H.label_axes(
        ax,
        xlabel="model evaluations per sample",
        ylabel="component std (o, s, ^: components 1-3)",
        title=f"2-D mixture, exact score, {n} samples",
        logx=True,
    )
    return fig


def tables(doc: dict) -> dict[str, str]:
    """``rows``: NFE per sample and component stds per sampler and tolerance."""
    rows = []
    for label, rs in doc["rows"].items():
        tols = [r.get("eps_rel", r.get("tol")) for r in rs]
        stds = [v for r in rs for v in r["stds"]]
        rows.append(
            (
                label,
                ("`eps_rel` " if "eps_rel" in rs[0] else "") + " / ".join(f"{t:g}" for t in tols),
                " / ".join(f"{r['nfe']:.0f}" for r in rs),
                H.span(stds, "{:.3f}").replace("–", " - "),
            )
        )
    return {"rows": H.markdown_table(["sampler", "tolerance", "NFE / sample", "component stds"], rows)}


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
