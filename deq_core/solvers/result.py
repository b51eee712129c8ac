"""The one result type every solver returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SolverResult"]


@dataclass
class SolverResult:
    """Outcome of a batched fixed-point solve; every per-sample field has shape ``(B,)``.

    ``z`` is each sample's lowest-residual finite iterate (in the stop mode's residual) and ``fz``
    the map's value there, ``f(z)``, when the solver keeps it (``None`` otherwise). ``steps``
    counts the evaluations of the map a sample needed (it stops counting once the sample converged,
    stalled or diverged). Each sample ends in exactly one of ``converged``, ``stalled`` (at the
    precision floor), ``diverged``, or none of them: it ran out of iterations while still making
    progress. The rules are stated once, in :mod:`deq_core.solvers._tracking`. ``stalled`` is all
    False when a solver does not set it. ``host_reads`` counts device-to-host reads the solver made.
    ``trace`` (when requested) holds the stop-mode residual of every iteration, shape
    ``(iterations, B)``.
    """

    z: torch.Tensor
    steps: torch.Tensor
    abs_res: torch.Tensor
    rel_res: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    host_reads: int = 0
    trace: Optional[torch.Tensor] = None
    fz: Optional[torch.Tensor] = None
    stalled: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.stalled is None:
            self.stalled = torch.zeros_like(self.converged)
