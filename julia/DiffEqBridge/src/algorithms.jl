# SciML algorithms and sensitivity algorithms by name (names as the Python package spells them,
# mapped in `diffeqbridge.julia.mapping.ALGORITHMS`).

"SDE algorithms this bridge constructs (StochasticDiffEq names)."
const SDE_ALGORITHMS = (
    "EM", "EulerHeun", "LambaEM", "LambaEulerHeun", "RKMil", "SRIW1", "SOSRI", "SRA1",
    "SRA3", "SOSRA", "ImplicitEM", "ImplicitRKMil", "ISSEM", "SKenCarp", "SROCK1",
)

"ODE algorithms this bridge constructs; `Dopri5` is an alias of OrdinaryDiffEq's `DP5`."
const ODE_ALGORITHMS = ("Tsit5", "DP5", "Dopri5", "Rodas4", "Kvaerno5")

function _interpretation(interpretation::AbstractString)
    key = lowercase(String(interpretation))
    key == "ito" && return SciMLBase.AlgorithmInterpretation.Ito
    key == "stratonovich" && return SciMLBase.AlgorithmInterpretation.Stratonovich
    throw(ArgumentError("interpretation must be \"ito\" or \"stratonovich\", got \"$(interpretation)\""))
end

# `autodiff = "finitediff"`: Jacobians by finite differences, so that no dual number ever
# reaches a Python callback; `nothing` keeps the method's default (ForwardDiff).
# OrdinaryDiffEq's solver libraries take an ADTypes choice. StochasticDiffEq 6.x stores
# `autodiff` as a Bool type parameter (`false` = finite differences, as its `alg_autodiff`
# maps it to `AutoFiniteDiff()`); later versions take the ADTypes object.
_autodiff_kwargs(autodiff) = autodiff === nothing ? (;) : (; autodiff = AutoFiniteDiff())

function _sde_autodiff_kwargs(autodiff)
    autodiff === nothing && return (;)
    return pkgversion(StochasticDiffEq) < v"7" ? (; autodiff = false) : (; autodiff = AutoFiniteDiff())
end

"""
    algorithm(name; interpretation = "ito", theta = nothing, autodiff = nothing)

The SciML algorithm object for `name` (one of `SDE_ALGORITHMS` or `ODE_ALGORITHMS`).
`interpretation` is used by `RKMil`/`ImplicitRKMil`; `theta` by the drift-implicit methods;
`autodiff = "finitediff"` makes the implicit methods build Jacobians by finite differences.
"""
function algorithm(
        name::AbstractString; interpretation::AbstractString = "ito", theta = nothing,
        autodiff = nothing
    )
    key = String(name)
    ad = _autodiff_kwargs(autodiff)
    sad = _sde_autodiff_kwargs(autodiff)
    th = theta === nothing ? (;) : (; theta = Float64(theta))
    if key == "EM"
        return EM()
    elseif key == "EulerHeun"
        return EulerHeun()
    elseif key == "LambaEM"
        return LambaEM()
    elseif key == "LambaEulerHeun"
        return LambaEulerHeun()
    elseif key == "RKMil"
        return RKMil(; interpretation = _interpretation(interpretation))
    elseif key == "SRIW1"
        return SRIW1()
    elseif key == "SOSRI"
        return SOSRI()
    elseif key == "SRA1"
        return SRA1()
    elseif key == "SRA3"
        return SRA3()
    elseif key == "SOSRA"
        return SOSRA()
    elseif key == "ImplicitEM"
        return ImplicitEM(; th..., sad...)
    elseif key == "ImplicitRKMil"
        return ImplicitRKMil(; interpretation = _interpretation(interpretation), th..., sad...)
    elseif key == "ISSEM"
        return ISSEM(; th..., sad...)
    elseif key == "SKenCarp"
        return SKenCarp(; sad...)
    elseif key == "SROCK1"
        return SROCK1()
    elseif key == "Tsit5"
        return Tsit5()
    elseif key == "DP5" || key == "Dopri5"
        return DP5()
    elseif key == "Rodas4"
        return Rodas4(; ad...)
    elseif key == "Kvaerno5"
        return Kvaerno5(; ad...)
    end
    known = join((SDE_ALGORITHMS..., ODE_ALGORITHMS...), ", ")
    throw(ArgumentError("unknown algorithm \"$(key)\"; known: $(known)"))
end

is_sde_algorithm(name::AbstractString) = String(name) in SDE_ALGORITHMS

"""
    sensealg(name; checkpointing = false, noisemixing = false)

An explicit SciMLSensitivity adjoint with `autojacvec = ZygoteVJP()`: `"InterpolatingAdjoint"`
or `"BacksolveAdjoint"`. The automatic choice (`sensealg = nothing`) is never used: it may pick
a forward-mode method that pushes dual numbers into the Python callbacks.
"""
function sensealg(name::AbstractString; checkpointing::Bool = false, noisemixing::Bool = false)
    key = String(name)
    if key == "InterpolatingAdjoint"
        return InterpolatingAdjoint(; autojacvec = ZygoteVJP(), checkpointing, noisemixing)
    elseif key == "BacksolveAdjoint"
        return BacksolveAdjoint(; autojacvec = ZygoteVJP(), checkpointing, noisemixing)
    end
    throw(ArgumentError("sensealg must be \"InterpolatingAdjoint\" or \"BacksolveAdjoint\", got \"$(key)\""))
end
