"""The timm_deq command lines as timm users know them: argparse errors naming the flag, help with
defaults and the model's DEQ values, ``-c`` YAML configs and ``args.yaml``, timm's flags with timm's
meaning, and the timm release the package and its entry points need."""
import configparser
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import yaml

pytest.importorskip("timm")
from timm.data.loader import PrefetchLoader  # noqa: E402

from timm_deq import _cli, shapes, train, validate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "mdeq_tiny_cifar", "--img-size", "16", "-b", "10", "-j", "0", "--no-aug", "--epochs", "1",
        "--f-max-iter", "4", "--b-max-iter", "4", "--log-interval", "10", "--warmup-epochs", "0"]
FAST = ["--f-max-iter", "2", "--b-max-iter", "2"]   # for the tests that train an epoch
TINY_VAL = ["--model", "mdeq_tiny_cifar", "--img-size", "16", "-b", "10", "-j", "0", "--eval-max-iter", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes.make_shapes(str(tmp_path_factory.mktemp("shapes")), train_per_class=2, val_per_class=1, size=16)


def _usage_error(entry, argv, capsys):
    """Run ``entry.main(argv)``; it must exit with status 2 and argparse's usage line. Returns the
    error message."""
    with pytest.raises(SystemExit) as exc:
        entry.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "usage:" in err and "error: " in err, err
    return err.split("error: ", 1)[1]


def _train_args(data, tmp_path, name, *flags):
    return [data, *TINY, "--output", str(tmp_path), "--experiment", name, *flags]


# -- every error is an argparse error naming the flag ------------------------------------------------

TRAIN_ERRORS = {
    "deq-range": (["--f-max-iter", "-1"], ["argument --f-max-iter:", "must be >= 1", "got -1"]),
    "deq-choice": (["--f-solver", "newton"], ["argument --f-solver:", "must be one of", "'broyden'", "'newton'"]),
    "deq-cross-field": (["--f-max-iter-jitter", "4"],
                        ["argument --f-max-iter-jitter:", "< f_max_iter (4)", "f_max_iter is set by --f-max-iter"]),
    "flag-and-model-kwargs": (["--model-kwargs", "f_max_iter=5"],
                              ["argument --model-kwargs:", "f_max_iter (the flag --f-max-iter)"]),
    "model-kwarg-with-a-flag": (["--model-kwargs", "num_classes=3"],
                                ["argument --model-kwargs:", "num_classes (the flag --num-classes)"]),
    "bad-model-kwarg": (["--model-kwargs", "f_max_itr=5"], ["argument --model-kwargs:", "did you mean 'f_max_iter'"]),
    "unknown-model": (["--model", "mdeq_nope"], ["argument --model mdeq_nope:", "mdeq_nope"]),
    "pretrained": (["--pretrained"], ["argument --pretrained:"]),
    "amp-dtype": (["--amp", "--amp-dtype", "bf16"], ["argument --amp-dtype:", "'float16' or 'bfloat16'", "'bf16'"]),
    "model-dtype-choice": (["--model-dtype", "double"],
                           ["argument --model-dtype: invalid choice: 'double'", "'float64'", "'bfloat16'"]),
    "model-dtype-with-amp": (["--amp", "--model-dtype", "float64"], ["argument --model-dtype:", "float32"]),
    "float16-model-with-jr": (["--model-dtype", "float16"],
                              ["argument --model-dtype:", "cannot train with Jacobian regularization", "bfloat16",
                               "--amp --amp-dtype float16", "JR weight is 0.4"]),
    "pretrained-path": (["--pretrained-path", "missing.pth"], ["argument --pretrained-path: no such file: missing.pth"]),
    "not-a-deq": (["--model", "resnet18"], ["argument --model: resnet18 has no deep equilibrium layer",
                                            "timm's own train.py"]),
    "input-size": (["--input-size", "3", "0", "0"], ["argument --input-size: C H W must all be >= 1, got 3 0 0"]),
    "img-size": (["--img-size", "0"], ["argument --img-size: must be >= 1, got 0"]),
    "drop-path": (["--drop-path", "0.1"], ["argument --drop-path: drop_path_rate=0.1 is not supported by MDEQ",
                                           "Use dropout="]),
    "bce-without-bce-loss": (["--bce-sum"], ["argument --bce-sum/--bce-target-thresh/--bce-pos-weight: only read "
                                             "with --bce-loss"]),
    "aug-repeats": (["--aug-repeats", "3"], ["argument --aug-repeats:", "distributed run (torchrun)"]),
    "device-modules": (["--device-modules", "no_such_backend"], ["argument --device-modules: cannot import "
                                                                 "no_such_backend"]),
    "initial-checkpoint": (["--initial-checkpoint", "missing.pth"], ["argument --initial-checkpoint:", "missing.pth"]),
    "resume": (["--resume", "missing.pth"], ["argument --resume:", "missing.pth"]),
    "lr-base-scale": (["--lr-base-scale", "cubic"], ["argument --lr-base-scale: invalid choice: 'cubic'", "'sqrt'"]),
    "lr-base-size": (["--lr-base-size", "0"], ["argument --lr-base-size:", ">= 1"]),
    "optimizer": (["--opt", "nope"], ["argument --opt:", "'nope'"]),
    "scheduler": (["--sched", "nope"], ["argument --sched:", "'nope'"]),
    "eval-metric": (["--eval-metric", "top3"], ["argument --eval-metric: invalid choice: 'top3'", "'loss'"]),
    "grad-accum": (["--grad-accum-steps", "0"], ["argument --grad-accum-steps:", ">= 1"]),
    "torchcompile": (["--torchcompile", "nope"], ["argument --torchcompile:", "compile_backend must be one of"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_ERRORS))
def test_train_errors_are_argparse_errors_naming_the_flag(case, data, tmp_path, capsys):
    flags, expected = TRAIN_ERRORS[case]
    message = _usage_error(train, _train_args(data, tmp_path, case, *flags), capsys)
    for text in expected:
        assert text in message, (text, message)
    assert "Traceback" not in message


VALIDATE_ERRORS = {
    "deq-range": (["--f-max-iter", "-1"], ["argument --f-max-iter:", "must be >= 1"]),
    "flag-and-model-kwargs": (["--f-max-iter", "4", "--model-kwargs", "f_max_iter=5"],
                              ["argument --model-kwargs:", "f_max_iter (the flag --f-max-iter)"]),
    "pretrained": (["--pretrained"], ["argument --pretrained:"]),
    "amp-dtype": (["--amp", "--amp-dtype", "bf16"], ["argument --amp-dtype:", "'float16' or 'bfloat16'"]),
    "model-dtype-with-amp": (["--amp", "--model-dtype", "float64"], ["argument --model-dtype:", "float32"]),
    "checkpoint": (["--checkpoint", "missing.pth"], ["argument --checkpoint:", "missing.pth"]),
    "limits": (["--eval-max-iter", "0", "2"], ["argument --eval-max-iter:", ">= 1"]),
    "not-a-deq": (["--model", "resnet18"], ["argument --model:", "resnet18 has no deep equilibrium layer"]),
    "test-pool": (["--test-pool"], ["argument --test-pool: not supported by timm_deq.validate:", "global pooling"]),
    "real-labels": (["--real-labels", "real.json"], ["argument --real-labels: not supported", "timm's own validate.py"]),
    "valid-labels": (["--valid-labels", "v.txt"], ["argument --valid-labels: not supported"]),
    "retry": (["--retry"], ["argument --retry: not supported", "smaller -b"]),
    "results-format": (["--results-format", "xml"], ["argument --results-format: invalid choice: 'xml'"]),
}


def test_resuming_another_variants_checkpoint_names_resume_and_the_mismatch(data, tmp_path, capsys):
    import timm

    path = tmp_path / "small.pth"
    torch.save({"state_dict": timm.create_model("mdeq_small").state_dict(), "epoch": 0}, path)
    message = _usage_error(train, _train_args(data, tmp_path, "resume-other", "--resume", str(path)), capsys)
    assert message.startswith(f"argument --resume: cannot resume mdeq_tiny_cifar from {path}: the weights do not "
                              "fit the model: 150 tensors of other shapes (first: stem.bn1.weight")
    assert "\n" not in message.strip()


@pytest.mark.parametrize("case", sorted(VALIDATE_ERRORS))
def test_validate_errors_are_argparse_errors_naming_the_flag(case, data, capsys):
    flags, expected = VALIDATE_ERRORS[case]
    message = _usage_error(validate, [data, *TINY_VAL, *flags], capsys)
    for text in expected:
        assert text in message, (text, message)


@pytest.mark.parametrize("entry", [train, validate], ids=["train", "validate"])
def test_data_folder_errors_name_the_data_flag(entry, tmp_path, capsys):
    message = _usage_error(entry, [str(tmp_path / "missing"), "-j", "0"], capsys)
    assert "argument DIR/--data-dir:" in message and "missing does not exist" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _usage_error(entry, [str(empty), "-j", "0", "--img-size", "16"], capsys)
    split = "'train' (--train-split)" if entry is train else "'validation' (--split)"
    assert "argument DIR/--data-dir:" in message and split in message and "Found 0 images" in message


def test_config_file_errors_name_the_config_flag(data, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_sise: 3\n")
    message = _usage_error(train, ["-c", str(path), data], capsys)
    assert "argument -c/--config:" in message and "batch_sise (did you mean batch_size?)" in message
    path.write_text("lr_base_scale: cubic\n")
    message = _usage_error(train, ["-c", str(path), data], capsys)
    assert "argument --lr-base-scale: invalid choice: 'cubic'" in message and "bad.yaml" in message
    message = _usage_error(validate, ["-c", str(tmp_path / "none.yaml"), data], capsys)
    assert "argument -c/--config: cannot read" in message


@pytest.mark.slow
def test_python_m_entry_points_exit_2_with_usage_and_no_traceback(data):
    for module, flags, flag in (("timm_deq.train", ["--f-max-iter", "-1"], "argument --f-max-iter:"),
                                ("timm_deq.validate", ["--amp-dtype", "bf16"], "argument --amp-dtype:")):
        proc = subprocess.run([sys.executable, "-m", module, data, "--model", "mdeq_tiny_cifar", "-j", "0", *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "usage:" in proc.stderr and flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- --amp-dtype: one parser, one answer -------------------------------------------------------------

@pytest.mark.parametrize("value", ["float16", "bfloat16", "bf16", "fp16", "float32"])
def test_amp_dtype_is_accepted_and_rejected_identically_by_train_and_validate(value, data, tmp_path):
    outcomes = []
    for entry, argv in ((train, _train_args(data, tmp_path, value)), (validate, [data, *TINY_VAL])):
        try:
            run = entry.setup(argv + ["--amp", "--amp-dtype", value])
        except _cli.UsageError as err:
            outcomes.append(("rejected", str(err)))
        else:
            outcomes.append(("accepted", run.amp_autocast.keywords["dtype"]))
    assert outcomes[0] == outcomes[1]
    if value in ("float16", "bfloat16"):
        assert outcomes[0] == ("accepted", getattr(torch, value))
    else:
        assert outcomes[0][0] == "rejected" and "'float16' or 'bfloat16'" in outcomes[0][1]


# -- --help ------------------------------------------------------------------------------------------

def _help(entry, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        entry.main(argv)
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _flag_help(text, option):
    """The help of ``option`` ("--flag METAVAR"): what follows its entry in the list of options, up
    to the next option."""
    return text.rsplit(option + " ", 1)[1].split(" --", 1)[0]


def test_help_shows_defaults_and_the_chosen_models_deq_values(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")   # argparse wraps to the terminal width (and at hyphens)
    text = _help(train, ["--help"], capsys)
    assert "training batch size per process (default: 128)" in text
    assert "x processes x --grad-accum-steps (default: 0.1)" in text
    assert "autocast dtype with --amp: float16 or bfloat16 (default: float16)" in text
    assert "DEQ flags left unset keep the --model variant's own values" in text
    # The default model is mdeq_tiny_cifar, whose forward limit is 8; DEQConfig's is 30.
    assert "unset: mdeq_tiny_cifar's value 8; DEQConfig default 30" in _flag_help(text, "--f-max-iter F_MAX_ITER")
    text = _help(train, ["--model", "mdeq_small", "--help"], capsys)
    assert "unset: mdeq_small's value 14; DEQConfig default 30" in _flag_help(text, "--f-max-iter F_MAX_ITER")
    assert "unset: mdeq_small's value 2.5; DEQConfig default 0.0" in _flag_help(text, "--jac-weight JAC_WEIGHT")
    config = tmp_path / "large.yaml"
    config.write_text("model: mdeq_large\n")
    text = _help(train, ["-c", str(config), "--help"], capsys)
    assert "unset: mdeq_large's value 3.0" in _flag_help(text, "--jac-weight JAC_WEIGHT")
    text = _help(validate, ["-m", "mdeq_small", "--help"], capsys)
    assert "batch size (default: 256)" in text and "(default: float16)" in text
    assert "unset: mdeq_small's value 14" in _flag_help(text, "--f-max-iter F_MAX_ITER")
    for parser in (train.build_parser(), validate.build_parser()):
        assert [a.option_strings for a in parser._actions if not a.help] == []


# -- -c/--config and args.yaml ----------------------------------------------------------------------

def test_config_file_sets_defaults_and_the_command_line_overrides_it(data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "mdeq_tiny_cifar", "img_size": 16, "batch_size": 7, "workers": 0,
                                      "no_aug": True, "opt": "adamw", "lr": 0.01, "f_max_iter": 3,
                                      "jac_weight": 0.25}))
    args = train.build_parser().parse_args(["-c", str(config), data, "--lr", "0.02"])
    assert (args.batch_size, args.opt, args.lr, args.f_max_iter, args.jac_weight) == (7, "adamw", 0.02, 3, 0.25)
    assert not hasattr(args, "b_max_iter")     # not in the file: left to the variant, as an unset flag
    run = train.setup(["-c", str(config), data, "--f-max-iter", "5", "--output", str(tmp_path), "--experiment", "c"])
    layer = run.task.get_trainable_module().deq
    assert (layer.config.f_max_iter, layer.config.jac_weight, layer.config.b_max_iter) == (5, 0.25, 7)
    assert run.args.batch_size == 7 and run.optimizer.defaults["lr"] == 0.01
    config.write_text("batch_size: 5\nf_max_iter: 3\neval_limits: [1, 2]\n")
    args = validate.build_parser().parse_args(["-c", str(config), data, "-b", "6"])
    assert (args.batch_size, args.f_max_iter, args.eval_limits) == (6, 3, [1, 2])


def test_args_yaml_is_written_as_timm_does_and_reproduces_the_run(data, tmp_path):
    first = train.setup(_train_args(data, tmp_path, "first", "--lr-base", "0.2", "--jac-weight", "0.3",
                                    "--f-max-iter-jitter", "1", "--model-kwargs", "dropout=0.05"))
    path = os.path.join(first.output_dir, "args.yaml")
    with open(path) as fh:
        saved = yaml.safe_load(fh)
    # As parsed, before the run computes anything (timm writes the same): lr unset, lr_base given.
    assert saved["lr"] is None and saved["lr_base"] == 0.2 and saved["batch_size"] == 10
    assert saved["f_max_iter"] == 4 and saved["f_max_iter_jitter"] == 1 and saved["model_kwargs"] == {"dropout": 0.05}
    assert "b_solver" not in saved and "config" not in saved   # unset DEQ flags stay the variant's
    second = train.setup(["-c", path, "--experiment", "second"])
    differs = {"experiment", "config"}
    assert ({k: v for k, v in vars(second.args).items() if k not in differs}
            == {k: v for k, v in vars(first.args).items() if k not in differs})
    assert second.task.get_trainable_module().deq.config == first.task.get_trainable_module().deq.config
    assert second.optimizer.defaults["lr"] == first.optimizer.defaults["lr"] == pytest.approx(0.2 * 10 / 256)
    with open(os.path.join(second.output_dir, "args.yaml")) as fh:
        assert {**yaml.safe_load(fh), "experiment": "first"} == saved


# -- timm's flags, each with an observable effect ---------------------------------------------------

def _record_stem_inputs(model):
    seen = []

    def hook(module, inputs):
        x = inputs[0]
        seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last), module.weight.dtype,
                     module.weight.is_contiguous(memory_format=torch.channels_last)))

    model.stem.conv1.register_forward_pre_hook(hook)
    return seen


def test_channels_last_and_model_dtype_reach_the_training_step(data, tmp_path):
    default = train.setup(_train_args(data, tmp_path, "default"))
    model = default.task.get_trainable_module()
    seen = _record_stem_inputs(model)
    input, _ = next(iter(default.loader_train))
    with torch.no_grad():
        model.eval()(input)
    assert seen == [(torch.float32, False, torch.float32, False)]

    run = train.setup(_train_args(data, tmp_path, "cl64", *FAST, "--channels-last", "--model-dtype", "float64"))
    model = run.task.get_trainable_module()
    seen = _record_stem_inputs(model)
    metrics = train.train(run)
    assert len(seen) >= 3 and set(seen) == {(torch.float64, True, torch.float64, True)}  # train and eval steps
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    # Every stored conv weight (the weight-normed convs store direction and norm) is channels_last
    # (torch's weight norm computes its weight in the default layout; the conv follows the input's).
    kernels = [p for p in model.parameters() if p.dim() == 4]
    assert len(kernels) > 20 and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["f_steps"] > 0


def test_validate_evaluates_in_the_model_dtype_and_memory_format(data):
    run = validate.setup([data, *TINY_VAL, "--channels-last", "--model-dtype", "float64", "--no-prefetcher"])
    assert {p.dtype for p in run.model.parameters()} == {torch.float64}
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in run.model.parameters() if p.dim() == 4)
    input, _ = next(iter(run.loader))
    assert input.dtype == torch.float64 and input.is_contiguous(memory_format=torch.channels_last)
    (result,) = validate.evaluate_limits(run)
    assert result["f_limit"] == 2.0 and result["f_steps"] <= 2 and 0 <= result["top1"] <= 100


def test_no_prefetcher_switches_to_torchs_loader_with_the_same_batches(data, tmp_path):
    batches = {}
    for name, flags in (("prefetch", []), ("no-prefetch", ["--no-prefetcher"])):
        run = train.setup(_train_args(data, tmp_path, name, "--model-dtype", "float64", *flags))
        if name == "prefetch":
            assert isinstance(run.loader_eval, PrefetchLoader)
        else:
            assert isinstance(run.loader_eval.loader, torch.utils.data.DataLoader)   # cast to float64 here
        batches[name] = next(iter(run.loader_eval))
    (a, target_a), (b, target_b) = batches["prefetch"], batches["no-prefetch"]
    assert a.dtype == b.dtype == torch.float64 and torch.equal(target_a, target_b)
    assert torch.allclose(a, b, atol=1e-5) and a.std() > 0.1


def test_initial_checkpoint_loads_the_weights_before_training(data, tmp_path):
    import timm

    source = timm.create_model("mdeq_tiny_cifar")
    weights = {k: v + 0.25 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "init.pth"
    torch.save({"state_dict": weights, "state_dict_ema": ema}, path)
    run = train.setup(_train_args(data, tmp_path, "init", "--initial-checkpoint", str(path)))
    state = run.task.get_trainable_module().state_dict()
    for key, value in ema.items():      # timm's --initial-checkpoint prefers the EMA weights
        if not key.endswith("schedule_state"):
            assert torch.equal(state[key], value), key
    assert run.start_epoch == 0 and not run.optimizer.state     # weights only, unlike --resume
    fresh = train.setup(_train_args(data, tmp_path, "fresh")).task.get_trainable_module().state_dict()
    assert not torch.equal(fresh["stem.conv1.weight"], state["stem.conv1.weight"])


def test_pretrained_path_starts_from_the_file_with_the_head_adapted(data, tmp_path):
    import timm

    source = timm.create_model("mdeq_tiny_cifar", num_classes=7)
    path = tmp_path / "pretrained.pth"
    torch.save(source.state_dict(), path)
    run = train.setup(_train_args(data, tmp_path, "pre", "--pretrained-path", str(path)))
    model = run.task.get_trainable_module()
    state = model.state_dict()
    assert model.fc.out_features != 7                     # the classifier follows the data, not the file
    for key, value in source.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("schedule_state"):
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("flags, expected", [
    (["--opt", "sgd"], 0.4 * 20 / 40),
    (["--opt", "adamw"], 0.4 * (20 / 40) ** 0.5),
    (["--opt", "adamw", "--lr-base-scale", "linear"], 0.4 * 20 / 40),
    (["--opt", "sgd", "--lr-base-scale", "sqrt"], 0.4 * (20 / 40) ** 0.5),
    (["--opt", "sgd", "--lr", "0.03"], 0.03),
], ids=["sgd-linear", "adamw-sqrt", "adamw-linear", "sgd-sqrt", "explicit-lr"])
def test_lr_base_sets_the_learning_rate_as_timm_computes_it(flags, expected, data, tmp_path):
    # global batch 20 = 10 per step x 1 process x 2 accumulated steps
    run = train.setup(_train_args(data, tmp_path, "lr", "--grad-accum-steps", "2", "--lr-base", "0.4",
                                  "--lr-base-size", "40", *flags))
    assert run.args.lr == pytest.approx(expected)
    assert run.optimizer.defaults["lr"] == pytest.approx(expected)


def test_grad_checkpointing_is_accepted_and_warns_that_mdeq_checkpoints_nothing(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run = train.setup(_train_args(data, tmp_path, "gc", "--grad-checkpointing"))
    assert run.task.get_trainable_module().grad_checkpointing is True
    assert "--grad-checkpointing has no effect on mdeq_tiny_cifar" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.setup(_train_args(data, tmp_path, "no-gc"))
    assert "--grad-checkpointing" not in caplog.text


def test_log_wandb_logs_each_epoch_and_warns_without_wandb(data, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)        # import wandb -> ImportError
    with caplog.at_level(logging.WARNING):
        run = train.setup(_train_args(data, tmp_path, "missing", "--log-wandb"))
    assert not run.log_wandb and "--log-wandb: wandb is not installed" in caplog.text

    calls = {"init": [], "log": []}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs)
    fake.log = lambda row: calls["log"].append(dict(row))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.import_module("timm.utils.summary"), "wandb", fake, raising=False)
    run = train.setup(_train_args(data, tmp_path, "logged", *FAST, "--log-wandb", "--wandb-project", "deq",
                                  "--wandb-tags", "a", "b"))
    train.train(run)
    (init,) = calls["init"]
    assert (init["project"], init["name"], init["tags"], init["config"].model) == ("deq", "logged", ["a", "b"],
                                                                                  "mdeq_tiny_cifar")
    assert [row["epoch"] for row in calls["log"]] == [0]
    assert {"train_loss", "train_f_steps", "eval_top1", "lr"} <= set(calls["log"][0])


# -- the timm release needed ------------------------------------------------------------------------

def _python(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.slow
def test_imports_name_the_timm_release_they_need_when_a_feature_is_missing():
    lines = _python("""
        import sys
        import timm.task

        def attempt(label, module):
            try:
                __import__(module)
            except ImportError as err:
                print(label, "|", err)
            else:
                print(label, "| imported")
            for name in [m for m in sys.modules if m.startswith("timm_deq")]:
                del sys.modules[name]

        saved = timm.task.TrainingTask.get_trainable_module
        del timm.task.TrainingTask.get_trainable_module          # timm 1.0.23-1.0.26
        attempt("old task", "timm_deq")
        timm.task.TrainingTask.get_trainable_module = saved
        sys.modules["timm.task"] = None                          # timm < 1.0.23
        attempt("no task", "timm_deq")
        sys.modules["timm.task"] = timm.task
        evaluator = sys.modules["timm.task.evaluator"]
        limit, cls = timm.task.evaluation_sample_limit, timm.task.ClassificationEvaluator
        del timm.task.evaluation_sample_limit, timm.task.ClassificationEvaluator   # timm 1.0.27-1.0.30
        sys.modules["timm.task.evaluator"] = None
        attempt("package", "timm_deq")
        attempt("train", "timm_deq.train")
        attempt("validate", "timm_deq.validate")
        sys.modules["timm.task.evaluator"] = evaluator
        timm.task.evaluation_sample_limit, timm.task.ClassificationEvaluator = limit, cls
        attempt("current train", "timm_deq.train")
    """)
    results = dict(line.split(" | ", 1) for line in lines if " | " in line)
    for label in ("old task", "no task"):
        assert "timm_deq needs timm >= 1.0.27" in results[label] and "is installed" in results[label], results
    assert results["package"] == "imported"
    for label in ("train", "validate"):
        assert f"need timm >= {_cli.TIMM_FOR_ENTRY_POINTS}" in results[label], results
        assert "timm.task.evaluation_sample_limit" in results[label], results
    assert results["current train"] == "imported"


def test_setup_cfg_requires_the_timm_release_the_entry_points_need():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    for extra in ("timm", "all"):
        pins = [line.strip() for line in cfg["options.extras_require"][extra].splitlines()
                if line.strip().startswith("timm")]
        assert pins == [f"timm>={_cli.TIMM_FOR_ENTRY_POINTS},<1.1"], (extra, pins)
