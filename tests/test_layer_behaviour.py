"""Memory, precision, stabilizers, statistics and input checking of the equilibrium layer."""
import copy
import warnings

import pytest
import torch
from torch import nn

from deq_core import BACKWARD_SUMMARY, DEQLayer, DEQStats, VariationalDropout, apply_weight_norm, remove_weight_norm
from tests._dtype_spy import register_dtype_spy
from tests._maps import MLPCell, TanhCell


def _saved_bytes(layer, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


def test_implicit_memory_does_not_grow_with_iterations_unrolled_grows_linearly():
    f = MLPCell()
    x = torch.randn(4, 10, 16)
    implicit = [_saved_bytes(DEQLayer(f, f_max_iter=n, f_tol=1e-9), x) for n in (6, 12, 40)]
    assert implicit[0] == implicit[1] == implicit[2] > 0
    unrolled = [_saved_bytes(DEQLayer(f, backward="unrolled", unrolled_layers=n), x) for n in (3, 6, 12)]
    assert unrolled[1] - unrolled[0] > 0
    assert unrolled[2] - unrolled[1] == 2 * (unrolled[1] - unrolled[0])
    assert implicit[1] * 8 <= unrolled[2]


@pytest.fixture(scope="module")
def dtype_spy():
    return register_dtype_spy()


def test_bf16_autocast_keeps_solver_state_float32_and_gradients_close(dtype_spy):
    f = MLPCell()
    x = torch.randn(4, 10, 16)
    weight = torch.randn(4, 10, 16)
    opts = dict(f_solver="dtype_spy", f_solver_options={}, b_solver="dtype_spy", b_solver_options={},
                f_max_iter=40, f_tol=1e-2, f_stop_mode="rel", b_max_iter=40, b_tol=1e-6, jac_weight=1.0)

    def grads(autocast):
        torch.manual_seed(1)  # the same JR probes in both runs
        layer = DEQLayer(f, **opts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z, stats = layer(x)
            loss = (z.float() * weight).mean() + stats.jr_term
        gs = torch.autograd.grad(loss, list(f.parameters()))
        return gs, stats

    ref, _ = grads(False)
    dtype_spy.state.clear(), dtype_spy.outputs.clear()
    low, stats = grads(True)
    assert dtype_spy.state == {torch.float32} and dtype_spy.outputs == {torch.float32}
    assert stats.f_abs_res.dtype == torch.float32 and stats.b_abs_res.dtype == torch.float32
    assert torch.isfinite(stats.jac_frobenius) and bool(stats.f_converged.all())
    for a, b in zip(low, ref):
        assert torch.isfinite(a).all()
        assert float((a - b).norm() / b.norm()) < 0.05


def test_half_precision_f_with_float32_solver_state(dtype_spy):
    f = MLPCell().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    dtype_spy.state.clear()
    layer = DEQLayer(f, f_solver="dtype_spy", f_solver_options={}, f_max_iter=30, f_tol=1e-2)
    z, stats = layer(x)
    z.float().sum().backward()
    assert z.dtype == torch.bfloat16 and dtype_spy.state == {torch.float32}
    assert stats.b_abs_res.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in f.parameters())


def test_weight_norm_is_computed_once_per_pass_and_gradients_are_exact():
    f = apply_weight_norm(MLPCell())
    calls = []
    for m in (f.fc1, f.fc2):
        m.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 4, 16)
    layer = DEQLayer(f, f_max_iter=20)
    z, stats = layer(x)
    assert len(calls) == 2 and int(stats.f_steps.max()) > 2  # one per module, not per iteration
    z.sum().backward()
    assert f.fc1.parametrizations.weight.original0.grad is not None
    # Unrolled through the layer equals autograd through f called on its own (no caching).
    ref_f = copy.deepcopy(f)
    ref_f.zero_grad()
    z, _ = DEQLayer(f, backward="unrolled", unrolled_layers=3)(x)
    ref_z = torch.zeros_like(x)
    for _ in range(3):
        ref_z = ref_f(ref_z, x)
    ref_z.pow(2).sum().backward()
    assert torch.allclose(z, ref_z, atol=1e-6)
    f.zero_grad()
    DEQLayer(f, backward="unrolled", unrolled_layers=3)(x)[0].pow(2).sum().backward()
    for (name, p), q in zip(f.named_parameters(), ref_f.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    assert set(dict(f.named_parameters())) >= {"fc1.parametrizations.weight.original0",
                                                "fc1.parametrizations.weight.original1"}
    remove_weight_norm(f)
    assert isinstance(f.fc1.weight, nn.Parameter)


def test_weight_norm_rejects_bad_targets():
    with pytest.raises(ValueError, match="no submodule of ReLU"):
        apply_weight_norm(nn.ReLU())
    lin = apply_weight_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already parametrized"):
        apply_weight_norm(lin)


def test_variational_dropout_one_mask_per_pass():
    f = MLPCell(dropout=0.3).double()
    masks = []
    f.drop.register_forward_hook(lambda m, i, o: masks.append(m._mask.clone()) if m._in_pass else None)
    layer = DEQLayer(f, f_max_iter=8, f_tol=1e-12)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    layer(x)
    first = masks[:]
    assert len(first) == 9  # 8 solver iterations + the grad-carrying call
    assert all(torch.equal(m, first[0]) for m in first)
    assert first[0].dtype == torch.float64 and first[0].shape == (2, 1, 16)
    assert set(first[0].unique().tolist()) <= {0.0, 1 / 0.7}
    masks.clear()
    layer(x)
    assert not torch.equal(masks[0], first[0])
    assert f.drop._mask is None  # released after the pass
    out1, out2 = f.drop(torch.ones(2, 6, 16)), f.drop(torch.ones(2, 6, 16))
    assert not torch.equal(out1, out2)  # outside a pass: fresh masks
    f.eval()
    assert torch.equal(f.drop(x), x)


def test_variational_dropout_argument_checks():
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\), got 1.0"):
        VariationalDropout(1.0)
    with pytest.raises(ValueError, match="shared_dims"):
        VariationalDropout(0.1, shared_dims=(0,))


def test_stats_to_dict_and_detached_copies():
    layer = DEQLayer(TanhCell(4, 3), jac_weight=1.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    z, stats = layer(x)
    z.sum().backward()
    d = stats.to_dict()
    assert set(d) >= {"f_steps", "f_steps_max", "f_abs_res", "f_rel_res", "f_diverged", "f_converged",
                      "b_steps", "b_abs_res", "jac_frobenius", "jac_weight", "f_max_iter"}
    assert all(isinstance(v, float) for v in d.values())
    assert d["f_steps"] == float(stats.f_steps.double().mean())
    means = stats.means()
    assert all(t.dim() == 0 and t.dtype == torch.float32 and not t.requires_grad for t in means.values())
    assert {k: float(v) for k, v in means.items()} == {k: d[k] for k in means}
    assert isinstance(stats, DEQStats) and layer.stats is stats
    clone = copy.deepcopy(layer)  # stats hold a graph; copying the module still works
    assert clone.stats.jac_frobenius.grad_fn is None
    assert not bool(stats.diverged)
    _, fresh = layer(x)
    assert "b_steps" not in fresh.means() and "f_steps" in fresh.means()  # before its backward


def test_backward_summary_is_filled_in_place_by_backward():
    layer = DEQLayer(TanhCell(4, 3))
    z, stats = layer(torch.randn(2, 3, dtype=torch.float64))
    summary = stats.backward_summary()  # a logger may hold this before backward() runs
    assert stats.backward_summary() is summary
    assert BACKWARD_SUMMARY == ("ran", "b_steps", "b_abs_res", "b_rel_res", "b_stalled", "b_diverged")
    assert summary.tolist() == [0.0] * 6
    z.sum().backward()
    assert summary[0] == 1.0 and summary[1] == stats.b_steps.float().mean()
    assert torch.allclose(summary[2:4], torch.stack([stats.b_abs_res.mean(), stats.b_rel_res.mean()]).float())
    assert summary[4:].tolist() == [0.0, 0.0]  # float64: never stalled; a contraction: never diverged
    z, late = layer(torch.randn(2, 3, dtype=torch.float64))
    z.sum().backward()
    assert torch.equal(late.backward_summary()[1], late.b_steps.float().mean())  # asked for after backward
    with torch.no_grad():
        assert layer(torch.randn(2, 3, dtype=torch.float64))[1].backward_summary().tolist() == [0.0] * 6


def test_initial_state_sources():
    f = MLPCell()
    x = torch.randn(2, 3, 16)
    layer = DEQLayer(f, f_max_iter=50, f_tol=1e-6)
    z_default, _ = layer(x)
    z_warm, stats = layer(x, z0=z_default.detach())
    assert int(stats.f_steps.max()) <= 2
    assert torch.allclose(z_warm, z_default, atol=1e-4)


class _Wrong(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, z, x):
        if self.mode == "shape":
            return z[:, :-1]
        if self.mode == "dtype":
            return z.double()
        return [z, z]


@pytest.mark.parametrize("mode, exc, pattern", [
    ("shape", ValueError, r"f's output has structure \(2, 3\), expected \(2, 4\)"),
    ("dtype", TypeError, r"f returned dtype torch.float64 for a state of dtype torch.float32"),
    ("list", ValueError, r"f's output has structure \[\(2, 4\), \(2, 4\)\], expected \(2, 4\)"),
])
def test_f_returning_the_wrong_thing(mode, exc, pattern):
    with pytest.raises(exc, match=pattern):
        DEQLayer(_Wrong(mode))(torch.randn(2, 4))


def test_bad_inputs_raise_readable_errors():
    layer = DEQLayer(TanhCell(4, 3))
    x = torch.randn(2, 3, dtype=torch.float64)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in input 0"):
        layer(bad)
    with pytest.raises(ValueError, match=r"non-finite values .* in z0\[0\]"):
        layer(x, z0=torch.full((2, 4), float("inf"), dtype=torch.float64))
    with pytest.raises(RuntimeError):  # f itself rejects a state it cannot multiply
        layer(x, z0=torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z0\[1\] has batch size 3 but z0\[0\] has 2"):
        DEQLayer(nn.Identity())(x, z0=[torch.zeros(2, 4), torch.zeros(3, 4)])
    with pytest.raises(TypeError, match="z0 must be a tensor or a non-empty list/tuple"):
        layer(x, z0="zeros")
    with pytest.raises(TypeError, match="f must be an nn.Module"):
        DEQLayer(lambda z, x: z)
    with pytest.raises(ValueError, match=r"unknown DEQ option\(s\): 'max_iter'"):
        DEQLayer(TanhCell(4, 3), max_iter=3)
    with pytest.raises(ValueError, match="no initial state"):
        DEQLayer(nn.Identity())("not a tensor")


def test_a_diverging_layer_reports_it():
    class Explode(nn.Module):
        def forward(self, z, x):
            return 3.0 * z + x

    layer = DEQLayer(Explode(), f_solver="fixed_point", f_solver_options={}, f_max_iter=40)
    z, stats = layer(torch.ones(2, 3))
    assert bool(stats.diverged) and stats.to_dict()["f_diverged"] == 1.0
    assert torch.isfinite(z).all()


class _LateFloat64(nn.Module):
    """Returns the state's dtype for its first ``good`` calls, then float64."""

    def __init__(self, good):
        super().__init__()
        self.good, self.calls = good, 0

    def forward(self, z, x):
        self.calls += 1
        out = 0.5 * z + x
        return out if self.calls <= self.good else out.double()


def test_f_output_dtype_is_checked_on_every_call_not_only_the_first():
    with pytest.raises(TypeError, match=r"f returned dtype torch.float64 for a state of dtype torch.float32"):
        DEQLayer(_LateFloat64(good=3), f_max_iter=10, f_tol=1e-12)(torch.randn(2, 4))


def test_overridden_changes_the_config_for_a_block_and_the_backward_keeps_its_own():
    layer = DEQLayer(TanhCell(4, 3), f_max_iter=20, b_max_iter=20)
    base = layer.config
    x = torch.randn(2, 3, dtype=torch.float64)
    layer.eval()
    with layer.overridden(eval_max_iter=2, b_max_iter=3) as same:
        assert same is layer and layer.config.eval_max_iter == 2 and layer.config.f_max_iter == 20
        z, stats = layer(x)
        assert stats.f_max_iter == 2
    assert layer.config is base
    z.sum().backward()                    # after the block: the backward uses its forward's config
    assert int(stats.b_steps.max()) <= 3
    with pytest.raises(RuntimeError, match="inside"):
        with layer.overridden(eval_max_iter=4):
            raise RuntimeError("inside")
    assert layer.config is base
    with pytest.raises(ValueError, match=r"unknown DEQ option\(s\): 'eval_max_itr'"):
        with layer.overridden(eval_max_itr=4):
            pass
    assert layer.config is base


def test_training_without_a_step_count_warns_when_the_config_depends_on_it():
    x = torch.randn(2, 3, dtype=torch.float64)
    layer = DEQLayer(TanhCell(4, 3), pretrain_steps=50, f_max_iter=3)
    with pytest.warns(RuntimeWarning, match=r"set_num_updates\(\) was never called.*pretrain_steps=50"):
        for _ in range(100):
            layer(x)
    # Told the step once, it never warns; nor does a config that does not depend on the step.
    for told, cfg in ((True, dict(pretrain_steps=50)), (False, {})):
        layer = DEQLayer(TanhCell(4, 3), f_max_iter=3, **cfg)
        if told:
            layer.set_num_updates(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(120):
                layer(x)
