"""Fixed-point correction: the states along the solve, their phantom gradients, the weighted loss."""
import argparse
import copy
import dataclasses
import warnings

import pytest
import torch

from deq_core import (DEQConfig, DEQLayer, DEQStatsMeter, StateSpec, add_deq_args, config_from_args,
                      fixed_point_correction)
from deq_core.correction import correction_steps
from tests._maps import TanhCell, TwoScaleCell

# A tolerance no solve reaches: every sample runs to the limit.
NEVER_STOP = dict(f_tol=1e-30, check_every=1)


def _recorded_solve(layer, f, x, spec, max_iter=None):
    """The layer's training solve run separately on a map that records every argument it is called with."""
    calls = []

    def fn(v):
        calls.append(v.detach().clone())
        return spec.pack(f(spec.unpack(v, torch.float64), x), torch.float64)

    solve = layer.config.forward_solve(training=True)
    if max_iter is not None:
        solve = dataclasses.replace(solve, max_iter=max_iter)
    z0 = spec.pack(f.init_state(x), torch.float64)
    with torch.no_grad():
        return calls, solve.run(fn, z0, precision=torch.float64)


def _chain(f, z, x, steps, damping):
    """The phantom chain from z written out: z <- z + damping (f(z) - z), under autograd."""
    for _ in range(steps):
        z = z + damping * (f(z, x) - z)
    return z


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_states_are_the_solver_iterates_at_the_steps(solver):
    f = TanhCell(8, 5, scale=0.9)
    x = torch.randn(3, 5, dtype=torch.float64)
    layer = DEQLayer(f, f_solver=solver, f_max_iter=12, fp_correction_steps="1,2,5,12", **NEVER_STOP)
    out, stats = layer(x)
    calls, result = _recorded_solve(layer, f, x, StateSpec(out))
    assert len(calls) == 12 and stats.correction_steps == (1, 2, 5, 12)
    assert torch.equal(calls[0], torch.zeros(3, 8, dtype=torch.float64))  # the 1st call's argument is z0
    for k, state in zip(stats.correction_steps, stats.correction_states):
        assert state.dtype == out.dtype and state.shape == out.shape
        assert torch.equal(state.detach(), calls[k - 1])
    assert torch.equal(out.detach(), f(result.z, x))  # the output is unchanged: f(z*)


def test_fixed_point_state_at_step_k_is_f_applied_k_minus_1_times_and_the_last_iterate_of_a_k_step_solve():
    f = TanhCell(8, 5, scale=0.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    steps = (1, 3, 4, 7)
    layer = DEQLayer(f, f_solver="fixed_point", f_max_iter=10, fp_correction_steps=steps, **NEVER_STOP)
    out, stats = layer(x)
    spec = StateSpec(out)
    for k, state in zip(steps, stats.correction_states):
        z = f.init_state(x)
        with torch.no_grad():
            for _ in range(k - 1):
                z = f(z, x)
        assert torch.equal(state.detach(), z)
        # A solve limited to k evaluations ends at this iterate (residuals of a contraction fall
        # at every step, so its last iterate is its best one) and returns f of it.
        _, short = _recorded_solve(layer, f, x, spec, max_iter=k)
        assert torch.equal(short.z, z) and torch.equal(short.fz, f(z, x).detach())


def test_a_sample_that_stopped_before_step_k_has_its_z_star_there():
    f = TanhCell(8, 5, scale=0.3)
    x = torch.randn(4, 5, dtype=torch.float64)
    layer = DEQLayer(f, f_solver="fixed_point", f_max_iter=30, f_tol=1e-6, check_every=1,
                     fp_correction_steps="2,6,12,25")
    out, stats = layer(x)
    calls, result = _recorded_solve(layer, f, x, StateSpec(out))
    f_steps = stats.f_steps
    # The solve stopped before step 25, and some samples (not all) before its last call, step 12.
    assert len(calls) == 12 and 0 < int((f_steps < 12).sum()) < 4
    for k, state in zip(stats.correction_steps, stats.correction_states):
        for b in range(4):
            expected = calls[k - 1][b] if k <= len(calls) and int(f_steps[b]) >= k else result.z[b]
            assert torch.equal(state[b].detach(), expected), (k, b)
    assert torch.equal(stats.correction_states[-1].detach(), result.z)  # step 25 was never reached


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_each_state_has_the_phantom_gradient_from_it(backward):
    f = TanhCell(8, 5, scale=0.8)
    x = torch.randn(3, 5, dtype=torch.float64)
    layer = DEQLayer(f, f_solver="anderson", f_max_iter=9, backward=backward, fp_correction_states=3,
                     phantom_steps=4, phantom_damping=0.7, **NEVER_STOP)
    x_leaf = x.clone().requires_grad_()
    out, stats = layer(x_leaf)
    assert stats.correction_steps == (3, 6)
    params = list(f.parameters())
    for state in stats.correction_states:
        w = torch.randn_like(state)
        got = torch.autograd.grad((state * w).sum(), params + [x_leaf], retain_graph=True)
        x_ref = x.clone().requires_grad_()
        end = _chain(f, state.detach(), x_ref, 4, 0.7)
        want = torch.autograd.grad((end * w).sum(), params + [x_ref])
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_the_output_and_its_gradient_are_unchanged_and_one_state_is_todays_loss(backward):
    f = TanhCell(8, 5, scale=0.8)
    x = torch.randn(3, 5, dtype=torch.float64)
    target = torch.randn(3, 8, dtype=torch.float64)

    def loss_fn(z):
        return ((z - target) ** 2).mean()

    def run(**correction):
        layer = DEQLayer(f, f_max_iter=8, backward=backward, **correction)
        out, stats = layer(x)
        states = [*(stats.correction_states or []), out]
        loss = fixed_point_correction(states, loss_fn, layer.config.fp_correction_gamma)
        return out, stats, loss, torch.autograd.grad(loss, list(f.parameters()), retain_graph=True), \
            torch.autograd.grad(loss_fn(out), list(f.parameters()))

    out0, stats0, loss0, grads0, _ = run()
    out1, stats1, loss1, grads1, _ = run(fp_correction_states=1)
    assert stats0.correction_states is None and stats1.correction_states == [] and stats1.correction_steps == ()
    assert torch.equal(out0, out1) and torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    out3, stats3, loss3, grads3, output_grads3 = run(fp_correction_states=3)
    assert torch.equal(out0, out3) and len(stats3.correction_states) == 2
    assert all(torch.equal(a, b) for a, b in zip(grads0, output_grads3))  # the output's own gradient
    assert not all(torch.equal(a, b) for a, b in zip(grads0, grads3))  # the corrections add to it


def test_a_structured_state_gets_its_structure_values_and_gradients():
    f = TwoScaleCell()
    x = torch.randn(2, 6, dtype=torch.float64)
    layer = DEQLayer(f, f_solver="broyden", f_max_iter=8, fp_correction_steps="2,5", backward="phantom",
                     phantom_steps=3, **NEVER_STOP)
    out, stats = layer(x)
    spec = StateSpec(out)
    calls, _ = _recorded_solve(layer, f, x, spec)
    params = list(f.parameters())
    for k, state in zip((2, 5), stats.correction_states):
        assert isinstance(state, list) and [t.shape for t in state] == [t.shape for t in out]
        assert torch.equal(spec.pack(state, torch.float64).detach(), calls[k - 1])
        ws = [torch.randn_like(t) for t in state]
        got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(state, ws)), params, retain_graph=True)
        end = _chain(lambda z, v: spec.pack(f(spec.unpack(z, torch.float64), v), torch.float64),
                     calls[k - 1], x, 3, layer.config.phantom_damping)
        want = torch.autograd.grad((end * spec.pack(ws, torch.float64)).sum(), params)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-12)


def test_uniform_steps_follow_the_pass_limit():
    cfg = DEQConfig(f_max_iter=30, fp_correction_states=4)
    assert correction_steps(cfg, 30) == (7, 15, 22) and correction_steps(cfg, 20) == (5, 10, 15)
    assert correction_steps(DEQConfig(fp_correction_states=1), 30) == ()
    assert correction_steps(DEQConfig(), 30) is None
    f = TanhCell(8, 5)
    layer = DEQLayer(f, f_max_iter=10, f_max_iter_jitter=4, fp_correction_states=2, **NEVER_STOP)
    for _ in range(4):
        _, stats = layer(torch.randn(2, 5, dtype=torch.float64))
        assert stats.correction_steps == (stats.f_max_iter // 2,)


def test_no_states_in_eval_without_grad_in_pretraining_or_unrolled():
    f = TanhCell(8, 5)
    x = torch.randn(2, 5, dtype=torch.float64)
    layer = DEQLayer(f, f_max_iter=6, fp_correction_states=3)
    with torch.no_grad():
        assert layer(x)[1].correction_states is None
    layer.eval()
    assert layer(x)[1].correction_states is None
    pre = DEQLayer(f, f_max_iter=6, fp_correction_states=3, pretrain_steps=5)
    stats = pre(x)[1]
    assert stats.mode == "unrolled" and stats.correction_states is None and stats.correction_steps is None
    with pytest.warns(UserWarning, match="backward='unrolled' does not use fp_correction_states=3"):
        unrolled = DEQLayer(f, backward="unrolled", fp_correction_states=3)
    assert unrolled(x)[1].correction_states is None


def test_stats_consumers_and_copies():
    f = TanhCell(8, 5)
    layer = DEQLayer(f, f_max_iter=6, fp_correction_states=3, **NEVER_STOP)
    out, stats = layer(torch.randn(2, 5, dtype=torch.float64))
    assert stats.backward_summary().shape == (6,)
    meter = DEQStatsMeter()
    meter.update(stats)
    assert meter.summary()["f_steps"] == 6.0
    kept = stats.detach()
    assert all(not s.requires_grad for s in kept.correction_states)
    assert all(s.requires_grad for s in stats.correction_states)
    clone = copy.deepcopy(stats)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr()
               for a, b in zip(clone.correction_states, stats.correction_states))
    assert clone.correction_steps == (2, 4) and clone.correction_gamma == 0.8
    assert "correction_states" not in repr(stats)


def test_fixed_point_correction_weights():
    values = [torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)]
    total = fixed_point_correction(values, lambda v: v * 1.0, 0.5)
    assert float(total) == 0.25 * 2.0 + 0.5 * 3.0 + 5.0
    single = torch.tensor(1.2345678)
    assert torch.equal(fixed_point_correction([single], lambda v: v.sin(), 0.8), single.sin())
    with pytest.raises(ValueError, match="at least one state"):
        fixed_point_correction([], lambda v: v, 0.8)


@pytest.mark.parametrize("values, exc, pattern", [
    ({"fp_correction_steps": "0,3"}, ValueError, r"fp_correction_steps must be comma-separated solver steps, "
                                                 r"integers in 1\.\.f_max_iter=30, strictly increasing"),
    ({"fp_correction_steps": "5,3"}, ValueError, r"fp_correction_steps must be .*strictly increasing.*got '5,3'"),
    ({"fp_correction_steps": "3,3"}, ValueError, r"fp_correction_steps must be .*got '3,3'"),
    ({"fp_correction_steps": "31"}, ValueError, r"fp_correction_steps must be .*1\.\.f_max_iter=30.*got '31'"),
    ({"fp_correction_steps": "4,x"}, ValueError, r"fp_correction_steps must be .*got '4,x'"),
    ({"fp_correction_steps": [2, 2.5]}, TypeError, r"fp_correction_steps must hold integer solver steps, got 2.5"),
    ({"fp_correction_steps": 3}, TypeError, r"fp_correction_steps must be str"),
    ({"fp_correction_states": -1}, ValueError, r"fp_correction_states must be >= 0"),
    ({"fp_correction_states": 31}, ValueError, r"fp_correction_states must be <= the shortest training forward "
                                               r"limit, f_max_iter = 30"),
    ({"fp_correction_states": 9, "f_max_iter": 10, "f_max_iter_jitter": 2}, ValueError,
     r"fp_correction_states must be <= .*f_max_iter - f_max_iter_jitter = 10 - 2 = 8"),
    ({"fp_correction_states": 2, "fp_correction_steps": "5"}, ValueError,
     r"set fp_correction_states .* or fp_correction_steps .*, not both"),
    ({"fp_correction_states": 2, "fp_correction_gamma": 0.0}, ValueError, r"fp_correction_gamma must be > 0.0"),
    ({"fp_correction_states": 2, "fp_correction_gamma": 1.5}, ValueError, r"fp_correction_gamma must be .*<= 1.0"),
])
def test_invalid_correction_options_name_the_field(values, exc, pattern):
    with pytest.raises(exc, match=pattern):
        DEQConfig.from_dict(values)


def test_steps_forms_and_command_line():
    assert DEQConfig(fp_correction_steps=[3, 7]).fp_correction_steps == "3,7"
    assert DEQConfig(fp_correction_steps=" 3, 7 ").fp_correction_steps == "3,7"
    assert correction_steps(DEQConfig(fp_correction_steps="3,7"), 20) == (3, 7)
    assert not DEQConfig().fp_correction and DEQConfig(fp_correction_steps="3").fp_correction
    parser = add_deq_args(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--fp-correction-steps", "4,9", "--fp-correction-gamma", "0.5"]))
    assert (cfg.fp_correction_steps, cfg.fp_correction_gamma) == ("4,9", 0.5)
    cfg = config_from_args(parser.parse_args(["--fp-correction-states", "3"]))
    assert correction_steps(cfg, 30) == (10, 20) and cfg == DEQConfig.from_dict(cfg.to_dict())


def test_warnings_when_set_while_off_and_none_when_read():
    with pytest.warns(UserWarning, match=r"fixed-point correction is off .* does not use fp_correction_gamma=0.5"):
        DEQConfig(fp_correction_gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DEQConfig(fp_correction_states=2, fp_correction_gamma=0.5)
        # The implicit mode reads the phantom steps when correction is on.
        DEQConfig(fp_correction_steps="2", phantom_steps=3, phantom_damping=0.5)
    with pytest.warns(UserWarning, match="backward='implicit' does not use phantom_steps=3"):
        DEQConfig(phantom_steps=3)


class _TinyDEQNet(torch.nn.Module):
    """A classifier around one equilibrium layer, with the state-to-logits hook the timm task uses."""

    def __init__(self, hook=True, **deq):
        super().__init__()
        self.stem = torch.nn.Linear(5, 5)
        self.deq = DEQLayer(TanhCell(8, 5, dtype=torch.float32), **deq)
        self.fc = torch.nn.Linear(8, 3)
        if not hook:
            self.forward_from_deq_state = None

    def forward_from_deq_state(self, z):
        return self.fc(z)

    def forward(self, x):
        return self.fc(self.deq(self.stem(x))[0])


def test_timm_task_adds_the_weighted_criterion_of_the_correction_states():
    pytest.importorskip("timm")
    from timm_deq import DEQClassificationTask

    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    model = _TinyDEQNet(f_max_iter=6, fp_correction_states=3, fp_correction_gamma=0.5)
    task = DEQClassificationTask(model, verbose=False).train()
    result = task(x, target)
    stats = model.deq.stats
    assert stats.correction_steps == (2, 4)
    ce = torch.nn.functional.cross_entropy
    want = result["task_loss"] + 0.25 * ce(model.fc(stats.correction_states[0]), target) \
        + 0.5 * ce(model.fc(stats.correction_states[1]), target)
    torch.testing.assert_close(result["loss"], want)
    torch.testing.assert_close(result["correction_term"], (want - result["task_loss"]).detach())
    result["loss"].backward()
    assert model.stem.weight.grad is not None

    off = DEQClassificationTask(_TinyDEQNet(f_max_iter=6), verbose=False).train()(x, target)
    assert torch.equal(off["loss"], off["task_loss"]) and float(off["correction_term"]) == 0.0
    one = DEQClassificationTask(_TinyDEQNet(f_max_iter=6, fp_correction_states=1), verbose=False).train()(x, target)
    assert torch.equal(one["loss"], one["task_loss"])
    with pytest.raises(ValueError, match="no forward_from_deq_state"):
        DEQClassificationTask(_TinyDEQNet(hook=False, f_max_iter=6, fp_correction_states=2), verbose=False).train()(
            x, target)


def test_fairseq_correction_terms_apply_the_decoder_hook_and_the_criterion():
    pytest.importorskip("fairseq")
    from fairseq_deq.criterions.deq_terms import add_correction_terms

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8, dtype=torch.float64)

        def features_from_deq_state(self, z):
            return self.norm(z)

    decoder = Decoder()
    layer = DEQLayer(TanhCell(8, 5), f_max_iter=6, fp_correction_steps="1,3", fp_correction_gamma=0.5)
    z, stats = layer(torch.randn(2, 5, dtype=torch.float64))

    def summed(features):
        return features.square().sum()

    loss = summed(decoder.norm(z))
    log = {}
    total = add_correction_terms(loss, (z, {"deq_stats": stats}), decoder, summed, log)
    want = 0.25 * summed(decoder.norm(stats.correction_states[0])) + 0.5 * summed(
        decoder.norm(stats.correction_states[1])) + loss
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(log["deq_fp_correction"], (want - loss).detach())
    assert add_correction_terms(loss, (z, {"deq_stats": stats}), decoder, summed, {}, reduce=False) is loss
    with pytest.raises(ValueError, match="features_from_deq_state"):
        add_correction_terms(loss, (z, {"deq_stats": stats}), torch.nn.Module(), summed, {})
    with torch.no_grad():
        _, plain = layer(torch.randn(2, 5, dtype=torch.float64))
    assert add_correction_terms(loss, (z, {"deq_stats": plain}), decoder, summed, {}) is loss


def test_fairseq_deq_terms_refuse_correction_states_no_loss_uses():
    pytest.importorskip("fairseq")
    from fairseq_deq.criterions.deq_terms import add_deq_terms

    layer = DEQLayer(TanhCell(8, 5), f_max_iter=6, fp_correction_states=2)
    z, stats = layer(torch.randn(2, 5, dtype=torch.float64))
    loss = z.sum()
    with pytest.raises(ValueError, match="applies fixed-point correction to summed losses"):
        add_deq_terms(loss, (z, {"deq_stats": stats}), 2, {}, "cross_entropy_jr")
    assert add_deq_terms(loss, (z, {"deq_stats": stats}), 2, {"deq_fp_correction_calls": 1}, "x") is loss


def test_mdeq_correction_through_the_timm_task_keeps_the_running_statistics_of_the_fixed_point():
    timm = pytest.importorskip("timm")
    import timm_deq  # noqa: F401  (registers the models)
    from timm_deq import DEQClassificationTask

    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", num_classes=4, fp_correction_states=3, pretrain_steps=0)
    plain = copy.deepcopy(model)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    task = DEQClassificationTask(model, verbose=False).train()
    torch.manual_seed(1)  # the same variational-dropout masks in both models' passes
    result = task(x, target)
    stats = model.deq_stats
    assert len(stats.correction_states) == 2 and all(len(z) == 4 for z in stats.correction_states)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        logits = [model.forward_from_deq_state(z) for z in stats.correction_states]
    want = result["task_loss"] + sum(0.8 ** (2 - k) * ce(v, target) for k, v in enumerate(logits))
    torch.testing.assert_close(result["loss"].detach(), want.detach())
    result["loss"].backward()
    # The head's BatchNorms saw the correction states with batch statistics, but their running
    # statistics are those the output's pass alone gives.
    torch.manual_seed(1)
    plain.train()(x)
    for (name, a), b in zip(model.named_buffers(), plain.buffers()):
        if "running" in name or "num_batches" in name:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("criterion", ["cross_entropy_jr", "adaptive_loss_jr"])
def test_fairseq_criterions_apply_correction_to_the_decoder_features_of_the_states(tmp_path, criterion):
    pytest.importorskip("fairseq")
    from tests._fairseq_helpers import VOCAB, build, write_dictionary

    extra = ("--adaptive-softmax-cutoff", "10,20", "--ddp-backend", "legacy_ddp") if criterion == "adaptive_loss_jr" \
        else ()
    cfg, task, model = build(write_dictionary(tmp_path), "--arch", "deq_transformer_lm_tiny", "--task",
                             "language_modeling", "--tokens-per-sample", "16", "--criterion", criterion,
                             "--fp-correction-states", "2", "--jac-freq", "0", *extra)
    tokens = torch.randint(4, VOCAB + 4, (2, 17), generator=torch.Generator().manual_seed(0))
    sample = {"net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((2,), 16)},
              "target": tokens[:, 1:].contiguous(), "ntokens": 32, "id": torch.arange(2)}
    crit = task.build_criterion(cfg.criterion)
    model.train()
    torch.manual_seed(1)
    loss, _, log = crit(model, sample)
    assert float(log["deq_fp_correction"]) > 0
    torch.testing.assert_close(loss.detach().reshape(()), (log["loss"] + log["deq_fp_correction"]).reshape(()))
    loss.backward()
    assert model.decoder.embed_tokens.weight.grad is not None
