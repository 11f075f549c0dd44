"""
    DiffEqBridge

Julia side of the `diffeqbridge` Python package's julia backend.

It maps SciML algorithm names (as the Python package spells them) to
StochasticDiffEq/OrdinaryDiffEq algorithm objects, wraps out-of-place Python
callables `f(u, p, t)` / `g(u, p, t)` (received through PythonCall as `Py`
objects, or any Julia callable) and solves one trajectory at a time, returning
`(t, u, retcode)` with `u` of shape `(length(t), length(u0))` (general noise:
the diffusion returns an `n x m` matrix).

Gradients (SciMLSensitivity with an explicit adjoint and `ChainRulesCore.rrule`
callbacks into Python) and GPU ensembles come later.
"""
module DiffEqBridge

using DiffEqNoiseProcess: WienerProcess
using OrdinaryDiffEqLowOrderRK: DP5
using OrdinaryDiffEqTsit5: Tsit5
using PythonCall: Py, pyconvert
using SciMLBase: SciMLBase, ODEProblem, SDEProblem, solve
using StochasticDiffEq: EM, EulerHeun, LambaEM, RKMil, SOSRA, SOSRI, SRA1, SRIW1

export algorithm, solve_ode, solve_sde, SDE_ALGORITHMS, ODE_ALGORITHMS

"Names of the SDE algorithms this bridge maps (the Python package's solver names)."
const SDE_ALGORITHMS = ("EM", "EulerHeun", "LambaEM", "RKMil", "SRIW1", "SOSRI", "SRA1", "SOSRA")

"Names of the ODE algorithms this bridge maps; `Dopri5` is an alias of SciML's `DP5`."
const ODE_ALGORITHMS = ("Tsit5", "DP5", "Dopri5")

const NOISE_TYPES = ("diagonal", "scalar", "additive", "general")

function _interpretation(interpretation::AbstractString)
    key = lowercase(String(interpretation))
    if key == "ito"
        return SciMLBase.AlgorithmInterpretation.Ito
    elseif key == "stratonovich"
        return SciMLBase.AlgorithmInterpretation.Stratonovich
    end
    throw(ArgumentError("interpretation must be \"ito\" or \"stratonovich\", got \"$(interpretation)\""))
end

"""
    algorithm(name; interpretation = "ito")

The SciML algorithm object for `name` (one of `SDE_ALGORITHMS` or
`ODE_ALGORITHMS`). `interpretation` only matters for `RKMil`, the one mapped
method that supports both calculi; `EulerHeun` is always Stratonovich.
"""
function algorithm(name::AbstractString; interpretation::AbstractString = "ito")
    key = String(name)
    if key == "EM"
        return EM()
    elseif key == "EulerHeun"
        return EulerHeun()
    elseif key == "LambaEM"
        return LambaEM()
    elseif key == "RKMil"
        return RKMil(; interpretation = _interpretation(interpretation))
    elseif key == "SRIW1"
        return SRIW1()
    elseif key == "SOSRI"
        return SOSRI()
    elseif key == "SRA1"
        return SRA1()
    elseif key == "SOSRA"
        return SOSRA()
    elseif key == "Tsit5"
        return Tsit5()
    elseif key == "DP5" || key == "Dopri5"
        return DP5()
    end
    known = join((SDE_ALGORITHMS..., ODE_ALGORITHMS...), ", ")
    throw(ArgumentError("unknown algorithm \"$(key)\"; known: $(known)"))
end

is_sde_algorithm(name::AbstractString) = String(name) in SDE_ALGORITHMS

# Results of Python callables arrive as `Py`; Julia callables return arrays already.
_to_array(x::Py, ::Type{T}) where {T} = pyconvert(T, x)
_to_array(x::AbstractArray, ::Type{T}) where {T} = convert(T, x)

"Wrap an out-of-place callable `fn(u, p, t)` so that it returns a `T` (a dense Float64 array)."
function _wrap(fn, ::Type{T}) where {T}
    return (u, p, t) -> _to_array(fn(u, p, t), T)
end

_retcode(sol) = String(Symbol(sol.retcode))

function _common_kwargs(; abstol, reltol, saveat, dt, adaptive, maxiters)
    kwargs = Dict{Symbol, Any}(
        :abstol => Float64(abstol),
        :reltol => Float64(reltol),
        :maxiters => Int(maxiters),
    )
    if saveat !== nothing
        kwargs[:saveat] = collect(Float64, saveat)
    end
    if dt !== nothing
        kwargs[:dt] = Float64(dt)
    end
    if adaptive !== nothing
        kwargs[:adaptive] = Bool(adaptive)
    end
    return kwargs
end

_as_matrix(us, n) = isempty(us) ? zeros(Float64, 0, n) : permutedims(reduce(hcat, us))

"""
    solve_sde(f, g, u0, tspan; p = nothing, alg = "SOSRI", noise = "diagonal",
              noise_dim = nothing, interpretation = "ito", abstol = 1e-2, reltol = 1e-2,
              saveat = nothing, dt = nothing, adaptive = nothing, seed = 0,
              maxiters = 100_000) -> (t, u, retcode)

Solve `du = f(u,p,t) dt + g(u,p,t) dW` for one trajectory. `f` and `g` are
out-of-place. `noise` is one of `"diagonal"`, `"scalar"`, `"additive"`,
`"general"`; for `"general"` `g` returns an `n x noise_dim` matrix. `seed`
fixes the Brownian path (SciML's `seed` keyword). Returns the save times, a
`length(t) x n` matrix of states and the `SciMLBase.ReturnCode` name.
"""
function solve_sde(f, g, u0, tspan; p = nothing, alg = "SOSRI", noise = "diagonal",
        noise_dim = nothing, interpretation = "ito", abstol = 1.0e-2, reltol = 1.0e-2,
        saveat = nothing, dt = nothing, adaptive = nothing, seed = 0,
        maxiters = 100_000)
    noise_type = String(noise)
    noise_type in NOISE_TYPES ||
        throw(ArgumentError("noise must be one of $(join(NOISE_TYPES, ", ")), got \"$(noise_type)\""))
    u0v = collect(Float64, vec(u0))
    n = length(u0v)
    t0, t1 = Float64(tspan[1]), Float64(tspan[2])
    fj = _wrap(f, Vector{Float64})
    if noise_type == "general"
        noise_dim === nothing && throw(ArgumentError("noise_dim is required for general noise"))
        m = Int(noise_dim)
        gj = _wrap(g, Matrix{Float64})
        prob = SDEProblem{false}(fj, gj, u0v, (t0, t1), p;
            noise_rate_prototype = zeros(Float64, n, m))
    elseif noise_type == "scalar"
        gj = _wrap(g, Vector{Float64})
        prob = SDEProblem{false}(fj, gj, u0v, (t0, t1), p;
            noise = WienerProcess(t0, 0.0, 0.0))
    else  # diagonal and additive noise: g returns u's shape
        gj = _wrap(g, Vector{Float64})
        prob = SDEProblem{false}(fj, gj, u0v, (t0, t1), p)
    end
    solver = algorithm(alg; interpretation = interpretation)
    kwargs = _common_kwargs(; abstol, reltol, saveat, dt, adaptive, maxiters)
    sol = solve(prob, solver; seed = UInt64(seed), kwargs...)
    return collect(Float64, sol.t), _as_matrix(sol.u, n), _retcode(sol)
end

"""
    solve_ode(f, u0, tspan; p = nothing, alg = "Tsit5", abstol = 1e-6, reltol = 1e-3,
              saveat = nothing, dt = nothing, adaptive = nothing,
              maxiters = 100_000) -> (t, u, retcode)

Solve `du/dt = f(u,p,t)` (out-of-place) with OrdinaryDiffEq.
"""
function solve_ode(f, u0, tspan; p = nothing, alg = "Tsit5", abstol = 1.0e-6,
        reltol = 1.0e-3, saveat = nothing, dt = nothing, adaptive = nothing,
        maxiters = 100_000)
    u0v = collect(Float64, vec(u0))
    n = length(u0v)
    prob = ODEProblem{false}(_wrap(f, Vector{Float64}), u0v,
        (Float64(tspan[1]), Float64(tspan[2])), p)
    kwargs = _common_kwargs(; abstol, reltol, saveat, dt, adaptive, maxiters)
    sol = solve(prob, algorithm(alg); kwargs...)
    return collect(Float64, sol.t), _as_matrix(sol.u, n), _retcode(sol)
end

end # module DiffEqBridge
