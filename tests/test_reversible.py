"""The reversible mode: gradients of the coupled iteration, its reconstruction report, memory, refusals."""
import pytest
import torch
from torch import nn

from bench._memory import saved_activation_bytes
from deq_core import (DEQConfig, DEQLayer, OptionValueError, VariationalDropout, apply_weight_norm,
                      jac_frobenius_estimate)
from tests._maps import CausalCell, MLPCell, TanhCell


def _coupled(f, z0, x, beta, steps):
    """The reversible iteration written out under autograd (the reference), and f at its end."""
    y = z = z0
    for _ in range(steps):
        y = torch.lerp(y, f(z, x), beta)
        z = torch.lerp(z, f(y, x), beta)
    return z, f(z, x)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# Rounding grows by about 1/|1 - beta| per reversed step: float64 holds 1e-10 to 16 steps at
# beta = 0.5 (2^16), to 4 at 0.8 and 1.2 (5^4); bench.methods --reversible-sweep measures beyond.
@pytest.mark.parametrize("beta, steps", [(0.5, 4), (0.5, 16), (0.8, 4), (1.2, 4)])
def test_float64_gradients_equal_autograd_through_the_same_iteration(beta, steps):
    torch.manual_seed(0)
    f = TanhCell(6, 4, scale=0.7)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64)
    layer = DEQLayer(f, backward="reversible", reversible_beta=beta, reversible_steps=steps)
    out, stats = layer(x)
    tensors = [x, *f.parameters()]
    got = _grads((out * w).sum(), tensors)
    _, ref_out = _coupled(f, f.init_state(x), x, beta, steps)
    ref = _grads((ref_out * w).sum(), tensors)
    assert torch.equal(out.detach(), ref_out.detach())
    assert max(_rel(a, b) for a, b in zip(got, ref)) < 1e-10
    assert stats.mode == "reversible" and stats.f_steps.tolist() == [2 * steps + 1] * 3
    assert stats.b_steps.tolist() == [2 * steps] * 3  # vector-Jacobian products
    assert bool(torch.isfinite(stats.b_rel_res).all()) and not bool(stats.b_diverged.any())


def test_weight_norm_and_variational_dropout_are_replayed_by_the_backward_pass():
    torch.manual_seed(0)
    f = apply_weight_norm(MLPCell(dim=8, hidden=16, dropout=0.3).double())
    x = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    layer = DEQLayer(f, backward="reversible", reversible_beta=0.6, reversible_steps=6).train()
    torch.manual_seed(1)
    out, stats = layer(x)
    tensors = [x, *f.parameters()]
    got = _grads(out.pow(2).sum(), tensors)
    torch.manual_seed(1)  # the same masks: drawn at the first call of f in a pass
    from deq_core import equilibrium_pass
    with equilibrium_pass(f):
        _, ref_out = _coupled(f, torch.zeros_like(x), x, 0.6, 6)
        ref = _grads(ref_out.pow(2).sum(), tensors)
    assert torch.equal(out.detach(), ref_out.detach())
    assert max(_rel(a, b) for a, b in zip(got, ref)) < 1e-10
    assert float(stats.b_rel_res.max()) < 1e-10


def test_a_map_that_is_not_deterministic_shows_in_the_reconstruction_error():
    class Noisy(nn.Module):  # plain dropout: a new mask at every call, so no step inverts
        def __init__(self):
            super().__init__()
            self.cell, self.drop = TanhCell(6, 4), nn.Dropout(0.5)

        def init_state(self, x):
            return self.cell.init_state(x)

        def forward(self, z, x):
            return self.drop(self.cell(z, x))

    x = torch.randn(3, 4, dtype=torch.float64)
    good = DEQLayer(TanhCell(6, 4), backward="reversible", reversible_steps=6).train()
    bad = DEQLayer(Noisy(), backward="reversible", reversible_steps=6).train()
    for layer, small in ((good, True), (bad, False)):
        out, stats = layer(x)
        out.sum().backward()
        assert (float(stats.b_rel_res.max()) < 1e-12) == small
        assert stats.backward_summary()[0] == 1  # the backward ran and is reported


@pytest.mark.parametrize("steps", [4, 16, 64])
def test_memory_saved_for_backward_does_not_grow_with_the_steps(steps):
    torch.manual_seed(0)
    f = MLPCell(dim=32, hidden=64)
    x = torch.randn(4, 10, 32)
    params = list(f.parameters())
    _, reversible = saved_activation_bytes(
        lambda: DEQLayer(f, backward="reversible", reversible_steps=steps, reversible_beta=0.5)(x), params)
    _, four = saved_activation_bytes(
        lambda: DEQLayer(f, backward="reversible", reversible_steps=4, reversible_beta=0.5)(x), params)
    _, one = saved_activation_bytes(lambda: DEQLayer(f, backward="unrolled", unrolled_layers=1)(x), params)
    _, unrolled = saved_activation_bytes(
        lambda: DEQLayer(f, backward="unrolled", unrolled_layers=2 * steps + 1)(x), params)
    assert reversible == four
    # one graph of f (the output's) and three float64 states, against 2 N + 1 graphs
    assert reversible < 3 * one and unrolled > (2 * steps + 1) * one * 0.9


def test_float32_models_get_float64_reconstructions_and_the_report_shows_an_unstable_one():
    torch.manual_seed(0)
    f64 = TanhCell(16, 8, scale=0.8)
    f32 = TanhCell(16, 8, scale=0.8, dtype=torch.float32)
    f32.load_state_dict({k: v.float() for k, v in f64.state_dict().items()})
    x = torch.randn(8, 8, dtype=torch.float64)
    for beta, steps in ((0.5, 16), (0.8, 8), (1.2, 8)):
        out, stats = DEQLayer(f32, backward="reversible", reversible_beta=beta, reversible_steps=steps)(x.float())
        got = torch.autograd.grad(out.pow(2).sum(), list(f32.parameters()))
        _, ref_out = _coupled(f64, f64.init_state(x), x, beta, steps)
        ref = torch.autograd.grad(ref_out.pow(2).sum(), list(f64.parameters()))
        # float32 rounding of f alone (the iteration's states are float64): measured 1.1e-7 to 1.8e-7
        assert max(_rel(a.double(), b) for a, b in zip(got, ref)) < 1e-5
        assert float(stats.b_rel_res.max()) < 1e-6
    # past what the precision can reverse, the report says so: 5^32 times float64's rounding
    out, stats = DEQLayer(f64, backward="reversible", reversible_beta=1.2, reversible_steps=32)(x)
    out.sum().backward()
    assert float(stats.b_rel_res.min()) > 1.0


def test_jr_at_the_final_state_is_differentiated_exactly():
    torch.manual_seed(0)
    f = TanhCell(6, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer = DEQLayer(f, backward="reversible", reversible_steps=5, jac_weight=1.0, jac_probes=2).train()
    torch.manual_seed(7)
    out, stats = layer(x)
    got = _grads(out.sum() + stats.jr_term, list(f.parameters()))
    z, ref_out = _coupled(f, f.init_state(x), x, layer.config.reversible_beta, 5)
    torch.manual_seed(7)
    jac = jac_frobenius_estimate(ref_out, z, 2).mean()
    ref = _grads(ref_out.sum() + jac, list(f.parameters()))
    assert torch.allclose(stats.jac_frobenius, jac, rtol=1e-12)
    assert max(_rel(a, b) for a, b in zip(got, ref)) < 1e-10


def test_a_causal_map_stays_exactly_causal():
    torch.manual_seed(0)
    f = CausalCell(dim=4)
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    layer = DEQLayer(f, backward="reversible", reversible_steps=6, sample_dims=2)
    full, _ = layer(x)
    prefix, _ = layer(x[:, :4])
    assert torch.equal(full[:, :4], prefix)
    x_later = x.clone()
    x_later[:, 5:] += 1.0
    changed, _ = layer(x_later)
    assert torch.equal(changed[:, :5], full[:, :5])


def test_autocast_keeps_float32_states_and_runs_f_in_bfloat16():
    torch.manual_seed(0)
    f = MLPCell(dim=16, hidden=32)
    x = torch.randn(4, 6, 16)
    layer = DEQLayer(f, backward="reversible", reversible_steps=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = layer(x)
    grads = torch.autograd.grad(out.float().pow(2).sum(), list(f.parameters()))
    ref_out, _ = layer(x)
    ref = torch.autograd.grad(ref_out.pow(2).sum(), list(f.parameters()))
    assert out.dtype == torch.float32 or out.dtype == torch.bfloat16
    assert _rel(out.float(), ref_out) < 5e-2
    assert max(_rel(a, b) for a, b in zip(grads, ref)) < 1e-1
    assert bool(torch.isfinite(stats.b_rel_res).all())


def test_evaluation_and_no_grad_run_the_same_iteration():
    f = TanhCell(6, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer = DEQLayer(f, backward="reversible", reversible_steps=30, f_tol=1e-5).eval()
    with torch.no_grad():
        out, stats = layer(x)
    _, ref = _coupled(f, f.init_state(x), x, 0.5, 30)
    assert torch.equal(out, ref.detach())
    assert stats.f_converged.all() and stats.b_steps is None
    assert torch.allclose(stats.f_abs_res, (ref - _coupled(f, f.init_state(x), x, 0.5, 30)[0]).norm(dim=1))


def test_second_order_gradients_are_refused():
    f = TanhCell(4, 3)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = DEQLayer(f, backward="reversible", reversible_steps=3)(x)
    with pytest.raises(RuntimeError, match="does not support higher-order gradients"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("options, fields, message", [
    ({"reversible_beta": 1.0}, ("reversible_beta",), r"in \(0, 2\) and not 1 .*got 1.0"),
    ({"reversible_beta": 2.0}, ("reversible_beta",), r"in \(0, 2\) and not 1 .*got 2.0"),
    ({"reversible_beta": 0.0}, ("reversible_beta",), r"reversible_beta must be > 0.0"),
    ({"reversible_beta": -0.5}, ("reversible_beta",), r"reversible_beta must be > 0.0"),
    ({"reversible_steps": 0}, ("reversible_steps",), r"reversible_steps must be >= 1, got 0"),
    ({"fp_correction_states": 2}, ("fp_correction_states", "fp_correction_steps"), r"does not run fixed-point"),
    ({"spectral_norm": True}, ("spectral_norm", "backward"), r"cannot run with spectral_norm=True"),
])
def test_bad_values_are_refused_naming_the_field(options, fields, message):
    with pytest.raises(OptionValueError, match=message) as err:
        DEQConfig(backward="reversible", **options)
    assert err.value.options == fields


def test_the_forward_solvers_fields_are_reported_unread():
    with pytest.warns(UserWarning, match=r"backward='reversible' does not use f_max_iter=12"):
        DEQConfig(backward="reversible", f_max_iter=12)
    with pytest.warns(UserWarning, match=r"does not use reversible_steps=3"):
        DEQConfig(backward="implicit", reversible_steps=3)


def test_a_half_model_and_float16_autocast_under_a_grad_scaler_train_like_float32():
    torch.manual_seed(0)
    f = MLPCell(dim=16, hidden=32)
    x, w = torch.randn(4, 6, 16), torch.randn(4, 6, 16)  # (a LayerNorm output's mean square is constant)
    out, _ = DEQLayer(f, backward="reversible", reversible_steps=6)(x)
    ref = torch.autograd.grad((out * w).mean(), list(f.parameters()))
    # float16 autocast, the loss scaled as torch.amp.GradScaler scales it
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    with torch.autocast("cpu", dtype=torch.float16):
        out, stats = DEQLayer(f, backward="reversible", reversible_steps=6)(x)
    scaled = torch.autograd.grad(scaler.scale((out.float() * w).mean()), list(f.parameters()))
    grads = [g / scaler.get_scale() for g in scaled]
    assert max(_rel(a, b) for a, b in zip(grads, ref)) < 5e-3
    assert float(stats.b_rel_res.max()) < 1e-6
    # a half-precision model: states float32 for the layer, float64 for the iteration
    half = MLPCell(dim=16, hidden=32)
    half.load_state_dict(f.state_dict())
    half.half()
    out, stats = DEQLayer(half, backward="reversible", reversible_steps=6)(x.half())
    grads = torch.autograd.grad(scaler.scale((out.float() * w).mean()), list(half.parameters()))
    grads = [g / scaler.get_scale() for g in grads]
    assert out.dtype == torch.float16
    assert max(_rel(a.float(), b) for a, b in zip(grads, ref)) < 5e-3
