"""Jacobian regularization, its schedule, the random per-step decisions and the spectral radius."""
import pytest
import torch

from deq_core import DEQLayer, JRSchedule, jac_frobenius_estimate, spectral_radius
from tests._maps import TanhCell


def _fixed_point(f, x):
    layer = DEQLayer(f, f_max_iter=200, f_tol=1e-12).eval()
    with torch.no_grad():
        return layer(x)[0]


def _exact_jac_norm(f, z, x, create_graph=False):
    jac = torch.autograd.functional.jacobian(lambda v: f(v, x), z, create_graph=create_graph)
    return jac.reshape(z.numel(), z.numel()).pow(2).sum() / z.numel()


@pytest.mark.parametrize("probe", ["normal", "rademacher"])
def test_hutchinson_estimate_is_within_3_percent_of_the_exact_norm(probe):
    f = TanhCell(8, 5, scale=0.9)
    x = torch.randn(1, 5, dtype=torch.float64)
    z = _fixed_point(f, x)
    exact = _exact_jac_norm(f, z, x)
    reps = 4000  # one sample repeated: each row draws its own probe
    z_in = z.expand(reps, -1).clone().requires_grad_()
    est = jac_frobenius_estimate(f(z_in, x.expand(reps, -1)), z_in, n_probes=2, distribution=probe)
    assert est.shape == (reps,)
    assert abs(float(est.mean().detach()) / float(exact) - 1) < 0.03


def test_jr_gradient_matches_the_exact_gradient_on_average():
    f = TanhCell(6, 4, scale=0.9)
    x = torch.randn(1, 4, dtype=torch.float64)
    z = _fixed_point(f, x)
    params = list(f.parameters())
    exact = torch.autograd.grad(_exact_jac_norm(f, z, x, create_graph=True), params)
    reps = 6000
    layer = DEQLayer(f, f_max_iter=200, f_tol=1e-12, b_max_iter=5, jac_weight=1.0, jac_freq=1.0)
    _, stats = layer(x.expand(reps, -1).clone())
    est = torch.autograd.grad(stats.jr_term, params)
    err = torch.cat([(a - b).flatten() for a, b in zip(est, exact)]).norm()
    ref = torch.cat([b.flatten() for b in exact]).norm()
    assert float(err / ref) < 0.05


def test_layer_adds_jr_only_in_training_with_positive_weight():
    f = TanhCell(6, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer = DEQLayer(f, jac_weight=0.5, jac_freq=1.0)
    _, stats = layer(x)
    assert stats.jac_frobenius is not None and stats.jac_frobenius.requires_grad
    assert float(stats.jr_term.detach()) == pytest.approx(0.5 * float(stats.jac_frobenius.detach()))
    layer.eval()
    assert layer(x)[1].jac_frobenius is None and layer(x)[1].jr_term == 0.0
    layer.train()
    with torch.no_grad():
        assert layer(x)[1].jac_frobenius is None
    assert DEQLayer(f, jac_weight=0.0)(x)[1].jac_frobenius is None


@pytest.mark.parametrize("backward", ["phantom", "unrolled", "reversible"])
def test_jr_in_other_backward_modes_matches_the_implicit_estimate(backward):
    f = TanhCell(6, 4)
    x = torch.randn(2, 4, dtype=torch.float64)
    base = dict(f_max_iter=200, f_tol=1e-12, jac_weight=1.0, jac_probes=1)
    torch.manual_seed(3)
    ref = DEQLayer(f, **base)(x)[1].jac_frobenius
    torch.manual_seed(3)
    extra = dict(reversible_steps=40) if backward == "reversible" else dict(unrolled_layers=60)
    layer = DEQLayer(f, **base, backward=backward, **extra)
    other = layer(x)[1].jac_frobenius
    assert torch.allclose(other, ref, rtol=1e-6)


def test_jr_frequency_and_identical_decisions_across_processes():
    f = TanhCell(4, 3)
    x = torch.randn(2, 3, dtype=torch.float64)

    def decisions(layer, steps=300):
        out = []
        for step in range(steps):
            layer.set_num_updates(step)
            out.append(layer(x)[1].jac_frobenius is not None)
        return out

    a = decisions(DEQLayer(f, jac_weight=1.0, jac_freq=0.35, f_max_iter=3))
    torch.manual_seed(123)  # another process's RNG state does not matter
    b = decisions(DEQLayer(f, jac_weight=1.0, jac_freq=0.35, f_max_iter=3))
    c = decisions(DEQLayer(f, jac_weight=1.0, jac_freq=0.35, f_max_iter=3, seed=1))
    assert a == b and a != c
    assert 0.27 < sum(a) / len(a) < 0.43


def test_forward_limit_jitter():
    layer = DEQLayer(TanhCell(4, 3), f_max_iter=10, f_max_iter_jitter=2, f_tol=1e-14)
    x = torch.randn(2, 3, dtype=torch.float64)
    limits = set()
    for step in range(60):
        layer.set_num_updates(step)
        limits.add(layer(x)[1].f_max_iter)
    assert limits == {8, 9, 10}
    layer.eval()
    assert layer(x)[1].f_max_iter == 10


def test_pretraining_then_solver_with_the_schedule():
    layer = DEQLayer(TanhCell(4, 3), pretrain_steps=2, unrolled_layers=3, pretrain_jac_weight=0.1,
                     jac_weight=1.0, jac_weight_increment=0.5, jac_increment_every=10)
    x = torch.randn(2, 3, dtype=torch.float64)
    layer.set_num_updates(1)
    _, stats = layer(x)
    assert layer.pretraining and stats.mode == "unrolled" and stats.f_steps.tolist() == [3, 3]
    assert stats.jac_weight == pytest.approx(0.1)
    layer.set_num_updates(2)
    _, stats = layer(x)
    assert not layer.pretraining and stats.mode == "implicit" and stats.jac_weight == 1.0
    layer.set_num_updates(25)
    assert layer.jac_weight == pytest.approx(2.0)


def test_schedule():
    s = JRSchedule(weight=1.9, increment=0.1, increment_every=100, pretrain_steps=50, pretrain_weight=0.2,
                   stop_step=1000, stop_epoch=3)
    assert s.weight_at(0) == 0.2 and s.weight_at(49) == 0.2
    assert s.weight_at(50) == 1.9 and s.weight_at(149) == 1.9
    assert s.weight_at(150) == pytest.approx(2.0) and s.weight_at(350) == pytest.approx(2.2)
    assert s.weight_at(1000) == 0.0 and s.weight_at(400, epoch=3) == 0.0 and s.weight_at(400, epoch=2) > 0


def test_power_method_spectral_radius():
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    eigs = torch.linspace(-0.6, 0.9, 10, dtype=torch.float64)
    a = q @ torch.diag(eigs) @ q.T
    rho = spectral_radius(lambda z: z @ a.T + 1.0, torch.zeros(3, 10, dtype=torch.float64), n_iter=200)
    assert torch.allclose(rho, torch.full((3,), 0.9, dtype=torch.float64), rtol=1e-3)


def test_layer_spectral_radius_matches_the_exact_jacobian():
    f = TanhCell(6, 4)
    with torch.no_grad():  # symmetric W: J = diag(1 - tanh^2) W has a real spectrum
        w = torch.randn(6, 6, dtype=torch.float64)
        w = w + w.T
        f.w.weight.copy_(w * 0.8 / torch.linalg.eigvalsh(w).abs().max())
    x = torch.randn(2, 4, dtype=torch.float64)
    layer = DEQLayer(f, f_max_iter=200, f_tol=1e-12)
    rho = layer.spectral_radius(x, n_iter=300)
    z = _fixed_point(f, x)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: f(v, x[b:b + 1]), z[b:b + 1]).reshape(6, 6)
        exact = torch.linalg.eigvals(jac).abs().max()
        assert float(rho[b]) == pytest.approx(float(exact), rel=0.05)


def test_layer_jacobian_frobenius_matches_the_exact_norm_at_the_fixed_point():
    f = TanhCell(8, 5, scale=0.9)
    x = torch.randn(2, 5, dtype=torch.float64)
    layer = DEQLayer(f, f_max_iter=200, f_tol=1e-12)
    torch.manual_seed(0)
    est = layer.jacobian_frobenius(x.repeat_interleave(2000, dim=0), n_probes=2)
    assert est.shape == (4000,) and not est.requires_grad
    z = _fixed_point(f, x)
    for b in range(2):
        exact = _exact_jac_norm(f, z[b:b + 1], x[b:b + 1])
        assert float(est[b * 2000:(b + 1) * 2000].mean()) == pytest.approx(float(exact), rel=0.03)


def test_schedule_state_travels_with_the_state_dict():
    layer = DEQLayer(TanhCell(4, 3), pretrain_steps=5)
    layer.set_num_updates(7)
    layer.set_epoch(2)
    fresh = DEQLayer(TanhCell(4, 3), pretrain_steps=5)
    assert fresh.pretraining
    fresh.load_state_dict(layer.state_dict())
    assert fresh.num_updates == 7 and not fresh.pretraining and fresh.epoch == 2
    assert layer.state_dict()["schedule_state"].tolist() == [7, 2]
