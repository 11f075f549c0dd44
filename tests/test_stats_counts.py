"""``sol.stats.nf``/``ng`` are the drift/diffusion calls per sample for every implicit,
Rosenbrock and composite solver, and ``extra["njac"]`` the Jacobians built.

Every call counts: stage and Newton evaluations, the one traced call of an autodiff
Jacobian (``torch.func.jacrev``) or time derivative / JVP (``torch.func.jvp``), the
``n + 1`` calls of a finite-difference Jacobian and the 2 of a finite-difference ``∂f/∂t``,
one call per GMRES step of Newton–Krylov, the Jacobians a full Newton iteration rebuilds,
and both methods of a composite step that ran both.  A batched call is attributed to every
sample active in it (each active sample is evaluated once per call), so with one sample
``nf`` equals the calls the user's function receives, and in a batch whose samples take
different step counts the sample running longest has been active in every call.
"""

from __future__ import annotations

import pytest
import torch
from problems import Counting

import diffeqbridge as deb
from diffeqbridge.nonlinear import NewtonOptions

F64 = torch.float64
RATES = torch.tensor([3.0, 500.0], dtype=F64)  # stiff ratio 500/3: several Newton iterations


def _drift(t, y):
    return -RATES * y + torch.cos(t).unsqueeze(-1)  # non-autonomous: ∂f/∂t ≠ 0


def _jac(t, y):
    return torch.diag_embed(-RATES.expand_as(y))


ODE_SOLVERS = {
    "Rodas4": lambda: deb.Rodas4(),
    "Rodas4-fd": lambda: deb.Rodas4(jac="fd"),
    "Kvaerno5": lambda: deb.Kvaerno5(),
    "Kvaerno5-fd": lambda: deb.Kvaerno5(jac="fd"),
    "Kvaerno5-full-newton": lambda: deb.Kvaerno5(newton=NewtonOptions(full_newton=True)),
    "Kvaerno5-reuse": lambda: deb.Kvaerno5(reuse_jacobian=True),
    "Kvaerno5-krylov": lambda: deb.Kvaerno5(linsolve="krylov"),
    "AutoTsit5(Rodas4)": lambda: deb.AutoTsit5(deb.Rodas4()),
    "AutoTsit5(Kvaerno5)": lambda: deb.AutoTsit5(deb.Kvaerno5()),
}


@pytest.mark.parametrize("name", list(ODE_SOLVERS))
def test_ode_nf_is_every_drift_call(name):
    f = Counting(_drift)
    sol = deb.solve(deb.ODEProblem(f, torch.tensor([[1.0, 0.5]], dtype=F64), (0.0, 1.0)), ODE_SOLVERS[name]())
    assert sol.success and sol.stats.nf.tolist() == [f.calls] and sol.stats.ng.tolist() == [0]
    assert int(sol.stats.extra["njac"][0]) >= 1


def _sde(noise: str, interpretation: str = "ito", batch: int = 1):
    drift = Counting(lambda t, y: _drift(t, y) * torch.linspace(1.0, 3.0, batch, dtype=F64).unsqueeze(-1))
    if noise == "additive":
        diffusion = Counting(lambda t, y: 0.3 * torch.ones_like(y))
    else:
        diffusion = Counting(lambda t, y: 0.3 * y + 0.1)
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64).expand(batch, 2).clone()
    prob = deb.SDEProblem(drift, diffusion, y0, (0.0, 0.3), noise=noise, interpretation=interpretation)
    return drift, diffusion, prob


SDE_SOLVERS = {
    "ImplicitEM": (lambda: deb.ImplicitEM(), "diagonal", "ito"),
    "ImplicitEM-fd": (lambda: deb.ImplicitEM(jac="fd"), "diagonal", "ito"),
    "ImplicitEM-krylov": (lambda: deb.ImplicitEM(linsolve="krylov"), "diagonal", "ito"),
    "ImplicitEM-smooth": (lambda: deb.ImplicitEM(smooth_est=True), "diagonal", "ito"),
    "ImplicitEM-krylov-smooth": (lambda: deb.ImplicitEM(linsolve="krylov", smooth_est=True), "diagonal", "ito"),
    "ISSEM": (lambda: deb.ISSEM(), "diagonal", "ito"),
    "ImplicitRKMil": (lambda: deb.ImplicitRKMil(), "diagonal", "ito"),
    "ImplicitRKMil-strat": (lambda: deb.ImplicitRKMil(), "diagonal", "stratonovich"),
    "SKenCarp": (lambda: deb.SKenCarp(), "additive", "ito"),
    "SKenCarp-fd": (lambda: deb.SKenCarp(jac="fd"), "additive", "ito"),
    "SKenCarp-krylov": (lambda: deb.SKenCarp(linsolve="krylov"), "additive", "ito"),
    # switching early enough that the stiff method runs within tspan
    "AutoSOSRI": (lambda: deb.AutoSOSRI(maxstiffstep=3), "diagonal", "ito"),
    "AutoSwitch(SOSRI,ImplicitEM)": (
        lambda: deb.AutoSwitch(deb.SOSRI(), deb.ImplicitEM(), maxstiffstep=3, nonstifftol=0.1, stifftol=0.1),
        "diagonal",
        "ito",
    ),
    "default-additive": (lambda: None, "additive", "ito"),
    "default-diagonal": (lambda: None, "diagonal", "ito"),
}


@pytest.mark.parametrize("name", list(SDE_SOLVERS))
def test_sde_nf_ng_are_every_drift_and_diffusion_call(name):
    make, noise, interpretation = SDE_SOLVERS[name]
    drift, diffusion, prob = _sde(noise, interpretation)
    sol = deb.solve(prob, make(), seed=1, atol=1e-2, rtol=1e-2)
    assert sol.success
    assert sol.stats.nf.tolist() == [drift.calls] and sol.stats.ng.tolist() == [diffusion.calls]
    if name.startswith("Auto"):  # the stiff method ran (its Jacobians are counted)
        assert int(sol.stats.extra["njac"][0]) >= 1


JAC_SOLVERS = {
    "Rodas4": lambda jac: deb.Rodas4(jac=jac),
    "Kvaerno5": lambda jac: deb.Kvaerno5(jac=jac),
    "Kvaerno5-full-newton": lambda jac: deb.Kvaerno5(newton=NewtonOptions(jac=jac, full_newton=True)),
    "Kvaerno5-reuse": lambda jac: deb.Kvaerno5(jac=jac, reuse_jacobian=True),
    "ImplicitEM": lambda jac: deb.ImplicitEM(jac=jac),
    "ImplicitRKMil": lambda jac: deb.ImplicitRKMil(jac=jac),
    "ISSEM": lambda jac: deb.ISSEM(jac=jac),
    "SKenCarp": lambda jac: deb.SKenCarp(jac=jac),
    "AutoTsit5(Rodas4)": lambda jac: deb.AutoTsit5(deb.Rodas4(jac=jac)),
}


@pytest.mark.parametrize("name", list(JAC_SOLVERS))
def test_njac_is_every_jacobian_built(name):
    """With a user ``jac`` (no drift calls) ``extra["njac"]`` equals its calls, the full
    Newton iterations' rebuilt Jacobians included; with ``"autodiff"`` the same solve makes
    exactly ``njac`` more drift calls (one traced call each; Rodas4 also one per ``∂f/∂t``,
    which a user ``jac`` takes by 2-call forward differences)."""
    jac = Counting(_jac)
    solver = JAC_SOLVERS[name](jac)
    if solver.is_sde:
        drift, diffusion, prob = _sde("additive" if name == "SKenCarp" else "diagonal")
        kwargs = {"seed": 1, "atol": 1e-2, "rtol": 1e-2}
    else:
        drift = Counting(_drift)
        prob, kwargs = deb.ODEProblem(drift, torch.tensor([[1.0, 0.5]], dtype=F64), (0.0, 1.0)), {}
    sol = deb.solve(prob, solver, **kwargs)
    njac = int(sol.stats.extra["njac"][0])
    assert sol.success and njac == jac.calls > 0 and sol.stats.nf.tolist() == [drift.calls]

    drift.calls = 0
    auto = deb.solve(prob, JAC_SOLVERS[name]("autodiff"), **kwargs)
    assert auto.stats.nf.tolist() == [drift.calls]
    if torch.equal(auto.stats.nsteps, sol.stats.nsteps) and int(auto.stats.extra["njac"][0]) == njac:
        # Rosenbrock: the traced ∂f/∂t (1 call) replaces the user jac's difference (2 calls)
        per_jacobian = 0 if "Rodas4" in name else 1
        assert int(auto.stats.nf[0]) - int(sol.stats.nf[0]) == njac * per_jacobian


@pytest.mark.parametrize("name", ["ImplicitEM", "SKenCarp", "AutoSOSRI"])
def test_batched_counts_attribute_each_call_to_every_active_sample(name):
    """Samples with different step counts: every sample's ``nf``/``ng`` counts the batched
    calls made while it was active, so the sample active longest counts every call."""
    make, noise, interpretation = SDE_SOLVERS[name]
    drift, diffusion, prob = _sde(noise, interpretation, batch=4)
    sol = deb.solve(prob, make(), seed=3, atol=1e-2, rtol=1e-2)
    assert sol.success and int(sol.stats.nsteps.min()) < int(sol.stats.nsteps.max())
    longest = int(sol.stats.nsteps.argmax())
    assert int(sol.stats.nf[longest]) == drift.calls and int(sol.stats.ng[longest]) == diffusion.calls
    assert bool((sol.stats.nf <= drift.calls).all()) and int(sol.stats.nf.min()) < drift.calls
