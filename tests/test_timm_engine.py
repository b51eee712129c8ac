"""timm_deq's training loop never applies a non-finite gradient: it skips the update, and stops,
weights intact, when they keep coming."""
import argparse

import pytest
import torch

pytest.importorskip("timm")
import timm  # noqa: E402

import timm_deq  # noqa: E402
from timm_deq import engine  # noqa: E402


def _run(poisoned, updates=4):
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", num_classes=10, pretrain_steps=0, f_max_iter=3, b_max_iter=3)
    task = timm_deq.DEQClassificationTask(model, verbose=False)
    class Poisoned(torch.nn.Module):
        """timm's criterion, NaN at the calls in ``poisoned``."""

        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, output, target):
            self.calls += 1
            loss = self.criterion(output, target)
            return loss * float("nan") if self.calls in poisoned else loss

    task.criterion = Poisoned(task.criterion)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(updates)]
    args = argparse.Namespace(grad_accum_steps=1, clip_grad=None, clip_mode="norm", mixup_off_epoch=0,
                              log_interval=100, distributed=False)
    before = [p.detach().clone() for p in model.parameters()]
    return model, before, lambda: engine.train_one_epoch(0, task, loader, optimizer, args, torch.device("cpu"), 0)


def test_an_update_with_non_finite_gradients_is_skipped_and_reported(caplog):
    model, before, run = _run(poisoned={2})
    with caplog.at_level("WARNING", logger="train"):
        metrics, updates = run()
    assert updates == 4
    assert any("update 1: non-finite gradients, update skipped (1 in a row" in r.getMessage() for r in caplog.records)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the other updates applied


def test_training_stops_with_the_weights_intact_when_every_update_is_non_finite(monkeypatch):
    monkeypatch.setattr(engine, "MAX_SKIPPED_UPDATES", 3)
    model, before, run = _run(poisoned=set(range(1, 10)))
    with pytest.raises(RuntimeError, match=r"stopping: 3 updates in a row had non-finite gradients .* none was "
                                           r"applied, so the weights and the last checkpoint are intact"):
        run()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_step_that_makes_float16_weights_non_finite_stops_naming_the_update():
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", num_classes=10, pretrain_steps=0, f_max_iter=3, b_max_iter=3,
                              jac_weight=0.0).half()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # eps 1e-8 is 0 in float16
    task = timm_deq.DEQClassificationTask(model, verbose=False)
    loader = [(torch.randn(4, 3, 32, 32).half(), torch.randint(0, 10, (4,)))]
    args = argparse.Namespace(grad_accum_steps=1, clip_grad=None, clip_mode="norm", mixup_off_epoch=0,
                              log_interval=100, distributed=False)
    with pytest.raises(RuntimeError, match=r"stopping: the update of epoch 0, update 0 made weights non-finite "
                                           r"although its gradients were finite"):
        engine.train_one_epoch(0, task, loader, optimizer, args, torch.device("cpu"), 0)
