"""Damped fixed-point (Picard) iteration: z <- (1 - damping) z + damping f(z)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
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
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision, sequence_length:
            as for every solver (:mod:`deq_core.solvers.registry`).
        damping: the weight of f(z) in each update (1: plain iteration).

    Returns:
        the :class:`SolverResult`.
    """
    # The iterates in turn and a copy of f(z) live in the tracker's rows: a new best, or the next
    # iterate (f(z), or the damped step, for active samples, z for frozen ones), is one row gather.
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length, regions=[("z0", 1), ("fz", 1), ("z1", 1)])
    rows = tracker.rows
    g = torch.empty_like(z0)
    z = rows["z0"].copy_(z0)
    fz = f(z)
    k = 0
    while True:
        here, there = f"z{k % 2}", f"z{(k + 1) % 2}"
        rows["fz"].copy_(fz)
        tracker.update(z, fz, torch.sub(fz, z, out=g), z_at=(here, 0), fz_at=("fz", 0))
        if tracker.done():
            return tracker.result()
        if damping != 1.0:
            torch.lerp(z, fz, damping, out=rows["fz"])
        rows.select(there, tracker.active, ("fz", 0), (here, 0))
        z = rows[there]
        fz = f(z)
        k += 1
