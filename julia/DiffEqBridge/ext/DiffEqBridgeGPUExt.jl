"""
    DiffEqBridgeGPUExt

GPU ensembles of Julia-source problems with DiffEqGPU's kernel ensembles: the whole
trajectory loop is compiled into one CUDA kernel (`EnsembleGPUKernel(CUDA.CUDABackend())`),
states are `SVector`s, and the methods are `GPUEM`/`GPUSIEA` (SDEs, fixed step) and
`GPUTsit5` (ODEs). Loaded by Julia when DiffEqGPU, CUDA and StaticArrays are all loaded.
"""
module DiffEqBridgeGPUExt

using CUDA: CUDA
using DiffEqBridge: DiffEqBridge, collect_results, trajectory_seed, _dense
using DiffEqGPU: EnsembleGPUKernel, GPUEM, GPUSIEA, GPUTsit5
using SciMLBase: SciMLBase, EnsembleProblem, ODEProblem, SDEProblem, remake, solve
using StaticArrays: SVector

const GPU_ALGORITHMS = ("GPUEM", "GPUSIEA", "GPUTsit5")

function _gpu_algorithm(name::AbstractString)
    key = String(name)
    key == "GPUEM" && return GPUEM()
    key == "GPUSIEA" && return GPUSIEA()
    key == "GPUTsit5" && return GPUTsit5()
    throw(ArgumentError("GPU ensembles support $(join(GPU_ALGORITHMS, ", ")); got \"$(key)\""))
end

"`prob_func` for both SciMLBase signatures; `N` is the state length."
struct GPURemake{N, T, U}
    u0s::U
    seed::UInt64
end

function _remake_gpu(r::GPURemake{N, T}, prob, i::Integer) where {N, T}
    u0 = SVector{N, T}(ntuple(k -> T(r.u0s[k, i]), N))
    if prob isa SciMLBase.AbstractSDEProblem
        return remake(prob; u0 = u0, seed = trajectory_seed(r.seed, i))
    end
    return remake(prob; u0 = u0)
end

(r::GPURemake)(prob, i::Integer, repeat) = _remake_gpu(r, prob, i)
(r::GPURemake)(prob, ctx) = _remake_gpu(r, prob, ctx.sim_id)

function DiffEqBridge.gpu_ensemble(
        f, g, u0s::AbstractMatrix, tspan, p; alg, seed = 0, saveat, dt,
        adaptive::Bool = false, precision = "float32"
    )
    T = String(precision) == "float64" ? Float64 : Float32
    u0s = Matrix{Float64}(u0s)
    n, B = size(u0s)
    u0 = SVector{n, T}(ntuple(k -> T(u0s[k, 1]), n))
    ts = (T(tspan[1]), T(tspan[2]))
    pv = SVector{length(_dense(p)), T}(T.(_dense(p))...)
    prob = g === nothing ? ODEProblem{false}(f, u0, ts, pv) : SDEProblem{false}(f, g, u0, ts, pv)
    eprob = EnsembleProblem(prob; prob_func = GPURemake{n, T, typeof(u0s)}(u0s, UInt64(seed)),
        safetycopy = false)
    sim = Base.invokelatest(
        solve, eprob, _gpu_algorithm(alg), EnsembleGPUKernel(CUDA.CUDABackend());
        trajectories = B, dt = T(dt), adaptive, saveat = T.(collect(saveat))
    )
    return collect_results(sim.u, n, length(saveat))
end

end # module DiffEqBridgeGPUExt
