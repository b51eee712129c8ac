"""Bookkeeping shared by every solver: residuals, per-sample masks, best iterate, stop checks.

How a solve ends, per sample (the one place these rules are stated). ``r_k`` is the residual of
the stop mode at the k-th iterate (after k evaluations of f), ``a_k`` the absolute one, ``s_k =
||f(z_k)||``, u the unit roundoff of the precision f is computed in and ``R = RESOLUTION_BAND u``
the relative residual that precision resolves (:func:`~deq_core.solvers.precision.resolution`).
Each sample returns its **best iterate**, the lowest-residual one among its non-diverging iterates
(the first iterate when none other is better, finite or not), with ``fz = f(z)`` there; the
outcome is decided by that iterate, so it always agrees with the residuals returned:

- **converged**: its residual is within ``tol``.
- **stalled at the precision floor**: not converged, and its relative residual is within ``R``:
  the precision cannot resolve ``tol`` there (f in float16/bfloat16 stops such a sample early,
  once it gains less than ``MIN_GAIN`` over ``PATIENCE`` steps; see
  :mod:`deq_core.solvers.precision`).
- **diverged**: neither, and a divergence event happened at an iterate of the sample, or it made
  no progress. An iterate diverges when its residual is not finite or exceeds
  ``divergence_factor * max(r_1, tol, floor_1)`` (``floor_1`` the floor at the first iterate,
  ``R s_1`` in absolute terms, ``R`` in relative ones: a warm start at the floor is measured
  against the floor, not against its own rounding noise; with sequences, each reference is the
  largest of the sequence's positions up to this one), or when the state has grown so far
  that the floor exceeds the first residual, ``R s_k > max(a_1, divergence_factor R s_1)``
  (there the residual is rounding: float32 would call ``z + 1`` at ``z = 1e8`` converged). No
  progress: after ``NO_PROGRESS_STEPS`` evaluations the best residual is not below
  ``(1 - NO_PROGRESS_MARGIN) r_1`` (the margin keeps round-off from counting as progress), or,
  in a solve of at least ``2 NO_PROGRESS_STEPS`` iterations that ran to its limit, the second
  half of the solve lowered the best residual by less than ``NO_PROGRESS_WINDOW_GAIN`` and set
  a new best in fewer than half of its steps (a map without a fixed point that a solver wanders
  on, its residual drifting above a floor of its own, with a rare lucky low; a slow contraction
  lowers it a little at every step).
- otherwise the sample **ran out of iterations while still making progress**.

A sample stops (is frozen: it takes no more steps and keeps its iterate) once its best residual
is within tol, it stalls early, or an iterate of it diverges.

With ``sequence_length`` L, consecutive runs of L samples are the positions of one sequence: a
position that converged or stalled stays active until every earlier position of its sequence has
stopped too (a diverged one stops at once). Every decision about a position then depends on
that position and the ones before it only, so a causal f gives exactly causal outputs, and a
position never stops while the positions it attends to still move. A position's residual depends
on the earlier positions, so a best iterate is kept for the whole rest of a sequence at once:
where the first active position of a sequence improves, it and every later position take the
current iterate, and a position that stops is set back to its best iterate. The returned state
of a sequence is then one that f maps to the returned ``fz``, and the residuals returned are its
residuals (for a deterministic f).

The bookkeeping is written for a solve that a CUDA graph can capture: every buffer is allocated
before the first iteration and every later operation writes into one (``out=``, in place), no
decision reads a device value back unless ``check_every`` asks for it, and every shape depends on
the iteration number only, never on the data. Per-sample selections of state rows (the best
iterate, the frozen samples of an update) are row gathers (:meth:`~deq_core.solvers.rows.RowBuffer.select`) rather than
masked selects, which read both candidates (and on CPU run several times slower than a copy).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .precision import MIN_GAIN, PATIENCE, floor_for, resolution
from .result import SolverResult
from .rows import RowBuffer

__all__ = ["STOP_MODES", "DIVERGENCE_FACTOR", "residuals", "Tracker"]

STOP_MODES = ("abs", "rel")  # the residual a solve stops on: ||f(z) - z||, or that over ||f(z)||
DEFAULT_STOP_MODE = "abs"
DIVERGENCE_FACTOR = 1e4
NO_PROGRESS_STEPS = 10
NO_PROGRESS_MARGIN = 1e-3
NO_PROGRESS_WINDOW_GAIN = 0.01
_REL_EPS = 1e-8


def _residuals_and_scale(z: torch.Tensor, fz: torch.Tensor,
                         g: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    abs_res = torch.linalg.vector_norm(fz - z if g is None else g, dim=1)
    scale = torch.linalg.vector_norm(fz, dim=1)
    return abs_res, abs_res / (scale + _REL_EPS), scale


def residuals(z: torch.Tensor, fz: torch.Tensor,
              g: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample residuals of a batch of flat iterates, as the solvers compute them.

    Args:
        z: iterates of shape ``(B, D)``.
        fz: ``f(z)``, same shape.
        g: ``fz - z`` when the caller has it already.

    Returns:
        ``(abs_res, rel_res)``, each of shape ``(B,)``: ``||f(z) - z||`` and
        ``||f(z) - z|| / ||f(z)||`` (with a tiny constant against a zero denominator).
    """
    abs_res, rel_res, _ = _residuals_and_scale(z, fz, g)
    return abs_res, rel_res


def resolve_check_every(check_every: Optional[int], device: torch.device) -> int:
    """``None`` picks the interval between host reads: every step on CPU (a read is free there),
    every 4th on accelerators (a read stalls the device queue)."""
    if check_every is None:
        return 1 if device.type == "cpu" else 4
    return check_every


class Tracker:
    """Follows a batched solve over ``(B, D)`` iterates.

    All decisions stay on the device as masks; the host reads ``active.any()`` only every
    ``check_every`` iterations (0: never, the solve runs to ``max_iter``). When f's values are
    computed in float16 or bfloat16 (``precision``), a sample whose residual levels off at that
    precision's floor is frozen as stalled (see :mod:`deq_core.solvers.precision`).

    The best iterate and its f value are kept, twice each, in one :class:`~deq_core.solvers.rows.RowBuffer` (``rows``)
    around the solver's own ``regions`` (name, rows per sample): the solver keeps its iterate and
    a copy of ``f(z)`` there (and tells :meth:`update` where), so that a new best is one row gather
    from the old best and the candidate (:meth:`~deq_core.solvers.rows.RowBuffer.select`). ``active`` is updated in
    place, so a solver may hold it across iterations. With ``sequence_length``, :meth:`update`
    also sets a position that stops back to its best iterate, in the solver's region of ``z``.
    """

    def __init__(self, z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 check_every: Optional[int], divergence_factor: float, trace: bool,
                 precision: Optional[torch.dtype], sequence_length: Optional[int] = None,
                 regions: Sequence[Tuple[str, int]] = ()) -> None:
        batch = z0.shape[0]
        dev = z0.device
        self.sequence_length = sequence_length
        self.max_iter = max_iter
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.check_every = resolve_check_every(check_every, dev)
        self.divergence_factor = divergence_factor
        # The two copies of each best sit outermost, so that gathering into one reads a view
        # that holds the other and every candidate, but not the copy written.
        self.rows = RowBuffer(z0, [("best_fz0", 1), ("best_z0", 1), *regions, ("best_z1", 1), ("best_fz1", 1)])
        self.rows["best_z0"].copy_(z0)
        self.rows["best_fz0"].copy_(z0)
        self._current = {"best_z": 0, "best_fz": 0}  # which copy holds the best
        small = dict(dtype=z0.dtype, device=dev)
        # Residuals (abs, rel) of the current iterate and of each sample's best one, and ||f(z)||.
        self._cur = torch.empty(2, batch, **small)
        self._best = torch.full((2, batch), float("inf"), **small)
        self.best_abs, self.best_rel = self._best[0], self._best[1]
        self.best_res = self._best[1] if self.rel else self._best[0]
        self._res = self._cur[1] if self.rel else self._cur[0]
        self._scale = torch.empty(batch, **small)
        self._tmp = torch.empty(batch, **small)
        # Per sample: the first residual and the divergence thresholds on the residual and on ||f(z)||.
        self._first = torch.empty(3, batch, **small)
        self.first_res, self._res_limit, self._scale_limit = self._first
        # The best residual at the middle of a long solve, for the no-progress window.
        self._half = max_iter // 2 if max_iter >= 2 * NO_PROGRESS_STEPS else None
        self._half_best = torch.empty(batch, **small) if self._half else None
        self._records = torch.zeros(batch, dtype=torch.int32, device=dev)  # new bests after the middle
        self.steps = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=dev)  # a divergence event, latched
        self.active = torch.ones_like(self.diverged)
        self._masks = torch.empty(5, batch, dtype=torch.bool, device=dev)  # scratch
        self.floor = floor_for(precision)
        self.resolution = resolution(precision or z0.dtype)
        self._flat = torch.zeros(batch, dtype=torch.int32, device=dev)
        if sequence_length is not None:
            shape = (batch // sequence_length, sequence_length)
            self._prefix = (*torch.empty(3, *shape, dtype=torch.int8, device=dev),
                            torch.empty(shape, dtype=torch.int64, device=dev))
        self._g: Optional[torch.Tensor] = None
        self.host_reads = 0
        self.iteration = 0
        self._trace = torch.empty(max_iter, batch, **small) if trace else None

    @property
    def best_z(self) -> torch.Tensor:
        """Each sample's lowest-residual iterate so far (``z0`` before any)."""
        return self.rows[f"best_z{self._current['best_z']}"]

    @property
    def best_fz(self) -> torch.Tensor:
        """f at :attr:`best_z`."""
        return self.rows[f"best_fz{self._current['best_fz']}"]

    @property
    def spare(self) -> str:
        """The region of the copy of the best iterate that the next :meth:`update` overwrites: a
        free ``(B, D)`` scratch until then (it lies on the side of the region the latest iterate
        was read from)."""
        return f"best_z{1 - self._current['best_z']}"

    def _keep_best(self, key: str, better: torch.Tensor, at: Tuple[str, int]) -> None:
        old = self._current[key]
        self.rows.select(f"{key}{1 - old}", better, at, (f"{key}{old}", 0))
        self._current[key] = 1 - old

    def _first_iteration(self, scale: torch.Tensor) -> None:
        """The references of the divergence tests, from the first iterate (see the module docstring)."""
        big = torch.finfo(scale.dtype).max
        self.first_res.copy_(self._res)
        limit = self._res_limit
        if self.rel:
            limit.fill_(self.resolution)
        else:
            torch.add(scale, _REL_EPS, out=limit).mul_(self.resolution)
        torch.maximum(limit, self.first_res, out=limit).clamp_(min=self.tol).mul_(self.divergence_factor)
        torch.maximum(torch.div(self._cur[0], self.resolution, out=self._scale_limit),
                      torch.mul(scale, self.divergence_factor, out=self._tmp), out=self._scale_limit)
        if self.sequence_length is not None:
            # A position's first residual was measured against earlier positions at z0, which then
            # move: the references of a position are the largest of its sequence up to it.
            refs = self._first.view(3, -1, self.sequence_length)
            refs.copy_(torch.cummax(refs, dim=2).values)
        # A non-finite limit tests nothing: the largest float does the same in `x <= limit`,
        # which is also the test for a finite x.
        self._first[1:].nan_to_num_(nan=big, posinf=big)

    def update(self, z: torch.Tensor, fz: torch.Tensor, g: Optional[torch.Tensor] = None, *,
               z_at: Tuple[str, int], fz_at: Tuple[str, int]) -> torch.Tensor:
        """Record the residual of iterate ``z`` (with ``fz = f(z)``, and ``g = fz - z`` when the
        solver has it already); return the active mask. ``z_at`` and ``fz_at`` say where
        ``rows`` holds ``z`` and ``fz``: ``(region, row of each sample in it)``.

        A sample stays active until its best residual is within ``tol``, it stalls at the
        precision floor or it diverges; frozen samples keep their best iterate and stop counting
        steps.
        """
        self.iteration += 1
        first = self.iteration == 1
        if g is None:
            if self._g is None:
                self._g = torch.empty_like(z)
            g = torch.sub(fz, z, out=self._g)
        cur, res, scale, tmp = self._cur, self._res, self._scale, self._tmp
        torch.linalg.vector_norm(g, dim=1, out=cur[0])
        torch.linalg.vector_norm(fz, dim=1, dtype=scale.dtype, out=scale)  # fz may be a half f output
        torch.div(cur[0], torch.add(scale, _REL_EPS, out=tmp), out=cur[1])
        if first:
            self._first_iteration(scale)
        good, flag, better, stop, last = self._masks
        active = self.active  # still the mask of the iterate z until the end of this update
        # Not diverging: a residual that is finite and not exploding, and ||f(z)|| not so large
        # that the precision's floor there exceeds where the solve started (`x <= limit` is False
        # for NaN and inf; for bools `a > b` is `a & ~b`).
        torch.le(res, self._res_limit, out=good)
        torch.gt(good, torch.gt(scale, self._scale_limit, out=flag), out=good)
        self.steps.add_(active)
        if self.floor is not None:
            # Steps in a row that gained less than MIN_GAIN on the best residual.
            torch.lt(res, torch.mul(self.best_res, 1.0 - MIN_GAIN, out=tmp), out=flag)
            self._flat.add_(1).masked_fill_(flag, 0)
        if first:
            better.copy_(active)  # the first iterate is every sample's best so far, finite or not
        else:
            # A lower residual at a non-diverging iterate (`res >= best` is False where best is NaN).
            torch.gt(good, torch.ge(res, self.best_res, out=better), out=better).logical_and_(active)
        if self.sequence_length is not None:
            self._consistent(better)
        self._keep_best("best_z", better, z_at)
        self._keep_best("best_fz", better, fz_at)
        torch.where(better, cur, self._best, out=self._best)
        if self._half is not None and self.iteration > self._half:
            self._records.add_(better)
        # A sample stops once its best residual is within tol, it has stalled at the floor or a
        # divergence event happened at an active iterate.
        self.diverged.logical_or_(torch.gt(active, good, out=flag))
        torch.le(self.best_res, self.tol, out=stop).logical_or_(self.diverged)
        if self.floor is not None:
            stalled = torch.ge(self._flat, PATIENCE, out=flag)
            stop.logical_or_(stalled.logical_and_(torch.le(self.best_rel, self.floor, out=last)))
        if self.sequence_length is None:
            torch.logical_not(stop, out=active)
        else:
            self._stop_in_order(stop, better, z_at)
        if self._half == self.iteration:
            self._half_best.copy_(self.best_res)
        if self._trace is not None:
            inf = float("inf")
            torch.nan_to_num(res, nan=inf, posinf=inf, out=self._trace[self.iteration - 1])
        return active

    def _consistent(self, better: torch.Tensor) -> None:
        """Restrict the new bests of sequence positions to consistent ones.

        A position's residual depends on the positions before it, so its best iterate is only
        worth keeping if the earlier positions return the states it was measured with. Every
        frozen position holds its best iterate (:meth:`_stop_in_order`), so the first active
        position of a sequence decides for all: where it improved, it and every later position
        take the current iterate (whatever their own residual); elsewhere none does.
        """
        lead, seen, flags, indices = self._prefix
        flags.copy_(self.active.view(flags.shape))
        torch.cummax(flags, dim=1, out=(seen, indices))
        # The first active position: active there and at no earlier one.
        torch.gt(seen[:, 1:], seen[:, :-1], out=lead[:, 1:])
        lead[:, 0].copy_(seen[:, 0])
        lead.mul_(better.view(lead.shape))
        torch.cummax(lead, dim=1, out=(seen, indices))
        torch.ne(seen.view(-1), 0, out=better)

    def _stop_in_order(self, stop: torch.Tensor, changed: torch.Tensor, z_at: Tuple[str, int]) -> None:
        """Freeze a position once it and every earlier position of its sequence have stopped (a
        diverged one at once); a position that freezes now without taking the current iterate is
        set back to its best one, so that later positions are measured against what it returns."""
        active = self.active
        stopped, values, _, indices = self._prefix
        stopped.copy_(stop.view(stopped.shape))
        torch.cummin(stopped, dim=1, out=(values, indices))
        frozen, restore = self._masks[1], self._masks[4]
        torch.ne(values.view(-1), 0, out=frozen).logical_or_(self.diverged)
        torch.gt(active, changed, out=restore).logical_and_(frozen)  # froze now, best not current
        torch.logical_not(frozen, out=active)
        region, row = z_at
        z = self.rows.history(region)[:, row]
        torch.where(restore[:, None], self.best_z, z, out=z)

    def done(self) -> bool:
        """Whether to stop now: the limit is reached, or (at a check) no sample is active."""
        if self.iteration >= self.max_iter:
            return True
        if self.check_every > 0 and self.iteration % self.check_every == 0:
            self.host_reads += 1
            return not bool(self.active.any())
        return False

    def result(self) -> SolverResult:
        """The solve's outcome: each sample's best iterate, its residuals, steps and flags, the
        flags decided by the returned iterate as the module docstring states."""
        trace = self._trace[:self.iteration].clone() if self._trace is not None and self.iteration else None
        converged = self.best_res <= self.tol
        at_floor = self.best_rel <= self.resolution
        undecided = ~converged & ~at_floor
        diverged = undecided & self.diverged
        if self.iteration:
            open_ = undecided & ~self.diverged
            no_progress = (self.steps >= NO_PROGRESS_STEPS) & ~(self.best_res < (1.0 - NO_PROGRESS_MARGIN) * self.first_res)
            if self._half is not None and self.iteration == self.max_iter:
                no_progress |= (~(self.best_res < (1.0 - NO_PROGRESS_WINDOW_GAIN) * self._half_best)
                                & (2 * self._records < self.max_iter - self._half))
            diverged = diverged | (open_ & no_progress)
        # Copies: views would keep the whole row buffer alive as long as the result.
        return SolverResult(z=self.best_z.clone(), fz=self.best_fz.clone(), steps=self.steps,
                            abs_res=self.best_abs.clone(), rel_res=self.best_rel.clone(),
                            converged=converged, diverged=diverged, stalled=~converged & at_floor,
                            host_reads=self.host_reads, trace=trace)
