import inspect

import pytest
import torch

from deq_core import DEQConfig, SolverOption, SolverResult, get_solver, list_solvers, register_solver
from deq_core.solvers import solver_options, validate_solver_options
from tests._maps import causal_problem, contraction

SOLVERS = ("fixed_point", "anderson", "broyden")


def _linear_problem(device, batch=3, dim=40, radius=0.95):
    a = contraction(dim, radius).to(device)
    b = torch.randn(batch, dim, dtype=torch.float64).to(device)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64, device=device) - a, b.T).T
    return (lambda z: z @ a.T + b), b, exact


@pytest.mark.parametrize("name", SOLVERS)
def test_solvers_reach_the_fixed_point(name, device):
    f, b, exact = _linear_problem(device)
    res = get_solver(name)(f, torch.zeros_like(b), max_iter=1000, tol=1e-8)
    assert isinstance(res, SolverResult)
    assert bool(res.converged.all()) and not bool(res.diverged.any())
    assert torch.allclose(res.z, exact, atol=1e-6)
    assert float(res.abs_res.max()) <= 1e-8
    assert res.steps.shape == (3,) and res.abs_res.shape == (3,) and res.rel_res.shape == (3,)


def test_acceleration_needs_far_fewer_iterations_on_a_contraction(device):
    f, b, _ = _linear_problem(device, radius=0.95)
    steps = {}
    for name in SOLVERS:
        res = get_solver(name)(f, torch.zeros_like(b), max_iter=2000, tol=1e-6)
        assert bool(res.converged.all()), name
        steps[name] = int(res.steps.max())
    assert steps["anderson"] * 3 < steps["fixed_point"]
    assert steps["broyden"] * 3 < steps["fixed_point"]


@pytest.mark.parametrize("name", SOLVERS)
def test_easy_samples_stop_early_and_stay_frozen(name, device):
    dim = 20
    mats = torch.stack([contraction(dim, 0.1, seed=1), contraction(dim, 0.9, seed=2)]).to(device)  # easy, hard
    b = torch.ones(2, dim, dtype=torch.float64, device=device)
    exact_easy = torch.linalg.solve(torch.eye(dim, dtype=torch.float64, device=device) - mats[0], b[0])
    calls = []

    def f(z):
        calls.append(z.clone())
        return torch.bmm(mats, z.unsqueeze(2)).squeeze(2) + b

    res = get_solver(name)(f, torch.zeros_like(b), max_iter=200, tol=1e-7, trace=True)
    easy, hard = res.steps.tolist()
    assert easy < hard
    # After the easy sample converged, the map only ever saw its frozen iterate again.
    seen = torch.stack([c[0] for c in calls[easy:]])
    assert torch.equal(seen, seen[:1].expand_as(seen))
    assert torch.allclose(res.z[0], exact_easy, atol=1e-6)
    assert res.trace.shape == (len(calls), 2)


@pytest.mark.parametrize("name", SOLVERS)
def test_divergence_is_reported_and_the_best_iterate_returned(name, device):
    # z = z + 1 + z^2 has no real fixed point; the residual 1 + z^2 is smallest at z = 0.
    z0 = torch.zeros(2, 5, dtype=torch.float64, device=device)
    res = get_solver(name)(lambda z: z + 1 + z * z, z0, max_iter=100, tol=1e-6, trace=True)
    assert bool(res.diverged.all()) and not bool(res.converged.any())
    best = res.trace.argmin(dim=0)
    assert torch.equal(res.abs_res, res.trace.min(dim=0).values)
    assert torch.isfinite(res.z).all()
    assert best.tolist() == [0, 0] and torch.equal(res.z, z0)
    if name != "anderson":  # these explode and stop; Anderson wanders without progress
        assert int(res.steps.max()) < 100


def test_non_finite_values_stop_a_sample_without_touching_the_others(device):
    def f(z):
        out = 0.5 * z + 1
        out[1] = out[1] / 0.0 * z[1]  # NaN/inf for sample 1 only
        return out

    res = get_solver("anderson")(f, torch.zeros(2, 4, device=device), max_iter=50, tol=1e-5)
    assert res.converged.tolist() == [True, False]
    assert res.diverged.tolist() == [False, True]
    assert torch.allclose(res.z[0], torch.full((4,), 2.0, device=device), atol=1e-4)


@pytest.mark.parametrize("name", SOLVERS)
def test_host_reads_follow_the_check_interval(name, device):
    f, b, _ = _linear_problem(device, radius=0.5)
    every = get_solver(name)(f, torch.zeros_like(b), max_iter=60, tol=1e-6, check_every=1)
    sparse = get_solver(name)(f, torch.zeros_like(b), max_iter=60, tol=1e-6, check_every=5)
    never = get_solver(name)(f, torch.zeros_like(b), max_iter=60, tol=1e-6, check_every=0)
    iters = int(every.steps.max())
    assert every.host_reads == iters - 1 or every.host_reads == iters
    assert sparse.host_reads <= iters // 5 + 1
    assert never.host_reads == 0
    # Per-sample results do not depend on how often the host looks.
    for other in (sparse, never):
        assert torch.equal(other.steps, every.steps)
        assert torch.allclose(other.z, every.z)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_state_dtype_and_stop_modes(name, stop_mode, device):
    f = lambda z: 0.5 * z + 1  # noqa: E731
    for dtype in (torch.float32, torch.float64):
        res = get_solver(name)(f, torch.zeros(2, 3, dtype=dtype, device=device), max_iter=100, tol=1e-5, stop_mode=stop_mode)
        assert res.z.dtype == dtype and res.abs_res.dtype == dtype
        assert bool(res.converged.all())
        assert float((res.rel_res if stop_mode == "rel" else res.abs_res).max()) <= 1e-5


def test_registry_accepts_user_solvers_and_rejects_bad_names():
    @register_solver("halving_test", {})
    def halving(f, z0, *, max_iter, tol, stop_mode="abs", check_every=None, divergence_factor=1e4,
                trace=False):
        return get_solver("fixed_point")(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                         check_every=check_every, divergence_factor=divergence_factor,
                                         damping=0.5)

    assert "halving_test" in list_solvers()
    with pytest.raises(ValueError, match="already registered"):
        register_solver("halving_test")(halving)
    with pytest.raises(ValueError, match="unknown solver 'nope'.*anderson"):
        get_solver("nope")


def test_solver_option_validation():
    assert validate_solver_options("anderson", {"m": 3}) == {"m": 3, "beta": 1.0, "lam": 1e-4}
    assert set(solver_options("broyden")) == {"memory"}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mm'\].*accepted: \['beta', 'lam', 'm'\]"):
        validate_solver_options("anderson", {"mm": 3})
    with pytest.raises(TypeError, match=r"\['m'\].*must be int"):
        validate_solver_options("anderson", {"m": 2.5})
    with pytest.raises(ValueError, match=r"\['beta'\].*in \(0, 1\]"):
        validate_solver_options("anderson", {"beta": 1.5})
    with pytest.raises(TypeError, match="int or None"):
        validate_solver_options("broyden", {"memory": "x"})


def test_option_defaults_come_from_the_solver_signature_and_a_spec_runs_the_solver_as_configured():
    for name in ("anderson", "broyden", "fixed_point"):
        params = inspect.signature(get_solver(name)).parameters
        assert {k: o.default for k, o in solver_options(name).items()} == {k: params[k].default
                                                                           for k in solver_options(name)}

    def no_default(f, z0, *, max_iter, tol, stop_mode="abs", check_every=None, divergence_factor=1e4,
                   trace=False, width):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="option 'width' must be a keyword parameter of the solver with a default"):
        register_solver("no_default_test", {"width": SolverOption(int)})(no_default)
    assert "no_default_test" not in list_solvers()
    f, b, _ = _linear_problem("cpu", radius=0.8)
    spec = DEQConfig(f_solver="anderson", f_max_iter=7, f_solver_options={"m": 2}).forward_solve(training=True)
    direct = get_solver("anderson")(f, torch.zeros_like(b), max_iter=7, tol=spec.tol, stop_mode=spec.stop_mode, m=2)
    assert torch.equal(spec.run(f, torch.zeros_like(b)).z, direct.z)


def test_broyden_with_short_memory_still_converges(device):
    f, b, exact = _linear_problem(device, radius=0.8)
    res = get_solver("broyden")(f, torch.zeros_like(b), max_iter=300, tol=1e-7, memory=4)
    assert bool(res.converged.all())
    assert torch.allclose(res.z, exact, atol=1e-5)


# -- outcomes: converged, stalled, diverged or out of iterations, exactly one each -----------------

def _one_outcome_each(res):
    flags = torch.stack([res.converged, res.stalled, res.diverged]).int()
    assert bool((flags.sum(dim=0) <= 1).all()), flags


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_map_without_fixed_point_that_the_solver_wanders_on_is_diverged(name, dtype):
    # z + 1: the residual is the same at every point; round-off once made Anderson's best residual
    # "better" than its first (3.162274599 < 3.162277699) and the sample ended neither way.
    res = get_solver(name)(lambda z: z + 1, torch.zeros(4, 10, dtype=dtype), max_iter=30, tol=1e-6)
    assert bool(res.diverged.all()) and not bool(res.converged.any())
    _one_outcome_each(res)


@pytest.mark.parametrize("name", SOLVERS)
def test_an_exploding_state_is_diverged_not_converged(name):
    # z + 1 + 0.5 sin z has no fixed point. Broyden's steps grew z to ~9e7, where float32 absorbs
    # the +1 and the residual reads 0: it was reported converged.
    res = get_solver(name)(lambda z: z + 1 + 0.5 * torch.sin(z), torch.zeros(4, 10), max_iter=100, tol=1e-6)
    assert not bool(res.converged.any())
    _one_outcome_each(res)
    if name == "broyden":
        assert bool(res.diverged.all()) and float(res.z.abs().max()) < 1e7


@pytest.mark.parametrize("name", SOLVERS)
def test_a_warm_start_at_the_noise_floor_is_not_diverged(name):
    a = contraction(16, 0.8, dtype=torch.float32)
    b = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    f = lambda z: torch.tanh(0.9 * z @ a.T + b)  # noqa: E731
    cold = get_solver(name)(f, torch.zeros(8, 16), max_iter=200, tol=1e-12)
    warm = get_solver(name)(f, cold.z, max_iter=30, tol=1e-12)
    assert not bool(cold.diverged.any()) and not bool(warm.diverged.any())
    # Samples whose noise never dipped below the first residual are stalled at the floor, the
    # others ran out of iterations; all stay at the floor.
    assert bool(warm.stalled.any()) and float(warm.rel_res.max()) <= 8 * 2 ** -24
    _one_outcome_each(cold)
    _one_outcome_each(warm)


@pytest.mark.parametrize("name", SOLVERS)
def test_no_convergent_map_is_flagged_diverged_at_any_limit(name):
    a = contraction(16, 0.8, dtype=torch.float32)
    b = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    for limit in range(1, 16):
        res = get_solver(name)(lambda z: z @ a.T + b, torch.zeros(64, 16), max_iter=limit, tol=1e-6)
        assert not bool(res.diverged.any()), (limit, int(res.diverged.sum()))
        _one_outcome_each(res)


@pytest.mark.parametrize("memory", [3, 5, 10, 20])
def test_limited_memory_broyden_converges_on_a_slowly_contracting_map(memory, device):
    # Spectral radius 0.99: unlimited memory converges in about 41 evaluations. Overwriting the
    # oldest update once the memory was full diverged for every memory from 2 to 20; a restart
    # from H = -I converges (memory 1-2 are too short for this map: 1 crawls, 2 diverges).
    f, b, exact = _linear_problem(device, radius=0.99)
    full = get_solver("broyden")(f, torch.zeros_like(b), max_iter=400, tol=1e-8)
    res = get_solver("broyden")(f, torch.zeros_like(b), max_iter=400, tol=1e-8, memory=memory)
    assert bool(full.converged.all()) and bool(res.converged.all()) and not bool(res.diverged.any())
    assert torch.allclose(res.z, exact, atol=1e-5)
    assert int(res.steps.max()) <= 4 * int(full.steps.max())


@pytest.mark.parametrize("name", SOLVERS)
def test_sequence_positions_stop_in_order_and_earlier_ones_ignore_later_ones(name):
    results = []
    for b_last in (0.0, 3.0):
        f, z0, length = causal_problem(b_last)
        results.append(get_solver(name)(f, z0, max_iter=80, tol=1e-6, sequence_length=length, trace=True))
    a, b = results
    rows = a.z.view(2, length, -1)
    assert torch.equal(a.z.view(2, length, -1)[:, :-1], b.z.view(2, length, -1)[:, :-1])
    assert torch.equal(a.fz.view(2, length, -1)[:, :-1], b.fz.view(2, length, -1)[:, :-1])
    assert not torch.equal(rows[:, -1], b.z.view(2, length, -1)[:, -1])
    steps = a.steps.view(2, length)
    assert bool((steps[:, 1:] >= steps[:, :-1]).all())  # a position never stops before an earlier one
    assert bool(a.converged.all()) and not bool(a.diverged.any() or a.stalled.any())


def test_a_solver_without_sequence_support_refuses_a_sequence():
    def plain(f, z0, *, max_iter, tol, stop_mode="abs", check_every=None, divergence_factor=1e4, trace=False):
        return get_solver("fixed_point")(f, z0, max_iter=max_iter, tol=tol)

    register_solver("no_sequence_test", {})(plain)
    f, z0, length = causal_problem(0.0)
    assert bool(get_solver("no_sequence_test")(f, z0, max_iter=40, tol=1e-6).converged.all())
    with pytest.raises(TypeError, match="does not accept sequence_length.*sample_dims=1"):
        get_solver("no_sequence_test")(f, z0, max_iter=40, tol=1e-6, sequence_length=length)
