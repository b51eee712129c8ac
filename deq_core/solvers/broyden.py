"""Limited-memory ("good") Broyden method on g(z) = f(z) - z."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
from .registry import SolverOption, register_solver
from .result import InverseEstimate, SolverResult


@register_solver("broyden", {
    "memory": SolverOption(int, lambda v: v >= 1, ">= 1", "rank-one updates kept before the inverse-Jacobian "
                           "approximation restarts; None keeps max_iter", optional=True),
})
def broyden(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_iter: int,
            tol: float, stop_mode: str = DEFAULT_STOP_MODE, check_every: Optional[int] = None,
            divergence_factor: float = DIVERGENCE_FACTOR, trace: bool = False,
            precision: Optional[torch.dtype] = None, sequence_length: Optional[int] = None,
            memory: Optional[int] = None, inverse: bool = False) -> SolverResult:
    """Solve ``z = f(z)`` for a batch of flat states ``z0`` of shape ``(B, D)``.

    The inverse Jacobian of g is approximated by ``H = -I + sum_i u_i v_i^T`` (starting from
    -I, the inverse Jacobian of g when J_f = 0) and refined by Sherman-Morrison updates; once
    ``memory`` updates are held, the approximation restarts from -I (at the current iterate).
    The step is ``s = -H g``, so ``-H`` estimates ``(I - J_f)^-1``.

    With ``inverse`` the result carries ``H`` as an :class:`InverseEstimate`, per sample the H the
    solver held at the sample's last iterate, including the update from its last step (which the
    plain solve skips, having no use for it): for a sample that stopped (converged, stalled) the
    H of its stop, kept through the later restarts of the others; ``-I`` (rank 0) for a diverged
    sample. Its ``u``/``v`` are views of the history buffers, at most ``memory`` vectors each per
    sample; beyond them the request keeps one ``(B, 2, D)`` buffer during the solve, whatever
    ``max_iter``. The iterates, and so every other field of the result, are those of the plain
    solve.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
            sequence_length: as for every solver (:mod:`deq_core.solvers.registry`).
        memory: rank-one updates kept before the restart (``None``: ``max_iter``, never restart).
        inverse: also return the inverse-Jacobian estimate (``SolverResult.inverse``).

    Returns:
        the :class:`SolverResult`.
    """
    # The iterate and a copy of f(z) live in the tracker's rows: a new best is one row gather.
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length, regions=[("z", 1), ("fz", 1)])
    rows = tracker.rows
    batch, dim = z0.shape
    mem = memory or max_iter
    us = z0.new_empty(batch, mem, dim)  # only slots already written are read
    vs = z0.new_empty(batch, mem, dim)
    # The step s and -H g at the next iterate side by side, so that s.s and s.(-H g) are one pass.
    pair = z0.new_empty(batch, 2, dim)
    step, neg_hg = pair[:, 0], pair[:, 1]
    gs = (torch.empty_like(z0), torch.empty_like(z0))  # g at the current and the next iterate
    coeff = z0.new_empty(batch * mem)  # (B, n, 1) views: contiguous, as bmm writes them
    dots = z0.new_empty(batch, 1, 2)
    denom, scale, factor, ok, flag = (z0.new_empty(batch), z0.new_empty(batch), z0.new_empty(batch),
                                      torch.empty(batch, dtype=torch.bool, device=z0.device),
                                      torch.empty(batch, dtype=torch.bool, device=z0.device))
    if inverse:
        # Per sample, the slots of its current H (an update at slot n makes n + 1). In the first
        # cycle a frozen sample's slots below its rank are never written again; after a restart
        # they would be, so from then on frozen samples keep the vectors an update overwrites
        # (saved in `kept`). `written` bounds the slots any sample uses.
        rank = torch.zeros(batch, dtype=torch.int64, device=z0.device)
        kept = z0.new_empty(batch, 2, dim) if mem < max_iter else None  # no restart otherwise
        written = 0
    z = rows["z"].copy_(z0)  # updated in place below
    fz = f(z)
    g = torch.sub(fz, z, out=gs[0])
    k = 0
    while True:
        rows["fz"].copy_(fz)
        active = tracker.update(z, fz, g, z_at=("z", 0), fz_at=("fz", 0))
        if tracker.done():
            result = tracker.result()
            if inverse:
                result.inverse = _estimate(us, vs, rank, written, result.diverged)
            return result
        # A full history restarts from H = -I: overwriting the oldest update instead leaves an H
        # that no longer satisfies the recent secant conditions, and on a slowly contracting map
        # (spectral radius 0.99) every memory from 2 to 20 diverged that way.
        n = k % mem
        # Step s = -H g; frozen samples take no step (and so keep their iterate). After an update
        # u v^T of H, -H g is the -H g of the previous H times a per-sample factor (below).
        if n == 0:
            step.copy_(g)
        else:
            torch.mul(neg_hg, factor[:, None], out=step)
        step.masked_fill_(torch.logical_not(active, out=flag)[:, None], 0.0)
        z.add_(step)
        fz = f(z)
        g = torch.sub(fz, z, out=gs[(k + 1) % 2])
        if not inverse and (n == mem - 1 or k + 2 >= max_iter):
            k += 1  # the next step restarts, or the next update ends the solve: no use for an update
            continue
        keep = inverse and k >= mem
        if keep:
            kept[:, 0].copy_(us[:, n])
            kept[:, 1].copy_(vs[:, n])
        # The good Broyden update H += u v^T with v = H^T s, u = (s - H y) / (v . y), y the change
        # of g. As s = -H g_old, H y = s - (-H g) and s - H y = -H g, the new -H g: so u needs no
        # pass of its own, v . y = s . s - s . (-H g), and the next step is (-H g) (s . s) / (v . y).
        c = coeff[:batch * n].view(batch, n, 1)
        if n == 0:
            neg_hg.copy_(g)
            torch.neg(step, out=vs[:, 0])
        else:
            torch.bmm(vs[:, :n], g.unsqueeze(2), out=c)
            torch.baddbmm(g.unsqueeze(1), c.transpose(1, 2), us[:, :n], alpha=-1.0, out=neg_hg.unsqueeze(1))
            torch.bmm(us[:, :n], step.unsqueeze(2), out=c)
            torch.baddbmm(step.unsqueeze(1), c.transpose(1, 2), vs[:, :n], beta=-1.0, out=vs[:, n].unsqueeze(1))
        torch.bmm(step.unsqueeze(1), pair.transpose(1, 2), out=dots)
        s_s = dots[:, 0, 0]
        torch.sub(s_s, dots[:, 0, 1], out=denom)
        # Skip the update (zero u, v) for frozen samples and vanishing denominators. Scaling by a
        # per-sample factor is cheaper than a masked select; it is exact where the factor is 0
        # unless the sample's vectors are non-finite, and then the sample has diverged anyway.
        torch.lt(torch.abs(denom, out=scale), float("inf"), out=ok)
        ok.logical_and_(torch.ne(denom, 0.0, out=flag)).logical_and_(active)
        torch.logical_not(ok, out=flag)
        torch.reciprocal(denom, out=scale).masked_fill_(flag, 0.0)
        torch.mul(neg_hg, scale[:, None], out=us[:, n])
        vs[:, n].mul_(ok[:, None])
        torch.mul(s_s, scale, out=factor).masked_fill_(flag, 1.0)
        if keep:
            torch.logical_not(active, out=flag)
            torch.where(flag[:, None], kept[:, 0], us[:, n], out=us[:, n])
            torch.where(flag[:, None], kept[:, 1], vs[:, n], out=vs[:, n])
        if inverse:
            rank.masked_fill_(active, n + 1)
            written = max(written, n + 1)
        k += 1


def _estimate(us: torch.Tensor, vs: torch.Tensor, rank: torch.Tensor, written: int,
              diverged: torch.Tensor) -> InverseEstimate:
    """The estimate over the first ``written`` slots of the history buffers (views: no pass over
    them), rank 0 for diverged samples."""
    return InverseEstimate(u=us[:, :written], v=vs[:, :written], rank=rank.masked_fill_(diverged, 0))
