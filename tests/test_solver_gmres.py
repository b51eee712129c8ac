"""Restarted GMRES (``gmres``), the solver for the affine backward system: dense-solve accuracy,
the Krylov property, per-sample stopping and outcomes, honest residuals (also at the precision
floor), loops a CUDA graph could capture, and the implicit gradient of a layer."""
import pytest
import torch
from torch import nn

from deq_core import DEQLayer, get_solver
from deq_core.solvers import list_solvers, solver_options, solves_affine_only, validate_solver_options
from deq_core.testing import contraction
from tests.test_graph_capture import audit  # noqa: F401 (the fixture auditing a solver loop)

pytestmark = pytest.mark.usefixtures("one_thread")

RADII = (0.5, 0.8, 0.9, 0.95)


def _non_normal(dim, radius, g):
    """``Q T Q^T`` with T upper triangular: eigenvalues in [-radius, radius] (radius among them)
    and an off-diagonal part of norm about 1, so strongly non-normal: ``||J|| ~ 1.6`` though the
    spectral radius is below 1 (condition of I - J 10 to 400 at D = 16 to 32)."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = radius * (2 * torch.rand(dim, generator=g, dtype=torch.float64) - 1)
    eig[0] = radius
    t = torch.diag(eig) + torch.triu(torch.randn(dim, dim, generator=g, dtype=torch.float64), 1) / dim ** 0.5
    return q @ t @ q.T


def _affine(dim=32, radii=RADII, non_normal=False, seed=0, dtype=torch.float64):
    """Per sample b, ``F(u) = u J_b + c_b``, J_b a random Gaussian matrix (or :func:`_non_normal`)
    scaled to a spectral radius from ``radii``; returns F, its (B, D) zero start and the exact
    solution of ``u (I - J_b) = c_b`` from a dense float64 solve."""
    g = torch.Generator().manual_seed(seed)
    if non_normal:
        jac = torch.stack([_non_normal(dim, r, g) for r in radii])
    else:
        jac = torch.stack([contraction(dim, r, seed=seed + i) for i, r in enumerate(radii)])
    c = torch.randn(len(radii), dim, generator=g, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    exact = torch.linalg.solve((eye - jac).transpose(1, 2), c.unsqueeze(2)).squeeze(2)
    jac_d, c_d = jac.to(dtype), c.to(dtype)

    def f(u):
        return torch.bmm(u.unsqueeze(1), jac_d).squeeze(1) + c_d

    return f, torch.zeros_like(c_d), exact


def _rel_err(z, exact):
    return (z.double() - exact).norm(dim=1) / exact.norm(dim=1)


def _true_residuals(f, res):
    fz = f(res.z)
    return (fz - res.z).norm(dim=1), fz


@pytest.mark.parametrize("non_normal", [False, True])
def test_float64_matches_the_dense_solve_within_d_plus_1_evaluations(non_normal):
    dim = 32
    f, z0, exact = _affine(dim, non_normal=non_normal)
    res = get_solver("gmres")(f, z0, max_iter=200, tol=1e-11, restart=dim)
    assert bool(res.converged.all()) and not bool(res.diverged.any() or res.stalled.any())
    assert float(_rel_err(res.z, exact).max()) < 1e-10  # measured: below 1e-12
    # The Krylov property: the exact solution lies in a Krylov space of dimension <= D, reached
    # by one evaluation for the residual and one per Arnoldi step, without a restart (the
    # residual there is rounding, ~3e-13).
    assert int(res.steps.max()) <= dim + 1
    true, _ = _true_residuals(f, res)
    assert float(true.max()) <= 2e-11  # within the tolerance, up to f's rounding (~1e-15)


def test_a_small_restart_still_converges_with_more_evaluations():
    dim = 32
    f, z0, exact = _affine(dim, non_normal=True)
    full = get_solver("gmres")(f, z0, max_iter=400, tol=1e-12, restart=dim)
    short = get_solver("gmres")(f, z0, max_iter=400, tol=1e-12, restart=10)
    assert bool(short.converged.all())
    assert float(_rel_err(short.z, exact).max()) < 1e-10
    assert bool((short.steps >= full.steps).all()) and int(short.steps.sum()) > int(full.steps.sum())
    # Cycles of 1 + 10 evaluations: the restarts re-evaluate the true residual.
    assert int(short.steps.max()) > 11


@pytest.mark.parametrize("non_normal", [False, True])
def test_float32_reaches_the_precision_of_its_state(non_normal):
    f, z0, exact = _affine(32, non_normal=non_normal, dtype=torch.float32)
    res = get_solver("gmres")(f, z0, max_iter=100, tol=1e-6, stop_mode="rel", restart=32)
    assert bool(res.converged.all()) and res.z.dtype == torch.float32
    assert float(_rel_err(res.z, exact).max()) < 2e-5  # measured: 4e-7 to 2.3e-6 (condition up to 200)


def test_per_sample_stopping_and_result_fields():
    dim = 20
    jac = torch.stack([contraction(dim, 0.1, seed=1), contraction(dim, 0.95, seed=2)])  # easy, hard
    c = torch.randn(2, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calls = []

    def f(u):
        calls.append(u.clone())
        return torch.bmm(u.unsqueeze(1), jac).squeeze(1) + c

    res = get_solver("gmres")(f, torch.zeros(2, dim, dtype=torch.float64), max_iter=100, tol=1e-10, restart=8,
                              trace=True)
    easy, hard = res.steps.tolist()
    assert easy < hard and res.converged.tolist() == [True, True]
    assert not bool(res.diverged.any() or res.stalled.any())
    assert res.steps.dtype == torch.int32 and res.converged.dtype == torch.bool
    assert res.abs_res.dtype == torch.float64 and res.z.shape == res.fz.shape == (2, dim)
    assert res.trace.shape == (len(calls), 2) == (hard, 2) and res.host_reads > 0
    # After the easy sample stopped, f only ever saw its returned iterate for it.
    seen = torch.stack([u[0] for u in calls[easy:]])
    assert torch.equal(seen, res.z[:1].expand_as(seen))
    # The reported residuals are those of f at the returned iterates.
    true, fz = _true_residuals(f, res)
    assert torch.allclose(res.abs_res, true, rtol=1e-3, atol=1e-14)
    assert torch.allclose(res.rel_res, true / fz.norm(dim=1), rtol=1e-3, atol=1e-14)
    assert float((res.fz - fz).norm(dim=1).max()) <= 1e-13
    assert float(res.abs_res.max()) <= 1e-10


def test_too_few_evaluations_are_reported_as_not_converged():
    f, z0, exact = _affine(32, non_normal=True)
    res = get_solver("gmres")(f, z0, max_iter=6, tol=1e-10)
    assert not bool(res.converged.any() or res.stalled.any() or res.diverged.any())  # ran out, still progressing
    assert res.steps.tolist() == [6] * 4
    true, _ = _true_residuals(f, res)
    assert bool((true > 1e-6).all()) and torch.allclose(res.abs_res, true, rtol=1e-6)


@pytest.mark.parametrize("restart", [8, 40])
def test_an_inconsistent_singular_system_is_never_reported_converged(restart):
    # J = Q diag(1, ...) Q^T: I - J is singular and c has a part along q_0 that no u reaches,
    # so every residual is at least |c . q_0|; the recurrence must not claim less.
    dim = 24
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = 0.9 * (2 * torch.rand(2, dim, generator=g, dtype=torch.float64) - 1)
    eig[:, 0] = 1.0
    jac = q @ torch.diag_embed(eig) @ q.T
    c = torch.randn(2, dim, generator=g, dtype=torch.float64)
    floor = (c @ q[:, 0]).abs()

    def f(u):
        return torch.bmm(u.unsqueeze(1), jac).squeeze(1) + c

    res = get_solver("gmres")(f, torch.zeros_like(c), max_iter=120, tol=1e-8, restart=restart)
    assert not bool(res.converged.any())
    # In floating point I - J is only nearly singular, with a solution of norm ~1e16 that GMRES
    # without restarts heads for (here with restart=40), as a direct solve would: there f(z) - z
    # is rounding (~1e-16 ||f(z)||), and the sample is reported stalled at the precision's floor.
    true, _ = _true_residuals(f, res)
    resolved = ~res.stalled
    assert bool((res.abs_res >= 0.999 * floor)[resolved].all()) and bool((true >= 0.999 * floor)[resolved].all())


def test_a_non_finite_sample_stops_without_touching_the_others():
    f_ok, z0, exact = _affine(16, radii=(0.8, 0.8))

    def f(u):
        out = f_ok(u)
        out[1] = out[1] / 0.0  # inf/NaN for sample 1 only
        return out

    res = get_solver("gmres")(f, z0, max_iter=50, tol=1e-10)
    assert res.converged.tolist() == [True, False] and res.diverged.tolist() == [False, True]
    assert float(_rel_err(res.z[:1], exact[:1]).max()) < 1e-9


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_a_reduced_precision_map_is_not_reported_below_its_floor(precision):
    # f's product in float16/bfloat16 on float32 states: f(u) - u cannot be resolved below about
    # u_f ||f(u)||, while the Arnoldi recurrence alone keeps falling (it claimed 1e-10).
    g = torch.Generator().manual_seed(0)
    dim = 48
    jac = torch.stack([contraction(dim, r, dtype=torch.float32, seed=i) for i, r in enumerate(RADII)])
    c = torch.randn(4, dim, generator=g)

    def f(u):
        return torch.bmm(u.to(precision).unsqueeze(1), jac.to(precision)).squeeze(1).float() + c

    res = get_solver("gmres")(f, torch.zeros(4, dim), max_iter=80, tol=1e-9, precision=precision, restart=16)
    true, fz = _true_residuals(f, res)
    assert not bool(res.converged.any())
    assert bool(res.stalled.all())  # at the floor, as the other solvers end there
    # Measured: f's residual is 0.75x to 1.6x the reported one.
    assert bool((true <= 8 * res.abs_res).all()) and bool((res.abs_res <= 8 * true).all())


def test_check_every_0_runs_to_max_iter_without_host_reads():
    f, z0, _ = _affine(24, non_normal=True)
    every = get_solver("gmres")(f, z0, max_iter=60, tol=1e-10, check_every=1, restart=10)
    never = get_solver("gmres")(f, z0, max_iter=60, tol=1e-10, check_every=0, restart=10, trace=True)
    assert never.host_reads == 0 and every.host_reads > 0 and never.trace.shape[0] == 60
    assert int(every.steps.min()) < 60  # a sample stopped early, and without reads it stopped too
    for key in ("z", "fz", "abs_res", "rel_res", "steps", "converged", "diverged", "stalled"):
        assert torch.equal(getattr(never, key), getattr(every, key)), key


def _audited_problem(seed, dim=24):
    a = contraction(dim, 0.9, dtype=torch.float32, seed=seed)
    b = torch.randn(4, dim, generator=torch.Generator().manual_seed(seed))
    b[0] *= 1e-6  # starts near its solution 0: converges (and freezes) first
    return (lambda z: z @ a.T + b), torch.zeros(4, dim)


def test_the_loop_allocates_nothing_reads_nothing_and_does_not_depend_on_the_data(audit):  # noqa: F811
    f, z0 = _audited_problem(0)
    with torch.no_grad(), audit:
        res = get_solver("gmres")(audit.outside(f), z0, max_iter=25, tol=1e-5, check_every=0, restart=8)
    assert len(audit.calls) == 25  # every evaluation, restarts included
    assert audit.allocations == [] and audit.host_reads == [], (audit.allocations, audit.host_reads)
    assert bool(res.converged[0]) and int(res.steps[0]) < 25
    first, audit.calls = audit.calls, []
    # Another problem on which a sample is non-finite at once: the same calls and shapes.
    f, z0 = _audited_problem(1)
    nan = torch.tensor([float("nan"), 0.0, 0.0, 0.0])[:, None]
    with torch.no_grad(), audit:
        res = get_solver("gmres")(audit.outside(lambda z: f(z) + nan), z0, max_iter=25, tol=1e-5, check_every=0,
                                  restart=8)
    assert bool(res.diverged[0]) and int(res.steps[0]) == 1
    assert audit.calls == first


class _TanhCell(nn.Module):
    """f(z, x) = tanh(z W + x), a contraction for small W."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(contraction(dim, 0.6, seed=7))

    def init_state(self, x):
        return torch.zeros_like(x)

    def forward(self, z, x):
        return torch.tanh(z @ self.w + x)


@pytest.mark.parametrize("restart", [4, 20])
def test_the_implicit_gradient_with_gmres_matches_the_dense_ift_gradient(restart):
    torch.manual_seed(0)
    dim = 10
    cell = _TanhCell(dim)
    x = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dim, dtype=torch.float64)
    layer = DEQLayer(cell, backward="implicit", b_solver="gmres", b_solver_options={"restart": restart},
                     b_tol=1e-12, b_max_iter=80, f_tol=1e-12, f_max_iter=200, jac_weight=0.0)
    z, stats = layer(x)
    grads = torch.autograd.grad((z * weight).sum(), [cell.w, x])
    assert bool(stats.b_converged.all())
    # Dense reference: u (I - J) = weight per sample at z*, then u through f.
    z_star = z.detach()
    us = []
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: cell(v, x[b].detach()), z_star[b])
        us.append(torch.linalg.solve((torch.eye(dim, dtype=torch.float64) - jac).T, weight[b]))
    x_leaf = x.detach().requires_grad_()
    exact = torch.autograd.grad(cell(z_star, x_leaf), [cell.w, x_leaf], torch.stack(us))
    for got, want in zip(grads, exact):
        assert float((got - want).norm() / want.norm()) < 1e-9


def test_registration_options_and_refusals():
    assert "gmres" in list_solvers()
    assert solves_affine_only("gmres")
    assert not any(solves_affine_only(name) for name in ("anderson", "broyden", "fixed_point"))
    assert validate_solver_options("gmres", {}) == {"restart": 20} and set(solver_options("gmres")) == {"restart"}
    with pytest.raises(ValueError, match=r"\['restart'\].*>= 1"):
        validate_solver_options("gmres", {"restart": 0})
    with pytest.raises(TypeError, match=r"\['restart'\].*must be int"):
        validate_solver_options("gmres", {"restart": 2.0})
    f, z0, _ = _affine(6, radii=(0.5, 0.5))
    with pytest.raises(ValueError, match="independent affine system.*sequence"):
        get_solver("gmres")(f, z0, max_iter=5, tol=1e-6, sequence_length=2)
    with pytest.raises(TypeError, match="inverse"):
        get_solver("gmres")(f, z0, max_iter=5, tol=1e-6, inverse=True)
    with pytest.raises(ValueError, match="unknown solver"):
        solves_affine_only("nope")


def test_gmres_is_refused_as_the_forward_solver_naming_the_field():
    from deq_core import DEQConfig, OptionValueError

    with pytest.raises(OptionValueError, match=r"f_solver='gmres' solves affine maps only .* use it as b_solver") as err:
        DEQConfig(f_solver="gmres")
    assert err.value.options == ("f_solver",)
    assert DEQConfig(b_solver="gmres", b_solver_options={"restart": 8}).b_solver_options == {"restart": 8}
