"""Gradients of the equilibrium layer against exact references."""
import pytest
import torch

from deq_core import DEQLayer
from tests._maps import TanhCell, TwoScaleCell

FORWARD_TIGHT = dict(f_solver="anderson", f_max_iter=300, f_tol=1e-12, f_solver_options={"m": 6})
TIGHT = dict(FORWARD_TIGHT, b_max_iter=300, b_tol=1e-12)


def _exact_grads(f, x, z_star, weight, flatten, unflatten):
    """d(sum(weight * z*))/d(params, x) from a dense solve of u (I - J) = weight, per sample."""
    params = list(f.parameters())
    us = []
    for b in range(x.shape[0]):
        zb = flatten(z_star)[b:b + 1].detach()
        jac = torch.autograd.functional.jacobian(lambda z: flatten(f(unflatten(z), x[b:b + 1])), zb)
        jac = jac.reshape(zb.shape[1], zb.shape[1])
        eye = torch.eye(jac.shape[0], dtype=jac.dtype, device=jac.device)
        us.append(torch.linalg.solve((eye - jac).T, weight[b]))
    u = torch.stack(us)
    x_leaf = x.detach().requires_grad_()
    out = flatten(f(unflatten(flatten(z_star).detach()), x_leaf))
    return torch.autograd.grad(out, params + [x_leaf], u)


def _layer_grads(layer, x, weight, flatten):
    x_leaf = x.detach().requires_grad_()
    z, stats = layer(x_leaf)
    loss = (flatten(z) * weight).sum()
    grads = torch.autograd.grad(loss, list(layer.f.parameters()) + [x_leaf])
    return grads, z, stats


def _rel_err(a, b):
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))


def _single(z):
    return z


@pytest.mark.parametrize("b_solver", ["broyden", "anderson", "fixed_point"])
def test_implicit_gradient_matches_dense_solve(b_solver, device):
    f = TanhCell(8, 5).to(device)
    x = torch.randn(3, 5, dtype=torch.float64).to(device)
    weight = torch.randn(3, 8, dtype=torch.float64).to(device)
    layer = DEQLayer(f, **{**TIGHT, "b_solver": b_solver})
    grads, z, stats = _layer_grads(layer, x, weight, _single)
    exact = _exact_grads(f, x, z, weight, _single, _single)
    assert _rel_err(grads, exact) < 1e-5
    assert stats.b_steps is not None and bool(stats.b_converged.all())
    assert float(stats.b_rel_res.max()) <= 1e-12  # the default backward stop mode is rel


def test_implicit_gradient_for_a_structured_state(device):
    f = TwoScaleCell().to(device)
    x = torch.randn(4, 6, dtype=torch.float64).to(device)
    weight = torch.randn(4, 9, dtype=torch.float64).to(device)
    flatten = lambda z: torch.cat([z[0].reshape(z[0].shape[0], -1), z[1]], dim=1)  # noqa: E731
    unflatten = lambda v: [v[:, :6].reshape(-1, 2, 3), v[:, 6:]]  # noqa: E731
    layer = DEQLayer(f, **TIGHT)
    grads, z, _ = _layer_grads(layer, x, weight, flatten)
    assert isinstance(z, list) and z[0].shape == (4, 2, 3) and z[1].shape == (4, 3)
    exact = _exact_grads(f, x, z, weight, flatten, unflatten)
    assert _rel_err(grads, exact) < 1e-5


def test_gradcheck_on_a_small_layer(device):
    layer = DEQLayer(TanhCell(4, 3), **TIGHT).to(device)
    x = torch.randn(2, 3, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: layer(inp)[0], (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_phantom_gradient_approaches_the_implicit_one(device):
    f = TanhCell(8, 5, scale=0.6).to(device)
    x = torch.randn(3, 5, dtype=torch.float64).to(device)
    weight = torch.randn(3, 8, dtype=torch.float64).to(device)
    implicit, _, _ = _layer_grads(DEQLayer(f, **TIGHT), x, weight, _single)
    errors = []
    for k in (1, 3, 10, 40):
        layer = DEQLayer(f, **FORWARD_TIGHT, backward="phantom", phantom_steps=k, phantom_damping=0.8)
        errors.append(_rel_err(_layer_grads(layer, x, weight, _single)[0], implicit))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def test_jacobian_free_gradient_is_one_phantom_step(device):
    f = TanhCell(6, 4).to(device)
    x = torch.randn(2, 4, dtype=torch.float64).to(device)
    weight = torch.randn(2, 6, dtype=torch.float64).to(device)
    layer = DEQLayer(f, **FORWARD_TIGHT, backward="phantom", phantom_steps=1, phantom_damping=1.0)
    grads, z, _ = _layer_grads(layer, x, weight, _single)
    x_leaf = x.detach().requires_grad_()
    ref = torch.autograd.grad((f(z.detach(), x_leaf) * weight).sum(), list(f.parameters()) + [x_leaf])
    assert _rel_err(grads, ref) < 1e-12


def test_unrolled_mode_is_ordinary_backprop_through_a_weight_tied_stack(device):
    f = TanhCell(6, 4).to(device)
    x = torch.randn(2, 4, dtype=torch.float64).to(device)
    weight = torch.randn(2, 6, dtype=torch.float64).to(device)
    layer = DEQLayer(f, backward="unrolled", unrolled_layers=4)
    grads, z, stats = _layer_grads(layer, x, weight, _single)
    x_leaf = x.detach().requires_grad_()
    ref_z = f.init_state(x)
    for _ in range(4):
        ref_z = f(ref_z, x_leaf)
    ref = torch.autograd.grad((ref_z * weight).sum(), list(f.parameters()) + [x_leaf])
    assert torch.allclose(z, ref_z) and _rel_err(grads, ref) < 1e-12
    assert stats.mode == "unrolled" and stats.f_steps.tolist() == [4, 4]


def test_eval_mode_stays_differentiable_and_no_grad_returns_the_fixed_point(device):
    f = TanhCell(6, 4).to(device)
    x = torch.randn(2, 4, dtype=torch.float64).to(device)
    weight = torch.randn(2, 6, dtype=torch.float64).to(device)
    layer = DEQLayer(f, **TIGHT)
    train_grads, _, _ = _layer_grads(layer, x, weight, _single)
    layer.eval()
    eval_grads, _, _ = _layer_grads(layer, x, weight, _single)
    assert _rel_err(eval_grads, train_grads) < 1e-10
    with torch.no_grad():
        z, stats = layer(x)
    assert not z.requires_grad and stats.b_steps is None
    assert torch.allclose(f(z, x), z, atol=1e-10)


def _penalty_grads(forward, f, x, weight):
    """d/dparams of the gradient penalty ||d sum(weight * z*) / dx||^2 (a second-order gradient)."""
    x_leaf = x.detach().requires_grad_()
    (g_x,) = torch.autograd.grad((forward(x_leaf) * weight).sum(), x_leaf, create_graph=True)
    return torch.autograd.grad(g_x.pow(2).sum(), list(f.parameters()))


def _unrolled_reference(f, n):
    def forward(x):
        z = f.init_state(x)
        for _ in range(n):
            z = f(z, x)
        return z
    return forward


@pytest.mark.parametrize("backward, options", [
    ("phantom", dict(phantom_steps=60, phantom_damping=1.0)),
    ("unrolled", dict(unrolled_layers=60)),
])
def test_second_order_gradients_match_an_unrolled_float64_reference(backward, options, device):
    f = TanhCell(6, 4).to(device)  # spectral radius 0.5: 60 steps are converged in float64
    x = torch.randn(3, 4, dtype=torch.float64).to(device)
    weight = torch.randn(3, 6, dtype=torch.float64).to(device)
    reference = _penalty_grads(_unrolled_reference(f, 60), f, x, weight)
    layer = DEQLayer(f, **FORWARD_TIGHT, backward=backward, **options)
    got = _penalty_grads(lambda inp: layer(inp)[0], f, x, weight)
    assert _rel_err(got, reference) < 1e-8


def test_second_order_gradients_through_the_implicit_backward_are_refused(device):
    f = TanhCell(6, 4).to(device)
    layer = DEQLayer(f, **TIGHT)
    x = torch.randn(3, 4, dtype=torch.float64).to(device)
    with pytest.raises(RuntimeError, match=r"backward='implicit' does not support higher-order gradients .* "
                                           r"Use backward='phantom' or backward='unrolled'"):
        _penalty_grads(lambda inp: layer(inp)[0], f, x, torch.randn(3, 6, dtype=torch.float64).to(device))
    # First-order gradients are unaffected.
    x_leaf = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(layer(x_leaf)[0].sum(), x_leaf)
    assert bool(torch.isfinite(g).all())
