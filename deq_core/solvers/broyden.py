"""Limited-memory ("good") Broyden method on g(z) = f(z) - z."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
from .precision import unit_roundoff
from .registry import SolverOption, register_solver
from .result import InverseEstimate, SolverResult

# An update is skipped when |v . y| is within this many sqrt(D) unit roundoffs of ||v|| ||y||: the
# size of the rounding error of a length-D dot product, so such a denominator carries no sign.
_DENOMINATOR_ROUNDOFF = 4.0


@register_solver("broyden", {
    "memory": SolverOption(int, lambda v: v >= 1, ">= 1", "rank-one updates kept: once that many are held, the "
                           "inverse-Jacobian approximation is reduced to its best rank memory // 2 approximation "
                           "(Broyden rank reduction; memory 1 restarts from -I); None keeps max_iter", optional=True),
})
def broyden(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_iter: int,
            tol: float, stop_mode: str = DEFAULT_STOP_MODE, check_every: Optional[int] = None,
            divergence_factor: float = DIVERGENCE_FACTOR, trace: bool = False,
            precision: Optional[torch.dtype] = None, sequence_length: Optional[int] = None,
            memory: Optional[int] = None, inverse: bool = False) -> SolverResult:
    """Solve ``z = f(z)`` for a batch of flat states ``z0`` of shape ``(B, D)``.

    The inverse Jacobian of g is approximated by ``H = -I + sum_i u_i v_i^T`` (starting from
    -I, the inverse Jacobian of g when J_f = 0) and refined by the good Broyden update from each
    step s and the change y of g it caused. The step is ``s = -H g``, so ``-H`` estimates
    ``(I - J_f)^-1``. An update whose denominator ``v . y`` is round-off relative to
    ``||v|| ||y||`` (in particular a step that rounding absorbed, ``z + s == z``, so ``y = 0``)
    is skipped. Once ``memory`` updates are held, the sum is replaced by its best approximation
    of rank ``memory // 2`` (a truncated SVD of the ``(D, memory)`` factors through two QR
    factorizations, per sample): Broyden rank reduction, which keeps the directions the updates
    agree on instead of discarding them all (van de Rotten and Verduyn Lunel, 2005). On random
    linear maps of spectral radius 0.99 that converges within 4x the evaluations of unlimited
    memory for memory >= 5 (``python -m bench.core --only broyden_memory``); restarting from -I
    did on half of them. The reduction holds two more ``(B, memory, D)`` buffers.

    With ``inverse`` the result carries ``H`` as an :class:`InverseEstimate`: per sample, the H
    the solver held at the sample's last iterate, including the update from its last step (which
    the plain solve skips, having no use for it); for a sample that stopped (converged, stalled)
    the H of its stop, as later reductions of the others truncate it (its own updates stop);
    ``-I`` (rank 0) for a diverged sample. Its ``u``/``v`` are views of the history buffers. The
    iterates, and so every other field of the result, are those of the plain solve.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision, sequence_length:
            as for every solver (:mod:`deq_core.solvers.registry`).
        memory: rank-one updates kept before a reduction (``None``: ``max_iter``, never reduce).
        inverse: also return the inverse-Jacobian estimate (``SolverResult.inverse``).

    Returns:
        the :class:`SolverResult`.
    """
    # The iterate and a copy of f(z) live in the tracker's rows: a new best is one row gather.
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      sequence_length, regions=[("z", 1), ("fz", 1)])
    rows = tracker.rows
    batch, dim = z0.shape
    mem = min(memory or max_iter, max_iter)
    us, vs = _history(z0, mem, memory, max_iter)  # only slots already written are read
    # Updates follow every evaluation but the first and (unless the estimate is returned) the last.
    fills = mem <= max_iter - (1 if inverse else 2)
    reduction = _RankReduction(us, vs) if fills else None
    # The step s, v = H^T s and y side by side: their Gram matrix (s.s, v.y, v.v, y.y) is one pass.
    trio = z0.new_empty(batch, 3, dim)
    step, v_new, y = trio.unbind(1)
    neg_hg = torch.empty_like(z0)  # -H g at the latest iterate
    gs = (torch.empty_like(z0), torch.empty_like(z0))  # g at the current and the next iterate
    coeff = z0.new_empty(batch * mem)  # (B, n, 1) views: contiguous, as bmm writes them
    gram = z0.new_empty(batch, 3, 3)
    s_s, v_y, v_v, y_y = gram[:, 0, 0], gram[:, 1, 2], gram[:, 1, 1], gram[:, 2, 2]
    noise, scale, factor, ok, flag = (z0.new_empty(batch), z0.new_empty(batch), z0.new_empty(batch),
                                      torch.empty(batch, dtype=torch.bool, device=z0.device),
                                      torch.empty(batch, dtype=torch.bool, device=z0.device))
    roundoff2 = (_DENOMINATOR_ROUNDOFF * dim ** 0.5 * unit_roundoff(z0.dtype)) ** 2
    z = rows["z"].copy_(z0)  # updated in place below
    fz = f(z)
    g = torch.sub(fz, z, out=gs[0])
    n = 0  # slots of H held, the same for every sample
    fused = False  # whether neg_hg * factor is -H g at the current iterate (right after an update)
    k = 0
    while True:
        rows["fz"].copy_(fz)
        active = tracker.update(z, fz, g, z_at=("z", 0), fz_at=("fz", 0))
        if tracker.done():
            result = tracker.result()
            if inverse:
                rank = torch.full((batch,), n, dtype=torch.int64, device=z0.device).masked_fill_(result.diverged, 0)
                result.inverse = InverseEstimate(u=us[:, :n], v=vs[:, :n], rank=rank)
            return result
        # Step s = -H g; frozen samples take no step (and so keep their iterate). Right after an
        # update u v^T of H, -H g is the -H g of the previous H times a per-sample factor (below).
        if n == 0:
            step.copy_(g)
        elif fused:
            torch.mul(neg_hg, factor[:, None], out=step)
        else:
            _neg_h_times(us[:, :n], vs[:, :n], g, coeff[:batch * n].view(batch, n, 1), out=step)
        step.masked_fill_(torch.logical_not(active, out=flag)[:, None], 0.0)
        z.add_(step)
        fz = f(z)
        g_old, g = g, torch.sub(fz, z, out=gs[(k + 1) % 2])
        k += 1
        if not inverse and k + 1 >= max_iter:
            continue  # the next update ends the solve: no use for an update of H
        # The good Broyden update H += u v^T with v = H^T s, u = (s - H y) / (v . y). As
        # s = -H g_old, s - H y = -H g, the new -H g: so u needs no pass of its own, and the next
        # step is (-H g) (1 - v.g / v.y) = (-H g) (s . s) / (v . y), as v . g_old = -s . s.
        c = coeff[:batch * n].view(batch, n, 1)
        if n == 0:
            neg_hg.copy_(g)
            torch.neg(step, out=v_new)
        else:
            _neg_h_times(us[:, :n], vs[:, :n], g, c, out=neg_hg)
            torch.bmm(us[:, :n], step.unsqueeze(2), out=c)
            torch.baddbmm(step.unsqueeze(1), c.transpose(1, 2), vs[:, :n], beta=-1.0, out=v_new.unsqueeze(1))
        # y in full, so that a step that left g unchanged gives v . y = 0 exactly.
        torch.sub(g, g_old, out=y)
        torch.bmm(trio, trio.transpose(1, 2), out=gram)
        # Update where v . y is finite, above round-off relative to ||v|| ||y||, and the sample
        # active. Scaling by a per-sample factor is cheaper than a masked select; it is exact
        # where the factor is 0 unless the sample's vectors are non-finite, and then the sample
        # has diverged anyway.
        torch.mul(v_v, y_y, out=noise).mul_(roundoff2)
        torch.gt(torch.mul(v_y, v_y, out=scale), noise, out=ok)
        ok.logical_and_(torch.lt(torch.abs(v_y, out=scale), float("inf"), out=flag)).logical_and_(active)
        torch.logical_not(ok, out=flag)
        torch.reciprocal(v_y, out=scale).masked_fill_(flag, 0.0)
        torch.mul(neg_hg, scale[:, None], out=us[:, n])
        torch.mul(v_new, ok[:, None], out=vs[:, n])
        torch.mul(s_s, scale, out=factor).masked_fill_(flag, 1.0)
        n += 1
        fused = True
        if n == mem:
            n = reduction.reduce()
            fused = False


def _history(z0: torch.Tensor, mem: int, memory: Optional[int], max_iter: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``(B, mem, D)`` u and v buffers, or an error naming the settings that sized them."""
    batch, dim = z0.shape
    try:
        return z0.new_empty(batch, mem, dim), z0.new_empty(batch, mem, dim)
    except RuntimeError as error:  # torch's CPU and CUDA out-of-memory errors are RuntimeErrors
        size = 2 * batch * mem * dim * z0.element_size()
        kept = f"memory={memory}" if memory is not None else f"memory=None keeps max_iter={max_iter}"
        raise MemoryError(
            f"broyden cannot allocate its history of 2 x {batch} x {mem} x {dim} values ({size / 2**30:.1f} GiB; "
            f"{kept} rank-one updates): give a smaller memory (DEQConfig: f_solver_options/b_solver_options "
            "{'memory': m}) or max_iter (f_max_iter/b_max_iter)") from error


def _neg_h_times(us: torch.Tensor, vs: torch.Tensor, x: torch.Tensor, coeff: torch.Tensor,
                 out: torch.Tensor) -> None:
    """``out = -H x = x - sum_i u_i (v_i . x)`` per sample (two passes over the history)."""
    torch.bmm(vs, x.unsqueeze(2), out=coeff)
    torch.baddbmm(x.unsqueeze(1), coeff.transpose(1, 2), us, alpha=-1.0, out=out.unsqueeze(1))


class _RankReduction:
    """Replaces ``sum_i u_i v_i^T`` over a full history by its best approximation of rank
    ``memory // 2``, per sample, in buffers allocated once (allocates nothing, reads nothing back).

    With ``U`` and ``V`` the ``(D, m)`` matrices of the u and v: ``U = Q_u R_u``, ``V = Q_v R_v``
    (QR), ``R_u R_v^T = X S Y^T`` (SVD of an ``(m, m)`` matrix), and the first k columns of
    ``Q_u X S`` and ``Q_v Y`` are the new u and v.
    """

    def __init__(self, us: torch.Tensor, vs: torch.Tensor) -> None:
        batch, mem, dim = us.shape
        self.us, self.vs = us, vs
        rank = min(mem, dim)
        self.keep = min(mem // 2, rank)
        # Column-major (LAPACK's layout) where LAPACK writes, so that no call restrides its output.
        self.q = [us.new_empty(batch, rank, dim).mT for _ in range(2)]
        self.r = [us.new_empty(batch, mem, rank).mT for _ in range(2)]
        self.core = us.new_empty(batch, rank, rank)
        self.left = us.new_empty(batch, rank, rank).mT
        self.sigma = us.new_empty(batch, rank)
        self.right = us.new_empty(batch, rank, rank).mT
        self.coeff = us.new_empty(batch, self.keep, rank)

    def reduce(self) -> int:
        """Reduce the full history in place; returns the slots now held (``memory // 2``)."""
        if not self.keep:
            return 0  # memory 1: a restart from H = -I
        (qu, qv), (ru, rv), k = self.q, self.r, self.keep
        torch.linalg.qr(self.us.mT, out=(qu, ru))
        torch.linalg.qr(self.vs.mT, out=(qv, rv))
        # A diverged sample's non-finite factors must not stop the SVD of the others.
        torch.bmm(ru, rv.mT, out=self.core).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        torch.linalg.svd(self.core, full_matrices=False, out=(self.left, self.sigma, self.right))
        torch.mul(self.left[:, :, :k].mT, self.sigma[:, :k, None], out=self.coeff)
        torch.bmm(self.coeff, qu.mT, out=self.us[:, :k])
        torch.bmm(self.right[:, :k], qv.mT, out=self.vs[:, :k])
        return k
