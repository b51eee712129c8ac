"""The MDEQ family against timm's model contract."""
import pytest
import torch

timm = pytest.importorskip("timm")
import timm_deq  # noqa: E402,F401  (registers the models)
from timm.models import group_parameters  # noqa: E402

NAMES = ["mdeq_small", "mdeq_large", "mdeq_xl", "mdeq_tiny_cifar", "mdeq_large_cifar"]
# The contract does not depend on solver depth or on the schedule (the paper variants pretrain first).
FAST = dict(f_max_iter=2, b_max_iter=2, f_max_iter_jitter=0, pretrain_steps=0)


def _small_input(model, batch=2):
    return torch.randn(batch, 3, 32, 32)  # the ImageNet variants' branches are then 8, 4, 2, 1 pixels


def test_all_variants_are_listed():
    assert sorted(timm.list_models("mdeq*")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_contract(name):
    model = timm.create_model(name, num_classes=7, **FAST)
    cfg = model.pretrained_cfg
    for key in ("input_size", "pool_size", "crop_pct", "mean", "std", "first_conv", "classifier", "interpolation"):
        assert key in cfg, key
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] + ".weight" in state and model.get_classifier() is model.fc
    x = _small_input(model)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.deq_stats.b_steps is not None  # the implicit backward ran

    feats = model.forward_features(x)
    assert feats.shape[:2] == (2, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3, "max")
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", ["mdeq_small", "mdeq_tiny_cifar", "mdeq_large_cifar"])
def test_features_at_the_config_resolution_match_pool_size(name):
    model = timm.create_model(name, f_max_iter=1, b_max_iter=1, f_max_iter_jitter=0).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        feats = model.forward_features(x)
    assert tuple(feats.shape[-2:]) == tuple(model.pretrained_cfg["pool_size"])


@pytest.mark.parametrize("name", ["mdeq_small", "mdeq_tiny_cifar"])
def test_features_only_returns_the_equilibrium_branches(name):
    model = timm.create_model(name, features_only=True, **FAST)
    x = _small_input(model)
    feats = model(x)
    info = model.feature_info
    assert len(feats) == 4
    assert [f.shape[1] for f in feats] == info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in feats] == info.reduction()
    sub = timm.create_model(name, features_only=True, out_indices=(1, 3), **FAST)
    assert [f.shape[1] for f in sub(x)] == [info.channels()[1], info.channels()[3]]


def test_forward_intermediates():
    model = timm.create_model("mdeq_tiny_cifar", **FAST)
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x, indices=2)
    assert final.shape[1] == model.num_features and [t.shape[1] for t in inter] == [32, 64]
    with pytest.raises(ValueError, match="indices=5"):
        model.forward_intermediates(x, indices=5)


def test_group_matcher_covers_every_parameter():
    model = timm.create_model("mdeq_tiny_cifar")
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = {n for names in groups.values() for n in names}
        assert grouped == {n for n, _ in model.named_parameters()}


def test_create_model_kwargs_reach_the_equilibrium_layer():
    model = timm.create_model("mdeq_tiny_cifar", f_max_iter=3, jac_weight=1.5, b_solver="anderson",
                              f_solver_options={"memory": 4}, in_chans=1, drop_rate=0.1)
    cfg = model.deq.config
    assert (cfg.f_max_iter, cfg.jac_weight, cfg.b_solver, cfg.f_solver_options["memory"]) == (3, 1.5, "anderson", 4)
    assert cfg.f_solver == "broyden" and cfg.jac_freq == 0.05  # the variant's defaults stay
    assert model.stem.conv1.in_channels == 1 and model.head_drop.p == 0.1
    out = model(torch.randn(2, 1, 32, 32))
    assert model.deq_stats.f_max_iter == 3 and out.shape == (2, 10)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(f_max_itr=3), ValueError, r"unknown DEQ option\(s\): 'f_max_itr' \(did you mean 'f_max_iter'\?\)"),
    (dict(f_max_iter=0), ValueError, r"f_max_iter must be >= 1"),
    (dict(jac_freq="often"), TypeError, r"jac_freq must be float"),
    (dict(groups=3), ValueError, r"groups=3 must divide every branch width"),
    (dict(pretrained=True), RuntimeError, r"No pretrained weights are published for mdeq_tiny_cifar"),
])
def test_bad_model_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        timm.create_model("mdeq_tiny_cifar", **kwargs)


def test_parameter_counts_near_the_paper():
    counts = {n: sum(p.numel() for p in timm.create_model(n).parameters()) / 1e6
              for n in ("mdeq_small", "mdeq_large")}
    assert 17 * 0.9 <= counts["mdeq_small"] <= 18 * 1.1
    assert 62 * 0.9 <= counts["mdeq_large"] <= 63 * 1.1


def test_set_grad_checkpointing_is_accepted_and_changes_nothing():
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", **FAST).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        model.set_grad_checkpointing(True)
        b = model(x)
    assert torch.equal(a, b)
