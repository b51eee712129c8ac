"""Damped fixed-point (Picard) iteration: z <- (1 - damping) z + damping f(z)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
from .registry import SolverOption, register_solver
from .result import SolverResult


@register_solver("fixed_point", {
    "damping": SolverOption(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]",
                            "weight of f(z) in each update; 1 is plain iteration"),
})
def fixed_point(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_iter: int,
                tol: float, stop_mode: str = DEFAULT_STOP_MODE, check_every: Optional[int] = None,
                divergence_factor: float = DIVERGENCE_FACTOR, trace: bool = False,
                precision: Optional[torch.dtype] = None, sequence_length: Optional[int] = None,
                damping: float = 1.0) -> SolverResult:
    """Solve ``z = f(z)`` for a batch of flat states ``z0`` of shape ``(B, D)``.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
            sequence_length: as for every solver (:mod:`deq_core.solvers.registry`).
        damping: the weight of f(z) in each update (1: plain iteration).

    Returns:
        the :class:`SolverResult`.
    """
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length)
    buffers = (torch.empty_like(z0), torch.empty_like(z0))  # iterates in turn, no allocation
    z = z0
    fz = f(z)
    k = 0
    while True:
        active = tracker.update(z, fz)
        if tracker.done():
            return tracker.result()
        z_new = buffers[k % 2]
        if damping == 1.0:
            torch.where(active[:, None], fz, z, out=z_new)
        else:
            torch.where(active[:, None], torch.lerp(z, fz, damping), z, out=z_new)
        z = z_new
        fz = f(z)
        k += 1
