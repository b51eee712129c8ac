"""bfloat16 autocast through the training steps of both plugins: finite loss, gradients and JR,
f computed in bfloat16 while the solvers (forward and implicit backward) stay in float32."""
import csv
import math

import pytest
import torch

from tests._dtype_spy import register_dtype_spy

pytestmark = pytest.mark.usefixtures("one_thread")

SPY = "dtype_spy_mixed_precision"
SPY_OPTS = dict(f_solver=SPY, f_solver_options={}, b_solver=SPY, b_solver_options={})


@pytest.fixture(scope="module")
def spy():
    return register_dtype_spy(SPY)


def _finite_grads(module):
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    return sum(float(g.float().norm()) for g in grads)


def test_timm_task_step_under_bf16_autocast(spy):
    timm = pytest.importorskip("timm")
    from timm_deq.task import DEQClassificationTask, set_deq_step

    model = timm.create_model("mdeq_tiny_cifar", f_max_iter=6, b_max_iter=6, jac_freq=1.0, **SPY_OPTS)
    task = DEQClassificationTask(model, device=torch.device("cpu"), verbose=False).train()
    set_deq_step(model, 0)
    compute = set()
    model.deq.f.blocks[0].conv1.register_forward_hook(lambda m, i, out: compute.add(out.dtype))
    spy.clear()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = task(x, y)
    result["loss"].backward()
    stats = model.deq_stats
    assert compute == {torch.bfloat16}                      # f really ran in bfloat16
    assert spy.state == {torch.float32} and spy.outputs == {torch.float32}
    assert stats.f_abs_res.dtype == torch.float32 and stats.b_abs_res.dtype == torch.float32
    assert stats.mode == "implicit" and stats.b_steps is not None
    assert stats.jac_loss is not None and math.isfinite(float(stats.jac_loss.detach()))
    assert float(result["jr_loss"].detach()) > 0 and math.isfinite(float(result["loss"].detach()))
    assert _finite_grads(model) > 0


@pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header):UserWarning")
def test_fairseq_step_under_bf16_autocast(spy, tmp_path):
    pytest.importorskip("fairseq")
    from tests._fairseq_helpers import VOCAB, build, write_dictionary

    data = write_dictionary(tmp_path)
    cfg, task, model = build(data, "--arch", "deq_transformer_lm_tiny", "--task", "language_modeling",
                             "--tokens-per-sample", "16", "--criterion", "cross_entropy_jr", "--jac-freq", "1",
                             "--f-solver", SPY, "--b-solver", SPY, "--f-max-iter", "8", "--b-max-iter", "8")
    criterion = task.build_criterion(cfg.criterion)
    tokens = torch.randint(4, VOCAB + 4, (4, 17), generator=torch.Generator().manual_seed(0))
    sample = {"id": torch.arange(4), "nsentences": 4, "ntokens": 64,
              "net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((4,), 16)},
              "target": tokens[:, 1:].contiguous()}
    compute = set()
    model.decoder.deq.f.ffn.fc1.register_forward_hook(lambda m, i, out: compute.add(out.dtype))
    model.train()
    model.set_num_updates(0)
    spy.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, log = criterion(model, sample)
    loss.backward()
    stats = model.decoder.deq.stats
    assert compute == {torch.bfloat16}
    assert spy.state == {torch.float32} and spy.outputs == {torch.float32}
    assert stats.f_abs_res.dtype == torch.float32 and stats.b_abs_res.dtype == torch.float32
    assert math.isfinite(float(loss.detach())) and math.isfinite(float(log["deq_jr"]))
    assert float(log["deq_b_calls"]) == 1
    assert _finite_grads(model) > 0


def test_timm_cli_trains_an_epoch_with_bf16_amp(tmp_path):
    pytest.importorskip("timm")
    from timm_deq import shapes, train

    data = shapes.make_shapes(str(tmp_path / "data"), train_per_class=2, val_per_class=1, size=16)
    out = train.main([data, "--model", "mdeq_tiny_cifar", "--img-size", "16", "-b", "10", "-j", "0", "--no-aug",
                      "--epochs", "1", "--f-max-iter", "4", "--b-max-iter", "4", "--jac-freq", "1",
                      "--amp", "--amp-dtype", "bfloat16", "--output", str(tmp_path), "--experiment", "bf16"])
    with open(f"{out['output_dir']}/summary.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    for key in ("train_loss", "train_task_loss", "train_jac_loss", "train_f_steps", "train_b_steps", "eval_loss"):
        assert math.isfinite(float(row[key])), key
    assert float(row["train_jac_steps"]) == 1.0 and float(row["train_jac_loss"]) > 0
