"""The one result type every solver returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SolverResult"]


@dataclass
class SolverResult:
    """Outcome of a batched fixed-point solve; every per-sample field has shape ``(B,)``.

    ``z`` is each sample's lowest-residual iterate (in the stop mode's residual). ``steps`` counts
    the evaluations of the map a sample needed (it stops counting once the sample converged or
    diverged). ``diverged`` marks samples whose residual became non-finite, exploded (beyond
    ``divergence_factor`` times the first residual), or never fell below the first residual in
    the whole solve; their ``z`` is still the best finite iterate seen. ``stalled`` marks samples
    whose map is computed in float16/bfloat16 and whose residual levelled off at that precision's
    floor above the tolerance (:mod:`deq_core.solvers.precision`); it is all False for float32 and
    float64 maps (and when a solver does not set it). A sample that is none of the three ran out of
    iterations while still making progress. ``host_reads`` counts device-to-host reads the solver made. ``trace`` (when requested) holds the stop-mode residual of every iteration,
    shape ``(iterations, B)``.
    """

    z: torch.Tensor
    steps: torch.Tensor
    abs_res: torch.Tensor
    rel_res: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    host_reads: int = 0
    trace: Optional[torch.Tensor] = None
    stalled: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.stalled is None:
            self.stalled = torch.zeros_like(self.converged)
