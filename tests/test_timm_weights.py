"""MDEQ weights through timm's own loading paths, and the authors' original MDEQ-Vision checkpoints."""
import argparse
import json
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
import timm_deq  # noqa: E402  (registers the models)
from timm.models import save_for_hf  # noqa: E402
from timm.utils import CheckpointSaver  # noqa: E402
from timm_deq.models.mdeq import checkpoint_filter_fn  # noqa: E402

FAST = dict(f_max_iter=2, b_max_iter=2, f_max_iter_jitter=0, pretrain_steps=0)
# The original MDEQ-Vision reference data: outputs of the authors' code, shipped with the tests.
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "mdeq_reference"  # see its README


def _assert_same_state(got, want, skip=()):
    keys = [k for k in want if not k.startswith(skip)]
    assert sorted(k for k in got if not k.startswith(skip)) == sorted(keys)
    for k in keys:
        assert torch.equal(got[k], want[k]), k


def _eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


# -- this project's checkpoints ------------------------------------------------------------------
def test_pretrained_without_a_source_says_which_sources_exist():
    with pytest.raises(RuntimeError, match=r"No pretrained weights are published for mdeq_small.*"
                                           r"pretrained_cfg_overlay=dict\(file=PATH\).*'local-dir:PATH'"):
        timm.create_model("mdeq_small", pretrained=True)


def test_training_checkpoint_loads_its_ema_through_pretrained_file(tmp_path):
    model = timm.create_model("mdeq_tiny_cifar", **FAST)
    task = timm_deq.DEQClassificationTask(model, verbose=False)
    ema = task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    task.train()
    task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))["loss"].backward()
    optimizer.step()
    model.set_num_updates(5)
    ema.update(model, step=5)
    # The saver timm_deq.train builds (its args are an argparse.Namespace, as there).
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=argparse.Namespace(model="mdeq_tiny_cifar"),
                            model_ema=ema, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task)
    saver.save_checkpoint(epoch=0, metric=0.5)
    path = tmp_path / "last.pth.tar"
    saved = torch.load(path, weights_only=False)
    assert {"state_dict", "state_dict_ema", "args", "optimizer"} <= set(saved)

    loaded = timm.create_model("mdeq_tiny_cifar", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **FAST)
    want = ema.module.state_dict()
    _assert_same_state(loaded.state_dict(), want)  # timm prefers the EMA weights
    assert any(not torch.equal(want[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
    assert loaded.deq.num_updates == int(want["deq.schedule_state"][0]) == 5
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_eval_out(loaded, x), _eval_out(ema.module, x))


def test_pretrained_path_as_timm_train_passes_it_adapts_the_head(tmp_path):
    src = timm.create_model("mdeq_tiny_cifar", **FAST)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    # timm's train.py --pretrained-path: the file as overlay with num_classes=-1 (head adaptation).
    model = timm.create_model("mdeq_tiny_cifar", pretrained=True, num_classes=5, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=-1), **FAST)
    assert model.fc.out_features == 5
    _assert_same_state(model.state_dict(), src.state_dict(), skip=("fc.", "stem.conv1."))
    torch.testing.assert_close(model.stem.conv1.weight, src.stem.conv1.weight.sum(1, keepdim=True))


_ROUND_TRIP = {
    "mdeq_tiny_cifar": dict(num_classes=7, jac_weight=1.5, **FAST),
    "mdeq_small": dict(layout="original", channels=(8, 16, 32, 64), head_channels=(4, 8, 16, 32), num_features=64,
                       num_classes=10, **FAST),
}


@pytest.mark.parametrize("name", sorted(_ROUND_TRIP))
@pytest.mark.parametrize("safe", [False, True])
def test_hf_format_round_trips_through_local_dir(tmp_path, name, safe):
    src = timm.create_model(name, **_ROUND_TRIP[name])
    src.set_num_updates(3)
    save_for_hf(src, tmp_path / "export", safe_serialization=safe)
    assert (tmp_path / "export" / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()

    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert type(model) is type(src) and model.layout == src.layout
    assert model.deq.config == src.deq.config and model.num_classes == src.num_classes
    _assert_same_state(model.state_dict(), src.state_dict())
    assert model.deq.num_updates == 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_eval_out(model, x), _eval_out(src, x))


def test_hf_hub_loads_from_timms_cache_offline(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    src = timm.create_model("mdeq_tiny_cifar", num_classes=7, **FAST)
    # A Hub cache as huggingface_hub lays it out: refs/main names the snapshot holding the files.
    repo = tmp_path / "hub" / "models--someone--mdeq-tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    save_for_hf(src, repo / "snapshots" / revision, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    model = timm.create_model("hf-hub:someone/mdeq-tiny", pretrained=True)
    assert model.pretrained_cfg["hf_hub_id"] == "someone/mdeq-tiny" and model.num_classes == 7
    _assert_same_state(model.state_dict(), src.state_dict())
    with pytest.raises(hub.errors.LocalEntryNotFoundError):  # nothing is fetched: the cache is all there is
        timm.create_model("hf-hub:someone/not-cached", pretrained=True)


# -- the authors' original MDEQ-Vision checkpoints -----------------------------------------------
@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE_DIR / "mdeq_official_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def manifests():
    return json.loads((REFERENCE_DIR / "mdeq_official_state_dicts.json").read_text())


def _reference_model_args(config):
    """The original config as model arguments, after checking what the layout cannot vary."""
    stage = config["EXTRA"]["FULL_STAGE"]
    assert config["DOWNSAMPLE_TIMES"] == 2 and config["WNORM"] and stage["NUM_BLOCKS"] == [1, 1, 1, 1]
    assert config["BLOCK_GN_AFFINE"] and config["FUSE_GN_AFFINE"] and stage["BIG_KERNELS"] == [0, 0, 0, 0]
    return dict(layout="original", channels=tuple(stage["NUM_CHANNELS"]), head_channels=tuple(stage["HEAD_CHANNELS"]),
                num_features=stage["FINAL_CHANSIZE"], num_classes=config["NUM_CLASSES"],
                expansion=config["EXPANSION_FACTOR"], groups=config["NUM_GROUPS"],
                post_norm_affine=config["POST_GN_AFFINE"], dropout=config["DROPOUT"])


def _max_diff(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max(_max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("weight_norm", [True, False])
def test_original_checkpoint_reproduces_the_original_model(reference, tmp_path, weight_norm):
    path = tmp_path / "mdeq_original.pkl"
    torch.save(reference["state_dict"], path)
    args = _reference_model_args(reference["config"])
    model = timm.create_model("mdeq_small", pretrained=True, weight_norm=weight_norm, **args,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=args["num_classes"])).eval()
    z = list(reference["z"])
    with torch.no_grad():
        injection = model.stem(reference["x"])
        f_z = model.deq.f(z, reference["injection"])
        logits = model.forward_head(model._merge(z))
    assert _max_diff(injection, reference["injection"]) < 1e-5
    assert _max_diff(f_z, reference["f_z"]) < 1e-5
    assert _max_diff(logits, reference["logits"]) < 1e-5
    # A released checkpoint is a trained model: it solves for the equilibrium, not the unrolled
    # pretraining stack, although mdeq_small's schedule starts with 510000 pretraining steps.
    assert model.deq.config.pretrain_steps == 510000 and not model.deq.pretraining


def test_original_checkpoint_refuses_the_timm_layout(reference):
    args = {k: v for k, v in _reference_model_args(reference["config"]).items() if k != "layout"}
    with pytest.raises(ValueError, match=r"original MDEQ-Vision layout.*layout='original'"):
        timm.create_model("mdeq_small", pretrained=True, **args,
                          pretrained_cfg_overlay=dict(state_dict=dict(reference["state_dict"])))


def test_original_keys_the_layout_cannot_hold_are_named(reference):
    model = timm.create_model("mdeq_small", **_reference_model_args(reference["config"]))
    sd = dict(reference["state_dict"])
    sd["fullstage.branches.0.blocks.1.conv1.weight_v"] = sd["fullstage.branches.0.blocks.0.conv1.weight_v"]
    with pytest.raises(ValueError, match=r"no place in the original layout.*blocks\.1\.conv1\.weight_v"):
        checkpoint_filter_fn(sd, model)


def _meta_state(manifest):
    return {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}


@pytest.mark.parametrize("name, variant", [
    ("mdeq_small", "mdeq_small"), ("mdeq_large", "mdeq_large"), ("mdeq_xl", "mdeq_xl"),
    ("mdeq_xl", "mdeq_xl.locuslab_in1k"),  # the released XL checkpoint has the XL config's layout
])
def test_every_key_of_the_full_size_original_checkpoints_has_its_place(manifests, name, variant):
    manifest = manifests[name]["state_dict"]
    with torch.device("meta"):
        kwargs = {} if "." in variant else dict(layout="original")
        model = timm.create_model(variant, **kwargs)
    own = model.state_dict()
    out = checkpoint_filter_fn(_meta_state(manifest), model)
    assert len(out) == len(manifest) + 1  # one key each, plus the layer's step count
    assert sorted(out) == sorted(own)
    assert [k for k in out if out[k].shape != own[k].shape] == []


def _as_2020_small(manifest):
    """The key shapes of the released MDEQ-Small file, from the manifest of the 2021 JR config: the
    2020 code (whose config trained that file) expands blocks 4x instead of 5x, always keeps
    affine post-fusion GroupNorms, and saves a derived copy of the layer (fullstage_copy.*)."""
    out = {}
    for key, shape in manifest.items():
        if key.startswith("fullstage.branches.") and any(f".{m}." in key for m in ("conv1", "gn1", "conv2")):
            shape = [s // 5 * 4 if s % 5 == 0 and s > 8 else s for s in shape]
        out[key] = shape
    for i, width in enumerate((32, 64, 128, 256)):
        out[f"fullstage.post_fuse_layers.{i}.gnorm.weight"] = [width]
        out[f"fullstage.post_fuse_layers.{i}.gnorm.bias"] = [width]
    out.update({"fullstage_copy." + k[len("fullstage."):]: v for k, v in list(out.items())
                if k.startswith("fullstage.")})
    return out


def test_released_small_tag_has_the_config_that_trained_the_released_file(manifests):
    # The one released MDEQ-Small file is linked from the 2020 repository and loaded strictly
    # elsewhere with that repository's cls_mdeq_SMALL.yaml: expansion 4, head 28-224.
    with torch.device("meta"):
        model = timm.create_model("mdeq_small.locuslab_in1k")
    assert model.layout == "original" and model.pretrained_cfg["tag"] == "locuslab_in1k"
    assert [b.conv1.out_channels for b in model.incre] == [28, 56, 112, 224]
    assert [blk.conv1.out_channels for blk in model.deq.f.blocks] == [128, 256, 512, 1024]
    assert all(post[2].affine and post[2].num_groups == 4 for post in model.deq.f.post)
    released = _as_2020_small(manifests["mdeq_small"]["state_dict"])
    own = model.state_dict()
    out = checkpoint_filter_fn(_meta_state(released), model)
    assert sorted(out) == sorted(own) and [k for k in out if out[k].shape != own[k].shape] == []
    # The 2021 repository's cls_mdeq_SMALL.yaml (expansion 5, head 24-192) would not hold it.
    with torch.device("meta"):
        config_2021 = timm.create_model("mdeq_small", layout="original", head_channels=(24, 48, 96, 192),
                                        post_norm_affine=True)
    with pytest.raises(ValueError, match=r"shape\(s\) differ"):
        checkpoint_filter_fn(_meta_state(released), config_2021)


def test_layout_is_validated():
    with pytest.raises(ValueError, match=r"layout='hrnet' is not one of \('timm', 'original'\)"):
        timm.create_model("mdeq_tiny_cifar", layout="hrnet")


def test_the_2020_codes_derived_copies_of_the_layer_are_left_out(reference):
    model = timm.create_model("mdeq_small", **_reference_model_args(reference["config"]))
    plain = dict(reference["state_dict"])
    layer = {k[len("fullstage."):]: v for k, v in plain.items() if k.startswith("fullstage.")}
    old = dict(plain, **{f"deq.func.{k}": v for k, v in layer.items()},
               **{f"fullstage_copy.{k}": v for k, v in layer.items() if not k.endswith("_g")})
    want = checkpoint_filter_fn(plain, model)
    got = checkpoint_filter_fn(old, model)
    assert len(old) > len(plain) and sorted(got) == sorted(want)
    assert all(got[k] is want[k] or torch.equal(got[k], want[k]) for k in want)


def test_original_checkpoint_loads_through_the_entry_points_file_flags(reference, tmp_path):
    # --checkpoint (validate), --initial-checkpoint (train) and hard_stop.sh load a file with
    # _cli.load_weights, which applies the model's checkpoint filter as timm's pretrained path does.
    from timm_deq import _cli

    path = tmp_path / "mdeq_original.pkl"
    torch.save(reference["state_dict"], path)
    args = _reference_model_args(reference["config"])
    model = timm.create_model("mdeq_small", **args).eval()
    _cli.load_weights(model, str(path), "--checkpoint")
    with torch.no_grad():
        logits = model.forward_head(model._merge(list(reference["z"])))
    assert _max_diff(logits, reference["logits"]) < 1e-5 and not model.deq.pretraining
    timm_layout = timm.create_model("mdeq_small", **{k: v for k, v in args.items() if k != "layout"})
    with pytest.raises(ValueError, match=r"argument --checkpoint: cannot load .*original MDEQ-Vision layout.*"
                                         r"layout='original'"):
        _cli.load_weights(timm_layout, str(path), "--checkpoint")
