"""Test utilities: problems with known properties, and checks of solver results against the
rules they promise.

Used by the project's tests and benchmarks, and meant for a user's own solver: a solver
registered with :func:`~deq_core.solvers.register_solver` keeps the outcome rules of
:mod:`deq_core.solvers.tracking` when :func:`outcome_disagreements` finds nothing on its results
(``tests/test_solver_outcomes.py`` shows how to sweep random problems with it).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .solvers import SolverResult, residuals
from .solvers.precision import AutocastBoundary, lower_precision, resolution, unit_roundoff

__all__ = ["contraction", "random_map", "outcome_disagreements"]

# f evaluated again at the same iterate may round differently (a BLAS kernel picks its code path by
# the alignment of its operands), by up to about one unit roundoff of f's precision relative to
# ||f(z)|| on the maps tried: the recomputed residuals may differ from the reported ones by this
# many unit roundoffs (relative, or times ||f(z)|| for absolute residuals), and by this share of
# themselves.
_NOISE_ROUNDOFFS = 4.0
_VALUE_RTOL = 1e-4


def contraction(dim: int, radius: float, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """A random ``(dim, dim)`` matrix with spectral radius ``radius``.

    Args:
        dim: the size.
        radius: the largest eigenvalue modulus (below 1: a contraction in some norm).
        dtype: the matrix dtype.
        seed: the seed of its normal entries.

    Returns:
        the matrix.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=dtype)
    return a * (radius / torch.linalg.eigvals(a).abs().max())


def random_map(seed: int, dim: int, batch: int, radius: float, kind: str = "tanh",
               dtype: torch.dtype = torch.float32,
               sequence_length: Optional[int] = None) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """A random map on ``(batch, dim)`` solver states and its zero initial state.

    Args:
        seed: the seed of its parameters.
        dim: the state width.
        batch: the samples.
        radius: the spectral radius of ``A`` (above 1: no stable fixed point for ``"linear"``).
        kind: ``"tanh"`` for ``tanh(A z + b)``, ``"linear"`` for ``A z + b``.
        dtype: the precision f computes in; the state is float64 for float64, else float32
            (bfloat16 or float16: f rounds its product there, the reduced-precision floor).
        sequence_length: consecutive runs of this many samples are the positions of a sequence,
            each also reading the mean of the earlier ones (``+ C mean(z_<t)`` inside): a causal
            map, as solved with ``sequence_length``.

    Returns:
        ``(f, z0)``.
    """
    g = torch.Generator().manual_seed(seed)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    a = contraction(dim, radius, dtype=state, seed=seed)
    b = torch.randn(batch, dim, generator=g, dtype=state)
    c = 0.3 * torch.randn(dim, dim, generator=g, dtype=state)

    def f(z: torch.Tensor) -> torch.Tensor:
        pre = (z.to(dtype) @ a.T.to(dtype)).to(state) + b
        if sequence_length is not None:
            seq = z.view(-1, sequence_length, dim)
            counts = torch.arange(sequence_length, dtype=state).clamp_min(1).view(1, -1, 1)
            pre = pre + ((torch.cumsum(seq, dim=1) - seq) / counts @ c.T).reshape(batch, dim)
        return torch.tanh(pre) if kind == "tanh" else pre

    return f, torch.zeros(batch, dim, dtype=state)


def outcome_disagreements(f: Callable[[torch.Tensor], torch.Tensor], result: SolverResult, tol: float,
                          stop_mode: str = "abs", precision: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per sample, whether a solve's reported outcome disagrees with its returned iterate.

    f is evaluated once more at the returned iterates (the whole batch, so a causal map over
    sequence positions sees the returned states of the earlier positions); the true residuals
    there decide what the outcome must be, up to the rounding of that evaluation (four unit
    roundoffs of f's precision, relative to ``||f(z)||``; half the floor band):

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
    fz = fz.to(result.z.dtype)
    abs_res, rel_res = residuals(result.z, fz)
    dtype = precision or result.z.dtype
    noise_rel = _NOISE_ROUNDOFFS * unit_roundoff(dtype)
    noise_abs = noise_rel * torch.linalg.vector_norm(fz, dim=1)
    res, noise = (rel_res, noise_rel) if stop_mode == "rel" else (abs_res, noise_abs)
    floor = resolution(dtype)
    bad = ~(_close(result.abs_res, abs_res, noise_abs) & _close(result.rel_res, rel_res, noise_rel))
    if result.fz is not None:
        reported = result.fz.to(fz.dtype)
        finite = torch.isfinite(fz).all(dim=1)
        bad |= finite != torch.isfinite(reported).all(dim=1)
        gap = torch.linalg.vector_norm(reported - fz, dim=1)
        bad |= finite & ~(gap <= noise_abs)
    flags = torch.stack([result.converged, result.stalled, result.diverged]).int()
    bad |= flags.sum(dim=0) > 1
    bad |= result.converged & ~(res <= tol + noise)
    bad |= ~result.converged & ~(res > tol - noise) & torch.isfinite(res)
    bad |= result.stalled & ~(rel_res <= floor + noise_rel)
    bad |= ~result.converged & ~result.stalled & (rel_res <= floor - noise_rel)
    return bad


def _close(reported: torch.Tensor, true: torch.Tensor, noise) -> torch.Tensor:
    """Elementwise: within ``noise`` plus ``_VALUE_RTOL`` of ``true``, or both non-finite."""
    close = (reported - true).abs() <= _VALUE_RTOL * true.abs() + noise
    return close | (~torch.isfinite(reported) & ~torch.isfinite(true))
