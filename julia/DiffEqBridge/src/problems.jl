# SDEProblem / ODEProblem construction (out-of-place, state a flat Float64 vector).

const NOISE_TYPES = ("diagonal", "scalar", "additive", "general")

"""
    build_problem(f, g, u0, tspan, p; noise = "diagonal", noise_dim = nothing)

An out-of-place `SDEProblem` (or `ODEProblem` when `g === nothing`). Noise types:
`"diagonal"`/`"additive"`: `g` returns `u`'s shape; `"scalar"`: `g` returns `u`'s shape and one
Wiener process is shared (`noise = WienerProcess(t0, 0.0, 0.0)`); `"general"`: `g` returns an
`n x noise_dim` matrix (`noise_rate_prototype = zeros(n, noise_dim)`).
"""
function build_problem(f, g, u0::AbstractVector, tspan, p; noise = "diagonal", noise_dim = nothing)
    t0, t1 = Float64(tspan[1]), Float64(tspan[2])
    u0v = collect(Float64, u0)
    g === nothing && return ODEProblem{false}(f, u0v, (t0, t1), p)
    noise_type = String(noise)
    noise_type in NOISE_TYPES ||
        throw(ArgumentError("noise must be one of $(join(NOISE_TYPES, ", ")), got \"$(noise_type)\""))
    if noise_type == "general"
        noise_dim === nothing && throw(ArgumentError("noise_dim is required for general noise"))
        return SDEProblem{false}(
            f, g, u0v, (t0, t1), p;
            noise_rate_prototype = zeros(Float64, length(u0v), Int(noise_dim))
        )
    elseif noise_type == "scalar"
        return SDEProblem{false}(f, g, u0v, (t0, t1), p; noise = WienerProcess(t0, 0.0, 0.0))
    end
    return SDEProblem{false}(f, g, u0v, (t0, t1), p)
end

"""
    python_fields(f, fvjp, g, gvjp; noise = "diagonal")

Wrap Python callables as `PyField`s (`g` may be `nothing` for ODEs).
"""
function python_fields(f, fvjp, g, gvjp; noise = "diagonal")
    fj = PyField{Vector{Float64}}(f, fvjp)
    g === nothing && return fj, nothing
    G = String(noise) == "general" ? Matrix{Float64} : Vector{Float64}
    return fj, PyField{G}(g, gvjp)
end
