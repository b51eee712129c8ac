"""Limited-memory ("good") Broyden method on g(z) = f(z) - z."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
from .registry import SolverOption, register_solver
from .result import SolverResult


def _low_rank(us: torch.Tensor, vs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i us_i (vs_i . x) for histories of shape (B, n, D) and x of shape (B, D)."""
    coeff = torch.bmm(vs, x.unsqueeze(2))  # (B, n, 1)
    return torch.bmm(coeff.transpose(1, 2), us).squeeze(1)


@register_solver("broyden", {
    "memory": SolverOption(int, lambda v: v >= 1, ">= 1", "rank-one updates kept before the inverse-Jacobian "
                           "approximation restarts; None keeps max_iter", optional=True),
})
def broyden(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_iter: int,
            tol: float, stop_mode: str = DEFAULT_STOP_MODE, check_every: Optional[int] = None,
            divergence_factor: float = DIVERGENCE_FACTOR, trace: bool = False,
            precision: Optional[torch.dtype] = None, sequence_length: Optional[int] = None,
            memory: Optional[int] = None) -> SolverResult:
    """Solve ``z = f(z)`` for a batch of flat states ``z0`` of shape ``(B, D)``.

    The inverse Jacobian of g is approximated by ``H = -I + sum_i u_i v_i^T`` (starting from
    -I, the inverse Jacobian of g when J_f = 0) and refined by Sherman-Morrison updates; once
    ``memory`` updates are held, the approximation restarts from -I (at the current iterate).

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
            sequence_length: as for every solver (:mod:`deq_core.solvers.registry`).
        memory: rank-one updates kept before the restart (``None``: ``max_iter``, never restart).

    Returns:
        the :class:`SolverResult`.
    """
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length)
    batch, dim = z0.shape
    mem = memory or max_iter
    us = z0.new_empty(batch, mem, dim)  # only slots already written are read
    vs = z0.new_empty(batch, mem, dim)
    z = z0.clone()  # updated in place below
    fz = f(z)
    gz = fz - z
    k = 0
    while True:
        active = tracker.update(z, fz, gz)
        if tracker.done():
            return tracker.result()
        # A full history restarts from H = -I: overwriting the oldest update instead leaves an H
        # that no longer satisfies the recent secant conditions, and on a slowly contracting map
        # (spectral radius 0.99) every memory from 2 to 20 diverged that way.
        n = k % mem
        keep = active[:, None]
        # Step s = -H g; frozen samples take no step (and so keep their iterate).
        step = gz - _low_rank(us[:, :n], vs[:, :n], gz) if n else gz.clone()
        step.masked_fill_(~keep, 0.0)
        z.add_(step)
        fz = f(z)
        gz_new = fz - z
        y = gz_new - gz
        gz = gz_new
        hy = _low_rank(us[:, :n], vs[:, :n], y).sub_(y) if n else -y
        sh = _low_rank(vs[:, :n], us[:, :n], step).sub_(step) if n else -step  # H^T s
        denom = (sh * y).sum(dim=1, keepdim=True)
        # Skip the update (zero u, v) for frozen samples and vanishing denominators. Scaling by a
        # per-sample factor is cheaper than a masked select; it is exact where the factor is 0
        # unless the sample's vectors are non-finite, and then the sample has diverged anyway.
        ok = keep & torch.isfinite(denom) & (denom != 0)
        scale = torch.where(ok, 1.0 / torch.where(ok, denom, 1.0), 0.0)
        slot = n
        torch.mul(step - hy, scale, out=us[:, slot])
        torch.mul(sh, ok.to(sh.dtype), out=vs[:, slot])
        k += 1
