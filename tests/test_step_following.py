"""A DEQ layer inside a training loop that knows nothing about DEQs: it follows the optimizer's
steps (pretraining ends, the JR schedule moves) and says when its JR term never reaches a backward."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3, NativeScaler
from torch import nn

import timm_deq  # noqa: F401  (registers the models)
from deq_core import DEQLayer
from tests._maps import TanhCell


class _Net(nn.Module):
    """An equilibrium layer between an input projection and a head, as a user would write it."""

    def __init__(self, **deq):
        super().__init__()
        self.inp = nn.Linear(3, 3, dtype=torch.float64)
        self.deq = DEQLayer(TanhCell(4, 3), **deq)
        self.head = nn.Linear(4, 2, dtype=torch.float64)

    def forward(self, x):
        z, stats = self.deq(self.inp(x))
        return self.head(z), stats


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (4,), generator=g)


def _plain_steps(net, opt, steps, accumulate=1, with_jr=True):
    modes = []
    for step in range(steps):
        for micro in range(accumulate):
            x, y = _batch(step * accumulate + micro)
            out, stats = net(x)
            loss = F.cross_entropy(out, y) + (stats.jr_term if with_jr else 0.0)
            (loss / accumulate).backward()
            modes.append(stats.mode)
        opt.step()
        opt.zero_grad()
    return modes


def test_a_plain_loop_advances_pretraining_and_the_jr_schedule():
    torch.manual_seed(0)
    net = _Net(pretrain_steps=2, jac_weight=0.5, jac_weight_increment=0.25, jac_increment_every=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    modes = _plain_steps(net, opt, 6)
    assert modes == ["unrolled", "unrolled"] + ["implicit"] * 4
    assert net.deq.num_updates == 6 and net.deq.jac_weight == 0.5 + 2 * 0.25
    assert net.deq.schedule_state.tolist()[0] == 6  # what a checkpoint saves


def test_gradient_accumulation_counts_optimizer_steps_and_the_draws_count_micro_batches():
    torch.manual_seed(0)
    net = _Net(pretrain_steps=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    modes = _plain_steps(net, opt, 4, accumulate=3)
    assert net.deq.num_updates == 4
    assert modes == ["unrolled"] * 9 + ["implicit"] * 3
    # A second optimizer holding the layer's parameters, stepped in the same iteration, adds nothing:
    # a step counts once after at least one training pass.
    other = torch.optim.SGD(net.deq.parameters(), lr=0.0)
    _plain_steps(net, opt, 1)
    other.step()
    assert net.deq.num_updates == 5


def test_steps_that_do_not_update_the_layer_do_not_count():
    torch.manual_seed(0)
    net = _Net(pretrain_steps=3)
    head_only = torch.optim.SGD(net.head.parameters(), lr=0.01)
    _plain_steps(net, head_only, 3)
    assert net.deq.num_updates == 0
    # A loss scaler that finds an overflow skips optimizer.step(), and so the count.
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    out, _ = net(_batch(0)[0])
    scaler.scale(out.sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert net.deq.num_updates == 0
    opt.zero_grad()
    out, _ = net(_batch(1)[0])
    scaler.scale(out.sum()).backward()
    scaler.step(opt)
    assert net.deq.num_updates == 1


def test_an_explicit_step_count_takes_precedence_and_a_checkpoint_resumes_the_count():
    torch.manual_seed(0)
    net = _Net(pretrain_steps=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    _plain_steps(net, opt, 3)
    saved = copy.deepcopy(net.state_dict())
    resumed = _Net(pretrain_steps=4)
    resumed.load_state_dict(saved)
    assert resumed.deq.num_updates == 3
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.01)
    assert _plain_steps(resumed, opt2, 2) == ["unrolled", "implicit"] and resumed.deq.num_updates == 5
    net.deq.set_num_updates(100)
    _plain_steps(net, opt, 2)
    assert net.deq.num_updates == 100


def test_timm_style_loop_with_native_scaler_and_an_ema_copy():
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", pretrain_steps=2, f_max_iter=3, b_max_iter=3)
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = NativeScaler(device="cpu")
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    model.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y) + model.deq_stats.jr_term
        scaler(loss, opt)
        opt.zero_grad()
        ema.update(model)
    assert model.deq.num_updates == 3
    # The EMA copy is never stepped; it reads the step count timm copies into its buffers.
    ema.module.eval()
    with torch.no_grad():
        ema.module(x)
    assert ema.module.deq.num_updates == 3 and ema.module.deq.stats.mode == "implicit"


def test_a_jr_term_left_out_of_the_loss_is_reported_once():
    torch.manual_seed(0)
    net = _Net(jac_weight=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match=r"not the JR term.*Add stats\.jr_term to the loss") as record:
        _plain_steps(net, opt, 3, with_jr=False)
    assert sum("JR term" in str(w.message) for w in record) == 1
    assert {w.filename for w in record} == {__file__}  # attributed to the user's code, not torch's
    # With the term in the loss, no warning; and the term changes the gradient.
    torch.manual_seed(0)
    net = _Net(jac_weight=1.0)
    grads = []
    for with_jr in (False, True):
        net.zero_grad()
        out, stats = net(_batch(0)[0])
        (out.sum() + (stats.jr_term if with_jr else 0.0)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.deq.parameters()]))
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) > 1e-3
    net = _Net(jac_weight=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plain_steps(net, opt, 3)


def test_an_epoch_dependent_schedule_in_a_loop_without_epochs_is_reported_once():
    layer = DEQLayer(TanhCell(4, 3), jac_weight=0.4, jac_stop_epoch=1, f_max_iter=3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"jac_stop_epoch=1 switches JR off .*set_epoch\(\) was never called.*"
                                            r"jac_stop_step") as record:
        for _ in range(3):
            z, stats = layer(x)
            (z.sum() + stats.jr_term).backward()
            opt.step()
    assert sum("jac_stop_epoch" in str(w.message) for w in record) == 1
    layer.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, stats = layer(x)
    assert stats.jr_term == 0.0  # told the epoch, JR is off from epoch 1
