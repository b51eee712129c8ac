"""Backward modes as registered objects: the registry, and a mode written outside deq_core that a
config selects by name and a model trains with end to end."""
import argparse
import dataclasses

import pytest
import torch
from torch import nn

from deq_core import (BackwardMode, DEQConfig, DEQLayer, ImplicitBackward, OptionValueError, add_deq_args,
                      config_from_args, get_backward, list_backward_modes, register_backward, unregister_backward)
from tests._maps import MLPCell, TanhCell


class RefinedImplicit(ImplicitBackward):
    """The implicit gradient at the solver's z* after two more fixed-point steps ``z <- f(z)``
    (no gradient), which the output f(z) is then taken at."""

    refinements = 2

    def solve(self, fp):
        result, max_iter = super().solve(fp)
        with torch.no_grad():
            z = result.z
            for _ in range(self.refinements):
                z = fp.fn(z)
        return dataclasses.replace(result, z=z, fz=fp.fn(z) if not fp.grad else None), max_iter


@pytest.fixture(autouse=True, scope="module")
def _refined_mode():
    """The user's mode, registered as a user's code would, for this module only."""
    register_backward("implicit_refined")(RefinedImplicit)
    yield
    unregister_backward("implicit_refined")


def test_the_built_in_modes_and_a_users_are_registered_by_name():
    assert list_backward_modes()[:4] == ("implicit", "phantom", "unrolled", "reversible")
    assert get_backward("implicit_refined") is RefinedImplicit and RefinedImplicit.name == "implicit_refined"
    with pytest.raises(ValueError, match=r"unknown backward mode 'nope'; registered: \['implicit', 'phantom'"):
        get_backward("nope")
    with pytest.raises(OptionValueError, match=r"backward must be one of \['implicit', 'phantom', 'unrolled', "
                                               r"'reversible', 'implicit_refined'.*got 'nope'") as err:
        DEQConfig(backward="nope")
    assert err.value.options == ("backward",)
    with pytest.raises(ValueError, match="already registered"):
        register_backward("phantom")(RefinedImplicit)
    with pytest.raises(TypeError, match="takes a BackwardMode subclass"):
        register_backward("not_a_mode")(object)


def test_a_users_mode_is_selected_by_the_command_line_and_reads_its_parents_options():
    parser = add_deq_args(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--backward", "implicit_refined", "--b-max-iter", "9"]))
    assert cfg.backward == "implicit_refined" and cfg.b_max_iter == 9
    with pytest.warns(UserWarning, match=r"backward='implicit_refined' does not use phantom_steps=3"):
        DEQConfig(backward="implicit_refined", phantom_steps=3)


def test_a_users_mode_gives_the_implicit_gradient_at_its_refined_point():
    torch.manual_seed(0)
    cell = TanhCell(5, 3, scale=0.6)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    layer = DEQLayer(cell, backward="implicit_refined", f_max_iter=4, f_tol=1e-30, b_max_iter=80, b_tol=1e-13,
                     b_stop_mode="abs", jac_weight=0.0)
    z, stats = layer(x)
    assert stats.mode == "implicit_refined"
    # The value: f at the point the solver reached, moved by two fixed-point steps.
    with torch.no_grad():
        plain = DEQConfig(f_max_iter=4, f_tol=1e-30).forward_solve(training=True)
        z_star = plain.run(lambda v: cell(v, x), cell.init_state(x)).z
        refined = cell(cell(z_star, x), x)
        assert torch.allclose(z, cell(refined, x), atol=1e-14)
    # The gradient: (I - J)^-T at the refined point, dense.
    z.pow(2).sum().backward()
    jac = torch.autograd.functional.jacobian(lambda v: cell(v, x.detach()), refined)  # (4, 5, 4, 5)
    out = cell(refined, x.detach())
    g = 2 * out
    expected = torch.zeros_like(x)
    for b in range(4):
        u = torch.linalg.solve(torch.eye(5, dtype=torch.float64) - jac[b, :, b, :].T, g[b])
        xb = x.detach()[b:b + 1].clone().requires_grad_()
        (vjp,) = torch.autograd.grad(cell(refined[b:b + 1], xb), xb, u[None])
        expected[b] = vjp[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-12)


def test_a_model_trains_end_to_end_with_a_users_mode():
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.deq = DEQLayer(MLPCell(dim=16, hidden=32), backward="implicit_refined", f_max_iter=15, jac_weight=0.5)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            z, stats = self.deq(self.inp(x))
            return self.head(z), stats

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    losses = []
    for _ in range(80):
        logits, stats = model(x)
        loss = nn.functional.cross_entropy(logits, y) + stats.jr_term
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert stats.mode == "implicit_refined" and stats.b_steps is not None
    assert losses[-1] < 0.5 * losses[0]
    assert model.deq.num_updates == 80


def test_a_mode_is_created_per_pass_from_the_layers_config():
    seen = []

    @register_backward("spy_mode_test")
    class Spy(ImplicitBackward):
        def __init__(self, config):
            super().__init__(config)
            seen.append(config)

    try:
        layer = DEQLayer(TanhCell(4, 3), backward="spy_mode_test", pretrain_steps=1)
        x = torch.randn(2, 3, dtype=torch.float64)
        layer(x)  # a pretraining pass: the unrolled mode, whatever is configured
        assert seen == [] and layer.stats.mode == "unrolled"
        layer.set_num_updates(1)
        with layer.overridden(f_max_iter=3):
            layer(x)
        assert len(seen) == 1 and seen[0].f_max_iter == 3 and isinstance(layer.backward_mode(), BackwardMode)
    finally:
        unregister_backward("spy_mode_test")
