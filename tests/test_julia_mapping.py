"""The julia backend's pure parts, tested without Julia.

* the SciML name/keyword mapping (algorithms, noise, solve keywords, sensealgs, retcodes,
  seeds) and its agreement with the Julia sources (every mapped name is constructed by
  ``algorithm()`` in ``julia/DiffEqBridge/src/algorithms.jl``);
* the Python callbacks Julia calls (``PythonFields``): shapes, call counts per sample and
  VJPs against analytic derivatives, fed NumPy arrays where Julia would pass its wrappers;
* the no-copy array layout across the boundary (a Fortran-ordered NumPy array stands in for
  Julia's column-major result);
* ``juliapkg.json`` / ``Project.toml`` consistency (UUID format, deps, weakdeps, extension).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tomllib
import torch

import diffeqbridge as deb
from diffeqbridge.julia import julia_package_dir, juliapkg_json_path
from diffeqbridge.julia.backend import PythonFields
from diffeqbridge.julia.bridge import from_julia, prepare_environment, to_julia_matrix
from diffeqbridge.julia.mapping import (
    ALGORITHMS,
    NATIVE_ONLY,
    RETCODES,
    UnsupportedOnJulia,
    algorithm_spec,
    noise_spec,
    retcode_from_julia,
    sensealg_spec,
    solve_kwargs,
    trajectory_seed,
)
from diffeqbridge.solvers import ALL_SOLVERS

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
JL_SRC = julia_package_dir() / "src"


# ----------------------------------------------------------------------------- algorithms
def test_every_native_solver_has_a_sciml_name():
    assert {cls.__name__ for cls in ALL_SOLVERS} - set(NATIVE_ONLY) == set(ALGORITHMS)


def test_native_only_solvers_are_refused_with_the_reason():
    for name, why in NATIVE_ONLY.items():
        cls = next(c for c in ALL_SOLVERS if c.__name__ == name)
        with pytest.raises(UnsupportedOnJulia, match=re.escape(why)):
            algorithm_spec(cls())


@pytest.mark.parametrize("cls", [c for c in ALL_SOLVERS if c.__name__ not in NATIVE_ONLY], ids=lambda c: c.__name__)
def test_julia_constructs_every_mapped_name(cls):
    """``algorithm(name)`` in algorithms.jl has a branch for the mapped name, and the package
    that exports it is imported by DiffEqBridge.jl."""
    spec = algorithm_spec(cls())
    source = (JL_SRC / "algorithms.jl").read_text()
    assert f'key == "{spec.name}"' in source
    assert f"return {spec.name}(" in source
    module = (JL_SRC / "DiffEqBridge.jl").read_text()
    assert re.search(rf"using {spec.package}:[^\n]*\b{spec.name}\b", module.replace("\n    ", " "))


def test_algorithm_kwargs():
    assert algorithm_spec(deb.SOSRI()).julia_source() == "SOSRI()"
    assert algorithm_spec(deb.Dopri5()).name == "DP5"
    rk = algorithm_spec(deb.RKMil(), "stratonovich")
    assert rk.kwargs == {"interpretation": "stratonovich"}
    assert rk.julia_source() == "RKMil(; interpretation = SciMLBase.AlgorithmInterpretation.Stratonovich)"
    imp = algorithm_spec(deb.ImplicitEM(theta=0.5))
    assert imp.kwargs == {"theta": 0.5, "autodiff": "finitediff"}
    assert "AutoFiniteDiff()" in imp.julia_source()
    # Julia-source problems keep ForwardDiff Jacobians (no Python in the loop)
    assert "autodiff" not in algorithm_spec(deb.Rodas4(), python_callbacks=False).kwargs
    assert algorithm_spec(deb.Kvaerno5()).kwargs == {"autodiff": "finitediff"}
    # SKenCarp's estimate: StochasticDiffEq's ode_error_est / smooth_est
    skc = algorithm_spec(deb.SKenCarp(error_estimate="sciml_noode"), python_callbacks=False)
    assert skc.julia_source() == "SKenCarp(; ode_error_est = false, smooth_est = true)"
    assert algorithm_spec(deb.SKenCarp(), python_callbacks=False).kwargs == {"ode_error_est": True, "smooth_est": True}


def test_unknown_algorithm_refused():
    class Mystery(deb.EM):
        pass

    with pytest.raises(UnsupportedOnJulia, match="alg=Mystery has no SciML counterpart"):
        algorithm_spec(Mystery())


# ----------------------------------------------------------------------------- noise etc.
def test_noise_specs():
    assert noise_spec("diagonal", 3).prototype is None and not noise_spec("diagonal", 3).scalar_wiener
    assert noise_spec("scalar", 3).scalar_wiener
    assert noise_spec("general", 3, 2).prototype == (3, 2)
    assert noise_spec("additive", 1).kind == "additive"
    with pytest.raises(ValueError):
        noise_spec("general", 3)
    problems = (JL_SRC / "problems.jl").read_text()
    assert "noise = WienerProcess(t0, 0.0, 0.0)" in problems
    assert "noise_rate_prototype = zeros(Float64, length(u0v), Int(noise_dim))" in problems


def test_solve_kwargs():
    kw = solve_kwargs(atol=1e-3, rtol=1e-4, saveat=[0.0, 0.5, 1.0], max_steps=10, dtmin=1e-12, dt=None, adaptive=True)
    assert kw == {"abstol": 1e-3, "reltol": 1e-4, "saveat": [0.0, 0.5, 1.0], "maxiters": 10, "dtmin": 1e-12, "adaptive": True}
    assert solve_kwargs(atol=1, rtol=1, saveat=[0, 1], max_steps=1, dtmin=0, dt=0.1, adaptive=False)["dt"] == 0.1
    # every key is one _kwargs_dict in ensemble.jl accepts
    src = (JL_SRC / "ensemble.jl").read_text()
    signature = src[src.index("function _kwargs_dict") :].split("\n", 1)[0]
    for key in kw:
        assert key in signature


def test_sensealg_specs():
    s = sensealg_spec(None, is_sde=False, noise=None)
    assert s.julia_source() == "InterpolatingAdjoint(autojacvec = ZygoteVJP(), checkpointing = false)"
    s = sensealg_spec(None, is_sde=True, noise="diagonal")
    assert s.julia_source() == "BacksolveAdjoint(autojacvec = ZygoteVJP(), checkpointing = true, noisemixing = true)"
    assert not sensealg_spec(deb.BacksolveAdjoint(), True, "additive").noisemixing
    assert sensealg_spec(deb.InterpolatingAdjoint(checkpoints=4), True, "general").checkpointing
    with pytest.raises(UnsupportedOnJulia, match="DiscreteAdjoint is native-only"):
        sensealg_spec(deb.DiscreteAdjoint(), True, "diagonal")
    src = (JL_SRC / "algorithms.jl").read_text()
    for name in (
        "InterpolatingAdjoint(; autojacvec = ZygoteVJP(), checkpointing, noisemixing)",
        "BacksolveAdjoint(; autojacvec = ZygoteVJP(), checkpointing, noisemixing)",
    ):
        assert name in src


def test_retcodes():
    assert retcode_from_julia("Success") is deb.ReturnCode.Success
    assert retcode_from_julia("ReturnCode.MaxIters") is deb.ReturnCode.MaxIters
    assert retcode_from_julia("DtLessThanMin") is deb.ReturnCode.DtLessThanMin
    assert retcode_from_julia("DtNaN") is deb.ReturnCode.Unstable
    assert retcode_from_julia("Terminated") is deb.ReturnCode.Terminated
    assert retcode_from_julia("SomethingNew") is deb.ReturnCode.Failure
    assert set(RETCODES.values()) >= {
        deb.ReturnCode.Success,
        deb.ReturnCode.MaxIters,
        deb.ReturnCode.Unstable,
        deb.ReturnCode.ConvergenceFailure,
        deb.ReturnCode.Failure,
    }


def test_trajectory_seeds_distinct_and_nonzero():
    seeds = {trajectory_seed(s, i) for s in range(4) for i in range(1, 200)}
    assert len(seeds) == 4 * 199 and 0 not in seeds
    assert trajectory_seed(0, 1) == 1 and trajectory_seed(1, 1) == 2**32 + 1
    assert "seed * UInt64(2)^32 + UInt64(i)" in (JL_SRC / "ensemble.jl").read_text()


# ----------------------------------------------------------------------------- callbacks
def _gbm(batch=3, state=(2,)):
    mu = torch.tensor(1.01, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.87, dtype=torch.float64, requires_grad=True)
    y0 = torch.full((batch, *state), 0.5, dtype=torch.float64)
    return deb.SDEProblem(lambda t, y: mu * y, lambda t, y: sigma * y * y, y0, params=[mu, sigma]), mu, sigma


def test_python_fields_values_counts_and_vjps():
    prob, mu, sigma = _gbm()
    fields = PythonFields(prob)
    u = np.array([0.3, 0.7])
    fields.set_sample(2)
    np.testing.assert_allclose(fields.drift(u, None, 0.1), 1.01 * u)
    np.testing.assert_allclose(fields.diffusion(u, None, 0.1), 0.87 * u * u)
    fields.set_sample(3)
    fields.drift(u, None, 0.2)
    assert fields.nf.tolist() == [0, 1, 1] and fields.ng.tolist() == [0, 1, 0]
    v = np.array([2.0, -1.0])
    gu, gp = fields.drift_vjp(u, None, 0.0, v)
    np.testing.assert_allclose(gu, 1.01 * v)
    np.testing.assert_allclose(gp, [float(v @ u), 0.0])  # d(mu u)/d(mu, sigma)
    gu, gp = fields.diffusion_vjp(u, None, 0.0, v)
    np.testing.assert_allclose(gu, 2 * 0.87 * u * v)
    np.testing.assert_allclose(gp, [0.0, float(v @ (u * u))])
    assert mu.grad is None and sigma.grad is None  # VJPs do not accumulate into .grad


def test_python_fields_general_noise_matrix():
    y0 = torch.ones(2, 3, dtype=torch.float64)
    prob = deb.SDEProblem(lambda t, y: -y, lambda t, y: torch.stack([y, 2 * y], dim=-1), y0, noise="general", noise_dim=2)
    out = PythonFields(prob).diffusion(np.arange(3.0), None, 0.0)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out[:, 1], 2 * np.arange(3.0))


def test_python_fields_state_shape_float32():
    y0 = torch.ones(4, 2, 3, dtype=torch.float32)
    seen = []
    prob = deb.ODEProblem(lambda t, y: seen.append((t.shape, y.shape, y.dtype)) or -y, y0, (0.0, 1.0))
    out = PythonFields(prob).drift(np.arange(6.0), None, 0.5)
    assert seen == [((1,), (1, 2, 3), torch.float32)]
    assert out.dtype == np.float64 and out.shape == (6,)


# ----------------------------------------------------------------------------- arrays
def test_array_layout_without_copies():
    y0 = torch.arange(12.0, dtype=torch.float64).reshape(3, 2, 2)  # B=3, state (2, 2)
    u0s = to_julia_matrix(y0)
    assert u0s.shape == (4, 3) and u0s.flags.f_contiguous
    assert np.shares_memory(u0s, y0.numpy())
    np.testing.assert_array_equal(u0s[:, 1], y0[1].reshape(-1).numpy())
    # Julia returns an n x B x T column-major array: emulate with a Fortran-ordered array
    n, B, T = 4, 3, 5
    ys = np.asfortranarray(np.random.default_rng(0).normal(size=(n, B, T)))
    out = from_julia(ys, (B, 2, 2), torch.float64, torch.device("cpu"))
    assert out.shape == (T, B, 2, 2)
    assert np.shares_memory(out.numpy(), ys)
    np.testing.assert_array_equal(out[4, 2].reshape(-1).numpy(), ys[:, 2, 4])


def test_prepare_environment_sets_signal_handling():
    env: dict[str, str] = {}
    assert prepare_environment(env) == [] and env["PYTHON_JULIACALL_HANDLE_SIGNALS"] == "yes"
    notes = prepare_environment({"PYTHON_JULIACALL_HANDLE_SIGNALS": "no"})
    assert notes and "segfault" in notes[0]


# ----------------------------------------------------------------------------- packages
def test_juliapkg_json_and_project_toml_agree():
    data = json.loads(juliapkg_json_path().read_text())
    assert set(data) <= {"julia", "packages"}  # juliapkg's schema: top-level keys
    for name, spec in data["packages"].items():
        assert re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name)
        assert UUID.match(spec["uuid"]), name
        assert set(spec) <= {"uuid", "version", "path", "dev", "url", "rev", "subdir"}, name
    project = tomllib.loads((julia_package_dir() / "Project.toml").read_text())
    deps = {**project["deps"], **project.get("weakdeps", {})}
    for name, uuid in deps.items():
        assert UUID.match(uuid), name
        if name in data["packages"]:
            assert data["packages"][name]["uuid"] == uuid, name
    assert data["packages"]["DiffEqBridge"]["uuid"] == project["uuid"]
    for name in ("SciMLSensitivity", "Zygote", "ChainRulesCore", "StochasticDiffEq", "PythonCall", "ADTypes"):
        assert name in project["deps"]
    # DiffEqGPU/CUDA are optional: weak dependencies behind the extension
    assert set(project["weakdeps"]) == {"DiffEqGPU", "CUDA", "StaticArrays"}
    assert project["extensions"]["DiffEqBridgeGPUExt"] == ["CUDA", "DiffEqGPU", "StaticArrays"]
    assert (julia_package_dir() / "ext" / "DiffEqBridgeGPUExt.jl").is_file()
    for name in deps:
        assert name in project["compat"], f"{name} has no [compat] bound"
        if name in data["packages"]:  # one compat range per package across both files
            assert data["packages"][name]["version"] == project["compat"][name], name
    from diffeqbridge.julia.bridge import GPU_PACKAGES

    for name, (uuid, _) in GPU_PACKAGES.items():
        assert project["weakdeps"][name] == uuid


def test_every_julia_import_is_a_declared_dependency():
    project = tomllib.loads((julia_package_dir() / "Project.toml").read_text())
    declared = set(project["deps"]) | set(project.get("weakdeps", {})) | {"DiffEqBridge", "Base", "Core"}
    for path in sorted(julia_package_dir().rglob("*.jl")):
        for pkg in re.findall(r"^using (\w+)", path.read_text(), flags=re.MULTILINE):
            assert pkg in declared, f"{path.name}: `using {pkg}` is not in Project.toml"


@pytest.mark.parametrize("noise", ["additive", "diagonal", "scalar"])
def test_alg_none_on_the_julia_backend_is_a_sciml_algorithm(noise):
    """``alg=None`` with ``backend="julia"`` takes SciML's ``default_sde_alg`` (SOSRA/SOSRI),
    which maps, instead of the native composites, which do not."""
    from diffeqbridge.solve import _sciml_default_sde

    y0 = torch.ones(2, 1, dtype=torch.float64)
    g = (lambda t, y: 0.1 * torch.ones_like(y)) if noise == "additive" else (lambda t, y: 0.1 * y)
    prob = deb.SDEProblem(lambda t, y: -y, g, y0, (0.0, 1.0), noise=noise)
    solver = _sciml_default_sde(prob, None)
    assert type(solver).__name__ == ("SOSRA" if noise == "additive" else "SOSRI")
    assert algorithm_spec(solver) is not None
