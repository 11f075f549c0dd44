# Batched solves: one trajectory per column of `u0s` (`n x B`), each with its own seed.

"""
    TrajectoryRemake(u0s, seed, on_trajectory)

`prob_func` of the ensemble: trajectory `i` starts from `u0s[:, i]` with SciML seed
`seed * 2^32 + i` (`diffeqbridge.julia.mapping.trajectory_seed`). Callable with both
`prob_func` signatures: `(prob, i, repeat)` (SciMLBase 2) and `(prob, ctx)` with
`ctx.sim_id` (SciMLBase 3). `on_trajectory(i)` (a Python callable or `nothing`) tells the
Python wrappers which sample's counters to increment.
"""
struct TrajectoryRemake{U, C}
    u0s::U
    seed::UInt64
    on_trajectory::C
end

trajectory_seed(seed::UInt64, i::Integer) = seed * UInt64(2)^32 + UInt64(i)

function _remake(r::TrajectoryRemake, prob, i::Integer)
    r.on_trajectory === nothing || r.on_trajectory(i)
    u0 = collect(Float64, view(r.u0s, :, i))
    if prob isa SciMLBase.AbstractSDEProblem
        # scalar noise: a fresh WienerProcess per trajectory (the problem's one is mutable
        # state, and safetycopy would deepcopy the Python callables)
        noise = prob.noise === nothing ? nothing : WienerProcess(prob.tspan[1], 0.0, 0.0)
        return remake(prob; u0 = u0, seed = trajectory_seed(r.seed, i), noise = noise)
    end
    return remake(prob; u0 = u0)
end

(r::TrajectoryRemake)(prob, i::Integer, repeat) = _remake(r, prob, i)
(r::TrajectoryRemake)(prob, ctx) = _remake(r, prob, ctx.sim_id)

_retcode(sol) = String(Symbol(sol.retcode))
function _stat(sol, name::Symbol)
    stats = hasproperty(sol, :stats) ? sol.stats : nothing
    return stats === nothing ? 0 : Int(getproperty(stats, name))
end

"""
    terminal_noise(sol) -> Vector{Float64}

`W(t_end) - W(t0)` of an SDE solution's noise process (`sol.W.curW` at `sol.W.curt`), empty for
ODEs. The Python side exposes it as `sol.stats.extra["W_end"]` (strong-error tests need the
Brownian path SciML drew).
"""
function terminal_noise(sol)
    W = hasproperty(sol, :W) ? sol.W : nothing
    (W === nothing || !hasproperty(W, :curW)) && return Float64[]
    return collect(Float64, vec(W.curW))
end

"""
    collect_results(sols, n, T) -> (ys, retcodes, naccept, nreject, wend)

`ys` is `n x B x T` (column-major: Python reads it as a C-ordered `(T, B, n)` array without a
copy). A trajectory that stopped early (MaxIters, DtLessThanMin, Unstable) saved fewer than
`T` points: its missing times are NaN (as in the native engine) and its retcode says why. `wend` is `m x B` (`terminal_noise` of every trajectory; `0 x B` for ODEs).
"""
function collect_results(sols, n::Integer, T::Integer)
    B = length(sols)
    ys = fill(NaN, n, B, T)
    retcodes = Vector{String}(undef, B)
    naccept = zeros(Int, B)
    nreject = zeros(Int, B)
    m = B == 0 ? 0 : length(terminal_noise(sols[1]))
    wend = fill(NaN, m, B)
    for (i, sol) in enumerate(sols)
        for j in 1:min(length(sol.u), T)
            ys[:, i, j] .= vec(sol.u[j])
        end
        retcodes[i] = _retcode(sol)
        naccept[i] = _stat(sol, :naccept)
        nreject[i] = _stat(sol, :nreject)
        w = terminal_noise(sol)
        length(w) == m && (wend[:, i] .= w)
    end
    return ys, retcodes, naccept, nreject, wend
end

function _kwargs_dict(; abstol, reltol, saveat, maxiters, dtmin, adaptive, dt = nothing)
    kw = Dict{Symbol, Any}(
        :abstol => Float64(abstol), :reltol => Float64(reltol),
        :saveat => collect(Float64, saveat), :maxiters => Int(maxiters),
        :dtmin => Float64(dtmin), :adaptive => Bool(adaptive),
    )
    dt === nothing || (kw[:dt] = Float64(dt))
    return kw
end

"""
    solve_batch(f, fvjp, g, gvjp, u0s, tspan, p; alg, interpretation = "ito", theta = nothing,
                autodiff = "finitediff", noise = "diagonal", noise_dim = nothing, seed = 0,
                on_trajectory = nothing, abstol, reltol, saveat, maxiters, dtmin, adaptive,
                dt = nothing) -> (ys, retcodes, naccept, nreject, wend)

Solve one trajectory per column of `u0s` (`n x B`) with Python drift `f`/diffusion `g`
(`g === nothing`: ODE) through an `EnsembleProblem` run with `EnsembleSerial()`: Python
callbacks need the GIL, so threads would only serialize on it (and calling Python from a
non-main Julia thread needs PythonCall's GIL handling). Julia-source problems use threads
(`solve_native`).
"""
function solve_batch(
        f, fvjp, g, gvjp, u0s::AbstractMatrix, tspan, p; alg, interpretation = "ito",
        theta = nothing, autodiff = "finitediff", noise = "diagonal", noise_dim = nothing,
        seed = 0, on_trajectory = nothing, kwargs...
    )
    fj, gj = python_fields(f, fvjp, g, gvjp; noise)
    n, B = size(u0s)
    prob = build_problem(fj, gj, view(u0s, :, 1), tspan, _dense(p); noise, noise_dim)
    solver = algorithm(alg; interpretation, theta, autodiff)
    kw = _kwargs_dict(; kwargs...)
    eprob = EnsembleProblem(prob; prob_func = TrajectoryRemake(u0s, UInt64(seed), on_trajectory),
        safetycopy = false)
    sim = solve(eprob, solver, EnsembleSerial(); trajectories = B, kw...)
    return collect_results(sim.u, n, length(kw[:saveat]))
end
