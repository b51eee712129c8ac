"""Eager against CUDA-graph-captured work of the benchmark's transformer cell: an Anderson forward
solve, and a whole implicit training step (forward solve, backward solve, parameter gradients).

    python -m bench.graphs [--device cuda] [--repeats 20] [--batch 8]

Both run with ``check_every=0`` (the solve reads nothing back to the host, so a graph can hold
it) and a tolerance no iterate reaches, so that every run does the same iterations. A captured
replay must give the eager result; the figure is the replay's time over the eager call's. On a
device without CUDA graphs (CPU) only the eager runs are timed and checked for repeatability.
JR is off in the captured step: its random probes are drawn on the host and copied to the device,
which a replay would not redo.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench._run import add_device_args, alternate, describe, device_from, relative_error, sync
from bench.cells import TransformerCell
from bench.core import flat_map
from deq_core import DEQLayer, get_solver

_ITERS = 30  # forward solve
_STEP_ITERS = 12  # each solve of the training step


@dataclass
class GraphComparison:
    """One workload run eagerly and (on CUDA) replayed from a captured graph."""

    name: str
    eager_s: float
    replay_s: Optional[float]  # None where no graph was captured
    rel_diff: float  # replay against eager (eager against eager where none was captured)
    same_steps: bool
    steps: float

    @property
    def captured(self) -> bool:
        return self.replay_s is not None


def _forward_solve(device: torch.device, batch: int) -> Callable[[], Tuple[List[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    cell = TransformerCell().to(device)
    f, z0 = flat_map(cell, torch.randn(batch, 128, 256, device=device))
    solve = get_solver("anderson")

    def run():
        with torch.no_grad():
            res = solve(f, z0, max_iter=_ITERS, tol=1e-12, check_every=0, m=5)
        return [res.z], res.steps

    return run


def _training_step(device: torch.device, batch: int) -> Callable[[], Tuple[List[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    cell = TransformerCell().to(device)
    layer = DEQLayer(cell, f_max_iter=_STEP_ITERS, f_tol=1e-12, b_max_iter=_STEP_ITERS, b_tol=1e-12,
                     check_every=0, check_finite=False, jac_weight=0.0)
    x = torch.randn(batch, 128, 256, device=device)
    params = list(cell.parameters())

    def run():
        for p in params:
            p.grad = None
        z, stats = layer(x)
        z.pow(2).mean().backward()
        return [p.grad for p in params], stats.f_steps + stats.b_steps

    return run


WORKLOADS: Dict[str, Callable] = {
    f"forward solve, anderson m=5, {_ITERS} iterations": _forward_solve,
    f"training step, implicit, {_STEP_ITERS} + {_STEP_ITERS} iterations, JR off": _training_step,
}


def _capture(run: Callable, device: torch.device):
    """Capture ``run`` in a CUDA graph after warm-up calls on a side stream (as torch's docs
    prescribe); returns the graph and ``run``'s outputs, which every replay refills."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph, outputs


def compare(device: torch.device, batch: int = 8, repeats: int = 20) -> List[GraphComparison]:
    """Every workload eagerly and, on CUDA, replayed from its captured graph (see the module
    docstring). Returns one :class:`GraphComparison` each."""
    out = []
    for name, build in WORKLOADS.items():
        run = build(device, batch)
        ref, ref_steps = run()
        ref, ref_steps = [t.detach().clone() for t in ref], ref_steps.clone()
        fns: Dict[str, Callable[[], object]] = {"eager": run}
        if device.type == "cuda":
            graph, (outputs, steps) = _capture(run, device)
            fns["replay"] = graph.replay
        t = alternate(fns, repeats, device)
        if device.type == "cuda":
            graph.replay()
            sync(device)
        else:
            outputs, steps = run()
        out.append(GraphComparison(name, t["eager"], t.get("replay"), relative_error(outputs, ref),
                                   bool(torch.equal(steps, ref_steps)), float(steps.float().mean())))
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = add_device_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    device = device_from(args)
    print(describe(device))
    print("| workload | eager | replay / eager | result difference | steps |\n|---|---|---|---|---|")
    for c in compare(device, args.batch, args.repeats):
        ratio = f"{c.replay_s / c.eager_s:.2f}x" if c.captured else "not captured (needs CUDA)"
        print(f"| {c.name} | {c.eager_s * 1e3:.1f} ms | {ratio} | {c.rel_diff:.1e} | "
              f"{c.steps:.0f}{'' if c.same_steps else ' (differ)'} |")


if __name__ == "__main__":
    main()
