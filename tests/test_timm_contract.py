"""MDEQ against the parts of timm's model contract that feature extraction, fine-tuning and
tracing rely on: the values they return, not only their shapes."""
import io

import pytest
import torch

timm = pytest.importorskip("timm")
import timm_deq  # noqa: E402,F401  (registers the models)
from timm.layers import create_feature_extractor, get_graph_node_names  # noqa: E402
from timm.models._manipulate import group_with_matcher  # noqa: E402
from timm.optim import param_groups_layer_decay  # noqa: E402

FAST = dict(f_max_iter=3, b_max_iter=3)


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("mdeq_tiny_cifar", **{**FAST, **kwargs}).eval()


def test_hook_getter_and_fx_features_are_the_equilibrium_states():
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = _model().forward_intermediates(x, intermediates_only=True)
        for feature_cls in ("getter", "hook", "fx"):
            feats = _model(features_only=True, feature_cls=feature_cls).eval()(x)
            feats = list(feats.values()) if isinstance(feats, dict) else feats
            assert len(feats) == 4, feature_cls
            for got, ref in zip(feats, reference):
                assert torch.equal(got, ref), feature_cls


def test_fx_tracing_keeps_the_equilibrium_layer_as_one_node_and_computes_the_same_logits():
    model = _model()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "deq" in eval_nodes and not any(n.startswith("deq.f") for n in eval_nodes)
    extractor = create_feature_extractor(model, return_nodes={"states.3": "z3", "fc": "logits"})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = extractor(x)
        assert torch.equal(out["logits"], model(x))
        assert torch.equal(out["z3"], model.forward_intermediates(x, intermediates_only=True)[3])


def test_prune_intermediate_layers_leaves_a_working_model():
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        states = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers(2) == [2, 3]
        assert model.num_features == model.head_hidden_size == model.feature_info[3]["num_chs"]
        assert torch.equal(model(x), states[3])  # no head and no pooling, as timm prunes
        assert torch.equal(model.forward_features(x), states[3])
        final, inter = model.forward_intermediates(x, indices=2)
        assert torch.equal(final, states[3]) and all(torch.equal(a, b) for a, b in zip(inter, states[2:]))
    assert not any(n.startswith(("incre", "downsamp", "final", "fc")) for n, _ in model.named_parameters())


def test_fine_group_matcher_runs_in_depth_order_and_layer_decay_follows_it():
    model = _model()
    order = group_with_matcher(model.named_parameters(), model.group_matcher(coarse=False))
    first_group = {k: min(i for i, names in order.items() if any(n.startswith(k) for n in names))
                   for k in ("stem", "deq.", "incre.0", "downsamp.0", "incre.3", "final")}
    assert first_group["stem"] < first_group["deq."] < first_group["incre.0"] < first_group["downsamp.0"]
    # The final conv joins the last head stage's group (timm's MATCH_PREV_GROUP suffix).
    assert first_group["downsamp.0"] < first_group["incre.3"] == first_group["final"]
    deq_groups = {i for i, names in order.items() if any(n.startswith("deq.") for n in names)}
    assert len(deq_groups) == 1 and all(n.startswith("deq.") for n in order[deq_groups.pop()])
    scale = {}
    for group in param_groups_layer_decay(model, layer_decay=0.5):
        for p in group["params"]:
            scale[id(p)] = group["lr_scale"]
    named = dict(model.named_parameters())

    def lr_scale(prefix):
        return {scale[id(p)] for n, p in named.items() if n.startswith(prefix)}

    assert len(lr_scale("deq.")) == 1
    (stem,), (deq,), (incre0,), (fc,) = lr_scale("stem"), lr_scale("deq."), lr_scale("incre.0"), lr_scale("fc")
    assert stem < deq < incre0 < fc == 1.0


@pytest.mark.parametrize("training", [True, False])
def test_reset_classifier_keeps_device_dtype_mode_and_the_pooled_width(training):
    model = _model().double().train(training)
    model.reset_classifier(5, "catavgmax")
    assert model.fc.weight.dtype == torch.float64 and model.fc.training == training
    assert model.head_hidden_size == 2 * model.num_features == model.fc.in_features
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.get_classifier(name_only=True) == "fc" and model.get_classifier() is model.fc


def test_scripting_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="DEQLayer cannot be scripted.*torch.compile"):
        torch.jit.script(_model())


def test_export_and_onnx_are_refused_with_the_reason_and_what_to_use():
    model, x = _model().eval(), torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"DEQLayer cannot be exported .*number of evaluations of f .*"
                                           r"torch.compile .*state_dict"):
        torch.export.export(model, (x,))
    with pytest.raises(RuntimeError, match=r"DEQLayer cannot be exported"):
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)


def test_saving_the_whole_model_names_the_state_dict_and_the_state_dict_round_trips():
    model = _model()
    with pytest.raises(RuntimeError, match="only supported through state_dict"):
        torch.save(model, io.BytesIO())  # torch's parametrizations (weight norm) refuse pickling
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    fresh.load_state_dict(torch.load(buf))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("cls", ["dict", "list"])
def test_feature_classes_that_run_modules_in_sequence_are_refused_naming_the_ones_that_work(cls):
    with pytest.raises(ValueError, match=f"feature_cls='{cls}' .*not such a sequence.*'getter'.*'hook'.*'fx'"):
        timm.create_model("mdeq_tiny_cifar", features_only=True, feature_cls=cls)


def test_timm_factory_kwargs_device_dtype_and_batchnorm_settings():
    model = timm.create_model("mdeq_tiny_cifar", device="cpu", dtype=torch.float64, bn_momentum=0.01,
                              bn_eps=1e-3, drop_path_rate=0.0, **FAST)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.deq.schedule_state.dtype == torch.int64  # the step count stays an integer
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    meta = timm.create_model("mdeq_small", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.mark.parametrize("arg", ["drop_path_rate", "drop_block_rate"])
def test_per_call_random_regularizers_are_refused_naming_the_argument(arg):
    with pytest.raises(ValueError, match=rf"{arg}=0.1 is not supported by MDEQ.*dropout="):
        timm.create_model("mdeq_tiny_cifar", **{arg: 0.1})
