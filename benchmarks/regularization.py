"""Solver-heuristic regularization (Pal et al. 2021/2023): test-time NFE, loss and time after training.

Runs ``examples/regularization.py``: the headline neural ODE classifier (concentric circles,
augmented dimension, endpoint-only cross-entropy, Tsit5 at 1e-5; no regularizer, ``"error"``,
``"local_error"``, and in full size a weight sweep), then the two toys (a neural SDE solved
by SOSRI at tolerance 0.3 and a spiral neural ODE solved by Tsit5) with every regularizer.
Each model is trained for the same iterations from the same seed; reported at test time (no
regularizer): test loss (and accuracy), NFE per trajectory (at the save times, and for
``(t0, t1)`` only) and prediction wall time, with ratios to the unregularized model.

``python benchmarks/regularization.py [--quick] [--tiny] [--out DIR]`` writes
``regularization.json`` and ``regularization.png``; ``--quick`` takes about a minute, the
full size about six CPU minutes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

try:
    from . import _harness as H
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _harness as H  # type: ignore[no-redef]

NAME = "regularization"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "regularization.py"


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("deb_example_regularization", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(quick: bool, out: Path, threads: int = 1, size: str | None = None, progress=None) -> dict:
    H.set_threads(threads)
    out = Path(out)
    payload = _example().run(quick, out, size=size or ("quick" if quick else "full"))
    return H.write_json(out / f"{NAME}.json", NAME, payload, quick=quick)  # the example wrote the PNG


def plot(doc: dict) -> Any:
    """The example's figure (training curves, test-time NFE), from the JSON document."""
    H.use_style()  # the same style whatever was plotted before in this process
    return _example().make_figure(doc)


def tables(doc: dict) -> dict[str, str]:
    """``results``: test-time NFE, loss (and accuracy) of each regularizer, relative to none."""
    rows = []
    for prob, r in doc["problems"].items():
        for name, res in r["results"].items():
            acc = f"{res['test_accuracy']:.3f}" if "test_accuracy" in res else "—"
            rows.append(
                (
                    prob,
                    name,
                    f"{res['nfe']:.1f}",
                    f"×{res['nfe_ratio']:.2f}",
                    f"×{res['test_loss_ratio']:.2f}",
                    acc,
                )
            )
    return {
        "results": H.markdown_table(["problem", "regularizer", "test NFE", "NFE vs none", "test loss vs none", "accuracy"], rows)
    }


def headline(doc: dict) -> str:
    parts = []
    for prob, r in doc["problems"].items():
        res = r["results"]
        others = [n for n in res if n != "none"]
        if not others:
            continue
        # the cheapest model whose test loss is within 5 %, else the cheapest
        ok = [n for n in others if res[n]["test_loss_ratio"] <= 1.05] or others
        best = min(ok, key=lambda n: res[n]["nfe_ratio"])
        acc = (
            f", acc {res[best]['test_accuracy']:.3f} vs {res['none']['test_accuracy']:.3f}"
            if "test_accuracy" in res[best]
            else ""
        )
        parts.append(
            f"{prob}: best {best} NFE×{res[best]['nfe_ratio']:.2f} ((t0, t1) only ×{res[best]['nfe_endpoints_ratio']:.2f}), "
            f"test loss×{res[best]['test_loss_ratio']:.2f}{acc}"
        )
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return H.sized_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
