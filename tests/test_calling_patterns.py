"""The layer's answer and behaviour across the ways it is called: grad modes, train/eval, limits,
checkpointing, DataParallel replicas, several layers sharing a seed, renamed statistics."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deq_core import DEQConfig, DEQLayer, name_deq_layers
from tests._maps import CausalCell, MLPCell, TanhCell


def _limit_layer(solver, backward, limit):
    # A float32 map far from converged at these limits: every iterate differs from the next.
    options = dict(phantom_steps=3) if backward == "phantom" else {}
    return DEQLayer(MLPCell(dim=8, hidden=16), f_solver=solver, f_max_iter=limit, f_tol=1e-9,
                    backward=backward, **options)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
@pytest.mark.parametrize("limit", [1, 2, 3, 4])
def test_one_answer_per_limit_with_and_without_grad_in_train_and_eval(solver, backward, limit):
    torch.manual_seed(0)
    layer = _limit_layer(solver, backward, limit)
    x = torch.randn(3, 5, 8)
    outputs = {}
    for training in (True, False):
        layer.train(training)
        outputs[training, True] = layer(x)[0]
        with torch.no_grad():
            outputs[training, False] = layer(x)[0]
    reference = outputs[False, False]
    for key, out in outputs.items():
        assert torch.equal(out.detach(), reference), key
    # The output is f at the solver's best iterate, i.e. the last evaluation of f that it kept.
    layer.eval()
    with torch.no_grad():
        z0 = torch.zeros_like(x)
        result = layer.config.forward_solve(training=False).run(
            lambda z: layer.f(z.view_as(x), x).reshape(3, -1), z0.reshape(3, -1))
    assert torch.equal(reference.reshape(3, -1), layer.f(result.z.view_as(x), x).reshape(3, -1).detach())
    if limit == 1:
        assert torch.equal(reference, layer.f(z0, x).detach())


def test_phantom_value_is_f_of_z_star_and_its_gradient_the_phantom_chain():
    f = TanhCell(4, 3)
    x = torch.randn(2, 3, dtype=torch.float64)
    weight = torch.randn(2, 4, dtype=torch.float64)
    layer = DEQLayer(f, f_max_iter=3, backward="phantom", phantom_steps=2, phantom_damping=0.5)
    z, _ = layer(x)
    with torch.no_grad():
        z_star = layer.config.forward_solve(training=True).run(lambda v: f(v, x), torch.zeros(2, 4,
                                                                  dtype=torch.float64)).z
    assert torch.equal(z.detach(), f(z_star, x))
    (z * weight).sum().backward()
    got = f.w.weight.grad.clone()
    f.zero_grad()
    chain = z_star
    for _ in range(2):
        chain = torch.lerp(chain, f(chain, x), 0.5)
    (chain * weight).sum().backward()
    assert torch.allclose(got, f.w.weight.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("jac_weight", [0.0, 1.0])
def test_checkpointing_around_the_layer_is_refused_with_the_reason(use_reentrant, jac_weight):
    layer = DEQLayer(TanhCell(4, 3), jac_weight=jac_weight)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    # The recomputation runs in the first backward through the region: the step's backward, or
    # (non-reentrant, JR on) already JR's own vector-Jacobian product in the forward.
    with pytest.raises(RuntimeError, match="torch.utils.checkpoint") as info:
        checkpoint(lambda inp: layer(inp)[0], x, use_reentrant=use_reentrant).sum().backward()
    assert "JR term was lost" in str(info.value) and "Checkpoint the modules before and after" in str(info.value)


def test_checkpointing_the_modules_around_the_layer_works():
    torch.manual_seed(0)
    pre, post = nn.Linear(3, 3, dtype=torch.float64), nn.Linear(4, 2, dtype=torch.float64)
    layer = DEQLayer(TanhCell(4, 3), jac_weight=1.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for wrap in (False, True):
        for p in (*pre.parameters(), *post.parameters(), *layer.parameters()):
            p.grad = None
        torch.manual_seed(1)  # the JR probe
        u = checkpoint(pre, x, use_reentrant=False) if wrap else pre(x)
        z, stats = layer(u)
        out = checkpoint(post, z, use_reentrant=False) if wrap else post(z)
        (out.sum() + stats.jr_term).backward()
        grads.append(torch.cat([p.grad.flatten() for p in (*pre.parameters(), *layer.parameters())]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10)


def test_data_parallel_replicas_are_refused_pointing_to_ddp():
    layer = DEQLayer(TanhCell(4, 3))
    replica = layer._replicate_for_data_parallel()  # what nn.parallel.replicate makes of each module
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        replica(torch.randn(2, 3, dtype=torch.float64))
    # Without devices to scatter to (CPU), DataParallel calls the module itself: that works.
    z, stats = nn.DataParallel(layer)(torch.randn(2, 3, dtype=torch.float64))
    assert bool(stats.f_converged.all())


def _decisions(layer, steps=200):
    x = torch.randn(1, 3, dtype=torch.float64)
    out = []
    for step in range(steps):
        layer.set_num_updates(step)
        out.append(layer(x)[1].jac_frobenius is not None)
    return out


def _two_layer_model():
    return nn.ModuleDict({"a": DEQLayer(TanhCell(4, 3), jac_weight=1.0, jac_freq=0.5),
                          "b": DEQLayer(TanhCell(4, 3), jac_weight=1.0, jac_freq=0.5)}).train()


def test_layers_sharing_a_seed_draw_independently_once_named_and_reproducibly():
    model = name_deq_layers(_two_layer_model())
    assert (model["a"].name, model["b"].name) == ("a", "b")
    a, b = _decisions(model["a"]), _decisions(model["b"])
    agree = sum(u == v for u, v in zip(a, b))
    assert 70 < agree < 130  # independent draws agree about half the time (not 200 of 200)
    assert 70 < sum(a) < 130
    # The draws depend on (seed, name, step, call) only: another model built later repeats them.
    _two_layer_model()
    again = name_deq_layers(_two_layer_model())
    assert _decisions(again["a"]) == a and _decisions(again["b"]) == b
    unnamed = _two_layer_model()
    assert _decisions(unnamed["a"]) == _decisions(unnamed["b"])  # the documented unnamed case


def test_name_deq_layers_keeps_given_names_and_rejects_non_strings():
    model = nn.Sequential(DEQLayer(TanhCell(4, 3), name="mine"), DEQLayer(TanhCell(4, 3)))
    name_deq_layers(model)
    assert [m.name for m in model] == ["mine", "1"]
    with pytest.raises(TypeError, match="name must be a string"):
        DEQLayer(TanhCell(4, 3), name=3)


def test_options_the_backward_mode_ignores_are_warned_about_by_name():
    with pytest.warns(UserWarning, match=r"backward='implicit' does not use phantom_steps=3") as record:
        DEQConfig(phantom_steps=3)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match=r"backward='phantom' does not use b_solver='anderson', b_max_iter=5, "
                                         r"b_solver_options=\{'m': 2, 'beta': 1.0, 'lam': 0.0001\}"):
        DEQConfig(backward="phantom", b_max_iter=5, b_solver="anderson", b_solver_options={"m": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DEQConfig(backward="phantom", phantom_steps=3)
        DEQConfig(backward="implicit", b_max_iter=5)
        DEQConfig(backward="unrolled", unrolled_layers=4)


def test_jr_names_and_their_deprecated_aliases():
    layer = DEQLayer(TanhCell(4, 3), jac_weight=0.5)
    _, stats = layer(torch.randn(2, 3, dtype=torch.float64))
    assert torch.equal(stats.jr_term, 0.5 * stats.jac_frobenius)
    with pytest.warns(FutureWarning, match="jac_loss is deprecated.*use jac_frobenius"):
        assert stats.jac_loss is stats.jac_frobenius
    with pytest.warns(FutureWarning, match="jr_loss is deprecated.*use jr_term"):
        assert torch.equal(stats.jr_loss, stats.jr_term)


def test_per_position_samples_solve_the_same_equilibrium_and_keep_gradients_exact():
    torch.manual_seed(0)
    f = CausalCell(scale=0.4)
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    weight = torch.randn(3, 7, 4, dtype=torch.float64)
    grads, outs = {}, {}
    for dims in (1, 2):
        layer = DEQLayer(f, sample_dims=dims, f_max_iter=100, f_tol=1e-12, b_max_iter=100, b_tol=1e-12)
        f.zero_grad()
        z, stats = layer(x)
        (z * weight).sum().backward()
        outs[dims], grads[dims] = z.detach(), torch.cat([p.grad.flatten() for p in f.parameters()])
        assert stats.f_steps.shape == (3 * 7 if dims == 2 else 3,) and stats.b_steps.shape == (3,)
        assert layer.spectral_radius(x).shape == (3,) and layer.jacobian_frobenius(x).shape == (3,)
    assert torch.allclose(outs[1], outs[2], atol=1e-10)
    assert torch.allclose(grads[1], grads[2], rtol=1e-8)
    with pytest.raises(ValueError, match="sample_dims must be >= 1 and <= 2"):
        DEQConfig(sample_dims=3)
