"""Score-based diffusion on the diffeqbridge engine (contract: DESIGN.md, "Score-based diffusion").

::

    from diffeqbridge import diffusion as dd
    sde = dd.VPSDE()
    x_T = sde.prior_sample((B, *shape), seed=0)
    sol = dd.sample(model, sde, x_T, method="sde", parameterization="eps")
    samples = sol.ys[-1]

Forward processes (:mod:`.processes`), model adapters and guidance (:mod:`.models`),
closed-form Gaussian-mixture oracles (:mod:`.oracles`), samplers (:mod:`.sampling`),
likelihoods (:mod:`.likelihood`).  Reference: docs/diffusion.md.
"""

from .common import per_sample_normal, per_sample_rademacher, per_sample_uniform
from .likelihood import bits_per_dim, log_likelihood
from .models import PARAMETERIZATIONS, ClassifierFreeGuidance, ModelAdapter
from .oracles import GaussianMixture, sliced_wasserstein
from .processes import VESDE, VPSDE, DiffusionProcess, DiscreteVPSDE, ScheduleSDE, SubVPSDE
from .sampling import METHODS, sample

__all__ = [
    "ClassifierFreeGuidance",
    "DiffusionProcess",
    "DiscreteVPSDE",
    "GaussianMixture",
    "METHODS",
    "ModelAdapter",
    "PARAMETERIZATIONS",
    "SubVPSDE",
    "ScheduleSDE",
    "VESDE",
    "VPSDE",
    "bits_per_dim",
    "invert",
    "log_likelihood",
    "per_sample_normal",
    "per_sample_rademacher",
    "per_sample_uniform",
    "sample",
    "sliced_wasserstein",
]


def __getattr__(name: str):  # noqa: ANN202 - names of the fixed-grid samplers' modules, imported on use
    if name in ("invert", "InversionState"):
        from . import inversion

        return getattr(inversion, name)
    if name in ("from_jax", "JaxModel"):  # imports jax: only on use
        from . import jax_models

        return getattr(jax_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
