"""torch.compile of f inside the equilibrium layer (config ``compile_f``): the compiled solver path
matches eager, does not recompile from step to step, and stays out of state dicts and copies."""
import copy
import itertools
import pickle

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

from deq_core import DEQConfig, DEQLayer, apply_weight_norm
from tests._maps import MLPCell

pytestmark = pytest.mark.usefixtures("one_thread")

_names = itertools.count()


@pytest.fixture
def counter():
    """A torch.compile backend (registered under a fresh name) that counts compiled graphs."""
    count = CompileCounter()
    name = f"deq_test_counter_{next(_names)}"
    torch._dynamo.register_backend(count, name=name)
    return name, count


def _grads(layer, x, weight):
    torch.manual_seed(1)  # the same JR probe in every run
    x_leaf = x.clone().requires_grad_()
    z, stats = layer(x_leaf)
    loss = (z * weight).sum() + stats.jr_term
    return z, torch.autograd.grad(loss, list(layer.f.parameters()) + [x_leaf]), stats


def test_compiled_f_matches_eager_with_inductor():
    torch.manual_seed(0)
    f = apply_weight_norm(MLPCell(dim=8, hidden=16))
    x, weight = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    opts = dict(f_max_iter=15, f_tol=1e-9, b_max_iter=15, b_tol=1e-9, jac_weight=1.0, jac_freq=1.0)
    z_ref, g_ref, s_ref = _grads(DEQLayer(f, **opts), x, weight)
    z, g, stats = _grads(DEQLayer(f, **opts, compile_f=True, compile_backend="inductor"), x, weight)
    assert stats.f_steps.tolist() == s_ref.f_steps.tolist() == [15, 15, 15]
    assert stats.jac_frobenius is not None and torch.isfinite(stats.jac_frobenius)
    # float32 kernels fused differently agree to ~1e-6 relative; 1e-4 leaves room for the solver.
    assert torch.allclose(z, z_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(stats.jac_frobenius, s_ref.jac_frobenius, rtol=1e-4)
    for a, b in zip(g, g_ref):
        assert float((a - b).norm() / b.norm()) < 1e-4


def test_no_recompilation_across_training_steps(counter):
    name, count = counter
    torch.manual_seed(0)
    f = apply_weight_norm(MLPCell(dim=8, hidden=16, dropout=0.2))
    layer = DEQLayer(f, compile_f=True, compile_backend=name, f_max_iter=6, f_max_iter_jitter=4, f_tol=1e-9,
                     b_max_iter=4, jac_weight=0.5, jac_freq=0.5, seed=3)
    opt = torch.optim.SGD(f.parameters(), lr=0.05)
    x = torch.randn(4, 5, 8)
    graphs, limits, jr = [], set(), set()
    for step in range(8):
        layer.set_num_updates(step)
        z, stats = layer(x)
        (z.pow(2).mean() + stats.jr_term).backward()
        opt.step()
        opt.zero_grad()
        graphs.append(count.frame_count)
        limits.add(stats.f_max_iter)
        jr.add(stats.jac_frobenius is not None)
    assert len(limits) > 1 and jr == {True, False}   # the steps did vary
    # Two graphs in the first step (the call that draws the dropout mask and the calls that
    # reuse it), none after.
    assert graphs == [2] * 8
    assert count.op_count > 0


def test_compiled_state_stays_out_of_state_dicts_copies_and_pickles(counter):
    name, count = counter
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    layer = DEQLayer(MLPCell(dim=8, hidden=16), compile_f=True, compile_backend=name, f_max_iter=5)
    keys = set(DEQLayer(MLPCell(dim=8, hidden=16)).state_dict())
    z, _ = layer(x)
    assert count.frame_count == 1 and set(layer.state_dict()) == keys
    clone = copy.deepcopy(layer)
    unpickled = pickle.loads(pickle.dumps(layer))
    for other in (clone, unpickled):
        assert "_compiled_f_cache" not in other.__dict__ and set(other.state_dict()) == keys
        assert torch.allclose(other(x)[0], z)      # compiles its own f on first use
        assert other.__dict__["_compiled_f_cache"][0] is other.f
    layer.f = MLPCell(dim=8, hidden=16)                                # a new f is compiled anew
    layer(x)
    assert layer.__dict__["_compiled_f_cache"][0] is layer.f


def test_compile_options_are_validated():
    assert DEQConfig().compile_f is False and DEQConfig().compile_backend == "inductor"
    assert DEQConfig(compile_f=True, compile_backend="aot_eager").compile_backend == "aot_eager"
    with pytest.raises(ValueError, match=r"compile_backend must be one of \[.*'inductor'.*\], got 'inductr'"):
        DEQConfig(compile_backend="inductr")
    with pytest.raises(TypeError, match=r"compile_f must be bool, got 'yes'"):
        DEQConfig(compile_f="yes")


@pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header):UserWarning")
def test_fairseq_flags_carry_the_compile_options(tmp_path):
    pytest.importorskip("fairseq")
    from tests._fairseq_helpers import build, write_dictionary

    data = write_dictionary(tmp_path)
    tiny = ("--arch", "deq_transformer_lm_tiny", "--task", "language_modeling", "--tokens-per-sample", "16")
    _, _, model = build(data, *tiny)
    assert model.decoder.deq.config.compile_f is False
    _, _, model = build(data, *tiny, "--compile-f", "--compile-backend", "eager")
    cfg = model.decoder.deq.config
    assert cfg.compile_f is True and cfg.compile_backend == "eager"
    with pytest.raises(ValueError, match=r"compile_backend must be one of .* \(command-line flag --compile-backend\)"):
        build(data, *tiny, "--compile-backend", "nope")


def _timm_compiled_training(tmp_path, count, *flags):
    """Set up timm_deq.train with ``flags``, train one epoch, then a second; the second must compile
    nothing. Returns (run, metrics of the second epoch)."""
    pytest.importorskip("timm")
    from timm_deq import shapes, train

    data = shapes.make_shapes(str(tmp_path / "data"), train_per_class=2, val_per_class=1, size=16)
    run = train.setup([data, "--model", "mdeq_tiny_cifar", "--img-size", "16", "-b", "10", "-j", "0",
                       "--no-aug", "--epochs", "2", "--f-max-iter", "4", "--f-max-iter-jitter", "2",
                       "--b-max-iter", "3", "--jac-freq", "0.5", "--output", str(tmp_path), "--experiment",
                       "compiled", "--log-interval", "10", *flags])
    run.num_epochs = 1
    train.train(run)
    after_first = count.frame_count
    run.start_epoch, run.num_epochs = 1, 2
    metrics = train.train(run)
    assert after_first > 0 and count.frame_count == after_first   # the second epoch compiled nothing
    assert "top1" in metrics
    return run, metrics


@pytest.mark.slow
def test_timm_train_torchcompile_compiles_f_without_recompiling(counter, tmp_path):
    name, count = counter
    run, _ = _timm_compiled_training(tmp_path, count, "--model-ema", "--torchcompile", name)
    layer = run.task.get_trainable_module().deq
    assert layer.config.compile_f and layer.config.compile_backend == name
    assert "_compiled_f_cache" in layer.__dict__ and not hasattr(run.task.trainable_module, "_orig_mod")


def test_timm_torchcompile_flag_mirrors_timm_and_rejects_what_it_cannot_compile(tmp_path):
    pytest.importorskip("timm")
    from timm_deq import train

    parser = train.build_parser()
    assert parser.parse_args(["--torchcompile"]).torchcompile == "inductor"
    assert parser.parse_args(["--torchcompile", "aot_eager"]).torchcompile == "aot_eager"
    assert parser.parse_args([]).torchcompile is None
    with pytest.raises(SystemExit, match="--torchcompile inductor compiles the function f of the equilibrium "
                                         "layers, and Linear has no DEQLayer"):
        train.check_compilable(nn.Linear(2, 2), "inductor")
    train.check_compilable(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"--torchcompile: compile_backend must be one of .*got 'nope'"):
        train.setup([str(tmp_path), "--torchcompile", "nope"])


# -- torch.compile of whole models --------------------------------------------------------------

def _mdeq(**overrides):
    timm = pytest.importorskip("timm")
    import timm_deq  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    options = dict(num_classes=10, f_max_iter=20, f_tol=1e-7, b_max_iter=20, b_tol=1e-7, jac_freq=1.0)
    return timm.create_model("mdeq_tiny_cifar", **{**options, **overrides})


def _mdeq_step(model, call, x, y):
    """Logits, parameter gradients and stats of one training step of ``call`` (model or compiled)."""
    model.zero_grad()
    torch.manual_seed(5)  # the same JR probe in every run
    out = call(x)
    (torch.nn.functional.cross_entropy(out, y) + model.deq_stats.jr_term).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], model.deq_stats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_mdeq_trains_and_evaluates_like_eager(backend):
    # Step 0 trains the unrolled pretraining stack (with JR), steps 1 and 2 the implicit layer with
    # JR on, then off. aot_eager runs the same kernels as eager, so every step must agree. Inductor
    # fuses the stem and head differently (~1e-6 relative); the untrained MDEQ's f has a spectral
    # radius of about 1.4 at z* (no stable fixed point yet), and its 20 unconverged Broyden steps
    # amplify such differences to ~1e-2, so there the implicit steps are compared by their solver
    # steps and JR draws, and the gradients where no solve is involved (the pretraining step).
    model = _mdeq(pretrain_steps=1, pretrain_jac_weight=0.4, unrolled_layers=4)
    compiled = torch.compile(model, backend=backend)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    model.train()
    for step, jac_weight in ((0, 0.4), (1, 0.4), (2, 0.0)):   # one set of compiled graphs serves all
        model.set_num_updates(step)
        with model.deq.overridden(jac_weight=jac_weight):
            ref_out, ref_grads, ref_stats = _mdeq_step(model, model, x, y)
            out, grads, stats = _mdeq_step(model, compiled, x, y)
        assert stats.mode == ref_stats.mode == ("unrolled" if step == 0 else "implicit")
        assert (stats.jac_frobenius is not None) == (jac_weight > 0) == (ref_stats.jac_frobenius is not None)
        assert stats.f_steps.tolist() == ref_stats.f_steps.tolist()
        assert len(grads) == len(ref_grads) and all(bool(torch.isfinite(g).all()) for g in grads)
        if backend == "aot_eager" or step == 0:
            assert _rel(out, ref_out) < 1e-4
            assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-4
    model.eval()
    with torch.no_grad():
        if backend == "aot_eager":
            assert _rel(compiled(x), model(x)) < 1e-4
        else:
            assert bool(torch.isfinite(compiled(x)).all())


def test_compiled_mdeq_does_not_recompile_when_solver_steps_limits_and_jr_vary(counter):
    name, count = counter
    model = _mdeq(f_max_iter=8, f_max_iter_jitter=4, f_tol=1e-3, b_max_iter=6, jac_weight=0.4, jac_freq=0.5,
                  seed=2)
    compiled = torch.compile(model, backend=name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    graphs, limits, jr, steps = [], set(), set(), set()
    model.train()
    for step in range(8):
        model.set_num_updates(step)
        _mdeq_step(model, compiled, x, y)
        opt.step()
        stats = model.deq_stats
        graphs.append(count.frame_count)
        limits.add(stats.f_max_iter)
        jr.add(stats.jac_frobenius is not None)
        steps.add(tuple(stats.f_steps.tolist()))
    assert len(limits) > 1 and jr == {True, False} and len(steps) > 1   # the steps did vary
    # The model around the layer's graph break: the stem before it and, since the break unwinds
    # through the nested calls forward -> forward_features -> _equilibrium, two resumed graphs
    # after it (the branch merge and the head). Compiled once, reused by every step.
    assert graphs == [3] * 8


def _deq_lm(tmp_path, task="language_modeling", *flags):
    pytest.importorskip("fairseq")
    from tests._fairseq_helpers import build, write_dictionary

    torch.manual_seed(0)
    cfg, fs_task, model = build(write_dictionary(tmp_path), "--arch", "deq_transformer_lm_tiny", "--task", task,
                                "--tokens-per-sample", "16", "--criterion", "cross_entropy_jr", "--dropout", "0",
                                "--jac-weight", "1.0", *flags)
    return fs_task.build_criterion(cfg.criterion), model


def _lm_sample(step, memory=False):
    from tests._fairseq_helpers import VOCAB

    tokens = torch.randint(4, VOCAB + 4, (4, 17), generator=torch.Generator().manual_seed(step))
    net_input = {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((4,), 16)}
    if memory:
        net_input.update(mem_key="train", mem_segment=step)
    return {"id": torch.arange(4), "nsentences": 4, "ntokens": 64, "net_input": net_input,
            "target": tokens[:, 1:].contiguous()}


def _lm_step(criterion, model, call, sample):
    model.zero_grad()
    torch.manual_seed(5)
    loss, _, log = criterion(call, sample)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], log


@pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header):UserWarning")
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_deq_transformer_lm_trains_and_evaluates_like_eager(tmp_path, backend):
    criterion, model = _deq_lm(tmp_path, "language_modeling", "--f-max-iter", "20", "--f-tol", "1e-7",
                               "--f-max-iter-jitter", "0", "--b-max-iter", "20", "--b-tol", "1e-7",
                               "--jac-freq", "1")
    compiled = torch.compile(model, backend=backend)
    sample = _lm_sample(0)
    model.train()
    for step, jac_weight in ((0, 1.0), (1, 0.0)):
        model.set_num_updates(step)
        with model.decoder.deq.overridden(jac_weight=jac_weight):
            ref_loss, ref_grads, ref_log = _lm_step(criterion, model, model, sample)
            loss, grads, log = _lm_step(criterion, model, compiled, sample)
        assert ("deq_jr" in log) == (jac_weight > 0) == ("deq_jr" in ref_log)
        assert _rel(loss, ref_loss) < 1e-4
        assert len(grads) == len(ref_grads) and max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-4
    model.eval()
    with torch.no_grad():
        tokens = sample["net_input"]["src_tokens"]
        assert _rel(compiled(tokens)[0], model(tokens)[0]) < 1e-4


@pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header):UserWarning")
def test_compiled_deq_transformer_lm_with_memory_stops_compiling_once_the_memory_is_full(tmp_path, counter):
    name, count = counter
    criterion, model = _deq_lm(tmp_path, "deq_language_modeling", "--jac-freq", "0.5", "--f-max-iter", "8",
                               "--f-max-iter-jitter", "3", "--b-max-iter", "6", "--seed", "4")
    compiled = torch.compile(model, backend=name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    graphs, limits, jr = [], set(), set()
    for step in range(12):
        model.set_num_updates(step)
        _lm_step(criterion, model, compiled, _lm_sample(step, memory=True))
        opt.step()
        stats = model.decoder.deq.stats
        graphs.append(count.frame_count)
        if step >= 3:
            limits.add(stats.f_max_iter)
            jr.add(stats.jac_frobenius is not None)
    assert len(limits) > 1 and jr == {True, False}
    # The memory grows over the first segments (none, 16, then 32 = --mem-len positions): new
    # shapes compile, once. From then on nothing compiles, whatever the draws.
    assert graphs[3:] == [graphs[3]] * 9, graphs


@pytest.mark.slow
def test_timm_train_can_compile_the_whole_model_without_recompiling(counter, tmp_path):
    from timm_deq import train

    name, count = counter
    run, _ = _timm_compiled_training(tmp_path, count, "--torchcompile", name, "--torchcompile-scope", "model")
    assert hasattr(run.task.trainable_module, "_orig_mod")          # timm's task holds the compiled model
    layer = run.task.get_trainable_module().deq
    assert layer.config.compile_f and layer.config.compile_backend == name
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--torchcompile-scope", "everything"])


def test_a_compiled_model_with_the_reversible_mode_trains_like_eager():
    # The layer is one graph break; the model around it compiled, its gradients those of eager.
    model = _mdeq(backward="reversible", reversible_steps=3, jac_weight=0.4)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    model.train()
    model.set_num_updates(1)
    ref_out, ref_grads, ref_stats = _mdeq_step(model, model, x, y)
    out, grads, stats = _mdeq_step(model, compiled, x, y)
    assert stats.mode == ref_stats.mode == "reversible" and stats.jac_frobenius is not None
    assert _rel(out, ref_out) < 1e-5
    assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-5
    assert float(stats.b_rel_res.max()) < 1e-5
