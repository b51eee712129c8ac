"""Experiment 4 (the part measured here): the core benchmark's cost figures as numbers. The
training-time ratios of the vision and language runs come from those runs themselves."""
from __future__ import annotations

from typing import Any, Dict

import torch

from bench.core import jr_overhead_ratios, memory_bytes, solver_overhead_shares, torchdeq_comparison

from .settings import Settings

__all__ = ["run_cost"]


def run_cost(s: Settings) -> Dict[str, Any]:
    """JR step overhead, implicit/unrolled saved bytes, solver time outside f and TorchDEQ/ours,
    on the core benchmark's transformer and convolution cells, in this process."""
    device = torch.device(s.device)
    torch.manual_seed(0)
    return dict(
        jr_overhead=jr_overhead_ratios(device, s.cost_repeats),
        memory={name: dict(implicit=i, unrolled=u) for name, (i, u) in memory_bytes(device).items()},
        solver_outside_f=solver_overhead_shares(device, s.cost_repeats),
        torchdeq=torchdeq_comparison(device, s.cost_repeats),
    )
