"""End-to-end runs of the timm entry points on a small generated dataset."""
import csv
import math

import pytest
import torch

pytest.importorskip("timm")
from timm_deq import shapes, train, validate  # noqa: E402
from deq_core import DEQLayer  # noqa: E402
from tests._maps import TanhCell  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs: left out of the fast loop

COMMON = ["--model", "mdeq_tiny_cifar", "-b", "12", "-j", "0", "--opt", "adamw", "--lr", "3e-3",
          "--weight-decay", "0", "--no-aug", "--smoothing", "0", "--warmup-epochs", "0", "--log-interval", "2",
          "--f-max-iter", "4", "--b-max-iter", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes.make_shapes(str(tmp_path_factory.mktemp("shapes")), train_per_class=6, val_per_class=3)


def _rows(output_dir):
    with open(f"{output_dir}/summary.csv") as fh:
        return list(csv.DictReader(fh))


def test_training_decreases_the_loss_and_logs_solver_metrics(data, tmp_path):
    out = train.main([data, *COMMON, "--epochs", "4", "--output", str(tmp_path), "--experiment", "run",
                      "--jac-weight", "0.5", "--jac-freq", "0.5"])
    rows = _rows(out["output_dir"])
    assert len(rows) == 4
    losses = [float(r["train_task_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    for key in ("train_f_steps", "train_b_steps", "train_f_rel_res", "train_jac_frobenius", "train_jac_steps",
                "eval_top1", "eval_top5", "eval_f_steps"):
        assert key in rows[0], key
    assert all(float(r["train_f_steps"]) <= 4 for r in rows)
    # JR ran exactly on the steps whose Bernoulli(0.5) draw (seed 3) said so: the same draws as any
    # DEQLayer with that seed and frequency makes at those steps.
    probe = DEQLayer(TanhCell(2, 2), jac_weight=1.0, jac_freq=0.5, seed=3, f_max_iter=1, name="deq")
    x = torch.zeros(1, 2, dtype=torch.float64)
    steps_per_epoch = 5
    for epoch, row in enumerate(rows):
        expected = 0
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            probe.set_num_updates(step)
            expected += probe(x)[1].jac_frobenius is not None
        assert float(row["train_jac_steps"]) == pytest.approx(expected / steps_per_epoch)


def test_pretraining_switches_to_the_solver_at_the_configured_step(data, tmp_path):
    out = train.main([data, *COMMON, "--epochs", "2", "--output", str(tmp_path), "--experiment", "pre",
                      "--pretrain-steps", "5", "--unrolled-layers", "3"])
    first, second = _rows(out["output_dir"])
    assert float(first["train_f_steps"]) == 3 and math.isnan(float(first["train_b_steps"]))
    assert float(second["train_b_steps"]) > 0  # implicit backward from step 5 on


def test_resume_restores_model_optimizer_scheduler_and_ema(data, tmp_path):
    args = [data, *COMMON, "--epochs", "2", "--output", str(tmp_path), "--experiment", "full", "--model-ema",
            "--model-ema-decay", "0.5", "--jac-weight", "0.5", "--jac-freq", "1.0"]
    out = train.main(args)
    straight = _rows(out["output_dir"])
    ckpt_path = f"{out['output_dir']}/checkpoint-0.pth.tar"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    resumed_args = [a for a in args if a not in ("full",)] + ["--resume", ckpt_path]
    resumed_args[resumed_args.index("--experiment") + 1:resumed_args.index("--experiment") + 1] = ["resumed"]
    run = train.setup(resumed_args)
    model = run.task.get_trainable_module()
    ema = run.task.get_trainable_module(ema=True).module
    for module, saved in ((model, ckpt["state_dict"]), (ema, ckpt["state_dict_ema"])):
        for k, v in saved.items():
            if k == "deq.schedule_state":  # saved at the last step of epoch 0; now at the next one
                assert v.tolist() == [4, 0] and module.state_dict()[k].tolist() == [5, 1]
            else:
                assert torch.equal(module.state_dict()[k], v), k
    opt_state = run.optimizer.state_dict()
    for pid, st in ckpt["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(opt_state["state"][pid][name]), torch.as_tensor(value))
    assert run.start_epoch == 1 and run.num_updates == 5 and model.deq.num_updates == 5
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(float(straight[1]["lr"]))
    metrics = train.train(run)
    resumed_rows = _rows(run.output_dir)
    assert [r["epoch"] for r in resumed_rows] == ["1"] and "top1" in metrics


def test_validate_reports_one_accuracy_per_limit(data, tmp_path):
    out = train.main([data, *COMMON, "--epochs", "1", "--output", str(tmp_path), "--experiment", "v"])
    results_file = tmp_path / "limits.csv"
    results = validate.main([data, "--model", "mdeq_tiny_cifar", "--checkpoint",
                             f"{out['output_dir']}/model_best.pth.tar", "--eval-max-iter", "1", "2", "6",
                             "-j", "0", "-b", "16", "--results-file", str(results_file)])
    assert [r["f_limit"] for r in results] == [1.0, 2.0, 6.0]
    assert all(0 <= r["top1"] <= 100 for r in results)
    assert [r["f_steps"] <= r["f_limit"] for r in results] == [True] * 3
    assert results[0]["f_steps"] == 1.0
    with open(results_file) as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_bad_flags_fail_early(data, tmp_path):
    with pytest.raises(ValueError, match=r"f_max_iter must be >= 1"):
        train.setup([data, *COMMON, "--f-max-iter", "0", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        train.setup(["--model", "mdeq_tiny_cifar"])
    with pytest.raises(ValueError, match="--amp-dtype must be 'float16' or 'bfloat16'"):
        train.setup([data, *COMMON, "--amp", "--amp-dtype", "fp8", "--output", str(tmp_path)])


def test_example_recipes_parse_and_build_valid_configs():
    import glob
    import shlex

    import timm

    from deq_core import DEQConfig
    scripts = sorted(glob.glob("examples/imagenet/train_*.sh") + glob.glob("examples/cifar10/train_*.sh"))
    assert len(scripts) == 3
    for path in scripts:
        text = open(path).read().replace("\\\n", " ")
        cmd = text.split("-m timm_deq.train", 1)[1].split('"$@"', 1)[0]
        argv = ["DATA"] + shlex.split(cmd.replace('"$DATA"', ""))
        args = train.build_parser().parse_args(argv)
        overrides = train._deq_overrides(args)
        model_cfg = timm.models.get_pretrained_cfg(args.model)
        assert model_cfg is not None, path
        DEQConfig.from_dict(overrides)  # every DEQ value in the recipe is valid
        # The recipes rely on the variants' defaults for the paper's schedule.
        cfg = timm.create_model(args.model, device="meta", **overrides).deq.config
        assert cfg.pretrain_steps > 0 and cfg.f_max_iter_jitter == 2 and cfg.jac_weight > 0, path


@pytest.mark.parametrize("restart", [False, True])
def test_fine_tuning_keeps_the_loaded_step_count_unless_told_to_restart(data, tmp_path, restart, caplog):
    import timm

    source = timm.create_model("mdeq_tiny_cifar", pretrain_steps=1003)
    source.set_num_updates(1000)  # a checkpoint three steps before the end of its pretraining
    path = tmp_path / "pretrained.pth"
    torch.save(source.state_dict(), path)
    extra = ["--restart-deq-schedule"] if restart else []
    with caplog.at_level("INFO", logger="train"):  # timm_deq.train logs as timm's train.py does
        out = train.main([data, *COMMON, "--epochs", "2", "--output", str(tmp_path), "--experiment", "ft",
                          "--pretrain-steps", "1003", "--unrolled-layers", "3", "--initial-checkpoint", str(path),
                          *extra])
    first, second = _rows(out["output_dir"])
    saved = torch.load(f"{out['output_dir']}/last.pth.tar", map_location="cpu", weights_only=False)
    step = int(saved["state_dict"]["deq.schedule_state"][0])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Equilibrium layers at step"))
    if restart:
        # Pretraining from step 0: both epochs (5 updates each) run the 3-layer unrolled stack.
        assert step == 9 and float(second["train_f_steps"]) == 3 and math.isnan(float(second["train_b_steps"]))
        assert line == ("Equilibrium layers at step 0, restarted at 0 (--restart-deq-schedule): unrolled "
                        "pretraining until step 1003 (3 layers)")
    else:
        # Steps 1000..1009: the solver (and its backward solve) from step 1003, inside the first epoch.
        assert step == 1009 and float(second["train_b_steps"]) > 0 and float(first["train_b_steps"]) > 0
        assert line == ("Equilibrium layers at step 1000, continuing the loaded weights' count (1000): unrolled "
                        "pretraining until step 1003 (3 layers)")


def test_timms_loss_schedule_and_batchnorm_flags_reach_the_run(data, tmp_path):
    out = train.main([data, *COMMON, "--epochs", "1", "--output", str(tmp_path), "--experiment", "flags",
                      "--bce-loss", "--bce-target-thresh", "0.2", "--bn-momentum", "0.01", "--bn-eps", "1e-3",
                      "--sched", "plateau", "--patience-epochs", "2", "--lr-noise", "0.4", "0.9",
                      "--train-num-samples", "60"])
    saved = torch.load(f"{out['output_dir']}/last.pth.tar", map_location="cpu", weights_only=False)
    args = saved["args"]
    assert args.bce_loss and args.bce_target_thresh == 0.2 and args.patience_epochs == 2 and args.lr_noise == [0.4, 0.9]
    assert math.isfinite(out["loss"])


def test_validate_writes_json_results_and_takes_timms_input_flags(data, tmp_path):
    import json

    path = tmp_path / "r.json"
    results = validate.main([data, "--model", "mdeq_tiny_cifar", "-b", "8", "-j", "0", "--f-max-iter", "3",
                             "--eval-max-iter", "2", "3", "--results-file", str(path), "--results-format", "json",
                             "--crop-mode", "squash", "--use-train-size", "--num-samples", "12",
                             "--torchcompile", "aot_eager"])
    assert json.loads(path.read_text()) == results and [r["f_limit"] for r in results] == [2.0, 3.0]


def test_the_reversible_mode_trains_and_validates_from_timms_entry_points(data, tmp_path):
    flags = ["--backward", "reversible", "--reversible-steps", "3", "--reversible-beta", "0.5"]
    common = [a for a in COMMON if a not in ("--f-max-iter", "--b-max-iter", "4")]
    out = train.main([data, *common, *flags, "--epochs", "3", "--output", str(tmp_path), "--experiment", "rev"])
    rows = _rows(out["output_dir"])
    assert float(rows[-1]["train_task_loss"]) < float(rows[0]["train_task_loss"])
    for r in rows:
        assert float(r["train_f_steps"]) == 7 and float(r["train_b_steps"]) == 6  # 2 N + 1 and 2 N
        assert float(r["train_b_rel_res"]) < 1e-4 and float(r["eval_f_steps"]) == 7
    checkpoint = f"{out['output_dir']}/last.pth.tar"
    results = validate.main([data, "--model", "mdeq_tiny_cifar", "--checkpoint", checkpoint, "-b", "12", "-j", "0",
                             *flags])
    assert results and math.isfinite(float(results[0]["top1"]))
