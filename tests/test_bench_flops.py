"""The FLOP counts of bench.timm_mdeq --flops (bench._flops) are counts of the work done: a
training step held at k/k solver steps costs two evaluations of f (forward, and the backward
solve's vector-Jacobian product) more per step, and the printed ratios are those of the counted
numbers."""
import contextlib

import pytest
import torch

pytest.importorskip("timm")

import timm  # noqa: E402

from bench import timm_mdeq  # noqa: E402
from bench._flops import FlopRow, count_flops, flop_table, forced_steps, ratios  # noqa: E402

CONV = ("aten.convolution", "aten.convolution_backward")


def _tiny_mdeq():
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", num_classes=10, pretrain_steps=0).train()
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def test_step_flops_grow_by_two_evaluations_of_f_per_solver_step():
    model, opt = _tiny_mdeq()
    task = timm_mdeq.classification_task(model)
    layer = model.deq
    x = torch.randn(1, 3, 32, 32)
    y = torch.tensor([3])
    with torch.no_grad():
        injection = model.stem(x)
        z0 = layer.f.init_state(injection)
    one_f = count_flops(lambda: layer.f(z0, injection))
    counts, seen = {}, {}
    for k in (2, 4, 6):
        def step():
            with forced_steps([layer], k, k):
                seen[k] = timm_mdeq.train_step(task, opt, x, y, contextlib.nullcontext, k)[1]
        counts[k] = count_flops(step)
        assert seen[k] == [(float(k), float(k))]
        assert counts[k].uncounted == ()
    # Everything counted: two f per step, plus the solvers' small matrix products (Broyden's
    # low-rank updates, a few per cent here and growing with the step).
    for a, b in ((2, 4), (4, 6), (2, 6)):
        slope = (counts[b].total - counts[a].total) / (b - a)
        assert slope == pytest.approx(2 * one_f.total, rel=0.03), (a, b)
    # The convolutions (all of f's FLOPs, and no solver's) grow by exactly one forward and one
    # input-gradient evaluation of f per step.
    conv = {k: sum(c.by_op.get(op, 0) for op in CONV) for k, c in counts.items()}
    assert (conv[6] - conv[2]) / 4 == pytest.approx(2 * one_f.by_op["aten.convolution"], rel=1e-9)
    assert one_f.total == one_f.by_op["aten.convolution"] > 0


def test_table_ratios_are_the_quotients_of_its_numbers():
    rows = [FlopRow("deq", 300_000_000_000, 3.0, steps=(6.0, 5.0), forced=(6, 6)),
            FlopRow("base", 100_000_000_000, 1.5), FlopRow("other", 200_000_000_000, 1.0, uncounted=("aten.foo",))]
    assert ratios(rows[0], rows[1]) == pytest.approx((3.0, 2.0, 2 / 3))
    lines = flop_table(rows, ["base", "other"])
    assert lines[0] == ("| model | solver steps fwd / bwd | GFLOP/step | FLOPs vs base | FLOPs vs other | s/step | "
                        "time vs base | time vs other | time/FLOP vs base | time/FLOP vs other |")
    assert lines[2] == "| deq | 6.0 / 5.0 | 300.00 | 3.00x | 1.50x | 3.000 | 2.00x | 3.00x | 0.67x | 2.00x |"
    assert lines[3] == "| base | - | 100.00 | 1.00x | 0.50x | 1.500 | 1.00x | 1.50x | 1.00x | 3.00x |"
    assert lines[5] == ("note: deq took 6.0 / 5.0 solver steps, not the 6 / 6 it was held to "
                        "(a sample diverged or stalled)")
    assert lines[6] == "note: other ran operations without a FLOP formula (not counted): aten.foo"


def test_comparison_rows_hold_the_counted_flops_and_the_table_prints_their_ratios():
    device = torch.device("cpu")
    rows = timm_mdeq.flop_comparison(["mdeq_tiny_cifar", "resnet18"], device, batch=2, img_size=32, steps=1,
                                     forced=(2,))
    assert [r.label for r in rows] == ["mdeq_tiny_cifar, training limits", "mdeq_tiny_cifar, 2/2 steps", "resnet18"]
    assert [r.steps for r in rows] == [(8.0, 7.0), (2.0, 2.0), None]
    assert timm_mdeq.flop_baselines(rows) == ["resnet18"]
    # The 2/2 row's count is that of a 2/2 step of the same model on the same shapes, counted anew.
    model, opt = _tiny_mdeq()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])

    def step():
        with forced_steps([model.deq], 2, 2):
            timm_mdeq.train_step(timm_mdeq.classification_task(model), opt, x, y, contextlib.nullcontext, 0)

    assert rows[1].flops == count_flops(step).total
    assert rows[0].flops > rows[1].flops > 0 and rows[2].flops > 0
    base = rows[2]
    for r, line in zip(rows, flop_table(rows, ["resnet18"])[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        flop_ratio, time_ratio = r.flops / base.flops, r.seconds / base.seconds
        assert cells[0] == r.label
        assert cells[2] == f"{r.flops / 1e9:.2f}"
        assert cells[3] == f"{flop_ratio:.2f}x"
        assert cells[4] == f"{r.seconds:.3f}"
        assert cells[5] == f"{time_ratio:.2f}x"
        assert cells[6] == f"{time_ratio / flop_ratio:.2f}x"


def test_profile_parts_add_up_to_the_step_and_hold_the_operations_run_in_them():
    prof, steps = timm_mdeq._profile("mdeq_tiny_cifar", torch.device("cpu"), 2, 16, amp=False)
    assert steps == (8.0, 7.0)
    spans = timm_mdeq._spans(prof)
    host, wall = timm_mdeq._host_split(spans)
    assert sum(host.values()) == pytest.approx(wall, rel=1e-9) and wall > 0
    # The operations placed in a part (as the GPU kernel times are) ran inside that part's time.
    ops = timm_mdeq._op_split(prof.events(), spans, lambda e: e.cpu_time_total)
    for key in timm_mdeq.PROFILE_PARTS:
        assert ops[key] <= host[key] * 1.001 + 1.0, key
    for key in ("f_solve", "f_star", "f_vjp", "f_backward", "fwd_book", "bwd_book", "stem", "head", "optimizer"):
        assert ops[key] > 0, key
    assert ops["wait"] == 0.0
