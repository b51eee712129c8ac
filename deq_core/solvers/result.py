"""The one result type every solver returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SolverResult", "InverseEstimate"]


@dataclass
class InverseEstimate:
    """A quasi-Newton solver's low-rank estimate of the inverse Jacobian of ``g(z) = f(z) - z``
    at each sample's returned iterate: ``H = -I + sum_{i < rank} u_i v_i^T`` (``u_i = u[:, i]``,
    ``v_i = v[:, i]``), so that ``(I - J_f)^-1 ~= -H = I - sum_{i < rank} u_i v_i^T``.

    ``u`` and ``v`` have shape ``(B, r, D)`` in the solver's flat layout, ``r`` at most the
    solver's memory (views of its history buffers, which stay allocated as long as the estimate
    is); ``rank`` (``(B,)``, int64) says how many leading slots belong to each sample's H, the
    slots past it are ignored (they may hold anything). A sample of rank 0 has ``H = -I``, and
    so does one whose estimate evaluates to a non-finite value (the application checks).
    """

    u: torch.Tensor
    v: torch.Tensor
    rank: torch.Tensor

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``-H x ~= (I - J_f)^-1 x`` for each sample's column ``x`` (``(B, D)``)."""
        return self._apply(x, self.v, self.u)

    def solve_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``-H^T x ~= (I - J_f)^-T x``, i.e. the row ``x (I - J_f)^-1``, for each sample's ``x``
        (``(B, D)``): the solution of ``w = w J_f + x`` that an implicit backward pass solves for."""
        return self._apply(x, self.u, self.v)

    def _apply(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``x - sum_{i < rank} right_i (left_i . x)`` per sample; ``x`` where that is not finite."""
        slots = torch.arange(left.shape[1], device=x.device) < self.rank[:, None]  # (B, r)
        coeff = torch.bmm(left, x.unsqueeze(2)).squeeze(2)  # left_i . x
        coeff = torch.where(slots, coeff, 0.0).unsqueeze(1)
        out = torch.baddbmm(x.unsqueeze(1), coeff, right, alpha=-1.0).squeeze(1)
        ok = torch.isfinite(out).all(dim=1, keepdim=True)
        return torch.where(ok, out, x)


@dataclass
class SolverResult:
    """Outcome of a batched fixed-point solve; every per-sample field has shape ``(B,)``.

    ``z`` is each sample's lowest-residual finite iterate (in the stop mode's residual) and ``fz``
    the map's value there, ``f(z)``, when the solver keeps it (``None`` otherwise). ``steps``
    counts the evaluations of the map a sample needed (it stops counting once the sample converged,
    stalled or diverged). Each sample ends in exactly one of ``converged``, ``stalled`` (at the
    precision floor), ``diverged``, or none of them: it ran out of iterations while still making
    progress. The rules are stated once, in :mod:`deq_core.solvers.tracking`. ``stalled`` is all
    False when a solver does not set it. ``host_reads`` counts device-to-host reads the solver made.
    ``trace`` (when requested) holds the stop-mode residual of every iteration, shape
    ``(iterations, B)``. ``inverse`` (when requested from a solver that keeps one, ``broyden``)
    is the solver's :class:`InverseEstimate` at the returned iterates.
    """

    z: torch.Tensor
    steps: torch.Tensor
    abs_res: torch.Tensor
    rel_res: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    host_reads: int = 0
    trace: Optional[torch.Tensor] = None
    fz: Optional[torch.Tensor] = None
    stalled: Optional[torch.Tensor] = None
    inverse: Optional[InverseEstimate] = None

    def __post_init__(self) -> None:
        if self.stalled is None:
            self.stalled = torch.zeros_like(self.converged)
