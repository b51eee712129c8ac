"""Core benchmark: JR overhead, saved-for-backward memory (also of the reversible mode), the
reversible mode's gradient error against its step count and relaxation, the backward solvers
(GMRES, Anderson, Broyden) to one tolerance, solver overhead, mixed-precision solves,
the backward from the forward's inverse-Jacobian estimate, TorchDEQ comparison, solver outcomes
against the returned iterates, limited-memory Broyden.

    python -m bench.core [--device cuda] [--repeats 5] [--only mixed_precision ...]

Every figure is a ratio of two settings timed alternately in the same run (the machines are
noisy). The TorchDEQ comparison runs when ``torchdeq`` (0.1.0) is installed.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench._memory import saved_activation_bytes
from bench._reference_solvers import SOLVERS as REFERENCE_SOLVERS
from bench._run import add_device_args, alternate, describe, device_from, sync
from bench.cells import ConvCell, TanhCell, TransformerCell
from deq_core import DEQConfig, DEQLayer, get_solver
from deq_core.solvers.precision import resolution
from deq_core.state import StateSpec
from deq_core.testing import outcome_disagreements, random_map

_READS = ("__bool__", "item", "tolist", "__float__", "__int__")
JR_OVERHEAD_TARGET = 1.3  # a JR training step costs at most this many plain ones


class _HostReads(TorchFunctionMode):
    """Counts tensor-to-host reads (bool(), item(), tolist(), float(), int())."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _cases(device: torch.device, batch: int = 8):
    torch.manual_seed(0)
    tr = TransformerCell().to(device)
    conv = ConvCell().to(device)
    return {
        f"transformer ({batch}x128x256)": (tr, torch.randn(batch, 128, 256, device=device)),
        f"conv ({batch}x64x32x32)": (conv, torch.randn(batch, 64, 32, 32, device=device)),
    }


def jr_overhead_ratios(device: torch.device, repeats: int, batch: int = 8) -> Dict[str, float]:
    """Per case (``batch`` samples): time of a full implicit training step (12 forward + 12
    backward iterations) with JR (one probe) over the same step without it."""
    ratios = {}
    fixed = dict(f_max_iter=12, f_tol=1e-12, b_max_iter=12, b_tol=1e-12, jac_freq=1.0, jac_probes=1,
                 check_every=0)
    for name, (f, x) in _cases(device, batch).items():
        plain = DEQLayer(f, **fixed, jac_weight=0.0)
        with_jr = DEQLayer(f, **fixed, jac_weight=1.0)

        def step(layer):
            def run():
                z, stats = layer(x)
                (z.float().pow(2).mean() + stats.jr_term).backward()
            return run

        t = alternate({"plain": step(plain), "jr": step(with_jr)}, repeats, device)
        ratios[name] = t["jr"] / t["plain"]
    return ratios


def jr_overhead(device: torch.device, repeats: int) -> List[str]:
    return [f"| JR step / plain step, {name}, 12 fwd + 12 bwd iters | {ratio:.2f}x | <= {JR_OVERHEAD_TARGET:.2f}x |"
            for name, ratio in jr_overhead_ratios(device, repeats).items()]


def memory_bytes(device: torch.device) -> Dict[str, Tuple[int, int]]:
    """Per case: activation bytes saved for backward by the implicit layer (12 forward
    iterations) and by an unrolled stack of the same depth."""
    out = {}
    for name, (f, x) in _cases(device).items():
        params = list(f.parameters())
        implicit = saved_activation_bytes(lambda: DEQLayer(f, f_max_iter=12, f_tol=1e-12)(x), params)[1]
        unrolled = saved_activation_bytes(lambda: DEQLayer(f, backward="unrolled", unrolled_layers=12)(x),
                                          params)[1]
        out[name] = (implicit, unrolled)
    return out


def memory(device: torch.device, repeats: int = 0) -> List[str]:
    return [f"| saved-for-backward bytes, implicit / unrolled at 12 iters, {name} | "
            f"{implicit / unrolled:.3f} ({implicit / 2**20:.1f} MiB / {unrolled / 2**20:.1f} MiB) | <= 0.125 |"
            for name, (implicit, unrolled) in memory_bytes(device).items()]


def reversible_memory_bytes(device: torch.device) -> Dict[str, Tuple[int, int, int]]:
    """Per case: activation bytes saved for backward by the reversible mode (6 coupled steps, 12
    evaluations), the implicit layer (12 forward iterations) and an unrolled stack of 12."""
    out = {}
    for name, (f, x) in _cases(device).items():
        params = list(f.parameters())
        reversible = saved_activation_bytes(lambda: DEQLayer(f, backward="reversible", reversible_steps=6)(x),
                                            params)[1]
        implicit = saved_activation_bytes(lambda: DEQLayer(f, f_max_iter=12, f_tol=1e-12)(x), params)[1]
        unrolled = saved_activation_bytes(lambda: DEQLayer(f, backward="unrolled", unrolled_layers=12)(x),
                                          params)[1]
        out[name] = (reversible, implicit, unrolled)
    return out


def reversible_memory(device: torch.device, repeats: int = 0) -> List[str]:
    return [f"| saved-for-backward bytes at 12 evaluations, reversible / implicit / unrolled, {name} | "
            f"{r / 2**20:.1f} / {i / 2**20:.1f} / {u / 2**20:.1f} MiB | reversible independent of the steps |"
            for name, (r, i, u) in reversible_memory_bytes(device).items()]


def reversible_accuracy(betas: Tuple[float, ...] = (0.5, 0.8, 1.2), steps: Tuple[int, ...] = (4, 8, 16, 32, 64),
                        ) -> Dict[Tuple[float, int], Dict[str, float]]:
    """Per (beta, steps): the relative gradient error of the reversible mode against autograd
    through the same iteration in float64 (a float64 model, and a float32 copy of it), the
    largest z0 reconstruction error each reports, and the relative residual reached."""
    torch.manual_seed(0)
    f64 = TanhCell(16, 8, scale=0.8)
    f32 = TanhCell(16, 8, scale=0.8, dtype=torch.float32)
    f32.load_state_dict({k: v.float() for k, v in f64.state_dict().items()})
    x = torch.randn(8, 8, dtype=torch.float64)
    out = {}
    for beta in betas:
        for n in steps:
            y = z = torch.zeros(8, 16, dtype=torch.float64)
            for _ in range(n):
                y = torch.lerp(y, f64(z, x), beta)
                z = torch.lerp(z, f64(y, x), beta)
            ref = torch.autograd.grad(f64(z, x).pow(2).sum(), list(f64.parameters()))
            row = {}
            for f, tag in ((f64, "f64"), (f32, "f32")):
                layer = DEQLayer(f, backward="reversible", reversible_beta=beta, reversible_steps=n)
                value, stats = layer(x.to(next(f.parameters()).dtype))
                grads = torch.autograd.grad(value.pow(2).sum(), list(f.parameters()))
                row[f"grad_{tag}"] = max(float((a.double() - b).norm() / b.norm()) for a, b in zip(grads, ref))
                row[f"z0_{tag}"] = float(stats.b_rel_res.max())
                row["rel_res"] = float(stats.f_rel_res.max())
            out[(beta, n)] = row
    return out


def reversible(device: torch.device, repeats: int = 0) -> List[str]:
    return [f"| reversible, beta {beta}, {n} steps: gradient error float64 / float32 model, z0 error float64 / "
            f"float32, rel. residual | {r['grad_f64']:.1e} / {r['grad_f32']:.1e}, {r['z0_f64']:.1e} / "
            f"{r['z0_f32']:.1e}, {r['rel_res']:.1e} | measured |"
            for (beta, n), r in reversible_accuracy().items()]


def flat_map(f: Callable, x: torch.Tensor) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The cell ``f(z, x)`` as a solver's map on flat float32 ``(B, D)`` states, and its zero z0."""
    spec = StateSpec(torch.zeros_like(x))

    def fn(z):
        return spec.pack(f(spec.unpack(z, x.dtype), x), torch.float32)

    return fn, spec.zeros(torch.float32)


def _anderson_share(solve: Callable, fn: Callable, z0: torch.Tensor, device: torch.device) -> float:
    """The share of one Anderson solve (m=5, 30 iterations) spent outside f."""
    inside = [0.0]

    def timed(z):
        sync(device)
        t0 = time.perf_counter()
        result = fn(z)
        sync(device)
        inside[0] += time.perf_counter() - t0
        return result

    sync(device)
    t0 = time.perf_counter()
    solve(timed, z0, max_iter=30, tol=1e-12, check_every=None, m=5)
    sync(device)
    return 1 - inside[0] / (time.perf_counter() - t0)


# The state traffic of an Anderson (m=5) iteration that no implementation avoids, in passes over the
# state: the residual history read for the Gram row and the f history read for the mix (m each),
# f(z) and z read once, and g, the copy of f(z) into the history and the next iterate written once.
_FLOOR_PASSES = 2 * 5 + 4


def _floor_share(fn: Callable, z0: torch.Tensor, device: torch.device, iterations: int = 30) -> float:
    """The share of an ``iterations``-step solve that the floor traffic (``_FLOOR_PASSES`` passes
    a step, moved as copies between distinct state-sized buffers right after each evaluation of f,
    which leaves the caches as a solve finds them) would take at this machine's bandwidth."""
    buffers = [torch.zeros_like(z0) for _ in range(_FLOOR_PASSES)]
    inside = outside = 0.0
    for _ in range(iterations):
        sync(device)
        t0 = time.perf_counter()
        fn(z0)
        sync(device)
        t1 = time.perf_counter()
        for src, dst in zip(buffers[0::2], buffers[1::2]):  # a copy reads one state and writes one
            dst.copy_(src)
        sync(device)
        inside, outside = inside + t1 - t0, outside + time.perf_counter() - t1
    return outside / (inside + outside)


def solver_overhead_shares(device: torch.device, repeats: int) -> Dict[str, Dict[str, float]]:
    """Per case: the share of an Anderson solve (m=5, 30 iterations) spent outside f, for the
    solver now (``"after"``) and before the fused bookkeeping (``"before"``, the frozen copy in
    bench._reference_solvers), the two solves alternating; and the share the state traffic
    that every implementation moves would take at this machine's bandwidth (``"floor"``)."""
    solvers = {"after": get_solver("anderson")}
    solvers["before"] = REFERENCE_SOLVERS["anderson"]
    out = {}
    for name, (f, x) in _cases(device).items():
        fn, z0 = flat_map(f, x)
        shares: Dict[str, List[float]] = {k: [] for k in solvers}
        with torch.no_grad():
            for solve in solvers.values():  # warm-up
                _anderson_share(solve, fn, z0, device)
            for _ in range(repeats):
                for key, solve in solvers.items():
                    shares[key].append(_anderson_share(solve, fn, z0, device))
            shares["floor"] = [_floor_share(fn, z0, device) for _ in range(repeats)]
        out[name] = {k: statistics.median(v) for k, v in shares.items()}
    return out


# aten calls that write some rows of their (larger) first argument: they move the rows of `values`;
# and calls that read some rows of theirs: they move the rows of their output.
_ROW_WRITES = ("index_put_", "_index_put_impl_", "index_copy_")
_ROW_READS = ("index_select",)
# Factories: their tensor argument gives only the dtype and device; they write their output (but
# for the empty ones, which write nothing).
_FACTORIES = ("new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like",
              "ones_like", "full_like")


class _StatePasses(TorchDispatchMode):
    """Counts the solver's traffic over state-sized tensors, excluding f's own operations (``f``
    wraps the map so that they are not counted).

    Every aten call that reads or writes a tensor with at least ``state_numel`` elements is one
    call touching the state; its traffic, in units of the state, is the elements it reads (every
    tensor argument but an ``out=`` one and the target of a ``copy_``) plus those it writes (its
    outputs, in place or ``out=``), over ``state_numel``: ``z - fz`` is 3, a Gram row over a
    history of m is m + 1. Views move nothing and are not counted. ``operations`` counts every
    call but views, whatever its size: each is a kernel launch on a GPU.
    """

    def __init__(self, state_numel: int) -> None:
        super().__init__()
        self.state_numel = state_numel
        self.traffic = 0
        self.calls = 0
        self.operations = 0
        self._paused = False

    def f(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn`` with its operations left out of the count."""
        def uncounted(z):
            self._paused = True
            try:
                return fn(z)
            finally:
                self._paused = False
        return uncounted

    def _size(self, t) -> int:
        n = t.numel() if isinstance(t, torch.Tensor) else 0
        return n if n >= self.state_numel else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused or func.is_view:
            return out
        self.operations += 1
        name = func._schema.name.split("::")[-1]
        moved = 0
        if name in _ROW_WRITES:
            moved = 2 * self._size(args[2] if name != "index_copy_" else args[3])
        elif name in _ROW_READS:
            moved = 2 * self._size(out)
        elif name in _FACTORIES:
            moved = 0 if "empty" in name else self._size(out)
        else:
            written = False
            for i, arg in enumerate(func._schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                mutable = arg.alias_info is not None and arg.alias_info.is_write
                if mutable:
                    written = True
                    moved += self._size(value) * (1 if arg.is_out or name == "copy_" else 2)
                elif not isinstance(value, (list, tuple)):
                    moved += self._size(value)
            if not written:
                for t in (out if isinstance(out, (list, tuple)) else (out,)):
                    moved += self._size(t)
        if moved:
            self.calls += 1
            self.traffic += moved
        return out


_PASS_SOLVERS = {"anderson": {"m": 5}, "broyden": {}, "fixed_point": {}}


def state_passes(batch: int = 4, dim: int = 1024,
                 iterations: int = 30) -> Dict[str, Dict[str, Tuple[float, float, float]]]:
    """Per solver (Anderson m=5, Broyden with its default memory, fixed point): the calls touching
    the state, the traffic over it (in states) and the operations (:class:`_StatePasses`) per
    iteration, outside f, averaged over an
    ``iterations``-step solve (the difference of an ``iterations``-step and a 1-step solve, so
    that set-up and result are left out), now (``"after"``) and before the fused bookkeeping."""
    torch.manual_seed(0)
    w = torch.randn(dim, dim) * (0.9 / dim ** 0.5)
    b = torch.randn(batch, dim)

    def f(z):
        return torch.tanh(z @ w.T + b)

    versions = {"after": {name: get_solver(name) for name in _PASS_SOLVERS}, "before": REFERENCE_SOLVERS}
    out: Dict[str, Dict[str, Tuple[float, float, float]]] = {}
    for key, solvers in versions.items():
        for name, options in _PASS_SOLVERS.items():
            counts = []
            for max_iter in (1, iterations):
                with torch.no_grad(), _StatePasses(batch * dim) as mode:
                    solvers[name](mode.f(f), torch.zeros(batch, dim), max_iter=max_iter, tol=0.0, check_every=0,
                                  **options)
                counts.append((mode.calls, mode.traffic / (batch * dim), mode.operations))
            per = tuple((b_ - a_) / (iterations - 1) for a_, b_ in zip(*counts))
            out.setdefault(name, {})[key] = per
    return out


def solver_overhead(device: torch.device, repeats: int) -> List[str]:
    rows = []
    for name, passes in state_passes().items():
        now, before = passes["after"], passes.get("before")
        was = f"before {before[1]:.1f} ({before[0]:.1f} calls; {before[2]:.1f}) -> " if before else ""
        label = f"{name} m=5" if name == "anderson" else name
        rows.append(f"| passes over the state per iteration outside f, {label}, 30 iters: state traffic (calls "
                    f"touching the state; operations) | {was}{now[1]:.1f} ({now[0]:.1f} calls; {now[2]:.1f}) | fewer |")
    for name, shares in solver_overhead_shares(device, repeats).items():
        was = f"before {shares['before']:.1%} -> " if "before" in shares else ""
        rows.append(f"| solver time outside f / solve time, anderson m=5, 30 iters, {name} | "
                    f"{was}{shares['after']:.1%} (floor at this machine's bandwidth: {shares['floor']:.1%}) | <= 5% |")
    return rows


_PRECISION_SETTINGS = ("before: solver under autocast", "solver outside autocast, no floor",
                       "outside autocast + precision floor (now)")


def mixed_precision_solves(device: torch.device, repeats: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per case and autocast dtype: the forward solve with the layer's default solver and
    tolerances (Anderson, 30 iterations, absolute tolerance 1e-3) in float32 and in three
    settings under autocast: the solver's arithmetic inside autocast (this project before the
    autocast boundary), outside it but without precision-aware stopping, and as it is now.
    Each entry holds the mean steps, the mean relative residual, the diverged and stalled
    fractions and the median solve time in seconds."""
    cfg = DEQConfig()
    solver = get_solver(cfg.f_solver)
    raw = solver.__wrapped__  # the solver without its autocast boundary
    kw = dict(max_iter=cfg.f_max_iter, tol=cfg.f_tol, stop_mode=cfg.f_stop_mode, **cfg.f_solver_options)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, (f, x) in _cases(device, batch=2).items():
        fn, z0 = flat_map(f, x)
        runs: Dict[str, Callable[[], object]] = {"float32": lambda: solver(fn, z0, **kw)}
        for dtype in (torch.float16, torch.bfloat16):
            def under(z, dtype=dtype):
                with torch.autocast(device.type, dtype=dtype):
                    return fn(z)

            def inside(dtype=dtype):
                with torch.autocast(device.type, dtype=dtype):
                    return raw(fn, z0, **kw)

            label = str(dtype).replace("torch.", "")
            runs[f"{label}, {_PRECISION_SETTINGS[0]}"] = inside
            runs[f"{label}, {_PRECISION_SETTINGS[1]}"] = lambda under=under: solver(under, z0, **kw)
            runs[f"{label}, {_PRECISION_SETTINGS[2]}"] = (
                lambda under=under, dtype=dtype: solver(under, z0, precision=dtype, **kw))
        with torch.no_grad():
            times = alternate(runs, repeats, device)
            rows = {}
            for key, run in runs.items():
                res = run()
                rows[key] = dict(steps=float(res.steps.float().mean()), rel_res=float(res.rel_res.mean()),
                                 diverged=float(res.diverged.float().mean()),
                                 stalled=float(res.stalled.float().mean()), seconds=times[key])
        out[name] = rows
    return out


def mixed_precision(device: torch.device, repeats: int) -> List[str]:
    rows = []
    for name, runs in mixed_precision_solves(device, repeats).items():
        base = runs["float32"]["seconds"]
        for key, r in runs.items():
            rows.append(f"| forward solve, {name}, {key}: steps, rel. residual, diverged / stalled, time vs float32 | "
                        f"{r['steps']:.1f}, {r['rel_res']:.1e}, {r['diverged']:.0%} / {r['stalled']:.0%}, "
                        f"{r['seconds'] / base:.2f}x | no divergence |")
    return rows


# The forward of the inverse-backward section: Broyden, a fixed 12 evaluations (11 updates held).
_INVERSE_FORWARD = dict(f_solver="broyden", f_max_iter=12, f_tol=1e-12, check_every=0)
_REFINE_STEPS = (0, 1, 2, 4)
_TIGHT_BACKWARD = dict(b_max_iter=200, b_tol=1e-6)  # float32 states: about their floor


def _loss_weight(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The fixed random w of the backward comparisons' loss <z*, w>."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def _backward_comparison(f: torch.nn.Module, x: torch.Tensor, layers: Dict[str, DEQLayer], reference: DEQLayer,
                         repeats: int, device: torch.device) -> Dict[str, Dict[str, float]]:
    """One forward of every layer of ``layers`` and of ``reference`` on ``x``, each with the loss
    <z*, w> (:func:`_loss_weight`); per layer: the median time of its backward (all layers
    alternating, the graph kept), its parameter gradient's relative error and cosine similarity
    against the reference's, and its mean solver statistics; the reference's statistics under
    ``"reference"``."""
    params = list(f.parameters())
    weight = _loss_weight(x.shape, device)
    losses, stats = {}, {}
    for key, layer in [*layers.items(), ("reference", reference)]:
        z, stats[key] = layer(x)
        losses[key] = (z * weight).sum()

    def backward(key):
        return lambda: torch.autograd.grad(losses[key], params, retain_graph=True)

    def flat(key):
        return torch.cat([g.flatten() for g in backward(key)()])

    ref = flat("reference")
    times = alternate({key: backward(key) for key in layers}, repeats, device)
    out = {"reference": {k: float(v) for k, v in stats["reference"].means().items()}}
    for key in layers:
        grad = flat(key)
        out[key] = dict(seconds=times[key], cos=float(torch.nn.functional.cosine_similarity(grad, ref, dim=0)),
                        err=float((grad - ref).norm() / ref.norm()),
                        **{k: float(v) for k, v in stats[key].means().items()})
    return out


def inverse_backward_runs(device: torch.device, repeats: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per case: the implicit backward at the usual limit (the config's b_max_iter/b_tol), from
    the forward Broyden solve's inverse-Jacobian estimate with ``b_refine_steps`` k = 0, 1, 2, 4
    (``"k=..."``), and, as the baseline of the same work, from zero with ``b_max_iter = k + 2``
    (``"zero k=..."``: the first evaluation, at 0, is idle and the first step gives u = grad, the
    estimate with H = -I), each against the implicit backward solved tight: the median backward
    time (one forward per setting, its backward repeated with the graph kept, all settings
    alternating), the cosine similarity and relative error of the parameter gradient, the mean
    backward steps and relative residual; plus ``"forward"``, the training forward that keeps
    the estimate timed against the plain one, and the estimate's size.
    """
    settings: Dict[str, Dict[str, object]] = {"implicit": {}}
    for k in _REFINE_STEPS:
        settings[f"k={k}"] = dict(b_init="forward_inverse", b_refine_steps=k)
        settings[f"zero k={k}"] = dict(b_max_iter=k + 2)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, (f, x) in _cases(device).items():
        layers = {key: DEQLayer(f, **_INVERSE_FORWARD, **opts) for key, opts in settings.items()}
        runs = _backward_comparison(f, x, layers, DEQLayer(f, **_INVERSE_FORWARD, **_TIGHT_BACKWARD), repeats, device)
        rows = {key: {k: runs[key][k] for k in ("seconds", "cos", "err", "b_steps", "b_rel_res")} for key in layers}
        forwards = alternate({"plain": lambda: layers["implicit"](x), "estimate": lambda: layers["k=0"](x)},
                             repeats, device)
        fn, z0 = flat_map(f, x)
        with torch.no_grad():
            est = DEQConfig(**_INVERSE_FORWARD).forward_solve(training=True).run(fn, z0, inverse=True)
        inv = est.inverse
        size = inv.u.untyped_storage().nbytes() + inv.v.untyped_storage().nbytes()  # the buffers they view
        w = _loss_weight(x.shape, device).reshape(z0.shape)
        rows["forward"] = dict(ratio=forwards["estimate"] / forwards["plain"], mib=size / 2 ** 20,
                               vectors=float(inv.u.shape[1]),
                               moved=float((inv.solve_transposed(w) - w).norm() / w.norm()),
                               ref_rel_res=runs["reference"]["b_rel_res"])
        out[name] = rows
    return out


_BACKWARD_SOLVERS = ("anderson", "broyden", "gmres")


def backward_solver_runs(device: torch.device, repeats: int, tol: float = 1e-5,
                         ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per case and backward solver: the implicit backward solved to the same relative tolerance
    (at most 100 evaluations) from the same forward (Anderson, a fixed 12 evaluations): the median
    backward time (all solvers alternating, the graph kept), the mean steps and relative residual
    reached, and the parameter gradient's relative error against a backward solved to about the
    float32 floor."""
    forward = dict(f_max_iter=12, f_tol=1e-12, check_every=0)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, (f, x) in _cases(device).items():
        layers = {s: DEQLayer(f, **forward, b_solver=s, b_tol=tol, b_max_iter=100) for s in _BACKWARD_SOLVERS}
        tight = DEQLayer(f, **forward, b_solver="gmres", b_solver_options={"restart": 40}, b_tol=1e-7, b_max_iter=300)
        runs = _backward_comparison(f, x, layers, tight, repeats, device)
        rows = {key: dict(seconds=runs[key]["seconds"], b_steps=runs[key]["b_steps"], b_rel_res=runs[key]["b_rel_res"],
                          converged=runs[key]["b_converged"], err=runs[key]["err"]) for key in layers}
        rows["tight"] = dict(b_rel_res=runs["reference"]["b_rel_res"])
        out[name] = rows
    return out


def backward_solvers(device: torch.device, repeats: int) -> List[str]:
    rows = []
    for name, runs in backward_solver_runs(device, repeats).items():
        base = runs["broyden"]["seconds"]
        for key in _BACKWARD_SOLVERS:
            r = runs[key]
            rows.append(f"| backward to rel. 1e-5, {name}, {key}: steps, rel. residual, converged, time vs broyden, "
                        f"gradient error (reference at {runs['tight']['b_rel_res']:.0e}) | {r['b_steps']:.1f}, "
                        f"{r['b_rel_res']:.1e}, {r['converged']:.0%}, {r['seconds'] / base:.2f}x, {r['err']:.1e} | "
                        f"measured |")
    return rows


def inverse_backward(device: torch.device, repeats: int) -> List[str]:
    cfg = DEQConfig()
    rows = []
    for name, runs in inverse_backward_runs(device, repeats).items():
        base, fwd = runs["implicit"]["seconds"], runs["forward"]
        for key, r in runs.items():
            if key == "forward":
                continue
            if key == "implicit":
                label = f"implicit from zero, b_max_iter={cfg.b_max_iter}, b_tol={cfg.b_tol:g}"
            elif key.startswith("zero"):
                label = f"baseline: from zero, b_max_iter={int(key[7:]) + 2}"
            else:
                label = f"from the forward's inverse estimate, b_refine_steps={key[2:]}"
            rows.append(f"| backward, {name}, {label}: time vs implicit, grad cosine / rel. error vs tight solve "
                        f"(rel. res. {fwd['ref_rel_res']:.0e}), b_steps, b_rel_res | {r['seconds'] / base:.2f}x "
                        f"({r['seconds'] * 1e3:.1f} ms), {r['cos']:.6f} / {r['err']:.1e}, {r['b_steps']:.1f}, "
                        f"{r['b_rel_res']:.1e} | cheaper, cos > 0.99 |")
        rows.append(f"| training forward keeping the estimate / plain, {name}, broyden 12 iters | {fwd['ratio']:.2f}x; "
                    f"estimate {fwd['vectors']:.0f} u, v pairs per sample, {fwd['mib']:.1f} MiB held until the "
                    f"backward; it moves the gradient by ||u0 - grad|| / ||grad|| = {fwd['moved']:.1e} | ~1x |")
    return rows


def torchdeq_comparison(device: torch.device, repeats: int) -> Optional[Dict[str, Dict[str, float]]]:
    """Per case: TorchDEQ 0.1.0's Anderson time over ours to the same absolute tolerance, with
    the steps, final residuals and host reads per solve; None when torchdeq is not installed."""
    try:
        from torchdeq.solver.anderson import anderson_solver
    except ImportError:
        return None
    out = {}
    cases = dict(_cases(device))
    torch.manual_seed(0)
    cases["small MLP (64x64)"] = (torch.nn.Sequential(), None)
    small_w = torch.randn(64, 64, device=device) * 0.9 / 8
    small_x = torch.randn(64, 64, device=device)
    for name, (f, x) in cases.items():
        if x is None:
            fn, z0 = (lambda z: torch.tanh(z @ small_w + small_x)), torch.zeros(64, 64, device=device)
        else:
            fn, z0 = flat_map(f, x)
        with torch.no_grad():
            tol = 1e-4 * float(fn(z0).norm(dim=1).mean())  # the same absolute tolerance for both

        def ours():
            return get_solver("anderson")(fn, z0, max_iter=60, tol=tol, m=5, lam=1e-4)

        def theirs():
            return anderson_solver(fn, z0, max_iter=60, tol=tol, stop_mode="abs", m=5, lam=1e-4)

        with torch.no_grad():
            t = alternate({"ours": ours, "theirs": theirs}, repeats, device)
            res = ours()
            their_z, _, info = theirs()
            their_res = float((fn(their_z) - their_z).norm(dim=1).max())
            reads = {}
            for key, fn_ in (("ours", ours), ("theirs", theirs)):
                with _HostReads() as mode:
                    fn_()
                reads[key] = mode.count
        out[name] = dict(tol=tol, ratio=t["theirs"] / t["ours"], steps=int(res.steps.max()),
                         res_ours=float(res.abs_res.max()), res_theirs=their_res, reads_ours=reads["ours"],
                         reads_theirs=reads["theirs"])
    return out


def against_torchdeq(device: torch.device, repeats: int) -> List[str]:
    cases = torchdeq_comparison(device, repeats)
    if cases is None:
        return ["| TorchDEQ comparison | skipped: `pip install torchdeq==0.1.0` | |"]
    return [f"| TorchDEQ time / ours, anderson to abs tol {c['tol']:.1e}, {name} | "
            f"{c['ratio']:.2f}x (steps ours {c['steps']}, residual ours {c['res_ours']:.1e} / theirs "
            f"{c['res_theirs']:.1e}; host reads per solve ours {c['reads_ours']} / theirs {c['reads_theirs']}) "
            f"| >= 1.2x |" for name, c in cases.items()]


_OUTCOME_SOLVERS = ("anderson", "broyden", "fixed_point")
_OUTCOME_TOLS = (1e-12, 1e-8, 1e-6)
_OUTCOME_DIMS = (4, 8, 16, 32, 64)


def outcome_misreports(seeds: int = 40) -> Dict[Tuple[str, float, str], Tuple[int, int, int]]:
    """The misreport sweep: per solver, tolerance and start (cold from 0, 200 iterations; warm
    from that result, 30 iterations), over ``seeds`` random float32 maps ``tanh(0.9 A z + b)``
    (spectral radius of A 0.8, 8 samples) per state width in ``_OUTCOME_DIMS``: the samples
    whose reported outcome disagrees with their returned iterate
    (:func:`deq_core.testing.outcome_disagreements`), the samples, and the samples within the
    float32 floor called diverged (the misreport the fused Broyden made)."""
    out: Dict[Tuple[str, float, str], Tuple[int, int, int]] = {}
    floor = resolution(torch.float32)
    with torch.no_grad():
        for name in _OUTCOME_SOLVERS:
            for tol in _OUTCOME_TOLS:
                counts = {"cold": [0, 0, 0], "warm": [0, 0, 0]}
                for dim in _OUTCOME_DIMS:
                    for seed in range(seeds):
                        f, z0 = random_map(seed, dim, 8, 0.72, "tanh", torch.float32)
                        cold = get_solver(name)(f, z0, max_iter=200, tol=tol)
                        warm = get_solver(name)(f, cold.z, max_iter=30, tol=tol)
                        for key, res in (("cold", cold), ("warm", warm)):
                            c = counts[key]
                            c[0] += int(outcome_disagreements(f, res, tol).sum())
                            c[1] += res.z.shape[0]
                            c[2] += int((res.diverged & (res.rel_res <= floor)).sum())
                for key, c in counts.items():
                    out[name, tol, key] = tuple(c)
    return out


def sequence_misreports(seeds: int = 10) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """Per solver and state dtype: over ``seeds`` random causal maps (4 sequences of 8 positions,
    width 8, tolerance 1e-6) at limits 6, 12 and 25, the positions whose reported outcome or
    residual disagrees with the returned state, and the positions."""
    out: Dict[Tuple[str, str], Tuple[int, int]] = {}
    with torch.no_grad():
        for name in _OUTCOME_SOLVERS:
            for dtype in (torch.float32, torch.float64):
                bad = total = 0
                for seed in range(seeds):
                    f, z0 = random_map(seed, 8, 32, 0.9, "tanh", dtype, sequence_length=8)
                    for limit in (6, 12, 25):
                        res = get_solver(name)(f, z0, max_iter=limit, tol=1e-6, sequence_length=8)
                        bad += int(outcome_disagreements(f, res, 1e-6).sum())
                        total += res.z.shape[0]
                out[name, str(dtype).replace("torch.", "")] = (bad, total)
    return out


def outcomes(device: torch.device, repeats: int = 0) -> List[str]:
    rows = []
    for (name, tol, start), (bad, total, at_floor) in outcome_misreports().items():
        rows.append(f"| outcome misreports, {name}, tol {tol:g}, {start} start (D 4-64, 40 seeds x 8 samples) | "
                    f"{bad}/{total} (within the floor and called diverged: {at_floor}) | 0 |")
    for (name, dtype), (bad, total) in sequence_misreports().items():
        rows.append(f"| outcome or residual misreports, {name}, {dtype}, sequence positions (limits 6/12/25) | "
                    f"{bad}/{total} | 0 |")
    return rows


_MEMORY_MAPS = 10


def broyden_memory_sweep(memories: Tuple[int, ...] = (3, 5, 10, 20), dim: int = 40) -> Dict[int, Tuple[int, float]]:
    """Per memory: on ``_MEMORY_MAPS`` random linear maps ``A z + b`` of spectral radius 0.99
    (width ``dim``, 3 samples, tolerance 1e-8, float64, at most 400 evaluations), how many
    limited-memory Broyden solves converge within 4x the evaluations of unlimited memory, and
    the worst ratio of evaluations (inf where one did not converge)."""
    out = {}
    for memory in memories:
        solved, worst = 0, 0.0
        for seed in range(_MEMORY_MAPS):
            f, z0 = random_map(seed, dim, 3, 0.99, "linear", torch.float64)
            full = get_solver("broyden")(f, z0, max_iter=400, tol=1e-8)
            res = get_solver("broyden")(f, z0, max_iter=400, tol=1e-8, memory=memory)
            ratio = (int(res.steps.max()) / int(full.steps.max()) if bool(res.converged.all())
                     else float("inf"))
            solved += ratio <= 4.0
            worst = max(worst, ratio)
        out[memory] = (solved, worst)
    return out


def broyden_memory(device: torch.device, repeats: int = 0) -> List[str]:
    return [f"| limited-memory Broyden, memory {memory}: random linear maps of spectral radius 0.99 (D 40) solved "
            f"within 4x unlimited memory's evaluations | {solved}/{_MEMORY_MAPS} (worst {worst:.1f}x) | "
            f">= 9/{_MEMORY_MAPS} from memory 5 |" for memory, (solved, worst) in broyden_memory_sweep().items()]


_SECTIONS = {"jr_overhead": jr_overhead, "memory": memory, "reversible_memory": reversible_memory,
             "reversible": reversible, "backward_solvers": backward_solvers, "solver_overhead": solver_overhead,
             "mixed_precision": mixed_precision, "inverse_backward": inverse_backward, "torchdeq": against_torchdeq,
             "outcomes": outcomes, "broyden_memory": broyden_memory}


def main(argv=None) -> None:
    parser = add_device_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=sorted(_SECTIONS), default=None,
                        help="run only these sections (default: all)")
    args = parser.parse_args(argv)
    device = device_from(args)
    print(describe(device))
    print("| measurement | result | target |")
    print("|---|---|---|")
    for key in args.only or _SECTIONS:
        for row in _SECTIONS[key](device, args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
