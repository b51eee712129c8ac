"""FLOPs of a training step as ``torch.utils.flop_counter.FlopCounterMode`` counts them, a DEQ
layer held to an exact number of solver steps, and the FLOP/time table the model benchmarks print.

What is counted: matrix products, convolutions and attention, forward and backward (the
backward solve's vector-Jacobian products and the solvers' own matrix products included), with
FlopCounterMode's formulas (a multiply-add is 2 FLOPs). Elementwise operations, normalizations,
reductions and the optimizer's update count nothing. On CPU, PyTorch's fused attention kernel
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which FlopCounterMode has no
formula for, is counted with the formulas of the other fused attention kernels. Any other
operation that looks like a matrix product and has no formula is reported as uncounted.
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from bench._run import alternate
from deq_core import DEQLayer

# Tolerances no solve reaches, so that a solve runs to its limit.
UNREACHABLE_TOL = 1e-30
# The solver steps (forward and backward) a DEQ model is held at beside its training limits.
FORCED_STEPS = (6,)
# Words of operation names that do matrix-product work, for the uncounted-operation check.
_MATMUL_WORDS = {"mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "mv", "dot", "matmul", "linear", "einsum",
                 "attention"}


def _matmul_like(op: Any) -> bool:
    words = str(op).split(".")[-1].strip("_").split("_")
    return any(w in _MATMUL_WORDS or (w.startswith("conv") and w != "convert") for w in words)


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_formulas() -> Dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    extra = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward)):
        if hasattr(aten, name) and getattr(aten, name) not in flop_counter.flop_registry:
            extra[getattr(aten, name)] = formula
    return extra


class _OpCensus(TorchDispatchMode):
    """Records the operation of every dispatched call."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@dataclass
class FlopCount:
    """What :func:`count_flops` counted: the total, the FLOPs per operation, and the names of the
    operations that ran, look like matrix products and have no formula (not counted)."""

    total: int
    by_op: Dict[str, int]
    uncounted: Tuple[str, ...]


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """Run ``fn`` (e.g. one whole training step: forward, backward, optimizer step) under
    FlopCounterMode and return what it counted.

    Args:
        fn: the work to count; its result is dropped.

    Returns:
        the :class:`FlopCount`.
    """
    extra = _extra_formulas()
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=extra)
    census = _OpCensus()
    with counter, census:
        fn()
    known = set(flop_counter.flop_registry) | set(extra)
    uncounted = tuple(sorted(str(op) for op in census.ops if op not in known and _matmul_like(op)))
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(total=counter.get_total_flops(), by_op=by_op, uncounted=uncounted)


@contextlib.contextmanager
def forced_steps(layers: Iterable[DEQLayer], f_steps: int, b_steps: int) -> Iterator[None]:
    """Run every layer of ``layers`` at exactly ``f_steps`` forward and ``b_steps`` backward
    solver steps, with Jacobian regularization off, through :meth:`DEQLayer.overridden`: the
    limits are set to these numbers, the tolerances to :data:`UNREACHABLE_TOL` and the forward
    limit's random reduction to 0. (A solve still stops early where a sample diverges or stalls;
    the statistics of the pass tell.) A backward pass keeps the config of its forward pass, so
    the backward may run after the block.

    Args:
        layers: the model's equilibrium layers.
        f_steps: forward solver steps (evaluations of f in the forward solve).
        b_steps: backward solver steps.

    Returns:
        a context manager.
    """
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.overridden(
                f_max_iter=f_steps, b_max_iter=b_steps, f_max_iter_jitter=0, f_tol=UNREACHABLE_TOL,
                b_tol=UNREACHABLE_TOL, jac_freq=0.0))
        yield


@dataclass
class FlopRow:
    """One line of :func:`flop_table`: a model (or a DEQ model at some solver steps), its FLOPs
    per training step, its median seconds per step, the mean forward/backward solver steps its
    statistics reported (DEQ models, else None) and the steps it was held to (else None)."""

    label: str
    flops: int
    seconds: float
    steps: Optional[Tuple[float, float]] = None
    forced: Optional[Tuple[int, int]] = None
    uncounted: Tuple[str, ...] = field(default_factory=tuple)


def ratios(row: FlopRow, base: FlopRow) -> Tuple[float, float, float]:
    """``row`` against ``base``: FLOP ratio, time ratio and time-per-FLOP ratio (the time ratio
    over the FLOP ratio: above 1 when ``row`` gets less done per second).

    Args:
        row: the model compared.
        base: the model compared with.

    Returns:
        ``(flops / base flops, seconds / base seconds, their quotient)``.
    """
    flop_ratio = row.flops / base.flops
    time_ratio = row.seconds / base.seconds
    return flop_ratio, time_ratio, time_ratio / flop_ratio


def flop_table(rows: Sequence[FlopRow], baselines: Sequence[str]) -> List[str]:
    """Markdown lines: per row its solver steps, GFLOP and seconds per step, and its FLOP, time
    and time-per-FLOP ratios to every row named in ``baselines``; then a note for each row whose
    solver steps differ from those it was held to or that ran uncounted operations.

    Args:
        rows: the rows, in the order printed.
        baselines: labels of the rows the ratios are taken to.

    Returns:
        the lines.
    """
    by_label = {r.label: r for r in rows}
    base_rows = [by_label[b] for b in baselines]
    head = ["model", "solver steps fwd / bwd", "GFLOP/step"] + [f"FLOPs vs {b}" for b in baselines] + \
        ["s/step"] + [f"time vs {b}" for b in baselines] + [f"time/FLOP vs {b}" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        per_base = [ratios(r, b) for b in base_rows]
        steps = "-" if r.steps is None else f"{r.steps[0]:.1f} / {r.steps[1]:.1f}"
        cells = [r.label, steps, f"{r.flops / 1e9:.2f}"] + [f"{q[0]:.2f}x" for q in per_base] + \
            [f"{r.seconds:.3f}"] + [f"{q[1]:.2f}x" for q in per_base] + [f"{q[2]:.2f}x" for q in per_base]
        lines.append("| " + " | ".join(cells) + " |")
        if r.forced is not None and r.steps is not None and tuple(r.steps) != tuple(map(float, r.forced)):
            notes.append(f"note: {r.label} took {steps} solver steps, not the {r.forced[0]} / {r.forced[1]} "
                         "it was held to (a sample diverged or stalled)")
        if r.uncounted:
            notes.append(f"note: {r.label} ran operations without a FLOP formula (not counted): "
                         f"{', '.join(r.uncounted)}")
    return lines + notes


@dataclass
class FlopRun:
    """One row of a FLOP comparison: ``step`` runs one whole training step of a model whose
    equilibrium layers are ``layers`` (none for an explicit network), held at ``held`` (forward,
    backward) solver steps by :func:`forced_steps`, or at the model's own limits when ``None``."""

    step: Callable[[], Any]
    layers: Sequence[DEQLayer] = ()
    held: Optional[Tuple[int, int]] = None


def deq_runs(model: str, step: Callable[[], Any], layers: Sequence[DEQLayer],
             forced: Sequence[int] = FORCED_STEPS) -> Dict[str, FlopRun]:
    """The rows of a DEQ model: at its training limits and at k/k solver steps for each k of ``forced``.

    Args:
        model: the model's name in the labels.
        step: one training step of it.
        layers: its equilibrium layers (the first one's limits label the first row).
        forced: the solver steps to hold it at.

    Returns:
        the runs by label.
    """
    cfg = layers[0].config
    runs = {f"{model}, training limits": FlopRun(step, layers, (cfg.f_max_iter, cfg.b_max_iter))}
    runs.update({f"{model}, {k}/{k} steps": FlopRun(step, layers, (k, k)) for k in forced})
    return runs


def compare_flops(runs: Mapping[str, FlopRun], steps: int, device: torch.device) -> List[FlopRow]:
    """FLOPs and time of a training step of each run: the FLOPs counted over one whole step by
    :func:`count_flops`, the time the median of ``steps`` steps timed interleaved with every other
    run's (after one warm-up each), the mean solver steps the layers' statistics reported.

    Args:
        runs: the rows by label, in the order returned.
        steps: timed steps per row.
        device: where the steps run (for synchronization).

    Returns:
        one :class:`FlopRow` per run.
    """
    seen: Dict[str, List[Tuple[float, float]]] = {label: [] for label in runs}

    def run(label: str) -> None:
        r = runs[label]
        with forced_steps(r.layers, *r.held) if r.held else contextlib.nullcontext():
            r.step()
        for layer in r.layers:
            d = layer.stats.to_dict()
            seen[label].append((d["f_steps"], d.get("b_steps", float("nan"))))

    fns = {label: (lambda label=label: run(label)) for label in runs}
    seconds = alternate(fns, steps, device)
    counts = {label: count_flops(fn) for label, fn in fns.items()}
    return [FlopRow(label, counts[label].total, seconds[label], forced=runs[label].held,
                    uncounted=counts[label].uncounted,
                    steps=None if not seen[label] else (statistics.mean(s[0] for s in seen[label]),
                                                        statistics.mean(s[1] for s in seen[label])))
            for label in runs]
