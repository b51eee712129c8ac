"""Spectral normalization of f's linear maps: the estimate, the normalized norms, one power
iteration per layer forward pass, exact gradients, exact resume and the refused cases."""
import argparse
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deq_core import (DEQConfig, DEQLayer, add_deq_args, config_from_args, apply_spectral_norm, apply_weight_norm,
                      remove_spectral_norm, remove_weight_norm)
from deq_core.spectral_norm import SpectralNorm
from tests._maps import MLPCell

pytestmark = pytest.mark.usefixtures("one_thread")


def _sn(m: nn.Module) -> SpectralNorm:
    return m.parametrizations.weight[0]


def _matrix_norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2))


def _converge(modules, steps: int = 300) -> None:
    """Advance the power iteration of every spectral-normalized module by ``steps`` training calls."""
    for m in modules:
        m.train()
        for _ in range(steps):
            m.weight


def _sn_modules(root: nn.Module):
    return [m for m in root.modules() if parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], SpectralNorm)]


@pytest.fixture
def count_power_iterations(monkeypatch):
    """A list that gets one entry per power-iteration call (after it is created)."""
    calls = []
    original = SpectralNorm._power_iteration

    def counted(self, mat, steps):
        calls.append((id(self), steps))
        return original(self, mat, steps)

    monkeypatch.setattr(SpectralNorm, "_power_iteration", counted)
    return calls


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(7, 5, dtype=torch.float64),
    lambda: nn.Conv1d(3, 4, 3, dtype=torch.float64),
    lambda: nn.Conv2d(3, 6, (3, 2), dtype=torch.float64),
], ids=["linear", "conv1d", "conv2d"])
def test_the_estimate_converges_to_the_reshaped_weights_spectral_norm(make):
    m = apply_spectral_norm(make())
    sn = _sn(m)
    original = m.parametrizations.weight.original
    assert sn.u.shape == (original.shape[0],) and sn.v.shape == (original[0].numel(),)
    _converge([m])
    exact = _matrix_norm(original)
    assert abs(float(sn.sigma(original.detach())) - exact) / exact < 1e-4
    assert abs(_matrix_norm(m.weight) - 1.0) < 1e-4   # default scale: 1


@pytest.mark.parametrize("kwargs, expected", [
    (dict(scale=0.7), 0.7),
    (dict(scale=2.0, clip=0.5), 0.5),
    (dict(scale=0.3, clip=0.5), 0.3),
    (dict(clip=0.25), 0.25),
    (dict(scale=3.0, learn_scale=True, clip=1.5), 1.5),
    (dict(scale=0.6, learn_scale=True), 0.6),
])
def test_the_normalized_weight_has_the_clipped_scale_as_its_norm(kwargs, expected):
    f = nn.Sequential(nn.Linear(6, 8, dtype=torch.float64), nn.Conv2d(2, 3, 3, dtype=torch.float64))
    apply_spectral_norm(f, **kwargs)
    _converge(f)
    for m in f:
        assert abs(_matrix_norm(m.weight) - expected) / expected < 1e-4


def test_a_learned_scale_is_a_parameter_and_its_clip_stops_its_gradient():
    f = apply_spectral_norm(nn.Linear(4, 4, dtype=torch.float64), scale=2.0, learn_scale=True, clip=1.0)
    sn = _sn(f)
    assert isinstance(sn.scale, nn.Parameter) and float(sn.scale.detach()) == 2.0
    assert any(p is sn.scale for p in f.parameters())
    assert "parametrizations.weight.0.scale" in f.state_dict()
    x = torch.randn(3, 4, dtype=torch.float64)
    f(x).pow(2).sum().backward()
    assert float(sn.scale.grad) == 0.0                 # clipped: |s| > clip
    with torch.no_grad():
        sn.scale.fill_(0.5)
    f.zero_grad()
    f(x).pow(2).sum().backward()
    assert float(sn.scale.grad) != 0.0 and sn.scale.grad is not None


def test_fixed_settings_leave_no_extra_parameters_and_use_no_global_randomness():
    f = MLPCell()
    before = torch.get_rng_state()
    apply_spectral_norm(f)
    assert torch.equal(torch.get_rng_state(), before)
    names = {n for n, _ in f.named_parameters()}
    assert names == {"fc1.bias", "fc2.bias", "norm.weight", "norm.bias", "fc1.parametrizations.weight.original",
                     "fc2.parametrizations.weight.original"}
    assert {"fc1.parametrizations.weight.0.u", "fc1.parametrizations.weight.0.v"} <= set(f.state_dict())


# -- once per layer forward pass --------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(backward="implicit", jac_weight=1.0, jac_freq=1.0, b_max_iter=8),
    dict(backward="phantom", phantom_steps=3),
    dict(backward="unrolled", unrolled_layers=3),
    dict(backward="implicit", pretrain_steps=5, jac_weight=1.0, jac_freq=1.0, pretrain_jac_weight=1.0, b_max_iter=8),
], ids=["implicit-jr", "phantom", "unrolled", "pretraining"])
def test_the_power_iteration_runs_once_per_layer_forward_in_training_and_never_in_eval(
        options, count_power_iterations):
    f = MLPCell()
    layer = DEQLayer(f, spectral_norm=True, f_max_iter=8, f_tol=1e-9, **options)
    sns = {id(_sn(f.fc1)), id(_sn(f.fc2))}
    x = torch.randn(4, 16)
    for step in range(3):
        count_power_iterations.clear()
        z, stats = layer(x)
        (z.pow(2).mean() + stats.jr_term).backward()
        assert sorted(count_power_iterations) == sorted((i, 1) for i in sns), f"step {step}"
        assert int(stats.f_steps.max()) > 1 or options["backward"] == "unrolled" or layer.pretraining
        if options.get("jac_weight"):
            assert stats.jac_frobenius is not None          # JR's double backward ran too
    layer.eval()
    u = _sn(f.fc1).u.clone()
    count_power_iterations.clear()
    with torch.no_grad():
        layer(x)
    z, stats = layer(x)                  # eval with gradients (implicit backward in eval mode)
    z.sum().backward()
    assert count_power_iterations == [] and torch.equal(_sn(f.fc1).u, u)


def test_one_pass_advances_the_vectors_by_exactly_one_step():
    f = MLPCell()
    layer = DEQLayer(f, spectral_norm=True, f_max_iter=10, f_tol=1e-9)
    sn, w = _sn(f.fc1), f.fc1.parametrizations.weight.original.detach()
    u0 = sn.u.clone()
    v1 = nn.functional.normalize(w.t() @ u0, dim=0)
    u1 = nn.functional.normalize(w @ v1, dim=0)
    z, _ = layer(torch.randn(2, 16))
    assert torch.allclose(sn.u, u1, atol=1e-7) and torch.allclose(sn.v, v1, atol=1e-7)


def test_a_compiled_f_reuses_the_passes_weights_and_advances_once():
    # The solver's evaluations of f run compiled; they must read the weights cached for the pass
    # rather than recompute them (which would advance the estimate once per solver step).
    f = MLPCell()
    layer = DEQLayer(f, spectral_norm=True, f_max_iter=6, f_tol=1e-9, b_max_iter=4, compile_f=True,
                     compile_backend="eager")
    sn, w = _sn(f.fc1), f.fc1.parametrizations.weight.original.detach()
    x = torch.randn(2, 16)
    for _ in range(2):
        u0 = sn.u.clone()
        z, stats = layer(x)
        z.sum().backward()
        v1 = nn.functional.normalize(w.t() @ u0, dim=0)
        assert int(stats.f_steps.max()) == 6
        assert torch.allclose(sn.u, nn.functional.normalize(w @ v1, dim=0), atol=1e-7)


# -- gradients --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, kwargs", [
    (lambda: nn.Linear(5, 4, dtype=torch.float64), {}),
    (lambda: nn.Conv2d(2, 3, 2, dtype=torch.float64), dict(scale=0.8)),
    (lambda: nn.Linear(3, 6, dtype=torch.float64), dict(scale=1.3, learn_scale=True, clip=2.0)),
], ids=["linear", "conv2d-scaled", "linear-learned-scale"])
def test_gradients_match_finite_differences_with_u_and_v_fixed(make, kwargs):
    m = apply_spectral_norm(make(), **kwargs)
    sn = _sn(m).eval()                        # fixed u, v: the map W -> s W / (u^T W v)
    inputs = [m.parametrizations.weight.original.detach().clone().requires_grad_()]
    if kwargs.get("learn_scale"):
        def fn(w, s):                          # the learned scale as an input of the checked map
            return torch.func.functional_call(sn, {"scale": s}, (w,))
        inputs.append(sn.scale.detach().clone().requires_grad_())
    else:
        fn = sn
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-8)


def test_the_training_gradient_is_the_one_of_the_advanced_fixed_vectors():
    """In training the call advances u, v, then differentiates with them held constant: for
    L = <G, W / sigma> with sigma = u^T W v, dL/dW = G / sigma - <G, W> / sigma^2 * u v^T."""
    m = apply_spectral_norm(nn.Linear(6, 5, dtype=torch.float64))
    sn, w = _sn(m), m.parametrizations.weight.original
    g = torch.randn(5, 6, dtype=torch.float64)
    m.train()
    (grad,) = torch.autograd.grad((m.weight * g).sum(), w)
    u, v = sn.u, sn.v                          # the advanced vectors the call used
    sigma = u @ w.detach() @ v
    expected = g / sigma - (g * w.detach()).sum() / sigma ** 2 * torch.outer(u, v)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)


def test_layer_gradients_reach_the_original_weights():
    f = MLPCell()
    layer = DEQLayer(f, spectral_norm=True, f_max_iter=8, b_max_iter=8)
    z, stats = layer(torch.randn(3, 16))
    z.pow(2).sum().backward()
    for lin in (f.fc1, f.fc2):
        grad = lin.parametrizations.weight.original.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0


def test_autocast_and_reduced_precision_weights_keep_the_estimate_in_float32():
    m = apply_spectral_norm(nn.Linear(16, 12)).eval()
    reference = m.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = m.weight
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, reference)
    m.to(torch.bfloat16)
    assert _sn(m).u.dtype == torch.bfloat16 and m.weight.dtype == torch.bfloat16
    _converge([m], steps=50)
    assert abs(_matrix_norm(m.weight.float()) - 1.0) < 2e-2   # bfloat16 rounding of W and u, v


# -- state dict -------------------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_bitwise():
    x = torch.randn(4, 16)
    torch.manual_seed(1)
    a = DEQLayer(MLPCell(), spectral_norm=True, spectral_norm_learn_scale=True, f_max_iter=6, b_max_iter=6)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(3):
        z, _ = a(x)
        z.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = copy.deepcopy(a.state_dict())
    assert {"f.fc1.parametrizations.weight.0.u", "f.fc1.parametrizations.weight.0.v",
            "f.fc1.parametrizations.weight.0.scale"} <= set(state)
    torch.manual_seed(2)
    b = DEQLayer(MLPCell(), spectral_norm=True, spectral_norm_learn_scale=True, f_max_iter=6, b_max_iter=6)
    assert not torch.equal(b.f.fc1.parametrizations.weight.original, a.f.fc1.parametrizations.weight.original)
    b.load_state_dict(state)
    for name in ("u", "v"):
        assert torch.equal(getattr(_sn(b.f.fc1), name), getattr(_sn(a.f.fc1), name))
    za, _ = a(x)
    zb, _ = b(x)
    assert torch.equal(za, zb)
    assert torch.equal(_sn(b.f.fc2).u, _sn(a.f.fc2).u)     # both advanced the same step
    c = copy.deepcopy(a)                                   # copies (an EMA) carry the vectors too
    assert torch.equal(_sn(c.f.fc1).v, _sn(a.f.fc1).v)


def test_remove_folds_the_current_normalized_weight_without_advancing(count_power_iterations):
    f = MLPCell().train()
    apply_spectral_norm(f, scale=0.5)
    original = f.fc1.parametrizations.weight.original
    with torch.no_grad():
        expected = _sn(f.fc1).eval()(original.detach()).clone()
    _sn(f.fc1).train()
    count_power_iterations.clear()
    remove_spectral_norm(f)
    assert count_power_iterations == []
    assert not parametrize.is_parametrized(f.fc1) and not parametrize.is_parametrized(f.fc2)
    assert f.fc1.weight is original                        # the optimizer's parameter stays the same
    assert torch.equal(f.fc1.weight.detach(), expected)
    wn = apply_weight_norm(nn.Linear(3, 3))
    remove_spectral_norm(wn)                               # weight norm is not touched
    assert parametrize.is_parametrized(wn, "weight")


def test_remove_weight_norm_leaves_spectral_norm_alone():
    f = MLPCell()
    apply_weight_norm(f.fc1)
    apply_spectral_norm(f.fc2, scale=0.5)
    remove_weight_norm(f)
    assert not parametrize.is_parametrized(f.fc1)
    assert isinstance(_sn(f.fc2), SpectralNorm)            # still normalized, not folded
    apply_weight_norm(f.fc1)
    parametrize.register_parametrization(f.fc1, "weight", nn.Identity())
    with pytest.raises(ValueError, match=r"Linear\.weight holds weight norm with other parametrizations "
                                         r"\(_WeightNorm, Identity\)"):
        remove_weight_norm(f.fc1)


# -- refused cases ----------------------------------------------------------------------------------------
def test_weight_norm_is_refused_naming_what_to_do_and_nothing_changes():
    f = MLPCell()
    apply_weight_norm(f.fc2)
    with pytest.raises(ValueError, match=r"fc2\.weight \(Linear\) is already parametrized \(_WeightNorm\).*"
                                         r"weight_norm=False.*--no-weight-norm.*remove_weight_norm"):
        apply_spectral_norm(f)
    assert not parametrize.is_parametrized(f.fc1)           # checked before anything changed
    with pytest.raises(ValueError, match=r"weight_norm=False"):
        DEQLayer(f, spectral_norm=True)
    apply_spectral_norm(f.fc1)
    with pytest.raises(ValueError, match=r"Linear\.weight is already spectral-normalized.*remove_spectral_norm"):
        apply_spectral_norm(f.fc1)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(n_power_iterations=0), ValueError, r"n_power_iterations must be an int >= 1, got 0"),
    (dict(n_power_iterations=1.5), TypeError, r"n_power_iterations must be an int >= 1, got 1.5"),
    (dict(clip=0.0), ValueError, r"clip must be a finite number > 0 or None, got 0.0"),
    (dict(clip=-1), ValueError, r"clip must be a finite number > 0 or None, got -1.0"),
    (dict(scale=0), ValueError, r"scale must be a finite number > 0 or None, got 0.0"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite number > 0 or None, got nan"),
    (dict(scale="1"), TypeError, r"scale must be a number > 0 or None, got '1'"),
    (dict(eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    (dict(conv_mode="operator"), ValueError, r"conv_mode must be one of \['kernel'\], got 'operator'"),
    (dict(learn_scale=1), TypeError, r"learn_scale must be bool"),
    (dict(types=(nn.Conv2d,)), ValueError, r"no submodule of MLPCell is one of \['Conv2d'\]"),
    (dict(types=(int,)), TypeError, r"types must be nn.Module subclasses"),
    (dict(name="bias2"), ValueError, r"fc1 \(Linear\) has no parameter named 'bias2'"),
])
def test_bad_arguments_are_refused_naming_the_value_and_what_is_accepted(kwargs, exc, pattern):
    f = MLPCell()
    with pytest.raises(exc, match=pattern):
        apply_spectral_norm(f, **kwargs)
    assert not parametrize.is_parametrized(f.fc1)


# -- DEQConfig and the plugins ----------------------------------------------------------------------------
def test_config_fields_flags_and_validation():
    cfg = DEQConfig()
    assert (cfg.spectral_norm, cfg.spectral_norm_scale, cfg.spectral_norm_learn_scale, cfg.spectral_norm_clip) == \
        (False, None, False, None)
    parser = add_deq_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--spectral-norm", "--spectral-norm-scale", "0.9", "--spectral-norm-learn-scale",
                            "--spectral-norm-clip", "0.95"])
    cfg = config_from_args(ns)
    assert (cfg.spectral_norm, cfg.spectral_norm_scale, cfg.spectral_norm_learn_scale, cfg.spectral_norm_clip) == \
        (True, 0.9, True, 0.95)
    with pytest.raises(ValueError, match=r"spectral_norm_scale must be > 0.0, got 0.0"):
        DEQConfig(spectral_norm=True, spectral_norm_scale=0.0)
    with pytest.raises(ValueError, match=r"spectral_norm_clip must be > 0.0, got -1.0"):
        DEQConfig(spectral_norm=True, spectral_norm_clip=-1.0)
    with pytest.warns(UserWarning, match=r"spectral_norm=False does not use spectral_norm_scale=0.5"):
        DEQConfig(spectral_norm_scale=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DEQConfig(spectral_norm=True, spectral_norm_scale=0.5)


def test_a_config_built_layer_normalizes_every_linear_map_of_f():
    cfg = DEQConfig(spectral_norm=True, spectral_norm_scale=0.9, f_max_iter=6, b_max_iter=6)
    f = MLPCell()
    layer = DEQLayer(f, cfg)
    assert {id(m) for m in _sn_modules(f)} == {id(f.fc1), id(f.fc2)}
    x = torch.randn(3, 16)
    for _ in range(2):
        z, _ = layer(x)
        z.sum().backward()
    _converge([f.fc1, f.fc2])
    for m in (f.fc1, f.fc2):
        assert abs(_matrix_norm(m.weight) - 0.9) < 1e-4
    assert not _sn_modules(DEQLayer(MLPCell(), f_max_iter=6).f)


def test_timm_mdeq_with_spectral_norm_instead_of_weight_norm():
    import timm

    import timm_deq  # noqa: F401  (registers the models)

    with pytest.raises(ValueError, match=r"already parametrized \(_WeightNorm\).*weight_norm=False"):
        timm.create_model("mdeq_tiny_cifar", spectral_norm=True)
    model = timm.create_model("mdeq_tiny_cifar", weight_norm=False, spectral_norm=True, f_max_iter=3, b_max_iter=3,
                              jac_freq=0.0)
    cell = model.deq.f
    convs = [m for m in cell.modules() if isinstance(m, nn.Conv2d)]
    assert convs and {id(m) for m in _sn_modules(cell)} == {id(m) for m in convs}
    assert not _sn_modules(model.stem)                      # only f is normalized
    x = torch.randn(2, 3, 16, 16)
    model.train()
    us = [_sn(m).u.clone() for m in convs]
    for _ in range(2):
        model(x).logsumexp(-1).sum().backward()
    for m, u in zip(convs, us):
        assert not torch.equal(_sn(m).u, u)
        # The estimate is a lower bound of the kernel's norm, so the normalized norm is >= 1.
        assert _matrix_norm(m.weight) >= 1 - 1e-5
    _converge(convs, steps=400)
    for m in convs:
        assert abs(_matrix_norm(m.weight) - 1.0) < 1e-3
