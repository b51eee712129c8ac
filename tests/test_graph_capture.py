"""A solve with check_every=0 is one that a CUDA graph could capture: inside the solver loop, after
the first iteration, nothing is allocated, nothing is read back to the host, and the operations
and shapes do not depend on the data. Checked on CPU by auditing the aten calls the solver makes
outside f (forward and implicit backward solves, every solver, reduced-precision f), with the
audit shown to fail on the solvers before the fused bookkeeping and on deliberately bad ones."""
from typing import Callable, List, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bench._reference_solvers as reference
from deq_core import DEQLayer, get_solver, register_solver
from deq_core.solvers import SolveSpec
from deq_core.solvers import tracking
from tests._maps import MLPCell, TanhCell, contraction

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVERS = ("anderson", "broyden", "fixed_point")
# Python-level reads of a tensor's value (TorchFunctionMode sees them), and aten calls that read
# a value back or whose output shape depends on values (TorchDispatchMode sees them).
_HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu")
_SYNCING_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
                "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose", "_linalg_check_errors")
_INDEXING_OPS = ("index", "index_put_", "_index_put_impl_", "index_put")  # a boolean index needs nonzero()


class _Reads(TorchFunctionMode):
    def __init__(self, audit: "LoopAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.audit.counting and getattr(func, "__name__", "") in _HOST_READS:
            self.audit.host_reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


class LoopAudit(TorchDispatchMode):
    """Audits the solver loop: from the end of a solve's first ``Tracker.update`` to its
    ``Tracker.result``, outside the evaluations of f.

    - ``allocations``: aten calls returning a tensor whose storage is none of its inputs'
      storages (a view, an in-place or ``out=`` call returns one of those; a functional call or
      a factory returns a new one);
    - ``host_reads``: reads of a tensor's value on the host and calls that need one;
    - ``calls``: per iteration (between evaluations of f), the calls with their output shapes,
      to compare across solves on different data.
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocations: List[str] = []
        self.host_reads: List[str] = []
        self.calls: List[List[Tuple[str, Tuple]]] = []
        self.counting = False
        self._in_f = False
        self._reads = _Reads(self)

    def outside(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f`` with its own calls left out of the audit."""
        def audited(z):
            self._in_f = True
            try:
                return f(z)
            finally:
                self._in_f = False
                if self.counting:
                    self.calls.append([])
        return audited

    @property
    def _active(self) -> bool:
        return self.counting and not self._in_f

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._active:
            return func(*args, **kwargs)
        # The inputs' storages before the call: an out= tensor that the call resizes gets a new one.
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name in _SYNCING_OPS:
            self.host_reads.append(name)
        if name in _INDEXING_OPS and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
            self.host_reads.append("boolean index")
        outputs = _tensors(out)
        if any(t.numel() and t.untyped_storage().data_ptr() not in inputs for t in outputs):
            self.allocations.append(str(func))
        if self.calls:
            self.calls[-1].append((str(func), tuple(tuple(t.shape) for t in outputs)))
        return out


def _tensors(tree) -> List[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


@pytest.fixture
def audit(monkeypatch):
    """A LoopAudit wired to the trackers (of the solvers now and of the reference copy) and to
    every configured solve (SolveSpec.run, which the layer's forward and backward solves use)."""
    mode = LoopAudit()
    for tracker in (tracking.Tracker, reference.Tracker):
        update, result = tracker.update, tracker.result

        def counted_update(self, *args, _update=update, **kwargs):
            out = _update(self, *args, **kwargs)
            if not mode.counting:  # the first update of a solve: its loop starts here
                mode.calls.append([])
                mode.counting = True
            return out

        def uncounted_result(self, _result=result):
            mode.counting = False
            return _result(self)

        monkeypatch.setattr(tracker, "update", counted_update)
        monkeypatch.setattr(tracker, "result", uncounted_result)
    run = SolveSpec.run
    monkeypatch.setattr(SolveSpec, "run", lambda self, f, z0, **kw: run(self, mode.outside(f), z0, **kw))
    return mode


def _problem(seed: int, batch: int = 4, dim: int = 24):
    a = contraction(dim, 0.9, dtype=torch.float32, seed=seed)
    b = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
    b[0] *= 4.0  # saturated: this sample converges (and freezes) first
    return (lambda z: torch.tanh(z @ a.T + b)), torch.zeros(batch, dim)


def _solve(audit, solve, seed=0, **kw):
    f, z0 = _problem(seed)
    with torch.no_grad(), audit:
        return solve(audit.outside(f), z0, **kw)


@pytest.mark.parametrize("name, options", [("anderson", {}), ("anderson", {"m": 3, "beta": 0.5}), ("broyden", {}),
                                           ("broyden", {"memory": 3}), ("fixed_point", {}),
                                           ("fixed_point", {"damping": 0.7})])
def test_the_loop_allocates_nothing_and_reads_nothing_back(audit, name, options):
    res = _solve(audit, get_solver(name), max_iter=25, tol=1e-5, check_every=0, **options)
    assert len(audit.calls) == 25  # the audit saw every iteration
    assert audit.allocations == [] and audit.host_reads == [], (audit.allocations, audit.host_reads)
    assert bool(res.converged[0]) and int(res.steps[0]) < 25  # a sample froze on the way


@pytest.mark.parametrize("name", SOLVERS)
def test_the_audit_fails_on_the_solvers_before_the_fused_bookkeeping(audit, name):
    _solve(audit, reference.SOLVERS[name], max_iter=25, tol=1e-5, check_every=0)
    assert len(audit.allocations) >= 24  # at least one a step (the old Tracker's residuals)


@pytest.mark.parametrize("name", SOLVERS)
def test_the_audit_sees_host_reads(audit, name):
    res = _solve(audit, get_solver(name), max_iter=25, tol=1e-5, check_every=1)
    assert res.host_reads > 0 and audit.host_reads.count("_local_scalar_dense") == res.host_reads
    assert audit.host_reads.count("__bool__") == res.host_reads
    assert audit.allocations == ["aten.any.default"] * res.host_reads  # the flag that is read


def test_the_audit_fails_on_a_solver_that_allocates_reads_or_branches_on_data(audit):
    @register_solver("graph_capture_bad_test", {})
    def bad(f, z0, *, max_iter, tol, stop_mode="abs", check_every=None, divergence_factor=1e4, trace=False):
        tracker = tracking.Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, None,
                                    regions=[("z", 1), ("fz", 1)])
        z = tracker.rows["z"].copy_(z0)
        system, rhs = torch.eye(3).expand(z0.shape[0], 3, 3), torch.ones(z0.shape[0], 3, 1)
        solution, info = torch.empty_like(rhs), torch.empty(z0.shape[0], dtype=torch.int32)
        fz = f(z)
        while True:
            # out= for the solution, but the LU factors are allocated (and resized) in every call.
            torch.linalg.solve_ex(system, rhs, out=(solution, info))
            tracker.rows["fz"].copy_(fz)
            active = tracker.update(z, fz, z_at=("z", 0), fz_at=("fz", 0))
            if tracker.done():
                return tracker.result()
            z[active] = (0.5 * (z + fz))[active]  # a new tensor, a data-dependent shape
            if float(active.float().mean()) < 1.0:  # a host read
                z.mul_(1.0)
            fz = f(z)

    _solve(audit, get_solver("graph_capture_bad_test"), max_iter=10, tol=1e-5, check_every=0)
    assert {"aten.mul.Tensor", "aten.add.Tensor", "aten.index.Tensor", "aten._linalg_solve_ex.result"} <= set(
        audit.allocations)
    assert {"boolean index", "__float__", "_local_scalar_dense"} <= set(audit.host_reads)


@pytest.mark.parametrize("name", SOLVERS)
def test_calls_and_shapes_do_not_depend_on_the_data(audit, name):
    # Two problems: in one a sample freezes after a few steps, in the other one diverges at once.
    _solve(audit, get_solver(name), seed=0, max_iter=12, tol=1e-5, check_every=0)
    first, audit.calls = audit.calls, []
    f, z0 = _problem(1)
    with torch.no_grad(), audit:
        res = get_solver(name)(audit.outside(lambda z: f(z) + torch.tensor([float("nan"), 0, 0, 0])[:, None]),
                               z0, max_iter=12, tol=1e-5, check_every=0)
    assert bool(res.diverged[0]) and int(res.steps[0]) == 1
    assert audit.calls == first and len(first) == 12


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_the_captured_setting_reaches_the_same_fixed_point_as_the_normal_one(audit, name, stop_mode):
    f, z0 = _problem(2)
    with torch.no_grad():
        normal = get_solver(name)(f, z0, max_iter=40, tol=1e-5, stop_mode=stop_mode)
    graph = _solve(audit, get_solver(name), seed=2, max_iter=40, tol=1e-5, stop_mode=stop_mode, check_every=0)
    assert audit.allocations == [] and audit.host_reads == []
    assert normal.host_reads > 0 and graph.host_reads == 0
    for key in ("z", "fz", "abs_res", "rel_res", "steps", "converged", "diverged", "stalled"):
        assert torch.equal(getattr(graph, key), getattr(normal, key)), key


@pytest.mark.parametrize("name", SOLVERS)
def test_sequences_and_a_reduced_precision_floor_keep_the_loop_clean(audit, name):
    # sequence_length (the prefix-stop rule) and precision=bfloat16 (the floor's counters).
    torch.manual_seed(0)
    w = torch.randn(16, 16) * 0.05
    x = torch.randn(12, 16)

    def f(z):
        return torch.tanh((z.bfloat16() @ w.bfloat16()).float() + x)

    with torch.no_grad(), audit:
        res = get_solver(name)(audit.outside(f), torch.zeros(12, 16), max_iter=20, tol=1e-7, stop_mode="rel",
                               check_every=0, precision=torch.bfloat16, sequence_length=4, trace=True)
    assert audit.allocations == [] and audit.host_reads == []
    assert bool(res.stalled.any()) and res.trace.shape == (20, 12)


@pytest.mark.parametrize("f_solver, b_solver", [("anderson", "broyden"), ("broyden", "fixed_point"),
                                                ("fixed_point", "anderson"), ("anderson", "gmres")])
def test_a_layer_with_check_every_0_has_clean_forward_and_backward_solve_loops(audit, f_solver, b_solver):
    torch.manual_seed(0)
    cell = TanhCell(12, 5, scale=0.6, dtype=torch.float32)
    x = torch.randn(6, 5)
    opts = dict(f_solver=f_solver, b_solver=b_solver, f_solver_options={}, b_solver_options={}, f_max_iter=15,
                b_max_iter=15, f_tol=1e-6, b_tol=1e-6, jac_weight=0.0)
    grads = {}
    for every in (0, None):
        layer = DEQLayer(cell, check_every=every, **opts)
        cell.zero_grad()
        if every == 0:
            with audit:
                z, stats = layer(x)
                z.pow(2).sum().backward()
            forward_and_backward = len(audit.calls)
        else:
            z, stats = layer(x)
            z.pow(2).sum().backward()
        grads[every] = (z.detach(), [p.grad.clone() for p in cell.parameters()])
    assert forward_and_backward == 30  # both solves ran to their limits inside the audit
    assert audit.allocations == [] and audit.host_reads == [], (audit.allocations, audit.host_reads)
    torch.testing.assert_close(grads[0][0], grads[None][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[None][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_layer_under_bfloat16_autocast_keeps_its_solve_loops_clean(audit):
    torch.manual_seed(0)
    cell = MLPCell(dim=16, hidden=32)
    x = torch.randn(4, 16)
    layer = DEQLayer(cell, check_every=0, f_max_iter=12, b_max_iter=12, jac_weight=0.0)
    with audit, torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = layer(x)
        z.float().pow(2).sum().backward()
    assert len(audit.calls) == 24
    assert audit.allocations == [] and audit.host_reads == [], (audit.allocations, audit.host_reads)
    assert stats.f_abs_res.dtype == torch.float32 and all(p.grad is not None for p in cell.parameters())
