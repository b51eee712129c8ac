"""Mixed precision through the equilibrium layer and both plugins: only f runs in reduced
precision (forward solve, backward solve and JR stay in the state dtype), solves end at the
precision floor and say so, and loss scaling neither changes gradients nor hides an overflow."""
import csv
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bench.cells import TransformerCell
from deq_core import DEQLayer, anderson
from tests._dtype_spy import register_dtype_spy
from tests._maps import MLPCell

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
    assert stats.jac_frobenius is not None and math.isfinite(float(stats.jac_frobenius.detach()))
    assert float(result["jr_term"].detach()) > 0 and math.isfinite(float(result["loss"].detach()))
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
    # The solver outcomes reach fairseq's logs: the share of samples stalled at bfloat16's floor.
    assert float(log["deq_f_stalled"]) == float(stats.f_stalled.float().mean())
    assert float(log["deq_b_stalled"]) == float(stats.b_stalled.float().mean())
    assert _finite_grads(model) > 0


@pytest.mark.slow
def test_timm_cli_trains_an_epoch_with_bf16_amp(tmp_path):
    pytest.importorskip("timm")
    from timm_deq import shapes, train

    data = shapes.make_shapes(str(tmp_path / "data"), train_per_class=2, val_per_class=1, size=16)
    out = train.main([data, "--model", "mdeq_tiny_cifar", "--img-size", "16", "-b", "10", "-j", "0", "--no-aug",
                      "--epochs", "1", "--f-max-iter", "4", "--b-max-iter", "4", "--jac-freq", "1",
                      "--amp", "--amp-dtype", "bfloat16", "--output", str(tmp_path), "--experiment", "bf16"])
    with open(f"{out['output_dir']}/summary.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    for key in ("train_loss", "train_task_loss", "train_jac_frobenius", "train_f_steps", "train_b_steps", "eval_loss",
                "train_f_stalled", "train_b_stalled", "eval_f_stalled"):
        assert math.isfinite(float(row[key])), key
    assert float(row["train_jac_steps"]) == 1.0 and float(row["train_jac_frobenius"]) > 0


_ARITHMETIC = {"bmm", "mm", "matmul", "__matmul__", "solve_ex", "solve", "lu_factor_ex", "lu_solve", "vector_norm", "norm", "sum", "mean",
               "pow", "mul", "sub", "add", "lerp", "where", "dot", "einsum"}
_REDUCED = (torch.float16, torch.bfloat16)


class _ArithmeticSpy(TorchFunctionMode):
    """Records (name, dtype) of every floating-point result of the listed torch functions that is
    computed outside f (f's own forward is tracked with hooks; its VJPs run in autograd's C++ and
    are never seen here)."""

    def __init__(self, f):
        super().__init__()
        self.depth, self.outside = 0, []
        f.register_forward_pre_hook(lambda *a: self._enter())
        f.register_forward_hook(lambda *a: self._leave())

    def _enter(self):
        self.depth += 1

    def _leave(self):
        self.depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "").replace("linalg_", "")
        if self.depth == 0 and name.rstrip("_") in _ARITHMETIC:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.outside.append((name, t.dtype))
        return out


@pytest.mark.parametrize("b_solver", ["broyden", "anderson"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_reduced_precision_arithmetic_outside_f_in_a_training_step(dtype, b_solver):
    torch.manual_seed(0)
    f = TransformerCell(d_model=32, heads=2, d_ffn=64)
    layer = DEQLayer(f, f_solver="anderson", f_max_iter=12, b_solver=b_solver, b_max_iter=12, jac_weight=1.0,
                     jac_freq=1.0)
    x = torch.randn(2, 16, 32)
    spy = _ArithmeticSpy(f)
    with spy:
        with torch.autocast("cpu", dtype=dtype):
            z, stats = layer(x)
            loss = z.pow(2).mean() + stats.jr_term
        loss.backward()
        radius = layer.spectral_radius(x, n_iter=3)
    names = {name for name, _ in spy.outside}
    assert {"bmm", "lu_solve", "vector_norm", "sum"} <= names   # the spy saw the solvers and JR
    assert [(n, d) for n, d in spy.outside if d in _REDUCED] == []
    assert stats.b_steps is not None and stats.jac_frobenius.dtype == torch.float32
    assert radius.dtype == torch.float32 and bool(torch.isfinite(radius).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in f.parameters())


def test_bfloat16_solve_with_default_tolerances_ends_at_the_floor_and_says_so():
    torch.manual_seed(0)
    f, x = TransformerCell(d_model=64, heads=4, d_ffn=128), torch.randn(2, 64, 64)
    layer = DEQLayer(f)  # defaults: Anderson, 30 iterations, absolute tolerance 1e-3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = layer(x)
    summary = stats.to_dict()
    assert summary["f_stalled"] == 1.0 and summary["f_converged"] == 0.0 and summary["f_diverged"] == 0.0
    assert summary["f_steps_max"] < layer.config.f_max_iter
    assert summary["f_rel_res"] < 2 * 2 ** -8
    # float32: no floor, no stall; the layer solves exactly as the bare solver implementation does.
    with torch.no_grad():
        z32, stats32 = layer(x)
        raw = anderson.__wrapped__(lambda z: f(z.view_as(x), x).reshape(2, -1), torch.zeros(2, x[0].numel()),
                                   max_iter=30, tol=1e-3)
    assert stats32.f_steps.tolist() == raw.steps.tolist() and not bool(stats32.f_stalled.any())
    assert torch.equal(z32.reshape(2, -1), raw.fz)  # the layer returns f at the best iterate


def _step_grads(layer, x, scale=1.0, dtype=torch.float16, inject=False):
    """Parameter gradients of ``scale * loss`` under autocast (None: float32), divided by ``scale``;
    ``scale`` may be a GradScaler, which then scales the loss."""
    layer.zero_grad()
    torch.manual_seed(3)  # the same JR probe in every run
    with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
        z, stats = layer(x)
        if inject:  # one overflowed entry in the gradient that reaches the layer's output
            z.register_hook(lambda g: g.index_put((torch.tensor([0]), torch.tensor([1]), torch.tensor([2])),
                                                  torch.tensor(float("inf"))))
        loss = (z.float() - 0.5).pow(2).mean() + stats.jr_term
    if isinstance(scale, torch.amp.GradScaler):
        scale.scale(loss).backward()
        scale = scale.get_scale()
    else:
        (loss * scale).backward()
    return [p.grad / scale for p in layer.f.parameters()], stats


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_loss_scaling_leaves_gradients_unchanged(backward):
    torch.manual_seed(0)
    backward_limit = dict(b_max_iter=40) if backward == "implicit" else {}
    layer = DEQLayer(MLPCell(dim=16, hidden=32), backward=backward, f_max_iter=40, f_tol=1e-6,
                     jac_weight=0.5, jac_freq=1.0, **backward_limit)
    x = torch.randn(4, 8, 16)
    reference, _ = _step_grads(layer, x, dtype=None)
    unscaled, stats = _step_grads(layer, x)
    scaled, scaled_stats = _step_grads(layer, x, scale=2.0 ** 14)
    assert stats.jac_frobenius is not None and scaled_stats.jac_frobenius is not None
    for a, b, ref in zip(scaled, unscaled, reference):
        assert float((a - b).norm() / b.norm()) < 2e-3       # the scale itself changes nothing
        assert float((a - ref).norm() / ref.norm()) < 3e-2   # float16 against float32
    if backward == "implicit":
        assert scaled_stats.b_steps.tolist() == stats.b_steps.tolist()  # rel. stop: scale-free


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_overflow_in_the_incoming_gradient_reaches_the_parameters(backward):
    torch.manual_seed(0)
    f = MLPCell(dim=16, hidden=32)
    backward_limit = dict(b_max_iter=20) if backward == "implicit" else {}
    layer = DEQLayer(f, backward=backward, f_max_iter=20, jac_weight=0.5, jac_freq=1.0, **backward_limit)
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in f.parameters()]
    grads, _ = _step_grads(layer, torch.randn(4, 8, 16), scale=scaler, inject=True)
    assert not all(bool(torch.isfinite(g).all()) for g in grads)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 10                                  # the scaler saw the overflow
    assert all(torch.equal(p, q) for p, q in zip(f.parameters(), before))  # and skipped the step


def test_overflowing_float16_vector_jacobian_products_are_not_solved_away():
    # The incoming gradient is finite (float32), but at this scale f's float16 backward overflows
    # inside the backward solve; the overflow must reach the parameters, not a best finite iterate.
    torch.manual_seed(0)
    f = MLPCell(dim=16, hidden=32)
    layer = DEQLayer(f, f_max_iter=20, b_max_iter=20)
    x = torch.randn(4, 8, 16)
    grads, stats = _step_grads(layer, x, scale=1e14)
    assert bool(stats.b_diverged.all())
    assert not any(bool(torch.isfinite(g).all()) for g in grads)
    # In float32 the same scale is harmless.
    grads32, stats32 = _step_grads(layer, x, scale=1e14, dtype=None)
    assert all(bool(torch.isfinite(g).all()) for g in grads32) and not bool(stats32.b_diverged.any())


@pytest.mark.slow
def test_timm_cli_trains_with_float16_amp_and_a_grad_scaler(tmp_path):
    pytest.importorskip("timm")
    from timm_deq import shapes, train

    data = shapes.make_shapes(str(tmp_path / "data"), train_per_class=4, val_per_class=1, size=16)
    common = [data, "--model", "mdeq_tiny_cifar", "--img-size", "16", "-b", "10", "-j", "0", "--no-aug",
              "--epochs", "3", "--opt", "adamw", "--lr", "3e-3", "--weight-decay", "0", "--smoothing", "0",
              "--warmup-epochs", "0", "--f-max-iter", "12", "--b-max-iter", "12", "--jac-freq", "1",
              "--seed", "1", "--output", str(tmp_path)]
    runs = {}
    for name, flags in (("fp32", []), ("fp16", ["--amp", "--amp-dtype", "float16"])):
        run = train.setup(common + flags + ["--experiment", name])
        if name == "fp16":
            assert isinstance(run.loss_scaler._scaler, torch.amp.GradScaler)   # timm's NativeScaler on CPU
        train.train(run)
        with open(f"{run.output_dir}/summary.csv") as fh:
            runs[name] = list(csv.DictReader(fh))
    for name, rows in runs.items():
        losses = [float(r["train_loss"]) for r in rows]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (name, losses)
    for a, b in zip(runs["fp32"], runs["fp16"]):
        assert abs(float(a["train_f_steps"]) - float(b["train_f_steps"])) <= 2.0
        assert abs(float(a["train_b_steps"]) - float(b["train_b_steps"])) <= 2.0
        assert float(a["train_f_stalled"]) == 0.0
