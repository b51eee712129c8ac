"""Test utilities: checks of solver results against the rules they promise.

Used by the project's tests and benchmarks, and meant for a user's own solver: a solver
registered with :func:`~deq_core.register_solver` keeps the outcome rules of
:mod:`deq_core.solvers._tracking` when :func:`outcome_disagreements` finds nothing on its results.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .solvers import SolverResult, residuals
from .solvers.precision import AutocastBoundary, lower_precision, resolution

__all__ = ["outcome_disagreements"]

# Reported residuals and values may differ from those recomputed at the returned iterate by this
# much, relatively: f evaluated twice on the same batch is deterministic on every backend we know,
# but a user's f need not be bit-reproducible.
_VALUE_RTOL = 1e-4


def outcome_disagreements(f: Callable[[torch.Tensor], torch.Tensor], result: SolverResult, tol: float,
                          stop_mode: str = "abs", precision: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per sample, whether a solve's reported outcome disagrees with its returned iterate.

    f is evaluated once more at the returned iterates (the whole batch, so a causal map over
    sequence positions sees the returned states of the earlier positions); the true residuals
    there decide what the outcome must be:

    - the reported residuals and ``fz`` must be those of the returned iterate;
    - converged: the residual of the stop mode is within ``tol``;
    - stalled: not within ``tol``, and the relative residual within the precision's
      :func:`~deq_core.solvers.precision.resolution`;
    - diverged, or none of the three: neither within ``tol`` nor within that resolution;
    - at most one of the three flags.

    Args:
        f: the map the solver was given, on ``(B, D)`` states.
        result: the solver's result.
        tol: the solve's tolerance.
        stop_mode: the solve's stop mode, ``"abs"`` or ``"rel"``.
        precision: the solve's ``precision``; as in the solve, an autocast of the caller's lowers
            it to autocast's dtype.

    Returns:
        a ``(B,)`` bool tensor, True where the result breaks a rule.
    """
    precision = lower_precision(precision, AutocastBoundary(result.z.device.type).compute_dtype)
    with torch.no_grad():
        fz = f(result.z)
    abs_res, rel_res = residuals(result.z, fz.to(result.z.dtype))
    res = rel_res if stop_mode == "rel" else abs_res
    within_tol = res <= tol
    at_floor = rel_res <= resolution(precision or result.z.dtype)
    bad = ~(_same(result.abs_res, abs_res) & _same(result.rel_res, rel_res))
    if result.fz is not None:
        fz = fz.to(result.fz.dtype)
        gap = torch.linalg.vector_norm(result.fz - fz, dim=1)
        bad |= ~_same(gap + torch.linalg.vector_norm(fz, dim=1), torch.linalg.vector_norm(fz, dim=1))
    flags = torch.stack([result.converged, result.stalled, result.diverged]).int()
    bad |= flags.sum(dim=0) > 1
    bad |= result.converged & ~within_tol
    bad |= result.stalled & (within_tol | ~at_floor)
    bad |= ~result.converged & ~result.stalled & (within_tol | at_floor)
    return bad


def _same(reported: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal within ``_VALUE_RTOL``, or both non-finite."""
    close = (reported - true).abs() <= _VALUE_RTOL * true.abs() + torch.finfo(true.dtype).tiny
    return close | (~torch.isfinite(reported) & ~torch.isfinite(true))
