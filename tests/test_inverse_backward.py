"""The implicit backward started from the forward Broyden solve's inverse-Jacobian estimate
(``b_init="forward_inverse"``, SHINE): the estimate itself, its exact cases, its refinement, what it
leaves unchanged, its memory and its refusals."""
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from deq_core import DEQConfig, DEQLayer, ImplicitBackward, get_solver, register_solver
from deq_core.solvers import InverseEstimate, returns_inverse
from tests._maps import CausalCell, TanhCell, contraction

INVERSE = dict(f_solver="broyden", b_init="forward_inverse")
TIGHT_BACKWARD = dict(b_max_iter=300, b_tol=1e-12)


def _quiet(**options):
    """A config built with its unused-option warnings silenced (the tests set b_max_iter beside
    b_refine_steps on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DEQConfig(**options)


def _linear(dim, radius, batch=3, seed=0):
    a = contraction(dim, radius, seed=seed)
    b = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return a, b


def _dense(inv: InverseEstimate) -> torch.Tensor:
    """The estimate of (I - J_f)^-1 as (B, D, D) matrices, -H = I - sum_{i < rank} u_i v_i^T."""
    eye = torch.eye(inv.u.shape[2], dtype=inv.u.dtype)
    slots = (torch.arange(inv.u.shape[1]) < inv.rank[:, None]).to(inv.u.dtype)
    return eye - torch.einsum("bri,brj,br->bij", inv.u, inv.v, slots)


def _fields(result):
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "inverse"}


def _assert_same(plain, with_inverse):
    for name, value in _fields(plain).items():
        other = getattr(with_inverse, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name


# -- the solver's estimate ----------------------------------------------------------------------
def _slots_after(updates, memory):
    """The slots of H held after ``updates`` updates: a full history is reduced to memory // 2."""
    held = 0
    for _ in range(updates):
        held += 1
        if memory is not None and held == memory:
            held = memory // 2
    return held


@pytest.mark.parametrize("memory", [None, 3])
def test_the_estimate_is_the_inverse_the_solver_steps_with(memory):
    """-H g at the last iterate of an m-step solve is the step an (m+1)-step solve takes next,
    history reductions included; and asking for H changes nothing else."""
    a, b = _linear(6, 0.9)

    def run(max_iter, inverse):
        calls = []

        def f(z):
            calls.append(z.clone())
            return torch.tanh(z @ a.T + b)

        res = get_solver("broyden")(f, torch.zeros_like(b), max_iter=max_iter, tol=1e-30, memory=memory,
                                    inverse=inverse, trace=True)
        return res, calls

    for m in (2, 3, 4, 5, 7):
        res, calls = run(m, True)
        nxt, next_calls = run(m + 1, False)
        z_m = calls[-1]
        step = next_calls[-1] - next_calls[-2]
        assert torch.allclose(res.inverse.solve(torch.tanh(z_m @ a.T + b) - z_m), step, atol=1e-14, rtol=0)
        assert res.inverse.rank.tolist() == [_slots_after(m - 1, memory)] * 3
        _assert_same(run(m, False)[0], res)


def test_transposed_and_plain_application_are_the_two_sides_of_one_matrix():
    a, b = _linear(5, 0.8)
    res = get_solver("broyden")(lambda z: torch.tanh(z @ a.T + b), torch.zeros_like(b), max_iter=6, tol=1e-30,
                                inverse=True)
    x = torch.randn(3, 5, dtype=torch.float64)
    dense = _dense(res.inverse)
    assert torch.allclose(res.inverse.solve(x), torch.einsum("bij,bj->bi", dense, x), atol=1e-13)
    assert torch.allclose(res.inverse.solve_transposed(x), torch.einsum("bj,bji->bi", x, dense), atol=1e-13)


def test_a_stopped_sample_keeps_its_estimate_through_the_reductions_of_the_others():
    """Sample 0 (linear, 1-d: its first update makes H exact) stops after 3 evaluations; sample 1
    runs on with memory 2, reducing its history every other step (which for sample 0, of rank 1,
    changes the factors but not H), and sample 2 diverges."""
    slope, offset = 0.6, 0.7

    def f(z):
        out = torch.empty_like(z)
        out[0] = slope * z[0] + offset
        out[1] = torch.cos(3 * z[1])  # slow under restarts
        out[2] = z[2] + 1 + z[2] * z[2]  # no fixed point
        return out

    z0 = torch.zeros(3, 1, dtype=torch.float64)
    res = get_solver("broyden")(f, z0, max_iter=60, tol=1e-12, memory=2, inverse=True)
    plain = get_solver("broyden")(f, z0, max_iter=60, tol=1e-12, memory=2)
    _assert_same(plain, res)
    steps = res.steps.tolist()
    assert steps[0] == 3 and steps[1] > 6 and res.converged[:2].all() and res.diverged[2]
    exact = 1.0 / (1.0 - slope)
    assert abs(float(_dense(res.inverse)[0, 0, 0]) - exact) < 1e-12
    assert res.inverse.rank.tolist()[2] == 0  # -H = I
    x = torch.randn(3, 1, dtype=torch.float64)
    assert torch.equal(res.inverse.solve(x)[2], x[2]) and torch.equal(res.inverse.solve_transposed(x)[2], x[2])
    # The reductions in sample 1 left sample 0's H as it was: the same as solving it alone.
    alone = get_solver("broyden")(lambda z: slope * z + offset, z0[:1], max_iter=60, tol=1e-12, memory=2,
                                  inverse=True)
    assert int(res.inverse.rank[0]) >= 1 and int(alone.inverse.rank[0]) >= 1
    torch.testing.assert_close(_dense(res.inverse)[0], _dense(alone.inverse)[0], rtol=1e-14, atol=0)


def test_the_estimate_is_bounded_by_the_memory_not_the_iterations():
    a, b = _linear(12, 0.99)
    shapes = {}
    for max_iter in (10, 60):
        for memory in (4, None):
            res = get_solver("broyden")(lambda z: torch.tanh(z @ a.T + b), torch.zeros_like(b), max_iter=max_iter,
                                        tol=1e-30, memory=memory, inverse=True)
            shapes[max_iter, memory] = tuple(res.inverse.u.shape)
            assert res.inverse.v.shape == res.inverse.u.shape and res.inverse.rank.shape == (3,)
            assert int(res.inverse.rank.max()) <= res.inverse.u.shape[1]
    assert shapes[10, 4] == (3, _slots_after(9, 4), 12) and shapes[60, 4] == (3, _slots_after(59, 4), 12)
    # Without a memory the history holds max_iter vectors, of which the updates used max_iter - 1.
    assert shapes[10, None] == (3, 9, 12) and shapes[60, None] == (3, 59, 12)


def test_a_sequence_solve_keeps_its_values_with_the_estimate():
    a, b = _linear(4, 0.9, batch=6)
    f = lambda z: torch.tanh(z @ a.T + b * torch.arange(1, 7, dtype=torch.float64)[:, None])  # noqa: E731
    plain = get_solver("broyden")(f, torch.zeros_like(b), max_iter=40, tol=1e-10, sequence_length=3, memory=3)
    res = get_solver("broyden")(f, torch.zeros_like(b), max_iter=40, tol=1e-10, sequence_length=3, memory=3,
                                inverse=True)
    _assert_same(plain, res)
    assert res.inverse.u.shape[0] == 6 and res.inverse.u.shape[1] <= 3 and res.inverse.u.shape[2] == 4


# -- the layer: exact cases ---------------------------------------------------------------------
class _ScalarLinear(nn.Module):
    """f(z, x) = s(x) * z + c * x elementwise, s(x) = 0.9 tanh(x): each scalar entry is its own
    linear map, so a solver sample of dimension 1 sees a linear 1-d map, on which Broyden's first
    update makes H exact."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, z, x):
        return 0.9 * torch.tanh(x) * z + self.c * x


def _grads(layer, x, weight):
    x_leaf = x.detach().requires_grad_()
    z, stats = layer(x_leaf)
    grads = torch.autograd.grad((z * weight).sum(), [x_leaf, *layer.f.parameters()])
    return torch.cat([g.flatten() for g in grads]), z.detach(), stats


@pytest.mark.parametrize("shape, sample_dims", [((5, 1), 1), ((3, 6, 1), 2)])
def test_the_estimate_alone_is_the_implicit_gradient_where_it_is_exact(shape, sample_dims):
    f = _ScalarLinear()
    x = torch.randn(*shape, dtype=torch.float64)
    weight = torch.randn(*shape, dtype=torch.float64)
    common = dict(f_solver="broyden", f_max_iter=30, f_tol=1e-13, sample_dims=sample_dims)
    exact, z_exact, _ = _grads(DEQLayer(f, **common, **TIGHT_BACKWARD), x, weight)
    estimate, z, stats = _grads(DEQLayer(f, **common, b_init="forward_inverse", b_refine_steps=0), x, weight)
    assert torch.equal(z, z_exact)
    assert float((estimate - exact).abs().max()) <= 1e-6 * float(exact.abs().max())
    assert stats.b_steps.tolist() == [0] * shape[0] and float(stats.b_rel_res.max()) < 1e-12


# -- the layer: refinement on a nonlinear map ---------------------------------------------------
def _cosine_and_error(g, ref):
    return float(torch.nn.functional.cosine_similarity(g, ref, dim=0)), float((g - ref).norm() / ref.norm())


@pytest.mark.parametrize("memory", [None, 6])
def test_refinement_steps_approach_the_exact_implicit_gradient(memory, capsys):
    torch.manual_seed(0)
    f = TanhCell(16, 5, scale=0.9)
    x = torch.randn(4, 5, dtype=torch.float64)
    weight = torch.randn(4, 16, dtype=torch.float64)
    forward = dict(f_solver="broyden", f_max_iter=40, f_tol=1e-10, f_solver_options={"memory": memory})
    ref, z_ref, _ = _grads(DEQLayer(f, _quiet(**forward, **TIGHT_BACKWARD)), x, weight)
    rows, errors = [], []
    for k in (0, 1, 2, 4, 8, 16, 32):
        layer = DEQLayer(f, _quiet(**forward, **TIGHT_BACKWARD, b_init="forward_inverse", b_refine_steps=k))
        g, z, stats = _grads(layer, x, weight)
        assert torch.equal(z, z_ref)
        cos, err = _cosine_and_error(g, ref)
        rows.append(f"memory={memory} k={k:2d}: cos {cos:.8f}, rel. error {err:.2e}, "
                    f"b_steps {stats.b_steps.tolist()}, b_rel_res max {float(stats.b_rel_res.max()):.1e}")
        errors.append((cos, err))
        assert int(stats.b_steps.max()) <= k
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    for (cos_a, err_a), (cos_b, err_b) in zip(errors, errors[1:]):
        assert err_b <= err_a and cos_b >= cos_a
    # The estimate beats the Jacobian-free start u = grad (from zero, 2 evaluations; an estimate that
    # did nothing would give that gradient), by far where its rank covers the state (no memory).
    jacobian_free, _, _ = _grads(DEQLayer(f, **forward, b_max_iter=2, b_tol=1e-12), x, weight)
    assert errors[0][1] < (0.75 if memory is None else 1.0) * _cosine_and_error(jacobian_free, ref)[1]
    assert errors[-1][0] > 0.9999 and errors[-1][1] < 1e-4
    # The usual solve started at the estimate reaches the same gradient.
    g, _, _ = _grads(DEQLayer(f, **forward, **TIGHT_BACKWARD, b_init="forward_inverse"), x, weight)
    assert _cosine_and_error(g, ref)[1] < 1e-8


def test_per_position_estimates_refine_to_the_implicit_gradient():
    torch.manual_seed(0)
    f = CausalCell(scale=0.5)  # positions coupled: a per-position estimate misses it, refinement restores it
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    weight = torch.randn(2, 5, 4, dtype=torch.float64)
    forward = dict(f_solver="broyden", f_max_iter=60, f_tol=1e-11, sample_dims=2)
    ref, _, _ = _grads(DEQLayer(f, **forward, **TIGHT_BACKWARD), x, weight)
    errors = []
    for k in (0, 4, 30):
        g, _, stats = _grads(DEQLayer(f, _quiet(**forward, **TIGHT_BACKWARD, b_init="forward_inverse",
                                                b_refine_steps=k)), x, weight)
        errors.append(_cosine_and_error(g, ref))
        assert stats.b_steps.shape == (2,)
    assert errors[0][0] > 0.5 and errors[1][1] < errors[0][1] and errors[2][0] > 0.9999


# -- what the mode records and leaves unchanged -------------------------------------------------
def test_the_stats_record_the_steps_taken_and_the_residual_of_the_returned_gradient():
    torch.manual_seed(0)
    f = TanhCell(8, 3, scale=0.9)
    x = torch.randn(3, 3, dtype=torch.float64)
    weight = torch.randn(3, 8, dtype=torch.float64)
    for k in (0, 3):
        layer = DEQLayer(f, **INVERSE, f_max_iter=30, f_tol=1e-10, b_refine_steps=k, b_tol=1e-14)
        z, stats = layer(x)
        params = list(f.parameters())
        grads = torch.autograd.grad((z * weight).sum(), params)
        # The same solves by hand: the forward with its estimate, then k steps from -H^T weight.
        with torch.no_grad():
            result = layer.config.forward_solve(training=True).run(lambda v: f(v, x), f.init_state(x), inverse=True)
        z_in = result.z.detach().requires_grad_()
        out = f(z_in, x)

        def linear_map(u):
            (vjp,) = torch.autograd.grad(out, z_in, u, retain_graph=True)
            return vjp + weight

        solve = ImplicitBackward.backward_solve(layer.config)
        assert solve.max_iter == k + 1
        u = solve.run(linear_map, result.inverse.solve_transposed(weight)).z
        fu = linear_map(u).detach()
        assert all(torch.allclose(g, e, rtol=1e-12, atol=0) for g, e in zip(grads, torch.autograd.grad(out, params, u)))
        assert stats.b_steps.tolist() == [k] * 3
        assert torch.allclose(stats.b_abs_res, (fu - u).norm(dim=1), rtol=1e-10, atol=0)
        assert torch.allclose(stats.b_rel_res, (fu - u).norm(dim=1) / (fu.norm(dim=1) + 1e-8), rtol=1e-10, atol=0)
        if k == 0:
            assert torch.equal(u, result.inverse.solve_transposed(weight))


def test_forward_values_and_the_ordinary_implicit_gradient_are_unchanged():
    torch.manual_seed(0)
    f = TanhCell(8, 3, scale=0.9)
    x = torch.randn(4, 3, dtype=torch.float64)
    weight = torch.randn(4, 8, dtype=torch.float64)
    base = dict(f_solver="broyden", f_max_iter=12, f_tol=1e-6, f_solver_options={"memory": 4})
    plain = DEQLayer(f, **base)
    warm = DEQLayer(f, **base, b_init="forward_inverse", b_refine_steps=2)
    g_plain, z_plain, s_plain = _grads(plain, x, weight)
    g_warm, z_warm, s_warm = _grads(warm, x, weight)
    assert torch.equal(z_plain, z_warm)
    for name in ("f_steps", "f_abs_res", "f_rel_res", "f_converged", "f_diverged", "f_stalled"):
        assert torch.equal(getattr(s_plain, name), getattr(s_warm, name)), name
    with torch.no_grad():
        assert torch.equal(plain(x)[0], warm(x)[0])
    # The ordinary path: u from a backward solve started at zero, carried through one f(z*).
    with torch.no_grad():
        result = plain.config.forward_solve(training=True).run(lambda z: f(z, x), f.init_state(x))
    z_in = result.z.detach().requires_grad_()
    x_leaf = x.detach().requires_grad_()
    out = f(z_in, x_leaf)

    def linear_map(u):
        (vjp,) = torch.autograd.grad(out, z_in, u, retain_graph=True)
        return vjp + weight

    u = ImplicitBackward.backward_solve(plain.config).run(linear_map, torch.zeros_like(weight)).z
    expected = torch.autograd.grad(out, [x_leaf, *f.parameters()], u)
    assert torch.equal(g_plain, torch.cat([e.flatten() for e in expected]))
    assert not torch.equal(g_plain, g_warm)


def test_the_estimate_is_requested_only_where_a_backward_solve_uses_it():
    requests = []

    @register_solver("spy_broyden")
    def spy_broyden(f, z0, *, max_iter, tol, stop_mode="abs", check_every=None, divergence_factor=1e4,
                    trace=False, precision=None, sequence_length=None, inverse=False):
        requests.append(inverse)
        return get_solver("broyden")(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                     check_every=check_every, divergence_factor=divergence_factor, trace=trace,
                                     precision=precision, inverse=inverse)

    assert returns_inverse("spy_broyden") and returns_inverse("broyden") and not returns_inverse("anderson")
    f = TanhCell(6, 3)
    x = torch.randn(2, 3, dtype=torch.float64)
    layer = DEQLayer(f, f_solver="spy_broyden", b_init="forward_inverse", b_refine_steps=1, pretrain_steps=1)
    layer(x)[0].sum().backward()  # pretraining: unrolled, no solve
    layer.set_num_updates(1)
    with torch.no_grad():
        layer(x)
        layer.eval()
        layer(x)
    layer(x)  # eval with gradients: a backward may follow
    layer.train()
    z, stats = layer(x)
    z.sum().backward()
    assert requests == [False, False, True, True]
    assert stats.b_steps.tolist() == [1, 1]


def test_the_estimate_runs_under_autocast():
    torch.manual_seed(0)
    f = TanhCell(8, 3, scale=0.8, dtype=torch.float32)
    x = torch.randn(3, 3)
    layer = DEQLayer(f, **INVERSE, b_refine_steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = layer(x)
        z.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in f.parameters())
    assert stats.b_steps.tolist() == [2] * 3


# -- configuration ------------------------------------------------------------------------------
def test_config_defaults_and_the_backward_solve_limits():
    cfg = DEQConfig()
    assert cfg.b_init == "zero" and cfg.b_refine_steps is None and not ImplicitBackward.forward_inverse(cfg)
    assert ImplicitBackward.backward_solve(cfg).max_iter == cfg.b_max_iter
    assert ImplicitBackward.backward_solve(DEQConfig(**INVERSE)).max_iter == cfg.b_max_iter
    for k in (0, 1, 4):
        assert ImplicitBackward.backward_solve(DEQConfig(**INVERSE, b_refine_steps=k)).max_iter == k + 1


@pytest.mark.parametrize("options, error, match", [
    ({"b_init": "forward_inverse"}, ValueError, r"f_solver='anderson' does not keep: set f_solver='broyden'"),
    ({"b_init": "forward_inverse", "f_solver": "fixed_point"}, ValueError, r"set f_solver='broyden'"),
    ({**INVERSE, "b_refine_steps": -1}, ValueError, r"b_refine_steps must be >= 0"),
    ({**INVERSE, "b_refine_steps": 1.5}, TypeError, r"b_refine_steps must be int or None"),
    ({"b_init": "shine"}, ValueError, r"b_init must be one of \['zero', 'forward_inverse'\]"),
])
def test_bad_configs_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        DEQConfig(**options)


def test_a_solver_without_an_estimate_refuses_the_request():
    with pytest.raises(TypeError, match="keeps no inverse-Jacobian estimate.*only 'broyden'"):
        get_solver("anderson")(lambda z: 0.5 * z, torch.zeros(2, 3), max_iter=3, tol=1e-6, inverse=True)
    cfg = DEQConfig(f_solver="broyden", b_init="forward_inverse")
    with pytest.raises(ValueError, match="f_solver='anderson' does not keep"):
        cfg.replace(f_solver="anderson")


def test_options_the_initial_point_leaves_unread_are_warned_about():
    with pytest.warns(UserWarning, match=r"b_init='zero' does not use b_refine_steps=2"):
        DEQConfig(b_refine_steps=2)
    with pytest.warns(UserWarning, match=r"b_init='forward_inverse' with b_refine_steps=2 does not use b_max_iter=9"):
        DEQConfig(**INVERSE, b_refine_steps=2, b_max_iter=9)
    with pytest.warns(UserWarning, match=r"b_refine_steps=0 does not use b_max_iter=9, b_solver='anderson'"):
        DEQConfig(**INVERSE, b_refine_steps=0, b_max_iter=9, b_solver="anderson")
    with pytest.warns(UserWarning, match=r"backward='phantom' does not use b_init='forward_inverse', b_refine_steps=1"):
        DEQConfig(backward="phantom", b_init="forward_inverse", b_refine_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DEQConfig(**INVERSE)
        DEQConfig(**INVERSE, b_refine_steps=3, b_tol=1e-6, b_solver="fixed_point")
        DEQConfig(**INVERSE, b_max_iter=9, b_solver="anderson")
