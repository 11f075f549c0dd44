"""The model front ends on the peers' own problems and conventions.

* ``NeuralODE`` vs ``torchdiffeq.odeint`` on the same ``nn.Module`` (forward and reversed
  ``ts``, a single-argument ``nn.Sequential``, float32 modules), gradients by backprop on both
  sides, and the fixed-step solve's order against torchdiffeq's tight reference.
* ``NeuralSDE`` vs ``torchsde.sdeint`` with the same networks on the same Brownian path, for
  each torchsde ``noise_type`` (diagonal/scalar/general, Itô EM = torchsde ``euler``: equal to
  rounding, values and gradients) and ``sde_type="stratonovich"`` (our EulerHeun and torchsde's
  ``euler_heun`` are different schemes for the same Stratonovich solution: their gap is O(dt),
  far below the Itô/Stratonovich gap).
* ``LatentSDE`` with a context: torchsde's ``latent_sde_lorenz`` example (the posterior at
  ``t`` sees the context of ``bisect_right(ts, t)``) through ``sdeint(..., logqp=True)`` on the
  same path: latents, per-interval KL and gradients.
* ``diffeqbridge.jax`` vs ``diffrax.diffeqsolve``: Tsit5 adaptive and fixed-step (values and
  ``jax.grad``), Euler–Maruyama on the same Brownian path (diffrax's control is our tree's
  ``W`` on the step grid), float32 states under x64, argument errors before the solve.
"""

from __future__ import annotations

import bisect

import pytest
import torch
from problems import fitted_order, torchsde_brownian
from torch import nn

import diffeqbridge as deb

F64 = torch.float64


class Field(nn.Module):
    """``f(t, y) = cos(t) W2 tanh(W1 y + b1) + b2`` with ``t`` a scalar (torchdiffeq) or ``(B,)`` (ours)."""

    def __init__(self, dim: int = 3, hidden: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, t, y):
        t = t.reshape(-1, 1) if t.ndim else t
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t)


# ------------------------------------------------------------------ NeuralODE vs torchdiffeq
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
def test_neural_ode_matches_torchdiffeq_values_and_gradients(reverse):
    """Tight tolerances on both sides (1e-12): outputs to 1e-9; the backprop gradients of the
    same loss w.r.t. the module's parameters and y0 to 1e-7 relative."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = Field().double()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_()
    ts = torch.linspace(0.0, 2.0, 5, dtype=F64)
    ts = ts.flip(0) if reverse else ts
    weights = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ours = deb.NeuralODE(field, alg=deb.Dopri5(), rtol=1e-12, atol=1e-12)(y0, ts)
    peer = torchdiffeq.odeint(field, y0, ts, method="dopri5", rtol=1e-12, atol=1e-12)
    assert ours.shape == peer.shape == (5, 4, 3)
    assert float((ours - peer).detach().abs().max()) < 1e-9
    params = [*field.parameters(), y0]
    got = torch.autograd.grad((ours * weights).sum(), params)
    ref = torch.autograd.grad((peer * weights).sum(), params)
    for g, r in zip(got, ref):
        assert float((g - r).detach().abs().max()) < 1e-7 * float(r.abs().max()) + 1e-10


def test_neural_ode_single_argument_module_and_float32():
    """``nn.Sequential`` (``forward(y)``) is called without ``t``; a float32 module solves in
    float32 and agrees with torchdiffeq at float32 tolerances; mixed dtypes are a TypeError."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(3)
    seq = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    y0 = torch.randn(4, 3, dtype=F64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ours = deb.NeuralODE(seq, alg=deb.Tsit5(), rtol=1e-11, atol=1e-11)(y0, ts)
    peer = torchdiffeq.odeint(lambda t, y: seq(y), y0, ts, rtol=1e-11, atol=1e-11)
    assert float((ours - peer).detach().abs().max()) < 1e-8
    field32 = Field(seed=4)
    y32 = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    ts32 = torch.linspace(0.0, 1.0, 3)
    ours32 = deb.NeuralODE(field32, alg=deb.Tsit5(), rtol=1e-6, atol=1e-7)(y32, ts32)
    peer32 = torchdiffeq.odeint(field32, y32, ts32, rtol=1e-6, atol=1e-7)
    assert ours32.dtype == torch.float32
    assert float((ours32 - peer32).detach().abs().max()) < 2e-5
    with pytest.raises(TypeError, match="dtype"):
        deb.NeuralODE(field32)(y0, ts)


class Decay(nn.Module):
    """``y' = a y`` (a trainable scalar ``a``): ``y(t) = exp(a (t - t0)) y0``."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, t, y):
        return self.a * y


def test_neural_ode_time_gradients_as_torchdiffeq():
    """``ts`` that requires grad gets gradients as torchdiffeq's ``odeint`` gives its ``t``
    (NeuralODE detached it: ``ts.grad`` stayed None).  Closed form for ``L = sum y(t_k)``:
    ``dL/dt_k = a y(t_k)`` for k >= 1 and ``dL/dt_0 = -a sum_{k>=1} y(t_k)``; torchdiffeq agrees."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    a, y0 = -0.7, torch.tensor([[1.0], [2.0]], dtype=F64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    model = Decay(a)
    deb.NeuralODE(model, alg=deb.Tsit5(), rtol=1e-11, atol=1e-11)(y0, ts).sum().backward()
    exact_y = torch.exp(a * ts.detach()) * y0.sum()
    exact = a * exact_y
    exact[0] = -a * exact_y[1:].sum()  # y(t_0) = y0 does not move with t_0
    assert ts.grad is not None and float((ts.grad - exact).abs().max()) < 1e-8
    peer_ts = ts.detach().clone().requires_grad_()
    torchdiffeq.odeint(model, y0, peer_ts, rtol=1e-11, atol=1e-11).sum().backward()
    assert float((ts.grad - peer_ts.grad).abs().max()) < 1e-8


def test_neural_ode_fixed_step_order_against_torchdiffeq_reference():
    """Fixed-step Tsit5/Dopri5 (``adaptive=False``) converge to torchdiffeq's tight dopri5
    solution at their order 5 (fitted from dt = 1/2 .. 1/8; at least 4.5)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = Field(seed=6).double()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    with torch.no_grad():
        ref = torchdiffeq.odeint(field, y0, ts, method="dopri5", rtol=1e-13, atol=1e-13)
        for alg in (deb.Tsit5(), deb.Dopri5()):
            dts = [2.0**-k for k in (1, 2, 3)]
            errors = [
                float((deb.NeuralODE(field, alg=alg, dt=dt, adaptive=False)(y0, ts) - ref).detach().abs().max()) for dt in dts
            ]
            assert fitted_order(dts, errors) > 4.5, (type(alg).__name__, errors)


# ------------------------------------------------------------------ NeuralSDE vs torchsde
class Drift(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) - 0.5 * y


class Diffusion(nn.Module):
    """``sigmoid(W y + b)`` reshaped to ``shape`` (``(D,)``: diagonal/scalar, ``(D, m)``: general)."""

    def __init__(self, dim: int, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape
        self.lin = nn.Linear(dim, int(torch.tensor(shape).prod()))

    def forward(self, t, y):
        return torch.sigmoid(self.lin(y)).reshape(y.shape[0], *self.shape)


def _torchsde_module(drift: nn.Module, diffusion, noise_type: str, sde_type: str) -> nn.Module:
    """The same networks as a torchsde SDE (``f``, ``g``, ``noise_type``, ``sde_type``)."""

    class SDE(nn.Module):
        def __init__(self):
            super().__init__()
            self.noise_type, self.sde_type = noise_type, sde_type

        def f(self, t, y):
            return drift(t, y)

        def g(self, t, y):
            return diffusion(t, y)

    return SDE()


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "general"])
def test_neural_sde_matches_torchsde_euler_on_the_same_path(noise):
    """Itô Euler–Maruyama with torchsde's ``noise_type`` conventions (scalar: ``g`` is
    ``(B, D, 1)`` there, ``(B, D)`` here; general: ``(B, D, m)`` both): values to 1e-13 and
    backprop gradients to 1e-11 relative."""
    torchsde = pytest.importorskip("torchsde")
    B, D, m, dt = 3, 2, 3, 2**-6
    torch.manual_seed(8)
    drift = Drift(D).double()
    diffusion = Diffusion(D, (D, m) if noise == "general" else (D,)).double()
    noise_dim = {"diagonal": D, "scalar": 1, "general": m}[noise]
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, noise_dim), seed=9, tol=2**-12)
    z0 = torch.randn(B, D, generator=torch.Generator().manual_seed(10), dtype=F64).requires_grad_()
    ts = [0.0, 0.5, 1.0]
    model = deb.NeuralSDE(drift, diffusion, noise=noise, noise_dim=m if noise == "general" else None, alg=deb.EM(), dt=dt)
    ours = model(z0, ts, brownian=tree)
    g = (lambda t, y: diffusion(t, y).unsqueeze(-1)) if noise == "scalar" else diffusion
    sde = _torchsde_module(drift, g, noise, "ito")
    peer = torchsde.sdeint(sde, z0, torch.tensor(ts, dtype=F64), bm=torchsde_brownian(tree), dt=dt, method="euler")
    assert float((ours - peer).detach().abs().max()) < 1e-13
    params = [*model.parameters(), z0]
    got = torch.autograd.grad((ours**2).sum(), params)
    ref = torch.autograd.grad((peer**2).sum(), params)
    for a, b in zip(got, ref):
        assert float((a - b).detach().abs().max()) < 1e-11 * float(b.abs().max()) + 1e-14


def test_neural_sde_stratonovich_matches_torchsde_euler_heun_to_order_one():
    """``interpretation="stratonovich"`` (EulerHeun) vs torchsde ``sde_type="stratonovich"``
    (``euler_heun``) on the same path: both converge strongly at order 1 (diagonal noise is
    commutative), so their gap is O(dt) (fitted order >= 0.8, and < 1e-3 at dt = 2^-10),
    while the Itô solution of the same networks is O(1) away (> 20x the gap)."""
    torchsde = pytest.importorskip("torchsde")
    B, D = 8, 2
    torch.manual_seed(11)
    drift, diffusion = Drift(D).double(), Diffusion(D, (D,)).double()
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, D), seed=12, tol=2**-14)
    z0 = torch.randn(B, D, generator=torch.Generator().manual_seed(13), dtype=F64)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    sde = _torchsde_module(drift, diffusion, "diagonal", "stratonovich")
    dts, gaps = [2.0**-k for k in (6, 8, 10)], []
    with torch.no_grad():
        for dt in dts:
            ours = deb.NeuralSDE(drift, diffusion, interpretation="stratonovich", alg=deb.EulerHeun(), dt=dt)(
                z0, ts, brownian=tree
            )
            peer = torchsde.sdeint(sde, z0, ts, bm=torchsde_brownian(tree), dt=dt, method="euler_heun")
            gaps.append(float((ours - peer)[-1].abs().max()))
        ito = deb.NeuralSDE(drift, diffusion, alg=deb.EM(), dt=dts[-1])(z0, ts, brownian=tree)
    assert fitted_order(dts, gaps) > 0.8, gaps
    assert gaps[-1] < 1e-3
    assert float((ito - ours)[-1].abs().max()) > 20 * gaps[-1]


# ------------------------------------------------------------------ LatentSDE: torchsde's latent_sde_lorenz
class ContextDrift(nn.Module):
    """Posterior drift ``h(t, z, ctx) = tanh(W [z, ctx])`` (the example's ``f_net`` on ``cat(y, ctx)``)."""

    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.lin = nn.Linear(dim + ctx_dim, dim)

    def forward(self, t, z, ctx):
        return torch.tanh(self.lin(torch.cat([z, ctx], dim=1)))


def test_latent_sde_context_matches_torchsde_lorenz_example():
    """The example's posterior drift at scalar ``t`` uses ``ctx[min(bisect_right(ts, t), T - 1)]``;
    ours, driven through ``context=``, must give the same latents (1e-13), the same per-interval
    ``logqp`` (1e-13) and the same gradients w.r.t. the networks, z0 and the context (1e-10)."""
    torchsde = pytest.importorskip("torchsde")
    B, D, C, dt = 3, 2, 4, 2**-5
    torch.manual_seed(14)
    post, prior, diffusion = ContextDrift(D, C).double(), Drift(D).double(), Diffusion(D, (D,)).double()
    ts = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    context = torch.randn(4, B, C, generator=torch.Generator().manual_seed(15), dtype=F64).requires_grad_()
    z0 = torch.randn(B, D, generator=torch.Generator().manual_seed(16), dtype=F64).requires_grad_()
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, D + 1), seed=17, tol=2**-12)
    model = deb.LatentSDE(post, prior, diffusion, alg=deb.EM(), dt=dt)
    zs, kl = model(z0, ts, context=context, brownian=tree)

    class Lorenz(nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            i = min(bisect.bisect(ts.tolist(), float(t)), len(ts) - 1)
            return post(t, y, context[i])

        def h(self, t, y):
            return prior(t, y)

        def g(self, t, y):
            return diffusion(t, y)

    peer, logqp = torchsde.sdeint(Lorenz(), z0, ts, bm=torchsde_brownian(tree), dt=dt, method="euler", logqp=True)
    assert float((zs - peer).detach().abs().max()) < 1e-13
    assert float((model.kl_path.diff(dim=0) - logqp).detach().abs().max()) < 1e-13
    assert float(kl.detach().min()) > 0
    params = [*post.parameters(), *prior.parameters(), *diffusion.parameters(), z0, context]
    got = torch.autograd.grad((zs**2).sum() + kl.sum(), params)
    ref = torch.autograd.grad((peer**2).sum() + logqp.sum(), params)
    for a, b in zip(got, ref):
        assert float((a - b).detach().abs().max()) < 1e-10 * float(b.abs().max()) + 1e-14


@pytest.mark.parametrize(
    "interpretation, alg, method, options",
    [
        ("stratonovich", deb.EulerHeun(), "heun", None),
        ("ito", deb.RKMil(), "milstein", {"grad_free": True}),
    ],
    ids=["stratonovich-heun", "ito-milstein"],
)
def test_latent_sde_logqp_and_prior_match_torchsde_schemes(interpretation, alg, method, options):
    """Beyond Itô ``euler`` (tests/test_latent_sde.py): our EulerHeun is torchsde's Stratonovich
    ``heun`` and our RKMil its derivative-free Itô ``milstein`` (``grad_free=True``), so the
    augmented ``logqp`` solve and ``forward_prior`` (the prior SDE ``f = h``) agree to 1e-13
    on the same path."""
    torchsde = pytest.importorskip("torchsde")
    B, D, dt = 3, 2, 2**-5
    torch.manual_seed(18)
    post, prior, diffusion = Drift(D).double(), Drift(D).double(), Diffusion(D, (D,)).double()
    z0 = torch.randn(B, D, generator=torch.Generator().manual_seed(19), dtype=F64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    model = deb.LatentSDE(post, prior, diffusion, interpretation=interpretation, alg=alg, dt=dt)
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, D + 1), seed=20, tol=2**-12)
    with torch.no_grad():
        zs, _ = model(z0, ts, brownian=tree)
        sde = _torchsde_module(post, diffusion, "diagonal", interpretation)
        sde.h = prior
        peer, logqp = torchsde.sdeint(sde, z0, ts, bm=torchsde_brownian(tree), dt=dt, method=method, logqp=True, options=options)
        assert float((zs - peer).abs().max()) < 1e-13
        assert float((model.kl_path.diff(dim=0) - logqp).abs().max()) < 1e-13
        assert float(logqp.min()) > 0
        narrow = deb.VirtualBrownianTree(0.0, 1.0, (B, D), seed=20, tol=2**-12)
        prior_ours = model.forward_prior(z0, ts, brownian=narrow)
        prior_sde = _torchsde_module(prior, diffusion, "diagonal", interpretation)
        prior_peer = torchsde.sdeint(prior_sde, z0, ts, bm=torchsde_brownian(narrow), dt=dt, method=method, options=options)
        assert float((prior_ours - prior_peer).abs().max()) < 1e-13


# ------------------------------------------------------------------ diffeqbridge.jax vs diffrax
@pytest.fixture
def jx():
    """``(jax, jnp, diffrax, jsolve)`` with x64 enabled (as tests/test_jax.py)."""
    jax = pytest.importorskip("jax")
    diffrax = pytest.importorskip("diffrax")
    jax.config.update("jax_enable_x64", True)
    import jax.flatten_util  # noqa: F401

    from diffeqbridge.jax import solve as jsolve

    return jax, jax.numpy, diffrax, jsolve


def _ode_field(jnp):
    return lambda t, y, p: p["a"] * jnp.sin(y) - p["b"] * y * jnp.cos(t)[:, None]


def test_jax_ode_matches_diffrax_tsit5(jx):
    """``y' = a sin y - b y cos t`` on ``(B, 1)`` (diffrax solves the whole batch as one state
    with a scalar ``t``): adaptive Tsit5 at 1e-12 agrees to 1e-10; fixed-step Tsit5
    (``ConstantStepSize``, dt = 1/8: the same tableau and steps) to 1e-14, and ``jax.grad`` of a
    loss w.r.t. the parameter pytree and y0 to central differences of diffrax's solve (1e-8)."""
    jax, jnp, diffrax, jsolve = jx
    B = 3
    f = _ode_field(jnp)
    y0 = jnp.linspace(0.5, 1.5, B).reshape(B, 1)
    p = {"a": jnp.float64(0.7), "b": jnp.float64(0.3)}
    ts = [0.0, 0.5, 1.25, 2.0]

    def ours(y0, p, **kw):
        return jsolve(f, None, y0, (0.0, 2.0), saveat=ts, params=p, alg="Tsit5", **kw)

    def peer(y0, p, controller, dt0):
        term = diffrax.ODETerm(lambda t, y, p: f(jnp.full((B,), t), y, p))
        saveat = diffrax.SaveAt(ts=jnp.asarray(ts))
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, 2.0, dt0, y0, args=p, saveat=saveat, stepsize_controller=controller, max_steps=10**5
        )
        return sol.ys

    adaptive = diffrax.PIDController(rtol=1e-12, atol=1e-12)
    assert float(jnp.abs(ours(y0, p, rtol=1e-12, atol=1e-12) - peer(y0, p, adaptive, 0.01)).max()) < 1e-10
    fixed = diffrax.ConstantStepSize()
    assert float(jnp.abs(ours(y0, p, dt=0.125, adaptive=False) - peer(y0, p, fixed, 0.125)).max()) < 1e-14
    weights = jnp.linspace(-1.0, 1.0, 4 * B).reshape(4, B, 1)
    # jax.grad through diffrax compiles for ~10 s here: central differences of its jitted
    # forward instead (step 1e-5: truncation ~1e-10, rounding ~1e-11 relative)
    flat, unravel = jax.flatten_util.ravel_pytree((y0, p))
    got = jax.flatten_util.ravel_pytree(
        jax.grad(lambda y, p: (weights * ours(y, p, dt=0.125, adaptive=False) ** 2).sum(), argnums=(0, 1))(y0, p)
    )[0]
    fwd = jax.jit(lambda v: (weights * peer(*unravel(v), fixed, 0.125) ** 2).sum())
    basis = 1e-5 * jnp.eye(flat.size)
    fd = jnp.array([(fwd(flat + e) - fwd(flat - e)) / 2e-5 for e in basis])
    assert float(jnp.abs(got - fd).max()) < 1e-8 * float(jnp.abs(fd).max())


def test_jax_sde_matches_diffrax_euler_on_the_same_path(jx):
    """Itô ``dy = (mu - y) dt + sigma cos(y) dW`` (diagonal) with Euler–Maruyama: diffrax's
    ``Euler`` on ``ODETerm + ControlTerm`` whose control is our tree's ``W`` linearly
    interpolated on the step grid (so each step's increment is the tree's), vs our JAX solve
    on that tree: values to 1e-13; ``jax.grad`` w.r.t. (mu, sigma) vs central differences of
    diffrax's solve to 1e-7 relative."""
    jax, jnp, diffrax, jsolve = jx
    lineax = pytest.importorskip("lineax")
    B, n = 4, 32
    dt = 1.0 / n
    tree = deb.VirtualBrownianTree(0.0, 1.0, (B, 1), seed=18, tol=2**-10)
    grid = torch.linspace(0.0, 1.0, n + 1, dtype=F64)
    w = jnp.asarray(torch.stack([tree.W(float(t)) for t in grid])[:, :, 0].numpy())  # (n + 1, B)
    control = diffrax.LinearInterpolation(ts=jnp.asarray(grid.numpy()), ys=w)
    drift = lambda t, y, p: p[0] - y  # noqa: E731
    diffusion = lambda t, y, p: p[1] * jnp.cos(y)  # noqa: E731
    y0 = jnp.linspace(-1.0, 1.0, B).reshape(B, 1)
    p = jnp.array([0.5, 0.8])
    save = [0.0, 0.5, 1.0]

    def ours(y0, p):
        return jsolve(drift, diffusion, y0, (0.0, 1.0), saveat=save, params=p, alg="EM", dt=dt, brownian=tree)

    def peer(y0, p):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, p: drift(t, y, p)),
            diffrax.ControlTerm(lambda t, y, p: lineax.DiagonalLinearOperator(diffusion(t, y, p)), control),
        )
        sol = diffrax.diffeqsolve(
            terms, diffrax.Euler(), 0.0, 1.0, dt, y0[:, 0], args=p, saveat=diffrax.SaveAt(ts=jnp.asarray(save))
        )
        return sol.ys[..., None]

    assert float(jnp.abs(ours(y0, p) - peer(y0, p)).max()) < 1e-13
    # gradients: by a central difference of diffrax's (compiled once) forward in sigma
    # (jax.grad through diffrax's SDE solve costs ~10 s of compilation here)
    got = jax.grad(lambda p: (ours(y0, p)[1:] ** 2).sum())(p)
    fwd = jax.jit(lambda p: (peer(y0, p)[1:] ** 2).sum())
    for i in range(2):
        step = jnp.zeros(2).at[i].set(1e-6)
        fd = (fwd(p + step) - fwd(p - step)) / 2e-6
        assert abs(float(got[i]) - float(fd)) < 1e-7 * abs(float(fd)) + 1e-9


def test_jax_float32_state_under_x64_and_argument_errors(jx):
    """A float32 y0 (x64 on, float64 parameters) solves in float32 and matches the float64
    solve to float32 accuracy, with float64 parameter gradients; bad arguments are
    ValueError/TypeError naming the argument, raised before the solve (not a
    ``JaxRuntimeError`` from inside the host callback), also under ``jax.jit``."""
    jax, jnp, _, jsolve = jx
    f = _ode_field(jnp)
    p = {"a": jnp.float64(0.7), "b": jnp.float64(0.3)}
    y64 = jnp.linspace(0.5, 1.5, 3).reshape(3, 1)

    def run(y0, p, **kw):
        return jsolve(f, None, y0, (0.0, 2.0), saveat=[0.0, 2.0], params=p, alg="Tsit5", rtol=1e-6, atol=1e-7, **kw)

    y32 = run(y64.astype(jnp.float32), p)
    assert y32.dtype == jnp.float32
    assert float(jnp.abs(y32 - run(y64, p)).max()) < 1e-5
    g32 = jax.grad(lambda p: run(y64.astype(jnp.float32), p)[-1].sum())(p)
    g64 = jax.grad(lambda p: run(y64, p)[-1].sum())(p)
    assert g32["a"].dtype == jnp.float64
    assert abs(float(g32["a"]) - float(g64["a"])) < 1e-4 * abs(float(g64["a"]))
    with pytest.raises(ValueError, match="saveat"):
        jsolve(f, None, y64, (0.0, 1.0), saveat=[0.0, 2.0], params=p, alg="Tsit5")
    with pytest.raises(ValueError, match="y0"):
        jsolve(f, None, y64[:, 0], (0.0, 1.0), params=p, alg="Tsit5")
    with pytest.raises(ValueError, match="drift"):
        jax.jit(lambda y: jsolve(lambda t, y, p: y[:, :0], None, y, (0.0, 1.0), alg="Tsit5"))(y64)
    with pytest.raises(ValueError, match="diffusion"):
        jsolve(f, lambda t, y, p: y[:, None], y64, (0.0, 1.0), params=p, alg="EM", dt=0.1)
    with pytest.raises(ValueError, match="noise_dim"):
        jsolve(f, f, y64, (0.0, 1.0), params=p, noise="general", alg="EM", dt=0.1)
    with pytest.raises(TypeError, match="drift"):
        jsolve(None, None, y64, (0.0, 1.0), alg="Tsit5")
    with pytest.raises(ValueError, match="alg"):
        jsolve(f, None, y64, (0.0, 1.0), params=p, alg="NoSuchSolver")


def test_jax_backsolve_ito_is_refused_not_wrong(jx):
    """``BacksolveAdjoint`` on an Itô diagonal problem with a JAX diffusion returned -0.54 where
    the torch problem's backsolve gives -0.247 (the Itô→Stratonovich correction's derivative
    was dropped): now a ValueError naming the remedies.  Additive problems keep it and equal the torch
    backsolve gradient to 1e-12 relative (Stratonovich ones: tests/test_jax.py)."""
    jax, jnp, _, jsolve = jx
    y0 = jnp.ones((2, 1))

    def jax_grad(noise, interpretation, alg):
        g = (lambda t, y, p: p * jnp.ones_like(y)) if noise == "additive" else (lambda t, y, p: p * jnp.cos(y))
        run = lambda p: jsolve(  # noqa: E731
            lambda t, y, p: -y,
            g,
            y0,
            (0.0, 1.0),
            params=p,
            noise=noise,
            interpretation=interpretation,
            alg=alg,
            dt=0.05,
            sensealg=deb.BacksolveAdjoint(),
        )[-1].sum()
        return float(jax.grad(run)(jnp.float64(0.5)))

    def torch_grad(noise, interpretation, alg):
        p = torch.tensor(0.5, dtype=F64, requires_grad=True)
        g = (lambda t, y: p * torch.ones_like(y)) if noise == "additive" else (lambda t, y: p * torch.cos(y))
        prob = deb.SDEProblem(
            lambda t, y: -y, g, torch.ones(2, 1, dtype=F64), (0.0, 1.0), noise=noise, interpretation=interpretation, params=[p]
        )
        ys = deb.solve(prob, getattr(deb, alg)(), dt=0.05, sensealg=deb.BacksolveAdjoint()).ys
        return float(torch.autograd.grad(ys[-1].sum(), p)[0])

    for noise in ("diagonal", "scalar"):
        with pytest.raises(ValueError, match="BacksolveAdjoint"):
            jax_grad(noise, "ito", "EM")
    want = torch_grad("additive", "ito", "EM")  # (Stratonovich: tests/test_jax.py)
    assert abs(jax_grad("additive", "ito", "EM") - want) < 1e-12 * abs(want)
