# Gradients across the boundary: the forward solve runs inside `Zygote.pullback`, which makes
# SciMLSensitivity's rrule for `solve` use the given `sensealg`; the pullbacks are kept in a
# `BatchPullback` that Python holds (opaquely) until its autograd backward calls
# `apply_pullback`. Parameters travel as ONE flat vector through `p`: SciMLSensitivity
# differentiates w.r.t. `u0` and `p` only (values captured in closures get zero gradients).

"""
    BatchPullback

Per-trajectory pullbacks of `(u0, p) -> Array(solve(...))` (each an `n x T` matrix), plus
the sizes needed to route the cotangent.
"""
struct BatchPullback{P}
    backs::Vector{P}
    n::Int
    T::Int
    np::Int
end

function _trajectory_solve(prob, solver, sense, kw, code::Base.RefValue{String})
    return function (u0, p)
        sol = solve(remake(prob; u0 = u0, p = p), solver; sensealg = sense, kw...)
        ChainRulesCore.ignore_derivatives() do
            code[] = _retcode(sol)
        end
        return Array(sol)
    end
end

"""
    solve_batch_pullback(f, fvjp, g, gvjp, u0s, tspan, p; sensealg_name, checkpointing = false,
                         noisemixing = false, <solve_batch keywords>)
        -> (ys, retcodes, naccept, nreject, wend, pullback)

Like `solve_batch`, but differentiable: every trajectory is solved under `Zygote.pullback`
with `sensealg(sensealg_name; checkpointing, noisemixing)`. Step counts are not available
through the AD path (zeros); retcodes are. A trajectory that stops early is reported through
its retcode, its missing save times are NaN and its gradient is meaningless.
"""
function solve_batch_pullback(
        f, fvjp, g, gvjp, u0s::AbstractMatrix, tspan, p; sensealg_name,
        checkpointing::Bool = false, noisemixing::Bool = false, alg, interpretation = "ito",
        theta = nothing, autodiff = "finitediff", noise = "diagonal", noise_dim = nothing,
        seed = 0, on_trajectory = nothing, kwargs...
    )
    fj, gj = python_fields(f, fvjp, g, gvjp; noise)
    n, B = size(u0s)
    np = length(_dense(p))
    # SciMLSensitivity needs parameters to differentiate: without any, a placeholder [0.0]
    pv = np == 0 ? [0.0] : _dense(p)
    prob = build_problem(fj, gj, view(u0s, :, 1), tspan, pv; noise, noise_dim)
    solver = algorithm(alg; interpretation, theta, autodiff)
    sense = sensealg(sensealg_name; checkpointing, noisemixing)
    kw = _kwargs_dict(; kwargs...)
    T = length(kw[:saveat])
    ys = fill(NaN, n, B, T)
    retcodes = fill("Success", B)
    backs = Any[]
    remaker = TrajectoryRemake(u0s, UInt64(seed), on_trajectory)
    for i in 1:B
        prob_i = _remake(remaker, prob, i)
        code = Ref("Default")
        out, back = Zygote.pullback(_trajectory_solve(prob_i, solver, sense, kw, code), prob_i.u0, pv)
        k = min(size(out, 2), T)
        ys[:, i, 1:k] .= out[:, 1:k]
        retcodes[i] = size(out, 2) == T ? code[] : (code[] == "Success" ? "Failure" : code[])
        push!(backs, back)
    end
    return ys, retcodes, zeros(Int, B), zeros(Int, B), zeros(Float64, 0, B), BatchPullback(backs, n, T, np)
end

"""
    apply_pullback(pb::BatchPullback, gys) -> (gu0s, gp)

`gys` is the cotangent of `ys` laid out like it (`n x B x T`); returns `gu0s` (`n x B`) and
`gp` (length `np`, summed over trajectories).
"""
function apply_pullback(pb::BatchPullback, gys::AbstractArray)
    B = length(pb.backs)
    gu0s = zeros(Float64, pb.n, B)
    gp = zeros(Float64, pb.np)
    for i in 1:B
        ḡ = collect(Float64, view(gys, :, i, :))
        du0, dp = pb.backs[i](ḡ)
        du0 === nothing || (gu0s[:, i] .= vec(du0))
        dp === nothing || pb.np == 0 || (gp .+= vec(dp))
    end
    return gu0s, gp
end
