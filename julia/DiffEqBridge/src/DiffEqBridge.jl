"""
    DiffEqBridge

Julia side of the `diffeqbridge` Python package's julia backend (called through juliacall).

  - `algorithms.jl`: SciML algorithm objects by the Python package's solver names.
  - `fields.jl`: out-of-place wrappers of Python drift/diffusion callables (`PyField`) with a
    `ChainRulesCore.rrule` whose pullback calls back into Python for the VJP.
  - `problems.jl`: `SDEProblem`/`ODEProblem` construction for the noise types.
  - `ensemble.jl`: batched solves (`EnsembleProblem` with a seeding `prob_func`), results as
    one `n x B x T` array (column-major, so Python sees `(T, B, n)` without a copy).
  - `adjoint.jl`: per-trajectory `Zygote.pullback` through `solve` with an explicit
    SciMLSensitivity `sensealg` (never the automatic choice).
  - `native.jl`: problems whose drift/diffusion are Julia source, solved with
    `EnsembleThreads()`/`EnsembleSerial()`; `gpu_ensemble` is implemented by the
    `DiffEqBridgeGPUExt` extension (DiffEqGPU + CUDA + StaticArrays, loaded on demand).
"""
module DiffEqBridge

using ADTypes: AutoFiniteDiff
using ChainRulesCore: ChainRulesCore, AbstractZero, NoTangent, ZeroTangent, unthunk
using DiffEqNoiseProcess: WienerProcess
using OrdinaryDiffEqLowOrderRK: DP5
using OrdinaryDiffEqRosenbrock: Rodas4
using OrdinaryDiffEqSDIRK: Kvaerno5
using OrdinaryDiffEqTsit5: Tsit5
using PythonCall: Py, pyconvert
using SciMLBase: SciMLBase, EnsembleProblem, EnsembleSerial, EnsembleThreads, ODEProblem,
    SDEProblem, remake, solve
using SciMLSensitivity: BacksolveAdjoint, InterpolatingAdjoint, ZygoteVJP
using StochasticDiffEq: StochasticDiffEq, EM, EulerHeun, ISSEM, ImplicitEM, ImplicitRKMil, LambaEM,
    LambaEulerHeun, RKMil, SKenCarp, SOSRA, SOSRI, SRA1, SRA3, SRIW1,
    SROCK1
using Zygote: Zygote

export algorithm, sensealg, solve_batch, solve_batch_pullback, apply_pullback,
    compile_field, solve_native, gpu_ensemble, SDE_ALGORITHMS, ODE_ALGORITHMS

include("algorithms.jl")
include("fields.jl")
include("problems.jl")
include("ensemble.jl")
include("adjoint.jl")
include("native.jl")

end # module DiffEqBridge
