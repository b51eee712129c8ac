"""Solvers under autocast and with reduced-precision maps: arithmetic in the state dtype, the
precision floor as its own outcome, float32 maps exactly as before."""
import pytest
import torch

from bench.cells import TransformerCell
from deq_core import get_solver, register_solver
from deq_core.solvers import precision
from deq_core.state import StateSpec
from tests._maps import reduced_precision_problem

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVERS = ("anderson", "broyden", "fixed_point")


def _transformer_map(batch=2, length=256, width=256):
    torch.manual_seed(0)
    f, x = TransformerCell(d_model=width, heads=4, d_ffn=4 * width), torch.randn(batch, length, width)
    spec = StateSpec(torch.zeros_like(x))

    def fn(z):
        return spec.pack(f(spec.unpack(z, x.dtype), x), torch.float32)

    return fn, spec.zeros(torch.float32)


def _under(dtype, fn):
    def g(z):
        with torch.autocast("cpu", dtype=dtype):
            return fn(z)
    return g


@pytest.fixture(scope="module")
def transformer():
    return _transformer_map()


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_float16_autocast_solve_matches_the_solver_outside_autocast(transformer, name):
    # Before the autocast boundary, Anderson's Gram products overflowed in float16 at step 2 and
    # every sample came back "diverged" at z0 (residual ~3.6e2; measured at length 512).
    fn, z0 = transformer
    with torch.no_grad():
        outside = get_solver(name)(_under(torch.float16, fn), z0, max_iter=30, tol=1e-3)
        with torch.autocast("cpu", dtype=torch.float16):
            inside = get_solver(name)(fn, z0, max_iter=30, tol=1e-3)
    assert not bool(inside.diverged.any()) and not bool(outside.diverged.any())
    assert inside.z.dtype == torch.float32
    ratio = inside.abs_res / outside.abs_res
    assert bool((ratio < 2.0).all()), ratio
    # Inside autocast the solver knows f runs in float16 and ends at its floor, not at the limit.
    assert bool(inside.stalled.all()) and int(inside.steps.max()) < 30
    assert not bool(outside.stalled.any()) and outside.steps.tolist() == [30, 30]


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_solve_stalls_at_the_precision_floor_and_says_so(name, dtype):
    f, z0 = reduced_precision_problem(dtype)
    kw = dict(max_iter=50, tol=1e-7, stop_mode="rel")
    with torch.no_grad():
        res = get_solver(name)(f, z0, precision=dtype, **kw)
        # The same map with nothing said about its precision runs to the limit, as it always did
        # (but for a sample that lands on an exact fixed point of the rounded map).
        blind = get_solver(name)(f, z0, **kw)
    u = precision.unit_roundoff(dtype)
    assert bool(res.stalled.all()) and not bool(res.converged.any()) and not bool(res.diverged.any())
    assert int(res.steps.max()) <= 25 and bool((res.rel_res <= precision.FLOOR_BAND * u).all())
    assert int((blind.steps == 50).sum()) >= 6 and not bool(blind.stalled.any())


@pytest.mark.parametrize("name", SOLVERS)
def test_tolerance_above_the_floor_still_converges(name):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    f = _under(torch.bfloat16, lambda z: torch.tanh(0.5 * z + x @ torch.eye(16)))
    res = get_solver(name)(f, torch.zeros(4, 16), max_iter=40, tol=5e-2, stop_mode="rel")
    assert bool(res.converged.all()) and not bool(res.stalled.any())


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_solves_are_bit_for_bit_what_they_were(name, dtype):
    # The unguarded implementation, called without a precision, is the solver as it was before
    # precision-aware stopping; through the registry with precision=float32 nothing may change.
    torch.manual_seed(0)
    a = torch.randn(16, 16, dtype=dtype) * 0.9 / 4
    x = torch.randn(6, 16, dtype=dtype)
    f = lambda z: torch.tanh(z @ a + x)  # noqa: E731
    z0 = torch.zeros(6, 16, dtype=dtype)
    kw = dict(max_iter=25, tol=1e-30, trace=True)
    raw = get_solver(name).__wrapped__(f, z0, **kw)
    got = get_solver(name)(f, z0, precision=torch.float32, **kw)
    assert torch.equal(raw.z, got.z) and torch.equal(raw.trace, got.trace)
    assert torch.equal(raw.steps, got.steps) and torch.equal(raw.converged, got.converged)
    if dtype == torch.float32:  # a float64 state told that f computes in float32 has float32's floor
        assert torch.equal(raw.stalled, got.stalled) and torch.equal(raw.diverged, got.diverged)
    # No sample stops early at a full-precision floor: tol 1e-30 is out of reach, so a sample
    # ran all 25 steps (stalled if it reached the floor) unless its residual rounded to 0.
    ran_out = got.steps == 25
    assert bool((ran_out | got.converged).all()) and not bool((got.stalled & ~ran_out).any())


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_solver_arithmetic_leaves_autocast(name, dtype):
    seen = []

    def f(z):
        seen.append(torch.is_autocast_enabled("cpu"))  # f itself runs under the caller's autocast
        return torch.tanh(torch.nn.functional.linear(z, torch.eye(8) * 0.5) + 1.0)

    products = []
    orig_bmm = torch.bmm

    def spy_bmm(*args, **kwargs):
        out = orig_bmm(*args, **kwargs)
        products.append(out.dtype)
        return out

    with torch.autocast("cpu", dtype=dtype), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bmm", spy_bmm)
        res = get_solver(name)(f, torch.zeros(3, 8), max_iter=10, tol=1e-6)
    assert seen and all(seen)
    assert set(products) <= {torch.float32}
    assert res.z.dtype == torch.float32 and res.abs_res.dtype == torch.float32


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_state_is_refused_with_a_clear_message(name, dtype):
    with pytest.raises(TypeError, match=rf"solver state z0 must be a float32 or float64 tensor, got {dtype}; "
                                        r"keep the state in float32"):
        get_solver(name)(lambda z: z, torch.zeros(2, 3, dtype=dtype), max_iter=3, tol=1e-3)


def test_user_solvers_are_guarded_and_told_the_precision():
    told = []

    def probe(f, z0, *, max_iter, tol, precision=None, **kwargs):
        told.append((precision, torch.is_autocast_enabled("cpu")))
        return get_solver("fixed_point")(f, z0, max_iter=max_iter, tol=tol, precision=precision)

    def old_style(f, z0, *, max_iter, tol, stop_mode="abs", check_every=None, divergence_factor=1e4,
                  trace=False):
        told.append(("old", torch.is_autocast_enabled("cpu")))
        return get_solver("fixed_point")(f, z0, max_iter=max_iter, tol=tol)

    register_solver("precision_probe_test")(probe)
    register_solver("old_style_test")(old_style)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("precision_probe_test", "old_style_test"):
            get_solver(name)(lambda z: 0.5 * z + 1, torch.zeros(2, 3), max_iter=5, tol=1e-3)
    assert told == [(torch.bfloat16, False), ("old", False)]


def test_floor_table():
    assert precision.floor_for(torch.float32) is None and precision.floor_for(None) is None
    assert precision.floor_for(torch.float16) == pytest.approx(2 * 2 ** -11)
    assert precision.floor_for(torch.bfloat16) == pytest.approx(2 * 2 ** -8)
    assert precision.lower_precision(torch.float32, torch.bfloat16) is torch.bfloat16
    assert precision.lower_precision(None, torch.float16) is torch.float16
