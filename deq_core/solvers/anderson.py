"""Anderson acceleration (type II) with a ridge relative to the residual scale."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
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
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision, sequence_length:
            as for every solver (:mod:`deq_core.solvers.registry`).
        m: the number of past iterates mixed.
        beta: the weight of f's values against the iterates in the mix (1: f's values only).
        lam: ridge on the mixing system, relative to the mean squared residual in the history.

    Returns:
        the :class:`SolverResult`.
    """
    # The iterates in turn and the f history live in the tracker's rows: a new best, or the next
    # iterate (the mix for active samples, z for frozen ones), is one row gather.
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length, regions=[("z0", 1), ("fs", m), ("z1", 1)])
    rows = tracker.rows
    batch, dim = z0.shape
    # Histories are only read in slots already written, so they need no zero fill.
    fs = rows.history("fs")
    gs = z0.new_empty(batch, m, dim)
    gram = z0.new_empty(batch, m, m)
    tiny = torch.finfo(z0.dtype).tiny
    systems = [_MixingSystem(z0, n) for n in range(1, min(m, max_iter) + 1)]
    ridge = z0.new_empty(batch)
    z = rows["z0"].copy_(z0)
    fz = f(z)
    k = 0
    while True:
        slot, n, here, there = k % m, min(k + 1, m), f"z{k % 2}", f"z{(k + 1) % 2}"
        g = gs[:, slot]
        torch.sub(fz, z, out=g)
        fs[:, slot].copy_(fz)
        tracker.update(z, fz, g, z_at=(here, 0), fz_at=("fs", slot))
        if tracker.done():
            return tracker.result()
        # Every batched operation below is per sample, so a diverged sample's non-finite history
        # cannot reach the others; frozen samples keep their iterate in the final select().
        system = systems[n - 1]
        # Only the new row/column of the Gram matrix G G^T changes: one pass over the history.
        row = torch.bmm(g.unsqueeze(1), gs[:, :n].transpose(1, 2), out=system.row).squeeze(1)
        gram[:, slot, :n].copy_(row)
        gram[:, :n, slot].copy_(row)
        h = gram[:, :n, :n]
        torch.mean(torch.diagonal(h, dim1=1, dim2=2), dim=1, out=ridge).mul_(lam).clamp_min_(tiny)
        alpha_t = system.solve(h, ridge)
        # The mix: one pass over the f history, into the tracker's scratch.
        mix = rows[tracker.spare]
        torch.bmm(alpha_t, fs[:, :n], out=mix.unsqueeze(1))
        if beta != 1.0:
            mix.unsqueeze(1).baddbmm_(alpha_t, gs[:, :n], alpha=beta - 1.0)
        rows.select(there, tracker.active, (tracker.spare, 0), (here, 0))
        z = rows[there]
        fz = f(z)
        k += 1


class _MixingSystem:
    """The bordered system ``[[0, 1^T], [1, H + ridge I]] [mu; alpha] = [1; 0]`` of ``n`` mixed
    iterates, in buffers allocated once: solving it allocates nothing and reads nothing back."""

    def __init__(self, z0: torch.Tensor, n: int) -> None:
        batch, small = z0.shape[0], dict(dtype=z0.dtype, device=z0.device)
        self.row = torch.empty(batch, 1, n, **small)
        self.eye = torch.eye(n, **small)
        self.ridge_eye = torch.empty(batch, n, n, **small)
        self.system = torch.zeros(batch, n + 1, n + 1, **small)
        self.system[:, 0, 1:] = 1.0
        self.system[:, 1:, 0] = 1.0
        self.rhs = torch.zeros(batch, n + 1, 1, **small)
        self.rhs[:, 0] = 1.0
        # The layouts LAPACK works in (column-major), so that no call restrides its output.
        self.lu = torch.empty(batch, n + 1, n + 1, **small).mT
        self.pivots = torch.empty(batch, n + 1, dtype=torch.int32, device=z0.device)
        self.info = torch.empty(batch, dtype=torch.int32, device=z0.device)
        self.solution = torch.empty(batch, 1, n + 1, **small).mT

    def solve(self, h: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
        """The mixing weights as a ``(B, 1, n)`` row, for Gram matrices ``h`` and ridges ``ridge``."""
        torch.mul(ridge[:, None, None], self.eye, out=self.ridge_eye)
        torch.add(h, self.ridge_eye, out=self.system[:, 1:, 1:])
        # LU without error checks (no host sync), the factorization torch.linalg.solve_ex uses.
        torch.linalg.lu_factor_ex(self.system, out=(self.lu, self.pivots, self.info))
        torch.linalg.lu_solve(self.lu, self.pivots, self.rhs, out=self.solution)
        return self.solution[:, 1:].transpose(1, 2)
