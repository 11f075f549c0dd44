# Out-of-place wrappers of Python callables and their reverse rules.
#
# The Python side passes `fn(u, p, t) -> array` (state flattened to a vector, or an `n x m`
# matrix for general-noise diffusions) and `vjp(u, p, t, v) -> (ū, p̄)`. Julia arrays reach
# Python as `juliacall` array wrappers (no copy); Python's result arrives as `Py` and is
# converted with `pyconvert`, which copies it into a Julia array (the one copy per call).

"""
    PyField{S}(fn, vjp)

A Python vector field usable as an out-of-place SciML `f(u, p, t)`/`g(u, p, t)`. `S` is the
result type (`Vector{Float64}` or `Matrix{Float64}`). Zygote differentiates it through the
`ChainRulesCore.rrule` below, which calls `vjp` in Python; it never traces into Python.
"""
struct PyField{S, F, V}
    fn::F
    vjp::V
end

PyField{S}(fn::F, vjp::V) where {S, F, V} = PyField{S, F, V}(fn, vjp)

_to(::Type{S}, x::Py) where {S} = pyconvert(S, x)
_to(::Type{S}, x::AbstractArray) where {S} = convert(S, x)

_dense(u::AbstractArray) = collect(Float64, u)
_dense(::Nothing) = Float64[]

function (w::PyField{S})(u, p, t) where {S}
    return _to(S, w.fn(_dense(u), _dense(p), Float64(t)))
end

function ChainRulesCore.rrule(w::PyField{S}, u, p, t) where {S}
    ud, pd, td = _dense(u), _dense(p), Float64(t)
    y = _to(S, w.fn(ud, pd, td))
    function pyfield_pullback(ȳ)
        ȳ = unthunk(ȳ)
        ȳ isa AbstractZero && return NoTangent(), ZeroTangent(), ZeroTangent(), NoTangent()
        v = collect(Float64, ȳ)
        res = w.vjp(ud, pd, td, v)
        ū = reshape(_to(Vector{Float64}, res[0]), size(u))
        pbar = _to(Vector{Float64}, res[1])
        # a placeholder `p` (see `solve_batch_pullback`) is not a Python parameter: zero tangent
        p̄ = p === nothing ? NoTangent() :
            length(pbar) == length(p) ? reshape(pbar, size(p)) : zeros(Float64, size(p))
        return NoTangent(), ū, p̄, NoTangent()
    end
    return y, pyfield_pullback
end
