"""Anderson acceleration (type II) with a ridge relative to the residual scale."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
from .registry import SolverOption, register_solver
from .result import SolverResult


@register_solver("anderson", {
    "m": SolverOption(int, lambda v: v >= 1, ">= 1", "number of past iterates mixed"),
    "beta": SolverOption(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]", "mixing weight of f values against iterates"),
    "lam": SolverOption(float, lambda v: v >= 0.0, ">= 0",
                        "ridge, relative to the mean squared residual in the history"),
})
def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_iter: int,
             tol: float, stop_mode: str = DEFAULT_STOP_MODE, check_every: Optional[int] = None,
             divergence_factor: float = DIVERGENCE_FACTOR, trace: bool = False,
             precision: Optional[torch.dtype] = None, sequence_length: Optional[int] = None,
             m: int = 5, beta: float = 1.0, lam: float = 1e-4) -> SolverResult:
    """Solve ``z = f(z)`` for a batch of flat states ``z0`` of shape ``(B, D)``.

    Each step mixes the last ``m`` values of f with weights ``alpha`` that minimise
    ``||sum_i alpha_i g_i||`` subject to ``sum_i alpha_i = 1``, where ``g_i = f(z_i) - z_i``.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
            sequence_length: as for every solver (:mod:`deq_core.solvers.registry`).
        m: the number of past iterates mixed.
        beta: the weight of f's values against the iterates in the mix (1: f's values only).
        lam: ridge on the mixing system, relative to the mean squared residual in the history.

    Returns:
        the :class:`SolverResult`.
    """
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length)
    batch, dim = z0.shape
    # Histories are only read in slots already written, so they need no zero fill.
    fs = z0.new_empty(batch, m, dim)
    gs = z0.new_empty(batch, m, dim)
    gram = z0.new_empty(batch, m, m)
    tiny = torch.finfo(z0.dtype).tiny
    eye = torch.eye(m, dtype=z0.dtype, device=z0.device)
    # Two buffers take turns holding the iterate, so the loop allocates nothing of size (B, D)
    # besides f's own output (on CPU, fresh large buffers cost page faults every iteration).
    buffers = (torch.empty_like(z0), torch.empty_like(z0))
    z = z0
    fz = f(z)
    k = 0
    while True:
        slot, n = k % m, min(k + 1, m)
        g = gs[:, slot]
        torch.sub(fz, z, out=g)
        active = tracker.update(z, fz, g)
        if tracker.done():
            return tracker.result()
        # Every batched operation below is per sample, so a diverged sample's non-finite history
        # cannot reach the others; frozen samples are held in place by the final where().
        fs[:, slot].copy_(fz)
        # Only the new row/column of the Gram matrix G G^T changes.
        row = torch.bmm(g.unsqueeze(1), gs[:, :n].transpose(1, 2)).squeeze(1)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        h = gram[:, :n, :n]
        ridge = (lam * torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)).clamp_min(tiny)
        # Bordered system [[0, 1^T], [1, H + ridge I]] [mu; alpha] = [1; 0].
        system = z0.new_zeros(batch, n + 1, n + 1)
        system[:, 0, 1:] = 1.0
        system[:, 1:, 0] = 1.0
        system[:, 1:, 1:] = h + ridge[:, None, None] * eye[:n, :n]
        rhs = z0.new_zeros(batch, n + 1, 1)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve_ex(system, rhs)[0][:, 1:]  # solve_ex: no host sync on errors
        alpha_t = alpha.transpose(1, 2)
        z_new = buffers[k % 2]
        torch.bmm(alpha_t, fs[:, :n], out=z_new.unsqueeze(1))
        if beta != 1.0:
            z_new.sub_(torch.bmm(alpha_t, gs[:, :n]).squeeze(1), alpha=1.0 - beta)
        torch.where(active[:, None], z_new, z, out=z_new)
        z = z_new
        fz = f(z)
        k += 1
