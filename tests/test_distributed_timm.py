"""The timm entry with two processes on CPU (torchrun, gloo, DistributedDataParallel): identical
parameters and per-step decisions on both ranks, and the same result as one process."""
import argparse
import csv
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
from deq_core import DEQLayer  # noqa: E402
from tests._launch import check, start, torchrun  # noqa: E402
from tests._maps import TanhCell  # noqa: E402
from timm_deq import shapes, train  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs: left out of the fast loop

WORKER = str(Path(__file__).with_name("_timm_ddp_worker.py"))
SEED, F_MAX_ITER, JITTER = 5, 5, 2
# No augmentation, no dropout (variational or head), a forward and backward solve of fixed length
# (tolerances no step reaches), plain SGD: nothing random but the data order and the JR probes.
COMMON = ["--model", "mdeq_tiny_cifar", "--img-size", "16", "-j", "0", "--no-aug", "--model-kwargs", "dropout=0.0",
          "--f-max-iter", str(F_MAX_ITER), "--f-max-iter-jitter", str(JITTER), "--f-tol", "1e-9",
          "--b-max-iter", "4", "--b-tol", "1e-9", "--opt", "sgd", "--lr", "0.05", "--weight-decay", "0",
          "--smoothing", "0", "--seed", str(SEED), "--log-interval", "1", "-vb", "10", "--experiment", "run"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Ten training images (one per class) of 16 pixels.
    return shapes.make_shapes(str(tmp_path_factory.mktemp("shapes")), train_per_class=1, val_per_class=1, size=16)


def _launch(*runs):
    """Start every ``(out_dir, nproc, args)`` run at once; return each one's per-rank results."""
    procs = []
    for out, nproc, args in runs:
        out.mkdir()
        argv = [str(out), *args, "--output", str(out)]
        procs.append(start(torchrun(nproc, WORKER, argv) if nproc > 1 else [sys.executable, WORKER, *argv], cwd=out))
    check(procs)
    return [[torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)] for out, nproc, _ in runs]


def _expected_decisions(steps, jac_freq):
    """(step, JR on, forward limit) that any layer with this seed and an MDEQ's layer name makes."""
    probe = DEQLayer(TanhCell(2, 2), jac_weight=1.0, jac_freq=jac_freq, seed=SEED, f_max_iter=F_MAX_ITER,
                     f_max_iter_jitter=JITTER, name="deq")
    x = torch.zeros(1, 2, dtype=torch.float64)
    out = []
    for step in range(steps):
        probe.set_num_updates(step)
        stats = probe(x)[1]
        out.append((step, stats.jac_frobenius is not None, stats.f_max_iter))
    return out


@pytest.mark.multiprocess
def test_two_ranks_stay_identical_and_make_the_same_jr_decisions(data, tmp_path):
    # One image per rank and update: 5 updates per epoch, 10 in all.
    ((r0, r1),) = _launch((tmp_path / "ddp", 2, [data, *COMMON, "-b", "1", "--epochs", "2", "--jac-weight", "0.4",
                                                 "--jac-freq", "0.5"]))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    for key, value in r0["state"].items():                  # parameters and buffers, bit for bit
        assert torch.equal(value, r1["state"][key]), key
    assert not all(torch.equal(v, r0["initial"][k]) for k, v in r0["state"].items())   # it trained
    expected = _expected_decisions(10, 0.5)
    assert r0["decisions"] == r1["decisions"] == expected
    assert {jr for _, jr, _ in expected} == {True, False} and len({lim for *_, lim in expected}) > 1
    # Rank 0 alone writes the summary and checkpoints; the statistics in it are over both ranks.
    assert r1["output_dir"] is None and Path(r0["output_dir"], "model_best.pth.tar").exists()
    with open(Path(r0["output_dir"], "summary.csv")) as fh:
        rows = list(csv.DictReader(fh))
    for epoch, row in enumerate(rows):
        on = [jr for step, jr, _ in expected if step // 5 == epoch]
        assert float(row["train_jac_steps"]) == pytest.approx(sum(on) / len(on))
        assert math.isfinite(float(row["train_jac_frobenius"])) and float(row["train_f_steps"]) <= F_MAX_ITER


@pytest.mark.multiprocess
def test_two_ranks_match_one_process_with_the_same_global_batch(data, tmp_path):
    # Each update sees all ten images in both runs: 2 ranks x 5 accumulated batches of 1, or one
    # process x 10 accumulated batches of 1. Batches of one image make BatchNorm (the stem and head;
    # SyncBatchNorm has no CPU kernel) per sample in both, so the grouping of images into batches,
    # which the two samplers order differently, does not change the gradient. JR is off here: its
    # probes are drawn per rank (seeded with the rank) and would differ by design.
    args = [data, *COMMON, "-b", "1", "--epochs", "3", "--jac-weight", "0"]
    (r0, r1), (single,) = _launch((tmp_path / "ddp", 2, [*args, "--grad-accum-steps", "5"]),
                                  (tmp_path / "single", 1, [*args, "--grad-accum-steps", "10"]))
    names = [k for k in single["state"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in names:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    limits = sorted(set((step, lim) for step, _, lim in single["decisions"]))
    assert sorted(set((step, lim) for step, _, lim in r0["decisions"])) == limits
    assert limits == [(s, lim) for s, _, lim in _expected_decisions(3, 0.0)]
    diff = torch.cat([(r0["state"][k] - single["state"][k]).flatten() for k in names]).norm()
    moved = torch.cat([(single["state"][k] - single["initial"][k]).flatten() for k in names]).norm()
    # float32 sums in another order (the all-reduce of two half-gradients against ten accumulated
    # ones) leave differences around 1e-6 of the distance the parameters moved; a wrong batch, a
    # missing all-reduce or a different solver limit would be of the order of that distance.
    assert float(moved) > 0.1 and float(diff / moved) < 1e-3


def test_sync_bn_on_cpu_fails_early_and_clearly():
    args = argparse.Namespace(sync_bn=True, distributed=True)
    with pytest.raises(SystemExit, match=r"--sync-bn needs CUDA devices \(torch's SyncBatchNorm has no cpu"):
        train.check_sync_bn(args, torch.device("cpu"))
    train.check_sync_bn(args, torch.device("cuda"))
    train.check_sync_bn(argparse.Namespace(sync_bn=True, distributed=False), torch.device("cpu"))
