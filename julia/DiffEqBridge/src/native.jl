# Problems whose drift/diffusion are Julia source: compiled once, no Python in the loop, so
# ensembles can run on Julia threads or (with the GPU extension) as one GPU kernel.

# The module user source is evaluated in (keeps `Main` clean). Created at run time, not
# during precompilation, so that nothing is evaluated into a module of the package image.
const FIELDS = Ref{Module}()

function _fields_module()
    isassigned(FIELDS) || (FIELDS[] = Module(:DiffEqBridgeFields))
    return FIELDS[]
end

"""
    compile_field(body::AbstractString) -> Function

Compile `body` as the out-of-place function `(u, p, t) -> begin body end` (so `u`, `p`, `t`
are in scope, and the body's last expression is the result). Example bodies:
`"1.01 .* u"`, `"p[1] .* u"`, `"[u[2], -u[1]]"`. Written with broadcasting, the same body works
for `Vector` and `SVector` states (CPU and GPU ensembles).
"""
function compile_field(body::AbstractString)
    expr = Meta.parse("(u, p, t) -> begin\n" * String(body) * "\nend")
    return Core.eval(_fields_module(), expr)
end

function _ensemble_algorithm(name::AbstractString)
    key = String(name)
    key == "threads" && return EnsembleThreads()
    key == "serial" && return EnsembleSerial()
    throw(ArgumentError("ensemble must be \"threads\", \"serial\" or \"gpu\", got \"$(key)\""))
end

"""
    solve_native(f, g, u0s, tspan, p; alg, ensemble = "threads", interpretation = "ito",
                 theta = nothing, noise = "diagonal", noise_dim = nothing, seed = 0,
                 abstol, reltol, saveat, maxiters, dtmin, adaptive, dt = nothing)
        -> (ys, retcodes, naccept, nreject, wend)

Ensemble solve of a Julia-source problem (`f`, `g` from `compile_field`; `g === nothing`:
ODE) with `EnsembleThreads()` (Julia's threads: start Python with
`PYTHON_JULIACALL_THREADS=auto` and `PYTHON_JULIACALL_HANDLE_SIGNALS=yes`) or
`EnsembleSerial()`. Implicit methods keep their ForwardDiff Jacobians here (no Python).
"""
function solve_native(
        f, g, u0s::AbstractMatrix, tspan, p; alg, ensemble = "threads",
        interpretation = "ito", theta = nothing, noise = "diagonal", noise_dim = nothing,
        seed = 0, kwargs...
    )
    # a Julia copy of the initial states: worker threads never touch Python-owned memory
    u0m = Matrix{Float64}(u0s)
    n, B = size(u0m)
    prob = build_problem(f, g, view(u0m, :, 1), tspan, _dense(p); noise, noise_dim)
    solver = algorithm(alg; interpretation, theta)
    kw = _kwargs_dict(; kwargs...)
    eprob = EnsembleProblem(prob; prob_func = TrajectoryRemake(u0m, UInt64(seed), nothing),
        safetycopy = false)
    # the fields were compiled by an earlier call: run in the latest world
    sim = Base.invokelatest(solve, eprob, solver, _ensemble_algorithm(ensemble); trajectories = B, kw...)
    return collect_results(sim.u, n, length(kw[:saveat]))
end

"""
    gpu_ensemble(f, g, u0s, tspan, p; alg, seed = 0, saveat, dt, adaptive = false)
        -> (ys, retcodes, naccept, nreject, wend)

GPU ensemble with DiffEqGPU's `EnsembleGPUKernel(CUDA.CUDABackend())` and `GPUEM`/`GPUSIEA`
(SDEs) or `GPUTsit5` (ODEs). Implemented by the `DiffEqBridgeGPUExt` extension, which Julia
loads once `DiffEqGPU`, `CUDA` and `StaticArrays` are loaded (`diffeqbridge.julia.enable_gpu()`).
"""
function gpu_ensemble end

"True once the GPU extension is loaded."
gpu_available() = Base.get_extension(@__MODULE__, :DiffEqBridgeGPUExt) !== nothing
