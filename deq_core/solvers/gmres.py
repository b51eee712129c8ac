"""Restarted GMRES for an affine map: the linear system of the implicit backward pass."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .tracking import DEFAULT_STOP_MODE, DIVERGENCE_FACTOR, Tracker
from .precision import unit_roundoff
from .registry import SolverOption, register_solver
from .result import SolverResult

# A new Krylov direction whose norm after orthogonalization is within this many unit roundoffs of
# the norm of A v before it is rounding, not a direction: the Krylov space is exhausted (a "happy
# breakdown") and the sample's later directions in the cycle are zero. The same test on the
# diagonal of the triangular factor drops a direction that adds nothing to the least-squares fit.
_BREAKDOWN_ROUNDOFFS = 16.0
# The residual of the Arnoldi recurrence is not limited by the rounding of f: once it reaches f's
# precision it keeps falling (to 0 after a breakdown) where f(u_j) - u_j would not, and a solve to
# a tolerance below that floor would be reported converged. The tracker is given it lengthened by
# an estimate of that rounding: this factor times
#     u_f (l ||u|| + a) + u (||u|| + ||f(u)|| + a + b),
# u_f the unit roundoff of the precision f computes in, u the state's, a = sum_i |y_i| ||L v_i||,
# b = sum_i |y_i| and l the largest ||L v_i|| of the cycle: f's linear part rounded at f's
# precision at u and in each finite difference weighted by its use, everything else at the
# state's (as in the implicit backward's u J_f + g, whose vector-Jacobian product alone is
# computed under autocast). On random affine maps (D = 64, conditions 5 to 9000, solved to their
# floor) f's residual at the returned iterate was then 0.45x to 3.1x the reported one in float64,
# float32, float16 and bfloat16; the recurrence alone had claimed 1e-10 where a float16 f gave 1e-3.
_ROUNDING_ALLOWANCE = 0.5


@register_solver("gmres", {
    "restart": SolverOption(int, lambda v: v >= 1, ">= 1", "Krylov vectors per cycle before a restart"),
}, affine_only=True)
def gmres(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_iter: int,
          tol: float, stop_mode: str = DEFAULT_STOP_MODE, check_every: Optional[int] = None,
          divergence_factor: float = DIVERGENCE_FACTOR, trace: bool = False,
          precision: Optional[torch.dtype] = None, sequence_length: Optional[int] = None,
          restart: int = 20) -> SolverResult:
    """Solve ``z = f(z)`` for an **affine** map f, ``f(z) = L(z) + c``, on flat states ``(B, D)``.

    Each sample (row) is an independent linear system ``(I - L) z = c``, solved by GMRES
    restarted every ``restart`` Krylov vectors (fewer when the state is narrower). A cycle starts
    at the sample's best iterate u with one evaluation ``f(u)``, whose true residual
    ``r = f(u) - u`` starts the Krylov space of ``A = I - L``; each Arnoldi step evaluates f once
    to apply A to the newest basis vector (``L v = (f(u + s v) - f(u)) / s``), orthogonalizes
    the result (classical Gram-Schmidt, twice) and gives the iterate ``u_j = u + V_j y_j`` with
    the smallest residual over the Krylov space (Givens rotations per sample). So ``max_iter``
    counts the evaluations of f exactly (one per Arnoldi step plus one per cycle), and without a
    restart (``restart >= D``) GMRES reaches the solution within ``D + 1`` evaluations in exact
    arithmetic.

    The residual of an Arnoldi step's iterate is that of the Arnoldi recurrence,
    ``r_j = r - A V_j y_j = V_{j+1} (beta e_1 - H_j y_j)``, and the tracker sees ``u_j`` with the
    implied map value ``u_j + r_j``: for an affine map that is ``f(u_j)`` in exact arithmetic,
    without evaluating f there. The true residual is evaluated at the start of every cycle (every
    restart), from the best iterate so far. As the recurrence keeps falling below the precision
    f is computed in, its residual is reported lengthened by an estimate of its rounding error
    (f's linear part at u and along the step rounded at f's precision, the rest at the state's),
    so that a tolerance below f's floor ends stalled, as with the other solvers, rather than
    converged. Stopping, outcomes and the best iterate follow :mod:`deq_core.solvers.tracking` as
    for every solver; a stopped sample is evaluated at its returned iterate. With
    ``check_every=0`` the loop reads nothing back and allocates nothing after its first iteration.

    f must be affine (the backward map ``u -> u J_f(z*) + g`` of the implicit gradient is): on a
    nonlinear f the finite differences above are secants, not ``L v``, the result is not the
    fixed point, and the residuals reported for in-cycle iterates are the recurrence's, not
    f's, so the solve may be reported converged where it is not. Registered ``affine_only``
    (:func:`~deq_core.solvers.solves_affine_only`). Sequences (``sequence_length``) are
    refused: their positions are coupled through f, not independent systems.

    Memory: the Krylov basis holds ``restart + 1`` states per sample.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision:
            as for every solver (:mod:`deq_core.solvers.registry`).
        sequence_length: must be ``None`` (see above).
        restart: Krylov vectors per cycle before a restart.

    Returns:
        the :class:`SolverResult`; where the returned iterate is an in-cycle one its ``fz`` is
        the implied ``f(z)``, within a few unit roundoffs of ``||f(z)||`` of f's value there.
    """
    if sequence_length is not None:
        raise ValueError("solver 'gmres' solves each sample as an independent affine system and cannot solve a "
                         "sequence (sequence_length): its positions are coupled through f. Use another solver or "
                         "sample_dims=1")
    tracker = Tracker(z0, max_iter, tol, stop_mode, check_every, divergence_factor, trace, precision,
                      None, regions=[("z", 1), ("fz", 1)])
    dim = z0.shape[1]
    # Arnoldi steps per cycle: no more than the Krylov space has directions, nor than the solve
    # has evaluations after the cycle's first.
    m = max(1, min(restart, dim, max_iter - 1))
    work = _Workspace(z0, m)
    base, fbase, res, x, w = work.base, work.fbase, work.res, work.x, work.w
    basis, hess_t, r_fac, q_t = work.basis, work.hess_t, work.r_fac, work.q_t
    beta, scale, norm0, h_next = work.beta, work.scale, work.norm0, work.h_next
    tmp = work.tmp
    flag, broken, small = work.flag, work.broken, work.small
    tiny = torch.finfo(z0.dtype).tiny
    cut = _BREAKDOWN_ROUNDOFFS * unit_roundoff(z0.dtype)
    noise = (_ROUNDING_ALLOWANCE * unit_roundoff(precision or z0.dtype),
             _ROUNDING_ALLOWANCE * unit_roundoff(z0.dtype))
    while True:
        # A cycle: the true residual at the best iterate so far (z0 at first).
        base.copy_(tracker.best_z)
        fbase.copy_(f(base))
        torch.sub(fbase, base, out=res)
        active = _feed(tracker, work, base, fbase, res)
        if tracker.done():
            return tracker.result()
        torch.linalg.vector_norm(res, dim=1, out=beta)
        torch.eq(beta, 0.0, out=broken)  # at the solution already: no direction to follow
        torch.reciprocal(beta, out=tmp).masked_fill_(broken, 0.0)
        torch.mul(res, tmp[:, None], out=basis[:, 0])
        # L v is a finite difference (f(u + s v) - f(u)) / s, exact for an affine f but for
        # rounding: f(u + s v) and f(u) are rounded at about u_f (||f(u)|| + s ||L v||), u + s v
        # at about u_f (||u|| + s), so L v (v a unit vector) carries an error of about
        # u_f (1 + ||L|| + (||u|| + ||f(u)||) / s). With s ~ ||r|| that is ~u_f ||f(u)|| / ||r||,
        # large once the residual is small: the difference is lost to rounding against f(u).
        # s = ||u|| + ||f(u)|| (>= ||r||, and = ||r|| in a first cycle from 0) makes the step as
        # large as the values it is taken between, so L v is resolved to f's precision in every
        # cycle. Measured on random affine maps run to their floor (D = 64): s = ||r|| ended 2x
        # to 5x higher, 26 unit roundoffs of ||f|| against 5 (float64), 18 against 6 (float32).
        torch.linalg.vector_norm(base, dim=1, out=work.size)
        torch.add(work.size, torch.linalg.vector_norm(fbase, dim=1, out=tmp), out=scale).clamp_(min=tiny)
        q_t.copy_(work.eye)
        work.lmax.zero_()
        for j in range(m):
            # x = u + s v_j; a stopped sample is evaluated at its best iterate, which stays put.
            torch.addcmul(base, basis[:, j], scale[:, None], out=x)
            torch.where(torch.logical_not(active, out=flag)[:, None], tracker.best_z, x, out=x)
            # A v_j = v_j - (f(x) - f(u)) / s, zero once the sample's Krylov space is exhausted.
            torch.sub(f(x), fbase, out=w)
            w.div_(scale[:, None])
            torch.maximum(torch.linalg.vector_norm(w, dim=1, out=work.lnorm[:, j]), work.lmax, out=work.lmax)
            torch.sub(basis[:, j], w, out=w)
            w.masked_fill_(broken[:, None], 0.0)
            torch.linalg.vector_norm(w, dim=1, out=norm0)
            _orthogonalize(w, basis[:, :j + 1], hess_t[:, j:j + 1, :j + 1], work.h2[:, :, :j + 1])
            torch.linalg.vector_norm(w, dim=1, out=h_next)
            # Happy breakdown: w is rounding, not a direction; the next basis vector is 0.
            broken.logical_or_(torch.le(h_next, torch.mul(norm0, cut, out=tmp), out=flag))
            h_next.masked_fill_(broken, 0.0)
            hess_t[:, j, j + 1].copy_(h_next)
            torch.reciprocal(h_next, out=tmp).masked_fill_(broken, 0.0)
            torch.mul(w, tmp[:, None], out=basis[:, j + 1])
            _rotate(work, j, cut)
            # y_j from R y = g (g the rotated beta e_1); a dropped direction gets y = 0.
            rhs = work.rhs[:, :j + 1]
            torch.mul(q_t[:, :j + 1, 0], beta[:, None], out=rhs[:, :, 0])
            rhs.masked_fill_(small[:, :j + 1, None], 0.0)
            y = work.y[:, :j + 1]
            torch.linalg.solve_triangular(r_fac[:, :j + 1, :j + 1], rhs, upper=True, out=y)
            # The recurrence's residual r_j = V_{j+1} (beta e_1 - H_j y), from H itself rather
            # than the rotated |g_{j+1}|, so that it holds for the y actually taken.
            coeff = work.coeff[:, :, :j + 2]
            torch.bmm(y.transpose(1, 2), hess_t[:, :j + 1, :j + 2], out=coeff)
            coeff.neg_()
            coeff[:, 0, 0].add_(beta)
            torch.bmm(coeff, basis[:, :j + 2], out=w.unsqueeze(1))
            torch.baddbmm(base.unsqueeze(1), y.transpose(1, 2), basis[:, :j + 1], out=x.unsqueeze(1))
            torch.add(x, w, out=work.fx)
            _allow_rounding(work, j, w, noise)
            active = _feed(tracker, work, x, work.fx, w)
            if tracker.done():
                return tracker.result()


class _Workspace:
    """Every buffer of a solve with ``m`` Arnoldi steps per cycle, allocated once."""

    def __init__(self, z0: torch.Tensor, m: int) -> None:
        batch, dim = z0.shape
        small = dict(dtype=z0.dtype, device=z0.device)
        flags = dict(dtype=torch.bool, device=z0.device)
        self.base, self.fbase, self.res, self.x, self.w, self.fx, self.g = (torch.empty_like(z0) for _ in range(7))
        self.basis = z0.new_empty(batch, m + 1, dim)
        # Column j of the Hessenberg matrix H is row j of hess_t (its entries below j + 1 stay 0).
        self.hess_t = torch.zeros(batch, m, m + 1, **small)
        self.h2 = z0.new_empty(batch, 1, m + 1)
        self.r_fac = torch.zeros(batch, m, m, **small)  # R of H = Q R, upper triangular
        # Q^T: the Givens rotations of the cycle so far, applied to the identity.
        self.q_t = z0.new_empty(batch, m + 1, m + 1)
        self.eye = torch.eye(m + 1, **small)
        self.rot = z0.new_empty(batch, m + 1, 1)
        self.row = z0.new_empty(batch, m + 1)
        self.rhs = z0.new_empty(batch, m, 1)
        self.y = z0.new_empty(batch, m, 1)
        self.coeff = z0.new_empty(batch, 1, m + 1)
        self.beta, self.scale, self.norm0, self.h_next, self.cos, self.sin, self.tmp, self.diag = (
            z0.new_empty(batch) for _ in range(8))
        self.flag, self.broken = torch.empty(batch, **flags), torch.empty(batch, **flags)
        self.small = torch.empty(batch, m, **flags)  # directions dropped from the fit, per step
        self.lnorm = z0.new_empty(batch, m)  # ||L v_i||
        self.ay = z0.new_empty(batch, m, 1)
        self.size, self.lmax, self.a, self.b, self.delta = (z0.new_empty(batch) for _ in range(5))


def _feed(tracker: Tracker, work: "_Workspace", z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Give the tracker the iterate ``z`` with ``fz`` and residual ``g`` for the active samples;
    a frozen sample is given what it was given last (as the other solvers keep its iterate), so
    that the values computed for it, which the tracker ignores, cannot move its stop tests."""
    keep = tracker.active[:, None]
    rows = tracker.rows
    torch.where(keep, z, rows["z"], out=rows["z"])
    torch.where(keep, fz, rows["fz"], out=rows["fz"])
    torch.where(keep, g, work.g, out=work.g)
    return tracker.update(rows["z"], rows["fz"], work.g, z_at=("z", 0), fz_at=("fz", 0))


def _allow_rounding(work: "_Workspace", j: int, res: torch.Tensor, noise: Tuple[float, float]) -> None:
    """Lengthen the recurrence's residual ``res`` (in place) by the estimate of its rounding error
    that ``_ROUNDING_ALLOWANCE`` states, per sample; ``noise`` holds its factors for f's precision
    and the state's."""
    ay = work.ay[:, :j + 1]
    torch.abs(work.y[:, :j + 1], out=ay)
    delta, a, b, tmp = work.delta, work.a, work.b, work.tmp
    torch.bmm(work.lnorm[:, :j + 1].unsqueeze(1), ay, out=a.view(-1, 1, 1))
    torch.sum(ay.squeeze(2), dim=1, out=b)
    # u (||u|| + ||f(u)|| + a + b) + u_f (l ||u|| + a)
    torch.add(work.scale, a, out=delta).add_(b).mul_(noise[1])
    torch.addcmul(a, work.lmax, work.size, out=tmp)
    delta.add_(tmp, alpha=noise[0])
    torch.linalg.vector_norm(res, dim=1, out=tmp)
    delta.div_(tmp.clamp_(min=torch.finfo(res.dtype).tiny)).add_(1.0)
    res.mul_(delta[:, None])


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor, h: torch.Tensor, h2: torch.Tensor) -> None:
    """``w -= V (V^T w)`` twice (classical Gram-Schmidt with one re-orthogonalization), per sample;
    ``h`` (``(B, 1, j)``) receives the coefficients ``V^T w`` of both passes."""
    row = w.unsqueeze(1)
    torch.bmm(row, basis.transpose(1, 2), out=h)
    row.baddbmm_(h, basis, alpha=-1.0)
    torch.bmm(row, basis.transpose(1, 2), out=h2)
    row.baddbmm_(h2, basis, alpha=-1.0)
    h.add_(h2)


def _rotate(work: _Workspace, j: int, cut: float) -> None:
    """Column j of H into R: the cycle's earlier Givens rotations (``Q^T``), then a new one that
    zeroes ``H[j + 1, j]``, applied to ``Q^T`` too (rows j and j + 1)."""
    q_t, cos, sin, diag, flag = work.q_t, work.cos, work.sin, work.diag, work.flag
    col = work.hess_t[:, j, :j + 2]
    rot = work.rot[:, :j + 1]
    torch.bmm(q_t[:, :j + 1, :j + 1], col[:, :j + 1].unsqueeze(2), out=rot)
    a, b = rot[:, j, 0], col[:, j + 1]
    torch.hypot(a, b, out=diag)
    torch.eq(diag, 0.0, out=flag)  # a zero column: the identity rotation
    torch.div(a, diag, out=cos).masked_fill_(flag, 1.0)
    torch.div(b, diag, out=sin).masked_fill_(flag, 0.0)
    work.r_fac[:, :j, j].copy_(rot[:, :j, 0])
    # A diagonal at rounding level relative to ||A v_j||: the direction adds nothing, drop it.
    small = work.small[:, j]
    torch.le(diag, torch.mul(work.norm0, cut, out=work.tmp), out=small)
    work.r_fac[:, j, j].copy_(diag.masked_fill_(small, 1.0))
    # Row j of Q^T has a 0 in column j + 1 and row j + 1 is e_{j+1}: rotating the pair gives
    # c row_j + s e_{j+1} and -s row_j + c e_{j+1}.
    old = work.row[:, :j + 2]
    old.copy_(q_t[:, j, :j + 2])
    torch.mul(old, sin[:, None], out=q_t[:, j + 1, :j + 2]).neg_()
    q_t[:, j + 1, j + 1].copy_(cos)
    torch.mul(old, cos[:, None], out=q_t[:, j, :j + 2])
    q_t[:, j, j + 1].copy_(sin)
