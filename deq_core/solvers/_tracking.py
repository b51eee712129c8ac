"""Bookkeeping shared by every solver: residuals, per-sample masks, best iterate, stop checks.

How a solve ends, per sample (the one place these rules are stated; ``r_k`` is the residual of
the stop mode after k evaluations of f, u the unit roundoff of the precision f is computed in):

- **converged**: ``r_k <= tol`` with a finite residual and a state that has not exploded.
- **stalled at the precision floor**: f runs in float16/bfloat16, the relative residual is within
  ``FLOOR_BAND u`` and gained less than ``MIN_GAIN`` on its best over ``PATIENCE`` steps (see
  :mod:`deq_core.solvers.precision`); or, in any precision, the sample made no progress because
  it started within ``STAGNANT_FLOOR_BAND u`` of the floor (a warm start at an equilibrium).
- **diverged**: a non-finite residual; ``r_k > divergence_factor * max(r_1, tol)``; an exploding
  state, ``||f(z_k)|| > divergence_factor * (||z_0|| + ||f(z_0)||)`` (where float32 can no longer
  resolve the residual and would call it 0); or no progress: after at least
  ``NO_PROGRESS_STEPS`` evaluations the best residual is not below ``(1 - NO_PROGRESS_MARGIN) r_1``
  (a map without a fixed point that a solver wanders on; the margin keeps round-off from counting
  as progress, the step count keeps a convergent map's first transient from counting as none).
- otherwise the sample **ran out of iterations while still making progress**.

With ``sequence_length`` L, consecutive runs of L samples are the positions of one sequence: a
position that converged or stalled stays active until every earlier position of its sequence has
stopped too (a diverged one stops at once). Every decision about a position then depends on
that position and the ones before it only, so a causal f gives exactly causal outputs, and a
position never stops while the positions it attends to still move.

Every sample ends in exactly one of these; its ``z`` is its lowest-residual finite iterate and
``fz`` the value of f there (both ``z0`` when no iterate had a finite residual).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .precision import MIN_GAIN, PATIENCE, floor_for, unit_roundoff
from .result import SolverResult

__all__ = ["STOP_MODES", "DIVERGENCE_FACTOR", "residuals", "Tracker"]

STOP_MODES = ("abs", "rel")  # the residual a solve stops on: ||f(z) - z||, or that over ||f(z)||
DEFAULT_STOP_MODE = "abs"
DIVERGENCE_FACTOR = 1e4
NO_PROGRESS_STEPS = 10
NO_PROGRESS_MARGIN = 1e-3
STAGNANT_FLOOR_BAND = 8.0
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
    """

    def __init__(self, z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 check_every: Optional[int], divergence_factor: float, trace: bool,
                 precision: Optional[torch.dtype], sequence_length: Optional[int] = None) -> None:
        if z0.dim() != 2:
            raise ValueError(f"solver state must have shape (batch, dim), got {tuple(z0.shape)}")
        if stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        batch = z0.shape[0]
        dev = z0.device
        if sequence_length is not None and (sequence_length < 1 or batch % sequence_length):
            raise ValueError(f"sequence_length must be >= 1 and divide the {batch} samples, got {sequence_length}")
        self.sequence_length = sequence_length
        self.max_iter = max_iter
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.check_every = resolve_check_every(check_every, dev)
        self.divergence_factor = divergence_factor
        self.best_z = z0.clone()
        self.best_fz = z0.clone()
        self.best_res = torch.full((batch,), float("inf"), dtype=z0.dtype, device=dev)
        self.best_abs = torch.full_like(self.best_res, float("inf"))
        self.best_rel = torch.full_like(self.best_res, float("inf"))
        self.first_res: Optional[torch.Tensor] = None
        self.steps = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.active = torch.ones(batch, dtype=torch.bool, device=dev)
        self.converged = torch.zeros_like(self.active)
        self.diverged = torch.zeros_like(self.active)
        self.stalled = torch.zeros_like(self.active)
        self.floor = floor_for(precision)
        self.resolution = STAGNANT_FLOOR_BAND * unit_roundoff(precision or z0.dtype)
        self.z0_norm = torch.linalg.vector_norm(z0, dim=1)
        self.first_scale: Optional[torch.Tensor] = None
        self._flat = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.host_reads = 0
        self.iteration = 0
        self._trace: Optional[List[torch.Tensor]] = [] if trace else None

    def update(self, z: torch.Tensor, fz: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Record the residual of iterate ``z`` (with ``fz = f(z)``, and ``g = fz - z`` when the
        solver has it already); return the active mask.

        A sample stays active until its residual falls to ``tol`` or it diverges; frozen samples
        keep their best iterate and stop counting steps.
        """
        self.iteration += 1
        abs_res, rel_res, scale = _residuals_and_scale(z, fz, g)
        res = rel_res if self.rel else abs_res
        if self.first_res is None:
            self.first_res = res.clone()
            self.first_scale = self.z0_norm + scale
        finite = torch.isfinite(res)
        exploded = ((res > self.divergence_factor * torch.clamp(self.first_res, min=self.tol))
                    | (scale > self.divergence_factor * self.first_scale))
        was_active = self.active
        self.steps += was_active.to(self.steps.dtype)
        if self.floor is not None:
            # Steps in a row that gained less than MIN_GAIN on the best residual.
            gained = res < (1.0 - MIN_GAIN) * self.best_res
            self._flat = torch.where(gained, 0, self._flat + 1)
        better = was_active & finite & (res < self.best_res)
        torch.where(better[:, None], z, self.best_z, out=self.best_z)  # in place: no new buffer
        torch.where(better[:, None], fz, self.best_fz, out=self.best_fz)
        self.best_res = torch.where(better, res, self.best_res)
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        open_ = was_active & ~(self.converged | self.stalled | self.diverged)
        newly_conv = open_ & finite & (res <= self.tol) & ~exploded
        newly_div = open_ & (~finite | exploded)
        self.converged = self.converged | newly_conv
        self.diverged = self.diverged | newly_div
        if self.floor is not None:
            newly_stalled = (open_ & ~newly_conv & ~newly_div & (self._flat >= PATIENCE)
                             & (self.best_rel <= self.floor))
            self.stalled = self.stalled | newly_stalled
        stopped = self.converged | self.stalled | self.diverged
        if self.sequence_length is not None:
            # A position stops once it and every earlier position of its sequence have.
            prefix = stopped.view(-1, self.sequence_length).to(torch.int8).cummin(dim=1).values
            stopped = prefix.view(-1).bool() | self.diverged
        self.active = ~stopped
        if self._trace is not None:
            self._trace.append(torch.where(finite, res, torch.full_like(res, float("inf"))))
        return self.active

    def done(self) -> bool:
        """Whether to stop now: the limit is reached, or (at a check) no sample is active."""
        if self.iteration >= self.max_iter:
            return True
        if self.check_every > 0 and self.iteration % self.check_every == 0:
            self.host_reads += 1
            return not bool(self.active.any())
        return False

    def result(self) -> SolverResult:
        """The solve's outcome: each sample's best iterate, its residuals, steps and flags."""
        trace = torch.stack(self._trace) if self._trace else None
        diverged, stalled = self.diverged, self.stalled
        if self.first_res is not None:
            open_ = ~self.converged & ~diverged & ~stalled
            no_progress = (open_ & (self.steps >= NO_PROGRESS_STEPS)
                           & ~(self.best_res < (1.0 - NO_PROGRESS_MARGIN) * self.first_res))
            at_floor = self.best_rel <= self.resolution
            stalled = stalled | (no_progress & at_floor)
            diverged = diverged | (no_progress & ~at_floor)
        return SolverResult(z=self.best_z, fz=self.best_fz, steps=self.steps, abs_res=self.best_abs,
                            rel_res=self.best_rel, converged=self.converged, diverged=diverged,
                            stalled=stalled, host_reads=self.host_reads, trace=trace)
