"""A frozen copy of the solvers and Tracker as they were before the fused bookkeeping (issue 14),
kept only as the reference the fused solvers are compared with (tests/test_solver_fusion.py) and
counted against (bench/core.py "passes over the state per iteration"). Not registered, not public,
not to be edited: it is the "before" of those comparisons. Its outcome rules are those of that
time (issue 21 changed them since); the comparisons use its iterates, not its outcomes.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from deq_core.solvers.precision import MIN_GAIN, PATIENCE, floor_for, unit_roundoff
from deq_core.solvers.registry import _state_precision
from deq_core.solvers.result import SolverResult

STOP_MODES = ("abs", "rel")
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


def _low_rank(us: torch.Tensor, vs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i us_i (vs_i . x) for histories of shape (B, n, D) and x of shape (B, D)."""
    coeff = torch.bmm(vs, x.unsqueeze(2))  # (B, n, 1)
    return torch.bmm(coeff.transpose(1, 2), us).squeeze(1)


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


# The registry's guard (float32/float64 state, arithmetic outside the caller's autocast), without
# registering: the reference solvers are called as the registered ones were.
SOLVERS = {"anderson": _state_precision(anderson), "broyden": _state_precision(broyden),
           "fixed_point": _state_precision(fixed_point)}
